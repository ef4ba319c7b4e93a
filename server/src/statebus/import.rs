//! Import of statebus stores (file_store db, sqlite cache, Postgres store).
