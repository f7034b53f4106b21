package manager

import (
	"errors"
	"fmt"
)

// classified is an error with a message for people and an errdefs class
// for code: errors.Is matches the class (and any %w cause), while the
// message does not end in the class's name ("...: not found").
type classified struct {
	msg   string
	class error
	cause error
}

func (e *classified) Error() string { return e.msg }

// Unwrap returns the class and the cause, if any: never a nil error.
func (e *classified) Unwrap() []error {
	if e.cause == nil {
		return []error{e.class}
	}
	return []error{e.class, e.cause}
}

// errorf formats an error of the errdefs class; %w in format wraps a cause.
func errorf(class error, format string, args ...any) error {
	err := fmt.Errorf(format, args...)
	return &classified{msg: err.Error(), class: class, cause: errors.Unwrap(err)}
}
