//! Group commit of room events, logged and volatile: while a publish
//! script is in flight, the next events of the same group wait and then go
//! together, in one script call, in the order they came. On one Redis server (or behind Sentinel)
//! every room is one group; on a Redis Cluster a script may only touch one
//! slot, so each room is its own group.
//!
//! Why: Redis spends more on calling a script and on a round trip of I/O
//! than on the commands inside (see `docs/benchmarks.md`); under load, a
//! batch pays that once for many events. With no call in flight an event
//! goes at once, so a quiet node adds no delay. Each event keeps its own
//! offset, and an event is acknowledged only when its batch has run.
//!
//! Written by hand: a batching layer must know the slot rule and the
//! all-or-nothing deadline of the script; no crate does that for fred.

use std::collections::HashMap;

use flowgate_engine::{EngineError, Offset};
use fred::prelude::*;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::bus::offset;
use crate::keys::{channel, stream_key};
use crate::{err, RedisEngine};

/// Most events in one script call.
const MAX_EVENTS: usize = 128;
/// Most message bytes in one script call.
const MAX_CALL_BYTES: usize = 512 << 10;
/// Most message bytes waiting in one group: beyond it an event is refused
/// at once (the node is far behind Redis), so memory stays bounded.
const MAX_QUEUED_BYTES: usize = 8 << 20;

/// An event waiting for its group's call in flight.
struct Pending {
    room: String,
    message: Value,
    volatile: bool,
    len: usize,
    deadline: i64,
    done: oneshot::Sender<Result<Option<Offset>, EngineError>>,
}

/// One event of a call: room, message, volatile.
type Event<'a> = (&'a str, Value, bool);

#[derive(Default)]
struct Group {
    queue: Vec<Pending>,
    queued_bytes: usize,
}

/// The groups with a call in flight (a group without one is absent).
#[derive(Default)]
pub(crate) struct Batches {
    groups: Mutex<HashMap<String, Group>>,
}

impl RedisEngine {
    /// The group of `room`'s events: one for all rooms unless clustered.
    fn group_of(&self, room: &str) -> String {
        if self.0.clustered {
            room.to_owned()
        } else {
            String::new()
        }
    }

    /// Publishes one event, batched with others of its group when a call
    /// is in flight; resolves once its batch ran, to its offset (none for a
    /// volatile event: it is published, not logged).
    pub(crate) async fn publish_batched(
        &self,
        room: &str,
        message: Value,
        volatile: bool,
        deadline: i64,
    ) -> Result<Option<Offset>, EngineError> {
        let len = match &message {
            Value::Bytes(b) => b.len(),
            Value::String(s) => s.len(),
            _ => 0,
        };
        let group = self.group_of(room);
        let mut message = Some(message);
        let waiting = {
            let mut groups = self.0.batches.groups.lock();
            match groups.get_mut(&group) {
                Some(g) => {
                    if g.queued_bytes + len > MAX_QUEUED_BYTES {
                        return Err(EngineError("too many room events waiting for Redis".into()));
                    }
                    let (done, rx) = oneshot::channel();
                    g.queued_bytes += len;
                    g.queue.push(Pending {
                        room: room.to_owned(),
                        message: message.take().unwrap_or(Value::Null),
                        volatile,
                        len,
                        deadline,
                        done,
                    });
                    Some(rx)
                }
                None => {
                    groups.insert(group.clone(), Group::default());
                    None
                }
            }
        };
        if let Some(rx) = waiting {
            // The batch's own call has the command timeout; the wait for
            // the call ahead of it is bounded by that call's.
            return match rx.await {
                Ok(r) => r,
                Err(_) => Err(EngineError("publish batch dropped".into())),
            };
        }
        // No call in flight: this one goes at once, alone. Whatever
        // queues behind it goes next, driven by a task (the guard's drop,
        // also when this future is dropped half-way) so that this event's
        // sender has its answer now.
        let _next = HandOver {
            engine: self,
            group: Some(group),
        };
        let message = message.unwrap_or(Value::Null);
        self.run_batch(vec![(room, message, volatile)], deadline)
            .await?
            .pop()
            .unwrap_or_else(|| Err(EngineError("no offset in the publish reply".into())))
    }

