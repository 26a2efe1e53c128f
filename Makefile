# peerd — make help lists the targets.
SHELL := /bin/bash
GO ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
BIN := bin/peerd
LDFLAGS := -s -w -X main.version=$(VERSION)
# Heavy test tools (containerd 2, kube-apiserver, helm) are built once into this cache, keyed by version.
TOOLS_CACHE ?= $(HOME)/.cache/peerd-tools
export TOOLS_CACHE

# make run: one node, data in ./.peerd-data, HTTP on 127.0.0.1:30000.
RUN_DATA ?= $(CURDIR)/.peerd-data
RUN_ALLOW ?= 127.0.0.1,localhost
# The blob filesystem needs root (FUSE); other users run without it.
RUN_MOUNT ?= $(if $(filter 0,$(shell id -u)),$(RUN_DATA)/blobs,)
RUN_FLAGS ?=

.PHONY: help build image release-check run test test-unit fuzz e2e bench lint tidy clean reliability
# Tests that prove a row of the README's Reliability table append it here (internal/reliability).
RELIABILITY_ROWS ?= $(CURDIR)/bin/reliability.jsonl

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

build: ## build bin/peerd (static)
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN) ./cmd/peerd

# make image: the OCI image without a container engine (internal/ociimage): the binary of make build,
# cross-compiled per platform, on a minimal base; an OCI layout in bin/image/, pushed when IMAGE is set.
# Every timestamp is SOURCE_DATE_EPOCH, by default the commit's time, so the digests are reproducible.
IMAGE_PLATFORMS ?= linux/amd64 linux/arm64
IMAGE ?=
IMAGE_OUT ?= bin/image
SOURCE_DATE_EPOCH ?= $(shell git log -1 --format=%ct 2>/dev/null || echo 0)
REVISION ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
image: ## build the multi-platform OCI image into bin/image/ (IMAGE=<ref> also pushes it)
	@mkdir -p bin/image-build
	$(GO) build -o bin/mkimage ./internal/ociimage/cmd/mkimage
	set -e; args=""; for p in $(IMAGE_PLATFORMS); do \
	  os=$${p%/*}; arch=$${p#*/}; out=bin/image-build/peerd-$$os-$$arch; \
	  CGO_ENABLED=0 GOOS=$$os GOARCH=$$arch $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $$out ./cmd/peerd; \
	  args="$$args -bin $$p=$$out"; \
	done; \
	bin/mkimage -out $(IMAGE_OUT) -version '$(VERSION)' -revision '$(REVISION)' -epoch '$(SOURCE_DATE_EPOCH)' $(if $(IMAGE),-push '$(IMAGE)') $$args

release-check: image ## fail unless the chart's default image, appVersion and the image's labels agree with VERSION
	bin/mkimage -release-check deploy/helm/peerd -out $(IMAGE_OUT) -version '$(VERSION)'

run: build ## run one node on 127.0.0.1:30000 with its data under ./.peerd-data
	$(BIN) run --data-dir $(RUN_DATA)/data --http-addr 127.0.0.1:30000 --p2p-addr /ip4/127.0.0.1/tcp/30001 \
		--upstream-allow '$(RUN_ALLOW)' --mount='$(RUN_MOUNT)' $(RUN_FLAGS)

# make test: tools/test-setup.sh first (as root it installs the Debian packages and builds the
# cached tools the integration tests need), then go test -json through testsummary, which prints
# go test's usual output and ends with a summary listing every skipped test and its reason. The
# exit status is go test's; under CI=true a skip for a missing environment fails the run too.
# make image comes first: the release check and itest/cri_test.go build on the same tool.
test: lint image ## run every test (unit + integration with real processes), after tools/test-setup.sh; as root nothing is skipped
	bash tools/test-setup.sh
	mkdir -p bin && rm -f $(RELIABILITY_ROWS)
	$(GO) build -o bin/testsummary ./internal/testsummary/cmd/testsummary
	set -o pipefail; st=0; \
	PEERD_RELIABILITY_OUT=$(RELIABILITY_ROWS) $(GO) test -json -count=1 -timeout 30m ./... 2>&1 | bin/testsummary -save bin/test.json || st=$$?; \
	$(GO) test -json -count=1 -race -timeout 15m ./blob/ ./cache/ ./upstream/ ./httpmirror/ ./fusefs/ ./containerd/ ./p2p/ ./k8s/ ./transfer/ ./web/ ./doctor/ ./internal/browser/ 2>&1 | bin/testsummary -save bin/test-race.json || st=$$?; \
	bin/testsummary -report bin/test.json bin/test-race.json || st=$$((st ? st : 1)); \
	exit $$st

