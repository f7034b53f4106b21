// Package errclass makes errors that carry an errdefs class for code and a
// clean message for people: errors.Is matches the class (and any wrapped
// cause), while the message does not end in the class's name ("...: not
// found"), and errgrpc can carry the class across ttrpc.
package errclass

import (
	"errors"
	"fmt"
)

// classified is an error with a class.
type classified struct {
	// msg is the whole message.
	msg string
	// class is the errdefs class (or a ctx error).
	class error
	// cause is the wrapped error, or nil.
	cause error
}

func (e *classified) Error() string { return e.msg }

// Unwrap returns the class and the cause, if any: never a nil error, which
// errgrpc.ToGRPC, walking the tree, would dereference.
func (e *classified) Unwrap() []error {
	if e.cause == nil {
		return []error{e.class}
	}
	return []error{e.class, e.cause}
}

// Errorf formats an error of class; a %w in format wraps a cause.
func Errorf(class error, format string, args ...any) error {
	err := fmt.Errorf(format, args...)
	return &classified{msg: err.Error(), class: class, cause: errors.Unwrap(err)}
}

// Wrap gives err the class without changing its message.
func Wrap(class, err error) error {
	return &classified{msg: err.Error(), class: class, cause: err}
}
