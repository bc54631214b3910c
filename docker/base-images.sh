#!/usr/bin/env bash
# Builds the base images the Dockerfiles name by default from Debian packages, for engines that
# cannot pull from a registry (CI here). A real user never needs this.
#
#   docker/base-images.sh            # makes debian:bookworm-slim unless the engine has it
#   docker/base-images.sh --force    # remakes it
#
# mmdebstrap is given no mirror, so it uses this machine's own apt sources (whatever mirror or
# proxy the host is configured with); no host name is written here.
set -euo pipefail
image="${RUNTIME_IMAGE:-debian:bookworm-slim}"
suite="${DEBIAN_SUITE:-bookworm}"
force=0
[ "${1:-}" = "--force" ] && force=1

if [ "$force" = 0 ] && docker image inspect "$image" >/dev/null 2>&1; then
    echo "base-images: $image already present" >&2
    exit 0
fi
if ! command -v mmdebstrap >/dev/null; then
    echo "base-images: installing mmdebstrap (apt)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mmdebstrap >/dev/null
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "base-images: building $image from Debian $suite packages" >&2
# minbase + apt: the image can install packages like the official slim image can.
mmdebstrap --variant=minbase --include=ca-certificates --format=tar \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    "$suite" "$tmp/rootfs.tar"
docker import --change 'CMD ["bash"]' --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    "$tmp/rootfs.tar" "$image" >/dev/null
echo "base-images: $image ready" >&2
