#!/usr/bin/env bash
# critest-images.sh builds the OCI image-layout tarball of the images
# cri-tools' critest pulls or runs (boxlite-mkimage -critest: a dynamically
# linked busybox, the boxlite-standin program) and caches it outside the
# work tree, keyed by a hash of its inputs:
#
#   /var/cache/boxlite/critest/images/<key>/images.tar
#
# The integration harness serves the tarball from a registry of its own on
# 127.0.0.1 (integration/critest_registry_test.go).
#
# Debian's dynamically linked busybox (package busybox) conflicts with
# busybox-static, which the other tests need installed, so it is not
# installed: `apt-get download` fetches the package once and its
# /bin/busybox is kept in /var/cache/boxlite/critest/busybox/. Its shared
# libraries are copied from this host into the image.
#
# Usage: scripts/critest-images.sh [--print-path]   (prints the tarball's path last)
# Environment: BOXLITE_CACHE (default /var/cache/boxlite), GO.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
CACHE=${BOXLITE_CACHE:-/var/cache/boxlite}
GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}

quiet=0
[[ ${1:-} == --print-path ]] && quiet=1
say() { ((quiet)) || echo "critest-images: $*" >&2; }

# The dynamic busybox, fetched once.
bbdir="$CACHE/critest/busybox"
busybox="$bbdir/busybox"
if [[ ! -x $busybox ]]; then
	mkdir -p "$bbdir"
	dl=$(mktemp -d "$bbdir/.dl.XXXXXX")
	trap 'rm -rf "$dl"' EXIT
	# apt-get download needs the package lists; a fresh machine may have
	# none yet.
	# (As root, into a directory apt's sandbox user cannot write to.)
	download() { (cd "$dl" && apt-get -q -o APT::Sandbox::User=root download busybox) >&2; }
	if ! download; then
		say "apt-get download busybox failed: updating the package lists once"
		apt-get update -qq >&2
		download
	fi
	dpkg-deb -x "$dl"/busybox_*.deb "$dl/x"
	install -m 0755 "$dl/x/bin/busybox" "$busybox.tmp"
	mv "$busybox.tmp" "$busybox"
	rm -rf "$dl"
	trap - EXIT
	say "fetched Debian's dynamic busybox: $busybox"
fi

# The key: the busybox and the host libraries it loads, the generator's and
# the stand-in's sources, the Go version, this script.
libs=$(ldd "$busybox" | awk '{for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i}' | xargs -r readlink -f)
key=$(
	{
		cat "$busybox" $libs "$0" "$root"/cmd/boxlite-mkimage/*.go "$root"/cmd/boxlite-standin/*.go "$root/go.sum"
		"$GO" version
	} | sha256sum | cut -c1-16
)
dir="$CACHE/critest/images/$key"
out="$dir/images.tar"
if [[ -s $out ]]; then
	say "cached: $out"
	echo "$out"
	exit 0
fi

mkdir -p "$dir"
tools=$(mktemp -d "$dir/.tools.XXXXXX")
trap 'rm -rf "$tools"' EXIT
start=$EPOCHREALTIME
(cd "$root" && "$GO" build -trimpath -o "$tools/boxlite-mkimage" ./cmd/boxlite-mkimage)
# Static: the images have no libc for it (the sandbox image has nothing else).
(cd "$root" && CGO_ENABLED=0 "$GO" build -trimpath -ldflags "-s -w" -o "$tools/boxlite-standin" ./cmd/boxlite-standin)
"$tools/boxlite-mkimage" -o "$out" -critest -busybox "$busybox" -standin "$tools/boxlite-standin"
say "built $out ($(stat -c %s "$out") bytes) in $(awk "BEGIN { printf \"%.1f\", $EPOCHREALTIME - $start }") s"
echo "$out"
