// Package client is a small typed client of boxlite's REST API v1
// (docs/api.yaml). A *Client implements api.Boxes, so a program drives a
// daemon exactly as the boxlite CLI does with --url.
package client

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/boxlite/boxlite/pkg/api"
)

// DefaultURL is the daemon's default address.
const DefaultURL = "unix:///run/boxlite/boxlite.sock"

// Options configure a Client.
type Options struct {
	// Token is the bearer token a TCP listener requires.
	Token string
	// TLS configures https:// URLs (nil: the system's roots).
	TLS *tls.Config
}

// Client talks to one daemon.
type Client struct {
	// base is the URL requests are made against (http://boxlite for a
	// unix socket).
	base  string
	token string
	hc    *http.Client
	// dial opens a raw connection to the daemon, for upgraded streams.
	dial func(ctx context.Context) (net.Conn, error)
}

var _ api.Boxes = (*Client)(nil)

// New returns a client of the daemon at rawURL: unix:///path/to.sock,
// tcp://host:port or http://host:port (plain HTTP), or https://host:port.
func New(rawURL string, o Options) (*Client, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return nil, fmt.Errorf("daemon URL %q: %w", rawURL, err)
	}
	c := &Client{token: o.Token}
	var d net.Dialer
	switch u.Scheme {
	case "unix":
		path := u.Path
		if path == "" {
			return nil, fmt.Errorf("daemon URL %q: want unix:///path/to/boxlite.sock", rawURL)
		}
		c.base = "http://boxlite"
		c.dial = func(ctx context.Context) (net.Conn, error) { return d.DialContext(ctx, "unix", path) }
	case "tcp", "http":
		if u.Host == "" {
			return nil, fmt.Errorf("daemon URL %q: want tcp://HOST:PORT", rawURL)
		}
		host := u.Host
		c.base = "http://" + host
		c.dial = func(ctx context.Context) (net.Conn, error) { return d.DialContext(ctx, "tcp", host) }
	case "https":
		host := u.Host
		cfg := o.TLS
		if cfg == nil {
			cfg = &tls.Config{}
		}
		c.base = "https://" + host
		c.dial = func(ctx context.Context) (net.Conn, error) {
			td := tls.Dialer{Config: cfg}
			return td.DialContext(ctx, "tcp", host)
		}
	default:
		return nil, fmt.Errorf("daemon URL %q: want unix://, tcp://, http:// or https://", rawURL)
	}
	c.hc = &http.Client{Transport: &http.Transport{
		DialContext:       func(ctx context.Context, _, _ string) (net.Conn, error) { return c.dial(ctx) },
		DialTLSContext:    func(ctx context.Context, _, _ string) (net.Conn, error) { return c.dial(ctx) },
		MaxIdleConns:      8,
		IdleConnTimeout:   30 * time.Second,
		ForceAttemptHTTP2: false,
	}}
	return c, nil
}

// Close releases idle connections.
func (c *Client) Close() error {
	c.hc.CloseIdleConnections()
	return nil
}

