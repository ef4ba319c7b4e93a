//! Domain-separated signatures over serialisable values: the one way this crate signs.
//!
//! The signed bytes are `domain || "\n" || JSON(value)`; the signature travels as
//! unpadded base64url.

use data_encoding::BASE64URL_NOPAD;
use serde::Serialize;

use crate::identity::{Identity, Keypair};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignError {
    #[error("signature is not base64url")]
    Encoding,
    #[error("bad signature")]
    Bad,
}

fn message(domain: &str, value: &impl Serialize) -> Vec<u8> {
    let mut m = domain.as_bytes().to_vec();
    m.push(b'\n');
    m.extend(serde_json::to_vec(value).expect("signed values serialize"));
    m
}

/// Signs `value` under `domain`.
pub fn sign(keys: &Keypair, domain: &str, value: &impl Serialize) -> String {
    BASE64URL_NOPAD.encode(&keys.sign(&message(domain, value)))
}

/// Checks that `sig` is `id`'s signature of `value` under `domain`.
pub fn verify(id: &Identity, domain: &str, value: &impl Serialize, sig: &str) -> Result<(), SignError> {
    let sig = BASE64URL_NOPAD
        .decode(sig.as_bytes())
        .map_err(|_| SignError::Encoding)?;
    id.verify(&message(domain, value), &sig)
        .map_err(|_| SignError::Bad)
}
