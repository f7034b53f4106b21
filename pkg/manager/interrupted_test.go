package manager

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/boxlite/boxlite/pkg/reaper"
)

// A box whose Create has not returned is its creator's while the creator
// lives (it reads created, untouched), and is recovered once it died (no
// shim was recorded: stopped 137, the creator forgotten). Verified
// two-sided: with the creator ignored, the box of a live creator read
// stopped 137.
func TestABoxBeingCreatedIsItsCreatorsUntilItDies(t *testing.T) {
	me, err := reaper.ReadIdentity(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		creator reaper.Identity
		want    Status
		exit    uint32
		kept    bool
	}{
		{"creator alive", me, StatusCreated, 0, true},
		// This pid with another start time: a process that is gone.
		{"creator dead", reaper.Identity{Pid: me.Pid, StartTime: me.StartTime + 1}, StatusStopped, 137, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := newTestManager(t)
			rec := &Record{ID: NewID(), Status: StatusCreated, CreatedAt: time.Now(),
				CreatorPid: tt.creator.Pid, CreatorStartTime: tt.creator.StartTime}
			rec.Bundle = m.Store().BundleDir(rec.ID)
			if err := m.Store().Add(rec); err != nil {
				t.Fatal(err)
			}
			recs, err := m.List(context.Background())
			if err != nil || len(recs) != 1 {
				t.Fatalf("list: %+v, %v", recs, err)
			}
			r := recs[0]
			if r.Status != tt.want || r.ExitStatus != tt.exit || (r.CreatorPid != 0) != tt.kept {
				t.Errorf("box of a %s: %s %d, creator %d; want %s %d, creator kept %v",
					tt.name, r.Status, r.ExitStatus, r.CreatorPid, tt.want, tt.exit, tt.kept)
			}
		})
	}
}
