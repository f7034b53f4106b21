package hooks

import (
	"fmt"
	"strings"
	"sync"
	"unicode/utf8"
)

// tail is an io.Writer that keeps only the last limit bytes written to it,
// so a hook that writes without end costs at most limit bytes of memory.
type tail struct {
	// limit is the most bytes kept.
	limit int

	// mu guards buf and total: exec's copying goroutine writes while the
	// hook runs, and the runner reads once the hook was reaped.
	mu sync.Mutex
	// buf holds the last bytes written, at most limit. Guarded by mu.
	buf []byte
	// total counts every byte ever written. Guarded by mu.
	total int64
}

func newTail(limit int) *tail { return &tail{limit: limit} }

// Write keeps the end of p (and of what came before) and never fails.
func (t *tail) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.total += int64(len(p))
	if len(p) >= t.limit {
		t.buf = append(t.buf[:0], p[len(p)-t.limit:]...)
		return len(p), nil
	}
	if over := len(t.buf) + len(p) - t.limit; over > 0 {
		t.buf = append(t.buf[:0], t.buf[over:]...)
	}
	t.buf = append(t.buf, p...)
	return len(p), nil
}

// describe returns the kept output for an error message, trimmed of
// surrounding white space, with how much was dropped if the writer wrote
// more than it kept: "stderr: text" or "stderr (last 4096 of 1048576
// bytes): text". It returns "" when there is nothing to show.
func (t *tail) describe(stream string) string {
	t.mu.Lock()
	defer t.mu.Unlock()
	kept := t.buf
	if int64(len(kept)) < t.total {
		// The cut may have split a character: drop its continuation bytes.
		for len(kept) > 0 && !utf8.RuneStart(kept[0]) {
			kept = kept[1:]
		}
	}
	text := strings.TrimSpace(strings.ToValidUTF8(string(kept), "\uFFFD"))
	if text == "" {
		return ""
	}
	if int64(len(t.buf)) < t.total {
		return fmt.Sprintf("%s (last %d of %d bytes): %s", stream, len(t.buf), t.total, text)
	}
	return fmt.Sprintf("%s: %s", stream, text)
}
