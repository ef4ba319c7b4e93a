//! The domain vocabulary shared by every part of the server: where a resource lives
//! ([`ResourceKey`] = [`Namespace`] + [`ResourcePath`]), what kind of document it is
//! ([`Kind`]), and how its history is named ([`VersionId`], [`Version`]).
//!
//! Everything past the protocol edge speaks in these types; raw headers and URLs are parsed
//! into them by the codecs.

use std::fmt;

use plait_bridge::Identity;

/// A namespace is one identity's tree of state. The instance's own namespace is served at
/// `/`; another identity's at `/~<id>/`.
pub type Namespace = Identity;

/// Longest resource path accepted, in bytes. Paths are keys, not documents.
pub const MAX_PATH_BYTES: usize = 2048;

/// A resource's path inside its namespace: percent-decoded, without the leading `/`.
///
/// Paths are hierarchical like file names (`posts/42/likes`) but otherwise arbitrary strings
/// (Statebus keys such as `posts{"tag":null}` are legal). Two things are refused because they
/// only cause confusion behind proxies and in logs: `.`/`..` segments and control characters.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourcePath(String);

impl ResourcePath {
    /// Checks and wraps an already-decoded path (no leading `/`).
    pub fn new(path: impl Into<String>) -> Result<Self, PathError> {
        let path = path.into();
        if path.len() > MAX_PATH_BYTES {
            return Err(PathError::TooLong(path.len()));
        }
        if path.chars().any(char::is_control) {
            return Err(PathError::Control);
        }
        if path.split('/').any(|seg| seg == "." || seg == "..") {
            return Err(PathError::DotSegment);
        }
        Ok(ResourcePath(path))
    }

    /// The path as text, without a leading `/`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ResourcePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/{}", self.0)
    }
}

impl fmt::Debug for ResourcePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path is {0} bytes; the limit is {MAX_PATH_BYTES}")]
    TooLong(usize),
    #[error("path contains a control character")]
    Control,
    #[error("path contains a `.` or `..` segment")]
    DotSegment,
    #[error("path is not valid percent-encoded UTF-8")]
    Encoding,
    #[error("`~{0}` is not an identity: {1}")]
    BadNamespace(String, String),
}

/// Where a resource lives: whose namespace, and which path in it.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceKey {
    pub namespace: Namespace,
    pub path: ResourcePath,
}

impl ResourceKey {
    pub fn new(namespace: Namespace, path: ResourcePath) -> Self {
        ResourceKey { namespace, path }
    }
}

impl fmt::Debug for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/~{}{}", self.namespace, self.path)
    }
}

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The three kinds of resource (DESIGN.md §2). The kind is fixed when a resource is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Collaborative text (`text/*`): an automerge text object, patched in code points.
    Text,
    /// A JSON value (`application/json`): an automerge map, patched with `json` ranges.
    Json,
    /// Any other content type: a byte string, content-addressed, last writer wins.
    Bytes,
}

impl Kind {
    /// The number stored in the `kind` column.
    pub fn code(self) -> i16 {
        match self {
            Kind::Text => 1,
            Kind::Json => 2,
            Kind::Bytes => 3,
        }
    }

    pub fn from_code(code: i16) -> Option<Kind> {
        match code {
            1 => Some(Kind::Text),
            2 => Some(Kind::Json),
            3 => Some(Kind::Bytes),
            _ => None,
        }
    }

    /// The kind a new resource gets from the media type of its first write.
    ///
    /// No media type, and `application/x-www-form-urlencoded` (what `curl --data` sends when
    /// not told otherwise), are taken as text, as the braid-text reference does.
    pub fn for_media_type(media_type: Option<&str>) -> Kind {
        let essence = media_type
            .map(|m| m.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
            .unwrap_or_default();
        match essence.as_str() {
            "" | "application/x-www-form-urlencoded" => Kind::Text,
            "application/json" => Kind::Json,
            e if e.starts_with("text/") => Kind::Text,
            e if e.ends_with("+json") => Kind::Json,
            _ => Kind::Bytes,
        }
    }

    /// The media type a resource of this kind is served with when none was recorded.
    pub fn default_media_type(self) -> &'static str {
        match self {
            Kind::Text => "text/plain; charset=utf-8",
            Kind::Json => "application/json",
            Kind::Bytes => "application/octet-stream",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Text => "text",
            Kind::Json => "json",
            Kind::Bytes => "bytes",
        }
    }
}

/// Longest agent name in a version id, in bytes (braid-text's limit).
pub const MAX_AGENT_BYTES: usize = 50;

/// One event id in a resource's history: `"<agent>-<seq>"` (Braid `peer-counter` ids).
///
/// For text, `seq` counts code points inserted and deleted by `agent`, and an id names the
/// last event of an edit (`text-runs`): inserting `hello` as a fresh agent is `alice-4`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VersionId {
    agent: String,
    seq: u64,
}

