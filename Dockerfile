# Starcite: build the release binary, then run it on a slim Debian.
# glommio needs io_uring (Linux >= 5.8) and, as a non-root user, enough locked memory:
# run with `--ulimit memlock=-1` or keep the defaults the binary picks for non-root
# users (io_memory 1 MiB). The data directory must support O_DIRECT (ext4, xfs; not
# tmpfs or overlayfs on some kernels), so mount a volume there.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY shards ./shards
COPY bench ./bench
COPY src ./src
RUN cargo build --release --locked -p starcite -p starcite-bench

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home /var/lib/starcite starcite \
 && mkdir -p /var/lib/starcite && chown starcite /var/lib/starcite
COPY --from=build /src/target/release/starcite /usr/local/bin/starcite
COPY --from=build /src/target/release/starcite-bench /usr/local/bin/starcite-bench
USER starcite
ENV STARCITE_HTTP_ADDR=0.0.0.0:4000 \
    STARCITE_DATA_DIR=/var/lib/starcite/data
VOLUME /var/lib/starcite
EXPOSE 4000 4100
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=5s --timeout=2s --start-period=30s \
  CMD curl -fsS http://127.0.0.1:4000/health/ready || exit 1
ENTRYPOINT ["/usr/local/bin/starcite"]
CMD ["serve"]
