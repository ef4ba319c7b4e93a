//! A network namespace the test makes for itself: a host behind a one-way wall.
//!
//! `NetNs::new` creates a namespace joined to the test's own by a veth pair, with a /24 of
//! its own (`host` on the test's side, `inner` inside). A server inside can dial out to
//! `host`, and anything listening inside on `inner` is reachable from outside; what listens
//! inside on its loopback is not — that is a machine behind NAT, for what it listens on.
//! Dropping it removes the namespace and the pair. Needs root (`ip netns`).
//!
//! [`NatLab`] is a larger set-up: homes behind real NAT routers (nftables masquerade), for
//! hole punching.

use std::process::Command;

pub struct NetNs {
    pub name: String,
    /// The address on the test's side of the pair.
    pub host: String,
    /// The address inside the namespace.
    pub inner: String,
    host_if: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl NetNs {
    pub fn new(tag: &str) -> NetNs {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let pid = std::process::id();
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // A subnet of 10/8 that other runs on the machine are unlikely to use at once.
        let (a, b) = (100 + (pid >> 8) % 100, (pid + n) % 256);
        let name = format!("plait-{tag}-{pid}-{n}");
        let host_if = format!("pl{}h{n}", pid % 100_000);
        let inner_if = format!("pl{}i{n}", pid % 100_000);
        let (host, inner) = (format!("10.{a}.{b}.1"), format!("10.{a}.{b}.2"));
        ip(&["netns", "add", &name]);
        let ns = NetNs {
            name,
            host,
            inner,
            host_if,
        };
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &inner_if,
        ]);
        ip(&["link", "set", &inner_if, "netns", &ns.name]);
        ip(&["addr", "add", &format!("{}/24", ns.host), "dev", &ns.host_if]);
        ip(&["link", "set", &ns.host_if, "up"]);
        let inner_cidr = format!("{}/24", ns.inner);
        for args in [
            ["addr", "add", inner_cidr.as_str(), "dev", inner_if.as_str()].as_slice(),
            &["link", "set", inner_if.as_str(), "up"],
            &["link", "set", "lo", "up"],
        ] {
            let mut a = vec!["netns", "exec", ns.name.as_str(), "ip"];
            a.extend_from_slice(args);
            ip(&a);
        }
        ns
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.host_if]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// A small internet with homes behind NAT routers, made of network namespaces.
///
/// "The internet" is a bridge in the test's own namespace with address `public` (where a
/// VPS-like server of the test listens). Each home is a namespace on a LAN of its own behind
/// a router namespace whose nftables rules do what a home router does: source NAT
/// (masquerade) of everything leaving the LAN to the router's public address, and no
/// unsolicited traffic in — except TCP to ports other than [`NatLab::P2P_PORT`], which the
/// router forwards so the test can speak HTTP to the server at home (as a router forwarding
/// a web port). Peers can reach a home's p2p port only through a hole punched from inside.
/// Dropping it removes every namespace, the bridge and its routes. Needs root, `ip` and
/// `nft`.
pub struct NatLab {
    /// The test's own address on the internet.
    pub public: String,
    pub homes: Vec<Home>,
    bridge: String,
    namespaces: Vec<String>,
}

/// One home behind its NAT router.
pub struct Home {
    /// The namespace a server at home runs in (`ip netns exec`).
    pub ns: String,
    /// Its address on the home LAN.
    pub lan: String,
    /// The router's address on the internet: what everyone else sees the home as.
    pub router_public: String,
}

/// Runs `cmd args` inside namespace `ns`.
fn in_ns(ns: &str, cmd: &str, args: &[&str]) {
    let mut all = vec!["netns", "exec", ns, cmd];
    all.extend_from_slice(args);
    ip(&all);
}

impl NatLab {
    /// The port servers at home listen on for peers (TCP and UDP), which their routers never
    /// forward.
    pub const P2P_PORT: u16 = 4001;

