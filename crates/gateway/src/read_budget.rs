//! The bytes clients have sent that are not yet a whole message: bounded
//! per connection and across the node.
//!
//! A WebSocket frame is buffered until its last byte arrives, so a client
//! that announces a frame of the max payload and sends it slowly (or
//! stops) holds up to that much of the node's memory until the heartbeat
//! ends it. The max payload bounds one connection; nothing else bounds
//! many of them, and unauthenticated connections (up to
//! `FLOWGATE_MAX_UNAUTHENTICATED_PER_IP` per address) cost an attacker
//! nothing. So every connection's socket charges what it reads to a
//! [`Held`], and the transport settles it when a whole message comes out
//! (a polling POST's body likewise, and the session charges the
//! attachments of a binary packet until its last one arrives):
//!
//! - before the session's CONNECT is accepted, one connection may hold at
//!   most `FLOWGATE_MAX_PAYLOAD_BEFORE_CONNECT` (a CONNECT with its token
//!   is a few KiB), after it the max payload plus the largest frame header;
//! - all connections together may hold at most `FLOWGATE_READ_BUDGET_BYTES`.
//!   A read that would go past it ends its connection ("try again later"),
//!   so an attacker holding the budget cannot grow the node further.
//!
//! The count is of bytes read since the last whole message, so it can miss
//! at most the bytes of the next frame that arrived in the same read as
//! the end of a message (one read, at most the codec's read buffer).
//! Written here because the WebSocket codec (tungstenite) neither exposes
//! what it buffers nor takes a shared limit.

use std::sync::Arc;

use prometheus::{IntCounter, IntGauge};

/// What a connection may hold once its CONNECT is accepted: a message of
/// the max payload (the codec refuses larger ones itself), twice over for
/// the headers of a message sent in many fragments (counted as read, not
/// as held by the codec), and a little for control frames around it.
pub fn connected_limit(max_payload: usize) -> usize {
    max_payload.saturating_mul(2).saturating_add(64 * 1024)
}

/// Why a read was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverRead {
    /// The connection holds more than it may (a frame over its limit).
    Connection,
    /// The node's budget is spent.
    Node,
}

impl std::fmt::Display for OverRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OverRead::Connection => "frame over the connection's read limit",
            OverRead::Node => "node read budget spent",
        })
    }
}

impl std::error::Error for OverRead {}

impl OverRead {
    /// The refusal carried by an I/O error from a socket that charges a
    /// [`Held`], if that is what the error is.
    pub fn of(e: &std::io::Error) -> Option<OverRead> {
        e.get_ref()?.downcast_ref::<OverRead>().copied()
    }
}

/// The node's budget of held client bytes.
#[derive(Debug)]
pub struct ReadBudget {
    max: i64,
    /// Bytes held now, exported as `flowgate_read_held_bytes`.
    held: IntGauge,
    /// Connections ended because the budget was spent.
    refused: IntCounter,
}

impl ReadBudget {
    /// A budget of `max` bytes, counted in `held`, refusals in `refused`.
    pub fn new(max: usize, held: IntGauge, refused: IntCounter) -> Arc<Self> {
        Arc::new(ReadBudget {
            max: i64::try_from(max).unwrap_or(i64::MAX),
            held,
            refused,
        })
    }

    /// A connection's account, holding nothing, allowed `limit` bytes.
    pub fn account(self: &Arc<Self>, limit: usize) -> Held {
        Held {
            budget: self.clone(),
            bytes: 0,
            limit,
        }
    }

    /// Bytes held now, across the node.
    pub fn held(&self) -> i64 {
        self.held.get()
    }
}

/// One connection's held bytes; gives them back when dropped.
#[derive(Debug)]
pub struct Held {
    budget: Arc<ReadBudget>,
    bytes: usize,
    limit: usize,
}

impl Held {
    /// Charges `n` bytes just read. Over the connection's limit or the
    /// node's budget, the bytes are charged anyway (they are in memory
    /// until the connection ends, which the caller now makes it do).
    pub fn charge(&mut self, n: usize) -> Result<(), OverRead> {
        if n == 0 {
            return Ok(());
        }
        self.bytes += n;
        self.budget.held.add(n as i64);
        if self.bytes > self.limit {
            return Err(OverRead::Connection);
        }
        if self.budget.held.get() > self.budget.max {
            self.budget.refused.inc();
            return Err(OverRead::Node);
        }
        Ok(())
    }

    /// A whole message came out: what was read for it is no longer held
    /// by the codec (the message itself is the session's to bound).
    pub fn settle(&mut self) {
        if self.bytes > 0 {
            self.budget.held.sub(self.bytes as i64);
            self.bytes = 0;
        }
    }

    /// A control frame of `n` wire bytes came out: those bytes are no
    /// longer held (an unfinished message around it still is).
    pub fn release(&mut self, n: usize) {
        let n = n.min(self.bytes);
        self.budget.held.sub(n as i64);
        self.bytes -= n;
    }

    /// Sets what this connection may hold from now on.
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
    }

    /// What this connection may hold.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes this connection holds now.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// A budget of `max` bytes with metrics of its own, for unit tests.
#[cfg(test)]
pub(crate) fn budget(max: usize) -> Arc<ReadBudget> {
    ReadBudget::new(
        max,
        IntGauge::new("held", "held").expect("valid metric"),
        IntCounter::new("refused", "refused").expect("valid metric"),
    )
}

impl Drop for Held {
    fn drop(&mut self) {
        self.settle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_held_to_its_limit_and_settles_to_zero() {
        let b = budget(1000);
        let mut a = b.account(10);
        assert_eq!(a.charge(10), Ok(()));
        assert_eq!(a.charge(1), Err(OverRead::Connection));
        assert_eq!(b.held(), 11);
        a.settle();
        assert_eq!((a.bytes(), b.held()), (0, 0));
        a.set_limit(100);
        assert_eq!(a.charge(50), Ok(()));
        drop(a);
        assert_eq!(b.held(), 0, "a dropped account gives its bytes back");
    }

    #[test]
    fn the_node_budget_refuses_whoever_goes_past_it_and_counts_it() {
        let b = budget(100);
        let mut x = b.account(1000);
        let mut y = b.account(1000);
        assert_eq!(x.charge(60), Ok(()));
        assert_eq!(y.charge(40), Ok(()));
        assert_eq!(y.charge(1), Err(OverRead::Node));
        assert_eq!(b.refused.get(), 1);
        // Once x's frame is whole, there is room again.
        x.settle();
        assert_eq!(y.charge(50), Ok(()));
        drop(y);
        assert_eq!(b.held(), 0);
    }

    #[test]
    fn the_refusal_survives_an_io_error() {
        let e = std::io::Error::other(OverRead::Node);
        assert_eq!(OverRead::of(&e), Some(OverRead::Node));
        assert_eq!(OverRead::of(&std::io::Error::other("x")), None);
    }
}