// do sends a request with an optional JSON body and decodes a JSON answer
// into out (if non-nil). An error answer is an *api.Error.
func (c *Client) do(ctx context.Context, method, path string, query url.Values, body, out any) error {
	resp, err := c.send(ctx, method, path, query, body, nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if out == nil {
		io.Copy(io.Discard, resp.Body)
		return nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("%s %s: decoding the answer: %w", method, path, err)
	}
	return nil
}

// send sends a request and returns a successful response (the caller closes
// its body); an error status becomes the body's *api.Error.
func (c *Client) send(ctx context.Context, method, path string, query url.Values, body any, hdr http.Header) (*http.Response, error) {
	var rd io.Reader
	contentType := "application/json"
	if raw, ok := body.(rawBody); ok {
		rd, contentType = raw.r, raw.contentType
	} else if body != nil {
		data, err := json.Marshal(body)
		if err != nil {
			return nil, err
		}
		rd = bytes.NewReader(data)
	}
	u := c.base + path
	if len(query) > 0 {
		u += "?" + query.Encode()
	}
	req, err := http.NewRequestWithContext(ctx, method, u, rd)
	if err != nil {
		return nil, err
	}
	for k, v := range hdr {
		req.Header[k] = v
	}
	if body != nil {
		req.Header.Set("Content-Type", contentType)
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("boxlite daemon: %w", err)
	}
	if resp.StatusCode >= 400 {
		defer resp.Body.Close()
		return nil, decodeError(resp)
	}
	return resp, nil
}

// decodeError reads an error answer.
func decodeError(resp *http.Response) error {
	data, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	var e api.Error
	if json.Unmarshal(data, &e) == nil && e.Code != "" {
		return &e
	}
	return &api.Error{Code: api.CodeInternal, Message: fmt.Sprintf("daemon answered %s: %s", resp.Status, strings.TrimSpace(string(data)))}
}

func boxPath(ref string, rest ...string) string {
	return "/v1/boxes/" + url.PathEscape(ref) + strings.Join(rest, "")
}

// Create makes a box and returns its id.
func (c *Client) Create(ctx context.Context, req api.CreateRequest) (string, error) {
	var resp api.CreateResponse
	if err := c.do(ctx, "POST", "/v1/boxes", nil, req, &resp); err != nil {
		return "", err
	}
	return resp.ID, nil
}

// Start starts a created box.
func (c *Client) Start(ctx context.Context, ref string) error {
	return c.do(ctx, "POST", boxPath(ref, "/start"), nil, nil, nil)
}

// Stop stops a box: signal, timeout, SIGKILL.
func (c *Client) Stop(ctx context.Context, ref string, req api.StopRequest) error {
	return c.do(ctx, "POST", boxPath(ref, "/stop"), nil, req, nil)
}

// Kill signals a box's process.
func (c *Client) Kill(ctx context.Context, ref string, req api.KillRequest) error {
	return c.do(ctx, "POST", boxPath(ref, "/kill"), nil, req, nil)
}

// Remove removes a box (a running one with force).
func (c *Client) Remove(ctx context.Context, ref string, force bool) error {
	q := url.Values{}
	if force {
		q.Set("force", "true")
	}
	return c.do(ctx, "DELETE", boxPath(ref), q, nil, nil)
}

// List lists the boxes that pass f.
func (c *Client) List(ctx context.Context, f api.ListFilter) ([]api.Box, error) {
	q := url.Values{}
	for _, s := range f.Status {
		q.Add("status", s)
	}
	for _, l := range f.Labels {
		q.Add("label", l)
	}
	var out []api.Box
	err := c.do(ctx, "GET", "/v1/boxes", q, nil, &out)
	return out, err
}

// Inspect returns a box's record.
func (c *Client) Inspect(ctx context.Context, ref string) (api.Box, error) {
	var b api.Box
	err := c.do(ctx, "GET", boxPath(ref), nil, nil, &b)
	return b, err
}

// Wait waits for a box's process to exit.
func (c *Client) Wait(ctx context.Context, ref string) (api.Exit, error) {
	var e api.Exit
	err := c.do(ctx, "POST", boxPath(ref, "/wait"), nil, nil, &e)
	return e, err
}

// Logs copies a box's output to stdout and stderr.
func (c *Client) Logs(ctx context.Context, ref string, o api.LogsOptions, stdout, stderr io.Writer) error {
	q := url.Values{}
	if o.Follow {
		q.Set("follow", "true")
	}
	if !o.Since.IsZero() {
		q.Set("since", o.Since.Format(time.RFC3339Nano))
	}
	resp, err := c.send(ctx, "GET", boxPath(ref, "/logs"), q, nil, nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	_, err = readFrames(bufio.NewReader(resp.Body), stdout, stderr, false)
	return err
}

// readFrames copies output frames to stdout and stderr until the stream
// ends; wantExit says an exit frame must end it (attach, exec).
func readFrames(r io.Reader, stdout, stderr io.Writer, wantExit bool) (api.Exit, error) {
	for {
		typ, payload, err := api.ReadFrame(r)
		if errors.Is(err, io.EOF) && !wantExit {
			return api.Exit{}, nil
		}
		if err != nil {
			return api.Exit{}, fmt.Errorf("reading the stream: %w", err)
		}
		switch typ {
		case api.FrameStdout, api.FrameStderr:
			w := stdout
			if typ == api.FrameStderr {
				w = stderr
			}
			if w != nil {
				w.Write(payload)
			}
		case api.FrameExit:
			var e api.Exit
			if err := json.Unmarshal(payload, &e); err != nil {
				return api.Exit{}, fmt.Errorf("bad exit frame: %w", err)
			}
			return e, nil
		case api.FrameError:
			var e api.Error
			if err := json.Unmarshal(payload, &e); err != nil || e.Code == "" {
				return api.Exit{}, fmt.Errorf("bad error frame: %q", payload)
			}
			return api.Exit{}, &e
		}
	}
}

// Attach relays a box's stdio until its process exits.
func (c *Client) Attach(ctx context.Context, ref string, stdio api.Stdio) (api.Exit, error) {
	return c.stream(ctx, boxPath(ref, "/attach"), nil, stdio)
}

// Exec runs a process in a running box and relays its stdio.
func (c *Client) Exec(ctx context.Context, ref string, req api.ExecRequest, stdio api.Stdio) (api.Exit, error) {
	req.Stdin = req.Stdin || stdio.Stdin != nil
	return c.stream(ctx, boxPath(ref, "/exec"), req, stdio)
}

// stream makes an upgraded request and speaks the stdio stream protocol on
// it until the exit frame.
func (c *Client) stream(ctx context.Context, path string, body any, stdio api.Stdio) (api.Exit, error) {
	hdr := http.Header{"Connection": {"Upgrade"}, "Upgrade": {api.UpgradeProtocol}}
	resp, err := c.send(ctx, "POST", path, nil, body, hdr)
	if err != nil {
		return api.Exit{}, err
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		resp.Body.Close()
		return api.Exit{}, fmt.Errorf("daemon answered %s instead of switching protocols", resp.Status)
	}
	conn, ok := resp.Body.(io.ReadWriteCloser)
	if !ok {
		resp.Body.Close()
		return api.Exit{}, errors.New("daemon's upgraded connection is not writable")
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	var mu sync.Mutex
	send := func(typ byte, p []byte) error {
		mu.Lock()
		defer mu.Unlock()
		return api.WriteFrame(conn, typ, p)
	}
	done := make(chan struct{})
	defer close(done)
	if stdio.Stdin != nil {
		go func() {
			buf := make([]byte, 32<<10)
			for {
				n, err := stdio.Stdin.Read(buf)
				if n > 0 && send(api.FrameStdin, buf[:n]) != nil {
					return
				}
				if err != nil {
					send(api.FrameStdinEOF, nil)
					return
				}
			}
		}()
	}
	go func() {
		for {
			select {
			case sz, ok := <-stdio.Resize:
				if !ok {
					stdio.Resize = nil
					continue
				}
				data, _ := json.Marshal(sz)
				send(api.FrameResize, data)
			case sig, ok := <-stdio.Signals:
				if !ok {
					stdio.Signals = nil
					continue
				}
				send(api.FrameSignal, []byte(strconv.Itoa(int(sig))))
			case <-done:
				return
			}
		}
	}()
	e, err := readFrames(conn, stdio.Stdout, stdio.Stderr, true)
	if err != nil && ctx.Err() != nil {
		return e, ctx.Err()
	}
	return e, err
}

// Events calls fn for each event until ctx ends or the daemon closes the
// stream.
func (c *Client) Events(ctx context.Context, fn func(api.Event)) error {
	resp, err := c.send(ctx, "GET", "/v1/events", nil, nil, http.Header{"Accept": {"text/event-stream"}})
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	event := ""
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "event: "):
			event = strings.TrimPrefix(line, "event: ")
		case strings.HasPrefix(line, "data: "):
			data := []byte(strings.TrimPrefix(line, "data: "))
			if event == "error" {
				var e api.Error
				if json.Unmarshal(data, &e) == nil && e.Code != "" {
					return &e
				}
				continue
			}
			var ev api.Event
			if err := json.Unmarshal(data, &ev); err != nil {
				return fmt.Errorf("bad event %q: %w", data, err)
			}
			fn(ev)
		case line == "":
			event = ""
		}
	}
	if ctx.Err() != nil {
		return nil
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("events stream: %w", err)
	}
	return errors.New("the daemon closed the events stream")
}

