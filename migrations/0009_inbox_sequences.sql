-- Per-aggregate order at the consumers (issue 23): for a handler that asks
-- for it, each consumer's last applied place per aggregate, and the events
-- held until their predecessor is applied (see crates/inbox/src/hold.rs).
CREATE TABLE inbox_aggregates (
    consumer        text        NOT NULL,
    aggregate_type  text        NOT NULL,
    aggregate_id    text        NOT NULL,
    last_seq        bigint      NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, aggregate_type, aggregate_id)
);
-- Pruning: a consumer's aggregates not moved on for the dedup window.
CREATE INDEX inbox_aggregates_updated_at_idx ON inbox_aggregates (consumer, updated_at);

CREATE TABLE inbox_held (
    consumer        text        NOT NULL,
    transaction_id  uuid        NOT NULL,
    aggregate_type  text        NOT NULL,
    aggregate_id    text        NOT NULL,
    seq             bigint      NOT NULL,
    -- The place of the event it waits for.
    predecessor     bigint      NOT NULL,
    event_type      text        NOT NULL,
    routing_key     text        NOT NULL,
    body            bytea       NOT NULL,
    headers         jsonb       NOT NULL DEFAULT '{}'::jsonb,
    held_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, transaction_id)
);
-- The held events of an aggregate, in sequence (release, `dlq list`).
CREATE INDEX inbox_held_aggregate_idx ON inbox_held (consumer, aggregate_type, aggregate_id, seq);
