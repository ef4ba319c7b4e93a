-- Sealed segments (the E2EE mirror): the same table as migrations/V4__mirror_segments.sql.
CREATE TABLE mirror_segments (
    namespace  BLOB    NOT NULL,           -- 32-byte ed25519 public key
    seq        INTEGER NOT NULL,           -- 1, 2, … gap-free per namespace
    descriptor BLOB    NOT NULL,           -- the signed descriptor (188 bytes)
    ciphertext BLOB    NOT NULL,           -- age ciphertext
    PRIMARY KEY (namespace, seq)
) WITHOUT ROWID;