// PullImage pulls an image into the daemon's store.
func (c *Client) PullImage(ctx context.Context, ref string) (api.Image, error) {
	var img api.Image
	err := c.do(ctx, "POST", "/v1/images/pull", nil, api.PullRequest{Ref: ref}, &img)
	return img, err
}

// LoadImages uploads an OCI layout or docker-save tarball.
func (c *Client) LoadImages(ctx context.Context, r io.Reader) ([]api.Image, error) {
	resp, err := c.send(ctx, "POST", "/v1/images/load", nil, rawBody{r, "application/x-tar"}, nil)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var imgs []api.Image
	if err := json.NewDecoder(resp.Body).Decode(&imgs); err != nil {
		return nil, fmt.Errorf("POST /v1/images/load: decoding the answer: %w", err)
	}
	return imgs, nil
}

// ListImages lists the daemon's images.
func (c *Client) ListImages(ctx context.Context) ([]api.Image, error) {
	var imgs []api.Image
	err := c.do(ctx, "GET", "/v1/images", nil, nil, &imgs)
	return imgs, err
}

// RemoveImage removes an image.
func (c *Client) RemoveImage(ctx context.Context, ref string) error {
	return c.do(ctx, "DELETE", "/v1/images/"+url.PathEscape(ref), nil, nil, nil)
}

// rawBody is a request body sent as it is, not as JSON.
type rawBody struct {
	r           io.Reader
	contentType string
}
