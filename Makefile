# boxlite — run `make help` for the targets.
SHELL := /bin/bash
GO ?= go
BIN := bin
GOFLAGS_BUILD := -trimpath

# Build outputs (never committed): binaries, the guest kernel, the initramfs, a busybox rootfs.
KERNEL := $(BIN)/vmlinux
INITRD := $(BIN)/initramfs.cpio
ROOTFS := $(BIN)/rootfs
GO_SOURCES := $(shell find cmd pkg -name '*.go' -not -name '*_test.go' 2>/dev/null) go.mod go.sum

.DEFAULT_GOAL := help

.PHONY: help
help: ## Show this help.
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: setup
setup: ## Install the Debian packages boxlite needs (idempotent; root).
	@bash scripts/setup.sh

.PHONY: build
build: $(BIN)/boxlite $(BIN)/containerd-shim-boxlite-v1 $(KERNEL) $(INITRD) $(ROOTFS) ## Build the manager, the shim, the guest kernel and initramfs, and a busybox rootfs.

$(BIN)/boxlite: $(GO_SOURCES)
	$(GO) build $(GOFLAGS_BUILD) -o $@ ./cmd/boxlite

$(BIN)/containerd-shim-boxlite-v1: $(GO_SOURCES)
	$(GO) build $(GOFLAGS_BUILD) -o $@ ./cmd/containerd-shim-boxlite-v1

.PHONY: kernel
kernel: ## Build the guest kernel (cached in /var/cache/boxlite by config hash).
	@bash scripts/build-kernel.sh $(KERNEL)

$(KERNEL): guest/kernel.config scripts/build-kernel.sh
	@bash scripts/build-kernel.sh $(KERNEL)

.PHONY: initramfs
initramfs: ## Build the guest initramfs (boxlite-agent as /init, plus a static crun built from Debian's source, cached).
	@bash scripts/build-initramfs.sh $(INITRD)

$(INITRD): $(GO_SOURCES) scripts/build-initramfs.sh scripts/build-crun.sh
	@bash scripts/build-initramfs.sh $(INITRD)

$(ROOTFS): scripts/build-rootfs.sh
	@bash scripts/build-rootfs.sh $(ROOTFS)

.PHONY: rootfs
rootfs: ## Build the busybox rootfs used by the demo.
	@bash scripts/build-rootfs.sh $(ROOTFS)

.PHONY: demo
demo: setup build ## Install, build, and run a box that prints its guest kernel version.
	$(BIN)/boxlite run --rm --rootfs $(ROOTFS) -- uname -r

.PHONY: check
check: $(BIN)/boxlite ## Tell whether boxes can run on this machine.
	$(BIN)/boxlite check

.PHONY: unit
unit: ## Run the unit tests (with -race).
	$(GO) test -race -count=1 ./pkg/... ./internal/... ./cmd/...

# The fuzz targets of the host side of the agent protocol (the bytes a
# hostile guest controls), as package:target: go test fuzzes one target per
# run. Their seed corpora (f.Add and testdata/fuzz) run with the unit tests.
FUZZ_TARGETS := \
	./pkg/agent/:FuzzGuardConn ./pkg/agent/:FuzzReplyFrame ./pkg/agent/:FuzzReplyPayload \
	./pkg/agent/:FuzzCopyOutput ./pkg/agent/:FuzzCopyInput ./pkg/agent/:FuzzWait \
	./pkg/shim/:FuzzPollGuestEvents ./pkg/shim/:FuzzGuestFigures
FUZZTIME ?= 20s
# The fuzzer minimizes each new input it keeps, for up to 60 s by default;
# these targets run goroutines (a ttrpc client and server), whose scheduling
# makes coverage vary, so unbounded minimization stalls them for most of
# FUZZTIME.
FUZZMINIMIZETIME ?= 1s

