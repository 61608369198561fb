# tally in a small image: `docker build -t tally .`, then `docker run --rm tally --help`.
# The build stage runs the same `cargo build` CI runs (librdkafka is built from source by the
# rdkafka crate: it needs make and a C compiler, which rust:bookworm has).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p tally

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --create-home --home-dir /var/lib/tally tally
COPY --from=build /src/target/release/tally /usr/local/bin/tally
USER tally
WORKDIR /var/lib/tally
# Owned by tally in the image, so the named volumes mounted on them start owned by tally too.
RUN mkdir -p /var/lib/tally/spool /var/lib/tally/archive
# POST /v1/events and `tally emit` spool here when Kafka is away: mount a volume on it.
ENV TALLY_EMITTER_SPOOL_DIR=/var/lib/tally/spool
ENTRYPOINT ["tally"]
CMD ["--help"]
