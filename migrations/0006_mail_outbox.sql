-- The mails' outbox: one row per e-mail, written by the e-mail consumer in
-- its dedup transaction and sent over SMTP by the mailer. The same columns as
-- the events' outbox, so the same claims, attempts, backoff and last_error
-- serve both; transaction_id is the event's id and becomes the Message-ID.
CREATE TABLE mail_outbox (
    id              bigserial   PRIMARY KEY,
    transaction_id  uuid        NOT NULL CONSTRAINT mail_outbox_transaction_id_key UNIQUE,
    aggregate_type  text        NOT NULL,
    aggregate_id    text        NOT NULL,
    event_type      text        NOT NULL,
    -- {"to", "subject", "body"}
    payload         jsonb       NOT NULL,
    headers         jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- When the SMTP server accepted the mail.
    published_at    timestamptz,
    attempts        integer     NOT NULL DEFAULT 0,
    -- 'infinity' once refused for good (a 5xx).
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text
);
-- Given-up mails ('infinity') stay for an operator but out of the claims' way.
CREATE INDEX mail_outbox_unpublished_idx ON mail_outbox (id)
    WHERE published_at IS NULL AND next_attempt_at < 'infinity';
CREATE INDEX mail_outbox_published_at_idx ON mail_outbox (published_at) WHERE published_at IS NOT NULL;
