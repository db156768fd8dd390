-- The dedup table of the `inbox` crate, as a service's migrations should
-- leave it. Copy this file into your own migrations, or run
-- `inbox::schema::SQL` from one.
CREATE TABLE processed_messages (
    consumer        text        NOT NULL,
    transaction_id  uuid        NOT NULL,
    processed_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, transaction_id)
);
-- Pruning: one consumer's rows, oldest first.
CREATE INDEX processed_messages_processed_at_idx ON processed_messages (consumer, processed_at);
-- For a handler that applies one aggregate's events in sequence
-- (Handler::in_sequence): each consumer's last applied place per aggregate,
-- and the events held until their predecessor is applied.
CREATE TABLE inbox_aggregates (
    consumer        text        NOT NULL,
    aggregate_type  text        NOT NULL,
    aggregate_id    text        NOT NULL,
    last_seq        bigint      NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    -- The place before the last transaction that locked it.
    prior_seq       bigint      NOT NULL DEFAULT 0,
    -- The consumer may hold events of the aggregate (cleared by the sweep).
    waiting         boolean     NOT NULL DEFAULT false,
    PRIMARY KEY (consumer, aggregate_type, aggregate_id)
-- Room in each page for the update that moves a place on (see the crate's
-- hold module): a HOT update, with no index entries.
) WITH (fillfactor = 70);
-- Pruning: a consumer's aggregates not written for the dedup window.
CREATE INDEX inbox_aggregates_updated_at_idx ON inbox_aggregates (consumer, updated_at);
-- The sweep's clearing of the waiting marks.
CREATE INDEX inbox_aggregates_waiting_idx ON inbox_aggregates (consumer) WHERE waiting;

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
