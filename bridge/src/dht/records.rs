//! Address records in a membership's Kademlia: this node's own (signed, sequence-numbered,
//! republished, naming the mirrors that hold its sealed segments), the ones it holds for other members (each checked by
//! [`AddressRecord::check`] before it is stored, and again when loaded), and lookups of a
//! member's record (every record found is checked and the newest kept, then the member is
//! dialled and the requests waiting for it go out).
//!
//! It knows nothing of the member set beyond the DHT's name (the gate keeps non-members
//! out), nor of what the requests it releases carry.

use std::time::Duration;

use libp2p::kad::store::RecordStore;
use libp2p::{PeerId, kad};
use tokio::sync::oneshot;

use super::Runner;
use super::listen::worth_dialling;
use crate::identity::Identity;
use crate::record::{AddressRecord, MAX_HOLDERS};
use crate::types::{NodeError, now_millis, now_secs, peer_id_of};

/// A DHT lookup in flight: whom for, who waits, the best record so far.
pub(super) type Lookup = (
    Identity,
    Vec<oneshot::Sender<Result<AddressRecord, NodeError>>>,
    Option<AddressRecord>,
);

impl Runner {
    pub(super) fn store_record(&mut self, r: &AddressRecord) {
        let Some(dht) = self.dht().map(str::to_string) else {
            return;
        };
        let mut rec = kad::Record::new(
            kad::RecordKey::new(&AddressRecord::key_for(&dht, &r.id)),
            r.encode(),
        );
        rec.expires =
            Some(std::time::Instant::now() + Duration::from_secs(r.expires_at.saturating_sub(now_secs())));
        if let Err(e) = self.swarm.behaviour_mut().kad.store_mut().put(rec) {
            tracing::debug!(error = %e, "record not stored");
        }
    }

    /// The sequence number of the record held for the identity under `key`, if any.
    fn held_seq(&mut self, key: &kad::RecordKey) -> Option<u64> {
        let held = self.swarm.behaviour_mut().kad.store_mut().get(key)?;
        serde_json::from_slice::<AddressRecord>(&held.value)
            .ok()
            .map(|r| r.seq)
    }

    /// Signs and publishes this node's addresses.
    pub(super) fn publish_record(&mut self) {
        let Some(dht) = self.dht().map(str::to_string) else {
            return;
        };
        let addrs: Vec<String> = worth_dialling(self.listen.iter().cloned())
            .iter()
            .map(|a| a.to_string())
            .collect();
        if addrs.is_empty() {
            return;
        }
        // Milliseconds since the epoch: increasing across restarts.
        self.published_seq = now_millis().max(self.published_seq + 1);
        let r = AddressRecord::with_holders(
            &self.keys,
            &dht,
            self.published_seq,
            addrs,
            self.holders.clone(),
            now_secs(),
            self.settings.record_ttl_secs,
        );
        let mut rec = kad::Record::new(
            kad::RecordKey::new(&AddressRecord::key_for(&dht, &r.id)),
            r.encode(),
        );
        rec.expires = Some(std::time::Instant::now() + Duration::from_secs(self.settings.record_ttl_secs));
        if let Err(e) = self.swarm.behaviour_mut().kad.put_record(rec, kad::Quorum::One) {
            tracing::debug!(error = %e, "could not publish the address record");
        }
    }

    /// Names `holders` in this node's record (distinct, not itself, at most
    /// [`MAX_HOLDERS`]: what a record may say), published again at once if they changed.
    pub(super) fn set_holders(&mut self, holders: Vec<Identity>) {
        let me = self.keys.identity();
        let mut list: Vec<Identity> = Vec::new();
        for h in holders {
            if h != me && !list.contains(&h) && list.len() < MAX_HOLDERS {
                list.push(h);
            }
        }
        if list != self.holders {
            self.holders = list;
            self.publish_record();
        }
    }

    /// Starts a DHT lookup of `id` (one at a time per identity).
    pub(super) fn lookup(
        &mut self,
        id: Identity,
        reply: Option<oneshot::Sender<Result<AddressRecord, NodeError>>>,
    ) {
        if let Some((_, l)) = self.lookups.iter_mut().find(|(_, l)| l.0 == id) {
            l.1.extend(reply);
            return;
        }
        let Some(dht) = self.dht().map(str::to_string) else {
            if let Some(r) = reply {
                let _ = r.send(Err(NodeError::Refused("this node has joined no DHT".into())));
            }
            return;
        };
        let key = kad::RecordKey::new(&AddressRecord::key_for(&dht, &id));
        let q = self.swarm.behaviour_mut().kad.get_record(key);
        self.lookups.insert(q, (id, reply.into_iter().collect(), None));
    }

