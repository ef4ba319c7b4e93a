-- Bytes each resource occupies (changes, their blobs, its snapshot); see migrations/V2.
ALTER TABLE resources ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0;
