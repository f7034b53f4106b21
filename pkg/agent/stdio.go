package agent

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/containerd/errdefs"

	"github.com/boxlite/boxlite/pkg/agent/api"
)

// CopyOutput copies a process's stdout or stderr from the guest to w until the
// stream ends or ctx is done. Reads are by offset: a long poll that times out
// is retried at the same offset, so nothing is lost or duplicated. w's
// slowness is the guest's backpressure: the guest buffers a bounded amount and
// then stops reading the process's pipe.
func (c *Client) CopyOutput(ctx context.Context, id, execID string, stream api.StdioStream, w io.Writer) (int64, error) {
	var off uint64
	for {
		pctx, cancel := pollContext(ctx, pollWait)
		resp, err := c.ReadStdio(pctx, &api.ReadStdioRequest{
			Id: id, ExecId: execID, Stream: stream,
			Offset: off, Max: ChunkSize, WaitMs: uint32(pollWait.Milliseconds()),
		})
		cancel()
		if err != nil {
			if ctx.Err() == nil && c.Err() == nil && errors.Is(err, context.DeadlineExceeded) {
				continue // the poll's own deadline: ask again at the same offset
			}
			return int64(off), c.classify(err)
		}
		if len(resp.Data) > ChunkSize {
			return int64(off), c.fail(fmt.Errorf("%w: ReadStdio returned %d bytes, asked for at most %d", ErrProtocol, len(resp.Data), ChunkSize))
		}
		if len(resp.Data) > 0 {
			if _, err := w.Write(resp.Data); err != nil {
				return int64(off), fmt.Errorf("write %s output: %w", stream, err)
			}
			off += uint64(len(resp.Data))
		}
		if resp.Eof {
			// Acknowledge everything so the guest can free its buffer.
			return int64(off), nil
		}
	}
}

// CopyInput copies r to the process's stdin in the guest, then closes it.
// Writes are by offset, so a retried call after a timeout is not duplicated.
func (c *Client) CopyInput(ctx context.Context, id, execID string, r io.Reader) (int64, error) {
	buf := make([]byte, 64<<10)
	var off uint64
	for {
		n, rerr := r.Read(buf)
		for written := 0; written < n; {
			resp, err := c.WriteStdin(ctx, &api.WriteStdinRequest{
				Id: id, ExecId: execID, Offset: off, Data: buf[written:n],
			})
			if err != nil {
				if ctx.Err() == nil && c.Err() == nil && errors.Is(err, context.DeadlineExceeded) {
					continue
				}
				return int64(off), c.classify(err)
			}
			if resp.Written == off {
				// No progress: the guest has nowhere to write (stdin was
				// closed or the process went away). Not a protocol error.
				return int64(off), fmt.Errorf("stdin of %s/%s: guest accepted no bytes at offset %d: %w", id, execID, off, errdefs.ErrFailedPrecondition)
			}
			if resp.Written < off || resp.Written > off+uint64(n-written) {
				return int64(off), c.fail(fmt.Errorf("%w: WriteStdin moved offset from %d to %d", ErrProtocol, off, resp.Written))
			}
			written += int(resp.Written - off)
			off = resp.Written
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			return int64(off), fmt.Errorf("read stdin: %w", rerr)
		}
	}
	if _, err := c.CloseStdin(ctx, &api.CloseStdinRequest{Id: id, ExecId: execID}); err != nil && !errdefs.IsNotFound(c.classify(err)) {
		return int64(off), c.classify(err)
	}
	return int64(off), nil
}

// Wait blocks until the process exits or ctx is done, long-polling the guest.
func (c *Client) Wait(ctx context.Context, id, execID string) (*api.WaitProcessResponse, error) {
	for {
		pctx, cancel := pollContext(ctx, pollWait)
		resp, err := c.WaitProcess(pctx, &api.WaitProcessRequest{Id: id, ExecId: execID, WaitMs: uint32(pollWait.Milliseconds())})
		cancel()
		if err != nil {
			if ctx.Err() == nil && c.Err() == nil && errors.Is(err, context.DeadlineExceeded) {
				continue
			}
			return nil, c.classify(err)
		}
		if resp.Exited {
			return resp, nil
		}
		if err := ctx.Err(); err != nil {
			return nil, err
		}
	}
}
