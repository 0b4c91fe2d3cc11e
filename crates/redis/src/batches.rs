//! Group commit of room events, logged and volatile: while a publish
//! script is in flight, or for a short linger after the group's last call
//! was sent, the next events of the same group wait and then go together,
//! in one script call, in the order they came. On one Redis server (or
//! behind Sentinel) every room is one group; on a Redis Cluster a script
//! may only touch one slot, so each room is its own group.
//!
//! Why: what Redis spends on a call is mostly the wake-up and the round
//! trip of I/O around it, not the commands inside (on this project's test
//! machine a lone `PING` costs Redis ~90 µs of CPU, one of 16 pipelined
//! ones ~4 µs; see `docs/benchmarks.md`). A batch pays that once for many
//! events. The linger (`FLOWGATE_PUBLISH_LINGER_US`) bounds a node's calls
//! per group to one per linger, so batches form also when Redis answers
//! quickly; an event that comes after a quiet linger goes at once, so a
//! quiet node adds no delay, and a busy one adds at most the linger. Each
//! event keeps its own offset, and an event is acknowledged only when its
//! batch has run.
//!
//! Written by hand: a batching layer must know the slot rule and the
//! all-or-nothing deadline of the script; no crate does that for fred.

use std::collections::HashMap;
use std::time::{Duration, Instant};

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

struct Group {
    queue: Vec<Pending>,
    queued_bytes: usize,
    /// A call is in flight, or a task is due to send what queued: new
    /// events queue behind it.
    busy: bool,
    /// When the group's last call was sent.
    last_sent: Instant,
}

impl Group {
    /// A group as if its last call was a linger ago.
    fn idle(now: Instant, linger: Duration) -> Self {
        Group {
            queue: Vec::new(),
            queued_bytes: 0,
            busy: false,
            last_sent: now.checked_sub(linger).unwrap_or(now),
        }
    }
}

/// The groups that are busy or sent a call less than a linger ago (any
/// other is as good as absent, and is pruned).
#[derive(Default)]
pub(crate) struct Batches {
    groups: Mutex<Groups>,
}

#[derive(Default)]
struct Groups {
    map: HashMap<String, Group>,
    /// Idle groups are pruned when the map reaches this size (doubling, so
    /// pruning costs O(1) per new group).
    prune_at: usize,
}

impl Groups {
    /// Drops the groups that are idle and whose linger is over.
    fn prune(&mut self, now: Instant, linger: Duration) {
        if self.map.len() < self.prune_at {
            return;
        }
        self.map.retain(|_, g| g.busy || now < g.last_sent + linger);
        self.prune_at = (self.map.len() * 2).max(64);
    }
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
    /// is in flight or the group's linger is not over; resolves once its
    /// batch ran, to its offset (none for a volatile event: it is
    /// published, not logged).
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
        let linger = self.0.settings.publish_linger;
        let now = Instant::now();
        let mut message = Some(message);
        let waiting = {
            let mut guard = self.0.batches.groups.lock();
            let groups = &mut *guard;
            if !groups.map.contains_key(&group) {
                groups.prune(now, linger);
            }
            let g = groups
                .map
                .entry(group.clone())
                .or_insert_with(|| Group::idle(now, linger));
            if !g.busy && now >= g.last_sent + linger {
                // Nothing in flight and the linger is over: at once.
                g.busy = true;
                g.last_sent = now;
                None
            } else {
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
                // An idle group within its linger: this event starts the
                // task that sends it when the linger ends.
                let first = !g.busy;
                g.busy = true;
                Some((rx, first))
            }
        };
        let Some((rx, first)) = waiting else {
            let message = message.unwrap_or(Value::Null);
            return self
                .publish_alone(group, room, message, volatile, deadline)
                .await;
        };
        if first {
            tokio::spawn(self.clone().drain(group));
        }
        // The batch's own call has the command timeout; the wait for the
        // call ahead of it is bounded by that call's, the linger by itself.
        match rx.await {
            Ok(r) => r,
            Err(_) => Err(EngineError("publish batch dropped".into())),
        }
    }

    /// Sends one event at once, in its own call (the group is marked busy
    /// and its call sent now). Whatever queues behind it goes next, driven
    /// by a task (the guard's drop, also when this future is dropped
    /// half-way) so that this event's sender has its answer now.
    async fn publish_alone(
        &self,
        group: String,
        room: &str,
        message: Value,
        volatile: bool,
        deadline: i64,
    ) -> Result<Option<Offset>, EngineError> {
        let _next = HandOver {
            engine: self,
            group: Some(group),
        };
        self.run_batch(vec![(room, message, volatile)], deadline)
            .await?
            .pop()
            .unwrap_or_else(|| Err(EngineError("no offset in the publish reply".into())))
    }

    /// When `group`'s next call may be sent: a linger after its last.
    fn next_send(&self, group: &str) -> Option<Instant> {
        let groups = self.0.batches.groups.lock();
        let g = groups.map.get(group)?;
        Some(g.last_sent + self.0.settings.publish_linger)
    }

    /// The next batch of `group` (its call counted as sent now), or `None`
    /// (and the group is idle).
    fn take_batch(&self, group: &str) -> Option<Vec<Pending>> {
        let mut groups = self.0.batches.groups.lock();
        if !self.waiting(&mut groups, group) {
            return None;
        }
        let g = groups.map.get_mut(group)?;
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
        g.last_sent = Instant::now();
        Some(g.queue.drain(..n).collect())
    }

    /// Whether events of `group` wait; if none does, the group is idle.
    fn has_waiting(&self, group: &str) -> bool {
        self.waiting(&mut self.0.batches.groups.lock(), group)
    }

    /// Whether events of `group` wait; if none does, the group becomes
    /// idle (and is forgotten without a linger to remember).
    fn waiting(&self, groups: &mut Groups, group: &str) -> bool {
        let Some(g) = groups.map.get_mut(group) else {
            return false;
        };
        if g.queue.is_empty() {
            g.busy = false;
            if self.0.settings.publish_linger.is_zero() {
                groups.map.remove(group);
            }
            return false;
        }
        true
    }

    /// Runs batches of `group`, each a linger after the last call was
    /// sent, until none is waiting.
    async fn drain(self, group: String) {
        loop {
            if let Some(at) = self.next_send(&group) {
                if at > Instant::now() {
                    tokio::time::sleep_until(at.into()).await;
                }
            }
            let Some(mut batch) = self.take_batch(&group) else {
                return;
            };
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
        let m = &self.0.metrics;
        m.publish_calls.inc();
        m.published_events.inc_by(keys.len() as u64 / 2);
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
        if self.engine.has_waiting(&group) {
            // A future dropped outside any runtime (a runtime that is gone)
            // cannot hand over: its waiters get an error, not a panic.
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(self.engine.clone().drain(group));
                }
                Err(_) => {
                    while let Some(batch) = self.engine.take_batch(&group) {
                        fail(batch, EngineError("the node is stopping".into()));
                    }
                }
            }
        }
    }
}
