"""PostgreSQL adapters: pool, migrations, event store, outbox, inbox, unit of work."""
