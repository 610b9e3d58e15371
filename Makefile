# cryo — build, test, demo and benchmark.
#
#   make demo    run cryo's main job on a built-in example workload
#   make test    install what is needed (Go modules, CRIU, tools) and run every test
#   make bench   checkpoint/restore benchmark against raw CRIU (BENCH_MIB=2048)
#   make fuzz    fuzz the manifest, pagemap and page-stream readers (FUZZTIME=30s each)
#
# Everything that needs installing is installed by `make deps` (root, Debian 12).

SHELL       := /bin/bash
GO          ?= go
BIN         := bin/cryo
CRIU_PREFIX := $(CURDIR)/.deps/criu
CRIU        := $(CRIU_PREFIX)/sbin/criu
STATICCHECK := $(CURDIR)/.deps/bin/staticcheck
export CRYO_CRIU ?= $(CRIU)
export GOFLAGS   ?= -buildvcs=false

.PHONY: all build deps criu tools lint test test-unit demo bench fuzz clean

all: build

build:
	$(GO) build -o $(BIN) ./cmd/cryo

$(CRIU):
	scripts/install-criu.sh $(CRIU_PREFIX)

criu: $(CRIU)

$(STATICCHECK):
	GOBIN=$(CURDIR)/.deps/bin $(GO) install honnef.co/go/tools/cmd/staticcheck@v0.6.1

tools: $(STATICCHECK)

deps: criu tools
	scripts/install-deps.sh
	$(GO) mod download

# go.mod and go.sum must be what `go mod tidy` makes of them: -diff
# prints what tidy would change and fails, changing nothing.
lint: tools
	@$(GO) mod tidy -diff || { echo "go.mod/go.sum are not tidy: run go mod tidy"; exit 1; }
	@test -z "$$(gofmt -l . | grep -v '^.deps/')" || { echo "gofmt needed:"; gofmt -l . | grep -v '^.deps/'; exit 1; }
	$(GO) vet ./...
	$(STATICCHECK) ./...

# Unit tests only: no root, no CRIU.
test-unit:
	$(GO) test -short ./...

# Every tier. As root with CRIU installed nothing may skip (CRYO_NO_SKIP=1):
# a test that cannot run fails and says why.
test: deps lint build
	scripts/run-tests.sh

demo: criu build
	scripts/demo.sh

bench: criu build
	scripts/bench.sh

# Seeds and the inputs found so far are kept in each package's
# testdata/fuzz/, which every `make test` runs; a crash found here lands
# there too.
FUZZTIME ?= 30s
fuzz:
	$(GO) test ./internal/store -run '^$$' -fuzz '^FuzzParseManifest$$' -fuzztime $(FUZZTIME)
	$(GO) test ./internal/store -run '^$$' -fuzz '^FuzzManifestFields$$' -fuzztime $(FUZZTIME)
	$(GO) test ./internal/pageserver -run '^$$' -fuzz '^FuzzParsePagemap$$' -fuzztime $(FUZZTIME)
	$(GO) test ./internal/pageserver -run '^$$' -fuzz '^FuzzReceiver$$' -fuzztime $(FUZZTIME)

clean:
	rm -rf bin
