//! Invite-only membership of a named DHT.
//!
//! * An [`Invite`] is a capability signed by a member: the DHT's name and root, the
//!   inviter's identity and addresses, an expiry and a number of uses. It travels as a
//!   one-line link ([`Invite::to_link`]).
//! * The invitee answers with a [`JoinRequest`] signed by its own key. A link is a bearer
//!   capability: whoever holds it may join, up to its number of uses and until it expires.
//! * The inviter admits it with a [`MemberCert`]: "`member` is a member of `dht`, admitted
//!   by me". A cert is valid when its admitter is the DHT's root or holds a valid cert
//!   itself, so every member can check every other member's chain back to the root.
//! * [`Membership`] is a node's set of members for its DHT, checked cert by cert; peers that
//!   are not in it are refused at connection time.

use std::collections::{BTreeMap, HashMap};

use data_encoding::BASE64URL_NOPAD;
use serde::{Deserialize, Serialize};

use crate::identity::{Identity, Keypair};
use crate::sign::{self, SignError};

/// The link prefix.
pub const LINK_PREFIX: &str = "plait-invite:";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InviteError {
    #[error("not a Plait invite link")]
    NotALink,
    #[error("the invite link is damaged: {0}")]
    Malformed(String),
    #[error("the invite has expired")]
    Expired,
    #[error("the invite has been used up")]
    UsedUp,
    #[error("the invite was not made by this node")]
    NotMine,
    #[error("the invite is for DHT {0:?}, not this node's")]
    OtherDht(String),
    #[error("the invite's signature is bad")]
    BadInvite,
    #[error("the join request's signature is bad")]
    BadRequest,
}

#[derive(Serialize)]
struct InviteBody<'a> {
    dht: &'a str,
    root: &'a Identity,
    inviter: &'a Identity,
    addrs: &'a [String],
    join_url: &'a str,
    expires_at: u64,
    uses: u32,
    nonce: &'a str,
}

/// A signed capability to join `dht` through `inviter`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invite {
    pub dht: String,
    /// The identity the DHT's membership chains back to.
    pub root: Identity,
    pub inviter: Identity,
    /// The inviter's p2p addresses (multiaddrs).
    pub addrs: Vec<String>,
    /// Where the invitee presents the invite (the inviter's join endpoint).
    pub join_url: String,
    pub expires_at: u64,
    /// How many nodes may join with it.
    pub uses: u32,
    /// Names this invite (uses are counted per nonce).
    pub nonce: String,
    pub sig: String,
}

impl Invite {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        keys: &Keypair,
        dht: &str,
        root: Identity,
        addrs: Vec<String>,
        join_url: String,
        expires_at: u64,
        uses: u32,
    ) -> Invite {
        let nonce = BASE64URL_NOPAD.encode(&rand::random::<[u8; 12]>());
        let inviter = keys.identity();
        let sig = sign::sign(
            keys,
            "plait-invite-v1",
            &InviteBody {
                dht,
                root: &root,
                inviter: &inviter,
                addrs: &addrs,
                join_url: &join_url,
                expires_at,
                uses,
                nonce: &nonce,
            },
        );
        Invite {
            dht: dht.into(),
            root,
            inviter,
            addrs,
            join_url,
            expires_at,
            uses,
            nonce,
            sig,
        }
    }

    fn body(&self) -> InviteBody<'_> {
        InviteBody {
            dht: &self.dht,
            root: &self.root,
            inviter: &self.inviter,
            addrs: &self.addrs,
            join_url: &self.join_url,
            expires_at: self.expires_at,
            uses: self.uses,
            nonce: &self.nonce,
        }
    }

    /// The invite as one line.
    pub fn to_link(&self) -> String {
        format!(
            "{LINK_PREFIX}{}",
            BASE64URL_NOPAD.encode(&serde_json::to_vec(self).expect("invites serialize"))
        )
    }

    /// Reads a link and checks the inviter's signature (not expiry: the inviter decides).
    pub fn from_link(link: &str) -> Result<Invite, InviteError> {
        let b64 = link
            .trim()
            .strip_prefix(LINK_PREFIX)
            .ok_or(InviteError::NotALink)?;
        let json = BASE64URL_NOPAD
            .decode(b64.as_bytes())
            .map_err(|e| InviteError::Malformed(e.to_string()))?;
        let inv: Invite = serde_json::from_slice(&json).map_err(|e| InviteError::Malformed(e.to_string()))?;
        inv.check_signature()?;
        Ok(inv)
    }

    pub fn check_signature(&self) -> Result<(), InviteError> {
        sign::verify(&self.inviter, "plait-invite-v1", &self.body(), &self.sig)
            .map_err(|_| InviteError::BadInvite)
    }
}

