//! Real libp2p nodes on loopback (in one process): an invite chain, lookups through the
//! DHT, the gate, record filtering, relays, and one node in several DHTs at once.

use std::time::Duration;

use plait_bridge::Keypair;
use plait_bridge::node::Node;
use plait_bridge::record::AddressRecord;
use plait_bridge::types::NodeSettings;

const T: Duration = Duration::from_secs(10);

/// Answers a fetch with who asked, for what, and what they sent.
struct Echo;

impl plait_bridge::types::Serve for Echo {
    fn fetch(
        &self,
        from: plait_bridge::Identity,
        path: String,
        body: Vec<u8>,
    ) -> futures::future::BoxFuture<'static, Result<Vec<u8>, String>> {
        Box::pin(async move {
            if path == "refuse" {
                return Err("no".into());
            }
            Ok(format!("{from} {path} {}", String::from_utf8_lossy(&body)).into_bytes())
        })
    }
}

async fn node(dir: &tempfile::TempDir) -> (Node, Keypair) {
    node_in(dir, "plait").await
}

async fn node_in(dir: &tempfile::TempDir, dht: &str) -> (Node, Keypair) {
    let keys = Keypair::generate();
    (start_with(dir, &keys, dht).await, keys)
}

/// Starts (or restarts) the node of `keys` on the state in `dir`.
async fn start_with(dir: &tempfile::TempDir, keys: &Keypair, dht: &str) -> Node {
    let settings = NodeSettings {
        listen: vec!["/ip4/127.0.0.1/tcp/0".into()],
        dht: dht.into(),
        ..NodeSettings::default()
    };
    let n = Node::start(
        Keypair::from_secret_bytes(&keys.secret_bytes()),
        std::sync::Arc::new(plait_bridge::state::FileStore(dir.path().join("p2p-state.json"))),
        settings,
        Some(std::sync::Arc::new(Echo)),
    )
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + T;
    while n.status().listen.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "node did not start listening"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    n
}

/// `invitee` (with key `keys`) presents `inv` to `inviter` and takes the grant it gets.
async fn join(invitee: &Node, keys: &Keypair, inviter: &Node, inv: plait_bridge::invite::Invite) {
    let grant = inviter
        .admit(invitee.join_request(keys, inv.clone()).await.unwrap())
        .await
        .unwrap();
    invitee.joined(&inv, grant).await.unwrap();
}

