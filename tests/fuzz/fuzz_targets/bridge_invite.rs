//! What another server sends during and after joining: invite links (`Invite::from_link`),
//! join requests (admitted by `Membership::admit`), member certs and removals from peers
//! (`Membership::merge`), join grants (`JoinGrant::check`), and identities in their text
//! form. Input: a link, or JSON of one of those values (each parser is tried).
//!
//! Beyond not panicking: nothing unsigned gets in. The membership stays as its invariant
//! says (the root is a member, nobody removed is, every cert held was signed by a member),
//! a join request is admitted only with this node's own invite and the requester's
//! signature, and a grant is taken only with a cert for this node signed by the inviter.

#![no_main]

use libfuzzer_sys::fuzz_target;
use plait_bridge::invite::{Invite, JoinRequest, MemberCert, Membership, Removal};
use plait_bridge::types::JoinGrant;
use plait_bridge::{Identity, Keypair};

const NOW: u64 = 1_800_000_000;

#[derive(serde::Deserialize)]
struct Batch {
    #[serde(default)]
    certs: Vec<MemberCert>,
    #[serde(default)]
    removals: Vec<Removal>,
}

fn holds_invariant(m: &Membership) {
    assert!(m.is_member(&m.root));
    for id in m.members() {
        assert!(!m.is_removed(&id), "{id} is removed and a member");
        if let Some(c) = m.cert(&id) {
            assert!(m.is_member(&c.by), "{id}'s admitter is not a member");
            assert!(c.check_signature().is_ok());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let root = Keypair::from_secret_bytes(&[1; 32]);
    let mut m = Membership::new("net", root.identity());
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(inv) = Invite::from_link(text) {
        assert!(inv.check_signature().is_ok());
    }
    let _ = text.trim().parse::<Identity>();
    if let Ok(req) = serde_json::from_str::<JoinRequest>(text) {
        if let Ok(cert) = m.admit(&root, &req, NOW) {
            // Only this node's own invites admit, and only for the one who signed the request.
            assert_eq!(req.invite.inviter, root.identity());
            assert!(req.invite.check_signature().is_ok() && req.check_signature().is_ok());
            assert_eq!(cert.member, req.member);
            assert!(m.is_member(&req.member));
        }
        holds_invariant(&m);
    }
    if let Ok(batch) = serde_json::from_str::<Batch>(text) {
        let merged = m.merge(batch.certs, batch.removals);
        assert!(merged.certs.iter().all(|c| c.check_signature().is_ok()));
        assert!(merged.removals.iter().all(|r| r.check_signature().is_ok()));
        holds_invariant(&m);
    }
    if let Ok(grant) = serde_json::from_str::<JoinGrant>(text) {
        let inv = Invite::new(
            &root,
            "net",
            root.identity(),
            vec![],
            "http://127.0.0.1:1/".into(),
            NOW,
            1,
        );
        let me = Keypair::from_secret_bytes(&[2; 32]).identity();
        if grant.check(&inv, &me).is_ok() {
            assert!(
                grant
                    .certs
                    .iter()
                    .any(|c| c.member == me && c.by == root.identity() && c.check_signature().is_ok())
            );
        }
    }
});
