-- The e-mail consumer now writes one notification per event: "order
-- received" (order.created) and "payment confirmed" (order.confirmed).
-- Columns with a constant default are added without rewriting the table.
-- The defaults stay: an e-mail consumer of the release before, still running
-- during a rolling deploy, inserts without these columns and must not fail.
ALTER TABLE notifications
    ADD COLUMN event_type text NOT NULL DEFAULT 'order.created',
    ADD COLUMN subject    text NOT NULL DEFAULT '';
