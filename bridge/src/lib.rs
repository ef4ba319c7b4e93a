//! `plait-bridge`: the peer-to-peer side of Plait.
//!
//! * [`identity`]: ed25519 key pairs, their one text encoding, key files.
//! * [`sign`]: the one way values are signed (domain-separated JSON).
//! * [`record`]: signed, sequence-numbered address records — the DHT as DNS.
//! * [`invite`]: invite links, join requests, member certs, removals and the member set.
//! * [`mirror`]: sealed segments (age), their signed descriptors, a mirror's checks and
//!   the mirror protocol's bytes.
//! * [`types`]: what the node and its memberships share — settings, status, member
//!   listings, the join grant, errors, the [`types::Serve`] trait the server answers with.
//! * [`state`]: what a node keeps between runs, saved in order through a
//!   [`state::StateStore`].
//! * [`node`]: the libp2p node, a member of any number of named DHTs; the handle the
//!   server holds.
//! * `dht`: one membership — a swarm gated to one DHT's members at connection time, its
//!   jobs each in a module of its own (swarm, gate, records, fetch, connections, listen,
//!   relay).
//!
//! This crate knows nothing of HTTP or SQL: the server carries join requests over HTTP and
//! gives the node a directory for its state.

mod dht;
pub mod identity;
pub mod invite;
pub mod mirror;
pub mod node;
pub mod record;
pub mod sign;
pub mod state;
pub mod types;

pub use identity::{Identity, IdentityError, Keypair};
