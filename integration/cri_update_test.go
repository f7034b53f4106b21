package integration

import (
	"fmt"
	"strconv"
	"strings"
	"testing"
)

// TestCRIUpdateContainerResources changes a pod container's limits with
// crictl update (CRI UpdateContainerResources, what the kubelet sends for
// an in-place resize): the container's cgroup in the VM takes them. A
// memory limit the pod's VM cannot hold is refused by name and changes
// nothing. Verified two-sided: before the shim implemented Update, crictl
// update failed with "not implemented".
func TestCRIUpdateContainerResources(t *testing.T) {
	e := startCRI(t)
	e.pullCRITestImage(t)
	pod := e.runPod(t, "bxupd", "boxlite", false)
	id := pod.start(t, "sleeper", "sleep", "100000")
	limits := func() string {
		t.Helper()
		out, err := e.crictl("exec", id, "sh", "-c", "cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max")
		if err != nil {
			t.Fatalf("read limits: %v", err)
		}
		return strings.Join(strings.Fields(out), " ")
	}
	if _, err := e.crictl("update", "--memory", strconv.Itoa(96<<20), "--cpu-quota", "50000", "--cpu-period", "100000", id); err != nil {
		t.Fatalf("crictl update: %v", err)
	}
	want := fmt.Sprintf("%d 50000 100000", 96<<20)
	if got := limits(); got != want {
		t.Errorf("limits after crictl update: %q, want %q", got, want)
	}
	_, err := e.crictl("update", "--memory", strconv.Itoa(4<<30), id)
	if err == nil || !strings.Contains(err.Error(), "exceeds what the box's VM can hold") {
		t.Errorf("update beyond the VM: %v; want a refusal naming the VM's size", err)
	}
	if got := limits(); got != want {
		t.Errorf("limits after the refused update: %q, want %q (unchanged)", got, want)
	}
	pod.remove(t)
}
