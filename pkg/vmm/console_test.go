package vmm

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func newTestConsole(t *testing.T, max int64) *console {
	t.Helper()
	c, err := newConsole(filepath.Join(t.TempDir(), ConsoleLogName), max)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.close)
	return c
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestConsoleLogRotatesWhenFull(t *testing.T) {
	c := newTestConsole(t, 10)
	for _, s := range []string{"0123456", "789abcdef", "ghijklmnopqrstuvwxyz"} {
		c.Write([]byte(s))
	}
	// 36 bytes in files of 10: the last 6 in the log, the 10 before in .1.
	if got := readFile(t, c.path); got != "uvwxyz" {
		t.Errorf("console.log = %q, want %q", got, "uvwxyz")
	}
	if got := readFile(t, c.path+".1"); got != "klmnopqrst" {
		t.Errorf("console.log.1 = %q, want %q", got, "klmnopqrst")
	}
}

func TestConsoleLogStaysBounded(t *testing.T) {
	const max = 4096
	c := newTestConsole(t, max)
	line := []byte(strings.Repeat("x", 99) + "\n")
	for range 1000 {
		c.Write(line)
	}
	for _, p := range []string{c.path, c.path + ".1"} {
		st, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if st.Size() > max {
			t.Errorf("%s is %d bytes, cap %d", p, st.Size(), max)
		}
	}
}

func TestConsoleTail(t *testing.T) {
	for _, tc := range []struct {
		name   string
		writes []string
		n      int
		want   []string
	}{
		{name: "empty", n: 3, want: nil},
		{name: "fewer lines than asked", writes: []string{"a\nb\n"}, n: 5, want: []string{"a", "b"}},
		{name: "last n", writes: []string{"a\nb\nc\nd\n"}, n: 2, want: []string{"c", "d"}},
		{name: "lines split across writes", writes: []string{"he", "llo\nwor", "ld\n"}, n: 5, want: []string{"hello", "world"}},
		{name: "carriage returns dropped", writes: []string{"one\r\ntwo\r\n"}, n: 5, want: []string{"one", "two"}},
		{name: "unterminated last line included", writes: []string{"a\nKernel panic"}, n: 5, want: []string{"a", "Kernel panic"}},
		{name: "zero lines", writes: []string{"a\n"}, n: 0, want: nil},
		{name: "negative", writes: []string{"a\n"}, n: -1, want: nil},
		{name: "empty lines kept", writes: []string{"a\n\nb\n"}, n: 5, want: []string{"a", "", "b"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newTestConsole(t, 1<<20)
			for _, w := range tc.writes {
				c.Write([]byte(w))
			}
			if got := c.Tail(tc.n); len(got)+len(tc.want) > 0 && !slices.Equal(got, tc.want) {
				t.Errorf("Tail(%d) = %q, want %q", tc.n, got, tc.want)
			}
		})
	}
}

func TestConsoleTailKeepsTheLastLinesAfterWrapping(t *testing.T) {
	c := newTestConsole(t, 1<<20)
	for i := range tailLines*2 + 7 {
		fmt.Fprintf(c, "line %d\n", i)
	}
	got := c.Tail(tailLines + 10)
	if len(got) != tailLines {
		t.Fatalf("Tail returned %d lines, want the ring's %d", len(got), tailLines)
	}
	if first, last := got[0], got[len(got)-1]; first != fmt.Sprintf("line %d", tailLines+7) || last != fmt.Sprintf("line %d", tailLines*2+6) {
		t.Errorf("Tail = %q ... %q", first, last)
	}
}

func TestConsoleTailCapsLongLines(t *testing.T) {
	c := newTestConsole(t, 1<<20)
	c.Write(bytes.Repeat([]byte("y"), tailLineMax*3))
	c.Write([]byte("\nshort\n"))
	got := c.Tail(2)
	if len(got) != 2 || len(got[0]) != tailLineMax || got[1] != "short" {
		t.Errorf("Tail = %d lines, first %d bytes; want a capped line and %q", len(got), len(got[0]), "short")
	}
}

func TestConsoleDrainEndsAtEOFAndClosesTheLog(t *testing.T) {
	c := newTestConsole(t, 1<<20)
	r, w := io.Pipe()
	done := make(chan struct{})
	go func() {
		c.drain(r)
		close(done)
	}()
	io.WriteString(w, "booting\nready\n")
	w.Close()
	<-done
	if got := readFile(t, c.path); got != "booting\nready\n" {
		t.Errorf("console.log = %q", got)
	}
	// Output after close still reaches the tail, not the closed file.
	c.Write([]byte("late\n"))
	if got := c.Tail(1); !slices.Equal(got, []string{"late"}) {
		t.Errorf("Tail after close = %q", got)
	}
}
