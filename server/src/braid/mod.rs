//! The Braid-HTTP wire codec: the one place that knows Braid's bytes.
//!
//! [`headers`] turns request headers into [`BraidHeaders`]; [`patch`] turns PUT bodies into
//! typed patches; [`frame`] writes [`crate::update::Update`]s as subscription update blocks.
//! Nothing here touches storage or documents; nothing past here sees a raw Braid header.

pub mod frame;
pub mod headers;
pub mod patch;

#[cfg(test)]
mod robustness;

pub use headers::{BraidHeaders, MergeType, format_version, parse_version};

/// A request the codec cannot read. Every variant is the client's doing (HTTP 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BraidError {
    #[error("{name} header {why}")]
    Header { name: &'static str, why: String },
    #[error("{0}")]
    MergeType(String),
    #[error("{0}")]
    Patch(String),
    #[error("{0}")]
    Range(String),
}

impl BraidError {
    pub(crate) fn header(name: &'static str, why: &str) -> Self {
        BraidError::Header {
            name,
            why: why.to_string(),
        }
    }
}
