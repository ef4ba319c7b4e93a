//! Speed bumps on writes: a rate per writer and a storage quota per namespace.
//!
//! Every write passes here before it reaches a resource's actor, whatever protocol it came
//! in by, so the limits hold for all writers alike. A refusal stores nothing.
//!
//! * **Rate**: a token bucket per writer (`writes_per_second`, `write_burst`). A writer is
//!   the identity that signed the request when there is one, else the client's address.
//! * **Bytes**: a second bucket per writer, of bytes written (`write_bytes_per_second`,
//!   `write_bytes_burst`), so that a writer of large values cannot take the store's one
//!   commit lane (and the namespace's quota) as fast as it can send; the owner's writes
//!   are not counted. A write larger than the burst can never pass and is refused as such.
//! * **Document work**: a schedule per writer of the CPU time its writes took to apply
//!   (`document_work_ms_per_second`, `document_work_burst_ms`), measured on the thread that
//!   did the work and charged after it, since what a write costs (automerge holds one op
//!   per character of text) is known only once it is applied; a writer in debt past the
//!   burst is refused until it has paid it off. Bytes alone let one client keep a core
//!   busy: 2 MiB of new text is about a second of work. Reading past versions is charged
//!   to the reader the same way (a catch-up over a megabyte of text is seconds). The
//!   owner is not counted.
//! * **Quotas**: a namespace may occupy `max_stored_bytes_per_namespace` bytes in storage,
//!   and the resources an identity (an account, a signing key, a member) created
//!   `max_stored_bytes_per_identity`; the owner's writes have no identity quota. Usage is
//!   read from storage at most once a second per namespace or identity and counted forward
//!   from writes in between, so the check costs no query on the hot path.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use plait_bridge::Identity;

use super::EngineError;
use crate::address::AddressKey;
use crate::model::Namespace;
use crate::schedule::Schedule;
use crate::storage::Storage;

/// How long a namespace's usage figure is trusted before it is read again.
const USAGE_TTL: Duration = Duration::from_secs(1);

/// The write limits (named settings; see `config::Limits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteLimits {
    /// Sustained writes per second per writer; 0 turns rate limiting off.
    pub writes_per_second: u32,
    /// Writes a writer may make at once above the sustained rate.
    pub write_burst: u32,
    /// Sustained bytes written per second per writer (the owner aside); 0 turns it off.
    pub write_bytes_per_second: u64,
    /// Bytes a writer may write at once above the sustained rate: the largest write.
    pub write_bytes_burst: u64,
    /// CPU milliseconds of document work per second a writer's writes may cost on average
    /// (the owner aside); 0 turns it off.
    pub document_work_ms_per_second: u32,
    /// Milliseconds of document work a writer may owe before its writes are refused.
    pub document_work_burst_ms: u32,
    /// Bytes a namespace may occupy in storage; 0 turns the quota off.
    pub max_stored_bytes_per_namespace: u64,
    /// Bytes the resources one identity created may occupy; 0 turns the quota off.
    pub max_stored_bytes_per_identity: u64,
    /// Deepest nesting the JSON a write builds may have (a whole body, or the result of
    /// its patches); at most `doc::json::MAX_JSON_DEPTH`.
    pub max_json_depth: usize,
    /// Most patches one write may carry.
    pub max_patches_per_request: usize,
}

impl Default for WriteLimits {
    fn default() -> Self {
        WriteLimits {
            writes_per_second: 2_000,
            write_burst: 4_000,
            write_bytes_per_second: 2 << 20,
            write_bytes_burst: 16 << 20,
            document_work_ms_per_second: 100,
            document_work_burst_ms: 1_000,
            max_stored_bytes_per_namespace: 1 << 30,
            max_stored_bytes_per_identity: 256 << 20,
            max_json_depth: crate::doc::json::MAX_JSON_DEPTH,
            max_patches_per_request: crate::braid::patch::MAX_PATCHES,
        }
    }
}

/// Who is writing (or reading past versions), for the limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Writer {
    /// A request signed by (or a session of) this identity.
    Identity(Identity),
    /// An anonymous client at this address (an IPv6 client's /64).
    Address(AddressKey),
    /// The server itself (imports, replicas of other instances): not limited.
    Internal,
}

/// The bytes bucket counts in cells of this many bytes (governor counts in `u32`s).
const BYTES_CELL: u64 = 1024;

