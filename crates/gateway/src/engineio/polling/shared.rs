//! What a polling session shares between its connection task and the HTTP
//! requests that carry it: the frames waiting for a GET, the packets a
//! POST delivered, and the few flags of the protocol (one GET at a time,
//! the upgrade's noop, closed).
//!
//! Everything here is bounded in bytes. Output waits in `out` until a GET
//! takes it; once `out` holds more than the outbound bound (bytes or
//! frames, as a WebSocket's queue) the
//! connection task stops writing (and is closed as a slow consumer after
//! the grace, as over WebSocket). Input is admitted against a byte budget
//! (a semaphore): a POST waits while the task has not read what came
//! before, so a client cannot pile up input faster than the session reads.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use flowgate_protocol::{decode_payload, encode_payload, OutPacket, PayloadPacket};
use parking_lot::Mutex;
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::engineio::ws::WsTransport;
use crate::engineio::{End, Incoming};

/// One outbound packet waiting for a GET.
#[derive(Debug, Clone)]
pub(crate) enum Frame {
    Text(Utf8Bytes),
    Binary(Bytes),
}

impl Frame {
    fn len(&self) -> usize {
        match self {
            Frame::Text(t) => t.len(),
            Frame::Binary(b) => b.len(),
        }
    }
}

/// A posted packet, holding its share of the input budget until read.
#[derive(Debug)]
pub(crate) struct Inbound {
    pub(crate) item: Incoming,
    _permit: OwnedSemaphorePermit,
}

/// What an HTTP request asks of the connection task.
#[derive(Debug)]
pub(crate) enum Control {
    /// The client broke the protocol (two GETs, two POSTs, a bad payload):
    /// the session ends.
    Close(End),
    /// The probe WebSocket completed the upgrade: it carries the session
    /// from now on.
    Upgraded(Box<WsTransport>),
}

/// Why a polling request failed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PollError {
    /// The session is gone (or ended): 400 "Session ID unknown".
    Unknown,
    /// The request broke the protocol (and ended the session): 400.
    BadRequest(&'static str),
}

#[derive(Debug, Default)]
struct State {
    out: VecDeque<Frame>,
    out_bytes: usize,
    /// A GET is waiting; a second at the same time ends the session.
    polling: bool,
    /// A POST is being read; likewise one at a time.
    posting: bool,
    /// The upgrade probe succeeded: release the waiting GET with a noop.
    noop_due: bool,
    /// A probe WebSocket is under way; a second is refused.
    probing: bool,
    /// The session moved to WebSocket; polling requests are refused.
    upgraded: bool,
    /// The session ended: a GET gets what is left, then the sid is unknown.
    closed: bool,
}

/// The shared half of one polling session.
#[derive(Debug)]
pub(crate) struct Shared {
    state: Mutex<State>,
    /// Wakes the waiting GET.
    readable: Notify,
    /// Wakes the connection task waiting for a GET to take its output.
    drained: Notify,
    inbound: mpsc::UnboundedSender<Inbound>,
    /// Bytes of posted packets the task has not read yet.
    budget: Arc<Semaphore>,
    budget_bytes: usize,
    pub(crate) control: mpsc::Sender<Control>,
    max_out_bytes: usize,
    max_out_frames: usize,
    /// The session's CONNECT was accepted: a POST may carry up to the max
    /// payload, not only the limit of an unauthenticated socket.
    connected: AtomicBool,
}

/// The connection task's ends of the channels.
#[derive(Debug)]
pub(crate) struct TaskEnds {
    pub(crate) inbound: mpsc::UnboundedReceiver<Inbound>,
    pub(crate) control: mpsc::Receiver<Control>,
}

/// Resets a flag when the request holding it ends, however it ends (a
/// client that drops a long-poll must be able to poll again).
struct FlagGuard<'a>(&'a Shared, fn(&mut State) -> &mut bool);

impl Drop for FlagGuard<'_> {
    fn drop(&mut self) {
        *(self.1)(&mut self.0.state.lock()) = false;
    }
}

