package manager

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
)

func newTestStore(t *testing.T) *Store {
	t.Helper()
	s, err := OpenStore(filepath.Join(shortDir(t), "st"))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func addRecord(t *testing.T, s *Store, id, name string) *Record {
	t.Helper()
	rec := &Record{ID: id, Name: name, Bundle: s.BundleDir(id), Status: StatusCreated, CreatedAt: time.Now()}
	if err := s.Add(rec); err != nil {
		t.Fatalf("add %s: %v", id, err)
	}
	return rec
}

func TestStoreFindsABoxByIDNameOrUniquePrefix(t *testing.T) {
	s := newTestStore(t)
	addRecord(t, s, "abc123", "web")
	addRecord(t, s, "abd456", "")
	tests := []struct {
		ref, wantID, wantErr string
	}{
		{ref: "abc123", wantID: "abc123"},
		{ref: "web", wantID: "abc123"},
		{ref: "abd", wantID: "abd456"},
		{ref: "ab", wantErr: `box reference "ab" is ambiguous (2 boxes)`},
		{ref: "nosuch", wantErr: "no such box: nosuch"},
		{ref: "../etc", wantErr: "no such box: ../etc"},
	}
	for _, tt := range tests {
		t.Run(tt.ref, func(t *testing.T) {
			rec, err := s.Get(tt.ref)
			if tt.wantErr != "" {
				if err == nil || err.Error() != tt.wantErr {
					t.Fatalf("Get(%q) = %v, want error %q", tt.ref, err, tt.wantErr)
				}
				return
			}
			if err != nil || rec.ID != tt.wantID {
				t.Fatalf("Get(%q) = %v, %v; want %s", tt.ref, rec, err, tt.wantID)
			}
		})
	}
	if _, err := s.Get("nosuch"); !errdefs.IsNotFound(err) {
		t.Errorf("unknown box is not NotFound: %v", err)
	}
}

func TestStoreRejectsADuplicateName(t *testing.T) {
	s := newTestStore(t)
	addRecord(t, s, "abc123", "web")
	for _, name := range []string{"web", "abc123"} {
		err := s.Add(&Record{ID: NewID(), Name: name, CreatedAt: time.Now()})
		if !errdefs.IsAlreadyExists(err) || !strings.Contains(err.Error(), "already exists") {
			t.Errorf("second box named %q: %v", name, err)
		}
	}
	if err := s.Add(&Record{ID: "abc123"}); !errdefs.IsAlreadyExists(err) {
		t.Errorf("second box with the same id: %v", err)
	}
	if recs, _ := s.List(); len(recs) != 1 {
		t.Errorf("%d records after rejected adds, want 1", len(recs))
	}
}

func TestStoreUpdateIsAtomic(t *testing.T) {
	s := newTestStore(t)
	addRecord(t, s, "abc123", "")
	// A temporary file left by a crash mid-write is not a record.
	os.WriteFile(filepath.Join(s.BoxDir("abc123"), ".record-crash"), []byte("{"), 0o600)
	rec, err := s.Update("abc123", func(r *Record) error { r.Status, r.ExitStatus = StatusStopped, 3; return nil })
	if err != nil || rec.ExitStatus != 3 {
		t.Fatalf("update: %+v, %v", rec, err)
	}
	got, err := s.Get("abc123")
	if err != nil || got.Status != StatusStopped || got.ExitStatus != 3 {
		t.Fatalf("after update: %+v, %v", got, err)
	}
	// A failing update changes nothing.
	if _, err := s.Update("abc123", func(r *Record) error { r.ExitStatus = 9; return errors.New("no") }); err == nil {
		t.Fatal("failing update succeeded")
	}
	if got, _ := s.Get("abc123"); got.ExitStatus != 3 {
		t.Errorf("failed update changed the record: %d", got.ExitStatus)
	}
	entries, _ := os.ReadDir(s.BoxDir("abc123"))
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), ".record-") && e.Name() != ".record-crash" {
			t.Errorf("temporary file left: %s", e.Name())
		}
	}
	if _, err := s.Update("gone", func(*Record) error { return nil }); !errdefs.IsNotFound(err) {
		t.Errorf("update of a missing box: %v", err)
	}
}

func TestStoreReportsACorruptedRecordClearly(t *testing.T) {
	s := newTestStore(t)
	addRecord(t, s, "good", "")
	addRecord(t, s, "bad", "")
	path := filepath.Join(s.BoxDir("bad"), recordName)
	os.WriteFile(path, []byte(`{"id": "bad", "status": `), 0o600)
	_, err := s.Get("bad")
	if !errdefs.IsDataLoss(err) || !strings.Contains(err.Error(), path+" is corrupted") || strings.Contains(err.Error(), "\n") {
		t.Fatalf("Get of a corrupted record: %v", err)
	}
	recs, err := s.List()
	if len(recs) != 1 || recs[0].ID != "good" {
		t.Errorf("List kept %d records, want the good one", len(recs))
	}
	if err == nil || !strings.Contains(err.Error(), "corrupted") {
		t.Errorf("List did not report the corrupted record: %v", err)
	}
}

func TestStoreRemoveDeletesTheBoxDirectory(t *testing.T) {
	s := newTestStore(t)
	addRecord(t, s, "abc123", "")
	os.MkdirAll(s.BundleDir("abc123"), 0o700)
	if err := s.Remove("abc123"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(s.BoxDir("abc123")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("box directory left: %v", err)
	}
	if err := s.Remove("abc123"); err != nil {
		t.Errorf("second remove: %v", err)
	}
}

func TestOpenStoreRejectsAnUnusableDirectory(t *testing.T) {
	file := filepath.Join(shortDir(t), "f")
	os.WriteFile(file, nil, 0o644)
	tests := []struct {
		name, root, want string
	}{
		{"under a file", filepath.Join(file, "state"), "is not usable: not a directory"},
		{"read-only", "/proc/boxlite-state", "is not usable"},
		{"too long", "/tmp/" + strings.Repeat("x", 60), "too long for unix sockets"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := OpenStore(tt.root)
			if err == nil || !strings.Contains(err.Error(), tt.want) || strings.Contains(err.Error(), "\n") {
				t.Fatalf("OpenStore(%s) = %v, want one line with %q", tt.root, err, tt.want)
			}
		})
	}
}
