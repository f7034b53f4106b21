#!/usr/bin/env bash
# build-critest.sh builds cri-tools' CRI validation suite (critest), crictl,
# and the ginkgo CLI that `critest -parallel N` (N > 1) runs, from the Go
# module proxy into a cache outside the work tree, keyed by version:
#
#   /var/cache/boxlite/critest/<version>/bin/{critest,crictl,ginkgo}
#
# It is idempotent: when all three binaries are present it prints the
# directory and exits at once. The binaries are used by the integration tests
# (against a private containerd) and never installed on the host.
#
# critest is a test binary (cmd/critest/cri_test.go), so go install cannot
# build it: the script downloads the module, copies it out of the read-only
# module cache and runs go test -c ./cmd/critest there. ginkgo is built from
# the same copy, so its version is the one cri-tools' go.mod pins (its
# tools/tools.go keeps it in go.sum). crictl installs normally.
#
# Usage: scripts/build-critest.sh [--print-dir]
#   --print-dir  only print the bin directory (builds first if missing)
# Environment: CRITEST_VERSION (default v1.37.0), BOXLITE_CACHE (default
# /var/cache/boxlite), GO (default: go on PATH, else /usr/local/go/bin/go).
set -euo pipefail

VERSION=${CRITEST_VERSION:-v1.37.0}
CACHE=${BOXLITE_CACHE:-/var/cache/boxlite}
DIR="$CACHE/critest/$VERSION"
BIN="$DIR/bin"
MODULE=sigs.k8s.io/cri-tools
TOOLS=(critest crictl ginkgo)

quiet=0
if [[ ${1:-} == --print-dir ]]; then
	quiet=1
fi

say() { ((quiet)) || echo "build-critest: $*" >&2; }

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
	echo "build-critest: go not found (looked for go on PATH and /usr/local/go/bin/go)" >&2
	exit 1
fi
# Build with the Go at hand, never a downloaded toolchain; only cri-tools'
# own go.mod is used (no workspace), and its go.sum must cover everything.
export GOTOOLCHAIN=local GOWORK=off GOFLAGS="-mod=readonly -buildvcs=false"

mkdir -p "$DIR"
# Build into a temporary directory and move it into place: an interrupted
# build never leaves a half-filled cache that later runs would trust. The
# module copy is read-only as it comes from the module cache: make it
# writable before removing it.
tmp=$(mktemp -d "$DIR/.build.XXXXXX")
trap 'chmod -R u+w "$tmp" 2>/dev/null; rm -rf "$tmp"' EXIT

say "building critest, crictl and ginkgo $VERSION (a few minutes cold)"
start=$(date +%s)

# Outside any module: download exactly this version.
if ! info=$(cd / && "$GO" mod download -json "$MODULE@$VERSION"); then
	echo "build-critest: go mod download $MODULE@$VERSION failed:" >&2
	echo "$info" >&2
	exit 1
fi
moddir=$(sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p' <<<"$info" | head -n 1)
if [[ -z $moddir || ! -f $moddir/cmd/critest/cri_test.go ]]; then
	echo "build-critest: go mod download $MODULE@$VERSION gave no module directory with cmd/critest:" >&2
	echo "$info" >&2
	exit 1
fi

src="$tmp/src"
cp -R "$moddir" "$src"
chmod -R u+w "$src"
mkdir -p "$tmp/bin"
# As cri-tools' Makefile builds critest: the version stamped into pkg/version.
ldflags="-X $MODULE/pkg/version.Version=$VERSION"
(cd "$src" && CGO_ENABLED=0 "$GO" test -c -trimpath -ldflags "$ldflags" -o "$tmp/bin/critest" ./cmd/critest) >&2
(cd "$src" && CGO_ENABLED=0 "$GO" build -trimpath -o "$tmp/bin/ginkgo" github.com/onsi/ginkgo/v2/ginkgo) >&2
# Outside any module: go install pkg@version resolves crictl's own go.mod.
(cd / && GOBIN="$tmp/bin" CGO_ENABLED=0 "$GO" install -trimpath -ldflags "$ldflags" "$MODULE/cmd/crictl@$VERSION") >&2

if ! out=$("$tmp/bin/critest" -version 2>&1) || [[ $out != *"critest version: $VERSION"* ]]; then
	echo "build-critest: the built critest does not report $VERSION: ${out:-}" >&2
	exit 1
fi
for t in "${TOOLS[@]}"; do
	[[ -x "$tmp/bin/$t" ]] || {
		echo "build-critest: $t was not built" >&2
		exit 1
	}
done
rm -rf "$BIN"
mv "$tmp/bin" "$BIN"
say "built in $(($(date +%s) - start)) s: $BIN"
echo "$BIN"
