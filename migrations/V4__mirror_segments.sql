-- Sealed segments (the E2EE mirror): a mirror keeps those of the namespaces it has granted
-- storage to, an owner its own until its mirrors have them. Opaque here: the descriptor's
-- 188 bytes and the age ciphertext, checked by the server before they land. One gap-free
-- chain per namespace, numbered from 1.
CREATE TABLE mirror_segments (
    namespace  BYTEA  NOT NULL,
    seq        BIGINT NOT NULL,
    descriptor BYTEA  NOT NULL,
    ciphertext BYTEA  NOT NULL,
    PRIMARY KEY (namespace, seq)
);
