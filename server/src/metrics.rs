//! Metrics in the Prometheus text format, for `[metrics] path` (owner-only on the public
//! listener) and the optional `[metrics] listen` listener (open to whoever reaches it).
//!
//! Two sorts of figures, so the hot paths stay cheap:
//!
//! * **Counted as they happen**, through handles made once: open connections (the
//!   accept loop's gate), open subscriptions and deliveries by protocol, and the
//!   delivery-latency histogram (from the moment the actor published the event, which is
//!   after its append committed, to the moment the encoded update is handed to the
//!   subscriber's connection). A handle is an atomic, and a histogram sample is a
//!   lock-free push; [`Metrics::upkeep`] folds samples into buckets every few seconds so
//!   they do not pile up when nobody scrapes.
//! * **Read when scraped**, from the one place that already knows them: acknowledged writes
//!   by kind (the engine), refusals by code (`refusals`), stored bytes and the Postgres
//!   pool (storage), p2p members and peers (the node), segments sealed and not yet
//!   acknowledged by each mirror (the mirror owner), uptime and resident memory. Nothing is
//!   counted twice.
//!
//! The live figures are also kept as plain atomics ([`Metrics::live`]) for the
//! dashboard's status resources, which read them without rendering the text.
//!
//! Formatting is `metrics-exporter-prometheus`'s (a recorder of our own, not the global
//! one). This module knows nothing of HTTP, routing or who may read the figures.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge, Histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

/// Upper bounds of the delivery-latency buckets, in seconds: a local delivery takes well
/// under a millisecond; seconds mean a subscriber far behind or a starved machine.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// How often histogram samples are folded into their buckets.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);
const LATENCY: &str = "plait_delivery_latency_seconds";

/// The protocol a subscription is served over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Braid,
    Statebus,
}

impl Protocol {
    fn index(self) -> usize {
        self as usize
    }

    fn name(self) -> &'static str {
        match self {
            Protocol::Braid => "braid",
            Protocol::Statebus => "statebus",
        }
    }
}

/// The server's metrics: the live handles, and the recorder that renders them.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    started: Instant,
    connections: Gauge,
    subscriptions: [Gauge; 2],
    deliveries: [Counter; 2],
    latency: [Histogram; 2],
    live: Arc<Live>,
}

/// The live figures as plain numbers, moved together with their Prometheus handles.
#[derive(Debug, Default)]
pub struct Live {
    connections: AtomicI64,
    subscriptions: [AtomicI64; 2],
    deliveries: [AtomicU64; 2],
}

/// The live figures at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LiveFigures {
    pub connections: i64,
    pub braid_subscriptions: i64,
    pub statebus_subscriptions: i64,
    pub braid_deliveries: u64,
    pub statebus_deliveries: u64,
}

impl Live {
    pub fn read(&self) -> LiveFigures {
        LiveFigures {
            connections: self.connections.load(Ordering::Relaxed),
            braid_subscriptions: self.subscriptions[0].load(Ordering::Relaxed),
            statebus_subscriptions: self.subscriptions[1].load(Ordering::Relaxed),
            braid_deliveries: self.deliveries[0].load(Ordering::Relaxed),
            statebus_deliveries: self.deliveries[1].load(Ordering::Relaxed),
        }
    }
}

/// A gauge that moves a Prometheus gauge and one of [`Live`]'s atomics alike.
struct Tracked {
    gauge: Gauge,
    live: Arc<Live>,
    pick: fn(&Live) -> &AtomicI64,
}

