package manager

import (
	"github.com/boxlite/boxlite/pkg/api"
)

// API is the event as the API and boxlite events show it.
func (e Event) API() api.Event {
	return api.Event{
		Time: e.Time, Topic: e.Topic, ID: e.ID, ExecID: e.ExecID, Pid: e.Pid,
		Exited: e.Exited, ExitStatus: e.ExitStatus, Health: e.Health,
	}
}

// API is the record as the API and boxlite inspect show it.
func (r Record) API() api.Box {
	b := api.Box{
		ID: r.ID, Name: r.Name, Image: r.Image, Bundle: r.Bundle, Rootfs: r.Rootfs, Command: r.Command,
		Terminal: r.Terminal, Stdin: r.Stdin, Stdout: r.Stdout, Stderr: r.Stderr,
		ShimAddress: r.ShimAddress, ShimPid: r.ShimPid, ShimStartTime: r.ShimStartTime,
		VMMPid: r.VMMPid, VMMStartTime: r.VMMStartTime, TaskPid: r.TaskPid,
		Status: string(r.Status), ExitStatus: r.ExitStatus, ExitedAt: r.ExitedAt,
		OOMKilled: r.OOMKilled, Health: r.Health, Network: r.Network, Ports: r.Ports,
		Labels: r.Labels, AutoRemove: r.AutoRemove, CreatedAt: r.CreatedAt,
		CreatorPid: r.CreatorPid, CreatorStartTime: r.CreatorStartTime,
	}
	for _, i := range r.Interfaces {
		b.Interfaces = append(b.Interfaces, api.Interface{Name: i.Name, MAC: i.MAC, Addresses: i.Addresses})
	}
	return b
}
