# syntax=docker/dockerfile:1
# Multi-stage build: dependencies are compiled in their own layer, so a source change rebuilds
# only the crate itself. The runtime image is slim, has CA certificates for HTTPS IdPs, and runs
# as a non-root user.

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY config config
COPY src src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin broker
COPY --from=build /src/target/release/token-broker /usr/local/bin/token-broker
COPY config/default.toml /etc/token-broker/default.toml
# No TOKEN_BROKER__ variable here: the built-in default listen address (0.0.0.0:8080) applies,
# and a mounted configuration file's [server] listen overrides it.
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["token-broker", "healthcheck", "--url", "http://127.0.0.1:8080/livez"]
ENTRYPOINT ["token-broker"]
CMD ["serve"]
