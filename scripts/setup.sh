#!/usr/bin/env bash
# setup.sh installs every Debian package boxlite needs to build, boot and test
# boxes. It is idempotent: packages already present are not reinstalled and
# apt's index is refreshed only when a package is missing.
set -euo pipefail

PACKAGES=(
	# VMM and guest runtime
	qemu-system-x86 qemu-utils crun runc busybox-static
	# guest kernel build
	linux-source-6.1 build-essential flex bison bc libelf-dev libssl-dev xz-utils cpio kmod
	# the guest's static crun (scripts/build-crun.sh, from Debian's source)
	curl patch pkg-config libseccomp-dev libcap-dev
	# tooling used by the scripts and tests
	iproute2 procps psmisc util-linux ca-certificates git make
	# networking: CNI plugins (bridge, host-local, portmap) for nerdctl and
	# CRI, iptables for the bridge and portmap plugins, iperf3 for make bench
	containernetworking-plugins iptables iperf3
	# images: pkg/image's tests pull from a docker-registry they start on
	# 127.0.0.1 (its packaged service is not needed)
	docker-registry
	# critest's images want Debian's dynamically linked busybox, which
	# conflicts with busybox-static: scripts/critest-images.sh fetches it
	# with apt-get download instead of installing it (dpkg-deb, ldd). The
	# critest harness runs nsenter and critest runs ipcmk (util-linux).
)

# stop_registry_service stops and disables the docker-registry service that
# Debian's package starts: the tests start their own registries on free ports
# of 127.0.0.1, and the packaged one would hold :5000 for nothing (and keep a
# daemon running on every test machine).
stop_registry_service() {
	if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet docker-registry 2>/dev/null; then
		echo "setup: stopping and disabling the packaged docker-registry service"
		systemctl disable --now docker-registry 2>/dev/null || true
	fi
}

missing=()
for p in "${PACKAGES[@]}"; do
	if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
		missing+=("$p")
	fi
done

if ((${#missing[@]} == 0)); then
	echo "setup: all ${#PACKAGES[@]} packages present"
	if [[ $(id -u) -eq 0 ]]; then
		stop_registry_service
	fi
	exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
	echo "setup: missing packages (${missing[*]}); rerun as root: sudo make setup" >&2
	exit 1
fi

echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
stop_registry_service
