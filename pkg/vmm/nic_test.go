package vmm

import (
	"errors"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/boxlite/boxlite/pkg/netns"
)

// testMAC returns the locally administered unicast MAC 02:00:00:00:00:<last>.
func testMAC(last byte) net.HardwareAddr {
	return net.HardwareAddr{0x02, 0, 0, 0, 0, last}
}

// testTap returns an open file that stands in for a tap: validateNICs and
// the launch only need a descriptor. It is closed when the test ends.
func testTap(t *testing.T) *os.File {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	w.Close()
	t.Cleanup(func() { r.Close() })
	return r
}

func TestValidateNICs(t *testing.T) {
	tap := testTap(t)
	tapNIC := func(last byte) NIC { return NIC{MAC: testMAC(last), Tap: tap} }
	userNIC := func(fwds ...Forward) NIC {
		return NIC{MAC: testMAC(0x50), User: &UserNet{Forwards: fwds}}
	}
	tcp := func(host, guest int) Forward { return Forward{Proto: "tcp", HostPort: host, GuestPort: guest} }
	many := func(n int) []NIC {
		var nics []NIC
		for i := range n {
			nics = append(nics, tapNIC(byte(i+1)))
		}
		return nics
	}
	for _, tc := range []struct {
		name string
		nics []NIC
		// want is a substring of the error; "" means valid.
		want string
	}{
		{name: "no NICs", nics: nil},
		{name: "a tap", nics: []NIC{tapNIC(1)}},
		{name: "user networking without forwards", nics: []NIC{userNIC()}},
		{name: "user networking with forwards", nics: []NIC{userNIC(
			tcp(8080, 80),
			Forward{Proto: "udp", HostIP: net.IPv4(127, 0, 0, 1), HostPort: 5353, GuestPort: 53},
		)}},
		{name: "a tap and user networking", nics: []NIC{tapNIC(1), userNIC()}},
		{name: "as many NICs as fit", nics: many(maxNICs)},
		{name: "one NIC too many", nics: many(maxNICs + 1), want: "9 NICs: at most 8 fit a microvm"},
		{name: "no MAC", nics: []NIC{{Tap: tap}}, want: "nic 0: MAC \"\" is not a unicast Ethernet address"},
		{name: "short MAC", nics: []NIC{{MAC: testMAC(1)[:5], Tap: tap}}, want: "nic 0: MAC \"02:00:00:00:00\" is not a unicast"},
		{name: "EUI-64 MAC", nics: []NIC{{MAC: net.HardwareAddr{2, 0, 0, 0, 0, 0, 0, 1}, Tap: tap}}, want: "is not a unicast Ethernet address"},
		{name: "multicast MAC", nics: []NIC{tapNIC(1), {MAC: net.HardwareAddr{0x01, 0, 0x5e, 0, 0, 1}, Tap: tap}},
			want: "nic 1: MAC \"01:00:5e:00:00:01\" is not a unicast"},
		{name: "broadcast MAC", nics: []NIC{{MAC: net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, Tap: tap}},
			want: "is not a unicast Ethernet address"},
		{name: "a MAC used twice", nics: []NIC{tapNIC(1), tapNIC(2), tapNIC(1)}, want: "nic 2: MAC 02:00:00:00:00:01 is used twice"},
		{name: "neither tap nor user", nics: []NIC{{MAC: testMAC(1)}}, want: "nic 0: exactly one of a tap and user networking is required"},
		{name: "both tap and user", nics: []NIC{{MAC: testMAC(1), Tap: tap, User: &UserNet{}}},
			want: "nic 0: exactly one of a tap and user networking is required"},
		{name: "unknown protocol", nics: []NIC{userNIC(Forward{Proto: "sctp", HostPort: 1, GuestPort: 1})},
			want: "nic 0: port forward 1:1/sctp: protocol must be tcp or udp"},
		{name: "empty protocol", nics: []NIC{userNIC(Forward{HostPort: 1, GuestPort: 1})}, want: "protocol must be tcp or udp"},
		{name: "host port 0", nics: []NIC{userNIC(tcp(0, 80))}, want: "port forward 0:80/tcp: ports must be 1 to 65535"},
		{name: "host port 65536", nics: []NIC{userNIC(tcp(65536, 80))}, want: "port forward 65536:80/tcp: ports must be 1 to 65535"},
		{name: "guest port 0", nics: []NIC{userNIC(tcp(80, 0))}, want: "ports must be 1 to 65535"},
		{name: "negative guest port", nics: []NIC{userNIC(tcp(80, -1))}, want: "ports must be 1 to 65535"},
		{name: "guest port 65536", nics: []NIC{userNIC(tcp(80, 65536))}, want: "ports must be 1 to 65535"},
		{name: "port 65535 is fine", nics: []NIC{userNIC(tcp(65535, 65535))}},
		{name: "IPv6 host address", nics: []NIC{userNIC(Forward{Proto: "tcp", HostIP: net.ParseIP("::1"), HostPort: 80, GuestPort: 80})},
			want: "port forward ::1:80:80/tcp: user networking listens on IPv4 addresses only"},
		{name: "IPv4 host address in 16-byte form", nics: []NIC{userNIC(Forward{Proto: "tcp", HostIP: net.ParseIP("10.1.2.3"), HostPort: 80, GuestPort: 80})}},
		{name: "host port published twice", nics: []NIC{userNIC(tcp(8080, 80), tcp(9090, 90), tcp(8080, 81))},
			want: "nic 0: host port 8080/tcp is published twice"},
		{name: "host port published twice on different addresses", nics: []NIC{userNIC(
			Forward{Proto: "tcp", HostIP: net.IPv4(127, 0, 0, 1), HostPort: 8080, GuestPort: 80},
			Forward{Proto: "tcp", HostIP: net.IPv4(127, 0, 0, 2), HostPort: 8080, GuestPort: 81},
		)}, want: "host port 8080/tcp is published twice"},
		{name: "one host port for tcp and udp", nics: []NIC{userNIC(tcp(53, 53), Forward{Proto: "udp", HostPort: 53, GuestPort: 53})}},
		{name: "one guest port from two host ports", nics: []NIC{userNIC(tcp(8080, 80), tcp(8081, 80))}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := validateNICs(tc.nics)
			if tc.want == "" {
				if err != nil {
					t.Fatalf("validateNICs() = %v, want nil", err)
				}
				return
			}
			if !errdefs.IsInvalidArgument(err) || !strings.Contains(fmtErr(err), tc.want) {
				t.Fatalf("validateNICs() = %v, want invalid argument containing %q", err, tc.want)
			}
		})
	}
}

