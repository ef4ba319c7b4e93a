//! `plait-server`: the Plait state server as a library; `src/main.rs` is the `plait` binary.
//!
//! See ARCHITECTURE.md at the repository root for the code map.

pub mod access;
pub mod address;
pub mod backup;
pub mod braid;
pub mod cli;
pub mod config;
pub mod cpu;
pub mod doc;
pub mod engine;
pub mod federation;
pub mod http;
pub mod metrics;
pub mod mirror;
pub mod model;
pub mod p2p;
pub mod private_file;
pub mod progress;
pub mod proxy;
pub mod refusals;
pub mod schedule;
pub mod serve;
pub mod service;
pub mod statebus;
pub mod status;
pub mod storage;
pub mod update;
