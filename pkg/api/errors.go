package api

import (
	"errors"
	"net/http"

	"github.com/containerd/errdefs"
)

// Error codes of the API's error body. Each maps to one HTTP status and one
// errdefs class, so an error keeps its meaning across the wire.
const (
	CodeInvalidArgument = "invalid_argument" // 400
	CodeUnauthorized    = "unauthorized"     // 401
	CodeNotFound        = "not_found"        // 404
	CodeConflict        = "conflict"         // 409: wrong state, name in use
	CodeTooLarge        = "too_large"        // 413
	CodeUnavailable     = "unavailable"      // 503
	CodeInternal        = "internal"         // 500
)

// Error is the JSON body of every error answer: {"code", "message"}.
type Error struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

func (e *Error) Error() string { return e.Message }

// Is makes errors.Is(err, errdefs.ErrNotFound) and the like hold for an
// error that came over the wire, so callers handle both modes alike.
func (e *Error) Is(target error) bool {
	switch e.Code {
	case CodeInvalidArgument, CodeTooLarge:
		return target == errdefs.ErrInvalidArgument
	case CodeUnauthorized:
		return target == errdefs.ErrUnauthenticated
	case CodeNotFound:
		return target == errdefs.ErrNotFound
	case CodeConflict:
		return target == errdefs.ErrFailedPrecondition || target == errdefs.ErrAlreadyExists
	case CodeUnavailable:
		return target == errdefs.ErrUnavailable
	}
	return false
}

// Status is the HTTP status of the error's code.
func (e *Error) Status() int {
	switch e.Code {
	case CodeInvalidArgument:
		return http.StatusBadRequest
	case CodeUnauthorized:
		return http.StatusUnauthorized
	case CodeNotFound:
		return http.StatusNotFound
	case CodeConflict:
		return http.StatusConflict
	case CodeTooLarge:
		return http.StatusRequestEntityTooLarge
	case CodeUnavailable:
		return http.StatusServiceUnavailable
	}
	return http.StatusInternalServerError
}

// ErrorOf classifies err for the wire: its errdefs class picks the code,
// its message is kept.
func ErrorOf(err error) *Error {
	var e *Error
	if errors.As(err, &e) {
		return e
	}
	code := CodeInternal
	switch {
	case errdefs.IsInvalidArgument(err):
		code = CodeInvalidArgument
	case errdefs.IsNotFound(err):
		code = CodeNotFound
	case errdefs.IsFailedPrecondition(err), errdefs.IsAlreadyExists(err), errdefs.IsConflict(err):
		code = CodeConflict
	case errdefs.IsUnauthorized(err), errdefs.IsPermissionDenied(err):
		code = CodeUnauthorized
	case errdefs.IsUnavailable(err):
		code = CodeUnavailable
	}
	return &Error{Code: code, Message: err.Error()}
}