impl Shared {
    /// A session whose output is bounded by `max_out_bytes` and
    /// `max_out_frames` and whose unread input by `budget_bytes` (at least
    /// one max payload).
    pub(crate) fn new(
        max_out_bytes: usize,
        max_out_frames: usize,
        budget_bytes: usize,
    ) -> (Arc<Self>, TaskEnds) {
        let (in_tx, in_rx) = mpsc::unbounded_channel();
        let (ctl_tx, ctl_rx) = mpsc::channel(4);
        let budget_bytes = budget_bytes.clamp(1, u32::MAX as usize);
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            readable: Notify::new(),
            drained: Notify::new(),
            inbound: in_tx,
            budget: Arc::new(Semaphore::new(budget_bytes)),
            budget_bytes,
            control: ctl_tx,
            max_out_bytes,
            max_out_frames,
            connected: AtomicBool::new(false),
        });
        let ends = TaskEnds {
            inbound: in_rx,
            control: ctl_rx,
        };
        (shared, ends)
    }

    /// Ends the session for a protocol breach (best effort: a task that
    /// already ends needs no telling).
    fn breach(&self, reason: &'static str) -> PollError {
        let _ = self
            .control
            .try_send(Control::Close(End::Protocol(reason, String::new())));
        PollError::BadRequest(reason)
    }

    /// Marks the session's CONNECT accepted.
    pub(crate) fn set_connected(&self) {
        self.connected.store(true, Ordering::Relaxed);
    }

    /// Whether the session's CONNECT was accepted.
    pub(crate) fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// The node's read budget is spent: the session ends (the client
    /// reconnects and recovers).
    pub(crate) fn read_budget_spent(&self) {
        let _ = self.control.try_send(Control::Close(End::ReadBudget));
    }

    /// A POST over the max payload ends the session.
    pub(crate) fn oversize(&self) {
        let _ = self.control.try_send(Control::Close(End::Oversize));
    }

    /// A GET: waits for output and returns it as one payload.
    pub(crate) async fn poll(&self) -> Result<String, PollError> {
        {
            let mut s = self.state.lock();
            if s.upgraded {
                return Err(PollError::BadRequest("session upgraded to websocket"));
            }
            if s.polling {
                drop(s);
                return Err(self.breach("overlapping polling GET"));
            }
            s.polling = true;
        }
        let _guard = FlagGuard(self, |s| &mut s.polling);
        loop {
            // Registered before the state is read, so a wake between the
            // read and the await is not lost.
            let readable = self.readable.notified();
            tokio::pin!(readable);
            readable.as_mut().enable();
            {
                let mut s = self.state.lock();
                if !s.out.is_empty() {
                    // The close packet goes in a payload of its own: the
                    // stock client acts on an Engine.IO close at once but
                    // hands the Socket.IO packets before it to the socket a
                    // tick later, so a close in the same payload overtakes
                    // them (an event then came again in the recovery
                    // replay; an `error` TOKEN_EXPIRED was never seen).
                    let mut n = s.out.len();
                    if n > 1 && s.closed && !s.upgraded && is_close(s.out.back()) {
                        n -= 1;
                    }
                    let frames: Vec<Frame> = s.out.drain(..n).collect();
                    s.out_bytes -= frames.iter().map(Frame::len).sum::<usize>();
                    drop(s);
                    self.drained.notify_waiters();
                    return Ok(encode(&frames));
                }
                if s.closed {
                    return Err(PollError::Unknown);
                }
                if s.noop_due || s.upgraded {
                    s.noop_due = false;
                    return Ok("6".to_owned());
                }
            }
            readable.await;
        }
    }

    /// A POST: splits the payload and hands its packets to the task, in
    /// order, waiting while the input budget is spent.
    pub(crate) async fn post(&self, body: Bytes) -> Result<(), PollError> {
        {
            let mut s = self.state.lock();
            if s.upgraded {
                return Err(PollError::BadRequest("session upgraded to websocket"));
            }
            if s.closed {
                return Err(PollError::Unknown);
            }
            if s.posting {
                drop(s);
                return Err(self.breach("overlapping polling POST"));
            }
            s.posting = true;
        }
        let _guard = FlagGuard(self, |s| &mut s.posting);
        let Ok(text) = std::str::from_utf8(&body) else {
            return Err(self.breach("polling payload is not UTF-8"));
        };
        let packets = decode_payload(text).map_err(|_| self.breach("bad polling payload"))?;
        for p in packets {
            let item = match p {
                PayloadPacket::Text(t) => {
                    // A slice of the body: no copy.
                    let bytes = body.slice_ref(t.as_bytes());
                    Incoming::Text(Utf8Bytes::try_from(bytes).map_err(|_| PollError::Unknown)?)
                }
                PayloadPacket::Binary(b) => Incoming::Binary(Bytes::from(b)),
            };
            let n = match &item {
                Incoming::Text(t) => t.len(),
                Incoming::Binary(b) => b.len(),
            };
            let n = n.clamp(1, self.budget_bytes) as u32;
            let permit = self
                .budget
                .clone()
                .acquire_many_owned(n)
                .await
                .map_err(|_| PollError::Unknown)?;
            self.inbound
                .send(Inbound {
                    item,
                    _permit: permit,
                })
                .map_err(|_| PollError::Unknown)?;
        }
        Ok(())
    }

    /// The task's output, for the next GET. Returns whether the buffer is
    /// over its byte bound.
    pub(crate) fn push_out(&self, frames: impl IntoIterator<Item = Frame>) -> bool {
        let mut s = self.state.lock();
        for f in frames {
            s.out_bytes += f.len();
            s.out.push_back(f);
        }
        let full = self.over(&s);
        drop(s);
        self.readable.notify_one();
        full
    }

    /// Waits until a GET took the output (the buffer is back under its
    /// bound).
    pub(crate) async fn wait_drained(&self) {
        loop {
            let drained = self.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if !self.over(&self.state.lock()) {
                return;
            }
            drained.await;
        }
    }

    /// Whether the output waiting for a GET is over its bound.
    fn over(&self, s: &State) -> bool {
        s.out_bytes > self.max_out_bytes || s.out.len() > self.max_out_frames
    }

    /// A probe WebSocket arrives; `false` if one is already under way or
    /// the session already moved.
    pub(crate) fn begin_probe(&self) -> bool {
        let mut s = self.state.lock();
        if s.probing || s.upgraded || s.closed {
            return false;
        }
        s.probing = true;
        true
    }

    /// The probe answered `3probe`: the waiting GET returns with a noop so
    /// the client can pause polling and send `5`.
    pub(crate) fn release_poll(&self) {
        self.state.lock().noop_due = true;
        self.readable.notify_one();
    }

    /// The probe failed: polling goes on, and another probe may come.
    pub(crate) fn probe_failed(&self) {
        let mut s = self.state.lock();
        s.probing = false;
        s.noop_due = false;
    }

    /// The session moves to WebSocket: takes what no GET took yet (it is
    /// written on the WebSocket first) and refuses polling from now on.
    pub(crate) fn upgrade(&self) -> Vec<Frame> {
        let mut s = self.state.lock();
        s.upgraded = true;
        s.out_bytes = 0;
        let left = s.out.drain(..).collect();
        drop(s);
        self.readable.notify_one();
        self.drained.notify_waiters();
        left
    }

    /// Ends the session: a waiting or next GET gets what is left and a
    /// close packet; POSTs waiting for budget fail.
    pub(crate) fn close(&self) {
        let mut s = self.state.lock();
        if s.closed {
            return;
        }
        s.closed = true;
        if !s.upgraded {
            s.out.push_back(Frame::Text(Utf8Bytes::from_static("1")));
            s.out_bytes += 1;
        }
        drop(s);
        self.budget.close();
        self.readable.notify_one();
    }

    /// Waits until a GET took everything, the close packet included.
    pub(crate) async fn wait_empty(&self) {
        loop {
            let drained = self.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if self.state.lock().out.is_empty() {
                return;
            }
            drained.await;
        }
    }
}

