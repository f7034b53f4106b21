package image

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/pkg/archive"
	"github.com/containerd/containerd/v2/pkg/archive/compression"
	"github.com/containerd/errdefs"
	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	"github.com/boxlite/boxlite/internal/errclass"
)

// tmpPrefix starts the name of a layer being unpacked, in layers/.
const tmpPrefix = ".tmp-"

// unpack makes layers/<chainID> hold the layer blob's files, unless it does
// already. The layer is unpacked into a temporary directory beside it and
// renamed into place without replacing anything, so a layer directory is
// complete or absent, and of two concurrent unpackers of one layer the
// second simply drops its copy. Whiteouts become overlay whiteouts (a 0/0
// character device, the trusted.overlay.opaque xattr): the directory is an
// overlay lower, applied onto nothing. The uncompressed stream must match
// diffID.
func (s *Store) unpack(ctx context.Context, chainID, diffID digest.Digest, blob ocispec.Descriptor) error {
	final := s.layerDir(chainID)
	if _, err := os.Lstat(final); err == nil {
		return nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	tmp, err := os.MkdirTemp(s.layersDir(), tmpPrefix+chainID.Encoded()+"-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp) // a no-op once renamed
	// The layer's root is the merged root's lower; a tarball's "./" entry
	// is not applied to it.
	if err := os.Chmod(tmp, 0o755); err != nil {
		return err
	}
	if err := s.apply(ctx, tmp, diffID, blob); err != nil {
		return fmt.Errorf("unpack layer %s: %w", blob.Digest, err)
	}
	err = unix.Renameat2(unix.AT_FDCWD, tmp, unix.AT_FDCWD, final, unix.RENAME_NOREPLACE)
	if errors.Is(err, unix.EEXIST) {
		return nil // another unpacker won; its copy is the same
	}
	if err != nil {
		return fmt.Errorf("unpack layer %s: %w", blob.Digest, os.NewSyscallError("renameat2", err))
	}
	return nil
}

// apply unpacks blob into dir and checks the uncompressed digest.
func (s *Store) apply(ctx context.Context, dir string, diffID digest.Digest, blob ocispec.Descriptor) error {
	ra, err := s.content.ReaderAt(ctx, blob)
	if err != nil {
		return err
	}
	defer ra.Close()
	rc, err := decompress(content.NewReader(ra))
	if err != nil {
		return err
	}
	defer rc.Close()
	digester := diffID.Algorithm().Digester()
	tee := io.TeeReader(rc, digester.Hash())
	if _, err := archive.Apply(ctx, dir, tee, archive.WithConvertWhiteout(archive.OverlayConvertWhiteout)); err != nil {
		return err
	}
	// The digest covers the whole stream, tar padding included.
	if _, err := io.Copy(io.Discard, tee); err != nil {
		return err
	}
	if got := digester.Digest(); got != diffID {
		return errclass.Errorf(errdefs.ErrDataLoss, "uncompressed digest %s, config says %s", got, diffID)
	}
	return nil
}

// decompress returns r uncompressed, detecting gzip and zstd as containerd
// does. Unlike containerd's compression.DecompressStream it never runs
// unpigz or igzip: that child would be waited for with exec.Cmd.Wait, which
// loses the exit to a process's reaper (pkg/reaper) and fails the unpack.
func decompress(r io.Reader) (io.ReadCloser, error) {
	br := bufio.NewReader(r)
	head, err := br.Peek(10)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	switch compression.DetectCompression(head) {
	case compression.Uncompressed:
		return io.NopCloser(br), nil
	case compression.Gzip:
		return gzip.NewReader(br)
	case compression.Zstd:
		zr, err := zstd.NewReader(br)
		if err != nil {
			return nil, err
		}
		return zr.IOReadCloser(), nil
	default:
		return nil, errclass.Errorf(errdefs.ErrNotImplemented, "unknown layer compression")
	}
}
