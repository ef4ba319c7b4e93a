//! Holder records: the owner names, in its signed address record in each network, the
//! mirrors of that network that hold its sealed segments — those that acknowledged a push
//! (they granted it storage and keep something) — so that a member looking the owner up
//! while it is offline finds where its data is.
//!
//! The record is the owner's (`plait_bridge::record::AddressRecord::holders`, signed by
//! it): a mirror cannot name itself holder of a namespace it does not hold, and the record
//! lives in the DHT (the mirror keeps it like any member's) until it expires
//! (`p2p.record_ttl_secs`). Knows nothing of how records are published or checked.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use plait_bridge::Identity;
use plait_bridge::node::Node;
use tokio_util::sync::CancellationToken;

use super::owner::{Owner, mirrors};

/// How often the holders are worked out again from what the mirrors acknowledged.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Which mirrors hold something, by network: those that acknowledged a push.
pub fn holding(owner: &Owner, data_dir: &std::path::Path) -> BTreeMap<String, Vec<Identity>> {
    let acked = owner.push_status();
    let mut by_dht: BTreeMap<String, Vec<Identity>> = BTreeMap::new();
    for (id, entry) in mirrors(data_dir).unwrap_or_default() {
        if acked.get(&id).is_some_and(|s| s.acked > 0) {
            by_dht.entry(entry.dht).or_default().push(id);
        }
    }
    by_dht
}

/// Keeps each network's record naming the mirrors that hold this owner's segments there.
pub fn run(node: Node, owner: Arc<Owner>, data_dir: PathBuf, shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut named: BTreeMap<String, Vec<Identity>> = BTreeMap::new();
        let mut tick = tokio::time::interval(CHECK_EVERY);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = holding(&owner, &data_dir);
            if now == named {
                continue;
            }
            let dhts: Vec<String> = named.keys().chain(now.keys()).cloned().collect();
            let mut done = BTreeMap::new();
            for dht in dhts {
                let list = now.get(&dht).cloned().unwrap_or_default();
                match node.set_holders(&dht, list.clone()).await {
                    Ok(()) => {
                        tracing::info!(%dht, holders = list.len(), "the address record names this owner's mirrors");
                        if !list.is_empty() {
                            done.insert(dht, list);
                        }
                    }
                    // Not (or no longer) in that network: try again at the next tick.
                    Err(e) => tracing::debug!(%dht, error = %e, "holders not published"),
                }
            }
            named = done;
        }
    });
}
