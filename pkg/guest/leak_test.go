package guest

import (
	"testing"

	"github.com/boxlite/boxlite/internal/leakcheck"
)

// checkLeaks fails the test if it leaves goroutines or file descriptors
// behind: every stream, pipe and connection it opened must be closed.
func checkLeaks(t *testing.T) {
	t.Helper()
	leakcheck.Goroutines(t)
	leakcheck.FDs(t)
}
