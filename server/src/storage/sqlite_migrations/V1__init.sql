-- The embedded store's schema: the same model as migrations/V1__init.sql (Postgres).
CREATE TABLE resources (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,   -- never reused: a stale id must not reach a new resource
    namespace   BLOB    NOT NULL,          -- 32-byte ed25519 public key
    path        TEXT    NOT NULL,          -- without the leading '/'
    kind        INTEGER NOT NULL,          -- 1 text, 2 json, 3 bytes
    media_type  TEXT    NOT NULL,
    head_seq    INTEGER NOT NULL DEFAULT 0,
    created_ms  INTEGER NOT NULL,
    updated_ms  INTEGER NOT NULL,
    UNIQUE (namespace, path)
);

CREATE TABLE changes (
    resource_id INTEGER NOT NULL REFERENCES resources (id) ON DELETE CASCADE,
    seq         INTEGER NOT NULL,
    version     TEXT    NOT NULL,          -- Braid version id
    parents     TEXT    NOT NULL,          -- Braid parents, header form
    author      BLOB,                      -- identity of the writer, when known
    at_ms       INTEGER NOT NULL,
    data        BLOB    NOT NULL,          -- automerge change, or BLAKE3 hash of a blob
    meta        TEXT,                      -- bytes resources: media type
    PRIMARY KEY (resource_id, seq)
) WITHOUT ROWID;

-- Blob hashes still in use, for collecting unused blobs.
CREATE INDEX changes_blob ON changes (data) WHERE meta IS NOT NULL;

CREATE TABLE snapshots (
    resource_id INTEGER PRIMARY KEY REFERENCES resources (id) ON DELETE CASCADE,
    upto_seq    INTEGER NOT NULL,
    data        BLOB    NOT NULL,
    at_ms       INTEGER NOT NULL
);

CREATE TABLE blobs (
    hash BLOB PRIMARY KEY,
    data BLOB    NOT NULL,
    size INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE settings (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
