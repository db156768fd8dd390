-- The outbox table of the `outbox` crate, as the order service's migrations
-- leave it. Copy this file into your own migrations (renaming `outbox`
-- throughout for a second table), or build it with
-- `outbox::schema::create_table("name")`.
CREATE TABLE outbox (
    id              bigserial   PRIMARY KEY,
    transaction_id  uuid        NOT NULL CONSTRAINT outbox_transaction_id_key UNIQUE,
    aggregate_type  text        NOT NULL,
    aggregate_id    text        NOT NULL,
    event_type      text        NOT NULL,
    payload         jsonb       NOT NULL,
    -- W3C trace context of the writer: traceparent, tracestate.
    headers         jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    published_at    timestamptz,
    attempts        integer     NOT NULL DEFAULT 0,
    -- 'infinity' once given up on.
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    -- With Table::with_sequences: the event's place in its aggregate's
    -- history, and for each event type the place of its latest earlier event.
    seq             bigint,
    previous        jsonb
) WITH (fillfactor = 50);
-- The relay's claim: due rows, by id.
CREATE INDEX outbox_unpublished_idx ON outbox (id) WHERE published_at IS NULL;
-- Pruning: published rows, oldest first.
CREATE INDEX outbox_published_at_idx ON outbox (published_at) WHERE published_at IS NOT NULL;
-- With Table::with_sequences: an event's place is unique in its aggregate,
-- and its latest row is where the aggregate's next writer goes on from.
CREATE UNIQUE INDEX outbox_aggregate_seq_key ON outbox (aggregate_type, aggregate_id, seq)
    WHERE seq IS NOT NULL;
-- With Table::with_sequences: the counters of the crate's versions before,
-- one per aggregate; nothing reads or writes them now (a writer holds an
-- advisory lock per aggregate: see the crate's insert module), and
-- Table::prune_counters empties the table after an upgrade.
CREATE TABLE outbox_aggregates (
    aggregate_type  text        NOT NULL,
    aggregate_id    text        NOT NULL,
    last_seq        bigint      NOT NULL,
    last_by_type    jsonb       NOT NULL DEFAULT '{}'::jsonb,
    prev_by_type    jsonb       NOT NULL DEFAULT '{}'::jsonb,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (aggregate_type, aggregate_id)
);
-- Pruning of the counters.
CREATE INDEX outbox_aggregates_updated_at_idx ON outbox_aggregates (updated_at);
-- The WAL relay's horizons: which rows its slot has passed (see the
-- crate's wal::horizons module). Unused by the polling relay.
CREATE TABLE outbox_wal_horizons (
    slot            text        NOT NULL,
    taken_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    lsn             pg_lsn      NOT NULL,
    max_id          bigint      NOT NULL,
    oldest_xid      xid8        NOT NULL,
    passed          boolean     NOT NULL DEFAULT false,
    PRIMARY KEY (slot, taken_at)
);
