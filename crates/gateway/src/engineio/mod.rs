//! The Engine.IO layer: a connection's transport, its open packet,
//! heartbeat and packet framing, and the one task that drives it.
//!
//! Above it sits the Socket.IO session ([`crate::session`]), which never
//! knows which transport carries it: the connection task hands it each
//! Engine.IO `message` and writes what it answers. A transport is anything
//! that implements [`Transport`] ([`ws`] and [`polling`], which upgrades to a
//! WebSocket mid-session); [`registry`] knows which node owns a session.

mod conn;
mod end;
mod heartbeat;
pub mod polling;
pub mod registry;
mod transport;
mod write;
pub mod ws;
mod ws_io;
mod ws_out;

pub use conn::serve;
pub use end::End;
pub(crate) use registry::Owner;
pub use registry::Sessions;
pub use transport::{Incoming, Transport};
