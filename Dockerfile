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

# Dependency layer: build every dependency against a dummy crate, so that editing src/ does not
# rebuild them. This layer is rebuilt only when Cargo.toml or Cargo.lock change.
COPY Cargo.toml Cargo.lock ./
# Cargo.toml names a benchmark target (benches/perf/main.rs): stub it too, or cargo refuses
# the manifest. `cargo build` does not build benchmarks, so the stub is never compiled.
RUN mkdir -p src benches/perf \
    && echo 'fn main() {}' > src/main.rs \
    && echo 'fn main() {}' > benches/perf/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src

# The real crate. COPY keeps the files' original mtimes, which can be older than the dummy
# build's artifacts; touch them so cargo sees them as changed and rebuilds the crate.
COPY src ./src
COPY migrations ./migrations
RUN find src migrations -type f -exec touch {} + \
    && cargo build --release --locked \
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
