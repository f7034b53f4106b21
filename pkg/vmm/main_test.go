package vmm

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/boxlite/boxlite/pkg/reaper"
)

// fakeQEMUEnv makes the test binary act as QEMU (see fakeQEMU).
const fakeQEMUEnv = "BOXLITE_FAKE_QEMU"

func TestMain(m *testing.M) {
	if mode := os.Getenv(fakeQEMUEnv); mode != "" {
		os.Exit(fakeQEMU(mode))
	}
	os.Exit(m.Run())
}

// fakeQEMU stands in for QEMU: it prints to its console (stdout), serves
// QMP on the listening socket passed as fd 3, and exits 0 on SIGTERM (a
// guest that shut down). Modes:
//
//	ok          obeys quit
//	ignore-quit replies to quit but keeps running
//	greet-once  serves one QMP connection, then closes the socket
//	silent      accepts QMP connections and never greets
//	exit        complains on stderr and exits 1 at once
//	version     prints a version banner and exits 0
//	hang        never does anything else
func fakeQEMU(mode string) int {
	if mode == "version" {
		fmt.Println("QEMU emulator version 7.2.99 (fake)")
		fmt.Println("Copyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers")
		return 0
	}
	fmt.Println("fake qemu: booting")
	if mode == "hang" {
		select {}
	}
	if mode == "exit" {
		fmt.Fprintln(os.Stderr, "fake qemu: -fsdev: invalid option")
		return 1
	}
	term := make(chan os.Signal, 1)
	signal.Notify(term, syscall.SIGTERM)
	go func() {
		<-term
		fmt.Println("fake qemu: guest shut down")
		os.Exit(0)
	}()
	f := os.NewFile(3, "qmp")
	l, err := net.FileListener(f)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	for {
		conn, err := l.Accept()
		if err != nil {
			select {} // the socket is gone; keep "running"
		}
		if mode == "silent" {
			continue
		}
		if serveFakeQMP(conn, mode) {
			return 0
		}
		conn.Close()
		if mode == "greet-once" {
			l.Close()
			f.Close()
		}
	}
}

// serveFakeQMP answers every command with success and reports whether
// QEMU should exit (quit was obeyed).
func serveFakeQMP(conn net.Conn, mode string) bool {
	fmt.Fprintf(conn, "%s\r\n", qmpGreeting)
	r := bufio.NewReader(conn)
	for {
		line, err := r.ReadBytes('\n')
		if err != nil {
			return false
		}
		var req struct {
			Execute string `json:"execute"`
			ID      int    `json:"id"`
		}
		json.Unmarshal(line, &req)
		fmt.Fprintf(conn, `{"return": {}, "id": %d}`+"\r\n", req.ID)
		if req.Execute == "quit" && mode != "ignore-quit" {
			return true
		}
	}
}

// checkLeaks fails the test if it leaves goroutines, descriptors or child
// processes behind. Call it before anything the test starts.
func checkLeaks(t *testing.T) {
	t.Helper()
	reaper.Default() // its loop goroutine lives as long as the process
	goroutines, fds := runtime.NumGoroutine(), countFDs(t)
	t.Cleanup(func() {
		var problem string
		deadline := time.Now().Add(5 * time.Second)
		for time.Now().Before(deadline) {
			problem = ""
			if g := runtime.NumGoroutine(); g > goroutines {
				problem = fmt.Sprintf("%d goroutines, had %d", g, goroutines)
			} else if n := countFDs(t); n > fds {
				problem = fmt.Sprintf("%d open descriptors, had %d", n, fds)
			} else if kids := children(t); len(kids) > 0 {
				problem = fmt.Sprintf("child processes %v", kids)
			} else {
				return
			}
			runtime.Gosched()
			time.Sleep(10 * time.Millisecond) // polling with a deadline
		}
		buf := make([]byte, 1<<16)
		t.Errorf("leak: %s\n%s", problem, buf[:runtime.Stack(buf, true)])
	})
}

func countFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// children lists the pids whose parent is this process, zombies included.
func children(t *testing.T) []int {
	t.Helper()
	dirs, _ := filepath.Glob("/proc/[0-9]*/stat")
	var kids []int
	me := os.Getpid()
	for _, d := range dirs {
		b, err := os.ReadFile(d)
		if err != nil {
			continue
		}
		s := string(b)
		fields := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
		if len(fields) > 1 {
			if ppid, _ := strconv.Atoi(fields[1]); ppid == me {
				pid, _ := strconv.Atoi(filepath.Base(filepath.Dir(d)))
				kids = append(kids, pid)
			}
		}
	}
	return kids
}
