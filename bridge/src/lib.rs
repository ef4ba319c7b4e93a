//! `plait-bridge`: the peer-to-peer side of Plait.
//!
//! * [`identity`]: ed25519 key pairs, their one text encoding, key files.
//! * [`sign`]: the one way values are signed (domain-separated JSON).
//! * [`record`]: signed, sequence-numbered address records — the DHT as DNS.
//! * [`invite`]: invite links, join requests, member certs, removals and the member set.
//! * [`mirror`]: sealed segments (age), their signed descriptors, a mirror's checks and
//!   the mirror protocol's bytes.
//! * [`node`]: the libp2p node, a member of any number of named DHTs; the handle the
//!   server holds.
//! * `dht`: one membership — a swarm (TCP, QUIC, noise, yamux, identify, ping, Kademlia with
//!   record filtering, request-response, relay, DCUtR) gated to one DHT's members at
//!   connection time.
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

pub use identity::{Identity, IdentityError, Keypair};
