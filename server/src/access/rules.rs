//! The access rules: the document at `/.well-known/plait/access`, parsed into typed rules.
//!
//! ```json
//! {"rules": [
//!   {"path": "/",          "read": ["everyone"], "write": ["owner"], "delete": ["owner"]},
//!   {"path": "/shared",    "write": ["accounts", "account:alice"]},
//!   {"path": "/~<id>/",    "read": ["members"]},
//!   {"path": "/secret",    "deny": {"read": ["everyone"]}}
//! ]}
//! ```
//!
//! A rule's `path` is a URL path prefix, matched on segment boundaries (`/notes` covers
//! `/notes` and `/notes/1`, not `/notesx`); `/~<id>/…` names another namespace. For an
//! operation, the longest matching rule that lists that operation decides who is allowed;
//! a `deny` entry of *any* matching rule wins over every allow. Who:
//!
//! | principal | who |
//! | --- | --- |
//! | `everyone` | anyone, with or without a credential |
//! | `accounts` | any logged-in account |
//! | `account:<name>` | that account |
//! | `members` | a member instance of one of this server's networks |
//! | `<id>` or `identity:<id>` | that ed25519 identity (signed requests, a member instance) |
//! | `owner` | the instance's owner (the instance key, an owner token) |
//!
//! This module only parses and matches; it knows nothing of where callers come from.

use std::fmt;

use plait_bridge::Identity;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::ResourceKey;

/// Longest rules document accepted, in rules.
pub const MAX_RULES: usize = 1000;

/// What a caller does to a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Delete,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Delete => "delete",
        }
    }
}

/// Who a rule names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Everyone,
    Accounts,
    Account(String),
    Members,
    Identity(Identity),
    Owner,
}

impl std::str::FromStr for Principal {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "everyone" => Principal::Everyone,
            "accounts" => Principal::Accounts,
            "members" => Principal::Members,
            "owner" => Principal::Owner,
            _ => {
                if let Some(name) = s.strip_prefix("account:") {
                    if name.is_empty() {
                        return Err("account: needs a name".into());
                    }
                    Principal::Account(crate::access::accounts::handle(name))
                } else {
                    let id = s.strip_prefix("identity:").unwrap_or(s);
                    Principal::Identity(id.parse().map_err(|_| {
                        format!(
                            "{s:?} is not a principal (everyone, accounts, account:<name>, members, owner, or a 52-character identity)"
                        )
                    })?)
                }
            }
        })
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Everyone => f.write_str("everyone"),
            Principal::Accounts => f.write_str("accounts"),
            Principal::Account(n) => write!(f, "account:{n}"),
            Principal::Members => f.write_str("members"),
            Principal::Identity(i) => write!(f, "{i}"),
            Principal::Owner => f.write_str("owner"),
        }
    }
}

/// What a principal is matched against: the facts about one caller.
pub trait Subject {
    fn is_owner(&self) -> bool;
    /// The logged-in account's handle (lower-cased name).
    fn account_handle(&self) -> Option<String>;
    /// The identity the caller proved (signature, libp2p connection).
    fn identity(&self) -> Option<Identity>;
    fn is_member(&self) -> bool;
}

impl Principal {
    pub fn matches(&self, who: &dyn Subject) -> bool {
        match self {
            Principal::Everyone => true,
            Principal::Accounts => who.account_handle().is_some(),
            Principal::Account(n) => who.account_handle().as_deref() == Some(n.as_str()),
            Principal::Members => who.is_member(),
            Principal::Identity(i) => who.identity() == Some(*i),
            Principal::Owner => who.is_owner(),
        }
    }
}

/// A path prefix: in this instance's namespace (`namespace: None`) or another's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prefix {
    pub namespace: Option<Identity>,
    /// Without leading or trailing `/`; empty covers the whole namespace.
    pub path: String,
}

