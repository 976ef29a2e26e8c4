"""The spool: received instances, series state and the outbox, durable in files and SQLite."""
