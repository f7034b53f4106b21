#!/usr/bin/env bash
# build-initramfs.sh builds the boxlite guest initramfs, an uncompressed newc
# cpio (uncompressed boots faster under TCG), and writes it atomically to $1.
#
# Contents: /init = boxlite-agent (static Go binary), the OCI runtime (a
# static crun built by build-crun.sh; runc too with BOXLITE_INITRAMFS_RUNC=1,
# with its shared libraries at their host paths), the directories the agent
# mounts on, and the device nodes
# /dev/console and /dev/null. The nodes are written as a second, hand-made
# cpio archive (the kernel unpacks concatenated archives), so the build needs
# no root: without them the kernel gives init no stdio, and the Go runtime
# aborts at start when it cannot open /dev/null for the missing fds.
set -euo pipefail

out=${1:?usage: build-initramfs.sh OUTPUT}
root=$(cd "$(dirname "$0")/.." && pwd)
go=${GO:-$(command -v go || echo /usr/local/go/bin/go)}

die() {
	echo "build-initramfs: $*" >&2
	exit 1
}

command -v cpio >/dev/null || die "cpio is missing: run make setup"
[[ -x $go ]] || command -v "$go" >/dev/null || die "go is missing (set GO=/path/to/go)"
runtimes=()
if [[ ${BOXLITE_INITRAMFS_RUNC:-0} == 1 ]]; then
	runc=$(command -v runc || true)
	[[ -n $runc ]] || die "runc is missing: run make setup"
	runtimes+=("$runc")
fi

mkdir -p "$(dirname "$out")"
out=$(cd "$(dirname "$out")" && pwd)/$(basename "$out")
work=$(mktemp -d "${TMPDIR:-/tmp}/boxlite-initramfs.XXXXXX")
tmp=$out.tmp.$$
trap 'rm -rf "$work" "$tmp"' EXIT
stage=$work/root
mkdir -p "$stage"/{proc,sys,dev,run,tmp,etc,usr/bin,.root}
chmod 1777 "$stage/tmp"

version=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo dev)
(cd "$root" && CGO_ENABLED=0 "$go" build -trimpath \
	-ldflags "-s -w -X github.com/boxlite/boxlite/pkg/guest.Version=$version" \
	-o "$stage/init" ./cmd/boxlite-agent)

# copy_with_libs copies a binary and every shared library it loads to the
# same paths in the stage (symlinks resolved).
copy_with_libs() {
	local bin=$1 lib
	install -D -m 0755 "$bin" "$stage$bin"
	while read -r lib; do
		[[ -n $lib && ! -e $stage$lib ]] || continue
		install -D -m 0755 "$(readlink -f "$lib")" "$stage$lib"
	done < <(ldd "$bin" | grep -o '/[^ ]*' | sort -u)
}
bash "$root/scripts/build-crun.sh" "$stage/usr/bin/crun"
for rt in "${runtimes[@]}"; do
	copy_with_libs "$rt"
done

# newc_header NAME MODE MAJOR MINOR INO writes the newc header of an entry
# without data (a device node, or the TRAILER!!! that ends an archive).
newc_header() {
	local name=$1 mode=$2 major=$3 minor=$4 ino=$5 size=$((${#1} + 1))
	printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
		"$ino" "$mode" 0 0 1 0 0 0 0 "$major" "$minor" "$size" 0
	printf '%s\0' "$name"
	# Header (110 bytes) plus name are padded to a multiple of 4.
	head -c $(((4 - (110 + size) % 4) % 4)) /dev/zero
}
nodes() {
	newc_header dev/console $((0020600)) 5 1 900001
	newc_header dev/null $((0020666)) 1 3 900002
	newc_header TRAILER!!! 0 0 0 0
}

(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 --reproducible) >"$tmp"
nodes >>"$tmp"
mv -f "$tmp" "$out"
echo "build-initramfs: $out ($(du -h "$out" | cut -f1), runtimes: crun (static) ${runtimes[*]##*/})"