/// Whether `f` is the Engine.IO close packet.
fn is_close(f: Option<&Frame>) -> bool {
    matches!(f, Some(Frame::Text(t)) if t.as_str() == "1")
}

fn encode(frames: &[Frame]) -> String {
    encode_payload(frames.iter().map(|f| match f {
        Frame::Text(t) => OutPacket::Text(t.as_str()),
        Frame::Binary(b) => OutPacket::Binary(b),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn text(s: &'static str) -> Frame {
        Frame::Text(Utf8Bytes::from_static(s))
    }

    #[tokio::test]
    async fn a_poll_waits_for_output_and_takes_all_of_it() {
        let (s, _ends) = Shared::new(1 << 20, 1024, 1 << 20);
        let waiter = {
            let s = s.clone();
            tokio::spawn(async move { s.poll().await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        s.push_out([text("2"), Frame::Binary(Bytes::from_static(&[1, 2, 3]))]);
        assert_eq!(waiter.await.unwrap().unwrap(), "2\x1ebAQID");
    }

    #[tokio::test]
    async fn a_second_concurrent_poll_ends_the_session() {
        let (s, mut ends) = Shared::new(1 << 20, 1024, 1 << 20);
        let first = {
            let s = s.clone();
            tokio::spawn(async move { s.poll().await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(matches!(s.poll().await, Err(PollError::BadRequest(_))));
        assert!(matches!(
            ends.control.recv().await,
            Some(Control::Close(End::Protocol(..)))
        ));
        s.close();
        assert_eq!(first.await.unwrap().unwrap(), "1");
        assert_eq!(s.poll().await, Err(PollError::Unknown));
    }

    #[tokio::test]
    async fn a_dropped_poll_frees_the_slot_and_loses_nothing() {
        let (s, _ends) = Shared::new(1 << 20, 1024, 1 << 20);
        let _ = tokio::time::timeout(Duration::from_millis(20), s.poll()).await;
        s.push_out([text("42[\"a\"]")]);
        assert_eq!(s.poll().await.unwrap(), "42[\"a\"]");
    }

    #[tokio::test]
    async fn posts_are_split_in_order_and_bounded_by_the_budget() {
        let (s, mut ends) = Shared::new(1 << 20, 1024, 8);
        s.post(Bytes::from_static(b"3\x1ebAQID")).await.unwrap();
        assert!(
            matches!(ends.inbound.recv().await.unwrap().item, Incoming::Text(t) if t.as_str() == "3")
        );
        let bin = ends.inbound.recv().await.unwrap();
        assert!(matches!(&bin.item, Incoming::Binary(b) if b[..] == [1, 2, 3]));
        // 8 bytes of budget: with the binary packet unread, a 6-byte packet
        // waits until it is read.
        let post = {
            let s = s.clone();
            tokio::spawn(async move { s.post(Bytes::from_static(b"4abcde")).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!post.is_finished());
        drop(bin);
        post.await.unwrap().unwrap();
        assert!(
            matches!(ends.inbound.recv().await.unwrap().item, Incoming::Text(t) if t.as_str() == "4abcde")
        );
        assert!(matches!(
            s.post(Bytes::from_static(b"\x1e")).await,
            Err(PollError::BadRequest(_))
        ));
    }

    #[tokio::test]
    async fn output_over_the_bound_waits_for_a_poll() {
        let (s, _ends) = Shared::new(4, 1024, 1 << 20);
        assert!(!s.push_out([text("1234")]));
        assert!(s.push_out([text("5")]));
        let wait = {
            let s = s.clone();
            tokio::spawn(async move { s.wait_drained().await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!wait.is_finished());
        assert_eq!(s.poll().await.unwrap(), "1234\x1e5");
        wait.await.unwrap();
    }

    #[tokio::test]
    async fn output_over_the_frame_bound_waits_for_a_poll() {
        let (s, _ends) = Shared::new(1 << 20, 2, 1 << 20);
        assert!(!s.push_out([text("2"), text("3")]));
        assert!(s.push_out([text("4")]));
        assert_eq!(s.poll().await.unwrap(), "2\x1e3\x1e4");
        tokio::time::timeout(Duration::from_secs(1), s.wait_drained())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn the_close_packet_goes_in_a_payload_of_its_own() {
        let (s, _ends) = Shared::new(1 << 20, 1024, 1 << 20);
        s.push_out([text("42[\"a\"]"), text("41")]);
        s.close();
        assert_eq!(s.poll().await.unwrap(), "42[\"a\"]\x1e41");
        assert_eq!(s.poll().await.unwrap(), "1");
        assert_eq!(s.poll().await, Err(PollError::Unknown));
    }

    #[tokio::test]
    async fn the_probe_releases_the_poll_with_a_noop() {
        let (s, _ends) = Shared::new(1 << 20, 1024, 1 << 20);
        assert!(s.begin_probe());
        assert!(!s.begin_probe());
        let waiter = {
            let s = s.clone();
            tokio::spawn(async move { s.poll().await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        s.release_poll();
        assert_eq!(waiter.await.unwrap().unwrap(), "6");
        s.push_out([text("2")]);
        let left = s.upgrade();
        assert_eq!(left.len(), 1);
        assert!(matches!(s.poll().await, Err(PollError::BadRequest(_))));
    }
}