async fn until(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + T;
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invite_chain_lookup_gate_and_record_filtering() {
    let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, ka) = node(&dirs[0]).await;
    let (b, kb) = node(&dirs[1]).await;
    let (c, kc) = node(&dirs[2]).await;
    let (d, _kd) = node(&dirs[3]).await;

    // A invites B.
    let inv = a.invite(None, "unused".into(), 600, 1).await.unwrap();
    let grant = a
        .admit(b.join_request(&kb, inv.clone()).await.unwrap())
        .await
        .unwrap();
    b.joined(&inv, grant).await.unwrap();
    until("A and B connected", async || {
        a.status().peers.connected.contains(&kb.identity())
    })
    .await;
    // The invite is used up.
    assert!(
        a.admit(d.join_request(&Keypair::generate(), inv).await.unwrap())
            .await
            .is_err()
    );

    // B invites C; C is handed B only, not A's address.
    let inv = b.invite(None, "unused".into(), 600, 1).await.unwrap();
    let grant = b
        .admit(c.join_request(&kc, inv.clone()).await.unwrap())
        .await
        .unwrap();
    assert_eq!(grant.inviter, kb.identity());
    c.joined(&inv, grant).await.unwrap();
    until("A learns C is a member", async || a.status().peers.members == 3).await;
    until("A's record reaches B", async || {
        b.held_record(ka.identity()).await.unwrap().is_some()
    })
    .await;

    // C resolves A through the DHT and connects to it.
    let rec = c.resolve(ka.identity()).await.unwrap();
    assert_eq!(rec.id, ka.identity());
    assert_eq!(rec.addrs, a.status().listen);
    until("C connects to A", async || {
        c.status().peers.connected.contains(&ka.identity())
    })
    .await;

    // Members fetch from each other; D cannot fetch from a member.
    let got = c
        .fetch(ka.identity(), "doc".into(), b"hi".to_vec())
        .await
        .unwrap();
    assert_eq!(got, format!("{} doc hi", kc.identity()).into_bytes());
    let err = c.fetch(ka.identity(), "refuse".into(), vec![]).await.unwrap_err();
    assert!(err.to_string().contains("no"), "{err}");
    assert!(d.fetch(ka.identity(), "doc".into(), vec![]).await.is_err());

    // D, never invited, is refused by A.
    let a_addr: libp2p::Multiaddr = format!("{}/p2p/{}", a.status().listen[0], a.status().peer_id)
        .parse()
        .unwrap();
    let err = d.connect(a_addr).await.expect_err("a non-member was admitted");
    assert!(err.to_string().contains("not admitted"), "{err}");
    assert_eq!(a.status().peers.connected_peers, 2, "A holds a connection to D");
    assert_eq!(d.status().peers.connected_peers, 0);
    // The same dial by a member works.
    let b_to_a: libp2p::Multiaddr = format!("{}/p2p/{}", a.status().listen[0], a.status().peer_id)
        .parse()
        .unwrap();
    assert_eq!(b.connect(b_to_a).await.unwrap(), ka.identity());

    // A member offering a forged record for A, and a stale one, gets them refused.
    let key = AddressRecord::key_for("plait", &ka.identity());
    let good = b.held_record(ka.identity()).await.unwrap().unwrap();
    let mut forged = good.clone();
    forged.addrs = vec!["/ip4/10.6.6.6/tcp/1".into()];
    forged.seq += 1_000_000;
    let stale = AddressRecord::new(
        &ka,
        "plait",
        1,
        vec!["/ip4/10.0.0.1/tcp/1".into()],
        good.expires_at - 3600,
        3600,
    );
    let refused_before = b.status().peers.records_refused;
    c.offer_raw_record(key.clone(), forged.encode()).await.unwrap();
    c.offer_raw_record(key.clone(), stale.encode()).await.unwrap();
    c.offer_raw_record(key, b"not a record".to_vec()).await.unwrap();
    until("B refuses three records", async || {
        b.status().peers.records_refused >= refused_before + 3
    })
    .await;
    assert_eq!(b.held_record(ka.identity()).await.unwrap().unwrap(), good);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_a_dht_of_another_name() {
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, ka) = node_in(&dirs[0], "friends").await;
    let (b, kb) = node(&dirs[1]).await;
    let inv = a.invite(None, "unused".into(), 600, 1).await.unwrap();
    assert_eq!(inv.dht, "friends");
    join(&b, &kb, &a, inv).await;
    // B speaks the other DHT's Kademlia now: it finds A's record through it.
    until("B joins A's DHT", async || {
        b.status()
            .dhts
            .iter()
            .any(|d| d.dht.as_deref() == Some("friends"))
    })
    .await;
    until("A and B connect", async || {
        a.status().peers.connected.contains(&kb.identity())
    })
    .await;
    let rec = b.resolve(ka.identity()).await.unwrap();
    assert_eq!(rec.dht, "friends");
    assert!(!b.status().listen.is_empty(), "B listens again after switching");
}

/// H listens nowhere (a home machine behind NAT: it can only dial out) and names R as its
/// relay. C, given only R, finds H through the DHT — its record holds relayed addresses —
/// and fetches from it through R.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_cannot_be_dialled_is_reached_through_a_relay() {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (r, kr) = node(&dirs[0]).await;
    let relay = format!("{}/p2p/{}", r.status().listen[0], r.status().peer_id);
    let kh = Keypair::generate();
    let h = Node::start(
        Keypair::from_secret_bytes(&kh.secret_bytes()),
        std::sync::Arc::new(plait_bridge::state::FileStore(
            dirs[1].path().join("p2p-state.json"),
        )),
        NodeSettings {
            listen: vec![],
            relays: vec![relay.clone()],
            ..NodeSettings::default()
        },
        Some(std::sync::Arc::new(Echo)),
    )
    .await
    .unwrap();
    let (c, kc) = node(&dirs[2]).await;

    let inv = r.invite(None, "unused".into(), 600, 2).await.unwrap();
    join(&h, &kh, &r, inv.clone()).await;
    until("H is reachable through R", async || {
        h.status().listen.iter().any(|a| a.contains("p2p-circuit"))
    })
    .await;
    assert!(
        h.status().listen.iter().all(|a| a.starts_with(&relay)),
        "H has only relayed addresses: {:?}",
        h.status().listen
    );
    join(&c, &kc, &r, inv).await;
    until("H's record reaches R", async || {
        r.held_record(kh.identity()).await.unwrap().is_some()
    })
    .await;
    let rec = c.resolve(kh.identity()).await.unwrap();
    assert!(
        rec.addrs.iter().all(|a| a.contains("/p2p-circuit")),
        "{:?}",
        rec.addrs
    );
    let got = c
        .fetch(kh.identity(), "doc".into(), b"via R".to_vec())
        .await
        .unwrap();
    assert_eq!(got, format!("{} doc via R", kc.identity()).into_bytes());
    let s = c.status().peers;
    assert!(s.connected.contains(&kh.identity()));
    assert!(s.direct.contains(&kr.identity()), "{s:?}");
}