pub(crate) struct Limiter {
    limits: WriteLimits,
    rate: Option<DefaultKeyedRateLimiter<Writer>>,
    /// Bytes written per writer, in [`BYTES_CELL`]s.
    bytes: Option<DefaultKeyedRateLimiter<Writer>>,
    /// Document work per writer.
    work: Option<WorkBudget>,
    /// namespace → (bytes, when read from storage).
    usage: Mutex<HashMap<Namespace, (u64, Instant)>>,
    /// identity → (bytes of the resources it created, when read from storage).
    authored: Mutex<HashMap<Identity, (u64, Instant)>>,
    /// The instance's identity: no identity quota for its writes.
    owner: Option<Identity>,
}

impl Limiter {
    pub(crate) fn new(limits: WriteLimits, owner: Option<Identity>) -> Limiter {
        let rate = NonZeroU32::new(limits.writes_per_second).map(|per_sec| {
            let burst = NonZeroU32::new(limits.write_burst.max(limits.writes_per_second)).unwrap_or(per_sec);
            RateLimiter::keyed(Quota::per_second(per_sec).allow_burst(burst))
        });
        let cells = |b: u64| NonZeroU32::new(size_cells(b));
        let bytes = cells(limits.write_bytes_per_second).map(|per_sec| {
            let burst = cells(limits.write_bytes_burst).unwrap_or(per_sec).max(per_sec);
            RateLimiter::keyed(Quota::per_second(per_sec).allow_burst(burst))
        });
        let work = (limits.document_work_ms_per_second > 0).then(|| WorkBudget {
            per_second: limits.document_work_ms_per_second,
            burst: Duration::from_millis(limits.document_work_burst_ms.into()),
            due: Schedule::default(),
        });
        Limiter {
            limits,
            rate,
            bytes,
            work,
            usage: Mutex::new(HashMap::new()),
            authored: Mutex::new(HashMap::new()),
            owner,
        }
    }

    pub(crate) fn limits(&self) -> WriteLimits {
        self.limits
    }

    /// Whether `writer` is limited only by the write rate: the server itself, or the owner.
    fn unmetered(&self, writer: &Writer) -> bool {
        match writer {
            Writer::Internal => true,
            Writer::Identity(id) => Some(*id) == self.owner,
            Writer::Address(_) => false,
        }
    }

    /// Takes one write of `size` bytes from `writer`'s buckets, or says when to come back
    /// (a delete is a write of no bytes). A writer in debt for document work is refused
    /// first, then the bytes are taken: a write refused for its bytes costs no write.
    pub(crate) fn check_rate(&self, writer: &Writer, size: u64) -> Result<(), EngineError> {
        if matches!(writer, Writer::Internal) {
            return Ok(());
        }
        self.check_work(writer)?;
        if let (Some(bytes), false, Some(n)) = (
            &self.bytes,
            self.unmetered(writer),
            NonZeroU32::new(size_cells(size)),
        ) {
            match bytes.check_key_n(writer, n) {
                Ok(Ok(())) => {}
                Ok(Err(not_until)) => {
                    return Err(EngineError::RateLimited {
                        retry_after: not_until.wait_time_from(DefaultClock::default().now()),
                        limit: "write_bytes_per_second",
                    });
                }
                Err(_) => {
                    return Err(EngineError::WriteTooLarge {
                        size,
                        limit: self.limits.write_bytes_burst,
                    });
                }
            }
        }
        let Some(rate) = &self.rate else {
            return Ok(());
        };
        rate.check_key(writer)
            .map_err(|not_until| EngineError::RateLimited {
                retry_after: not_until.wait_time_from(DefaultClock::default().now()),
                limit: "writes_per_second",
            })
    }

    /// Refuses a write carrying more than `max_patches_per_request` patches.
    pub(crate) fn check_patches(&self, body: &crate::update::WriteBody) -> Result<(), EngineError> {
        let limit = self.limits.max_patches_per_request;
        match body {
            crate::update::WriteBody::Patches(ps) if ps.len() > limit => {
                Err(EngineError::TooManyPatches { n: ps.len(), limit })
            }
            _ => Ok(()),
        }
    }

    /// Refuses a write of `incoming` bytes that would take `ns` over its quota.
    pub(crate) async fn check_quota(
        &self,
        storage: &dyn Storage,
        ns: &Namespace,
        incoming: u64,
    ) -> Result<(), EngineError> {
        let limit = self.limits.max_stored_bytes_per_namespace;
        if limit == 0 {
            return Ok(());
        }
        let cached = self.usage.lock().expect("usage").get(ns).copied();
        let used = match cached {
            Some((bytes, at)) if at.elapsed() < USAGE_TTL => bytes,
            _ => {
                let bytes = storage.namespace_bytes(ns).await?;
                self.usage
                    .lock()
                    .expect("usage")
                    .insert(*ns, (bytes, Instant::now()));
                bytes
            }
        };
        if used.saturating_add(incoming) > limit {
            return Err(EngineError::QuotaExceeded { used, limit });
        }
        Ok(())
    }

