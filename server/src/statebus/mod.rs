//! Statebus compatibility: the websocket protocol (v7 and v6 dialects), accounts and
//! `current_user`, permissions, and import of statebus stores.
//!
//! [`keys`] classifies Statebus keys; [`wire`] is the message codec (the only place that
//! knows Statebus frames); [`access`] decides where a key lives and who may read or write
//! it, for the websocket and for Braid-HTTP alike; [`session`] serves one websocket;
//! [`import`] loads a statebus server's store. State itself is the engine's: a Statebus key
//! is a JSON resource, so websocket and Braid-HTTP clients see each other's writes live.

pub mod access;
pub mod import;
pub mod keys;
pub mod session;
pub mod wire;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::access::Access;
use crate::config::Limits;
use crate::engine::Engine;
use plait_bridge::Identity;

/// What a Statebus connection needs from the rest of the server, and nothing more: it does
/// not know about the proxy, static files, the p2p node or how HTTP is routed.
#[derive(Clone)]
pub struct Services {
    pub engine: Engine,
    /// The instance's identity: whose namespace `/` is.
    pub identity: Identity,
    pub access: Access,
    pub limits: Arc<Limits>,
    /// Cancelled when the server shuts down; open connections close on it.
    pub shutdown: CancellationToken,
    /// Where each refusal told to a client is tallied.
    pub refusals: Arc<crate::refusals::Refusals>,
}