impl metrics::GaugeFn for Tracked {
    fn increment(&self, value: f64) {
        self.gauge.increment(value);
        (self.pick)(&self.live).fetch_add(value as i64, Ordering::Relaxed);
    }
    fn decrement(&self, value: f64) {
        self.gauge.decrement(value);
        (self.pick)(&self.live).fetch_sub(value as i64, Ordering::Relaxed);
    }
    fn set(&self, value: f64) {
        self.gauge.set(value);
        (self.pick)(&self.live).store(value as i64, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// What is read when metrics are scraped, from the parts of the server that know it.
pub struct Sources<'a> {
    pub engine: &'a crate::engine::Engine,
    pub refusals: &'a crate::refusals::Refusals,
    pub p2p: Option<&'a crate::p2p::P2p>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(LATENCY.into()), LATENCY_BUCKETS)
            .expect("the buckets are not empty")
            .build_recorder();
        let handle = recorder.handle();
        let (connections, subscriptions, deliveries, latency) =
            metrics::with_local_recorder(&recorder, || {
                describe();
                let by = |p: Protocol| ("protocol", p.name());
                let both = [Protocol::Braid, Protocol::Statebus];
                (
                    metrics::gauge!("plait_connections_open"),
                    both.map(|p| metrics::gauge!("plait_subscriptions_open", &[by(p)])),
                    both.map(|p| metrics::counter!("plait_deliveries_total", &[by(p)])),
                    both.map(|p| metrics::histogram!(LATENCY, &[by(p)])),
                )
            });
        let live = Arc::new(Live::default());
        let tracked = |gauge: Gauge, pick: fn(&Live) -> &AtomicI64| {
            Gauge::from_arc(Arc::new(Tracked {
                gauge,
                live: live.clone(),
                pick,
            }))
        };
        let connections = tracked(connections, |l| &l.connections);
        let [braid, statebus] = subscriptions;
        let subscriptions = [
            tracked(braid, |l| &l.subscriptions[0]),
            tracked(statebus, |l| &l.subscriptions[1]),
        ];
        Metrics {
            recorder,
            handle,
            started: Instant::now(),
            connections,
            subscriptions,
            deliveries,
            latency,
            live,
        }
    }

    /// Folds histogram samples into buckets every few seconds until `shutdown`.
    pub fn upkeep(self: &Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(UPKEEP_EVERY);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = every.tick() => {}
                }
                match me.upgrade() {
                    Some(m) => m.handle.run_upkeep(),
                    None => return,
                }
            }
        });
    }

    /// The live figures now: open connections, subscriptions and deliveries.
    pub fn live(&self) -> LiveFigures {
        self.live.read()
    }

    /// The gauge of open connections, for the accept loop's gate to move.
    pub fn connections(&self) -> Gauge {
        self.connections.clone()
    }

    /// A subscription opened; it counts as open until the returned guard is dropped.
    pub fn subscribed(&self, protocol: Protocol) -> Subscribed {
        let g = self.subscriptions[protocol.index()].clone();
        g.increment(1.0);
        Subscribed(g)
    }

    /// An update was handed to a subscriber's connection. `committed`: when the event it
    /// carries was published (a catch-up made for this subscriber alone has none).
    pub fn delivered(&self, protocol: Protocol, committed: Option<Instant>) {
        self.deliveries[protocol.index()].increment(1);
        self.live.deliveries[protocol.index()].fetch_add(1, Ordering::Relaxed);
        if let Some(at) = committed {
            self.latency[protocol.index()].record(at.elapsed().as_secs_f64());
        }
    }

    /// The Prometheus text: the live figures, and those read now from `sources`.
    pub async fn render(&self, sources: Sources<'_>) -> String {
        let storage = sources.engine.storage();
        let stored = match storage.stored_bytes().await {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::warn!(error = %e, "metrics: the stored size could not be read");
                None
            }
        };
        let pool = storage.pool_status();
        let writes = sources.engine.writes_acknowledged();
        let refusals = sources.refusals.snapshot();
        let p2p = sources.p2p.map(|p| (p.node.status().peers, p.mirror_lag()));
        let in_memory = sources.engine.live_resources();
        metrics::with_local_recorder(&self.recorder, || {
            use metrics::{counter, gauge};
            gauge!("plait_uptime_seconds").set(self.started.elapsed().as_secs_f64());
            if let Some(rss) = crate::http::rss_bytes() {
                gauge!("plait_resident_memory_bytes").set(rss as f64);
            }
            gauge!("plait_resources_in_memory").set(in_memory as f64);
            for (kind, n) in writes {
                counter!("plait_writes_total", "kind" => kind.name()).absolute(n);
            }
            for (code, n) in refusals {
                counter!("plait_refusals_total", "code" => code).absolute(n);
            }
            if let Some(n) = stored {
                gauge!("plait_stored_bytes").set(n as f64);
            }
            if let Some(p) = pool {
                gauge!("plait_postgres_pool_max_connections").set(p.max_size as f64);
                gauge!("plait_postgres_pool_connections").set(p.size as f64);
                gauge!("plait_postgres_pool_idle_connections").set(p.available as f64);
                gauge!("plait_postgres_pool_waiting").set(p.waiting as f64);
            }
            if let Some((peers, lag)) = p2p {
                gauge!("plait_p2p_members").set(peers.members as f64);
                gauge!("plait_p2p_members_connected").set(peers.connected.len() as f64);
                gauge!("plait_p2p_peers_connected").set(peers.connected_peers as f64);
                if let Some(lag) = lag {
                    gauge!("plait_mirror_segments_sealed").set(lag.sealed as f64);
                    for (mirror, pending) in lag.pending {
                        gauge!("plait_mirror_segments_pending", "mirror" => mirror.to_string())
                            .set(pending as f64);
                    }
                }
            }
        });
        self.handle.render()
    }
}