/// An invitee's request to be admitted with an invite.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    pub invite: Invite,
    pub member: Identity,
    /// Its p2p addresses, so the inviter can reach it.
    pub addrs: Vec<String>,
    /// `member`'s signature of (invite nonce, member, addrs): the inviter learns who used
    /// the invite, and nobody can make a request in another's name.
    pub sig: String,
}

impl JoinRequest {
    pub fn new(invite: Invite, keys: &Keypair, addrs: Vec<String>) -> JoinRequest {
        let member = keys.identity();
        let sig = sign::sign(keys, "plait-join-v1", &(&invite.nonce, &member, &addrs));
        JoinRequest {
            invite,
            member,
            addrs,
            sig,
        }
    }

    pub fn check_signature(&self) -> Result<(), InviteError> {
        sign::verify(
            &self.member,
            "plait-join-v1",
            &(&self.invite.nonce, &self.member, &self.addrs),
            &self.sig,
        )
        .map_err(|_| InviteError::BadRequest)
    }
}

/// "`member` belongs to `dht`; admitted by `by`."
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberCert {
    pub dht: String,
    pub member: Identity,
    pub by: Identity,
    pub at: u64,
    pub sig: String,
}

impl MemberCert {
    pub fn new(keys: &Keypair, dht: &str, member: Identity, at: u64) -> MemberCert {
        let by = keys.identity();
        let sig = sign::sign(keys, "plait-member-v1", &(dht, &member, &by, at));
        MemberCert {
            dht: dht.into(),
            member,
            by,
            at,
            sig,
        }
    }

    fn check_signature(&self) -> Result<(), SignError> {
        sign::verify(
            &self.by,
            "plait-member-v1",
            &(&self.dht, &self.member, &self.by, self.at),
            &self.sig,
        )
    }
}

/// The members of one DHT, each with the cert that admitted it (the root needs none).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Membership {
    pub dht: String,
    pub root: Identity,
    certs: BTreeMap<Identity, MemberCert>,
    /// Uses of this node's invites, by nonce.
    #[serde(default)]
    uses: HashMap<String, u32>,
}

impl Membership {
    /// A new DHT whose root is `root`.
    pub fn new(dht: &str, root: Identity) -> Membership {
        Membership {
            dht: dht.into(),
            root,
            certs: BTreeMap::new(),
            uses: HashMap::new(),
        }
    }

    pub fn is_member(&self, id: &Identity) -> bool {
        *id == self.root || self.certs.contains_key(id)
    }

    /// Every member (the root first).
    pub fn members(&self) -> Vec<Identity> {
        std::iter::once(self.root)
            .chain(self.certs.keys().copied().filter(|m| *m != self.root))
            .collect()
    }

    pub fn certs(&self) -> Vec<MemberCert> {
        self.certs.values().cloned().collect()
    }

    /// Adds the certs that check (in any order: a cert may depend on another in the same
    /// batch); returns the members that are new. Bad certs are skipped.
    pub fn merge(&mut self, certs: impl IntoIterator<Item = MemberCert>) -> Vec<Identity> {
        let mut pending: Vec<MemberCert> = certs
            .into_iter()
            .filter(|c| c.dht == self.dht && !self.is_member(&c.member) && c.check_signature().is_ok())
            .collect();
        let mut added = Vec::new();
        loop {
            let before = pending.len();
            pending.retain(|c| {
                if self.is_member(&c.member) {
                    return false;
                }
                if self.is_member(&c.by) {
                    self.certs.insert(c.member, c.clone());
                    added.push(c.member);
                    false
                } else {
                    true
                }
            });
            if pending.len() == before {
                break;
            }
        }
        added
    }

