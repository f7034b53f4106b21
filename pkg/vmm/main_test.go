package vmm

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/signal"
	"syscall"
	"testing"

	"github.com/boxlite/boxlite/internal/leakcheck"
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
	leakcheck.Goroutines(t)
	leakcheck.FDs(t)
	leakcheck.Children(t)
}
