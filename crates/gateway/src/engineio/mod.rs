//! The Engine.IO layer: a connection's transport, its open packet,
//! heartbeat and packet framing, and the one task that drives it.
//!
//! Above it sits the Socket.IO session ([`crate::session`]), which never
//! knows which transport carries it: the connection task hands it each
//! Engine.IO `message` and writes what it answers. A transport is anything
//! that implements [`Transport`] (WebSocket now; HTTP long-polling plugs in
//! beside it).

mod conn;
mod end;
mod heartbeat;
mod transport;
pub mod ws;

pub use conn::serve;
pub use end::End;
pub use transport::{Incoming, Transport};
