-- Bytes values in a table with row ids (the embedded store only; Postgres keeps them in
-- a heap table already). In the WITHOUT ROWID table before, the whole row was the
-- b-tree's key, and SQLite reads a key that overflows its page whole, overflow pages and
-- all, to compare it: every step of the search for a hash read a whole value. SQLite's
-- guidance is rows under a twentieth of a page in WITHOUT ROWID tables. Now the search
-- runs on an index of the hashes alone. `size` comes before `data`, so reading it does
-- not walk the value's overflow pages.
CREATE TABLE blobs_with_rowids (
    hash BLOB    PRIMARY KEY,
    size INTEGER NOT NULL,
    data BLOB    NOT NULL
);
INSERT INTO blobs_with_rowids (hash, size, data) SELECT hash, size, data FROM blobs;
DROP TABLE blobs;
ALTER TABLE blobs_with_rowids RENAME TO blobs;
