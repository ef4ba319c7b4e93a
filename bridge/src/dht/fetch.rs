//! Requests between members: fetches (`/plait/fetch/1.0.0`, opaque bytes the server
//! answers through [`crate::types::Serve::fetch`]) and the mirror protocol (`/plait/mirror/1.0.0`, see
//! [`crate::mirror::wire`], answered through [`crate::types::Serve::mirror`]). Ours go to a member once its
//! addresses are known (looked up first if need be); members' are answered off the event
//! loop, and a fetch's answer goes back only if the asker is still a member.
//!
//! It knows nothing of what the bytes mean (the server does), nor of how a member is found
//! (records) or let in (the gate).

use libp2p::PeerId;
use libp2p::request_response;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::Runner;
use crate::identity::Identity;
use crate::mirror::wire;
use crate::types::{NodeError, peer_id_of};

/// A fetch between members; bodies are base64 in the JSON frame.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct FetchRequest {
    path: String,
    body: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) enum FetchReply {
    Ok(String),
    Refused(String),
}

fn b64(b: &[u8]) -> String {
    data_encoding::BASE64_NOPAD.encode(b)
}

fn unb64(s: &str) -> Result<Vec<u8>, NodeError> {
    data_encoding::BASE64_NOPAD
        .decode(s.as_bytes())
        .map_err(|e| NodeError::Refused(format!("bad fetch frame: {e}")))
}

/// An answer to a member's fetch or mirror request, on its way back to the event loop
/// (which checks that the asker is still a member: a fetch may wait for news while it is
/// removed).
pub(super) enum Answer {
    Fetch(PeerId, request_response::ResponseChannel<FetchReply>, FetchReply),
    Mirror(request_response::ResponseChannel<wire::Response>, wire::Response),
}

/// A request to a member, waiting for its peer to be found.
pub(super) enum Outgoing {
    Fetch {
        path: String,
        body: Vec<u8>,
        reply: oneshot::Sender<Result<Vec<u8>, NodeError>>,
    },
    Mirror {
        req: Box<wire::Request>,
        reply: oneshot::Sender<Result<wire::Response, NodeError>>,
    },
}

impl Outgoing {
    pub(super) fn fail(self, e: NodeError) {
        match self {
            Outgoing::Fetch { reply, .. } => drop(reply.send(Err(e))),
            Outgoing::Mirror { reply, .. } => drop(reply.send(Err(e))),
        }
    }
}

impl Runner {
    /// Sends a member's fetch or mirror answer (computed off the event loop), a fetch's
    /// only if the asker is still a member: a fetch may wait for news while it is removed.
    pub(super) fn answer(&mut self, answer: Answer) {
        match answer {
            Answer::Fetch(peer, channel, reply) => {
                let reply = if self.by_peer.contains_key(&peer) {
                    reply
                } else {
                    FetchReply::Refused("not a member".into())
                };
                let _ = self.swarm.behaviour_mut().fetch.send_response(channel, reply);
            }
            // A mirror answer is not withheld: a push was checked and stored (or
            // refused) already, and a removed member is disconnected anyway.
            Answer::Mirror(channel, reply) => {
                let _ = self.swarm.behaviour_mut().mirror.send_response(channel, reply);
            }
        }
    }

    pub(super) fn send(&mut self, pid: PeerId, out: Outgoing) {
        match out {
            Outgoing::Fetch { path, body, reply } => {
                let req = FetchRequest {
                    path,
                    body: b64(&body),
                };
                let rid = self.swarm.behaviour_mut().fetch.send_request(&pid, req);
                self.outbound.insert(rid, reply);
            }
            Outgoing::Mirror { req, reply } => {
                let rid = self.swarm.behaviour_mut().mirror.send_request(&pid, *req);
                self.mirror_out.insert(rid, reply);
            }
        }
    }

