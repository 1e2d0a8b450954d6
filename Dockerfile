# Portcullis container image.
#
#   docker build -t portcullis:local .
#   docker run --read-only -p 127.0.0.1:3128:3128 -p 127.0.0.1:9128:9128 \
#     -v "$PWD/deploy/compose/portcullis.yaml:/etc/portcullis/portcullis.yaml:ro" portcullis:local
#
# The config lives at /etc/portcullis/portcullis.yaml (mount a file or a
# Kubernetes ConfigMap directory there; the proxy reloads it on change).
# Probes: GET http://<host>:9128/healthz (liveness), /readyz (readiness).
# The final image has no shell or curl, so probes are HTTP checks by the
# orchestrator (see deploy/), not a HEALTHCHECK command. The final stage is
# the default target; `--target redirect` builds the interception init image.

FROM rust:1-bookworm AS build
WORKDIR /src
# The whole context (see .dockerignore): Cargo.toml may name benches and
# tests, which cargo needs to see even when building only the binary.
COPY . .
# The context has no .git: pass the revision for `portcullis --version`,
#   docker build --build-arg PORTCULLIS_GIT_REV=$(git rev-parse --short=12 HEAD) .
# (without it the version says "unknown").
ARG PORTCULLIS_GIT_REV=
RUN cargo build --release --locked --bin portcullis

# The transparent-interception init image (deploy/kubernetes/transparent-sidecar,
# deploy/compose/docker-compose.transparent.yml): the shipped redirect script
# and the two netfilter front ends it can use. Build it with
#   docker build --target redirect -t portcullis-redirect:local .
# It runs once per pod as root with NET_ADMIN and NET_RAW only, then exits.
FROM debian:bookworm-slim AS redirect
# Unpinned on purpose: bookworm's stable iptables/nftables, security fixes
# included; an exact pin stops building once the archive moves on.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables nftables \
    && rm -rf /var/lib/apt/lists/*
COPY deploy/transparent/redirect.sh /usr/local/bin/redirect.sh
ENTRYPOINT ["/bin/sh", "/usr/local/bin/redirect.sh"]

# distroless/cc: glibc and libgcc only; runs as uid 65532 ("nonroot").
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/portcullis /usr/local/bin/portcullis
COPY deploy/container/portcullis.yaml /etc/portcullis/portcullis.yaml
USER 65532:65532
EXPOSE 3128 9128
# Relay buffers of 64 KiB and more are mmap'ed and given back to the kernel
# when a tunnel goes quiet (glibc otherwise raises its mmap threshold after
# the first free and keeps them in its heap): 3 KB instead of 41 KB left
# behind per tunnel after a burst, in the load bench.
ENV GLIBC_TUNABLES=glibc.malloc.mmap_threshold=65536
ENTRYPOINT ["/usr/local/bin/portcullis"]
CMD ["run", "--config", "/etc/portcullis/portcullis.yaml"]
