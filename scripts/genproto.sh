#!/usr/bin/env bash
# genproto.sh regenerates pkg/agent/api from agent.proto and pkg/health/api
# from health.proto with pinned generators.
# The generated files are committed; CI does not need protoc.
set -euo pipefail
cd "$(dirname "$0")/.."
PROTOC_GEN_GO=v1.36.12
PROTOC_GEN_GO_TTRPC=v1.2.10
bin=$(go env GOPATH)/bin
GOBIN=$bin go install google.golang.org/protobuf/cmd/protoc-gen-go@$PROTOC_GEN_GO
GOBIN=$bin go install github.com/containerd/ttrpc/cmd/protoc-gen-go-ttrpc@$PROTOC_GEN_GO_TTRPC
command -v protoc >/dev/null || { echo "genproto: protoc missing: apt-get install protobuf-compiler" >&2; exit 1; }
PATH=$bin:$PATH protoc -I pkg/agent/api \
	--go_out=paths=source_relative:pkg/agent/api \
	--go-ttrpc_out=paths=source_relative:pkg/agent/api \
	pkg/agent/api/agent.proto
PATH=$bin:$PATH protoc -I pkg/health/api \
	--go_out=paths=source_relative:pkg/health/api \
	pkg/health/api/health.proto
