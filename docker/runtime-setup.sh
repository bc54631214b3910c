#!/bin/sh
# Shared by docker/Dockerfile and docker/prebuilt.Dockerfile: the runtime layer of both images.
#   runtime-setup.sh coordinator|worker
# Installs tini (PID 1: forwards signals, reaps children), CA certificates, and for the worker
# Python 3 and the tools commands commonly use; creates the non-root user `heist` (uid and gid
# 10001: the engine gate's socket is group 10001) and its data directories, mode 0700.
set -eu
role="$1"
packages="tini ca-certificates"
if [ "$role" = worker ]; then
    packages="$packages python3 coreutils findutils grep sed gawk procps util-linux e2fsprogs"
fi
apt-get update
# shellcheck disable=SC2086
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $packages
rm -rf /var/lib/apt/lists/*
groupadd --system --gid 10001 heist
useradd --system --uid 10001 --gid heist --home-dir /var/lib/heist --create-home heist
install -d -m 0700 -o heist -g heist /var/lib/heist/data /var/lib/heist/workspaces
