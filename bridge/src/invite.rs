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
//! * A [`Removal`] ("`member` is out, removed by `by`") is a tombstone, signed by the DHT's
//!   root or by the member that admitted the removed one. It is kept for good: a removed
//!   identity is never a member again, whatever cert for it comes along later, and certs it
//!   made stop counting. The members it admitted stay: the remover signs each of them a new
//!   cert, which travels with the removal, so their chains reach the root again.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use data_encoding::BASE64URL_NOPAD;
use serde::{Deserialize, Serialize};

use crate::identity::{Identity, Keypair};
use crate::sign::{self, SignError};

/// The link prefix.
pub const LINK_PREFIX: &str = "plait-invite:";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
/// Identities are held in their text form: an `Identity` is a large value to carry in an
/// error.
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
    #[error("the invite's signature is not the inviter's ({0}): the link was altered or forged")]
    BadInvite(String),
    #[error("the join request's signature is bad")]
    BadRequest,
    #[error("{0} was removed from this network")]
    Removed(String),
    #[error("{0} is not a member of this network")]
    NotAMember(String),
    #[error("the network's root cannot be removed")]
    RootStays,
    #[error("a member cannot remove itself")]
    SelfRemoval,
    #[error(
        "only the network's root ({root}) or the member that admitted {member} ({admitter}) may remove it"
    )]
    NotAllowed {
        member: String,
        admitter: String,
        root: String,
    },
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
            .map_err(|_| InviteError::BadInvite(self.inviter.to_string()))
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

    pub fn check_signature(&self) -> Result<(), SignError> {
        sign::verify(
            &self.by,
            "plait-member-v1",
            &(&self.dht, &self.member, &self.by, self.at),
            &self.sig,
        )
    }
}

/// "`member` no longer belongs to `dht`; removed by `by`." Kept for good (a tombstone), so
/// the removed identity cannot come back with its old cert or a new one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removal {
    pub dht: String,
    pub member: Identity,
    pub by: Identity,
    pub at: u64,
    /// The cert that admitted `member`, as the remover held it: a remover other than the
    /// root shows with it that it is the admitter, to nodes that never saw that cert.
    pub cert: Option<MemberCert>,
    pub sig: String,
}

impl Removal {
    pub fn new(keys: &Keypair, dht: &str, member: Identity, cert: Option<MemberCert>, at: u64) -> Removal {
        let by = keys.identity();
        let sig = sign::sign(keys, "plait-removal-v1", &(dht, &member, &by, at));
        Removal {
            dht: dht.into(),
            member,
            by,
            at,
            cert,
            sig,
        }
    }

    pub fn check_signature(&self) -> Result<(), SignError> {
        sign::verify(
            &self.by,
            "plait-removal-v1",
            &(&self.dht, &self.member, &self.by, self.at),
            &self.sig,
        )
    }
}

/// What a merge changed: members that came and went, and the certs and removals it took
/// in (what is worth passing on to other members).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Merged {
    pub added: Vec<Identity>,
    pub gone: Vec<Identity>,
    pub certs: Vec<MemberCert>,
    pub removals: Vec<Removal>,
}

impl Merged {
    pub fn is_empty(&self) -> bool {
        self.certs.is_empty() && self.removals.is_empty()
    }
}

