// Command boxlite-standin stands in for the programs of the CRI validation
// suite's (critest's) test images, which cannot be pulled offline: one
// static binary that acts by the name it is installed under (the base name
// of its executable, so a re-exec with another argv[0] keeps the role).
//
//	pause             waits for SIGTERM or SIGINT and reaps orphans, as the
//	                  Kubernetes pause container does; its process is named
//	                  pause, which specs grepping for other names rely on
//	nginx             answers HTTP on -listen ADDR (default :80), writes its
//	                  pid to /var/run/nginx.pid and runs as "nginx: master
//	                  process nginx ..." as nginx does (specs look for both)
//	httpd-foreground  answers HTTP on :80 and logs lines naming httpd
//	nonewprivs        prints "Effective uid: N" (installed setuid root)
//
// boxlite-mkimage -critest puts it into the images; it is never run on the
// host.
package main

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// masterTitle is how nginx's master process shows in /proc/PID/cmdline.
const masterTitle = "nginx: master process nginx"

func main() {
	exe, err := os.Executable()
	if err != nil {
		exe = os.Args[0]
	}
	var code int
	switch name := filepath.Base(exe); name {
	case "pause":
		code = pause()
	case "nginx":
		code = nginx(exe, os.Args)
	case "httpd-foreground":
		code = serve("httpd", ":80")
	case "nonewprivs":
		fmt.Printf("Effective uid: %d\n", os.Geteuid())
	default:
		fmt.Fprintf(os.Stderr, "boxlite-standin: unknown role %q: install as pause, nginx, httpd-foreground or nonewprivs\n", name)
		code = 2
	}
	os.Exit(code)
}

// stopSignals returns a channel receiving SIGTERM and SIGINT. As PID 1 of a
// PID namespace a process only gets the signals it handles, so every role
// that waits handles these.
func stopSignals(extra ...os.Signal) chan os.Signal {
	ch := make(chan os.Signal, 8)
	signal.Notify(ch, append([]os.Signal{syscall.SIGTERM, syscall.SIGINT}, extra...)...)
	return ch
}

// pause waits for a stop signal, reaping every child (orphans of a shared
// PID namespace are reparented to it) on SIGCHLD.
func pause() int {
	sigs := stopSignals(syscall.SIGCHLD)
	for s := range sigs {
		if s == syscall.SIGCHLD {
			reapChildren()
			continue
		}
		fmt.Fprintf(os.Stderr, "Shutting down, got signal: %v\n", s)
		return 0
	}
	return 0
}

// reapChildren waits for every child that has exited.
func reapChildren() {
	for {
		var ws syscall.WaitStatus
		pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil)
		if pid <= 0 || err != nil {
			return
		}
	}
}

// nginx re-executes itself once under nginx's master-process title, then
// writes its pid file and serves.
func nginx(exe string, args []string) int {
	if !strings.HasPrefix(args[0], masterTitle) {
		// The executable's own path keeps the process name (comm) nginx.
		err := syscall.Exec(exe, append([]string{masterTitle}, args[1:]...), os.Environ())
		fmt.Fprintf(os.Stderr, "nginx: re-exec %s: %v\n", exe, err)
		return 1
	}
	addr := ":80"
	for i := 1; i+1 < len(args); i++ {
		if args[i] == "-listen" {
			addr = args[i+1]
		}
	}
	if err := os.MkdirAll("/var/run", 0o755); err == nil {
		err = os.WriteFile("/var/run/nginx.pid", []byte(strconv.Itoa(os.Getpid())+"\n"), 0o644)
		if err != nil {
			fmt.Fprintf(os.Stderr, "nginx: write pid file: %v\n", err)
		}
	}
	return serve("nginx", addr)
}

// serve answers every HTTP request on addr with 200 and a short page, and
// logs each request, until a stop signal.
func serve(name, addr string) int {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: listen on %s: %v\n", name, addr, err)
		return 1
	}
	fmt.Fprintf(os.Stderr, "%s: boxlite stand-in listening on %s\n", name, addr)
	go func() {
		for {
			conn, err := l.Accept()
			if err != nil {
				return
			}
			go answer(name, conn)
		}
	}()
	s := <-stopSignals()
	fmt.Fprintf(os.Stderr, "%s: got %v, exiting\n", name, s)
	return 0
}

// answer reads one request's head and answers it, then closes the
// connection.
func answer(name string, conn net.Conn) {
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	r := bufio.NewReader(conn)
	line, err := r.ReadString('\n')
	if err != nil {
		return
	}
	for {
		h, err := r.ReadString('\n')
		if err != nil {
			return
		}
		if strings.TrimSpace(h) == "" {
			break
		}
	}
	body := fmt.Sprintf("<html><body><h1>%s</h1><p>boxlite stand-in</p></body></html>\n", name)
	head := "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nConnection: close\r\n" +
		"Content-Length: " + strconv.Itoa(len(body)) + "\r\n\r\n"
	if strings.HasPrefix(line, "HEAD ") {
		body = ""
	}
	io.WriteString(conn, head+body)
	fmt.Printf("%s: %s %q 200\n", name, conn.RemoteAddr(), strings.TrimSpace(line))
}
