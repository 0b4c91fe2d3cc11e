//! Writing a connection's frames: the session's own first, then what the
//! rooms queued, in batches flushed once (one syscall for a burst), each
//! write bounded by the slow-consumer grace and cut short by a kick, so a
//! client that stops reading cannot hold its connection's task.

use std::future::Future;
use std::time::Duration;

use super::{End, Transport};
use crate::outbound::{OutFrame, Outbound, OutboundRx};
use crate::session::Session;

/// Frames written per flush at most, so one busy queue cannot starve the
/// reads of its own connection.
const WRITE_BATCH: usize = 128;

/// Writes one frame of the queue (or acts on it), without flushing. A
/// write waits for the socket only when the transport already holds more
/// than it queues unwritten (64 KiB on a WebSocket), and then no longer
/// than a flush may.
pub(super) async fn feed<T: Transport>(
    t: &mut T,
    session: &mut Session,
    f: OutFrame,
    grace: Duration,
) -> Result<(), End> {
    match f {
        OutFrame::Text(text) => bounded(t.feed_text(text), grace, &session.out).await,
        OutFrame::Room(room) => {
            if !session.admit(&room) {
                return Ok(());
            }
            bounded(t.feed_text(room.text.clone()), grace, &session.out).await?;
            for a in &room.attachments {
                bounded(t.feed_binary(a.clone()), grace, &session.out).await?;
            }
            Ok(())
        }
        OutFrame::Evict(room) => {
            Box::pin(session.on_evicted(&room)).await;
            Ok(())
        }
    }
}

/// Flushes, for at most the slow-consumer grace, and no longer than it
/// takes for the connection to be kicked (a full queue kicks at once).
async fn flush<T: Transport>(t: &mut T, grace: Duration, out: &Outbound) -> Result<(), End> {
    bounded(t.flush(), grace, out).await
}

/// Runs a write for at most the slow-consumer grace, and no longer than it
/// takes for the connection to be kicked.
///
/// The write is polled once first: almost always the socket takes the
/// bytes at once, and the timer and the kick watch (a timer-wheel entry and
/// a lock each) are only set up for a client that is not reading — in an
/// allocation of their own, so that they take no room in every idle
/// connection's future (the write path is one of its states).
async fn bounded(
    fut: impl Future<Output = Result<(), End>>,
    grace: Duration,
    out: &Outbound,
) -> Result<(), End> {
    tokio::pin!(fut);
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(fut.as_mut().poll(cx))).await;
    if let std::task::Poll::Ready(r) = first {
        return r;
    }
    Box::pin(waited(fut, grace, out)).await
}

/// The rest of a write the socket did not take at once (see [`bounded`]).
async fn waited<F: Future<Output = Result<(), End>>>(
    fut: std::pin::Pin<&mut F>,
    grace: Duration,
    out: &Outbound,
) -> Result<(), End> {
    tokio::select! {
        r = tokio::time::timeout(grace, fut) => match r {
            Ok(r) => r,
            // The client has not read for the whole grace (counted by the
            // connection's loop, not here: `finish` writes through this too,
            // after an end that was not the client's slowness).
            Err(_) => Err(End::SlowConsumer),
        },
        kick = out.kicked() => Err(kick.into()),
    }
}

/// Writes the session's own frames (answers, acks, replays): they come
/// before queued room frames.
pub(super) async fn write_local<T: Transport>(
    t: &mut T,
    session: &mut Session,
    grace: Duration,
) -> Result<(), End> {
    if !session.has_local() {
        return Ok(());
    }
    while let Some(f) = session.pop_local() {
        feed(t, session, f, grace).await?;
    }
    let out = session.out.clone();
    flush(t, grace, &out).await
}

/// Writes `first` and whatever else is queued (up to a batch), then
/// flushes once: one syscall for a burst.
pub(super) async fn write_queued<T: Transport>(
    t: &mut T,
    session: &mut Session,
    rx: &mut OutboundRx,
    first: OutFrame,
    grace: Duration,
) -> Result<(), End> {
    feed(t, session, first, grace).await?;
    for _ in 1..WRITE_BATCH {
        match rx.try_recv() {
            Some(f) => feed(t, session, f, grace).await?,
            None => break,
        }
    }
    // An eviction may have queued an answer.
    while let Some(f) = session.pop_local() {
        feed(t, session, f, grace).await?;
    }
    let out = session.out.clone();
    flush(t, grace, &out).await
}