    /// Refuses a write of `incoming` bytes by `writer` that would take the resources it
    /// created over `max_stored_bytes_per_identity` (the owner, addresses and the server
    /// itself have no identity quota).
    pub(crate) async fn check_identity_quota(
        &self,
        storage: &dyn Storage,
        writer: &Writer,
        incoming: u64,
    ) -> Result<(), EngineError> {
        let limit = self.limits.max_stored_bytes_per_identity;
        let Writer::Identity(id) = writer else {
            return Ok(());
        };
        if limit == 0 || Some(*id) == self.owner {
            return Ok(());
        }
        let cached = self.authored.lock().expect("authored").get(id).copied();
        let used = match cached {
            Some((bytes, at)) if at.elapsed() < USAGE_TTL => bytes,
            _ => {
                let bytes = storage.author_bytes(id).await?;
                self.authored
                    .lock()
                    .expect("authored")
                    .insert(*id, (bytes, Instant::now()));
                bytes
            }
        };
        if used.saturating_add(incoming) > limit {
            return Err(EngineError::IdentityQuotaExceeded { used, limit });
        }
        Ok(())
    }

    /// Counts an accepted write toward its namespace and its writer until the next reading.
    pub(crate) fn count(&self, ns: &Namespace, writer: &Writer, bytes: u64) {
        if let Some((used, _)) = self.usage.lock().expect("usage").get_mut(ns) {
            *used = used.saturating_add(bytes);
        }
        if let Writer::Identity(id) = writer
            && let Some((used, _)) = self.authored.lock().expect("authored").get_mut(id)
        {
            *used = used.saturating_add(bytes);
        }
    }

    /// Refuses `who` while it owes more document work than the burst (reads of past
    /// versions are charged to the reader as writes are to the writer).
    pub(crate) fn check_work(&self, who: &Writer) -> Result<(), EngineError> {
        match &self.work {
            Some(work) if !self.unmetered(who) => work.check(who, Instant::now()),
            _ => Ok(()),
        }
    }

    /// Whether `who`'s document work is counted (so worth timing).
    pub(crate) fn meters_work(&self, who: &Writer) -> bool {
        self.work.is_some() && !self.unmetered(who)
    }

    /// Charges `writer` for `cpu` of document work one of its writes took (applied or
    /// refused by the document: the work was done either way).
    pub(crate) fn charge_work(&self, writer: &Writer, cpu: Duration) {
        if let Some(work) = &self.work
            && !self.unmetered(writer)
        {
            work.charge(writer, cpu, Instant::now());
        }
    }

    /// Forgets idle writers' buckets and stale usage figures.
    pub(crate) fn prune(&self) {
        if let Some(work) = &self.work {
            work.due.prune(Instant::now());
        }
        for rate in [&self.rate, &self.bytes].into_iter().flatten() {
            rate.retain_recent();
            rate.shrink_to_fit();
        }
        self.usage
            .lock()
            .expect("usage")
            .retain(|_, (_, at)| at.elapsed() < USAGE_TTL * 60);
        self.authored
            .lock()
            .expect("authored")
            .retain(|_, (_, at)| at.elapsed() < USAGE_TTL * 60);
    }
}

/// Document work owed per writer: a writer's schedule is pushed on by what its work would
/// take to pay off at `per_second` milliseconds a second.
struct WorkBudget {
    per_second: u32,
    /// How far ahead of now a writer's schedule may run while its writes are still taken.
    burst: Duration,
    due: Schedule<Writer>,
}

impl WorkBudget {
    fn check(&self, writer: &Writer, now: Instant) -> Result<(), EngineError> {
        match self.due.ahead(writer, now).checked_sub(self.burst) {
            Some(wait) if !wait.is_zero() => Err(EngineError::RateLimited {
                retry_after: wait,
                limit: "document_work_ms_per_second",
            }),
            _ => Ok(()),
        }
    }

    fn charge(&self, writer: &Writer, cpu: Duration, now: Instant) {
        // `cpu` at `per_second` ms a second takes cpu × 1000 / per_second to pay off.
        self.due
            .push(*writer, now, cpu.saturating_mul(1_000) / self.per_second);
    }
}