    /// Sends a request to member `id`, looking it up first when its addresses are unknown.
    pub(super) fn send_to_member(&mut self, id: Identity, out: Outgoing) {
        if id == self.keys.identity() {
            out.fail(NodeError::Refused("a node does not ask itself".into()));
            return;
        }
        if !self.state.membership.as_ref().is_some_and(|m| m.is_member(&id)) {
            out.fail(NodeError::Refused(format!(
                "{id} is not a member of this node's network"
            )));
            return;
        }
        let pid = peer_id_of(&id);
        let known =
            self.connected.contains_key(&pid) || self.state.peers.get(&id).is_some_and(|a| !a.is_empty());
        if known {
            self.send(pid, out);
        } else {
            self.queued.entry(id).or_default().push(out);
            self.lookup(id, None);
        }
    }

    pub(super) fn fetch_event(&mut self, ev: request_response::Event<FetchRequest, FetchReply>) {
        match ev {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request { request, channel, .. } => {
                    let tx = self.answers.0.clone();
                    let (Some(from), Some(server)) = (self.by_peer.get(&peer).copied(), self.server.clone())
                    else {
                        let why = if self.server.is_none() {
                            "this node serves nothing"
                        } else {
                            "not a member"
                        };
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .fetch
                            .send_response(channel, FetchReply::Refused(why.into()));
                        return;
                    };
                    tokio::spawn(async move {
                        let reply = match unb64(&request.body) {
                            Ok(body) => match server.fetch(from, request.path, body).await {
                                Ok(b) => FetchReply::Ok(b64(&b)),
                                Err(e) => FetchReply::Refused(e),
                            },
                            Err(e) => FetchReply::Refused(e.to_string()),
                        };
                        let _ = tx.send(Answer::Fetch(peer, channel, reply));
                    });
                }
                request_response::Message::Response { request_id, response } => {
                    if let Some(reply) = self.outbound.remove(&request_id) {
                        let _ = reply.send(match response {
                            FetchReply::Ok(b) => unb64(&b),
                            FetchReply::Refused(why) => Err(NodeError::Refused(why)),
                        });
                    }
                }
            },
            request_response::Event::OutboundFailure {
                request_id,
                error,
                peer,
                ..
            } => {
                if matches!(error, request_response::OutboundFailure::DialFailure)
                    && let Some(id) = self.by_peer.get(&peer).copied()
                {
                    // Its addresses are stale (it moved, or restarted on another port):
                    // the next fetch looks it up in the DHT again.
                    self.state.peers.remove(&id);
                }
                if let Some(reply) = self.outbound.remove(&request_id) {
                    let _ = reply.send(Err(NodeError::Unreachable(format!("{peer}: {error}"))));
                }
            }
            _ => {}
        }
    }

    /// The mirror protocol: members' requests go to the server's [`crate::types::Serve::mirror`] (off the
    /// event loop); answers to ours go to whoever waits.
    pub(super) fn mirror_event(&mut self, ev: request_response::Event<wire::Request, wire::Response>) {
        match ev {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request { request, channel, .. } => {
                    let (Some(from), Some(server)) = (self.by_peer.get(&peer).copied(), self.server.clone())
                    else {
                        let why = crate::mirror::Refusal::Unavailable("this node keeps no mirror".into());
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .mirror
                            .send_response(channel, wire::Response::Refused(why));
                        return;
                    };
                    let tx = self.answers.0.clone();
                    tokio::spawn(async move {
                        let reply = server.mirror(from, request).await;
                        let _ = tx.send(Answer::Mirror(channel, reply));
                    });
                }
                request_response::Message::Response { request_id, response } => {
                    if let Some(reply) = self.mirror_out.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
            },
            request_response::Event::OutboundFailure {
                request_id,
                error,
                peer,
                ..
            } => {
                if let Some(reply) = self.mirror_out.remove(&request_id) {
                    let _ = reply.send(Err(NodeError::Unreachable(format!("{peer}: {error}"))));
                }
            }
            _ => {}
        }
    }
}
