# order-service: one image, every role (`run`, `api`, `relay`, `consume <email|billing>`,
# `migrate`, `dlq ...`, `outbox status`); docker-compose.yml picks the role with `command`.
#
# Build-time needs: none beyond the Rust toolchain. The crate embeds `migrations/` with
# `sqlx::migrate!("./migrations")` and uses only runtime-checked queries (`sqlx::query`, no
# `query!` macros), so no DATABASE_URL and no SQLX_OFFLINE / `.sqlx/` are needed to compile.
# TLS is rustls with the ring provider (pure Rust and assembly, built by cargo), so no OpenSSL
# and no cmake either.

# ---- builder ---------------------------------------------------------------------------------
# sqlx 0.9 requires Rust 1.94 or newer.
FROM rust:1.95-slim-bookworm AS builder
WORKDIR /app

# Dependency layer: build every dependency against dummy crates, so that editing the code does
# not rebuild them. This layer is rebuilt only when a Cargo.toml or Cargo.lock changes. The
# workspace's manifests all come in (cargo reads every member's), each member with an empty
# target; the root's benchmark target is stubbed too, or cargo refuses the manifest (`cargo
# build` does not build benchmarks, so the stub is never compiled).
COPY Cargo.toml Cargo.lock ./
COPY crates/common/Cargo.toml crates/common/
COPY crates/outbox/Cargo.toml crates/outbox/
COPY crates/inbox/Cargo.toml crates/inbox/
COPY examples/loyalty/Cargo.toml examples/loyalty/
RUN mkdir -p src benches/perf crates/common/src crates/outbox/src crates/inbox/src \
        examples/loyalty/src \
    && echo 'fn main() {}' > src/main.rs \
    && echo 'fn main() {}' > benches/perf/main.rs \
    && echo 'fn main() {}' > examples/loyalty/src/main.rs \
    && touch src/lib.rs crates/common/src/lib.rs crates/outbox/src/lib.rs crates/inbox/src/lib.rs \
    && cargo build --release --locked -p order-service \
    && rm -rf src crates examples

# The real code: the service, the core crates it depends on (with the SQL they ship) and the
# example (a member the manifest names; not built here). COPY keeps the files' original mtimes,
# which can be older than the dummy build's artifacts; touch them so cargo sees them as changed
# and rebuilds the crates.
COPY crates ./crates
COPY examples ./examples
COPY src ./src
COPY migrations ./migrations
RUN find src migrations crates examples -type f -exec touch {} + \
    && cargo build --release --locked -p order-service \
    && cp target/release/order-service /usr/local/bin/order-service

# ---- runtime ---------------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime

# ca-certificates: the system's roots, which the TLS connections to Postgres, RabbitMQ, SMTP and
# an OTLP collector trust (beside any CA file given in their settings).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin app

COPY --from=builder /usr/local/bin/order-service /usr/local/bin/order-service

USER 10001:10001
EXPOSE 3000

# The binary is the entrypoint, so `docker compose run --rm api outbox status` runs
# `order-service outbox status`. The binary handles SIGTERM itself (graceful shutdown).
ENTRYPOINT ["/usr/local/bin/order-service"]
CMD ["run"]