/// `size` bytes in [`BYTES_CELL`]s, rounded up.
fn size_cells(size: u64) -> u32 {
    u32::try_from(size.div_ceil(BYTES_CELL)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_per_writer() {
        let l = Limiter::new(
            WriteLimits {
                writes_per_second: 1,
                write_burst: 3,
                max_stored_bytes_per_namespace: 0,
                ..WriteLimits::default()
            },
            None,
        );
        let a = Writer::Address(AddressKey::of("10.0.0.1".parse().unwrap()));
        let b = Writer::Address(AddressKey::of("10.0.0.2".parse().unwrap()));
        for _ in 0..3 {
            l.check_rate(&a, 10).unwrap();
        }
        let Err(EngineError::RateLimited {
            retry_after,
            limit: "writes_per_second",
        }) = l.check_rate(&a, 10)
        else {
            panic!("fourth write refused")
        };
        assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(1));
        l.check_rate(&b, 10).unwrap();
        for _ in 0..10 {
            l.check_rate(&Writer::Internal, 1 << 30).unwrap();
        }
    }

    #[test]
    fn document_work_is_charged_after_the_fact_per_writer_but_not_the_owners() {
        let owner = plait_bridge::Keypair::generate().identity();
        let l = Limiter::new(
            WriteLimits {
                document_work_ms_per_second: 100,
                document_work_burst_ms: 1_000,
                ..WriteLimits::default()
            },
            Some(owner),
        );
        let a = Writer::Address(AddressKey::of("10.0.0.1".parse().unwrap()));
        let b = Writer::Address(AddressKey::of("10.0.0.2".parse().unwrap()));
        // A fresh writer's first write passes however much it costs: 0.6 s of work is
        // 6 s at 100 ms a second, 5 s past the burst.
        l.check_rate(&a, 10).unwrap();
        l.charge_work(&a, Duration::from_millis(600));
        let Err(EngineError::RateLimited {
            retry_after,
            limit: "document_work_ms_per_second",
        }) = l.check_rate(&a, 10)
        else {
            panic!("a writer in debt past the burst is refused")
        };
        assert!(retry_after > Duration::from_millis(4_900) && retry_after <= Duration::from_secs(5));
        // Debt within the burst is fine; others (and the owner) are not held back.
        l.charge_work(&b, Duration::from_millis(50));
        l.check_rate(&b, 10).unwrap();
        for _ in 0..10 {
            l.charge_work(&Writer::Identity(owner), Duration::from_secs(1));
            l.check_rate(&Writer::Identity(owner), 10).unwrap();
        }
        // Paid off, a writer is forgotten.
        let c = Writer::Address(AddressKey::of("10.0.0.3".parse().unwrap()));
        let work = l.work.as_ref().unwrap();
        work.charge(
            &c,
            Duration::from_millis(100),
            Instant::now() - Duration::from_secs(10),
        );
        l.check_rate(&c, 10).unwrap();
        l.prune();
        assert_eq!(work.due.len(), 2, "only a and b still owe");
    }

    #[test]
    fn zero_turns_rate_limiting_off() {
        let l = Limiter::new(
            WriteLimits {
                writes_per_second: 0,
                write_burst: 0,
                max_stored_bytes_per_namespace: 0,
                ..WriteLimits::default()
            },
            None,
        );
        let a = Writer::Address(AddressKey::of("10.0.0.1".parse().unwrap()));
        for _ in 0..10_000 {
            l.check_rate(&a, 10).unwrap();
        }
    }

    #[test]
    fn bytes_are_counted_per_writer_but_not_the_owners() {
        let owner = plait_bridge::Keypair::generate().identity();
        let l = Limiter::new(
            WriteLimits {
                write_bytes_per_second: 64 << 10,
                write_bytes_burst: 128 << 10,
                ..WriteLimits::default()
            },
            Some(owner),
        );
        let a = Writer::Address(AddressKey::of("10.0.0.1".parse().unwrap()));
        let b = Writer::Address(AddressKey::of("10.0.0.2".parse().unwrap()));
        l.check_rate(&a, 100 << 10).unwrap();
        let Err(EngineError::RateLimited {
            retry_after,
            limit: "write_bytes_per_second",
        }) = l.check_rate(&a, 100 << 10)
        else {
            panic!("the second 100 KiB is over the bucket")
        };
        // 72 KiB short at 64 KiB a second.
        assert!(retry_after > Duration::from_millis(500) && retry_after <= Duration::from_secs(2));
        // Small writes still fit what is left; another writer has its own bucket.
        l.check_rate(&a, 20 << 10).unwrap();
        l.check_rate(&b, 100 << 10).unwrap();
        // More than the burst can never pass: told so, not told to wait.
        let Err(EngineError::WriteTooLarge { size, limit }) = l.check_rate(&b, 200 << 10) else {
            panic!("a write over the burst")
        };
        assert_eq!((size, limit), (200 << 10, 128 << 10));
        for _ in 0..10 {
            l.check_rate(&Writer::Identity(owner), 1 << 20).unwrap();
        }
    }
}