/// A invites B and C; C invites D. A removes C: C's connections to A and B close (B learns
/// of it from A), C cannot fetch from either, D stays (A adopts it), and C, restarted, is
/// still refused. A grant that does not answer its invite is refused before anything is
/// kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_member_is_shut_out_everywhere() {
    let dirs: Vec<tempfile::TempDir> = (0..5).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, ka) = node(&dirs[0]).await;
    let (b, kb) = node(&dirs[1]).await;
    let kc = Keypair::generate();
    let c = start_with(&dirs[2], &kc, "plait").await;
    let (d, kd) = node(&dirs[3]).await;
    let inv = a.invite(None, "unused".into(), 600, 2).await.unwrap();
    join(&b, &kb, &a, inv.clone()).await;
    join(&c, &kc, &a, inv).await;
    let inv = c.invite(None, "unused".into(), 600, 1).await.unwrap();
    join(&d, &kd, &c, inv).await;
    until("B knows all four and is connected to C", async || {
        b.status().peers.members == 4 && b.status().peers.connected.contains(&kc.identity())
    })
    .await;
    until("A is connected to C", async || {
        a.status().peers.connected.contains(&kc.identity())
    })
    .await;
    assert!(c.fetch(ka.identity(), "doc".into(), vec![]).await.is_ok());

    // Only the root or C's admitter may remove C: B may not.
    let err = b.remove(kc.identity(), None).await.unwrap_err();
    assert!(err.to_string().contains("may remove"), "{err}");
    assert_eq!(a.remove(kc.identity(), None).await.unwrap(), ["plait"]);
    assert!(!a.is_member(&kc.identity()));
    assert!(!a.status().peers.connected.contains(&kc.identity()));
    until("B learns C is out and hangs up on it", async || {
        !b.is_member(&kc.identity()) && !b.status().peers.connected.contains(&kc.identity())
    })
    .await;
    // D, whom C admitted, stays: A signed it a new cert.
    let roster = a.members().await.unwrap();
    let of_d = roster[0].members.iter().find(|m| m.id == kd.identity()).unwrap();
    assert_eq!(of_d.admitted_by, Some(ka.identity()));
    assert_eq!(roster[0].removed[0].id, kc.identity());
    until("B knows D's new cert", async || {
        let r = b.members().await.unwrap();
        r[0].members
            .iter()
            .any(|m| m.id == kd.identity() && m.admitted_by == Some(ka.identity()))
    })
    .await;
    assert!(b.is_member(&kd.identity()));
    // C gets nothing more from A or B.
    assert!(c.fetch(ka.identity(), "doc".into(), vec![]).await.is_err());
    assert!(c.fetch(kb.identity(), "doc".into(), vec![]).await.is_err());
    // Removing it again is refused, and so is removing the root.
    assert!(a.remove(kc.identity(), None).await.is_err());
    assert!(a.remove(ka.identity(), None).await.is_err());

    // C restarts from its saved state (which still counts A and B): they refuse it.
    drop(c);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let c = start_with(&dirs[2], &kc, "plait").await;
    let a_addr: libp2p::Multiaddr = format!("{}/p2p/{}", a.status().listen[0], a.status().peer_id)
        .parse()
        .unwrap();
    assert!(c.connect(a_addr).await.is_err(), "A lets C in again");
    assert!(c.fetch(ka.identity(), "doc".into(), vec![]).await.is_err());
    assert!(!a.status().peers.connected.contains(&kc.identity()));

    // A grant that names another inviter than the invite, or holds no cert for the invitee
    // signed by the inviter, is refused, and the invitee keeps nothing.
    let (e, ke) = node(&dirs[4]).await;
    let inv = a.invite(None, "unused".into(), 600, 1).await.unwrap();
    let mut grant = a
        .admit(e.join_request(&ke, inv.clone()).await.unwrap())
        .await
        .unwrap();
    let real = grant.clone();
    grant.inviter = kb.identity();
    let err = e.joined(&inv, grant).await.unwrap_err();
    assert!(err.to_string().contains("not from the inviter"), "{err}");
    let mut grant = real.clone();
    grant.certs.retain(|c| c.member != ke.identity());
    grant.certs.push(plait_bridge::invite::MemberCert::new(
        &kb,
        "plait",
        ke.identity(),
        1,
    ));
    let err = e.joined(&inv, grant).await.unwrap_err();
    assert!(err.to_string().contains("signed by the inviter"), "{err}");
    assert!(e.status().dhts.is_empty(), "{:?}", e.status().dhts);
    e.joined(&inv, real).await.unwrap();
    assert!(e.is_member(&ka.identity()));
}