    /// The record this node holds for `id`, if any.
    pub(super) fn held(&mut self, id: Identity) -> Option<AddressRecord> {
        let dht = self.dht()?.to_string();
        let key = kad::RecordKey::new(&AddressRecord::key_for(&dht, &id));
        let r = self.swarm.behaviour_mut().kad.store_mut().get(&key)?;
        serde_json::from_slice(&r.value).ok()
    }

    /// Sends an arbitrary record to the connected peers, unchecked (for tests of what
    /// peers refuse).
    pub(super) fn offer(&mut self, key: Vec<u8>, value: Vec<u8>) {
        let peers: Vec<PeerId> = self.connected.keys().copied().collect();
        let rec = kad::Record::new(kad::RecordKey::new(&key), value);
        self.swarm
            .behaviour_mut()
            .kad
            .put_record_to(rec, peers.into_iter(), kad::Quorum::One);
    }

    /// Records offered to this node (checked before they are stored) and the steps of its
    /// lookups.
    pub(super) fn kad_event(&mut self, ev: kad::Event) {
        match ev {
            kad::Event::InboundRequest {
                request:
                    kad::InboundRequest::PutRecord {
                        source,
                        record: Some(rec),
                        ..
                    },
            } => {
                let Some(dht) = self.dht().map(str::to_string) else {
                    return;
                };
                let held = self.held_seq(&rec.key);
                match AddressRecord::check(&rec.value, rec.key.as_ref(), &dht, now_secs(), held) {
                    Ok(r) => {
                        self.store_record(&r);
                        self.save();
                        self.publish_status();
                    }
                    Err(e) => {
                        self.records_refused += 1;
                        tracing::warn!(from = %source, error = %e, "refused a DHT record");
                        self.publish_status();
                    }
                }
            }
            kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::GetRecord(res),
                step,
                ..
            } => {
                let Some(dht) = self.dht().map(str::to_string) else {
                    return;
                };
                let mut done = step.last;
                match res {
                    Ok(kad::GetRecordOk::FoundRecord(found)) => {
                        if let Some((_, _, best)) = self.lookups.get_mut(&id) {
                            let held = best.as_ref().map(|b| b.seq);
                            match AddressRecord::check(
                                &found.record.value,
                                found.record.key.as_ref(),
                                &dht,
                                now_secs(),
                                held,
                            ) {
                                Ok(r) => *best = Some(r),
                                Err(e) => {
                                    self.records_refused += 1;
                                    tracing::warn!(error = %e, "ignored a bad record in a lookup");
                                }
                            }
                        }
                    }
                    Ok(kad::GetRecordOk::FinishedWithNoAdditionalRecord { .. }) => done = true,
                    Err(_) => done = true,
                }
                // Every record found is checked and the newest kept, so a stale copy (ours,
                // or a peer's) never wins over a fresher one found later in the query.
                if done && let Some((who, waiting, best)) = self.lookups.remove(&id) {
                    if let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&id) {
                        q.finish();
                    }
                    let answer = match best {
                        Some(r) => {
                            let pid = peer_id_of(&who);
                            let addrs = self.peer_addrs(r.addrs.iter().filter_map(|a| a.parse().ok()));
                            for a in addrs {
                                self.swarm.behaviour_mut().kad.add_address(&pid, a);
                            }
                            self.state.peers.insert(who, r.addrs.clone());
                            self.store_record(&r);
                            if !self.connected.contains_key(&pid) {
                                let _ = self.swarm.dial(pid);
                            }
                            Ok(r)
                        }
                        None => Err(NodeError::NotFound(who.to_string())),
                    };
                    for w in waiting {
                        let _ = w.send(match &answer {
                            Ok(r) => Ok(r.clone()),
                            Err(_) => Err(NodeError::NotFound(who.to_string())),
                        });
                    }
                    for out in self.queued.remove(&who).unwrap_or_default() {
                        if answer.is_ok() {
                            self.send(peer_id_of(&who), out);
                        } else {
                            out.fail(NodeError::NotFound(who.to_string()));
                        }
                    }
                    self.publish_status();
                }
            }
            _ => {}
        }
    }
}
