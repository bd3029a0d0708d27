# walshuttle in a container: build with the Rust toolchain, run on a slim Debian.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked && strip target/release/walshuttle

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* && useradd --system --uid 10001 walshuttle
COPY --from=build /src/target/release/walshuttle /usr/local/bin/walshuttle
USER walshuttle
# Exit codes: 0 stopped on request, 75 a server down or unreachable (restart it),
# 1 needs a person (the last line says what to do), 2 usage. `run` retries servers
# that are down, start included, so a supervisor restarting only on 75 is enough.
STOPSIGNAL SIGTERM
ENTRYPOINT ["walshuttle"]
CMD ["run", "--metrics-addr", "0.0.0.0:9187"]
