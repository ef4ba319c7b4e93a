-- Checkpoints of the E2EE mirror: per namespace, the owner's signed checkpoint (188 bytes,
-- "segments up to upto are superseded by this snapshot") and the snapshot's age
-- ciphertext. Storing one drops the segments it supersedes; a newer one replaces it.
CREATE TABLE mirror_checkpoints (
    namespace  BYTEA  PRIMARY KEY,
    upto       BIGINT NOT NULL,
    checkpoint BYTEA  NOT NULL,
    snapshot   BYTEA  NOT NULL
);
