# heist — one entry point for building, running and checking the cluster.
# `make demo` and `make test` are the two commands the README promises work on a fresh machine.

CARGO       ?= cargo
BINS        := coordinator worker heist-sandbox heistctl
RELEASE_DIR := target/release

.PHONY: all build demo demo-tls dev test test-deps test-unit lint fmt bench fuzz clean

all: build

## build: release binaries into bin/
build:
	$(CARGO) build --release --locked --bins
	@mkdir -p bin
	@for b in $(BINS); do install -m 0755 $(RELEASE_DIR)/$$b bin/$$b; done
	@echo "built: $(addprefix bin/,$(BINS))" >&2

## demo: a local cluster (coordinator + 2 workers), sessions spread over both, tools routed, then stop
demo: build
	bin/heistctl dev demo --workers 2

## demo-tls: the demo on TLS, with mTLS between the coordinator and the workers (a local CA is generated)
demo-tls: build
	bin/heistctl dev demo --workers 2 --tls

## dev: a local cluster that runs until Ctrl-C
dev: build
	bin/heistctl dev up --workers 2

## test-deps: the Python venv with the pinned MCP SDK the MCP tests drive (rebuilt when the pins change)
PYTHON        ?= python3
VENV_TEST     := .venv-test
MCP_TEST_REQS := coordinator/tests/mcp/requirements.txt
test-deps: $(VENV_TEST)/.installed

$(VENV_TEST)/.installed: $(MCP_TEST_REQS)
	$(PYTHON) -m venv $(VENV_TEST)
	$(VENV_TEST)/bin/pip install --quiet --disable-pip-version-check -r $(MCP_TEST_REQS)
	@touch $@

## test: the whole test suite (what CI runs)
test: test-deps
	$(CARGO) build --locked --workspace --bins
	$(CARGO) nextest run --locked --workspace --no-fail-fast

## lint: formatting and clippy, warnings denied
lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings

## fmt: format the tree
fmt:
	$(CARGO) fmt --all

## bench: routed calls and sessions against same-run baselines (see docs/BENCHMARKS.md)
bench: build
	bin/heistctl bench --json target/bench.json

## fuzz: each cargo-fuzz target (fuzz/) for FUZZ_SECONDS (default 30) on the stable toolchain
# `-s none`: no sanitizer (they need nightly), so the targets check their properties with
# assertions, and libFuzzer's coverage guidance works on stable. New inputs go to the ignored
# part of fuzz/corpus; a failing input is saved in fuzz/artifacts/<target>/.
FUZZ_SECONDS ?= 30
FUZZ_TARGETS := calc path_resolver tool_args manifest
fuzz:
	@command -v cargo-fuzz >/dev/null || { echo "fuzz: install cargo-fuzz first: cargo install --locked cargo-fuzz" >&2; exit 1; }
	$(CARGO) fuzz build -s none
	@for t in $(FUZZ_TARGETS); do \
		echo "fuzz: $$t for $(FUZZ_SECONDS) s" >&2; \
		$(CARGO) fuzz run -s none $$t -- -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 || exit 1; \
	done

clean:
	$(CARGO) clean
	rm -f $(addprefix bin/,$(BINS))

# ---- containers (docs/OPERATIONS.md, "Containers") -------------------------------------------
# `docker compose` (v2) where the engine has it, else the standalone docker-compose.
COMPOSE     ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)
COMPOSE_DEV := $(COMPOSE) -f compose.yaml -f compose.dev.yaml
.PHONY: docker-build docker-build-prebuilt docker-base docker-up docker-up-dev docker-up-multi \
        docker-down docker-down-dev docker-logs docker-logs-coordinator docker-logs-worker \
        docker-dev-dirs docker-ps docker-shell-coordinator docker-shell-worker docker-clean docker-test \
        docker-sandbox

## docker-build: coordinator and worker images compiled from source (docker/Dockerfile)
docker-build:
	$(COMPOSE) build

## docker-base: the Debian base image made locally, for engines that cannot pull (docker/base-images.sh)
docker-base:
	docker/base-images.sh

## docker-sandbox: the image the docker sandbox backend runs sessions in (docker/sandbox.Dockerfile)
SANDBOX_IMAGE ?= heist-sandbox:latest
docker-sandbox:
	docker build -q -f docker/sandbox.Dockerfile -t $(SANDBOX_IMAGE) docker/

## docker-build-prebuilt: the same images from the host's release binaries, no builder image
# DOCKER_BIN_DIR: where the binaries come from, beneath the build context (default bin/, which
# `make build` fills; docker/test.sh can stage others in target/docker-bins).
DOCKER_BIN_DIR ?= bin
docker-build-prebuilt: $(if $(filter bin,$(DOCKER_BIN_DIR)),build) docker-base docker-sandbox
	docker build -q --build-arg BIN_DIR=$(DOCKER_BIN_DIR) -f docker/prebuilt.Dockerfile --target coordinator -t heist-coordinator:latest .
	docker build -q --build-arg BIN_DIR=$(DOCKER_BIN_DIR) -f docker/prebuilt.Dockerfile --target worker -t heist-worker:latest .

## docker-up: coordinator + one worker in the background (images built if missing)
docker-up:
	$(COMPOSE) up -d

## docker-up-dev: the same services running ./bin binaries mounted read-only (make build first)
docker-up-dev: build docker-dev-dirs
	$(COMPOSE_DEV) up -d --build

# The dev overlay's workspace folder must be writable by the containers' user (uid 10001).
docker-dev-dirs:
	@mkdir -p $${HEIST_DEV_DATA:-data/docker-dev}/workspaces
	@chown 10001:10001 $${HEIST_DEV_DATA:-data/docker-dev}/workspaces 2>/dev/null \
		|| chmod 0777 $${HEIST_DEV_DATA:-data/docker-dev}/workspaces

## docker-up-multi: coordinator + three workers
docker-up-multi:
	$(COMPOSE) up -d --scale worker=3

docker-down:
	$(COMPOSE) down
docker-down-dev:
	$(COMPOSE_DEV) down
docker-logs:
	$(COMPOSE) logs -f
docker-logs-coordinator:
	$(COMPOSE) logs -f coordinator
docker-logs-worker:
	$(COMPOSE) logs -f worker
docker-ps:
	$(COMPOSE) ps
docker-shell-coordinator:
	$(COMPOSE) exec coordinator bash
docker-shell-worker:
	$(COMPOSE) exec worker bash

## docker-clean: containers, networks, volumes and images of both compose files
docker-clean:
	$(COMPOSE_DEV) down -v --remove-orphans --rmi local
	$(COMPOSE) down -v --remove-orphans --rmi local

## docker-test: compose.yaml and compose.dev.yaml driven end to end (docker/test.sh)
docker-test:
	docker/test.sh
