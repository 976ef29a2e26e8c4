"""The spool index's tables, and the steps that bring an older index to this version in place.

``PRAGMA user_version`` holds the version; :class:`edge_runtime.spool.store.Spool` migrates an older index when it
opens it, and refuses one newer than it knows.
"""

SCHEMA_VERSION = 2
#: each older schema version's step to the next (the index is migrated in place when it is opened)
MIGRATIONS = {
    # 1 -> 2: results gain their publishing stage; every result of version 1 was published in one step
    1: "ALTER TABLE results ADD COLUMN stage TEXT NOT NULL DEFAULT 'complete'",
}
SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    id INTEGER PRIMARY KEY,
    called_ae TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    modality TEXT NOT NULL DEFAULT '',
    key_hash TEXT NOT NULL,
    state TEXT NOT NULL,
    generation INTEGER NOT NULL DEFAULT 0,
    instance_count INTEGER NOT NULL DEFAULT 0,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    reason TEXT,
    updated REAL NOT NULL,
    UNIQUE (called_ae, study_uid, series_uid)
);
CREATE INDEX IF NOT EXISTS series_state ON series (state, last_received);
CREATE TABLE IF NOT EXISTS instances (
    id INTEGER PRIMARY KEY,
    series_id INTEGER NOT NULL REFERENCES series (id),
    sop_uid TEXT NOT NULL,
    sop_class TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    calling_ae TEXT NOT NULL,
    received REAL NOT NULL,
    geometry TEXT,
    UNIQUE (series_id, sop_uid)
);
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY,
    series_id INTEGER NOT NULL REFERENCES series (id),
    generation INTEGER NOT NULL,
    model TEXT NOT NULL,
    directory TEXT NOT NULL,
    created REAL NOT NULL,
    timings TEXT NOT NULL DEFAULT '{}',
    stage TEXT NOT NULL DEFAULT 'complete'
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    result_id INTEGER NOT NULL REFERENCES results (id),
    path TEXT NOT NULL,
    destination TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    last_error TEXT,
    sent REAL
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (state, next_attempt);
CREATE TABLE IF NOT EXISTS studies (
    id INTEGER PRIMARY KEY,
    called_ae TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    key_hash TEXT NOT NULL,
    state TEXT NOT NULL,
    updated REAL NOT NULL,
    reason TEXT,
    inputs TEXT,
    UNIQUE (called_ae, study_uid)
);
"""
