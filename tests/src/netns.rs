//! A network namespace the test makes for itself: a host behind a one-way wall.
//!
//! `NetNs::new` creates a namespace joined to the test's own by a veth pair, with a /24 of
//! its own (`host` on the test's side, `inner` inside). A server inside can dial out to
//! `host`, and anything listening inside on `inner` is reachable from outside; what listens
//! inside on its loopback is not — that is a machine behind NAT, for what it listens on.
//! Dropping it removes the namespace and the pair. Needs root (`ip netns`).

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
