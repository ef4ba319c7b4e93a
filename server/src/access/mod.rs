//! Access: who is asking, and what they may do. For now only the request signatures.

pub mod signature;