impl Prefix {
    /// Parses `/path` or `/~<id>/path`.
    pub fn parse(s: &str) -> Result<Prefix, String> {
        let Some(rest) = s.strip_prefix('/') else {
            return Err(format!("{s:?}: a path starts with /"));
        };
        let (namespace, path) = match rest.strip_prefix('~') {
            Some(r) => {
                let (id, inner) = r.split_once('/').unwrap_or((r, ""));
                let id = id.parse::<Identity>().map_err(|e| format!("{s:?}: {e}"))?;
                (Some(id), inner)
            }
            None => (None, rest),
        };
        let path = path.trim_end_matches('/');
        if path.split('/').any(|seg| seg == "." || seg == "..") {
            return Err(format!("{s:?}: no . or .. segments"));
        }
        Ok(Prefix {
            namespace,
            path: path.to_string(),
        })
    }

    /// Whether it covers `key` (`instance` is whose namespace `/` is).
    pub fn covers(&self, key: &ResourceKey, instance: Identity) -> bool {
        if self.namespace.unwrap_or(instance) != key.namespace {
            return false;
        }
        let p = key.path.as_str();
        self.path.is_empty()
            || (p.starts_with(&self.path) && matches!(p.as_bytes().get(self.path.len()), None | Some(b'/')))
    }

    /// How specific it is (longer wins).
    fn weight(&self) -> usize {
        usize::from(self.namespace.is_some()) + self.path.len() + 1
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(id) => write!(f, "/~{id}/{}", self.path),
            None => write!(f, "/{}", self.path),
        }
    }
}

/// Who may do each operation, as listed in a rule (`None`: the rule says nothing).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lists {
    pub read: Option<Vec<Principal>>,
    pub write: Option<Vec<Principal>>,
    pub delete: Option<Vec<Principal>>,
}

impl Lists {
    fn get(&self, op: Op) -> Option<&[Principal]> {
        match op {
            Op::Read => self.read.as_deref(),
            Op::Write => self.write.as_deref(),
            Op::Delete => self.delete.as_deref(),
        }
    }
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The text the owner wrote, for refusals ("rule /secret").
    pub path: String,
    pub prefix: Prefix,
    pub allow: Lists,
    pub deny: Lists,
}

/// The rules, most specific first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    rules: Vec<Rule>,
}

/// What the rules say about one operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed by the rule at this path.
    Allowed(String),
    /// A deny entry of the rule at this path names the caller.
    Denied(String),
    /// The rule at this path lists others only.
    NotListed(String),
    /// No rule covers this operation here.
    NoRule,
}

/// The document's JSON shape.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRules {
    rules: Vec<RawRule>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    read: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    write: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    delete: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    deny: Option<RawLists>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLists {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    read: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    write: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    delete: Option<Vec<String>>,
}

fn principals(list: Option<Vec<String>>) -> Result<Option<Vec<Principal>>, String> {
    list.map(|l| l.iter().map(|s| s.parse()).collect()).transpose()
}

impl Rules {
    /// The rules of a new data dir: everyone reads, only the owner writes and deletes.
    pub fn default_document() -> Value {
        serde_json::json!({"rules": [
            {"path": "/", "read": ["everyone"], "write": ["owner"], "delete": ["owner"]}
        ]})
    }

    /// Parses the document; the error says what is wrong with it.
    pub fn parse(doc: &[u8]) -> Result<Rules, String> {
        let raw: RawRules =
            serde_json::from_slice(doc).map_err(|e| format!("the access rules are not valid: {e}"))?;
        if raw.rules.len() > MAX_RULES {
            return Err(format!("at most {MAX_RULES} rules"));
        }
        let mut rules = Vec::with_capacity(raw.rules.len());
        for r in raw.rules {
            let prefix = Prefix::parse(&r.path)?;
            let deny = r.deny.unwrap_or_default();
            rules.push(Rule {
                path: r.path,
                prefix,
                allow: Lists {
                    read: principals(r.read)?,
                    write: principals(r.write)?,
                    delete: principals(r.delete)?,
                },
                deny: Lists {
                    read: principals(deny.read)?,
                    write: principals(deny.write)?,
                    delete: principals(deny.delete)?,
                },
            });
        }
        // Most specific first; a stable sort keeps the owner's order among equals.
        rules.sort_by_key(|r| std::cmp::Reverse(r.prefix.weight()));
        Ok(Rules { rules })
    }