func TestNICArgs(t *testing.T) {
	tap := testTap(t)
	const userNetdev = "user,id=net%d,net=10.0.2.0/24,host=10.0.2.2,dns=10.0.2.3,ipv6=off"
	userMAC := net.HardwareAddr{0x52, 0x54, 0x00, 0x12, 0x34, 0x56}
	for _, tc := range []struct {
		name string
		nics []NIC
		taps []int
		want []string
	}{
		{name: "no NICs", want: nil},
		{name: "a tap at its descriptor", nics: []NIC{{MAC: testMAC(0xab), Tap: tap}}, taps: []int{7},
			want: []string{
				"-netdev", "tap,id=net0,fd=7",
				"-device", "virtio-net-device,netdev=net0,mac=02:00:00:00:00:ab",
			}},
		{name: "user networking without forwards", nics: []NIC{{MAC: userMAC, User: &UserNet{}}}, taps: []int{-1},
			want: []string{
				"-netdev", strings.Replace(userNetdev, "%d", "0", 1),
				"-device", "virtio-net-device,netdev=net0,mac=52:54:00:12:34:56",
			}},
		{name: "user networking with forwards, with and without a host address", nics: []NIC{{MAC: userMAC, User: &UserNet{Forwards: []Forward{
			{Proto: "tcp", HostPort: 8080, GuestPort: 80},
			{Proto: "udp", HostIP: net.IPv4(127, 0, 0, 1), HostPort: 5353, GuestPort: 53},
		}}}}, taps: []int{-1},
			want: []string{
				"-netdev", strings.Replace(userNetdev, "%d", "0", 1) +
					",hostfwd=tcp::8080-10.0.2.15:80,hostfwd=udp:127.0.0.1:5353-10.0.2.15:53",
				"-device", "virtio-net-device,netdev=net0,mac=52:54:00:12:34:56",
			}},
		{name: "NICs are numbered in order, each tap at its own descriptor", nics: []NIC{
			{MAC: testMAC(1), Tap: tap},
			{MAC: userMAC, User: &UserNet{}},
			{MAC: testMAC(3), Tap: tap},
		}, taps: []int{5, -1, 9},
			want: []string{
				"-netdev", "tap,id=net0,fd=5",
				"-device", "virtio-net-device,netdev=net0,mac=02:00:00:00:00:01",
				"-netdev", strings.Replace(userNetdev, "%d", "1", 1),
				"-device", "virtio-net-device,netdev=net1,mac=52:54:00:12:34:56",
				"-netdev", "tap,id=net2,fd=9",
				"-device", "virtio-net-device,netdev=net2,mac=02:00:00:00:00:03",
			}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := nicArgs(tc.nics, func(i int) int { return tc.taps[i] })
			if !slices.Equal(got, tc.want) {
				t.Errorf("nicArgs() =\n%q\nwant\n%q", got, tc.want)
			}
		})
	}
}