.PHONY: fuzz
fuzz: ## Fuzz the host side of the agent protocol, each target for FUZZTIME (20s).
	@set -e; for t in $(FUZZ_TARGETS); do \
		pkg=$${t%%:*}; name=$${t##*:}; \
		echo "fuzz $$name in $$pkg for $(FUZZTIME)"; \
		$(GO) test -run '^$$' -fuzz "^$$name\$$" -fuzztime $(FUZZTIME) -fuzzminimizetime $(FUZZMINIMIZETIME) $$pkg; \
	done

.PHONY: integration
integration: build critest ## Run the integration tests (boot real microVMs).
	$(GO) test -count=1 -timeout 40m -v ./integration/...

.PHONY: integration-cold
integration-cold: build critest ## The integration tests again with VM templates off (every box boots cold).
	BOXLITE_TEMPLATES=off $(GO) test -count=1 -timeout 40m ./integration/...

.PHONY: test
test: setup build lint unit fuzz integration integration-cold ## Everything CI runs: setup, build, lint, unit tests, 20 s of fuzzing per target, integration tests (with VM templates, then without).

.PHONY: lint
lint: ## go vet and gofmt.
	$(GO) vet ./...
	@out=$$(gofmt -l cmd pkg internal integration); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

.PHONY: bench
bench: build ## Run the benchmarks and print the tables.
	$(GO) test -run '^$$' -bench . -benchtime 5x -count 1 ./pkg/reaper/ ./pkg/agent/
	$(GO) test -run '^$$' -bench . -benchtime 7x -count 1 -timeout 60m ./integration/...

.PHONY: proto
proto: ## Regenerate the agent API (needs protoc; pinned generators).
	@bash scripts/genproto.sh

.PHONY: clean
clean: ## Remove build outputs (the kernel cache in /var/cache/boxlite stays).
	rm -rf $(BIN)

# --- containerd: install the shim, build the containerd the tests run ---

# Where make install puts things. The shim finds the guest images in
# /usr/local/share/boxlite or /usr/share/boxlite without configuration
# (pkg/vmm FindKernel/FindInitrd); another SHAREDIR needs BOXLITE_KERNEL and
# BOXLITE_INITRD in containerd's environment.
PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
SHAREDIR ?= $(PREFIX)/share/boxlite
INSTALLED := $(DESTDIR)$(BINDIR)/boxlite $(DESTDIR)$(BINDIR)/containerd-shim-boxlite-v1 \
	$(DESTDIR)$(SHAREDIR)/vmlinux $(DESTDIR)$(SHAREDIR)/initramfs.cpio

.PHONY: install
install: $(BIN)/boxlite $(BIN)/containerd-shim-boxlite-v1 $(KERNEL) $(INITRD) ## Install boxlite, the shim, the guest kernel and initramfs, and build the default VM template (root; PREFIX=/usr/local).
	install -D -m 0755 $(BIN)/boxlite $(DESTDIR)$(BINDIR)/boxlite
	install -D -m 0755 $(BIN)/containerd-shim-boxlite-v1 $(DESTDIR)$(BINDIR)/containerd-shim-boxlite-v1
	install -D -m 0644 $(KERNEL) $(DESTDIR)$(SHAREDIR)/vmlinux
	install -D -m 0644 $(INITRD) $(DESTDIR)$(SHAREDIR)/initramfs.cpio
	@# The VM template of the manager's default box, so that the first box
	@# starts as fast as the next (not for a staged DESTDIR install).
	@if [ -z "$(DESTDIR)" ]; then $(BINDIR)/boxlite template build >/dev/null || echo "install: no VM template built now: the first box builds it"; fi

.PHONY: uninstall
uninstall: ## Remove what make install installed.
	rm -f $(INSTALLED)
	@rmdir $(DESTDIR)$(SHAREDIR) 2>/dev/null || true

.PHONY: containerd
containerd: ## Build containerd, ctr and the runc shim (v2.4.2) for the tests, cached in /var/cache/boxlite/containerd.
	@bash scripts/build-containerd.sh

.PHONY: nerdctl
nerdctl: ## Build nerdctl (v2.2.2) for the tests, cached in /var/cache/boxlite/nerdctl.
	@bash scripts/build-nerdctl.sh

.PHONY: oci-image
oci-image: ## Build the offline busybox OCI image tarball, cached in /var/cache/boxlite/images.
	@bash scripts/oci-image.sh

.PHONY: critest
critest: ## Build critest, crictl, ginkgo (cri-tools v1.37.0) and critest's offline test images, cached in /var/cache/boxlite/critest.
	@bash scripts/build-critest.sh
	@bash scripts/critest-images.sh
