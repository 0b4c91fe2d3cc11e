//! The room bus: publishing a room event (stream append + `SPUBLISH` in one
//! script, so offsets and delivery order agree; batched in `batches`), reading the room log back
//! for recovery and gap fill, and the node's sharded subscriptions to room
//! channels.

use async_trait::async_trait;
use flowgate_engine::{wire, EngineError, Offset, Replay, RoomBus, RoomMessage};
use fred::prelude::*;
use tracing::warn;

use crate::keys::{channel, stream_key};
use crate::{err, RedisEngine};

pub(crate) fn offset(id: &str) -> Result<Offset, EngineError> {
    id.parse()
        .map_err(|_| EngineError(format!("bad stream id {id:?}")))
}

/// Decodes `[[id, [field, value, …]], …]` (XRANGE) into room messages.
fn decode_entries(v: Value) -> Vec<(Offset, RoomMessage)> {
    let Value::Array(entries) = v else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let Value::Array(pair) = e else { continue };
        let mut it = pair.into_iter();
        let (Some(id), Some(Value::Array(fields))) = (it.next(), it.next()) else {
            continue;
        };
        let Some(Ok(o)) = id.as_str().map(|s| s.parse::<Offset>()) else {
            continue;
        };
        let mut f = fields.into_iter();
        while let (Some(k), Some(v)) = (f.next(), f.next()) {
            if k.as_str().as_deref() != Some("m") {
                continue;
            }
            match v.into_bytes().map(wire::decode_logged) {
                Some(Ok(m)) => out.push((o, m)),
                Some(Err(e)) => warn!(offset = %o, error = %e, "unreadable room log entry skipped"),
                None => warn!(offset = %o, "unreadable room log entry skipped"),
            }
        }
    }
    out
}

#[async_trait]
impl RoomBus for RedisEngine {
    async fn publish(&self, room: &str, msg: RoomMessage) -> Result<Option<Offset>, EngineError> {
        self.ensure_up()?;
        // The frame is built here, once for the whole cluster (see
        // `flowgate_engine::wire`).
        let message = if self.0.settings.bus_json {
            Value::from(wire::encode_legacy(&msg).map_err(err)?)
        } else {
            Value::Bytes(wire::encode(&msg).map_err(err)?)
        };
        // A volatile event is never replayed, so not worth a stream entry:
        // it is only published (the JSON format marks it with `- `).
        let message = match message {
            Value::String(json) if msg.volatile => Value::from(format!("- {json}")),
            other => other,
        };
        // Batched with the room's (or, on one server, the node's) other
        // events while a call is in flight: see `batches`.
        self.publish_batched(room, message, msg.volatile, self.deadline_ms())
            .await
    }

    async fn head(&self, room: &str) -> Result<Offset, EngineError> {
        self.ensure_up()?;
        let v: Value = self
            .0
            .client
            .xrevrange(stream_key(room), "+", "-", Some(1))
            .await
            .map_err(err)?;
        Ok(decode_ids(v).into_iter().next().unwrap_or_default())
    }

    async fn read_after(
        &self,
        room: &str,
        after: Offset,
        max: usize,
    ) -> Result<Replay, EngineError> {
        self.ensure_up()?;
        let v: Value = self
            .0
            .scripts
            .read_after
            .evalsha_with_reload(
                &self.0.client,
                vec![stream_key(room)],
                vec![after.to_string(), max.max(1).to_string()],
            )
            .await
            .map_err(err)?;
        let Value::Array(parts) = v else {
            return Err(EngineError("unexpected room log reply".into()));
        };
        let mut it = parts.into_iter();
        let max_deleted = it
            .next()
            .and_then(|v| v.as_str().map(|s| s.to_string()))
            .unwrap_or_else(|| "0-0".into());
        // Events after `after` were deleted: nobody can fill that gap.
        if offset(&max_deleted)? > after {
            return Ok(Replay::Gone);
        }
        let entries = it.next();
        // The head was trimmed and `after` is older than what is left:
        // what followed it may be gone (whether it is cannot be told, so
        // the gap counts as lost; a client then gets a new session).
        let trimmed_first = it
            .next()
            .and_then(|v| v.as_str().map(|s| s.to_string()))
            .filter(|s| !s.is_empty());
        if let Some(first) = trimmed_first {
            if offset(&first)? > after {
                return Ok(Replay::Gone);
            }
        }
        Ok(Replay::Events(
            entries.map(decode_entries).unwrap_or_default(),
        ))
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

/// The ids of an XRANGE/XREVRANGE reply.
fn decode_ids(v: Value) -> Vec<Offset> {
    let Value::Array(entries) = v else {
        return Vec::new();
    };
    entries
        .into_iter()
        .filter_map(|e| match e {
            Value::Array(pair) => pair.into_iter().next()?.as_str()?.parse().ok(),
            _ => None,
        })
        .collect()
}
