//! Why a connection ended, and the close it gets.

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The client closed the transport or sent an Engine.IO close.
    ClientClosed,
    /// A malformed frame; the reason is logged and counted.
    Protocol(&'static str, String),
    /// A frame over the max payload (before CONNECT: over the smaller
    /// limit a socket has until then).
    Oversize,
    /// The node's budget for unfinished frames is spent
    /// (`read_budget.rs`): this connection's read went past it.
    ReadBudget,
    /// No pong within the ping timeout.
    PingTimeout,
    /// No CONNECT within the connect timeout.
    ConnectTimeout,
    /// The client does not read its frames.
    SlowConsumer,
    /// Room messages were lost before reaching this node and could not be
    /// refilled.
    Resync,
    /// The node is draining.
    Drain,
    /// The token expired without a refresh.
    TokenExpired,
    /// Another connection recovered this one's session (`Kick::Replaced`).
    Replaced,
    /// The transport broke while writing.
    WriteFailed,
}

impl From<crate::outbound::Kick> for End {
    fn from(kick: crate::outbound::Kick) -> Self {
        match kick {
            crate::outbound::Kick::SlowConsumer => End::SlowConsumer,
            crate::outbound::Kick::Resync => End::Resync,
            crate::outbound::Kick::Replaced => End::Replaced,
        }
    }
}

/// The reason of a text frame that is not UTF-8: closed with 1007
/// (RFC 6455 §7.4.1), not the 1002 of other protocol errors.
pub(super) const INVALID_UTF8: &str = "invalid utf-8";

impl End {
    /// The WebSocket close code and reason, or `None` when the transport is
    /// already gone.
    pub fn close_frame(&self) -> Option<(u16, &'static str)> {
        Some(match self {
            End::ClientClosed | End::WriteFailed => return None,
            End::Protocol(reason, _) if *reason == INVALID_UTF8 => (1007, "invalid utf-8"),
            End::Protocol(..) => (1002, "protocol error"),
            End::Oversize => (1009, "frame too large"),
            // 1013 "try again later": the node, not the client, is short.
            End::ReadBudget => (1013, "try again later"),
            End::PingTimeout => (1000, "ping timeout"),
            End::ConnectTimeout => (1008, "no connect"),
            End::SlowConsumer => (1008, "slow consumer"),
            // 1012 "service restart": clients reconnect and recover.
            End::Resync => (1012, "resync"),
            End::Drain => (1001, "server shutting down"),
            End::TokenExpired => (1000, "token expired"),
            End::Replaced => (1000, "session taken over"),
        })
    }

    /// Whether the client may recover the session after this end (the
    /// connection was lost, not ended on purpose by the client or for
    /// misbehaving).
    pub fn recoverable(&self) -> bool {
        !matches!(
            self,
            End::Protocol(..)
                | End::Oversize
                | End::TokenExpired
                | End::ConnectTimeout
                | End::Replaced
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_for_what_a_client_sent_close_with_their_code_and_end_the_session() {
        for (end, code) in [
            (End::Protocol("bad websocket frame", String::new()), 1002),
            (End::Protocol(INVALID_UTF8, String::new()), 1007),
            (End::Oversize, 1009),
        ] {
            assert_eq!(end.close_frame().map(|(c, _)| c), Some(code), "{end:?}");
            assert!(!end.recoverable(), "{end:?}");
        }
        // The node ran short, not the client: it may come back and recover.
        assert_eq!(End::ReadBudget.close_frame().map(|(c, _)| c), Some(1013));
        assert!(End::ReadBudget.recoverable());
    }
}
