-- Per-aggregate order (issue 23): each event's place in its aggregate's
-- history, numbered in the writing transaction through a counter per
-- aggregate (see crates/outbox/src/insert.rs).
--
-- Nullable columns without a default: adding them rewrites nothing and
-- takes only a brief lock. Rows written before have no number, and are
-- published without the sequence headers (a consumer applies them at once).
ALTER TABLE outbox ADD COLUMN seq bigint, ADD COLUMN previous jsonb;
-- The mails' outbox has the same columns, so that one claim reads both;
-- its rows are not numbered (the mailer keeps an aggregate's order by id).
ALTER TABLE mail_outbox ADD COLUMN seq bigint, ADD COLUMN previous jsonb;

CREATE TABLE outbox_aggregates (
    aggregate_type  text        NOT NULL,
    aggregate_id    text        NOT NULL,
    -- The last number given to an event of the aggregate.
    last_seq        bigint      NOT NULL,
    -- For each event type, the number of its latest event.
    last_by_type    jsonb       NOT NULL DEFAULT '{}'::jsonb,
    -- last_by_type before the last write, for that write's first event.
    prev_by_type    jsonb       NOT NULL DEFAULT '{}'::jsonb,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (aggregate_type, aggregate_id)
);
-- Pruning: aggregates not written to for a retention period.
CREATE INDEX outbox_aggregates_updated_at_idx ON outbox_aggregates (updated_at);

-- The mailer hands one order's mails over in their order: its claim skips a
-- mail while an earlier one of the same order is pending, found here.
CREATE INDEX mail_outbox_aggregate_pending_idx ON mail_outbox (aggregate_type, aggregate_id, id)
    WHERE published_at IS NULL AND next_attempt_at < 'infinity';
