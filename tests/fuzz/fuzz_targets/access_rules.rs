//! The access rules document (`/.well-known/plait/access`, written by the owner and parsed
//! before it is stored) through `Rules::parse`, then judged for several callers on keys
//! under each rule's path. Input: the document's bytes.
//!
//! Beyond not panicking: a verdict names a rule whose prefix covers the key, and a deny
//! entry for `everyone` refuses everyone, the owner included (deny wins).

#![no_main]

use libfuzzer_sys::fuzz_target;
use plait_bridge::{Identity, Keypair};
use plait_server::access::rules::{Op, Prefix, Rules, Subject, Verdict};
use plait_server::model::{ResourceKey, ResourcePath};

struct Who {
    owner: bool,
    account: Option<&'static str>,
    identity: Option<Identity>,
    member: bool,
}

impl Subject for Who {
    fn is_owner(&self) -> bool {
        self.owner
    }
    fn account_handle(&self) -> Option<String> {
        self.account.map(str::to_string)
    }
    fn identity(&self) -> Option<Identity> {
        self.identity
    }
    fn is_member(&self) -> bool {
        self.member
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(rules) = Rules::parse(data) else {
        return;
    };
    let instance = Keypair::from_secret_bytes(&[3; 32]).identity();
    let other = Keypair::from_secret_bytes(&[4; 32]).identity();
    // The paths the rules name, as written (the document parsed, so it is JSON).
    let doc: serde_json::Value = serde_json::from_slice(data).expect("parsed above");
    let raw: Vec<(String, serde_json::Value)> = doc["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| Some((r["path"].as_str()?.to_string(), r.clone())))
        .collect();
    let mut keys = vec![ResourceKey::new(instance, ResourcePath::new("x").expect("valid"))];
    for (path, _) in &raw {
        let p = Prefix::parse(path).expect("the rules parsed");
        for tail in ["", "/sub"] {
            if let Ok(rp) = ResourcePath::new(format!("{}{tail}", p.path).trim_start_matches('/')) {
                keys.push(ResourceKey::new(p.namespace.unwrap_or(instance), rp));
            }
        }
    }
    let callers = [
        Who {
            owner: false,
            account: None,
            identity: None,
            member: false,
        },
        Who {
            owner: true,
            account: None,
            identity: None,
            member: false,
        },
        Who {
            owner: false,
            account: Some("alice"),
            identity: None,
            member: false,
        },
        Who {
            owner: false,
            account: None,
            identity: Some(other),
            member: true,
        },
    ];
    for key in keys.iter().take(16) {
        for op in [Op::Read, Op::Write, Op::Delete] {
            let denies_everyone = raw.iter().any(|(path, r)| {
                Prefix::parse(path).expect("parsed").covers(key, instance)
                    && r["deny"][op.name()]
                        .as_array()
                        .is_some_and(|l| l.iter().any(|p| p == "everyone"))
            });
            for who in &callers {
                let verdict = rules.judge(who, key, op, instance);
                let named = match &verdict {
                    Verdict::Allowed(p) | Verdict::Denied(p) | Verdict::NotListed(p) => Some(p),
                    Verdict::NoRule => None,
                };
                if let Some(p) = named {
                    assert!(
                        Prefix::parse(p).expect("a rule's path").covers(key, instance),
                        "{verdict:?} for a key it does not cover"
                    );
                }
                if denies_everyone {
                    assert!(
                        matches!(verdict, Verdict::Denied(_)),
                        "{verdict:?}: deny did not win"
                    );
                }
            }
        }
    }
});
