package hooks

import (
	"strings"
	"testing"
)

func TestTailKeepsTheLastBytes(t *testing.T) {
	for _, tc := range []struct {
		name   string
		limit  int
		writes []string
		want   string
	}{
		{"nothing written", 8, nil, ""},
		{"only white space", 8, []string{"  \n\t"}, ""},
		{"under the limit, trimmed", 8, []string{" hi\n"}, "stderr: hi"},
		{"exactly the limit", 8, []string{"1234", "5678"}, "stderr: 12345678"},
		{"over the limit across writes", 8, []string{"12345", "6789A"}, "stderr (last 8 of 10 bytes): 3456789A"},
		{"one write over the limit", 8, []string{"0123456789ABC"}, "stderr (last 8 of 13 bytes): 56789ABC"},
		{"cut inside a character", 4, []string{"é", "abc"}, "stderr (last 4 of 5 bytes): abc"},
		{"invalid UTF-8 is replaced", 8, []string{"a\xffb"}, "stderr: a\uFFFDb"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tl := newTail(tc.limit)
			for _, w := range tc.writes {
				if n, err := tl.Write([]byte(w)); n != len(w) || err != nil {
					t.Fatalf("Write(%q) = %d, %v", w, n, err)
				}
			}
			if got := tl.describe("stderr"); got != tc.want {
				t.Errorf("got %q, want %q", got, tc.want)
			}
		})
	}
}

func TestTailMemoryIsBounded(t *testing.T) {
	tl := newTail(outputLimit)
	for i := range 4096 {
		tl.Write([]byte(strings.Repeat("y", i%700)))
	}
	if len(tl.buf) != outputLimit || cap(tl.buf) > 2*outputLimit {
		t.Errorf("kept %d bytes in a buffer of %d, want %d in at most %d", len(tl.buf), cap(tl.buf), outputLimit, 2*outputLimit)
	}
}
