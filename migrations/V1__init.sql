-- Plait's Postgres schema, version 1. Landed migrations are never edited; add V2__*.sql.
CREATE TABLE resources (
    id          BIGSERIAL PRIMARY KEY,
    namespace   BYTEA    NOT NULL,         -- 32-byte ed25519 public key
    path        TEXT COLLATE "C" NOT NULL, -- without the leading '/'; byte order for prefix scans
    kind        SMALLINT NOT NULL,         -- 1 text, 2 json, 3 bytes
    media_type  TEXT     NOT NULL,
    head_seq    BIGINT   NOT NULL DEFAULT 0,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (namespace, path)
);

CREATE TABLE changes (
    resource_id BIGINT NOT NULL REFERENCES resources (id) ON DELETE CASCADE,
    seq         BIGINT NOT NULL,
    version     TEXT   NOT NULL,           -- Braid version id
    parents     TEXT   NOT NULL,           -- Braid parents, header form
    author      BYTEA,                     -- identity of the writer, when known
    at_ms       BIGINT NOT NULL,
    data        BYTEA  NOT NULL,           -- automerge change, or BLAKE3 hash of a blob
    meta        TEXT,                      -- bytes resources: media type
    PRIMARY KEY (resource_id, seq)
);

-- Blob hashes still in use, for collecting unused blobs.
CREATE INDEX changes_blob ON changes (data) WHERE meta IS NOT NULL;

CREATE TABLE snapshots (
    resource_id BIGINT PRIMARY KEY REFERENCES resources (id) ON DELETE CASCADE,
    upto_seq    BIGINT NOT NULL,
    data        BYTEA  NOT NULL,
    at_ms       BIGINT NOT NULL
);

CREATE TABLE blobs (
    hash BYTEA PRIMARY KEY,
    data BYTEA  NOT NULL,
    size BIGINT NOT NULL
);

CREATE TABLE settings (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
