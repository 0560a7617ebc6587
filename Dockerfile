# rds-iam-proxy container image: build stage with the Rust toolchain, small
# Debian runtime with only the binary, CA roots for the AWS APIs, and a
# non-root user.
#
#   docker build -t rds-iam-proxy .
#   docker run --rm rds-iam-proxy --help

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY certs ./certs
RUN cargo build --release --locked \
    && cp target/release/rds-iam-proxy /rds-iam-proxy \
    && strip /rds-iam-proxy

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/rds-iam-proxy --create-home proxy
COPY --from=build /rds-iam-proxy /usr/local/bin/rds-iam-proxy
USER 10001
# The generated local CA (when no --tls-cert is given) lives here; mount a
# volume to keep it across restarts.
ENV RDS_IAM_PROXY_STATE_DIR=/var/lib/rds-iam-proxy
ENTRYPOINT ["/usr/local/bin/rds-iam-proxy"]
