#!/usr/bin/env bash
# build-nerdctl.sh builds nerdctl from the Go module proxy into a cache outside
# the work tree, keyed by version:
#
#   /var/cache/boxlite/nerdctl/<version>/bin/nerdctl
#
# It is idempotent: when the binary is present it prints the directory and
# exits at once. nerdctl is used by the integration tests (against a private
# containerd) and never installed on the host.
#
# go install github.com/containerd/nerdctl/v2/cmd/nerdctl@<version> does not
# work: nerdctl's go.mod replaces github.com/containerd/nerdctl/mod/tigron (its
# test framework) with ./mod/tigron, which the module zip leaves out. So this
# script downloads the module, copies it into a temporary directory, writes a
# stub for mod/tigron and builds ./cmd/nerdctl there. The stub only has to
# compile: the one tigron identifier cmd/nerdctl pulls in is the tig.T
# interface, used by pkg/testutil (imported via cmd/nerdctl/helpers).
#
# Usage: scripts/build-nerdctl.sh [--print-dir]
#   --print-dir  only print the bin directory (builds first if missing)
# Environment: NERDCTL_VERSION (default v2.2.2), BOXLITE_CACHE (default
# /var/cache/boxlite), GO (default: go on PATH, else /usr/local/go/bin/go).
set -euo pipefail

VERSION=${NERDCTL_VERSION:-v2.2.2}
CACHE=${BOXLITE_CACHE:-/var/cache/boxlite}
DIR="$CACHE/nerdctl/$VERSION"
BIN="$DIR/bin"
MODULE=github.com/containerd/nerdctl/v2

quiet=0
if [[ ${1:-} == --print-dir ]]; then
	quiet=1
fi

say() { ((quiet)) || echo "build-nerdctl: $*" >&2; }

if [[ -x "$BIN/nerdctl" ]]; then
	say "cached in $BIN"
	echo "$BIN"
	exit 0
fi

GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
if [[ ! -x $GO ]]; then
	echo "build-nerdctl: go not found (looked for go on PATH and /usr/local/go/bin/go)" >&2
	exit 1
fi
# Build with the Go at hand, never a downloaded toolchain; only nerdctl's own
# go.mod is used (no workspace), and go.sum must already cover everything.
export GOTOOLCHAIN=local GOWORK=off GOFLAGS="-mod=readonly -buildvcs=false"

mkdir -p "$DIR"
# Build into a temporary directory and move it into place: an interrupted
# build never leaves a half-filled cache that later runs would trust. The
# module copy is read-only as it comes from the module cache: make it
# writable before removing it.
tmp=$(mktemp -d "$DIR/.build.XXXXXX")
trap 'chmod -R u+w "$tmp" 2>/dev/null; rm -rf "$tmp"' EXIT

say "building nerdctl $VERSION (about 2 minutes cold)"
start=$(date +%s)

# Outside any module: download exactly this version (no version list needed,
# the proxy refuses nerdctl's).
if ! info=$(cd / && "$GO" mod download -json "$MODULE@$VERSION"); then
	echo "build-nerdctl: go mod download $MODULE@$VERSION failed:" >&2
	echo "$info" >&2
	exit 1
fi
field() { sed -n 's/^[[:space:]]*"'"$1"'": "\(.*\)",\{0,1\}$/\1/p' <<<"$info" | head -n 1; }
moddir=$(field Dir)
revision=$(field Hash)
if [[ -z $moddir || ! -f $moddir/go.mod ]]; then
	echo "build-nerdctl: go mod download $MODULE@$VERSION gave no module directory:" >&2
	echo "$info" >&2
	exit 1
fi

src="$tmp/src"
cp -R "$moddir" "$src"
chmod -R u+w "$src"

# The stub for the replace ./mod/tigron. If a new version replaces more
# modules with local paths, fail here rather than with a confusing error.
replaces=$(sed -n 's/^.*=>[[:space:]]*\(\.\{1,2\}\/[^[:space:]]*\).*$/\1/p' "$src/go.mod")
if [[ $replaces != ./mod/tigron ]]; then
	echo "build-nerdctl: expected one local replace (./mod/tigron) in nerdctl's go.mod, found: ${replaces:-none}" >&2
	exit 1
fi
mkdir -p "$src/mod/tigron/tig"
cat >"$src/mod/tigron/go.mod" <<'EOF'
// Stub written by boxlite's scripts/build-nerdctl.sh: the module zip lacks
// mod/tigron, nerdctl's test framework.
module github.com/containerd/nerdctl/mod/tigron

go 1.24
EOF
cat >"$src/mod/tigron/tig/tig.go" <<'EOF'
// Package tig is a stub of tigron's tig: pkg/testutil (compose.go) takes a
// tig.T, calls Log and FailNow on it, and is passed a *testing.T.
package tig

type T interface {
	Log(args ...any)
	FailNow()
}
EOF

# As nerdctl's Makefile builds it: static, stripped, version stamped (a build
# from a directory has no module version in its build info).
pkg=$MODULE/pkg/version
mkdir -p "$tmp/bin"
(cd "$src" && CGO_ENABLED=0 "$GO" build -trimpath \
	-ldflags "-s -w -X $pkg.Version=$VERSION -X $pkg.Revision=$revision" \
	-o "$tmp/bin/nerdctl" ./cmd/nerdctl) >&2
# nerdctl --version prints the version without its v: "nerdctl version 2.2.2".
if ! out=$("$tmp/bin/nerdctl" --version) || [[ $out != "nerdctl version ${VERSION#v}" ]]; then
	echo "build-nerdctl: the built nerdctl does not report ${VERSION#v}: ${out:-}" >&2
	exit 1
fi
rm -rf "$BIN"
mv "$tmp/bin" "$BIN"
say "built in $(($(date +%s) - start)) s: $BIN ($out)"
echo "$BIN"
