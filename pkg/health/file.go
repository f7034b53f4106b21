package health

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// File is the file in a box's bundle where the shim keeps its current
// health, for readers that do not follow events (the manager after its
// run -d exited).
const File = "health.json"

// maxFile bounds what ReadFile reads.
const maxFile = 64 << 10

// WriteFile atomically replaces dir/File with st.
func WriteFile(dir string, st State) error {
	data, err := json.Marshal(st)
	if err != nil {
		return err
	}
	path := filepath.Join(dir, File)
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// ReadFile reads dir/File. A missing file is an os.ErrNotExist error.
func ReadFile(dir string) (State, error) {
	var st State
	f, err := os.Open(filepath.Join(dir, File))
	if err != nil {
		return st, err
	}
	defer f.Close()
	// A file cut at maxFile fails to decode.
	dec := json.NewDecoder(io.LimitReader(f, maxFile))
	if err := dec.Decode(&st); err != nil {
		return st, fmt.Errorf("%s: %w", filepath.Join(dir, File), err)
	}
	switch st.Status {
	case Starting, Healthy, Unhealthy, Disabled:
		return st, nil
	}
	return State{}, fmt.Errorf("%s: unknown status %q", filepath.Join(dir, File), st.Status)
}
