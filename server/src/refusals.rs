//! A tally of refusals since start, by the machine-readable code a client is given
//! (`Plait-Error` over HTTP: `rate-limited`, `identity-quota-exceeded`, `forbidden`, …),
//! published at `/.well-known/plait` as relays publish theirs, so an operator (and a
//! client) can see which limits bite.
//!
//! The HTTP layer counts each error response it sends (one middleware, so no handler can
//! forget), the Statebus websocket each refusal it tells a client (by the same codes), the
//! accept loop each connection it turns away (at a connection cap, or a TLS handshake that
//! failed or stalled). (Federation's refusals are logged, not yet counted.) The same tally
//! is published as `plait_refusals_total` by `metrics`. Knows nothing of what the codes
//! mean.
//!
//! The last [`RECENT_KEPT`] refusals are kept too, with their reasons, for the owner's
//! dashboard ([`Refusals::recent`]).
//!
//! **Logs.** Each refusal is logged here, once, with its reason: at `debug` every one
//! (with who and what); at `info` the first of each code in a minute, with how many of
//! that code went unlogged at `info` since. A client hammering a limit cannot flood the
//! log at the default level, yet an operator sees every kind of refusal as it starts.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Distinct codes kept; codes are the server's own words, so this is never reached in
/// practice, but a tally must not grow without bound.
const MAX_CODES: usize = 256;
/// At most one `info` line per code this often.
const INFO_EVERY: Duration = Duration::from_secs(60);

/// Refusals kept, newest last, for the dashboard.
pub const RECENT_KEPT: usize = 50;

#[derive(Default)]
pub struct Refusals {
    counts: Mutex<BTreeMap<String, Tally>>,
    recent: Mutex<VecDeque<Recent>>,
}

/// One recent refusal.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Recent {
    /// Unix time, in milliseconds.
    pub at_ms: u64,
    pub code: String,
    pub reason: String,
    pub client: Option<IpAddr>,
    /// What was asked ("PUT /notes (403)", "a connection").
    pub what: String,
}

#[derive(Default)]
struct Tally {
    count: u64,
    /// When this code was last logged at `info`.
    logged: Option<Instant>,
    /// Refusals of this code since then, not logged at `info`.
    since: u64,
}

/// The reason an HTTP error response gives (its body's text), carried as a response
/// extension so the counting middleware can log it without reading the body.
#[derive(Debug, Clone)]
pub struct Reason(pub String);

impl Refusals {
    /// Counts and logs one refusal: its `code` (`Plait-Error`), the `reason` the client
    /// was told, the client's address when known, and what it asked (`what`: "PUT /notes",
    /// "a connection", ...).
    pub fn count(&self, code: &str, reason: &str, client: Option<IpAddr>, what: fmt::Arguments<'_>) {
        tracing::debug!(code, reason, client = ?client, "refused {what}");
        {
            let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            if recent.len() >= RECENT_KEPT {
                recent.pop_front();
            }
            recent.push_back(Recent {
                at_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
                code: code.chars().take(64).collect(),
                reason: reason.chars().take(300).collect(),
                client,
                what: what.to_string().chars().take(300).collect(),
            });
        }
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if !counts.contains_key(code) {
            if counts.len() >= MAX_CODES {
                return;
            }
            counts.insert(code.to_string(), Tally::default());
        }
        let Some(tally) = counts.get_mut(code) else {
            return;
        };
        tally.count += 1;
        let now = Instant::now();
        if tally.logged.is_some_and(|at| now.duration_since(at) < INFO_EVERY) {
            tally.since += 1;
            return;
        }
        let unlogged = std::mem::take(&mut tally.since);
        tally.logged = Some(now);
        drop(counts);
        tracing::info!(
            code,
            reason,
            client = ?client,
            unlogged,
            "refused {what} (the first `{code}` in a minute; `debug` logs each one)"
        );
    }

    /// The last [`RECENT_KEPT`] refusals, newest last.
    pub fn recent(&self) -> Vec<Recent> {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.iter().cloned().collect()
    }

    /// Refusals since start, by code.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.iter().map(|(k, t)| (k.clone(), t.count)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_code_and_stays_bounded() {
        let r = Refusals::default();
        let count = |code: &str| r.count(code, "because", None, format_args!("a test"));
        count("rate-limited");
        count("rate-limited");
        count("forbidden");
        assert_eq!(r.snapshot()["rate-limited"], 2);
        assert_eq!(r.snapshot()["forbidden"], 1);
        for i in 0..1000 {
            count(&format!("c{i}"));
        }
        assert_eq!(r.snapshot().len(), MAX_CODES);
        count("rate-limited");
        assert_eq!(r.snapshot()["rate-limited"], 3, "known codes still count");
        let recent = r.recent();
        assert_eq!(recent.len(), RECENT_KEPT);
        assert_eq!(recent.last().unwrap().code, "rate-limited");
        assert_eq!(recent.last().unwrap().what, "a test");
    }
}
