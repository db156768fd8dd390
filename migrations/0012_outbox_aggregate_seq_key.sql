-- Per-aggregate order, cheaper at the writer (issue 23; see
-- crates/outbox/src/insert.rs): a new aggregate's first rows are numbered
-- without a counter row, and a writer whose aggregate has no counter goes
-- on from the aggregate's latest row, found through this unique index,
-- which also refuses a number given twice.
--
-- Before it, a counter pruned while older rows of its aggregate were still
-- in the table (unpublished for a retention period) could start the
-- aggregate again at 1. Of rows that share a place, all but the newest
-- lose it: published without the sequence headers, a consumer applies
-- them at once, as it does any row written before numbering.
UPDATE outbox o SET seq = NULL, previous = NULL
WHERE o.seq IS NOT NULL AND EXISTS (
    SELECT 1 FROM outbox n
    WHERE n.aggregate_type = o.aggregate_type AND n.aggregate_id = o.aggregate_id
      AND n.seq = o.seq AND n.id > o.id);
CREATE UNIQUE INDEX outbox_aggregate_seq_key ON outbox (aggregate_type, aggregate_id, seq)
    WHERE seq IS NOT NULL;
