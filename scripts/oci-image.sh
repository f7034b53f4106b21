#!/usr/bin/env bash
# oci-image.sh builds boxlite's offline busybox OCI image-layout tarball with
# cmd/boxlite-mkimage and caches it outside the work tree, keyed by a hash of
# its inputs (the busybox binary, the tool's source, this script):
#
#   /var/cache/boxlite/images/<key>/busybox.tar
#
# The tarball holds two images sharing one layer (Debian busybox-static's
# /bin/busybox, an applet symlink each, /etc/passwd, /etc/group):
#   docker.io/boxlite/busybox:test   Env PATH=..., Cmd ["sh"]
#   docker.io/boxlite/nocmd:test     the same without Cmd (for error tests)
# Import it with:
#   ctr -a SOCK -n NS images import --platform linux/amd64 busybox.tar
#
# Usage: scripts/oci-image.sh [--print-path]   (prints the tarball's path last)
# Environment: BOXLITE_CACHE (default /var/cache/boxlite), GO, BUSYBOX
# (default /bin/busybox).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
CACHE=${BOXLITE_CACHE:-/var/cache/boxlite}
BUSYBOX=${BUSYBOX:-/bin/busybox}
GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}

quiet=0
[[ ${1:-} == --print-path ]] && quiet=1
say() { ((quiet)) || echo "oci-image: $*" >&2; }

if [[ ! -x $BUSYBOX ]]; then
	echo "oci-image: $BUSYBOX missing: run make setup (busybox-static)" >&2
	exit 1
fi

key=$(cat "$BUSYBOX" "$0" "$root"/cmd/boxlite-mkimage/*.go "$root/go.sum" | sha256sum | cut -c1-16)
dir="$CACHE/images/$key"
out="$dir/busybox.tar"
if [[ -s $out ]]; then
	say "cached: $out"
	echo "$out"
	exit 0
fi

mkdir -p "$dir"
tool=$(mktemp "$dir/.mkimage.XXXXXX")
trap 'rm -f "$tool"' EXIT
(cd "$root" && "$GO" build -trimpath -o "$tool" ./cmd/boxlite-mkimage)
"$tool" -o "$out" -busybox "$BUSYBOX" \
	-image 'docker.io/boxlite/busybox:test=["sh"]' \
	-image 'docker.io/boxlite/nocmd:test='
say "built $out ($(stat -c %s "$out") bytes)"
echo "$out"