test-unit: ## fast unit tests only
	$(GO) test -count=1 -short ./...

# make fuzz: every Fuzz target of the tree (the *fuzz_test.go files), FUZZTIME each, one after another
# (go test -fuzz takes one target per run). Their seed corpora (testdata/fuzz/) already run under make test.
FUZZTIME ?= 30s
# FUZZ_FAIL=0 reports new findings (with their inputs) without failing: CI's short pass explores,
# while every input found before runs in make test as part of the seed corpora and fails there.
FUZZ_FAIL ?= 1
# Go 1.26's fuzz coordinator can report its own -fuzztime stop as a failure: when the deadline's
# Done is seen before it reaches the workers' context, the run ends with a bare "context deadline
# exceeded" and no input (golang/go#75804). A log whose only failure line is that one
# (testsummary -fuzz-stop-race) fuzzed the full FUZZTIME without a failing input, so it counts
# as ok, with a note.
FUZZ_STOP_RACE := the toolchain reported its own -fuzztime stop as a failure, golang/go\#75804; no input failed
fuzz: ## run every fuzz target for FUZZTIME each (default 30s); logs and a summary in bin/fuzz/
	@mkdir -p bin/fuzz; rm -f bin/fuzz/summary.txt; failed=""; \
	$(GO) build -o bin/testsummary ./internal/testsummary/cmd/testsummary || exit 1; \
	for f in $$(find . -name '*fuzz_test.go' -not -path './.git/*' | sort); do \
	  dir=$$(dirname $$f); \
	  for t in $$(sed -n 's/^func \(Fuzz[A-Za-z0-9_]*\)(.*/\1/p' $$f); do \
	    log=bin/fuzz/$$(basename $$dir)-$$t.log; echo "== $$dir $$t ($(FUZZTIME))"; \
	    note=""; \
	    if $(GO) test -run '^$$' -fuzz "^$${t}\$$" -fuzztime $(FUZZTIME) $$dir/ >$$log 2>&1; then r=ok; \
	    elif bin/testsummary -fuzz-stop-race $$log; then \
	      r=ok; note=" ($(FUZZ_STOP_RACE))"; \
	    else r=FAIL; failed="$$failed $$dir:$$t"; fi; \
	    echo "$$r $$dir $$t: $$(grep -E '^fuzz: elapsed' $$log | tail -1 | sed 's/^fuzz: //')$$note" | tee -a bin/fuzz/summary.txt; \
	    [ $$r = ok ] || grep -vE '^fuzz: elapsed' $$log | tail -20; \
	  done; \
	done; \
	if [ -n "$$failed" ]; then echo "fuzz failures:$$failed (the failing input is under <pkg>/testdata/fuzz/)"; \
	  for i in $$(git status --porcelain --untracked-files=all -- '*/testdata/fuzz/*' | awk '{print $$2}'); do echo "--- $$i"; cat $$i; done; \
	  [ "$(FUZZ_FAIL)" = 0 ] && echo "FUZZ_FAIL=0: reported, not failed" || exit 1; fi

# One node runs peerd as the chart's pod from the image of make image, through its containerd's CRI.
e2e: build image ## multi-node scenarios in network namespaces (root); knobs in e2e/README.md (E2E_SIZE=large: 8 nodes, 1 GiB)
	bash tools/test-setup.sh
	mkdir -p bin && PEERD_RELIABILITY_OUT=$(RELIABILITY_ROWS) E2E=1 E2E_PEERD=$(CURDIR)/$(BIN) E2E_IMAGE=$(CURDIR)/$(IMAGE_OUT) $(GO) test -count=1 -timeout 60m -v ./e2e/...

bench: build ## one table of speed, cost and scale next to same-run baselines (BENCH_QUICK=1, BENCH_CLUSTER=1; bench/README.md)
	$(GO) build -o bin/peerd-bench ./bench
	PEERD_BIN=$(CURDIR)/$(BIN) bin/peerd-bench

reliability: ## rewrite the README's Reliability table from the rows the last make test / make e2e recorded
	$(GO) run ./internal/reliability/cmd/reliability-table -rows $(RELIABILITY_ROWS) -readme README.md

lint: ## gofmt and go vet
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); if [ -n "$$out" ]; then echo "gofmt needed: $$out"; exit 1; fi
	$(GO) vet ./...

tidy: ## go mod tidy
	$(GO) mod tidy

clean: ## remove build output and make-run data
	rm -rf bin .peerd-data