    /// What the rules say about `who` doing `op` to `key`.
    pub fn judge(&self, who: &dyn Subject, key: &ResourceKey, op: Op, instance: Identity) -> Verdict {
        let mut decided = None;
        for r in self.rules.iter().filter(|r| r.prefix.covers(key, instance)) {
            if r.deny.get(op).is_some_and(|l| l.iter().any(|p| p.matches(who))) {
                return Verdict::Denied(r.path.clone());
            }
            if decided.is_none()
                && let Some(l) = r.allow.get(op)
            {
                decided = Some(if l.iter().any(|p| p.matches(who)) {
                    Verdict::Allowed(r.path.clone())
                } else {
                    Verdict::NotListed(r.path.clone())
                });
            }
        }
        decided.unwrap_or(Verdict::NoRule)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ResourcePath;

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

    const ANON: Who = Who {
        owner: false,
        account: None,
        identity: None,
        member: false,
    };

    fn key(ns: Identity, p: &str) -> ResourceKey {
        ResourceKey::new(ns, ResourcePath::new(p).unwrap())
    }

    #[test]
    fn longest_prefix_decides_and_deny_wins() {
        let me = plait_bridge::Keypair::generate().identity();
        let other = plait_bridge::Keypair::generate().identity();
        let doc = serde_json::json!({"rules": [
            {"path": "/", "read": ["everyone"], "write": ["owner"]},
            {"path": "/shared/", "write": ["accounts"]},
            {"path": "/shared/locked", "deny": {"write": ["account:Mallory"]}},
            {"path": format!("/~{other}/"), "read": [format!("identity:{me}")]},
        ]});
        let rules = Rules::parse(&serde_json::to_vec(&doc).unwrap()).unwrap();
        let alice = Who {
            account: Some("alice"),
            ..ANON
        };
        let mallory = Who {
            account: Some("mallory"),
            ..ANON
        };
        assert_eq!(
            rules.judge(&ANON, &key(me, "x"), Op::Read, me),
            Verdict::Allowed("/".into())
        );
        assert_eq!(
            rules.judge(&ANON, &key(me, "x"), Op::Write, me),
            Verdict::NotListed("/".into())
        );
        assert_eq!(rules.judge(&ANON, &key(me, "x"), Op::Delete, me), Verdict::NoRule);
        assert_eq!(
            rules.judge(&alice, &key(me, "shared/a"), Op::Write, me),
            Verdict::Allowed("/shared/".into())
        );
        // Segment boundaries: /sharedx is not under /shared.
        assert_eq!(
            rules.judge(&alice, &key(me, "sharedx"), Op::Write, me),
            Verdict::NotListed("/".into())
        );
        assert_eq!(
            rules.judge(&mallory, &key(me, "shared/locked/1"), Op::Write, me),
            Verdict::Denied("/shared/locked".into())
        );
        assert_eq!(
            rules.judge(&alice, &key(me, "shared/locked/1"), Op::Write, me),
            Verdict::Allowed("/shared/".into())
        );
        // Another namespace: only its own rules apply.
        let signed = Who {
            identity: Some(me),
            ..ANON
        };
        assert!(matches!(
            rules.judge(&signed, &key(other, "a"), Op::Read, me),
            Verdict::Allowed(_)
        ));
        assert!(matches!(
            rules.judge(&ANON, &key(other, "a"), Op::Read, me),
            Verdict::NotListed(_)
        ));
    }

    #[test]
    fn bad_documents_say_why() {
        for (doc, why) in [
            (r#"{"rules": [{"path": "x"}]}"#, "starts with /"),
            (
                r#"{"rules": [{"path": "/", "read": ["nobody"]}]}"#,
                "not a principal",
            ),
            (
                r#"{"rules": [{"path": "/", "raed": ["everyone"]}]}"#,
                "unknown field",
            ),
            (r#"{"rules": [{"path": "/~abc/"}]}"#, "/~abc/"),
            (r#"[1, 2]"#, "not valid"),
        ] {
            let e = Rules::parse(doc.as_bytes()).unwrap_err();
            assert!(e.contains(why), "{doc}: {e}");
        }
        assert!(Rules::parse(&serde_json::to_vec(&Rules::default_document()).unwrap()).is_ok());
    }
}
