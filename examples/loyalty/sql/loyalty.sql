-- The loyalty service's own tables, beside the core's outbox and dedup
-- tables.

-- Every award as it was given: the writer's change, committed with its
-- `points.awarded` outbox row.
CREATE TABLE awards (
    award_id    uuid        PRIMARY KEY,
    user_id     text        NOT NULL,
    points      bigint      NOT NULL,
    awarded_at  timestamptz NOT NULL DEFAULT now()
);

-- The consumer's side effect. No award id here: only the inbox's dedup
-- rows stand between a redelivered award and a doubled balance.
CREATE TABLE balances (
    user_id     text        PRIMARY KEY,
    points      bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
