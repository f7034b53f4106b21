package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/log"

	"github.com/boxlite/boxlite/pkg/api"
	"github.com/boxlite/boxlite/pkg/manager"
	"github.com/boxlite/boxlite/pkg/server"
)

// DefaultListen is where boxlite serve listens unless told otherwise.
const DefaultListen = "unix:///run/boxlite/boxlite.sock"

// Bounds of the daemon's shutdown.
const (
	shutdownTimeout = 15 * time.Second
	stopBoxTimeout  = 10 * time.Second
)

// serveOptions are boxlite serve's flags.
type serveOptions struct {
	listen           multiFlag
	group, tokenFile string
	tlsCert, tlsKey  string
	stopBoxesOnExit  bool
	state            *string
}

// runServe runs the daemon: the REST API over the state directory's boxes,
// until SIGINT or SIGTERM. It is the child subreaper of the shims it
// starts and reaps them the moment they die.
func runServe(ctx context.Context, env *cliEnv, args []string) error {
	var o serveOptions
	fs := newFlagSet(env, "serve", "serve [--state DIR] [--listen unix://PATH | tcp://HOST:PORT ...] [--group G] [--token-file F] [--tls-cert F --tls-key F] [--stop-boxes-on-exit]")
	fs.Var(&o.listen, "listen", "address to serve: unix://PATH (default "+DefaultListen+") or tcp://HOST:PORT (needs --token-file; off loopback also --tls-cert/--tls-key) (repeatable)")
	fs.StringVar(&o.group, "group", "", "group (name or gid) that owns the unix socket (mode 0660)")
	fs.StringVar(&o.tokenFile, "token-file", "", "file holding the bearer token every TCP request must carry")
	fs.StringVar(&o.tlsCert, "tls-cert", "", "TLS certificate (PEM) for TCP listeners")
	fs.StringVar(&o.tlsKey, "tls-key", "", "TLS key (PEM) for TCP listeners")
	fs.BoolVar(&o.stopBoxesOnExit, "stop-boxes-on-exit", false, "stop every running box when the daemon exits (default: they keep running)")
	o.state = stateFlag(env, fs)
	if err := parseFlags(env, fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usageErrorf("serve", "unexpected argument %q", fs.Arg(0))
	}
	if len(o.listen) == 0 {
		o.listen = multiFlag{DefaultListen}
	}
	if (o.tlsCert == "") != (o.tlsKey == "") {
		return usageErrorf("serve", "--tls-cert and --tls-key go together")
	}
	// Check every address before anything starts.
	var addrs []*url.URL
	for _, l := range o.listen {
		u, err := parseListen(l, o)
		if err != nil {
			return usageErrorf("serve", "--listen %s: %v", l, err)
		}
		addrs = append(addrs, u)
	}
	svc, err := manager.NewService(manager.ServiceConfig{Config: manager.Config{StateRoot: *o.state}, Daemon: true})
	if err != nil {
		return err
	}
	srv := server.New(svc)
	var listeners []server.Listener
	closeAll := func() {
		for _, l := range listeners {
			l.Close()
		}
	}
	for _, u := range addrs {
		l, err := listen(u, o)
		if err != nil {
			closeAll()
			svc.Close()
			return err
		}
		listeners = append(listeners, l)
		log.L.WithField("address", u.String()).Info("boxlite serve: listening")
	}
	errc := make(chan error, len(listeners))
	for _, l := range listeners {
		go func() { errc <- srv.Serve(l) }()
	}
	var serveErr error
	select {
	case <-ctx.Done():
		log.L.Info("boxlite serve: shutting down")
	case serveErr = <-errc:
	}
	sctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		log.L.WithError(err).Warn("shutdown")
	}
	closeAll()
	if o.stopBoxesOnExit {
		stopAll(svc)
	}
	for _, u := range addrs {
		if u.Scheme == "unix" {
			os.Remove(u.Path)
		}
	}
	return errors.Join(serveErr, svc.Close())
}

// stopAll stops every running box, in parallel.
func stopAll(svc *manager.Service) {
	ctx := context.Background()
	boxes, _ := svc.List(ctx, api.ListFilter{Status: []string{"created", "running", "paused", "unknown"}})
	var wg sync.WaitGroup
	for _, b := range boxes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := svc.Stop(ctx, b.ID, api.StopRequest{Timeout: stopBoxTimeout.String()}); err != nil {
				log.L.WithError(err).WithField("id", b.ID).Warn("stopping box")
			}
		}()
	}
	wg.Wait()
}

// parseListen checks one --listen address: unix://PATH, or tcp://HOST:PORT
// with a token file, and TLS unless HOST is a loopback address.
func parseListen(s string, o serveOptions) (*url.URL, error) {
	u, err := url.Parse(s)
	if err != nil {
		return nil, err
	}
	switch u.Scheme {
	case "unix":
		if u.Path == "" || u.Host != "" {
			return nil, errors.New("want unix:///absolute/path.sock")
		}
		return u, nil
	case "tcp":
		host, port, err := net.SplitHostPort(u.Host)
		if err != nil || port == "" {
			return nil, errors.New("want tcp://HOST:PORT")
		}
		if o.tokenFile == "" {
			return nil, errors.New("a TCP listener needs --token-file: every request must carry its bearer token")
		}
		if !isLoopback(host) && o.tlsCert == "" {
			return nil, fmt.Errorf("%s is not a loopback address: serving it needs --tls-cert and --tls-key", host)
		}
		return u, nil
	}
	return nil, errors.New("want unix://PATH or tcp://HOST:PORT")
}

// isLoopback says host is localhost or a loopback IP.
func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// listen opens one checked address.
func listen(u *url.URL, o serveOptions) (server.Listener, error) {
	if u.Scheme == "unix" {
		l, err := listenUnix(u.Path, o.group)
		return server.Listener{Listener: l}, err
	}
	token, err := readToken(o.tokenFile)
	if err != nil {
		return server.Listener{}, err
	}
	l, err := net.Listen("tcp", u.Host)
	if err != nil {
		return server.Listener{}, err
	}
	if o.tlsCert != "" {
		cert, err := tls.LoadX509KeyPair(o.tlsCert, o.tlsKey)
		if err != nil {
			l.Close()
			return server.Listener{}, fmt.Errorf("TLS: %w", err)
		}
		l = tls.NewListener(l, &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12})
	}
	return server.Listener{Listener: l, Token: token}, nil
}

// listenUnix listens on a unix socket of mode 0660, owned by group if
// given. A socket nobody listens on is a dead daemon's and is replaced;
// one in use is an error.
func listenUnix(path, group string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, err
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("%s: another daemon is serving it", path)
	} else if errors.Is(err, syscall.ECONNREFUSED) {
		os.Remove(path)
	}
	gid := -1
	if group != "" {
		g, err := user.LookupGroup(group)
		if err != nil {
			g, err = user.LookupGroupId(group)
		}
		if err != nil {
			return nil, fmt.Errorf("--group %s: %w", group, err)
		}
		gid, _ = strconv.Atoi(g.Gid)
	}
	// The socket is made 0660 before anyone can connect: umask 0117.
	old := syscall.Umask(0o117)
	l, err := net.Listen("unix", path)
	syscall.Umask(old)
	if err != nil {
		return nil, err
	}
	if err := os.Chmod(path, 0o660); err != nil {
		l.Close()
		return nil, err
	}
	if gid >= 0 {
		if err := os.Chown(path, -1, gid); err != nil {
			l.Close()
			return nil, err
		}
	}
	return l, nil
}
