"""The spool: received instances, series state and the outbox, durable in files and SQLite."""

from edge_runtime.errors import SpoolFull
from edge_runtime.spool.rows import OutboxItem, ResultRow, ResultStage, SeriesRow, SeriesState, StoredInstance
from edge_runtime.spool.store import Spool

__all__ = ["OutboxItem", "ResultRow", "ResultStage", "SeriesRow", "SeriesState", "Spool", "SpoolFull", "StoredInstance"]
