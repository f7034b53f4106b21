// Command netperf is the box side of the network benchmarks: a static
// binary (CGO_ENABLED=0) copied into a busybox rootfs.
//
//	netperf send ADDR SECONDS   connect to ADDR and write for SECONDS
//	netperf recv PORT           accept one connection on PORT and read to EOF
//
// Each prints "<bytes> <seconds>" as measured on its side; recv first
// prints "listening" once it accepts connections.
package main

import (
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"time"
)

func main() {
	if len(os.Args) != 3 && len(os.Args) != 4 {
		fmt.Fprintln(os.Stderr, "usage: netperf send ADDR SECONDS | netperf recv PORT")
		os.Exit(2)
	}
	var n int64
	var d time.Duration
	var err error
	switch os.Args[1] {
	case "send":
		secs, _ := strconv.Atoi(os.Args[3])
		n, d, err = send(os.Args[2], time.Duration(secs)*time.Second)
	case "recv":
		n, d, err = recv(os.Args[2])
	default:
		err = fmt.Errorf("unknown mode %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "netperf:", err)
		os.Exit(1)
	}
	fmt.Printf("%d %.6f\n", n, d.Seconds())
}

func send(addr string, dur time.Duration) (int64, time.Duration, error) {
	var c net.Conn
	var err error
	// The other side may not listen yet.
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if c, err = net.Dial("tcp", addr); err == nil || time.Now().After(deadline) {
			break
		}
	}
	if err != nil {
		return 0, 0, err
	}
	defer c.Close()
	buf := make([]byte, 128<<10)
	var n int64
	began := time.Now()
	for time.Since(began) < dur {
		w, err := c.Write(buf)
		n += int64(w)
		if err != nil {
			return n, time.Since(began), err
		}
	}
	return n, time.Since(began), nil
}

func recv(port string) (int64, time.Duration, error) {
	l, err := net.Listen("tcp", ":"+port)
	if err != nil {
		return 0, 0, err
	}
	defer l.Close()
	fmt.Println("listening")
	c, err := l.Accept()
	if err != nil {
		return 0, 0, err
	}
	defer c.Close()
	began := time.Now()
	n, err := io.Copy(io.Discard, c)
	return n, time.Since(began), err
}
