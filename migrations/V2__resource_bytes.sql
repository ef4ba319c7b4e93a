-- Bytes each resource occupies (changes, their blobs, its snapshot), kept by the same
-- transactions that change them, so a namespace's usage is one indexed SUM.
ALTER TABLE resources ADD COLUMN bytes BIGINT NOT NULL DEFAULT 0;
