#!/usr/bin/env bash
# make docker-test: compose.yaml and compose.dev.yaml driven end to end from the host with heistctl.
#
# For each compose file: build the images (from the host's release binaries: docker/prebuilt.Dockerfile,
# so no registry is needed), bring the stack up with two workers, wait for healthy, run a session's
# tools and a sandboxed command, checkpoint and restore, stop one worker and show new sessions land
# on the other, restart the coordinator and show sessions persisted, then `down -v` and check that
# no container, network or volume is left.
#
# Where no Docker daemon answers it prints SKIPPED loudly and exits 0; set HEIST_REQUIRE_DOCKER=1
# (as .ci/run does where a daemon answers) to make that a failure instead.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'docker-test: %s\n' "$*" >&2; }
fail() { say "FAILED: $*"; exit 1; }

if ! docker info >/dev/null 2>&1; then
    if [ "${HEIST_REQUIRE_DOCKER:-0}" = 1 ]; then fail "no Docker daemon answers"; fi
    say "SKIPPED: no Docker daemon answers (docker info failed); nothing was tested"
    exit 0
fi
COMPOSE=${COMPOSE:-$(docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)}

# HEIST_DOCKER_BINS=<dir>: use the binaries already built there (e.g. target/debug after `make
# test`), stripped into target/docker-bins, instead of a release build into bin/.
bin_dir=bin
if [ -n "${HEIST_DOCKER_BINS:-}" ]; then
    bin_dir=target/docker-bins
    mkdir -p "$bin_dir"
    for b in coordinator worker heist-sandbox heistctl; do
        strip -o "$bin_dir/$b" "$HEIST_DOCKER_BINS/$b"
    done
fi
export HEIST_BIN_DIR="./$bin_dir"
make --no-print-directory docker-build-prebuilt DOCKER_BIN_DIR="$bin_dir" >&2

work=$(mktemp -d)
project="heisttest$$"
heistctl="$PWD/$bin_dir/heistctl"
export HEIST_JOIN_TOKEN="join-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export HEIST_ADMIN_CLIENT_SECRET="admin-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export HEIST_PORT=0 HEIST_BIND=127.0.0.1 LOG_LEVEL=info
export HEIST_CONFIG_DIR="$work/heistctl"

compose() { $COMPOSE -p "$project" "${files[@]}" "$@"; }

cleanup() {
    local rc=$?
    if [ -n "${files:-}" ]; then
        [ $rc -ne 0 ] && compose logs --tail 60 >&2 || true
        compose down -v --remove-orphans >/dev/null 2>&1 || true
    fi
    rm -rf "$work"
    exit $rc
}
trap cleanup EXIT

# Waits until every container of the project reports healthy (deadline in seconds).
wait_healthy() {
    local deadline=$((SECONDS + $1)) ids status all
    while :; do
        all=1
        ids=$(compose ps -q)
        [ -n "$ids" ] || all=0
        for id in $ids; do
            # The one-shot sandbox-image service has exited 0; everything else must be healthy.
            [ "$(docker inspect --format '{{index .Config.Labels "com.docker.compose.service"}}' "$id")" = sandbox-image ] && continue
            status=$(docker inspect --format '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$id")
            [ "$status" = healthy ] || all=0
        done
        [ $all = 1 ] && return 0
        [ $SECONDS -ge $deadline ] && fail "containers not healthy after $1 s"
        sleep 1
    done
}

# Waits until `heistctl workers ls` shows N READY workers.
wait_workers() {
    local deadline=$((SECONDS + $2)) n
    while :; do
        n=$(ctl -o json workers ls 2>/dev/null | python3 -c 'import json,sys; print(sum(1 for w in json.load(sys.stdin) if str(w.get("state","")).lower()=="ready"))' 2>/dev/null || echo 0)
        [ "$n" = "$1" ] && return 0
        [ $SECONDS -ge $deadline ] && fail "expected $1 READY workers, have $n after $2 s"
        sleep 1
    done
}

ctl() { "$heistctl" --coordinator "http://127.0.0.1:$port" "$@"; }
json_field() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }

