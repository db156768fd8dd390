-- Per-aggregate order, cheaper at the writer (issue 23; see
-- crates/outbox/src/insert.rs): a new aggregate's first rows are numbered
-- without a counter row, and a writer whose aggregate has no counter goes
-- on from the aggregate's latest row, found through this unique index,
-- which also refuses a number given twice. Writers of the version before
-- number such an aggregate's next event 1 again, and are refused: replace
-- the roles that write later events before the api (docs/operations.md,
-- "A rolling deploy across versions").
--
-- Before it, a counter pruned while older rows of its aggregate were
-- still in the table could start the aggregate again at 1. Such rows of
-- the old numbering lose their place: those that share it with a newer
-- row, and those past their aggregate's counter, which a writer would
-- reach and be refused at. Published without the sequence headers, a
-- consumer applies them at once, as it does any row written before
-- numbering. The table is locked against writers from the clean-up to the
-- index (the index build would lock them out anyway).
LOCK TABLE outbox IN SHARE MODE;
UPDATE outbox o SET seq = NULL, previous = NULL
WHERE o.seq IS NOT NULL AND EXISTS (
    SELECT 1 FROM outbox n
    WHERE n.aggregate_type = o.aggregate_type AND n.aggregate_id = o.aggregate_id
      AND n.seq = o.seq AND n.id > o.id);
UPDATE outbox o SET seq = NULL, previous = NULL
FROM outbox_aggregates a
WHERE a.aggregate_type = o.aggregate_type AND a.aggregate_id = o.aggregate_id
  AND o.seq > a.last_seq;
-- IF NOT EXISTS: on a large table, build it beforehand, online
-- (docs/operations.md); this then does nothing.
CREATE UNIQUE INDEX IF NOT EXISTS outbox_aggregate_seq_key
    ON outbox (aggregate_type, aggregate_id, seq) WHERE seq IS NOT NULL;
