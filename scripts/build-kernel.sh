#!/usr/bin/env bash
# build-kernel.sh builds the boxlite guest kernel (an ELF vmlinux) from Debian's
# linux-source package and guest/kernel.config, and copies it to $1.
#
# The build is cached outside the work tree, keyed by a hash of its inputs
# (source tarball name and size, the config fragment, this script), so a second
# run, or a fresh clone on the same machine, takes a second.
set -euo pipefail

out=${1:?usage: build-kernel.sh OUTPUT}
root=$(cd "$(dirname "$0")/.." && pwd)
fragment=$root/guest/kernel.config
cache=${BOXLITE_CACHE:-/var/cache/boxlite}

src=$(ls /usr/src/linux-source-6.1.tar.xz 2>/dev/null || true)
if [[ -z $src ]]; then
	echo "build-kernel: /usr/src/linux-source-6.1.tar.xz is missing: run make setup" >&2
	exit 1
fi

key=$( {
	echo "$src $(stat -c %s "$src")"
	cat "$fragment" "$0"
} | sha256sum | cut -c1-16)
cached=$cache/kernel/$key/vmlinux

# One build per key at a time: a second make (another checkout, a parallel
# target) waits for the first and then takes its result.
mkdir -p "$cache"
exec 9>"$cache/kernel-$key.lock"
flock 9

if [[ ! -s $cached ]]; then
	work=$cache/build/kernel-$key
	rm -rf "$work"
	mkdir -p "$work"
	echo "build-kernel: building $key in $work (about 8 minutes on 2 cores)"
	tar -xf "$src" -C "$work" --strip-components=1
	cd "$work"
	make -s ARCH=x86_64 allnoconfig
	KCONFIG_CONFIG=.config scripts/kconfig/merge_config.sh -m -O . .config "$fragment" >/dev/null
	make -s ARCH=x86_64 olddefconfig
	# merge_config only warns when an option is dropped: fail instead, so the
	# kernel never silently lacks something the guest needs.
	missing=0
	while IFS= read -r line; do
		case $line in '' | '#'*) continue ;; esac
		opt=${line%%=*} val=${line#*=}
		if [[ $val == n ]]; then
			grep -q "^$opt=" .config && { echo "build-kernel: $opt should be off" >&2; missing=1; }
		elif ! grep -qx "$line" .config; then
			echo "build-kernel: $line did not survive olddefconfig" >&2
			missing=1
		fi
	done <"$fragment"
	((missing == 0)) || exit 1
	make -s ARCH=x86_64 -j"$(nproc)" vmlinux
	mkdir -p "$(dirname "$cached")"
	cp vmlinux "$cached.tmp"
	cp .config "$(dirname "$cached")/config"
	mv "$cached.tmp" "$cached"
	cd /
	rm -rf "$work"
fi

mkdir -p "$(dirname "$out")"
cp "$cached" "$out.tmp"
mv "$out.tmp" "$out"
echo "build-kernel: $out ($key)"
