//! How a change's version and parents sit in their text columns, in both backends.
//!
//! Past storage they are typed ([`VersionId`], [`Version`]); these are the only functions
//! that turn them into column text and back, so a row is parsed once, as it is read.
//!
//! * `version`: the id as `agent-seq`;
//! * `parents`: the ids as JSON strings joined by `, ` (`"a-1", "b-2"`; the root is empty).
//!   This is the text the column has held since the first migration (it is also how Braid
//!   writes a version list), kept so that rows stored before the types came read the same.
//!
//! A row whose text does not parse is [`StorageError::Corrupt`]: the server wrote it, so
//! something else damaged it.

use super::StorageError;
use crate::braid::{format_version, parse_version};
use crate::model::{Version, VersionId};

/// The `version` column's text for an id.
pub fn version_text(id: &VersionId) -> String {
    id.to_string()
}

/// The `parents` column's text for a version.
pub fn parents_text(parents: &Version) -> String {
    format_version(parents)
}

/// Reads a `version` column. Before the types came, a change imported from a peer ahead
/// of its dependencies was stored under its automerge hash (64 hex digits): such a row
/// reads as the id the document gives that change once applied.
pub fn version_from(text: &str) -> Result<VersionId, StorageError> {
    let legacy_hash = text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit());
    let id = if legacy_hash {
        VersionId::unlabelled(text)
    } else {
        VersionId::parse(text)
    };
    id.map_err(|e| StorageError::Corrupt(format!("a change's version: {e}")))
}

/// Reads a `parents` column.
pub fn parents_from(text: &str) -> Result<Version, StorageError> {
    parse_version(text).map_err(|e| StorageError::Corrupt(format!("a change's parents: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> VersionId {
        VersionId::parse(s).unwrap()
    }

    #[test]
    fn columns_hold_the_text_rows_always_held() {
        let v = Version::new(vec![id("b-2"), id("a-1")]);
        assert_eq!(parents_text(&v), r#""a-1", "b-2""#);
        assert_eq!(parents_text(&Version::root()), "");
        assert_eq!(version_text(&id("my-agent-12")), "my-agent-12");
        // Agents may hold quotes and non-ASCII: escaped in the column, the same once read.
        let odd = Version::one(id("é\"x-3"));
        assert_eq!(parents_text(&odd), r#""\u00e9\"x-3""#);
        assert_eq!(parents_from(&parents_text(&odd)).unwrap(), odd);
        assert_eq!(parents_from(r#""a-1", "b-2""#).unwrap(), v);
        assert_eq!(parents_from("").unwrap(), Version::root());
        assert_eq!(version_from("my-agent-12").unwrap(), id("my-agent-12"));
        let hash = "0123456789abcdef".repeat(4);
        assert_eq!(version_from(&hash).unwrap(), id("am0123456789abcdef-0"));
    }

    #[test]
    fn damaged_columns_are_corrupt() {
        for bad in ["a-1", "\"a\"", "[\"a-1\"]", "\"a-1\","] {
            assert!(
                matches!(parents_from(bad), Err(StorageError::Corrupt(_))),
                "{bad}"
            );
        }
        for bad in ["", "a", "a-x", "\"a-1\""] {
            assert!(
                matches!(version_from(bad), Err(StorageError::Corrupt(_))),
                "{bad}"
            );
        }
    }
}