run_scenario() {
    local name=$1
    sessions=()
    say "== $name: up with two workers"
    compose up -d --no-build --scale worker=2 >&2
    wait_healthy 120
    port=$(compose port coordinator 50051 | awk -F: '{print $NF}')
    [ -n "$port" ] || fail "coordinator port not published"
    HEIST_CLIENT_SECRET="$HEIST_ADMIN_CLIENT_SECRET" ctl login --client-id admin >/dev/null
    wait_workers 2 60

    say "$name: session, tools, sandboxed command, checkpoint and restore"
    local s1 w1 cp out
    s1=$(ctl -o json session create | json_field '["id"]')
    ctl tool call "$s1" fs.write --json '{"path":"notes.txt","content":"hello from compose"}' >/dev/null
    out=$(ctl -o json tool call "$s1" fs.read --json '{"path":"notes.txt"}')
    grep -q "hello from compose" <<<"$out" || fail "fs.read did not return what fs.write wrote: $out"
    # Commands run in the session's own container (the docker backend through the engine
    # gate), as a non-root user, with no network.
    out=$(ctl exec "$s1" -- sh -c 'cat notes.txt; echo; id -u; cat /sys/class/net/*/operstate 2>/dev/null | wc -l' 2>&1) \
        || fail "exec failed: $out"
    grep -q "hello from compose" <<<"$out" || fail "exec did not see the workspace: $out"
    [ "$(sed -n 2p <<<"$out")" != 0 ] || fail "the command ran as root: $out"
    [ -n "$(docker ps -q --filter "label=io.heist.session=$s1")" ] \
        || fail "no container runs session $s1"
    sessions+=("$s1")
    cp=$(ctl -o json checkpoint create "$s1" | json_field '["id"]')
    ctl tool call "$s1" fs.write --json '{"path":"notes.txt","content":"changed"}' >/dev/null
    ctl checkpoint restore "$cp" >/dev/null
    out=$(ctl -o json tool call "$s1" fs.read --json '{"path":"notes.txt"}')
    grep -q "hello from compose" <<<"$out" || fail "restore did not bring the checkpoint back: $out"

    say "$name: stop one worker; new sessions land on the other"
    w1=$(ctl -o json session show "$s1" | json_field '["worker_id"]')
    local victim
    # (`if`, not `&&`: a loop whose last test is false would fail the pipeline under pipefail.)
    victim=$(compose ps -q worker | while read -r id; do
        if [ "$(docker inspect --format '{{.Config.Hostname}}' "$id")" = "$w1" ]; then echo "$id"; fi
    done)
    [ -n "$victim" ] || fail "no container is worker $w1"
    docker stop "$victim" >/dev/null
    wait_workers 1 60
    for _ in 1 2 3; do
        local s w
        s=$(ctl -o json session create | json_field '["id"]')
        w=$(ctl -o json session show "$s" | json_field '["worker_id"]')
        [ "$w" != "$w1" ] || fail "session $s was placed on the stopped worker $w1"
    done
    docker start "$victim" >/dev/null

    say "$name: restart the coordinator; sessions persist"
    local before after
    before=$(ctl -o json session ls | json_field '.__len__()' 2>/dev/null || ctl -o json session ls | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
    compose restart coordinator >&2
    wait_healthy 120
    port=$(compose port coordinator 50051 | awk -F: '{print $NF}')
    HEIST_CLIENT_SECRET="$HEIST_ADMIN_CLIENT_SECRET" ctl login --client-id admin >/dev/null
    after=$(ctl -o json session ls | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
    [ "$before" = "$after" ] || fail "sessions before the restart: $before, after: $after"
    ctl -o json session show "$s1" >/dev/null || fail "session $s1 is gone after the restart"

    say "$name: down -v leaves nothing behind"
    compose down -v --remove-orphans >&2
    local left
    left=$(docker ps -aq --filter "label=com.docker.compose.project=$project"; \
           docker network ls -q --filter "label=com.docker.compose.project=$project"; \
           docker volume ls -q --filter "label=com.docker.compose.project=$project")
    [ -z "$left" ] || fail "left behind after down -v: $left"
    for s in "${sessions[@]}"; do
        left=$(docker ps -aq --filter "label=io.heist.session=$s")
        [ -z "$left" ] || fail "session $s's container outlived the stack: $left"
    done
    say "$name: passed"
}

files=(-f compose.yaml)
run_scenario compose.yaml
files=(-f compose.yaml -f compose.dev.yaml)
export HEIST_DEV_DATA="$work/dev"
make --no-print-directory docker-dev-dirs >&2
compose build >&2
run_scenario compose.dev.yaml
files=()
say "2 passed, 0 failed"