    pub fn new(tag: &str, homes: usize) -> NatLab {
        assert!((1..=6).contains(&homes), "one to six homes");
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let pid = std::process::id();
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // 10.200-249.x: apart from `NetNs`'s subnets; each lab of a run has 8 /24s.
        let a = 200 + pid % 50;
        let base = (n * 8) % 256;
        let public = format!("10.{a}.{base}.1");
        let bridge = format!("pb{}x{n}", pid % 100_000);
        ip(&["link", "add", &bridge, "type", "bridge"]);
        let mut lab = NatLab {
            public: public.clone(),
            homes: Vec::new(),
            bridge,
            namespaces: Vec::new(),
        };
        ip(&["addr", "add", &format!("{public}/24"), "dev", &lab.bridge]);
        ip(&["link", "set", &lab.bridge, "up"]);
        for i in 0..homes as u32 {
            let router = format!("plait-{tag}-{pid}-{n}-r{i}");
            let home = format!("plait-{tag}-{pid}-{n}-h{i}");
            for ns in [&router, &home] {
                ip(&["netns", "add", ns]);
                lab.namespaces.push(ns.clone());
                in_ns(ns, "ip", &["link", "set", "lo", "up"]);
            }
            let router_public = format!("10.{a}.{base}.{}", 10 + i);
            let lan_net = format!("10.{a}.{}", base + 1 + i);
            let (gateway, lan) = (format!("{lan_net}.1"), format!("{lan_net}.2"));
            // The router's uplink, plugged into the internet's bridge.
            let port = format!("pb{}x{n}p{i}", pid % 100_000);
            ip(&[
                "link", "add", &port, "type", "veth", "peer", "name", "wan", "netns", &router,
            ]);
            ip(&["link", "set", &port, "master", &lab.bridge]);
            ip(&["link", "set", &port, "up"]);
            in_ns(
                &router,
                "ip",
                &["addr", "add", &format!("{router_public}/24"), "dev", "wan"],
            );
            in_ns(&router, "ip", &["link", "set", "wan", "up"]);
            // The home's LAN.
            in_ns(
                &router,
                "ip",
                &[
                    "link", "add", "lan", "type", "veth", "peer", "name", "eth0", "netns", &home,
                ],
            );
            in_ns(
                &router,
                "ip",
                &["addr", "add", &format!("{gateway}/24"), "dev", "lan"],
            );
            in_ns(&router, "ip", &["link", "set", "lan", "up"]);
            in_ns(&home, "ip", &["addr", "add", &format!("{lan}/24"), "dev", "eth0"]);
            in_ns(&home, "ip", &["link", "set", "eth0", "up"]);
            in_ns(&home, "ip", &["route", "add", "default", "via", &gateway]);
            in_ns(&router, "sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
            let rules = format!(
                "table ip nat {{
                    chain postrouting {{
                        type nat hook postrouting priority srcnat; policy accept;
                        ip saddr {lan_net}.0/24 oifname \"wan\" masquerade
                    }}
                }}
                table ip filter {{
                    chain input {{
                        type filter hook input priority filter; policy accept;
                        iifname \"wan\" ct state new drop
                    }}
                    chain forward {{
                        type filter hook forward priority filter; policy drop;
                        ct state established,related accept
                        iifname \"lan\" accept
                        iifname \"wan\" ip daddr {lan} tcp dport != {p2p} accept
                    }}
                }}",
                p2p = Self::P2P_PORT
            );
            let mut nft = Command::new("ip")
                .args(["netns", "exec", &router, "nft", "-f", "-"])
                .stdin(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("run nft (Debian's nftables)");
            std::io::Write::write_all(&mut nft.stdin.take().unwrap(), rules.as_bytes()).unwrap();
            let out = nft.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "nft: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            // The test (not its peers: the router forwards it nothing but HTTP) reaches the
            // home's web port through the router.
            ip(&["route", "add", &format!("{lan_net}.0/24"), "via", &router_public]);
            lab.homes.push(Home {
                ns: home,
                lan,
                router_public,
            });
        }
        lab
    }
}

impl Drop for NatLab {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        // Its ports went with the routers; its routes go with it.
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).status();
    }
}
