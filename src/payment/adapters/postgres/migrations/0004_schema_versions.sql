-- 0004: the schema version of every stored event and outbox row (expand only).
--
-- Safe while the previous release runs (docs/operations.md, *Upgrading*): a column with
-- a constant default is added without rewriting the table (PostgreSQL 11+), and that
-- release's inserts, which do not name it, get 1, the version of every shape it writes.
-- Rows written before this migration hold 1 for the same reason.

ALTER TABLE payment_events ADD COLUMN IF NOT EXISTS schema_version integer NOT NULL DEFAULT 1;

ALTER TABLE payment_outbox ADD COLUMN IF NOT EXISTS schema_version integer NOT NULL DEFAULT 1;
