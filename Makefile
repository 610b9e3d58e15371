# cryo — build, test, demo and benchmark.
#
#   make demo    run cryo's main job on a built-in example workload
#   make test    install what is needed (Go modules, CRIU, tools) and run every test
#   make bench   checkpoint/restore benchmark against raw CRIU (BENCH_MIB=2048)
#   make fuzz    fuzz the manifest, pagemap and page-stream readers (FUZZTIME=30s each)
#   make install cryo into PREFIX/bin, and its CRIU (with cap_checkpoint_restore,
#                so users checkpoint their own jobs) into PREFIX/lib/cryo/criu
#
# Everything that needs installing is installed by `make deps` (root, Debian 12).
# CRIU goes where `make install` puts it, outside the checkout: users run it,
# and its file capability is safe only in directories root alone can change.

SHELL       := /bin/bash
GO          ?= go
BIN         := bin/cryo
PREFIX      ?= /usr/local
CRIU_PREFIX ?= $(PREFIX)/lib/cryo/criu
CRIU        := $(CRIU_PREFIX)/sbin/criu
STATICCHECK := $(CURDIR)/.deps/bin/staticcheck
export CRYO_CRIU ?= $(CRIU)
export GOFLAGS   ?= -buildvcs=false

.PHONY: all build deps criu tools lint test test-unit test-user demo bench fuzz install clean

all: build

build:
	$(GO) build -o $(BIN) ./cmd/cryo

# Rebuilt when cryo's CRIU patches or the script change (the script itself
# finds an up-to-date binary and stops at once).
$(CRIU): scripts/install-criu.sh $(wildcard scripts/criu-patches/*.patch)
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

# The unprivileged user the user-mode tier runs cryo as (created if missing).
test-user:
	scripts/test-user.sh

# Every tier. As root with CRIU installed nothing may skip (CRYO_NO_SKIP=1):
# a test that cannot run fails and says why. The user-mode tier runs cryo as
# the test user.
test: deps test-user lint build
	scripts/run-tests.sh

demo: criu build test-user
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

install: build criu
	install -D -m 0755 $(BIN) $(DESTDIR)$(PREFIX)/bin/cryo

clean:
	rm -rf bin
