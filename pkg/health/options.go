package health

import (
	"fmt"
	"strconv"
	"time"

	"github.com/containerd/errdefs"
)

// Defaults: a box is checked every 30 s, a probe may take 10 s, failures in
// the first 60 s do not count, and 3 failures in a row make it unhealthy.
const (
	DefaultInterval    = 30 * time.Second
	DefaultTimeout     = 10 * time.Second
	DefaultStartPeriod = 60 * time.Second
	DefaultRetries     = 3
)

// Annotations that tune or disable a box's health check. A value that is
// absent keeps the default; "disabled" is "true" or "false" (= the default,
// enabled).
const (
	AnnotationDisabled    = "io.boxlite.health.disabled"
	AnnotationInterval    = "io.boxlite.health.interval"
	AnnotationTimeout     = "io.boxlite.health.timeout"
	AnnotationStartPeriod = "io.boxlite.health.start_period"
	AnnotationRetries     = "io.boxlite.health.retries"
)

// Options configure one box's health check.
type Options struct {
	// Disabled turns the check off. Reaping and exit reporting do not
	// depend on it.
	Disabled bool
	// Interval is the time between the end of one probe and the next.
	Interval time.Duration
	// Timeout bounds one probe.
	Timeout time.Duration
	// StartPeriod is the time after the start during which failures do not
	// count towards Retries (a success still makes the box healthy).
	StartPeriod time.Duration
	// Retries is how many failures in a row make the box unhealthy.
	Retries int
}

// DefaultOptions returns the defaults: enabled, 30 s, 10 s, 60 s, 3.
func DefaultOptions() Options {
	return Options{Interval: DefaultInterval, Timeout: DefaultTimeout, StartPeriod: DefaultStartPeriod, Retries: DefaultRetries}
}

// Set applies one annotation's value to o. what names where the value came
// from in the error. Unknown keys are an error.
func (o *Options) Set(key, value, what string) error {
	bad := func(why string) error {
		return fmt.Errorf("%s=%q: %s: %w", what, value, why, errdefs.ErrInvalidArgument)
	}
	duration := func(min time.Duration) (time.Duration, error) {
		d, err := time.ParseDuration(value)
		if err != nil || d < min {
			return 0, bad(fmt.Sprintf("want a duration of at least %v, such as 30s", min))
		}
		return d, nil
	}
	var err error
	switch key {
	case AnnotationDisabled:
		b, perr := strconv.ParseBool(value)
		if perr != nil {
			return bad("want true or false")
		}
		o.Disabled = b
	case AnnotationInterval:
		o.Interval, err = duration(10 * time.Millisecond)
	case AnnotationTimeout:
		o.Timeout, err = duration(10 * time.Millisecond)
	case AnnotationStartPeriod:
		o.StartPeriod, err = duration(0)
	case AnnotationRetries:
		n, perr := strconv.Atoi(value)
		if perr != nil || n < 1 || n > 1000 {
			return bad("want 1 to 1000")
		}
		o.Retries = n
	default:
		return fmt.Errorf("%s: unknown health setting: %w", what, errdefs.ErrInvalidArgument)
	}
	return err
}
