-- no-transaction
-- Indexes that keep the pruning of the dedup rows and the idempotency keys a
-- range scan. Built CONCURRENTLY (outside a transaction, hence the line
-- above), so an existing database keeps taking orders and messages meanwhile.
CREATE INDEX CONCURRENTLY IF NOT EXISTS processed_messages_processed_at_idx
    ON processed_messages (consumer, processed_at);
CREATE INDEX CONCURRENTLY IF NOT EXISTS idempotency_keys_created_at_idx
    ON idempotency_keys (created_at);
