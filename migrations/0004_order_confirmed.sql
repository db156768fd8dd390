-- The e-mail consumer now writes one notification per event: "order
-- received" (order.created) and "payment confirmed" (order.confirmed).
-- Columns with a constant default are added without rewriting the table;
-- the defaults are dropped again so every new row names its own.
ALTER TABLE notifications
    ADD COLUMN event_type text NOT NULL DEFAULT 'order.created',
    ADD COLUMN subject    text NOT NULL DEFAULT '';
ALTER TABLE notifications
    ALTER COLUMN event_type DROP DEFAULT,
    ALTER COLUMN subject DROP DEFAULT;
