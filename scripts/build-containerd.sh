#!/usr/bin/env bash
# build-containerd.sh builds containerd, ctr and containerd-shim-runc-v2 from
# the Go module proxy into a cache outside the work tree, keyed by version:
#
#   /var/cache/boxlite/containerd/<version>/bin/{containerd,ctr,containerd-shim-runc-v2}
#
# It is idempotent: when all three binaries are present it prints the
# directory and exits at once. The binaries are used by the integration tests
# (a private containerd) and never installed on the host.
#
# Usage: scripts/build-containerd.sh [--print-dir]
#   --print-dir  only print the bin directory (builds first if missing)
# Environment: CONTAINERD_VERSION (default v2.4.2), BOXLITE_CACHE (default
# /var/cache/boxlite), GO (default: go on PATH, else /usr/local/go/bin/go).
set -euo pipefail

VERSION=${CONTAINERD_VERSION:-v2.4.2}
CACHE=${BOXLITE_CACHE:-/var/cache/boxlite}
DIR="$CACHE/containerd/$VERSION"
BIN="$DIR/bin"
TOOLS=(containerd ctr containerd-shim-runc-v2)

quiet=0
if [[ ${1:-} == --print-dir ]]; then
	quiet=1
fi

say() { ((quiet)) || echo "build-containerd: $*" >&2; }

have_all() {
	local t
	for t in "${TOOLS[@]}"; do
		[[ -x "$BIN/$t" ]] || return 1
	done
}

if have_all; then
	say "cached in $BIN"
	echo "$BIN"
	exit 0
fi

GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
if [[ ! -x $GO ]]; then
	echo "build-containerd: go not found (looked for go on PATH and /usr/local/go/bin/go)" >&2
	exit 1
fi

mkdir -p "$DIR"
# Build into a temporary directory and move it into place: an interrupted
# build never leaves a half-filled cache that later runs would trust.
tmp=$(mktemp -d "$DIR/.bin.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

pkgs=()
for t in "${TOOLS[@]}"; do
	pkgs+=("github.com/containerd/containerd/v2/cmd/$t@$VERSION")
done
say "building ${TOOLS[*]} $VERSION (about 2 minutes cold)"
start=$(date +%s)
# Outside any module: go install pkg@version resolves the tool's own go.mod.
(cd / && GOBIN="$tmp" GOFLAGS=-trimpath "$GO" install "${pkgs[@]}") >&2
for t in "${TOOLS[@]}"; do
	[[ -x "$tmp/$t" ]] || {
		echo "build-containerd: $t was not built" >&2
		exit 1
	}
done
rm -rf "$BIN"
mv "$tmp" "$BIN"
trap - EXIT
say "built in $(($(date +%s) - start)) s: $BIN"
echo "$BIN"
