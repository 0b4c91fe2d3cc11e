//! The receiving side of the room bus: the pump that hands every room
//! message from the subscriber client to the node's fan-out, and the task
//! that re-subscribes the node's rooms after the subscriber reconnects.

use flowgate_engine::RoomMessage;
use fred::prelude::*;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::keys::{channel, room_of_channel};
use crate::RedisEngine;

impl RedisEngine {
    /// Hands every room message to the node's fan-out, in arrival order.
    pub(crate) async fn pump(self, stop: CancellationToken) {
        let mut rx = self.0.subscriber.message_rx();
        loop {
            let msg = tokio::select! {
                _ = stop.cancelled() => return,
                m = rx.recv() => m,
            };
            match msg {
                Ok(m) => self.on_message(&m.channel, &m.value),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    self.0.metrics.bus_lagged.inc_by(n);
                    error!(
                        lost = n,
                        "room messages lost: subscriber fell behind; members reconnect to reload"
                    );
                    self.0.sink.resync();
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    fn on_message(&self, channel: &str, value: &Value) {
        let Some(room) = room_of_channel(channel) else {
            return;
        };
        let Some(text) = value.as_bytes().and_then(|b| std::str::from_utf8(b).ok()) else {
            warn!(channel, "non-text room message ignored");
            return;
        };
        let Some((offset, json)) = text.split_once(' ') else {
            warn!(channel, "room message without offset ignored");
            return;
        };
        match serde_json::from_str::<RoomMessage>(json) {
            Ok(msg) => {
                self.0.metrics.bus_messages.inc();
                self.0.sink.deliver(room, offset.parse().ok(), &msg);
            }
            Err(e) => warn!(channel, error = %e, "undecodable room message ignored"),
        }
    }

    /// After the subscriber reconnects, subscribes again to every room
    /// that has a local member (the node's own record is the truth).
    pub(crate) async fn resubscriber(self, stop: CancellationToken) {
        let mut rx = self.0.subscriber.reconnect_rx();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = rx.recv() => if r.is_err() { return },
            }
            let rooms = self.0.sink.local_rooms();
            self.0.metrics.resubscribes.inc();
            info!(rooms = rooms.len(), "re-subscribing rooms after reconnect");
            for room in rooms {
                if let Err(e) = self.0.subscriber.ssubscribe(channel(&room)).await {
                    warn!(room, error = %e, "re-subscribe failed");
                }
            }
        }
    }
}