    /// The next batch of `group`, or `None` (and the group is idle).
    fn take_batch(&self, group: &str) -> Option<Vec<Pending>> {
        let mut groups = self.0.batches.groups.lock();
        let g = groups.get_mut(group)?;
        if g.queue.is_empty() {
            groups.remove(group);
            return None;
        }
        let mut n = 0;
        let mut bytes = 0;
        for p in &g.queue {
            if n == MAX_EVENTS || (n > 0 && bytes + p.len > MAX_CALL_BYTES) {
                break;
            }
            n += 1;
            bytes += p.len;
        }
        g.queued_bytes -= bytes;
        Some(g.queue.drain(..n).collect())
    }

    /// Runs batches of `group` until none is waiting.
    async fn drain(self, group: String, mut batch: Vec<Pending>) {
        loop {
            // The earliest deadline of the batch: the script refuses all of
            // it past that (all or nothing, as one call).
            let deadline = batch.iter().map(|p| p.deadline).min().unwrap_or(0);
            let events: Vec<Event<'_>> = batch
                .iter_mut()
                .map(|p| {
                    let message = std::mem::replace(&mut p.message, Value::Null);
                    (p.room.as_str(), message, p.volatile)
                })
                .collect();
            let result = self.run_batch(events, deadline).await;
            match result {
                Ok(ids) => {
                    let mut ids = ids.into_iter();
                    for p in batch.drain(..) {
                        let r = ids.next().unwrap_or_else(|| {
                            Err(EngineError("no offset in the publish reply".into()))
                        });
                        let _ = p.done.send(r);
                    }
                }
                Err(e) => fail(batch, e),
            }
            match self.take_batch(&group) {
                Some(b) => batch = b,
                None => return,
            }
        }
    }

    /// One script call: every event published on its room's channel, in
    /// order, the logged ones appended to their room's stream first; each
    /// one's offset (none if volatile), or why it was not published (the
    /// first that failed, and all after it).
    async fn run_batch(
        &self,
        events: Vec<Event<'_>>,
        deadline: i64,
    ) -> Result<Vec<Result<Option<Offset>, EngineError>>, EngineError> {
        let s = &self.0.settings;
        let mut keys = Vec::with_capacity(events.len() * 2);
        let mut args = Vec::with_capacity(events.len() * 2 + 4);
        args.push(Value::from(deadline));
        args.push(Value::from(s.log_len as i64));
        args.push(Value::from(s.log_ttl.as_millis() as i64));
        args.push(Value::from(if s.bus_json { "0" } else { "1" }));
        for (room, message, volatile) in events {
            keys.push(stream_key(room));
            keys.push(channel(room));
            args.push(Value::from(if volatile { "v" } else { "l" }));
            args.push(message);
        }
        let ids: Vec<String> = self
            .0
            .scripts
            .publish
            .evalsha_with_reload(&self.0.client, keys, args)
            .await
            .map_err(err)?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(why) = id.strip_prefix('!') {
                out.push(Err(EngineError(why.to_owned())));
                break;
            }
            out.push(if id.is_empty() {
                Ok(None)
            } else {
                offset(&id).map(Some)
            });
        }
        Ok(out)
    }
}

fn fail(batch: Vec<Pending>, e: EngineError) {
    for p in batch {
        let _ = p.done.send(Err(EngineError(e.0.clone())));
    }
}

/// Dropped when a group's first call is over (or abandoned): hands what
/// queued behind it to a draining task, or marks the group idle.
struct HandOver<'a> {
    engine: &'a RedisEngine,
    group: Option<String>,
}

impl Drop for HandOver<'_> {
    fn drop(&mut self) {
        let Some(group) = self.group.take() else {
            return;
        };
        if let Some(batch) = self.engine.take_batch(&group) {
            // A future dropped outside any runtime (a runtime that is gone)
            // cannot hand over: its waiters get an error, not a panic.
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(self.engine.clone().drain(group, batch));
                }
                Err(_) => fail(batch, EngineError("the node is stopping".into())),
            }
        }
    }
}
