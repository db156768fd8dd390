-- The WAL relay (issue 24, RELAY_MODE=wal): the horizons that say which
-- rows its slot has passed, for retention and for recovering a lost slot
-- (see crates/outbox/src/wal/horizons.rs). The publication, the slot and
-- published_at's default are made by the relay at its start, and only in
-- that mode: a database that never runs it has none of them.
CREATE TABLE outbox_wal_horizons (
    slot            text        NOT NULL,
    taken_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- The WAL insert position when it was taken.
    lsn             pg_lsn      NOT NULL,
    -- The largest committed id then.
    max_id          bigint      NOT NULL,
    -- The oldest transaction then running: older ones had committed before lsn.
    oldest_xid      xid8        NOT NULL,
    -- The slot's confirmed position has reached lsn.
    passed          boolean     NOT NULL DEFAULT false,
    PRIMARY KEY (slot, taken_at)
);