impl VersionId {
    pub fn new(agent: impl Into<String>, seq: u64) -> Result<Self, VersionError> {
        let agent = agent.into();
        if agent.is_empty() || agent.len() >= MAX_AGENT_BYTES {
            return Err(VersionError::Agent(agent));
        }
        if agent.chars().any(char::is_control) {
            return Err(VersionError::Agent(agent));
        }
        Ok(VersionId { agent, seq })
    }

    /// Parses `"<agent>-<seq>"`: the agent is everything before the last `-`.
    pub fn parse(s: &str) -> Result<Self, VersionError> {
        let (agent, seq) = s
            .rsplit_once('-')
            .ok_or_else(|| VersionError::Syntax(s.to_string()))?;
        if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
            return Err(VersionError::Syntax(s.to_string()));
        }
        let seq = seq.parse().map_err(|_| VersionError::Syntax(s.to_string()))?;
        VersionId::new(agent, seq)
    }

    /// The id of a change that has none (the genesis change, changes made by other
    /// automerge software): `am`, the first 16 hex digits of its hash, seq 0.
    pub fn unlabelled(hash_hex: &str) -> Result<Self, VersionError> {
        let prefix = hash_hex
            .get(..16)
            .filter(|p| p.bytes().all(|b| b.is_ascii_hexdigit()));
        match prefix {
            Some(p) => VersionId::new(format!("am{}", p.to_ascii_lowercase()), 0),
            None => Err(VersionError::Syntax(hash_hex.to_string())),
        }
    }

    pub fn agent(&self) -> &str {
        &self.agent
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }
}

impl fmt::Display for VersionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.agent, self.seq)
    }
}

impl fmt::Debug for VersionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// Why a version id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    #[error("version id {0:?} is not of the form \"<agent>-<seq>\"")]
    Syntax(String),
    #[error("version agent {0:?} must be 1 to 49 bytes without control characters")]
    Agent(String),
}

/// A version: the frontier of a resource's history, a set of event ids kept sorted.
/// The empty version is the root (nothing written yet).
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Version(Vec<VersionId>);

impl Version {
    pub fn root() -> Self {
        Version(Vec::new())
    }

    pub fn new(mut ids: Vec<VersionId>) -> Self {
        ids.sort();
        ids.dedup();
        Version(ids)
    }

    pub fn one(id: VersionId) -> Self {
        Version(vec![id])
    }

    pub fn ids(&self) -> &[VersionId] {
        &self.0
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl FromIterator<VersionId> for Version {
    fn from_iter<T: IntoIterator<Item = VersionId>>(iter: T) -> Self {
        Version::new(iter.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_ids_parse_on_the_last_dash() {
        let v = VersionId::parse("ty0wi-4").unwrap();
        assert_eq!((v.agent(), v.seq()), ("ty0wi", 4));
        let v = VersionId::parse("my-agent-12").unwrap();
        assert_eq!((v.agent(), v.seq()), ("my-agent", 12));
        assert_eq!(v.to_string(), "my-agent-12");
        for bad in ["", "abc", "abc-", "-4", "a-b", "a-1x", "a- 1"] {
            assert!(VersionId::parse(bad).is_err(), "{bad:?} should be refused");
        }
        let long = format!("{}-1", "a".repeat(MAX_AGENT_BYTES));
        assert!(VersionId::parse(&long).is_err());
    }

    #[test]
    fn versions_are_sorted_sets() {
        let a = VersionId::parse("fred-0").unwrap();
        let b = VersionId::parse("erin-0").unwrap();
        let v = Version::new(vec![a.clone(), b.clone(), a.clone()]);
        assert_eq!(v.ids(), &[b, a]);
        assert!(Version::root().is_root());
    }

    #[test]
    fn kinds_follow_media_types() {
        assert_eq!(Kind::for_media_type(None), Kind::Text);
        assert_eq!(Kind::for_media_type(Some("text/plain;charset=UTF-8")), Kind::Text);
        assert_eq!(Kind::for_media_type(Some("text/markdown")), Kind::Text);
        assert_eq!(
            Kind::for_media_type(Some("application/x-www-form-urlencoded")),
            Kind::Text
        );
        assert_eq!(Kind::for_media_type(Some("Application/JSON")), Kind::Json);
        assert_eq!(Kind::for_media_type(Some("application/ld+json")), Kind::Json);
        assert_eq!(Kind::for_media_type(Some("image/png")), Kind::Bytes);
        for k in [Kind::Text, Kind::Json, Kind::Bytes] {
            assert_eq!(Kind::from_code(k.code()), Some(k));
        }
    }

    #[test]
    fn paths_refuse_dot_segments_and_control_characters() {
        assert!(ResourcePath::new("a/b/c").is_ok());
        assert!(ResourcePath::new("posts{\"tag\":null}").is_ok());
        assert!(ResourcePath::new("").is_ok());
        assert_eq!(ResourcePath::new("a/../b"), Err(PathError::DotSegment));
        assert_eq!(ResourcePath::new("./b"), Err(PathError::DotSegment));
        assert_eq!(ResourcePath::new("a\nb"), Err(PathError::Control));
        assert!(matches!(
            ResourcePath::new("x".repeat(MAX_PATH_BYTES + 1)),
            Err(PathError::TooLong(_))
        ));
    }
}
