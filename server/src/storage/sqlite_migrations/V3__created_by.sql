-- Who created each resource (the author of its first change, when known): the bytes of the
-- resources an identity created count against its quota (limits.max_stored_bytes_per_identity).
ALTER TABLE resources ADD COLUMN created_by BLOB;
CREATE INDEX resources_created_by ON resources (created_by) WHERE created_by IS NOT NULL;