/// A and B each make a DHT of their own; C joins both. C finds and fetches from each
/// through the DHT it shares with it, on ports of that membership's own; A and B know
/// nothing of each other's network, and each one's gate keeps the other out. C restarts
/// and is a member of both again, where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_in_several_dhts() {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, ka) = node_in(&dirs[0], "alpha").await;
    let (b, kb) = node_in(&dirs[1], "beta").await;
    let (c, kc) = node(&dirs[2]).await;

    let to_alpha = a.invite(None, "unused".into(), 600, 1).await.unwrap();
    let to_beta = b.invite(None, "unused".into(), 600, 1).await.unwrap();
    assert_eq!((to_alpha.dht.as_str(), to_beta.dht.as_str()), ("alpha", "beta"));
    join(&c, &kc, &a, to_alpha).await;
    join(&c, &kc, &b, to_beta).await;

    let names = |n: &Node| -> Vec<String> { n.status().dhts.iter().filter_map(|d| d.dht.clone()).collect() };
    assert_eq!(names(&c), ["alpha", "beta"]);
    let status = c.status();
    let (alpha, beta) = (&status.dhts[0], &status.dhts[1]);
    assert!(
        alpha.listen.iter().all(|x| !beta.listen.contains(x)),
        "each membership listens on its own ports: {:?} / {:?}",
        alpha.listen,
        beta.listen
    );
    assert_eq!(status.peers.members, 3, "A, B and C, each counted once");
    until("C is connected to A and to B", async || {
        let s = c.status();
        s.peers.connected.contains(&ka.identity()) && s.peers.connected.contains(&kb.identity())
    })
    .await;

    // Each record lives in its own DHT; C resolves and fetches through the right one.
    until("A's and B's records reach C", async || {
        c.held_record(ka.identity()).await.unwrap().is_some()
            && c.held_record(kb.identity()).await.unwrap().is_some()
    })
    .await;
    assert_eq!(c.resolve(ka.identity()).await.unwrap().dht, "alpha");
    assert_eq!(c.resolve(kb.identity()).await.unwrap().dht, "beta");
    for (k, what) in [(&ka, "in alpha"), (&kb, "in beta")] {
        let got = c
            .fetch(k.identity(), "doc".into(), what.as_bytes().to_vec())
            .await
            .unwrap();
        assert_eq!(got, format!("{} doc {what}", kc.identity()).into_bytes());
    }

    // A and B share no network: neither learns of the other, nor can ask it anything.
    assert_eq!(names(&a), ["alpha"]);
    assert_eq!(a.status().peers.members, 2, "{:?}", a.status().peers.member_ids);
    assert!(!a.is_member(&kb.identity()));
    let err = a.fetch(kb.identity(), "doc".into(), vec![]).await.unwrap_err();
    assert!(err.to_string().contains("not a member"), "{err}");
    // Dialling B by hand, A is refused at B's gate; dialling C's beta membership, at C's
    // (A's request may still be answered over its connection to C's alpha membership: the
    // same peer).
    let b_addr: libp2p::Multiaddr = format!("{}/p2p/{}", b.status().listen[0], b.status().peer_id)
        .parse()
        .unwrap();
    assert!(a.connect(b_addr).await.is_err(), "B's gate lets A in");
    let c_beta: libp2p::Multiaddr = format!("{}/p2p/{}", beta.listen[0], status.peer_id)
        .parse()
        .unwrap();
    let _ = a.connect(c_beta).await;
    let beta_now = &c.status().dhts[1];
    assert!(
        !beta_now.peers.connected.contains(&ka.identity()),
        "C's beta gate lets A in"
    );
    assert_eq!(beta_now.peers.connected, vec![kb.identity()]);

    // C restarts on its state: both memberships, the same ports.
    drop(c);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c = start_with(&dirs[2], &kc, "plait").await;
    assert_eq!(names(&c), ["alpha", "beta"]);
    until("C listens where it did", async || {
        let s = c.status();
        s.dhts.len() == 2 && beta.listen.iter().all(|x| s.dhts[1].listen.contains(x))
    })
    .await;
    until("C is back with A and B", async || {
        let s = c.status();
        s.peers.connected.contains(&ka.identity()) && s.peers.connected.contains(&kb.identity())
    })
    .await;
    let got = c
        .fetch(kb.identity(), "doc".into(), b"again".to_vec())
        .await
        .unwrap();
    assert_eq!(got, format!("{} doc again", kc.identity()).into_bytes());
}
