-- Checkpoints of the E2EE mirror: the same table as migrations/V5__mirror_checkpoints.sql.
CREATE TABLE mirror_checkpoints (
    namespace  BLOB    PRIMARY KEY,        -- 32-byte ed25519 public key
    upto       INTEGER NOT NULL,           -- the last segment superseded
    checkpoint BLOB    NOT NULL,           -- the signed checkpoint (188 bytes)
    snapshot   BLOB    NOT NULL            -- age ciphertext of the snapshot
) WITHOUT ROWID;
