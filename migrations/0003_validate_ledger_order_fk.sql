-- Checks the ledger rows written before 0002. Its own migration, so its own
-- transaction: VALIDATE takes only locks that let orders and charges be
-- written while it scans.
ALTER TABLE ledger VALIDATE CONSTRAINT ledger_order_id_fkey;
