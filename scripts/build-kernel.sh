#!/usr/bin/env bash
# build-kernel.sh builds the boxlite guest kernel (an ELF vmlinux) from Debian's
# linux-source package and guest/kernel.config, and copies it to $1.
#
# The build is cached outside the work tree, keyed by a hash of its inputs
# (source tarball name and size, the config fragment, and the build recipe:
# the lines of this script between the build-recipe markers), so a second
# run, or a fresh clone on the same machine, takes a second, and editing the
# rest of this script does not cost a rebuild.
set -euo pipefail

out=${1:?usage: build-kernel.sh OUTPUT}
# The build below changes directory: make the output path absolute first, or
# a relative one would be written relative to the build tree (or /).
out=$(realpath -m -- "$out")
root=$(cd "$(dirname "$0")/.." && pwd)
fragment=$root/guest/kernel.config
cache=${BOXLITE_CACHE:-/var/cache/boxlite}

# BOXLITE_KERNEL_SOURCE overrides the source tarball (the tests use a tiny
# stand-in to check the script itself).
src=${BOXLITE_KERNEL_SOURCE:-/usr/src/linux-source-6.1.tar.xz}
if [[ ! -f $src ]]; then
	echo "build-kernel: $src is missing: run make setup" >&2
	exit 1
fi
src=$(realpath -- "$src")

key=$( {
	echo "$src $(stat -c %s "$src")"
	cat "$fragment"
	sed -n '/^# build-recipe-begin/,/^# build-recipe-end/p' "$0"
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
	echo "build-kernel: building $key in $work (about 7 minutes on 2 cores)"
# build-recipe-begin
	tar -xf "$src" -C "$work" --strip-components=1
	# A subshell: the working directory is the build tree only in here.
	(
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
	)
# build-recipe-end
	rm -rf "$work"
fi

mkdir -p "$(dirname "$out")"
cp "$cached" "$out.tmp"
mv "$out.tmp" "$out"
echo "build-kernel: $out ($key)"
