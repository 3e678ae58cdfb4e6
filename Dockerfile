# knock's runtime image: the `knock` binary on a slim Debian, as a non-root user, the store in a volume, the
# configuration mounted read-only, and a health check that asks knock's own /health.
#
#   docker build -t knock .                                   # builds knock from source in the Rust image
#   docker run -d --name knock \
#     -v /etc/knock:/etc/knock:ro -v knock-store:/var/lib/knock knock
#
# The configuration is /etc/knock/knock.toml; for the health check it needs `[admin] listen` (for example
# "0.0.0.0:9357"; it has no authentication, so publish that port only on loopback, if at all) and the store
# at `path = "/var/lib/knock"`. Its key and secret files can sit beside it in /etc/knock.
#
# Build arguments, for machines that cannot pull from Docker Hub (see prosody-test/docker/check):
#   BASE_IMAGE   the run-time base (default debian:bookworm-slim; bookworm's glibc, as knock is built against)
#   RUST_IMAGE   the build stage's image (default rust:1-bookworm)
#   PREBUILT     a directory of the build context that already holds a `knock` binary (e.g. target/release):
#                then nothing is compiled, and RUST_IMAGE may be any image with a shell (BASE_IMAGE itself)
ARG RUST_IMAGE=rust:1-bookworm
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
ARG PREBUILT=
WORKDIR /src
COPY . .
RUN if [ -n "$PREBUILT" ]; then \
        install -D -m 0755 "$PREBUILT/knock" /out/knock; \
    else \
        cargo build --release --locked --bin knock && install -D -m 0755 target/release/knock /out/knock; \
    fi

FROM ${BASE_IMAGE}
# A fixed uid, so a volume or bind mount can be given to it: `chown 10001 DIR`.
RUN groupadd --system --gid 10001 knock \
 && useradd --system --uid 10001 --gid knock --home-dir /var/lib/knock --no-create-home \
        --shell /usr/sbin/nologin knock \
 && install -d -o knock -g knock -m 0700 /var/lib/knock \
 && install -d -m 0755 /etc/knock
COPY --from=build /out/knock /usr/local/bin/knock
USER knock
VOLUME /var/lib/knock
# [admin] listen, if the configuration sets it there.
EXPOSE 9357
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 \
    CMD ["knock", "healthcheck", "--config", "/etc/knock/knock.toml"]
ENTRYPOINT ["knock"]
CMD ["run", "--config", "/etc/knock/knock.toml"]