func TestParseForward(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Forward
		// bad is a substring of the error; "" means valid.
		bad string
	}{
		{in: "8080:80", want: Forward{Proto: "tcp", HostPort: 8080, GuestPort: 80}},
		{in: "8080:80/tcp", want: Forward{Proto: "tcp", HostPort: 8080, GuestPort: 80}},
		{in: "127.0.0.1:8080:80/udp", want: Forward{Proto: "udp", HostIP: net.IPv4(127, 0, 0, 1).To4(), HostPort: 8080, GuestPort: 80}},
		{in: ":8080:80", want: Forward{Proto: "tcp", HostPort: 8080, GuestPort: 80}},
		{in: "0.0.0.0:1:65535", want: Forward{Proto: "tcp", HostIP: net.IPv4zero.To4(), HostPort: 1, GuestPort: 65535}},
		{in: "80", bad: `port "80": wrong number of fields: want [IP:]HOSTPORT:BOXPORT[/tcp|udp]`},
		{in: "", bad: "wrong number of fields"},
		{in: "1.2.3.4:1:2:3", bad: "wrong number of fields"},
		// QEMU's hostfwd listens on IPv4 only: an IPv6 host address is
		// refused however it is written (its colons make more fields).
		{in: "::1:8080:80", bad: "wrong number of fields"},
		{in: "[::1]:8080:80", bad: `port "[::1]:8080:80": wrong number of fields`},
		{in: "fd00:8080:80", bad: `port "fd00:8080:80": the host address must be an IPv4 address`},
		{in: "0:80", bad: `port "0:80": host port must be 1 to 65535`},
		{in: "65536:80", bad: "host port must be 1 to 65535"},
		{in: "http:80", bad: "host port must be 1 to 65535"},
		{in: "-1:80", bad: "host port must be 1 to 65535"},
		{in: "8080:0", bad: `port "8080:0": box port must be 1 to 65535`},
		{in: "8080:65536", bad: "box port must be 1 to 65535"},
		{in: "8080:http", bad: "box port must be 1 to 65535"},
		{in: "8080:", bad: "box port must be 1 to 65535"},
		{in: "8080:80/tcpx", bad: `port "8080:80/tcpx": protocol must be tcp or udp`},
		{in: "8080:80/", bad: "protocol must be tcp or udp"},
		{in: "8080:80/TCP", bad: "protocol must be tcp or udp"},
		{in: "localhost:8080:80", bad: `port "localhost:8080:80": the host address must be an IPv4 address`},
		{in: "fe80--1:8080:80", bad: "the host address must be an IPv4 address"},
	} {
		t.Run(tc.in, func(t *testing.T) {
			got, err := ParseForward(tc.in)
			if tc.bad != "" {
				if !errdefs.IsInvalidArgument(err) || !strings.Contains(fmtErr(err), tc.bad) {
					t.Fatalf("ParseForward(%q) = %+v, %v; want invalid argument containing %q", tc.in, got, err, tc.bad)
				}
				return
			}
			if err != nil || got.Proto != tc.want.Proto || !got.HostIP.Equal(tc.want.HostIP) ||
				len(got.HostIP) != len(tc.want.HostIP) || got.HostPort != tc.want.HostPort || got.GuestPort != tc.want.GuestPort {
				t.Fatalf("ParseForward(%q) = %+v, %v; want %+v", tc.in, got, err, tc.want)
			}
			if err := validateForwards(0, []Forward{got}); err != nil {
				t.Errorf("a parsed forward fails validation: %v", err)
			}
		})
	}
}

