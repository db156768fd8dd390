-- Per-aggregate order, cheaper at the consumer (issue 23; see
-- crates/inbox/src/hold.rs): the update that moves a consumer's place on
-- leaves its indexed columns as they were (updated_at moves at most once a
-- second), so it can be a heap-only (HOT) update, with no index entries
-- written, when the place's page has room: leave 30% of each new page
-- free. Pages written before keep their fill until rewritten.
ALTER TABLE inbox_aggregates SET (fillfactor = 70);
