//! `plait-bridge`: the peer-to-peer side of Plait.
//!
//! Today it holds identities ([`identity`]): ed25519 key pairs, their one text encoding, and
//! key files. The libp2p node, signed DHT records, invites and sealed (age) replicas will live
//! here too. This crate knows nothing of HTTP or SQL: it reaches storage only through traits
//! that the server implements.

pub mod identity;

pub use identity::{Identity, IdentityError, Keypair};
