//! Reads: the representation at a version, a catch-up from a version to the current one,
//! and the history since a version.

use super::*;

impl Actor {
    pub(super) fn read_at(&mut self, v: &Version) -> Result<(Bytes, Version), EngineError> {
        match &mut self.res {
            Some(Res::Present(p)) => {
                let body = p.doc.render_at(v)?;
                Ok((body, p.doc.frontier()))
            }
            _ if v.is_root() => Ok((Bytes::new(), Version::root())),
            _ => Err(crate::doc::DocError::UnknownVersion(v.ids().to_vec()).into()),
        }
    }

    pub(super) fn catch_up(&mut self, from: &Version, strict: bool) -> Result<Update, EngineError> {
        let state = self.current();
        match &mut self.res {
            Some(Res::Present(p)) => {
                let version = p.doc.frontier();
                let (parents, body) = match p.doc.knows(from) {
                    Ok(()) => (from.clone(), p.doc.diff_from(from)?),
                    Err(e) if strict => return Err(e.into()),
                    // A version from before a delete, or never seen: start over.
                    Err(_) => (Version::root(), UpdateBody::Snapshot(state.body.clone())),
                };
                Ok(Update {
                    version,
                    parents,
                    body,
                    media_type: state.media_type.clone(),
                    digest: Some(state.digest().to_string()),
                })
            }
            _ if strict && !from.is_root() => {
                Err(crate::doc::DocError::UnknownVersion(from.ids().to_vec()).into())
            }
            _ => Ok(Update {
                version: Version::root(),
                parents: from.clone(),
                body: UpdateBody::Missing,
                media_type: state.media_type.clone(),
                digest: None,
            }),
        }
    }

    pub(super) fn history(&mut self, from: &Version) -> Result<Vec<Update>, EngineError> {
        let media_type = self.current().media_type.clone();
        match &mut self.res {
            Some(Res::Present(p)) => Ok(p
                .doc
                .history_since(from)?
                .into_iter()
                .map(|(id, parents, body)| Update {
                    version: Version::one(id),
                    parents,
                    body,
                    media_type: media_type.clone(),
                    digest: None,
                })
                .collect()),
            _ if from.is_root() => Ok(Vec::new()),
            _ => Err(crate::doc::DocError::UnknownVersion(from.ids().to_vec()).into()),
        }
    }
}