func TestForwardStringRoundTrips(t *testing.T) {
	for _, in := range []string{"8080:80/tcp", "127.0.0.1:5353:53/udp", "1:65535/tcp"} {
		f, err := ParseForward(in)
		if err != nil {
			t.Fatal(err)
		}
		if got := f.String(); got != in {
			t.Errorf("ParseForward(%q).String() = %q", in, got)
		}
	}
}

// NIC arguments come after the monitor's, and each tap is named by the
// descriptor launchFDs gives it, by NIC index.
func TestQEMUArgsPutNICsAfterTheMonitor(t *testing.T) {
	c := argsConfig()
	c.NICs = []NIC{
		{MAC: testMAC(1), User: &UserNet{Forwards: []Forward{{Proto: "tcp", HostPort: 2222, GuestPort: 22}}}},
		{MAC: testMAC(2), Tap: testTap(t)},
	}
	args := qemuArgs(c, AccelTCG, launchFDs{qmp: 3, agent: 4, taps: []int{-1, 5}})
	mon := slices.Index(args, "-mon")
	if mon < 0 || mon+1 >= len(args) || args[mon+1] != "chardev=qmp,mode=control" {
		t.Fatalf("no monitor in %q", args)
	}
	want := []string{
		"-netdev", "user,id=net0,net=10.0.2.0/24,host=10.0.2.2,dns=10.0.2.3,ipv6=off,hostfwd=tcp::2222-10.0.2.15:22",
		"-device", "virtio-net-device,netdev=net0,mac=02:00:00:00:00:01",
		"-netdev", "tap,id=net1,fd=5",
		"-device", "virtio-net-device,netdev=net1,mac=02:00:00:00:00:02",
	}
	if got := args[mon+2:]; !slices.Equal(got, want) {
		t.Errorf("args after the monitor =\n%q\nwant\n%q", got, want)
	}
	if got := flagValues(args, "-netdev"); len(got) != 2 {
		t.Errorf("-netdev = %q, want two", got)
	}
}

func TestNewQEMURejectsABadNIC(t *testing.T) {
	tap := testTap(t)
	for _, tc := range []struct {
		name string
		nics []NIC
		want string
	}{
		{name: "multicast MAC", nics: []NIC{{MAC: net.HardwareAddr{1, 2, 3, 4, 5, 6}, Tap: tap}}, want: "is not a unicast Ethernet address"},
		{name: "no backend", nics: []NIC{{MAC: testMAC(1)}}, want: "exactly one of a tap and user networking"},
		{name: "bad forward", nics: []NIC{{MAC: testMAC(1), User: &UserNet{Forwards: []Forward{{Proto: "tcp", HostPort: 80}}}}},
			want: "ports must be 1 to 65535"},
		{name: "too many", nics: slices.Repeat([]NIC{{MAC: testMAC(1), Tap: tap}}, maxNICs+1), want: "at most 8 fit a microvm"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := validFiles(t)
			c.NICs = tc.nics
			_, err := NewQEMU(c)
			if !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(fmtErr(err), tc.want) {
				t.Errorf("NewQEMU() error = %v, want invalid argument containing %q", err, tc.want)
			}
		})
	}
}

