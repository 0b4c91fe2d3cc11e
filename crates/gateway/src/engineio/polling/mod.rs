//! The HTTP long-polling transport, and its upgrade to WebSocket.
//!
//! A polling session is driven by the same connection task as a WebSocket
//! ([`crate::engineio::serve`]): [`PollingTransport`] is its [`Transport`].
//! The HTTP requests never touch the session; they meet the task in
//! [`Shared`]: a POST hands packets to the task's `recv` through a channel
//! bounded in bytes, a GET takes what the task's `flush` left there.
//!
//! The upgrade: a WebSocket request with the session's `sid` runs the probe
//! ([`probe`]: `2probe` → `3probe`, then the waiting GET gets a noop) while
//! polling goes on; when the client sends `5` on it, the probe hands the
//! socket to the task through the control channel. The transport then reads
//! whatever was posted before (the client sends `5` only once its POSTs
//! are answered), writes on the WebSocket first what no GET took, and from
//! then on is a WebSocket: nothing is lost or reordered across the switch.

mod probe;
mod shared;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use prometheus::IntCounter;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::ws::WsTransport;
use super::{End, Incoming, Transport};
pub(crate) use probe::probe;
use shared::{Control, Frame, TaskEnds};
pub(crate) use shared::{PollError, Shared};

/// How long a closing session waits for a GET to take its close packet.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// The polling sessions of this node by sid.
pub(crate) type SessionMap = Arc<DashMap<String, Arc<Shared>>>;

/// A polling session as the connection task sees it.
#[derive(Debug)]
pub struct PollingTransport {
    sid: String,
    shared: Arc<Shared>,
    ends: TaskEnds,
    /// Where the session is registered; it leaves the map when the
    /// transport is dropped.
    sessions: SessionMap,
    /// Fed frames not flushed yet.
    pending: Vec<Frame>,
    /// Packets posted before the upgrade, read before the WebSocket's.
    posted: VecDeque<Incoming>,
    /// Set once upgraded.
    ws: Option<WsTransport>,
    /// Output no GET took before the upgrade: written on the WebSocket
    /// before anything newer.
    carry: VecDeque<Frame>,
    /// `flowgate_upgrades_total`.
    upgrades: IntCounter,
    /// What a connected client may hold of unfinished frames, once the
    /// session's CONNECT is accepted (0 before): given to the WebSocket
    /// the session upgrades to.
    read_limit: usize,
}

impl PollingTransport {
    /// A new session `sid`, registered in `sessions`. Output is bounded
    /// by `max_out_bytes` and `max_out_frames`, unread input by
    /// `max_in_bytes`.
    pub(crate) fn open(
        sid: String,
        sessions: SessionMap,
        (max_out_bytes, max_out_frames): (usize, usize),
        max_in_bytes: usize,
        upgrades: IntCounter,
    ) -> (Self, Arc<Shared>) {
        let (shared, ends) = Shared::new(max_out_bytes, max_out_frames, max_in_bytes);
        sessions.insert(sid.clone(), shared.clone());
        let t = PollingTransport {
            sid,
            shared: shared.clone(),
            ends,
            sessions,
            pending: Vec::new(),
            posted: VecDeque::new(),
            ws: None,
            carry: VecDeque::new(),
            upgrades,
            read_limit: 0,
        };
        (t, shared)
    }

    /// The probe completed: switch to the WebSocket.
    fn switch(&mut self, mut ws: WsTransport) {
        while let Ok(i) = self.ends.inbound.try_recv() {
            self.posted.push_back(i.item);
        }
        self.carry.extend(self.shared.upgrade());
        self.carry.extend(self.pending.drain(..));
        if self.read_limit > 0 {
            ws.connected(self.read_limit);
        }
        self.ws = Some(ws);
        self.upgrades.inc();
    }

    /// Writes the carried output on the WebSocket. A frame leaves `carry`
    /// only once fed, so a cancelled call loses nothing.
    async fn write_carry(&mut self) -> Result<(), End> {
        let Some(ws) = &mut self.ws else {
            return Ok(());
        };
        if self.carry.is_empty() {
            return Ok(());
        }
        while let Some(f) = self.carry.front() {
            match f.clone() {
                Frame::Text(t) => ws.feed_text(t).await?,
                Frame::Binary(b) => ws.feed_binary(b).await?,
            }
            self.carry.pop_front();
        }
        ws.flush().await
    }
}

impl Drop for PollingTransport {
    fn drop(&mut self) {
        self.shared.close();
        self.sessions
            .remove_if(&self.sid, |_, s| Arc::ptr_eq(s, &self.shared));
    }
}

impl Transport for PollingTransport {
    async fn recv(&mut self) -> Option<Result<Incoming, End>> {
        loop {
            if let Some(i) = self.posted.pop_front() {
                return Some(Ok(i));
            }
            if self.ws.is_some() {
                if let Err(e) = self.write_carry().await {
                    return Some(Err(e));
                }
                return self.ws.as_mut()?.recv().await;
            }
            tokio::select! {
                biased;
                c = self.ends.control.recv() => match c {
                    Some(Control::Close(end)) => return Some(Err(end)),
                    Some(Control::Upgraded(ws)) => self.switch(*ws),
                    None => return None,
                },
                i = self.ends.inbound.recv() => return i.map(|i| Ok(i.item)),
            }
        }
    }

    async fn feed_text(&mut self, text: Utf8Bytes) -> Result<(), End> {
        if self.ws.is_some() {
            self.write_carry().await?;
            if let Some(ws) = &mut self.ws {
                return ws.feed_text(text).await;
            }
        }
        self.pending.push(Frame::Text(text));
        Ok(())
    }

    async fn feed_binary(&mut self, data: Bytes) -> Result<(), End> {
        if self.ws.is_some() {
            self.write_carry().await?;
            if let Some(ws) = &mut self.ws {
                return ws.feed_binary(data).await;
            }
        }
        self.pending.push(Frame::Binary(data));
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), End> {
        if self.ws.is_some() {
            self.write_carry().await?;
            if let Some(ws) = &mut self.ws {
                return ws.flush().await;
            }
        }
        if self.pending.is_empty() {
            return Ok(());
        }
        if self.shared.push_out(self.pending.drain(..)) {
            // Over the byte bound: wait for a GET, as a WebSocket write
            // waits for the client to read (the caller bounds the wait).
            self.shared.wait_drained().await;
        }
        Ok(())
    }

    async fn close(&mut self, code: Option<(u16, &'static str)>) {
        if self.ws.is_some() {
            let _ = tokio::time::timeout(Duration::from_secs(1), self.write_carry()).await;
            if let Some(ws) = &mut self.ws {
                ws.close(code).await;
            }
            return;
        }
        self.shared.push_out(self.pending.drain(..));
        self.shared.close();
        // No code: the client closed (or is gone), no GET will come.
        if code.is_some() {
            // Give the client's next GET the close packet, so it reconnects
            // at once instead of on an error.
            let _ = tokio::time::timeout(CLOSE_LINGER, self.shared.wait_empty()).await;
        }
    }

    fn connected(&mut self, read_limit: usize) {
        if self.read_limit == 0 {
            self.shared.set_connected();
        }
        self.read_limit = read_limit;
        if let Some(ws) = &mut self.ws {
            ws.connected(read_limit);
        }
    }

    fn name(&self) -> &'static str {
        if self.ws.is_some() {
            "websocket"
        } else {
            "polling"
        }
    }

    fn upgrades(&self) -> &'static [&'static str] {
        &["websocket"]
    }
}
