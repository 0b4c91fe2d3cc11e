//! Which node owns an Engine.IO session, and the polling sessions this node
//! owns.
//!
//! A polling session's sid ends with its node's tag (`<random>.<tag>`, the
//! tag being the node id in URL-safe base64), so any node can tell the
//! owner of a request from the request alone, with no lookup per session:
//! the only shared state is the node directory (node id → advertise URL),
//! one key per node.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use dashmap::DashMap;
use flowgate_engine::EngineError;
use flowgate_redis::NodeDirectory;

use super::polling::{SessionMap, Shared};

/// Where a request's session lives.
#[derive(Debug)]
pub(crate) enum Owner {
    /// Here.
    Local(Arc<Shared>),
    /// On the node of this id.
    Remote(String),
    /// Nowhere (ended, never existed, or a malformed sid).
    Unknown,
}

/// The node's polling sessions and the way to other nodes' sessions.
#[derive(Debug)]
pub struct Sessions {
    pub(crate) map: SessionMap,
    /// This node's tag, the suffix of its sids.
    tag: String,
    /// Other nodes' addresses; `None` with the in-memory engine (one node).
    pub(crate) directory: Option<NodeDirectory>,
    /// Addresses looked up recently: a polling client sends a request every
    /// few hundred milliseconds, and each would otherwise cost a Redis
    /// round trip. Only live nodes are cached, briefly.
    urls: DashMap<String, (Instant, String)>,
}

/// How long a looked-up address is reused.
const URL_TTL: Duration = Duration::from_secs(1);

fn tag_of(node_id: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(node_id)
}

impl Sessions {
    /// The sessions of node `node_id`.
    pub fn new(node_id: &str, directory: Option<NodeDirectory>) -> Self {
        Sessions {
            map: Arc::new(DashMap::new()),
            tag: tag_of(node_id),
            directory,
            urls: DashMap::new(),
        }
    }

    /// A fresh sid owned by this node.
    pub fn new_sid(&self) -> String {
        format!("{}.{}", crate::ids::random_id(20), self.tag)
    }

    /// Who owns `sid`.
    pub(crate) fn locate(&self, sid: &str) -> Owner {
        let Some((_, tag)) = sid.rsplit_once('.') else {
            return Owner::Unknown;
        };
        if tag == self.tag {
            return match self.map.get(sid) {
                Some(s) => Owner::Local(s.clone()),
                None => Owner::Unknown,
            };
        }
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(tag)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .map_or(Owner::Unknown, Owner::Remote)
    }

    /// The address of `node`: `Ok(None)` when it is not alive, or when
    /// there is no directory (one node).
    pub(crate) async fn url_of(&self, node: &str) -> Result<Option<String>, EngineError> {
        let Some(directory) = &self.directory else {
            return Ok(None);
        };
        if let Some(e) = self.urls.get(node) {
            if e.0.elapsed() < URL_TTL {
                return Ok(Some(e.1.clone()));
            }
        }
        let url = directory.url_of(node).await?;
        match &url {
            Some(u) => {
                // Bounded by the number of live nodes; dead ones expire.
                self.urls.retain(|_, (at, _)| at.elapsed() < URL_TTL);
                self.urls
                    .insert(node.to_owned(), (Instant::now(), u.clone()));
            }
            None => {
                self.urls.remove(node);
            }
        }
        Ok(url)
    }

    /// Open polling sessions on this node.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether this node has no polling session.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_owner_is_read_from_the_sid() {
        let a = Sessions::new("node-a", None);
        let b = Sessions::new("node/b é", None);
        let sid = b.new_sid();
        assert!(matches!(a.locate(&sid), Owner::Remote(n) if n == "node/b é"));
        // Its own sid, but no such session.
        assert!(matches!(b.locate(&sid), Owner::Unknown));
        for bad in ["", "nodot", "x.%%%", "x.//8"] {
            assert!(matches!(a.locate(bad), Owner::Unknown), "{bad}");
        }
    }
}
