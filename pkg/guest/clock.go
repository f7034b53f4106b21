package guest

import (
	"time"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"
)

// clockSlack is how far the guest clock may be from the host's before
// syncClock steps it.
const clockSlack = 20 * time.Millisecond

// syncClock steps the guest's wall clock to host when they differ by more
// than clockSlack. Monotonic clocks are not affected.
func syncClock(host time.Time) {
	d := time.Since(host)
	if d < clockSlack && d > -clockSlack {
		return
	}
	ts := unix.NsecToTimespec(host.UnixNano())
	if err := unix.ClockSettime(unix.CLOCK_REALTIME, &ts); err != nil {
		log.L.WithError(err).Warn("cannot set the guest clock")
		return
	}
	log.L.WithField("offset", d).Debug("guest clock stepped to the host's")
}
