//! The room bus: publishing a room event (stream append + `SPUBLISH` in one
//! script, so offsets and delivery order agree) and the node's sharded
//! subscriptions to room channels.

use async_trait::async_trait;
use flowgate_engine::{EngineError, RoomBus, RoomMessage};
use fred::prelude::*;

use crate::keys::{channel, stream_key};
use crate::{err, RedisEngine};

#[async_trait]
impl RoomBus for RedisEngine {
    async fn publish(&self, room: &str, msg: RoomMessage) -> Result<String, EngineError> {
        self.ensure_up()?;
        let json = serde_json::to_string(&msg).map_err(err)?;
        if msg.volatile {
            // Never replayed, so not worth a stream entry.
            let _: i64 = self
                .0
                .client
                .spublish(channel(room), format!("- {json}"))
                .await
                .map_err(err)?;
            return Ok("-".to_owned());
        }
        let s = &self.0.settings;
        self.0
            .scripts
            .publish
            .evalsha_with_reload(
                &self.0.client,
                vec![stream_key(room), channel(room)],
                vec![
                    json,
                    s.log_len.to_string(),
                    (s.log_ttl.as_millis() as i64).to_string(),
                ],
            )
            .await
            .map_err(err)
    }

    async fn subscribe(&self, room: &str) -> Result<(), EngineError> {
        self.ensure_up()?;
        self.0
            .subscriber
            .ssubscribe(channel(room))
            .await
            .map_err(err)
    }

    async fn unsubscribe(&self, room: &str) -> Result<(), EngineError> {
        self.0
            .subscriber
            .sunsubscribe(channel(room))
            .await
            .map_err(err)
    }
}