/// The members of one DHT, each with the cert that admitted it (the root needs none), and
/// the members removed from it.
///
/// Invariant: every cert held chains back to the root through members that are held, and
/// no removed identity is held.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Membership {
    pub dht: String,
    pub root: Identity,
    certs: BTreeMap<Identity, MemberCert>,
    /// Tombstones, by removed identity.
    #[serde(default)]
    removed: BTreeMap<Identity, Removal>,
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
            removed: BTreeMap::new(),
            uses: HashMap::new(),
        }
    }

    pub fn is_member(&self, id: &Identity) -> bool {
        *id == self.root || self.certs.contains_key(id)
    }

    pub fn is_removed(&self, id: &Identity) -> bool {
        self.removed.contains_key(id)
    }

    /// Every member (the root first).
    pub fn members(&self) -> Vec<Identity> {
        std::iter::once(self.root)
            .chain(self.certs.keys().copied().filter(|m| *m != self.root))
            .collect()
    }

    /// The cert that admitted `id` (none for the root and for non-members).
    pub fn cert(&self, id: &Identity) -> Option<&MemberCert> {
        self.certs.get(id)
    }

    pub fn certs(&self) -> Vec<MemberCert> {
        self.certs.values().cloned().collect()
    }

    /// Every tombstone.
    pub fn removals(&self) -> Vec<Removal> {
        self.removed.values().cloned().collect()
    }

    /// Whether `r`'s signer may remove its member: the root may remove anyone but itself;
    /// another member only one it admitted (shown by the cert `r` carries).
    fn may_remove(&self, r: &Removal) -> bool {
        if r.member == self.root || r.member == r.by {
            return false;
        }
        if r.by == self.root {
            return true;
        }
        self.is_member(&r.by)
            && r.cert.as_ref().is_some_and(|c| {
                c.dht == self.dht && c.member == r.member && c.by == r.by && c.check_signature().is_ok()
            })
    }

    /// Takes in removals and certs from another member (in any order: a cert may depend
    /// on another in the same batch). Removals come first, each checked against the
    /// members held before the batch; certs of removed identities, and certs whose chain
    /// no longer reaches the root, are dropped — unless the batch brings their member a
    /// new cert that does (a removal travels with the certs its remover gave the members
    /// the removed one had admitted). Forged or unauthorised entries are skipped.
    pub fn merge(
        &mut self,
        certs: impl IntoIterator<Item = MemberCert>,
        removals: impl IntoIterator<Item = Removal>,
    ) -> Merged {
        let before: BTreeSet<Identity> = self.members().into_iter().collect();
        let mut taken = Vec::new();
        for r in removals {
            let fresh = r.dht == self.dht
                && !self.removed.contains_key(&r.member)
                && !taken.iter().any(|t: &Removal| t.member == r.member);
            if fresh && r.check_signature().is_ok() && self.may_remove(&r) {
                taken.push(r);
            }
        }
        for r in &taken {
            self.certs.remove(&r.member);
            self.removed.insert(r.member, r.clone());
        }
        // Certs whose admitter is gone wait with the new ones: a new cert for their admitter
        // puts them back.
        let mut orphans = Vec::new();
        loop {
            let gone: Vec<Identity> = self
                .certs
                .values()
                .filter(|c| !self.is_member(&c.by))
                .map(|c| c.member)
                .collect();
            if gone.is_empty() {
                break;
            }
            for m in gone {
                orphans.extend(self.certs.remove(&m));
            }
        }
        let mut pending: Vec<(bool, MemberCert)> = certs
            .into_iter()
            .filter(|c| {
                c.dht == self.dht
                    && !self.is_member(&c.member)
                    && !self.removed.contains_key(&c.member)
                    && c.check_signature().is_ok()
            })
            .map(|c| (true, c))
            .chain(orphans.into_iter().map(|c| (false, c)))
            .collect();
        let mut took_certs = Vec::new();
        loop {
            let left = pending.len();
            pending.retain(|(new, c)| {
                if self.is_member(&c.member) {
                    return false;
                }
                if self.is_member(&c.by) {
                    self.certs.insert(c.member, c.clone());
                    if *new {
                        took_certs.push(c.clone());
                    }
                    false
                } else {
                    true
                }
            });
            if pending.len() == left {
                break;
            }
        }
        let after: BTreeSet<Identity> = self.members().into_iter().collect();
        Merged {
            added: after.difference(&before).copied().collect(),
            gone: before.difference(&after).copied().collect(),
            certs: took_certs,
            removals: taken,
        }
    }

    /// Removes `member` as `keys` (the root, or the member that admitted it), at time
    /// `now`. The members it admitted get new certs signed by `keys`, so they stay (and so
    /// do the ones they admitted). The answer is what to tell the other members.
    pub fn remove(&mut self, keys: &Keypair, member: Identity, now: u64) -> Result<Merged, InviteError> {
        let me = keys.identity();
        if member == self.root {
            return Err(InviteError::RootStays);
        }
        if member == me {
            return Err(InviteError::SelfRemoval);
        }
        if self.removed.contains_key(&member) {
            return Err(InviteError::Removed(member.to_string()));
        }
        let Some(cert) = self.certs.get(&member).cloned() else {
            return Err(InviteError::NotAMember(member.to_string()));
        };
        let removal = Removal::new(keys, &self.dht, member, Some(cert.clone()), now);
        if !self.is_member(&me) || !self.may_remove(&removal) {
            return Err(InviteError::NotAllowed {
                member: member.to_string(),
                admitter: cert.by.to_string(),
                root: self.root.to_string(),
            });
        }
        let adopted: Vec<MemberCert> = self
            .certs
            .values()
            .filter(|c| c.by == member)
            .map(|c| MemberCert::new(keys, &self.dht, c.member, now))
            .collect();
        Ok(self.merge(adopted, [removal]))
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
        // This node was removed (and has heard so): its invites are void.
        if self.removed.contains_key(&inv.inviter) || !self.is_member(&inv.inviter) {
            return Err(InviteError::Removed(inv.inviter.to_string()));
        }
        if self.removed.contains_key(&req.member) {
            return Err(InviteError::Removed(req.member.to_string()));
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
        assert_eq!(
            Invite::from_link(&t.to_link()),
            Err(InviteError::BadInvite(a.identity().to_string()))
        );
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
        assert_eq!(at_b.merge(at_a.certs(), []).added, vec![b.identity()]);
        // B invites C; A learns C from B's certs, checking the chain C <- B <- A.
        let inv_b = invite(&b, a.identity(), 1);
        let cert_c = at_b
            .admit(&b, &JoinRequest::new(inv_b.clone(), &c, vec![]), NOW)
            .unwrap();
        assert_eq!(at_a.merge([cert_c.clone()], []).added, vec![c.identity()]);
        assert!(at_a.is_member(&c.identity()));
        // The invite is used up; a second use by D is refused.
        assert_eq!(
            at_b.admit(&b, &JoinRequest::new(inv_b, &d, vec![]), NOW),
            Err(InviteError::UsedUp)
        );
        // Certs out of order still merge.
        let mut fresh = Membership::new("net", a.identity());
        assert_eq!(fresh.merge([cert_c, cert_b], []).added.len(), 2);
        // A cert by a non-member, or forged, is skipped.
        let by_d = MemberCert::new(&d, "net", Keypair::generate().identity(), NOW);
        let mut forged = MemberCert::new(&b, "net", d.identity(), NOW);
        forged.by = a.identity();
        assert!(at_a.merge([by_d, forged], []).is_empty());
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

    /// A admits B, B admits C, C admits D; `at_a` holds them all.
    fn chain_of_four() -> ([Keypair; 4], Membership) {
        let keys = [(); 4].map(|_| Keypair::generate());
        let [a, b, c, d] = &keys;
        let root = a.identity();
        let mut at_a = Membership::new("net", root);
        let cert_b = at_a
            .admit(a, &JoinRequest::new(invite(a, root, 1), b, vec![]), NOW)
            .unwrap();
        let mut at_b = Membership::new("net", root);
        at_b.merge([cert_b], []);
        let cert_c = at_b
            .admit(b, &JoinRequest::new(invite(b, root, 1), c, vec![]), NOW)
            .unwrap();
        let mut at_c = Membership::new("net", root);
        at_c.merge(at_b.certs(), []);
        let cert_d = at_c
            .admit(c, &JoinRequest::new(invite(c, root, 1), d, vec![]), NOW)
            .unwrap();
        assert_eq!(at_a.merge([cert_c, cert_d], []).added.len(), 2);
        (keys, at_a)
    }

    #[test]
    fn a_removed_member_is_out_and_the_ones_it_admitted_stay() {
        let ([a, b, c, d], mut at_a) = chain_of_four();
        let old_certs = at_a.certs();
        let mut at_b = Membership::new("net", a.identity());
        at_b.merge(old_certs.clone(), []);

        let told = at_a.remove(&a, c.identity(), NOW + 1).unwrap();
        assert_eq!(told.gone, vec![c.identity()]);
        assert!(!at_a.is_member(&c.identity()) && at_a.is_removed(&c.identity()));
        // D, admitted by C, stays: A signed it a new cert, which travels with the removal.
        assert!(at_a.is_member(&d.identity()));
        assert_eq!(at_a.cert(&d.identity()).unwrap().by, a.identity());
        assert_eq!(told.certs.len(), 1);
        assert_eq!(told.removals.len(), 1);

        // B learns of it from A: the same members, and nothing more to pass on the second time.
        let learned = at_b.merge(told.certs.clone(), told.removals.clone());
        assert_eq!((learned.gone, learned.added), (vec![c.identity()], vec![]));
        assert_eq!(at_b.members(), at_a.members());
        assert!(at_b.merge(told.certs.clone(), told.removals.clone()).is_empty());

        // C's old cert, gossiped again by a member that has not heard, does not bring it back;
        // nor does a new cert for C, nor a cert C made after its removal.
        let e = Keypair::generate();
        let by_c = MemberCert::new(&c, "net", e.identity(), NOW + 2);
        let again = MemberCert::new(&b, "net", c.identity(), NOW + 2);
        assert!(at_b.merge(old_certs.clone(), []).is_empty());
        assert!(at_b.merge([again, by_c], []).is_empty());
        assert!(!at_b.is_member(&c.identity()) && !at_b.is_member(&e.identity()));

        // A node that knew nothing takes old certs, new certs and the removal at once.
        let mut fresh = Membership::new("net", a.identity());
        let mut all = old_certs.clone();
        all.extend(told.certs.clone());
        fresh.merge(all, told.removals.clone());
        assert_eq!(fresh.members(), at_a.members());

        // C cannot rejoin through an invite, and invites C made are void where C has heard.
        assert_eq!(
            at_b.admit(
                &b,
                &JoinRequest::new(invite(&b, a.identity(), 1), &c, vec![]),
                NOW + 3
            ),
            Err(InviteError::Removed(c.identity().to_string()))
        );
        let mut at_c = Membership::new("net", a.identity());
        at_c.merge(old_certs, told.removals.clone());
        assert_eq!(
            at_c.admit(
                &c,
                &JoinRequest::new(invite(&c, a.identity(), 1), &e, vec![]),
                NOW + 3
            ),
            Err(InviteError::Removed(c.identity().to_string()))
        );

        // The tombstone is kept with the rest of the state.
        let reloaded: Membership = serde_json::from_str(&serde_json::to_string(&at_b).unwrap()).unwrap();
        assert!(reloaded.is_removed(&c.identity()));
        assert_eq!(reloaded.members(), at_b.members());
    }

    #[test]
    fn only_the_root_or_the_admitter_removes() {
        let ([a, b, c, d], mut at_a) = chain_of_four();
        let mut at_b = Membership::new("net", a.identity());
        at_b.merge(at_a.certs(), []);
        // The root stays; nobody removes itself.
        assert_eq!(at_b.remove(&b, a.identity(), NOW), Err(InviteError::RootStays));
        assert_eq!(at_b.remove(&b, b.identity(), NOW), Err(InviteError::SelfRemoval));
        // B did not admit D (C did).
        assert_eq!(
            at_b.remove(&b, d.identity(), NOW),
            Err(InviteError::NotAllowed {
                member: d.identity().to_string(),
                admitter: c.identity().to_string(),
                root: a.identity().to_string(),
            })
        );
        // A removal of B signed by D (no authority), or forged in A's name, is skipped.
        let by_d = Removal::new(&d, "net", b.identity(), at_a.cert(&b.identity()).cloned(), NOW);
        let mut forged = by_d.clone();
        forged.by = a.identity();
        assert!(at_a.merge([], [by_d, forged]).is_empty());
        assert!(at_a.is_member(&b.identity()));

        // B removes C, whom it admitted; A, the root, accepts it, and D stays (B adopts it).
        let told = at_b.remove(&b, c.identity(), NOW).unwrap();
        assert_eq!(at_b.cert(&d.identity()).unwrap().by, b.identity());
        let learned = at_a.merge(told.certs, told.removals.clone());
        assert_eq!(learned.gone, vec![c.identity()]);
        assert!(at_a.is_member(&d.identity()));
        // A node that never saw C's cert still checks B's authority: the removal carries it.
        let mut other = Membership::new("net", a.identity());
        other.merge(at_a.certs().into_iter().filter(|c| c.by == a.identity()), []);
        assert!(!other.is_member(&c.identity()));
        assert_eq!(other.merge([], told.removals).removals.len(), 1);
        assert!(other.is_removed(&c.identity()));
    }
}
