-- Orders, the transactional outbox, and the consumers' dedup (inbox) table.

CREATE TABLE orders (
    id          uuid        PRIMARY KEY,
    product_id  text        NOT NULL,
    user_id     text        NOT NULL,
    amount      bigint      NOT NULL CONSTRAINT orders_amount_positive CHECK (amount > 0),
    status      text        NOT NULL DEFAULT 'PENDING'
                            CONSTRAINT orders_status_known CHECK (status IN ('PENDING', 'CONFIRMED')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE outbox (
    id              bigserial   PRIMARY KEY,
    transaction_id  uuid        NOT NULL CONSTRAINT outbox_transaction_id_key UNIQUE,
    aggregate_type  text        NOT NULL,
    aggregate_id    text        NOT NULL,
    event_type      text        NOT NULL,
    payload         jsonb       NOT NULL,
    -- W3C trace context of the request that wrote the row: traceparent, tracestate.
    headers         jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    published_at    timestamptz,
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text
);

-- The relay only ever looks at unpublished rows; keep that index small.
CREATE INDEX outbox_unpublished_idx ON outbox (id) WHERE published_at IS NULL;
-- Pruning walks published rows by age.
CREATE INDEX outbox_published_at_idx ON outbox (published_at) WHERE published_at IS NOT NULL;

CREATE TABLE processed_messages (
    consumer        text        NOT NULL,
    transaction_id  uuid        NOT NULL,
    processed_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, transaction_id)
);

-- Idempotency-Key: the first request's body and answer, so a retry gets the same answer.
CREATE TABLE idempotency_keys (
    key         text        PRIMARY KEY,
    request     jsonb       NOT NULL,
    order_id    uuid        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Side effects of the consumers.
CREATE TABLE ledger (
    id              bigserial   PRIMARY KEY,
    order_id        uuid        NOT NULL,
    user_id         text        NOT NULL,
    amount          bigint      NOT NULL,
    transaction_id  uuid        NOT NULL,
    charged_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ledger_user_idx ON ledger (user_id);
CREATE INDEX ledger_order_idx ON ledger (order_id);

CREATE TABLE notifications (
    id              bigserial   PRIMARY KEY,
    order_id        uuid        NOT NULL,
    user_id         text        NOT NULL,
    channel         text        NOT NULL DEFAULT 'email',
    body            text        NOT NULL,
    transaction_id  uuid        NOT NULL,
    sent_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX notifications_order_idx ON notifications (order_id);
