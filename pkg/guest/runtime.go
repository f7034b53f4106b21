package guest

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/containerd/errdefs"
	runc "github.com/containerd/go-runc"
)

// Runtime is the OCI runtime binary the agent drives.
type Runtime struct {
	// Name is "crun" or "runc" (or the base name of a custom binary).
	Name string
	// Path is the absolute path of the binary.
	Path string
}

// runtimeCandidates lists where each known runtime is installed.
var runtimeCandidates = map[string][]string{
	"crun": {"/usr/bin/crun", "/usr/local/bin/crun"},
	"runc": {"/usr/sbin/runc", "/usr/bin/runc", "/usr/local/bin/runc"},
}

// FindRuntime resolves the runtime asked for on the kernel command line
// (boxlite.runtime=): "crun" (the default, also for ""), "runc", or an
// absolute path. Without crun, the default falls back to runc.
func FindRuntime(want string) (Runtime, error) {
	if filepath.IsAbs(want) {
		if _, err := os.Stat(want); err != nil {
			return Runtime{}, fmt.Errorf("runtime %s: %w", want, err)
		}
		return Runtime{Name: filepath.Base(want), Path: want}, nil
	}
	names := []string{want}
	if want == "" {
		names = []string{"crun", "runc"}
	}
	for _, name := range names {
		paths, ok := runtimeCandidates[name]
		if !ok {
			return Runtime{}, fmt.Errorf("unknown runtime %q (want crun, runc or an absolute path): %w", name, errdefs.ErrInvalidArgument)
		}
		for _, p := range paths {
			if _, err := os.Stat(p); err == nil {
				return Runtime{Name: name, Path: p}, nil
			}
		}
	}
	return Runtime{}, fmt.Errorf("no OCI runtime %v in the guest image: %w", names, errdefs.ErrNotFound)
}

// client returns a go-runc client of the runtime keeping its state under
// root and writing its JSON log to logFile (when not empty), where
// runtimeError finds the reason of a failure.
func (rt Runtime) client(root, logFile string) *runc.Runc {
	c := &runc.Runc{Command: rt.Path, Root: root}
	if logFile != "" {
		c.Log = logFile
		c.LogFormat = runc.JSON
	}
	return c
}

// maxRuntimeLog bounds how much of a runtime log is read into an error.
const maxRuntimeLog = 64 << 10

// runtimeError adds the runtime's own messages from its JSON log (errors
// first, else the last lines) to err, so a failure such as a missing
// executable reaches the host readable. Messages already in err are not
// repeated.
func runtimeError(op string, err error, logFile string) error {
	msgs := runtimeLogErrors(logFile)
	var extra []string
	for _, m := range msgs {
		if !strings.Contains(err.Error(), m) {
			extra = append(extra, m)
		}
	}
	if len(extra) == 0 {
		return fmt.Errorf("%s: %w", op, err)
	}
	return fmt.Errorf("%s: %s: %w", op, strings.Join(extra, ": "), err)
}

// runtimeLogErrors returns the error messages of a runtime's JSON log (one
// {"level","msg"} object per line), or its last lines when none is an error.
func runtimeLogErrors(logFile string) []string {
	if logFile == "" {
		return nil
	}
	data, err := readTail(logFile, maxRuntimeLog)
	if err != nil {
		return nil
	}
	var errs, all []string
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 4096), maxRuntimeLog)
	for sc.Scan() {
		line := bytes.TrimSpace(sc.Bytes())
		if len(line) == 0 {
			continue
		}
		var entry struct {
			Level string `json:"level"`
			Msg   string `json:"msg"`
		}
		msg := string(line)
		if json.Unmarshal(line, &entry) == nil && entry.Msg != "" {
			msg = entry.Msg
		}
		msg = strings.TrimSpace(msg)
		all = append(all, msg)
		if entry.Level == "error" || entry.Level == "fatal" {
			errs = append(errs, msg)
		}
	}
	if len(errs) > 0 {
		return dedupe(errs)
	}
	if len(all) > 3 {
		all = all[len(all)-3:]
	}
	return dedupe(all)
}

// readTail reads at most limit bytes from the end of a file.
func readTail(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	off := max(st.Size()-limit, 0)
	buf := make([]byte, st.Size()-off)
	n, err := f.ReadAt(buf, off)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	return buf[:n], nil
}

// dedupe removes repeated messages, keeping the first of each.
func dedupe(msgs []string) []string {
	seen := map[string]bool{}
	out := msgs[:0]
	for _, m := range msgs {
		if !seen[m] {
			seen[m] = true
			out = append(out, m)
		}
	}
	return out
}

// isNotExist reports whether a runtime error says the container is unknown.
func isNotExist(err error) bool {
	if err == nil {
		return false
	}
	s := err.Error()
	return strings.Contains(s, "does not exist") || strings.Contains(s, "not found") || strings.Contains(s, "No such file")
}
