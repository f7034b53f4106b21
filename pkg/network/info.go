package network

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
)

// InfoFile is the name of the file, in a box's bundle, that says how the
// box is networked once it started; `boxlite inspect` shows it.
const InfoFile = "network.json"

// Info is a started box's network as its guest sees it.
type Info struct {
	// Mode is "netns" (the VM in a network namespace), "none" (no NIC) or
	// "user" (QEMU's user networking).
	Mode string `json:"mode"`
	// NetNS is the namespace's path; empty for one the shim created.
	NetNS string `json:"netns,omitempty"`
	// Interfaces are the guest's configured interfaces.
	Interfaces []InfoInterface `json:"interfaces,omitempty"`
	// Ports are the published ports ([IP:]HOSTPORT:BOXPORT/PROTO).
	Ports []string `json:"ports,omitempty"`
}

// InfoInterface is one configured guest interface.
type InfoInterface struct {
	Name      string   `json:"name"`
	MAC       string   `json:"mac"`
	Addresses []string `json:"addresses"`
}

// WriteInfo replaces dir's InfoFile atomically.
func WriteInfo(dir string, info Info) error {
	data, err := json.Marshal(info)
	if err != nil {
		return err
	}
	tmp := filepath.Join(dir, InfoFile+".tmp")
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		return fmt.Errorf("network info: %w", err)
	}
	return os.Rename(tmp, filepath.Join(dir, InfoFile))
}

// ReadInfo reads dir's InfoFile; a box that has not started has none
// (os.ErrNotExist).
func ReadInfo(dir string) (Info, error) {
	var info Info
	data, err := os.ReadFile(filepath.Join(dir, InfoFile))
	if err != nil {
		return info, err
	}
	if err := json.Unmarshal(data, &info); err != nil {
		return info, fmt.Errorf("%s: %w", filepath.Join(dir, InfoFile), err)
	}
	return info, nil
}
