# The image the docker sandbox backend runs each session in (HEIST_SANDBOX_IMAGE): Python 3,
# the tools commands commonly use, and a non-root user. The worker runs every container with a
# read-only root, a tmpfs /tmp, no capabilities, no-new-privileges, the session's workspace at
# /workspace and (by default) no network; the user it runs as is chosen by the worker
# (HEIST_SANDBOX_UID when the worker is root), `sandbox` (uid 10002) is the image's default.
#
#   docker build -f docker/sandbox.Dockerfile -t heist-sandbox:latest .    # make docker-sandbox
#
# The base image is a build arg with a standard default, so any engine that can pull builds this
# unchanged; where none can, docker/base-images.sh makes it locally.
ARG SANDBOX_BASE_IMAGE=debian:bookworm-slim
FROM ${SANDBOX_BASE_IMAGE}
# prlimit (util-linux) applies the per-command rlimits; procps for ps/kill; the rest is what
# commands and scripts usually expect.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 ca-certificates coreutils findutils grep sed gawk diffutils patch \
        procps util-linux file less jq sqlite3 xz-utils bzip2 gzip tar unzip \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10002 --user-group --home-dir /workspace --no-create-home --shell /bin/sh sandbox \
    && install -d -m 0755 /workspace /heist/in
USER sandbox
WORKDIR /workspace
ENV HOME=/workspace TMPDIR=/tmp LANG=C.UTF-8 PYTHONUNBUFFERED=1
CMD ["sleep", "infinity"]
