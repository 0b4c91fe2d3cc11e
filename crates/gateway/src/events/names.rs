//! Event names the gateway keeps for itself: the client events it handles
//! (a relay table may not relay them) and the events it sends with
//! meanings it owns (the server API may not publish them).

/// Client events the gateway handles itself; a table may not relay them.
pub const RESERVED: &[&str] = &[
    "flow:join",
    "flow:leave",
    "auth:refresh",
    "connect",
    "connect_error",
    "disconnect",
    "disconnecting",
    "newListener",
    "removeListener",
    "error",
];

/// Events the gateway sends itself, with meanings it keeps (presence,
/// locks, the greeting): the server API may not publish them.
pub const GATEWAY_EVENTS: &[&str] = &[
    "connected",
    "user:joined",
    "user:left",
    "flow:users",
    "flow:locks",
    "pod:locked",
    "pod:unlocked",
];
