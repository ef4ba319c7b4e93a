//! A tally of refusals since start, by the machine-readable code a client is given
//! (`Plait-Error` over HTTP: `rate-limited`, `identity-quota-exceeded`, `forbidden`, …),
//! published at `/.well-known/plait` as relays publish theirs, so an operator (and a
//! client) can see which limits bite.
//!
//! The HTTP layer counts each error response it sends (one middleware, so no handler can
//! forget), the Statebus websocket each refusal it tells a client (by the same codes), the
//! accept loop each connection it turns away (at a connection cap, or a TLS handshake that
//! failed or stalled). (Federation's refusals are logged, not yet
//! counted.) Knows nothing of what the codes mean.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Distinct codes kept; codes are the server's own words, so this is never reached in
/// practice, but a tally must not grow without bound.
const MAX_CODES: usize = 256;

#[derive(Default)]
pub struct Refusals {
    counts: Mutex<BTreeMap<String, u64>>,
}

impl Refusals {
    /// Counts one refusal with `code`.
    pub fn count(&self, code: &str) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(code) {
            *n += 1;
        } else if counts.len() < MAX_CODES {
            counts.insert(code.to_string(), 1);
        }
    }

    /// Refusals since start, by code.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_code_and_stays_bounded() {
        let r = Refusals::default();
        r.count("rate-limited");
        r.count("rate-limited");
        r.count("forbidden");
        assert_eq!(r.snapshot()["rate-limited"], 2);
        assert_eq!(r.snapshot()["forbidden"], 1);
        for i in 0..1000 {
            r.count(&format!("c{i}"));
        }
        assert_eq!(r.snapshot().len(), MAX_CODES);
        r.count("rate-limited");
        assert_eq!(r.snapshot()["rate-limited"], 3, "known codes still count");
    }
}
