//! The receiving side of the room bus: the pump that hands every room
//! message from the subscriber client to the node's fan-out, in order, and
//! fills the gaps a subscriber leaves.
//!
//! Two things lose live messages: the pump falling behind (the client's
//! broadcast channel lags) and the subscriber's connection dropping. In
//! both cases the messages are still in each room's log, so the pump reads
//! every local room's log after the last offset this node delivered and
//! delivers what it missed — in the pump itself, before any later live
//! message, so that room order holds. Only a gap the log no longer holds
//! (trimmed) makes that room's members reconnect.

use flowgate_engine::{wire, Offset, Replay, RoomBus};
use fred::prelude::*;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::keys::{channel, room_of_channel};
use crate::RedisEngine;

impl RedisEngine {
    /// Hands every room message to the node's fan-out, in arrival order;
    /// re-subscribes and fills gaps after a reconnect or a lag.
    pub(crate) async fn pump(self, stop: CancellationToken) {
        let mut rx = self.0.subscriber.message_rx();
        let mut reconnects = self.0.subscriber.reconnect_rx();
        // A fill that could not read the logs (Redis went away again) is
        // tried again: the positions stay where they were, so nothing is
        // skipped.
        let mut retry = tokio::time::interval(std::time::Duration::from_millis(500));
        let mut pending = false;
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                _ = retry.tick(), if pending => {
                    pending = !self.fill_gaps().await;
                }
                // Messages of the old connection first: they are older.
                // While a fill is pending, live messages wait in the
                // channel: delivering one would move the room's position
                // past the events the fill has yet to read (the command
                // client may come back after the subscriber, as in a
                // cluster failover), and those would be skipped for good.
                m = rx.recv(), if !pending => match m {
                    Ok(m) => self.on_message(&m.channel, &m.value),
                    Err(RecvError::Lagged(n)) => {
                        self.0.metrics.bus_lagged.inc_by(n);
                        warn!(lost = n, "subscriber fell behind; filling the gap from the room logs");
                        pending = !self.fill_gaps().await;
                    }
                    Err(RecvError::Closed) => return,
                },
                r = reconnects.recv() => {
                    if r.is_err() {
                        return;
                    }
                    self.resubscribe().await;
                    pending = !self.fill_gaps().await;
                }
            }
        }
    }

    fn on_message(&self, channel: &str, value: &Value) {
        let Some(room) = room_of_channel(channel) else {
            return;
        };
        // A clone of the `Bytes` the client received: the frame is sliced
        // out of it, not copied.
        let bytes = match value {
            Value::Bytes(b) => b.clone(),
            Value::String(s) => s.inner().clone(),
            _ => {
                warn!(channel, "non-text room message ignored");
                return;
            }
        };
        match wire::decode_live(bytes) {
            Ok((offset, msg)) => {
                self.0.metrics.bus_messages.inc();
                self.0.sink.deliver(room, offset, &msg);
            }
            Err(e) => {
                self.0.metrics.bus_undecodable.inc();
                warn!(channel, error = %e, "undecodable room message ignored");
            }
        }
    }

    /// Subscribes again to every room that has a local member (the node's
    /// own record is the truth).
    async fn resubscribe(&self) {
        let rooms = self.0.sink.local_rooms();
        self.0.metrics.resubscribes.inc();
        info!(rooms = rooms.len(), "re-subscribing rooms after reconnect");
        for room in rooms {
            if let Err(e) = self.0.subscriber.ssubscribe(channel(&room)).await {
                warn!(room, error = %e, "re-subscribe failed");
            }
        }
    }

    /// Delivers, for every local room, the logged events after the last
    /// offset this node delivered. Returns `false` when a log could not be
    /// read (to be tried again).
    pub(crate) async fn fill_gaps(&self) -> bool {
        let mut done = true;
        let max = self.0.settings.log_len.max(1) as usize;
        for (room, last) in self.0.sink.positions() {
            let mut after: Offset = last;
            loop {
                match self.read_after(&room, after, max).await {
                    Ok(Replay::Events(events)) => {
                        let n = events.len();
                        for (o, msg) in events {
                            self.0.sink.deliver(&room, Some(o), &msg);
                            after = o;
                        }
                        self.0.metrics.gap_filled.inc_by(n as u64);
                        if n < max {
                            break;
                        }
                    }
                    Ok(Replay::Gone) => {
                        error!(
                            room,
                            "gap larger than the room log: the room's members reconnect"
                        );
                        self.0.sink.resync(&room);
                        break;
                    }
                    Err(e) => {
                        warn!(room, error = %e, "gap not filled yet; trying again");
                        done = false;
                        break;
                    }
                }
            }
        }
        done
    }
}