/// Help text for every metric (Prometheus' linter wants it, and so do people).
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        "plait_connections_open",
        "HTTP connections open (websockets included)."
    );
    describe_gauge!(
        "plait_subscriptions_open",
        "Client subscriptions open, by protocol."
    );
    describe_counter!(
        "plait_deliveries_total",
        "Updates handed to subscribers' connections, by protocol."
    );
    describe_histogram!(
        LATENCY,
        Unit::Seconds,
        "Time from an event's commit to its update being handed to a subscriber's connection."
    );
    describe_counter!(
        "plait_writes_total",
        "Writes acknowledged (durable), by resource kind; the server's own included."
    );
    describe_counter!(
        "plait_refusals_total",
        "Refusals since start, by the code the client was given (Plait-Error)."
    );
    describe_gauge!(
        "plait_stored_bytes",
        Unit::Bytes,
        "Bytes all resources occupy in storage."
    );
    describe_gauge!(
        "plait_resources_in_memory",
        "Resources whose documents are in memory."
    );
    describe_gauge!(
        "plait_uptime_seconds",
        Unit::Seconds,
        "Seconds since the server started."
    );
    describe_gauge!(
        "plait_resident_memory_bytes",
        Unit::Bytes,
        "Resident memory of the process."
    );
    describe_gauge!(
        "plait_postgres_pool_max_connections",
        "Postgres connections the pool may open."
    );
    describe_gauge!(
        "plait_postgres_pool_connections",
        "Postgres connections open in the pool."
    );
    describe_gauge!(
        "plait_postgres_pool_idle_connections",
        "Pooled Postgres connections idle."
    );
    describe_gauge!(
        "plait_postgres_pool_waiting",
        "Tasks waiting for a pooled Postgres connection."
    );
    describe_gauge!("plait_p2p_members", "Members known over all the node's DHTs.");
    describe_gauge!("plait_p2p_members_connected", "Members connected now.");
    describe_gauge!("plait_p2p_peers_connected", "libp2p connections to anyone.");
    describe_gauge!(
        "plait_mirror_segments_sealed",
        "Sealed segments of this instance's chain."
    );
    describe_gauge!(
        "plait_mirror_segments_pending",
        "Sealed segments a mirror has not acknowledged yet, by mirror."
    );
}

/// An open subscription, counted until dropped.
pub struct Subscribed(Gauge);

impl Drop for Subscribed {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// How far the mirrors are behind the owner's chain.
#[derive(Debug, Clone, Default)]
pub struct MirrorLag {
    /// The chain's last seq.
    pub sealed: u64,
    /// Per mirror: segments sealed past the last one it acknowledged.
    pub pending: Vec<(plait_bridge::Identity, u64)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_figures_move_and_render_as_prometheus_text() {
        let m = Metrics::new();
        let open = m.subscribed(Protocol::Braid);
        m.delivered(Protocol::Braid, Some(Instant::now()));
        m.delivered(Protocol::Statebus, None);
        m.connections().increment(2.0);
        m.handle.run_upkeep();
        let text = m.handle.render();
        assert!(
            text.contains("plait_subscriptions_open{protocol=\"braid\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("plait_deliveries_total{protocol=\"statebus\"} 1"),
            "{text}"
        );
        assert!(text.contains("plait_connections_open 2"), "{text}");
        let live = m.live();
        assert_eq!(
            (
                live.connections,
                live.braid_subscriptions,
                live.braid_deliveries,
                live.statebus_deliveries
            ),
            (2, 1, 1, 1)
        );
        assert!(
            text.contains("plait_delivery_latency_seconds_count{protocol=\"braid\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE plait_delivery_latency_seconds histogram"),
            "{text}"
        );
        drop(open);
        assert_eq!(m.live().braid_subscriptions, 0);
        let text = m.handle.render();
        assert!(
            text.contains("plait_subscriptions_open{protocol=\"braid\"} 0"),
            "{text}"
        );
    }
}
