//! Answers held back from clients that ask too fast or keep sending what cannot be
//! served. Every 429, and a malformed or oversized request's answer (400, 413, 414, 431)
//! once its address has had `limits.bad_requests_per_second_per_address` of them in a
//! second, is sent `limits.rate_limited_delay_ms` after the request was refused. A client
//! that asks again as soon as it is answered then asks about once a delay, and costs a
//! sleeping task meanwhile instead of a request's work each time (its connections are
//! capped per address). A client that sends a bad request now and then is answered at
//! once. Knows statuses and addresses, nothing of what was asked.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{Request, StatusCode};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use axum::body::Body;

use super::Peer;
use crate::address::AddressKey;
use crate::config::Limits;

/// When answers are held. (A client asking in a loop gets its budget at once, waits one
/// delay, and by then has about a second's budget again: about the budget a second.)
pub struct Holds {
    /// `limits.rate_limited_delay_ms`; zero: nothing is held.
    delay: Duration,
    /// Bad requests answered at once per address (`limits.bad_requests_per_second_per_address`,
    /// a burst of one second's worth); `None`: every one at once.
    bad: Option<DefaultKeyedRateLimiter<AddressKey>>,
}

impl Holds {
    pub fn new(limits: &Limits) -> Holds {
        Holds {
            delay: Duration::from_millis(limits.rate_limited_delay_ms),
            bad: NonZeroU32::new(limits.bad_requests_per_second_per_address)
                .map(|n| RateLimiter::keyed(Quota::per_second(n))),
        }
    }

    /// How long an answer of `status` to `client` waits.
    fn hold(&self, status: StatusCode, client: Option<IpAddr>) -> Duration {
        let bad = matches!(
            status,
            StatusCode::BAD_REQUEST
                | StatusCode::PAYLOAD_TOO_LARGE
                | StatusCode::URI_TOO_LONG
                | StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
        let held = if status == StatusCode::TOO_MANY_REQUESTS {
            true
        } else if bad {
            match (&self.bad, client) {
                (Some(bad), Some(ip)) => bad.check_key(&AddressKey::of(ip)).is_err(),
                _ => false,
            }
        } else {
            false
        };
        if held { self.delay } else { Duration::ZERO }
    }

    /// Forgets addresses whose buckets are full again.
    pub fn prune(&self) {
        if let Some(bad) = &self.bad {
            bad.retain_recent();
            bad.shrink_to_fit();
        }
    }
}

/// The middleware: holds the answers [`Holds`] says to.
pub async fn answers(
    State(holds): State<Arc<Holds>>,
    req: Request<Body>,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let client = req.extensions().get::<Peer>().map(|p| p.0.ip());
    let res = next.run(req).await;
    let hold = holds.hold(res.status(), client);
    if !hold.is_zero() {
        tokio::time::sleep(hold).await;
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_requests_are_held_past_the_budget_and_429s_always() {
        let limits = Limits {
            bad_requests_per_second_per_address: 3,
            rate_limited_delay_ms: 1000,
            ..Limits::default()
        };
        let h = Holds::new(&limits);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let second = Duration::from_secs(1);
        for _ in 0..3 {
            assert_eq!(h.hold(StatusCode::BAD_REQUEST, Some(a)), Duration::ZERO);
        }
        assert_eq!(h.hold(StatusCode::PAYLOAD_TOO_LARGE, Some(a)), second);
        // Other answers, and other addresses, are not held.
        assert_eq!(h.hold(StatusCode::NOT_FOUND, Some(a)), Duration::ZERO);
        assert_eq!(h.hold(StatusCode::OK, Some(a)), Duration::ZERO);
        assert_eq!(h.hold(StatusCode::BAD_REQUEST, Some(b)), Duration::ZERO);
        assert_eq!(h.hold(StatusCode::TOO_MANY_REQUESTS, Some(b)), second);
        let off = Holds::new(&Limits {
            rate_limited_delay_ms: 0,
            ..limits
        });
        assert_eq!(off.hold(StatusCode::TOO_MANY_REQUESTS, Some(a)), Duration::ZERO);
    }
}
