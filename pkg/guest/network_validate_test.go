package guest

import (
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/containerd/errdefs"

	"github.com/boxlite/boxlite/pkg/agent/api"
	"github.com/boxlite/boxlite/pkg/netns/netnstest"
)

// validRequest is a valid request for the NIC nic0MAC, which tests break
// one field at a time.
func validRequest() *api.ConfigureNetworkRequest {
	return &api.ConfigureNetworkRequest{
		Interfaces: []*api.Interface{{DeviceMac: nic0MAC, Name: "eth0", Mtu: 1500, Addresses: []string{"10.4.0.2/24", "fd00::2/64"}}},
		Routes:     []*api.Route{{Gateway: "10.4.0.1", Device: "eth0"}, {Dest: "10.5.0.0/16", Gateway: "10.4.0.1", Device: "eth0"}},
		Neighbors:  []*api.Neighbor{{Ip: "10.4.0.1", Mac: "02:00:00:00:00:01", Device: "eth0"}},
	}
}

// repeat returns n copies made by fn.
func repeat[T any](n int, fn func(i int) T) []T {
	out := make([]T, n)
	for i := range out {
		out[i] = fn(i)
	}
	return out
}

func TestConfigureNetworkRejectsInvalidRequests(t *testing.T) {
	iface := func(r *api.ConfigureNetworkRequest) *api.Interface { return r.Interfaces[0] }
	tests := []struct {
		name string
		// field is the field the error must name.
		field string
		edit  func(r *api.ConfigureNetworkRequest)
	}{
		{"17 interfaces", "interfaces", func(r *api.ConfigureNetworkRequest) {
			r.Interfaces = repeat(17, func(i int) *api.Interface {
				return &api.Interface{DeviceMac: fmt.Sprintf("52:54:00:00:00:%02x", i+1), Name: fmt.Sprintf("eth%d", i)}
			})
			r.Routes, r.Neighbors = nil, nil
		}},
		{"257 routes", "routes", func(r *api.ConfigureNetworkRequest) {
			r.Routes = repeat(257, func(i int) *api.Route { return &api.Route{Gateway: "10.4.0.1", Device: "eth0", Metric: uint32(i)} })
		}},
		{"257 neighbors", "neighbors", func(r *api.ConfigureNetworkRequest) {
			r.Neighbors = repeat(257, func(i int) *api.Neighbor {
				return &api.Neighbor{Ip: fmt.Sprintf("10.4.1.%d", i%250+1), Mac: "02:00:00:00:00:01", Device: "eth0"}
			})
		}},
		{"device_mac not a MAC", "interfaces[0].device_mac", func(r *api.ConfigureNetworkRequest) { iface(r).DeviceMac = "52:54:00:12:34" }},
		{"device_mac of 8 bytes", "interfaces[0].device_mac", func(r *api.ConfigureNetworkRequest) { iface(r).DeviceMac = "52:54:00:12:34:56:78:9a" }},
		{"device_mac multicast", "interfaces[0].device_mac", func(r *api.ConfigureNetworkRequest) { iface(r).DeviceMac = "01:00:5e:00:00:01" }},
		{"device_mac zero", "interfaces[0].device_mac", func(r *api.ConfigureNetworkRequest) { iface(r).DeviceMac = "00:00:00:00:00:00" }},
		{"device_mac twice", "interfaces[1].device_mac", func(r *api.ConfigureNetworkRequest) {
			r.Interfaces = append(r.Interfaces, &api.Interface{DeviceMac: strings.ToUpper(nic0MAC), Name: "eth1"})
		}},
		{"mac multicast", "interfaces[0].mac", func(r *api.ConfigureNetworkRequest) { iface(r).Mac = "ff:ff:ff:ff:ff:ff" }},
		{"name empty", "interfaces[0].name", func(r *api.ConfigureNetworkRequest) { iface(r).Name = "" }},
		{"name of 16 bytes", "interfaces[0].name", func(r *api.ConfigureNetworkRequest) { iface(r).Name = "abcdefghijklmnop" }},
		{"name with a slash", "interfaces[0].name", func(r *api.ConfigureNetworkRequest) { iface(r).Name = "eth/0" }},
		{"name with a space", "interfaces[0].name", func(r *api.ConfigureNetworkRequest) { iface(r).Name = "eth 0" }},
		{"name lo", "interfaces[0].name", func(r *api.ConfigureNetworkRequest) { iface(r).Name = "lo" }},
		{"name ..", "interfaces[0].name", func(r *api.ConfigureNetworkRequest) { iface(r).Name = ".." }},
		{"name twice", "interfaces[1].name", func(r *api.ConfigureNetworkRequest) {
			r.Interfaces = append(r.Interfaces, &api.Interface{DeviceMac: nic1MAC, Name: "eth0"})
		}},
		{"name a temporary name", "interfaces[0].name", func(r *api.ConfigureNetworkRequest) { iface(r).Name = "bx525400123456" }},
		{"mtu 67", "interfaces[0].mtu", func(r *api.ConfigureNetworkRequest) { iface(r).Mtu = 67 }},
		{"mtu 65536", "interfaces[0].mtu", func(r *api.ConfigureNetworkRequest) { iface(r).Mtu = 65536 }},
		{"mtu too small for IPv6", "interfaces[0].addresses[1]", func(r *api.ConfigureNetworkRequest) { iface(r).Mtu = 1279 }},
		{"address without prefix", "interfaces[0].addresses[0]", func(r *api.ConfigureNetworkRequest) { iface(r).Addresses[0] = "10.4.0.2" }},
		{"address IPv4-mapped", "interfaces[0].addresses[0]", func(r *api.ConfigureNetworkRequest) { iface(r).Addresses[0] = "::ffff:10.4.0.2/120" }},
		{"route dest not CIDR", "routes[1].dest", func(r *api.ConfigureNetworkRequest) { r.Routes[1].Dest = "10.5.0.0" }},
		{"route dest with host bits", "routes[1].dest", func(r *api.ConfigureNetworkRequest) { r.Routes[1].Dest = "10.5.0.1/16" }},
		{"route gateway not an IP", "routes[0].gateway", func(r *api.ConfigureNetworkRequest) { r.Routes[0].Gateway = "gateway" }},
		{"route gateway of another family", "routes[1].gateway", func(r *api.ConfigureNetworkRequest) { r.Routes[1].Gateway = "fd00::1" }},
		{"route source not an IP", "routes[0].source", func(r *api.ConfigureNetworkRequest) { r.Routes[0].Source = "10.4.0" }},
		{"route source of another family", "routes[0].source", func(r *api.ConfigureNetworkRequest) { r.Routes[0].Source = "fd00::2" }},
		{"route device unknown", "routes[1].device", func(r *api.ConfigureNetworkRequest) { r.Routes[1].Device = "eth1" }},
		{"route device empty", "routes[0].device", func(r *api.ConfigureNetworkRequest) { r.Routes[0].Device = "" }},
		{"route scope 256", "routes[0].scope", func(r *api.ConfigureNetworkRequest) { r.Routes[0].Scope = 256 }},
		{"neighbor ip not an IP", "neighbors[0].ip", func(r *api.ConfigureNetworkRequest) { r.Neighbors[0].Ip = "10.4.0.1/24" }},
		{"neighbor mac not a MAC", "neighbors[0].mac", func(r *api.ConfigureNetworkRequest) { r.Neighbors[0].Mac = "" }},
		{"neighbor device unknown", "neighbors[0].device", func(r *api.ConfigureNetworkRequest) { r.Neighbors[0].Device = "lo" }},
	}
	checkLeaks(t)
	root, target := newTestNetns(t), newTestNetns(t)
	addNIC(t, root, "eth0", nic0MAC)
	addNIC(t, root, "eth1", nic1MAC)
	rh, th := testHandle(t, root), testHandle(t, target)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req := validRequest()
			tt.edit(req)
			err := configure(root, target, req)
			if !errdefs.IsInvalidArgument(err) || !strings.HasPrefix(err.Error(), tt.field+": ") {
				t.Fatalf("err = %v, want InvalidArgument about %s", err, tt.field)
			}
			if names := netnstest.LinkNames(t, rh, ""); !slices.Equal(names, []string{"eth0", "eth1", "lo", "peth0", "peth1"}) {
				t.Fatalf("root namespace has links %v after a rejected request", names)
			}
			if names := netnstest.LinkNames(t, th, ""); !slices.Equal(names, []string{"lo"}) {
				t.Fatalf("container's namespace has links %v after a rejected request", names)
			}
		})
	}
	// The request they were made from is valid.
	if err := configure(root, target, validRequest()); err != nil {
		t.Fatalf("valid request: %v", err)
	}
}

func TestParseNetworkOrdersLinkRoutesFirst(t *testing.T) {
	req := &api.ConfigureNetworkRequest{
		Interfaces: []*api.Interface{{DeviceMac: nic0MAC, Name: "eth0"}},
		Routes: []*api.Route{
			{Gateway: "10.4.0.1", Device: "eth0"},
			{Dest: "10.4.0.0/24", Device: "eth0"},
			{Dest: "fd00::/64", Gateway: "fe80::1", Device: "eth0"},
			{Device: "eth0", Scope: 254},
		},
	}
	plan, err := parseNetwork(req)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, r := range plan.routes {
		got = append(got, fmt.Sprintf("%d %s scope %d", r.index, describeRoute(&r.route), r.route.Scope))
	}
	want := []string{
		"1 10.4.0.0/24 scope 253",
		// Default onto the link, no address: IPv4, with the scope given.
		"3 default scope 254",
		"0 default via 10.4.0.1 scope 0",
		"2 fd00::/64 via fe80::1 scope 0",
	}
	if !slices.Equal(got, want) {
		t.Fatalf("routes in the order %q, want %q", got, want)
	}
}
