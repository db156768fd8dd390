-- Per-aggregate order at the consumers in one statement a transaction
-- (issue 23; see crates/inbox/src/hold.rs): the upsert that locks a
-- consumer's place also reads and moves it on. It keeps the place it found
-- in prior_seq, so the consumer can tell which events it applied, and
-- marks the place waiting when it holds an event, so the commit that moves
-- the place on knows to release held events (the sweep clears the mark
-- once none is held).
ALTER TABLE inbox_aggregates
    ADD COLUMN prior_seq bigint  NOT NULL DEFAULT 0,
    ADD COLUMN waiting   boolean NOT NULL DEFAULT false;
UPDATE inbox_aggregates a SET waiting = true
WHERE EXISTS (SELECT 1 FROM inbox_held h WHERE h.consumer = a.consumer
    AND h.aggregate_type = a.aggregate_type AND h.aggregate_id = a.aggregate_id);
-- The sweep's clearing of the marks.
CREATE INDEX inbox_aggregates_waiting_idx ON inbox_aggregates (consumer) WHERE waiting;