    /// Admits the sender of `req` with one of `keys`' own invites, at time `now`.
    pub fn admit(&mut self, keys: &Keypair, req: &JoinRequest, now: u64) -> Result<MemberCert, InviteError> {
        let inv = &req.invite;
        inv.check_signature()?;
        req.check_signature()?;
        if inv.inviter != keys.identity() {
            return Err(InviteError::NotMine);
        }
        if inv.dht != self.dht {
            return Err(InviteError::OtherDht(inv.dht.clone()));
        }
        if inv.expires_at <= now {
            return Err(InviteError::Expired);
        }
        if let Some(c) = self.certs.get(&req.member) {
            return Ok(c.clone());
        }
        let used = self.uses.entry(inv.nonce.clone()).or_insert(0);
        if *used >= inv.uses {
            return Err(InviteError::UsedUp);
        }
        *used += 1;
        let cert = MemberCert::new(keys, &self.dht, req.member, now);
        self.certs.insert(req.member, cert.clone());
        Ok(cert)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn invite(k: &Keypair, root: Identity, uses: u32) -> Invite {
        Invite::new(
            k,
            "net",
            root,
            vec!["/ip4/127.0.0.1/tcp/9".into()],
            "http://127.0.0.1:1/.well-known/plait/join".into(),
            NOW + 60,
            uses,
        )
    }

    #[test]
    fn links_round_trip_and_tampering_is_caught() {
        let a = Keypair::generate();
        let inv = invite(&a, a.identity(), 1);
        let link = inv.to_link();
        assert!(!link.contains(char::is_whitespace));
        assert_eq!(Invite::from_link(&link).unwrap(), inv);
        let mut t = inv.clone();
        t.uses = 100;
        assert_eq!(Invite::from_link(&t.to_link()), Err(InviteError::BadInvite));
        assert_eq!(
            Invite::from_link("https://example.com"),
            Err(InviteError::NotALink)
        );
        assert!(matches!(
            Invite::from_link("plait-invite:!!"),
            Err(InviteError::Malformed(_))
        ));
    }

    #[test]
    fn a_chain_of_invites_admits_and_every_member_can_check_it() {
        let (a, b, c, d) = (
            Keypair::generate(),
            Keypair::generate(),
            Keypair::generate(),
            Keypair::generate(),
        );
        let mut at_a = Membership::new("net", a.identity());
        // A invites B.
        let cert_b = at_a
            .admit(
                &a,
                &JoinRequest::new(invite(&a, a.identity(), 1), &b, vec![]),
                NOW,
            )
            .unwrap();
        let mut at_b = Membership::new("net", a.identity());
        assert_eq!(at_b.merge(at_a.certs()), vec![b.identity()]);
        // B invites C; A learns C from B's certs, checking the chain C <- B <- A.
        let inv_b = invite(&b, a.identity(), 1);
        let cert_c = at_b
            .admit(&b, &JoinRequest::new(inv_b.clone(), &c, vec![]), NOW)
            .unwrap();
        assert_eq!(at_a.merge([cert_c.clone()]), vec![c.identity()]);
        assert!(at_a.is_member(&c.identity()));
        // The invite is used up; a second use by D is refused.
        assert_eq!(
            at_b.admit(&b, &JoinRequest::new(inv_b, &d, vec![]), NOW),
            Err(InviteError::UsedUp)
        );
        // Certs out of order still merge.
        let mut fresh = Membership::new("net", a.identity());
        assert_eq!(fresh.merge([cert_c, cert_b]).len(), 2);
        // A cert by a non-member, or forged, is skipped.
        let by_d = MemberCert::new(&d, "net", Keypair::generate().identity(), NOW);
        let mut forged = MemberCert::new(&b, "net", d.identity(), NOW);
        forged.by = a.identity();
        assert!(at_a.merge([by_d, forged]).is_empty());
        assert!(!at_a.is_member(&d.identity()));
    }

    #[test]
    fn admission_checks_the_invite() {
        let (a, b, x) = (Keypair::generate(), Keypair::generate(), Keypair::generate());
        let mut m = Membership::new("net", a.identity());
        // Expired.
        let old = Invite::new(&a, "net", a.identity(), vec![], String::new(), NOW - 1, 1);
        assert_eq!(
            m.admit(&a, &JoinRequest::new(old, &b, vec![]), NOW),
            Err(InviteError::Expired)
        );
        // Made by someone else.
        let other = invite(&x, a.identity(), 1);
        assert_eq!(
            m.admit(&a, &JoinRequest::new(other, &b, vec![]), NOW),
            Err(InviteError::NotMine)
        );
        // A request signed by a key other than the member's.
        let mut req = JoinRequest::new(invite(&a, a.identity(), 1), &b, vec![]);
        req.member = x.identity();
        assert_eq!(m.admit(&a, &req, NOW), Err(InviteError::BadRequest));
        assert!(!m.is_member(&b.identity()) && !m.is_member(&x.identity()));
    }
}
