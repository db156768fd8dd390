SELECT nextval('agg_seq') * 16 AS base \gset
BEGIN;
INSERT INTO outbox (transaction_id, aggregate_type, aggregate_id, event_type, payload, headers) SELECT * FROM unnest((ARRAY(SELECT gen_random_uuid() FROM generate_series(1,16))::uuid[]), (array_fill('order'::text, ARRAY[16])), (ARRAY(SELECT 'o-' || lpad((:base + g)::text, 9, '0') FROM generate_series(1,16) g)), (array_fill('order.confirmed'::text, ARRAY[16])), (array_fill('{"amount": 12, "ledger_id": 5}'::jsonb, ARRAY[16])), (array_fill('{}'::jsonb, ARRAY[16])));
COMMIT;
