-- A charge belongs to an order that exists: the billing consumer's statement
-- fails (and goes to retry) for an event whose order is missing. Added NOT
-- VALID, so this takes its lock only briefly and checks new rows; 0003
-- checks the rows already there without blocking order writes.
ALTER TABLE ledger
    ADD CONSTRAINT ledger_order_id_fkey FOREIGN KEY (order_id) REFERENCES orders (id) NOT VALID;
