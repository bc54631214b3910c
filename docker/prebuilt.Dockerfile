# The coordinator and worker images from binaries already built on the host (`make build` puts
# them in bin/): no builder stage and no Rust image, for engines that cannot pull one. The
# runtime layers are the same as docker/Dockerfile's (docker/runtime-setup.sh).
#
#   make build && docker build -f docker/prebuilt.Dockerfile --target worker -t heist-worker .
#
# The host's glibc must not be newer than the runtime image's (both Debian bookworm here).
ARG RUNTIME_IMAGE=debian:bookworm-slim

# ---- runtime layers (no binaries): also what compose.dev.yaml mounts ./bin into -------------
FROM ${RUNTIME_IMAGE} AS coordinator-runtime
COPY docker/runtime-setup.sh /tmp/runtime-setup.sh
RUN /tmp/runtime-setup.sh coordinator && rm /tmp/runtime-setup.sh
USER heist
WORKDIR /var/lib/heist
ENV HEIST_DATA_DIR=/var/lib/heist/data GRPC_PORT=50051
EXPOSE 50051
STOPSIGNAL SIGTERM

FROM ${RUNTIME_IMAGE} AS worker-runtime
COPY docker/runtime-setup.sh /tmp/runtime-setup.sh
RUN /tmp/runtime-setup.sh worker && rm /tmp/runtime-setup.sh
USER heist
WORKDIR /var/lib/heist
ENV BASE_WORKSPACE=/var/lib/heist/workspaces GRPC_PORT=50052
EXPOSE 50052
STOPSIGNAL SIGTERM

# ---- the images ----------------------------------------------------------------------------
FROM coordinator-runtime AS coordinator
# Where the binaries are in the build context (bin/ from `make build`).
ARG BIN_DIR=bin
COPY ${BIN_DIR}/coordinator ${BIN_DIR}/heistctl /usr/local/bin/
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 CMD ["coordinator", "healthcheck"]
ENTRYPOINT ["tini", "--", "coordinator"]

FROM worker-runtime AS worker
ARG BIN_DIR=bin
COPY ${BIN_DIR}/worker ${BIN_DIR}/heist-sandbox /usr/local/bin/
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 CMD ["worker", "healthcheck"]
ENTRYPOINT ["tini", "--", "worker"]
