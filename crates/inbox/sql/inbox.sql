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
