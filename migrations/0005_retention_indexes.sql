-- Indexes that keep the pruning of the dedup rows and of the idempotency
-- keys a range scan. Not CONCURRENTLY: every role applies migrations at start
-- under sqlx's advisory lock, and a concurrent build waits for the other
-- roles' sessions waiting on that lock, a deadlock. On a large existing
-- table, build them by hand first with CREATE INDEX CONCURRENTLY and these
-- names (docs/operations.md); IF NOT EXISTS then makes this a no-op.
CREATE INDEX IF NOT EXISTS processed_messages_processed_at_idx
    ON processed_messages (consumer, processed_at);
CREATE INDEX IF NOT EXISTS idempotency_keys_created_at_idx
    ON idempotency_keys (created_at);
