//! What a node keeps of itself between runs, and how: each membership's state (members,
//! records held for others, known peer addresses, its own ports) in one document, written
//! in order through a [`StateStore`] the server gives (or a [`FileStore`]), saves that
//! queue up behind a slow one coalesced.
//!
//! It knows nothing of swarms or of what the node does with its state: the node loads it
//! at start, each membership sends a `SaveJob` when its state changes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::identity::Identity;
use crate::invite::Membership;
use crate::record::AddressRecord;

/// What is kept on disk of one membership.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct DhtState {
    pub membership: Option<Membership>,
    /// Last known addresses of members.
    #[serde(default)]
    pub peers: HashMap<Identity, Vec<String>>,
    /// Records held for others (checked again when loaded).
    #[serde(default)]
    pub records: Vec<AddressRecord>,
    /// The addresses this membership listens on, when not `settings.listen` (every DHT
    /// after the first has its own ports: chosen by the system once, then kept, so members
    /// find it where they last saw it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<Vec<String>>,
}

/// Where a node keeps its state (members, peers' addresses, records held). The server
/// implements it over its storage; [`FileStore`] keeps it in a file.
pub trait StateStore: Send + Sync + 'static {
    fn load(&self) -> BoxFuture<'static, Result<Option<Vec<u8>>, String>>;
    fn save(&self, bytes: Vec<u8>) -> BoxFuture<'static, Result<(), String>>;
}

/// A [`StateStore`] in one file, replaced atomically.
pub struct FileStore(pub PathBuf);

impl StateStore for FileStore {
    fn load(&self) -> BoxFuture<'static, Result<Option<Vec<u8>>, String>> {
        let path = self.0.clone();
        Box::pin(async move {
            match tokio::fs::read(&path).await {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(format!("{}: {e}", path.display())),
            }
        })
    }

    fn save(&self, bytes: Vec<u8>) -> BoxFuture<'static, Result<(), String>> {
        let path = self.0.clone();
        Box::pin(async move {
            let tmp = path.with_extension("tmp");
            let shown = path.display().to_string();
            let write = move || -> std::io::Result<()> {
                use std::io::Write;
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(&bytes)?;
                f.sync_all()?;
                std::fs::rename(&tmp, &path)
            };
            tokio::task::spawn_blocking(write)
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("{shown}: {e}"))
        })
    }
}

/// A save of one membership's state (by its slot); `ack` is told once it (or a later
/// one) is stored.
pub(crate) struct SaveJob {
    pub slot: usize,
    pub state: serde_json::Value,
    pub ack: Option<Box<dyn FnOnce() + Send>>,
}

/// What is kept: each membership's state, the first one's listening on `settings.listen`.
#[derive(Default, Serialize, Deserialize)]
pub(crate) struct Persisted {
    pub dhts: Vec<DhtState>,
}

impl Persisted {
    pub(crate) fn from_bytes(bytes: Option<Vec<u8>>) -> Persisted {
        let Some(b) = bytes else {
            return Persisted::default();
        };
        let parsed = serde_json::from_slice::<serde_json::Value>(&b).and_then(|v| {
            if v.get("dhts").is_some() {
                serde_json::from_value::<Persisted>(v)
            } else {
                // Before several DHTs: one membership's state at the top.
                serde_json::from_value::<DhtState>(v).map(|d| Persisted { dhts: vec![d] })
            }
        });
        match parsed {
            Ok(mut p) => {
                p.dhts.retain(|d| d.membership.is_some());
                p
            }
            Err(e) => {
                tracing::warn!(error = %e, "p2p state unreadable; starting afresh");
                Persisted::default()
            }
        }
    }
}

/// Writes the node's state in order, coalescing saves that queue up behind a slow one.
pub(crate) async fn saver(
    store: Arc<dyn StateStore>,
    mut slots: Vec<serde_json::Value>,
    mut rx: mpsc::UnboundedReceiver<SaveJob>,
) {
    while let Some(first) = rx.recv().await {
        let mut acks: Vec<Box<dyn FnOnce() + Send>> = Vec::new();
        let mut job = Some(first);
        while let Some(j) = job {
            if slots.len() <= j.slot {
                slots.resize(j.slot + 1, serde_json::Value::Null);
            }
            slots[j.slot] = j.state;
            acks.extend(j.ack);
            job = rx.try_recv().ok();
        }
        // A membership-to-be (a swarm that has joined nothing) has nothing worth keeping.
        let dhts: Vec<&serde_json::Value> = slots
            .iter()
            .filter(|v| v.get("membership").is_some_and(|m| !m.is_null()))
            .collect();
        let bytes = serde_json::to_vec_pretty(&serde_json::json!({ "dhts": dhts })).expect("serializes");
        if let Err(e) = store.save(bytes).await {
            tracing::warn!(error = %e, "could not save the p2p state");
        }
        for a in acks {
            a();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Keypair;

    fn state(dht: &str) -> DhtState {
        DhtState {
            membership: Some(Membership::new(dht, Keypair::generate().identity())),
            ..DhtState::default()
        }
    }

    #[test]
    fn saved_state_of_one_dht_or_several_loads() {
        // A node from before several DHTs kept one membership's state at the top.
        let old = serde_json::to_vec(&state("plait")).unwrap();
        let p = Persisted::from_bytes(Some(old));
        assert_eq!(p.dhts.len(), 1);
        assert_eq!(p.dhts[0].membership.as_ref().unwrap().dht, "plait");

        let both = Persisted {
            dhts: vec![state("plait"), state("friends"), DhtState::default()],
        };
        let p = Persisted::from_bytes(Some(serde_json::to_vec(&both).unwrap()));
        let names: Vec<&str> = p
            .dhts
            .iter()
            .map(|d| d.membership.as_ref().unwrap().dht.as_str())
            .collect();
        assert_eq!(
            names,
            ["plait", "friends"],
            "a swarm that joined nothing is not kept"
        );

        assert!(Persisted::from_bytes(Some(b"not json".to_vec())).dhts.is_empty());
        assert!(Persisted::from_bytes(None).dhts.is_empty());
    }
}
