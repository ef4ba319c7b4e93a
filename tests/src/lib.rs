//! Support for the workspace tests in `tests/tests/`: a throwaway Postgres cluster
//! ([`pg`]) and real `plait` processes ([`plait`]). Nothing here is a stand-in: tests talk
//! to a real server binary over real sockets, backed by a real database.

pub mod netns;
pub mod node;
pub mod pg;
pub mod plait;
pub mod upstream;
pub mod wire;
