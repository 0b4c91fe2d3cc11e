//! The node directory: where each live node can be reached by the others
//! (its advertise URL), so a node that receives an HTTP long-polling
//! request for a session it does not own can forward it to the owner.
//!
//! Each node keeps `flowgate:node:{id}:url` alive with a TTL of the
//! dead-node timeout, refreshed every heartbeat interval, beside (not in)
//! the heartbeat so the presence code stays untouched. A node that stops
//! refreshing drops out of the directory by itself; its sessions' requests
//! then get "Session ID unknown" and the clients reconnect elsewhere. It
//! has its own connection: a lookup on the request path must not queue
//! behind room traffic.

use std::sync::Arc;
use std::time::Duration;

use flowgate_engine::EngineError;
use fred::prelude::*;
use fred::types::Expiration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::{err, RedisSettings};

/// The directory key of `node`, under the node's hash tag.
fn url_key(node: &str) -> String {
    format!("flowgate:node:{{{node}}}:url")
}

/// Publishes this node's advertise URL and looks up other nodes'.
#[derive(Clone)]
pub struct NodeDirectory {
    client: Client,
    /// Set once the node knows its listen port (after binding).
    advertise: Arc<watch::Sender<Option<String>>>,
}

impl std::fmt::Debug for NodeDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeDirectory")
            .field("advertise", &*self.advertise.borrow())
            .finish_non_exhaustive()
    }
}

impl NodeDirectory {
    /// Connects (without waiting for Redis) and starts the refresh task on
    /// `tasks`; the entry is removed when `stop` is cancelled.
    pub fn start(
        settings: &RedisSettings,
        tasks: &TaskTracker,
        stop: CancellationToken,
    ) -> Result<Self, EngineError> {
        let config = crate::client::config(settings)?;
        let client = crate::client::build_client(&config, settings, 16).map_err(err)?;
        client.connect();
        let (tx, rx) = watch::channel(None);
        let dir = NodeDirectory {
            client: client.clone(),
            advertise: Arc::new(tx),
        };
        let key = url_key(&settings.node_id);
        tasks.spawn(refresh(
            client,
            key,
            rx,
            settings.heartbeat,
            settings.dead_after,
            stop,
        ));
        Ok(dir)
    }

    /// Sets the URL other nodes use to reach this one.
    pub fn advertise(&self, url: String) {
        self.advertise.send_replace(Some(url));
    }

    /// The advertise URL of `node`, or `None` when it is not alive.
    pub async fn url_of(&self, node: &str) -> Result<Option<String>, EngineError> {
        self.client.get(url_key(node)).await.map_err(err)
    }
}

async fn refresh(
    client: Client,
    key: String,
    mut url: watch::Receiver<Option<String>>,
    every: Duration,
    ttl: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
            // Publish at once when the URL becomes known.
            r = url.changed() => if r.is_err() { break },
        }
        let Some(u) = url.borrow_and_update().clone() else {
            continue;
        };
        let ttl_ms = ttl.as_millis().max(1) as i64;
        let r: Result<(), _> = client
            .set(&key, u, Some(Expiration::PX(ttl_ms)), None, false)
            .await;
        if let Err(e) = r {
            warn!(error = %e, "node directory refresh failed");
        }
    }
    // Clean exit: no one should forward to this node any more.
    let _: Result<i64, _> = client.del(&key).await;
    let _ = client.quit().await;
}
