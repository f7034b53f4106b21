package manager

import "github.com/boxlite/boxlite/internal/errclass"

// errorf formats an error of the errdefs class; %w in format wraps a cause.
// The message does not end in the class's name ("...: not found").
func errorf(class error, format string, args ...any) error {
	return errclass.Errorf(class, format, args...)
}
