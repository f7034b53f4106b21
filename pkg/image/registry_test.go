package image

import (
	"testing"

	"github.com/boxlite/boxlite/internal/registrytest"
)

// push pushes img to reg as repo:tag and returns the name to pull it by
// (through reg's recording proxy).
func push(t *testing.T, reg *registrytest.Registry, img testImage, repoTag string) string {
	t.Helper()
	reg.Push(t, img.manifest, registrytest.Blobs(img.blobs), repoTag)
	return reg.Host() + "/" + repoTag
}