// procPid is the fake QEMU's /proc directory.
func procPid(q *QEMU) string { return "/proc/" + strconv.Itoa(q.Identity().Pid) }

// The launch hands every tap to QEMU as the descriptor its -netdev names,
// after the QMP and agent sockets (3 and 4), skipping user NICs.
func TestLaunchPassesEachTapAtTheDescriptorItsNetdevNames(t *testing.T) {
	tap1, tap2 := testTap(t), testTap(t)
	q := fakeVM(t, "ok", func(c *Config) {
		c.NICs = []NIC{
			{MAC: testMAC(1), Tap: tap1},
			{MAC: testMAC(2), User: &UserNet{}},
			{MAC: testMAC(3), Tap: tap2},
		}
	})
	if err := q.Start(testCtx(t, 10*time.Second)); err != nil {
		t.Fatal(err)
	}
	cmdline, err := os.ReadFile(procPid(q) + "/cmdline")
	if err != nil {
		t.Fatal(err)
	}
	netdevs := flagValues(strings.Split(string(cmdline), "\x00"), "-netdev")
	if len(netdevs) != 3 || netdevs[0] != "tap,id=net0,fd=5" || !strings.HasPrefix(netdevs[1], "user,id=net1,") ||
		netdevs[2] != "tap,id=net2,fd=6" {
		t.Fatalf("-netdev = %q; want the taps at 5 and 6", netdevs)
	}
	for fd, want := range map[int]*os.File{5: tap1, 6: tap2} {
		got, err := os.Stat(procPid(q) + "/fd/" + strconv.Itoa(fd))
		if err != nil {
			t.Fatalf("fake qemu's fd %d: %v", fd, err)
		}
		st, err := want.Stat()
		if err != nil {
			t.Fatal(err)
		}
		if !os.SameFile(got, st) {
			t.Errorf("fake qemu's fd %d is not the tap of its -netdev", fd)
		}
	}
	if err := q.Stop(testCtx(t, 10*time.Second)); err != nil {
		t.Fatal(err)
	}
}

// QEMU runs in Config.NetNS, and the shim's own threads stay in theirs.
func TestStartRunsQEMUInTheNetworkNamespace(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create a network namespace: run as root")
	}
	ns, err := netns.New()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Close() })
	own, err := os.Stat("/proc/thread-self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	q := fakeVM(t, "ok", func(c *Config) { c.NetNS = ns })
	if err := q.Start(testCtx(t, 10*time.Second)); err != nil {
		t.Fatal(err)
	}
	var want, got unix.Stat_t
	if err := unix.Fstat(int(ns.Fd()), &want); err != nil {
		t.Fatal(err)
	}
	if err := unix.Stat(procPid(q)+"/ns/net", &got); err != nil {
		t.Fatal(err)
	}
	if got.Dev != want.Dev || got.Ino != want.Ino {
		t.Errorf("fake qemu is in net:[%d], want net:[%d]", got.Ino, want.Ino)
	}
	tasks, _ := os.ReadDir("/proc/self/task")
	for _, task := range tasks {
		st, err := os.Stat("/proc/self/task/" + task.Name() + "/ns/net")
		if err == nil && !os.SameFile(st, own) {
			t.Errorf("thread %s was left in another network namespace", task.Name())
		}
	}
	if err := q.Stop(testCtx(t, 10*time.Second)); err != nil {
		t.Fatal(err)
	}
}
