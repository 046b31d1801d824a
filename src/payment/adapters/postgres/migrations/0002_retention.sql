-- 0002: indexes for the retention job (adapters/postgres/retention.py).
-- IF NOT EXISTS: on a large table an operator may build them CONCURRENTLY beforehand
-- (a plain CREATE INDEX blocks writes while it builds).

-- Published outbox rows in publication order: the purge takes the oldest first and never
-- scans unpublished rows (they are not in this index). Publication already rewrites every
-- index entry of the row (published_at is in the partial index's predicate, so the update
-- is never HOT): one more entry per published row.
CREATE INDEX IF NOT EXISTS payment_outbox_published_at_idx
    ON payment_outbox (published_at)
    WHERE published_at IS NOT NULL;

-- Inbox marks by age, for the same reason.
CREATE INDEX IF NOT EXISTS payment_inbox_received_at_idx ON payment_inbox (received_at);
