-- A charge belongs to an order that exists: the billing consumer's statement
-- fails (and goes to retry) for an event whose order is missing.
ALTER TABLE ledger
    ADD CONSTRAINT ledger_order_id_fkey FOREIGN KEY (order_id) REFERENCES orders (id);
