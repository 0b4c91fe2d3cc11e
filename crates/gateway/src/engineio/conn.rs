//! The one task of a connection: it reads the transport, writes the
//! connection's queue, runs the heartbeat and the timers of the session,
//! and ends the connection cleanly, whatever ends it.
//!
//! One task, not a reader and a writer: the transport is both the inbound
//! stream and the outbound sink, and everything that must happen on a
//! connection (a frame in, a frame to write, a timer, a kick, a drain) is
//! one branch of a `select!`. Writes (`write.rs`) are bounded by the
//! slow-consumer grace, so a client that stops reading cannot hold the
//! task forever.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flowgate_protocol::{EnginePacket, OpenPacket};
use futures_util::future::Either;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tracing::{debug, warn, Instrument};

use super::heartbeat::{Beat, Heartbeat};
use super::write::{feed, write_local, write_queued};
use super::{End, Incoming, Transport};
use crate::app::App;
use crate::outbound::{Kick, OutFrame, Outbound, OutboundRx};
use crate::session::{Handshake, Session};

/// The future that serves one connection on `transport` until it ends;
/// `keep` (the connection's slot under the cap) is dropped with it.
///
/// A plain function that does the setup and returns the loop as an
/// `async` block: an `async fn` keeps its arguments in its future for its
/// whole life, beside the locals they are moved into, so the handshake,
/// the sid and a transport passed by value would be resident in every
/// connection's future once per `async fn` they went through (measured:
/// 4.4 KiB in all when the transport went through two). The block
/// captures only what the loop uses.
pub fn serve<T: Transport>(
    mut transport: Box<T>,
    app: Arc<App>,
    hs: Handshake,
    sid: String,
    keep: impl Send + 'static,
) -> impl Future<Output = ()> {
    let span = tracing::debug_span!("conn", sid = %sid, peer = %hs.peer);
    let cfg = app.config.clone();
    app.metrics.connections.inc();
    app.metrics
        .connections_opened
        .with_label_values(&[transport.name()])
        .inc();
    let gauge = GaugeGuard(app.metrics.connections.clone());
    let (out, rx) = Outbound::with_limits(app.queue_limits.clone());
    let open = OpenPacket {
        sid,
        upgrades: transport.upgrades().iter().map(|u| u.to_string()).collect(),
        ping_interval: cfg.ping_interval.as_millis() as u64,
        ping_timeout: cfg.ping_timeout.as_millis() as u64,
        max_payload: cfg.max_payload as u64,
    };
    let mut session = Session::new(app.clone(), hs, out.clone());
    if !session.admit_peer() {
        app.metrics
            .connections_refused
            .with_label_values(&["unauthenticated per address"])
            .inc();
        let refuse = async move {
            let _keep = (keep, gauge);
            transport
                .close(Some((1008, "too many unauthenticated connections")))
                .await;
        };
        return Either::Left(refuse.instrument(span));
    }
    session.push_local(OutFrame::Text(Utf8Bytes::from(open.encode())));
    // `run` uses its arguments in place, moving none into a local.
    Either::Right(run(transport, app, session, out, rx, (keep, gauge)).instrument(span))
}

/// Decrements the connection gauge however the task ends.
struct GaugeGuard(prometheus::IntGauge);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

// Not an `async fn` on purpose (see the block below).
#[allow(clippy::manual_async_fn)]
fn run<T: Transport>(
    mut transport: Box<T>,
    app: Arc<App>,
    mut session: Session,
    out: Outbound,
    mut rx: OutboundRx,
    keep: impl Send,
) -> impl Future<Output = ()> {
    // A block, not an `async fn`: an `async fn` keeps each argument twice
    // in its future (the argument and the binding it is moved into);
    // the block uses what it captured in place.
    async move {
        // Held, not moved into a local of its own (that would be a copy
        // in the future beside the captured one).
        let _ = &keep;
        let cfg = app.config.clone();
        let mut heartbeat = Heartbeat::new(cfg.ping_interval, cfg.ping_timeout);
        let mut drain_at: Option<Instant> = None;
        // Whether the transport was given the connected read limit (once,
        // when the session's CONNECT is first accepted).
        let mut limited = false;
        let closing = app.drain.closing();
        tokio::pin!(closing);
        let timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(timer);

        // The writes below are boxed: their state (the transport's write and
        // flush, the slow-consumer bound) lives only while a batch is written,
        // not in every idle connection's resident future — one allocation per
        // batch written, against ~0.5 KiB less in every connection.
        let end = loop {
            if session.has_local() {
                let grace = cfg.slow_consumer_grace;
                if let Err(end) = Box::pin(write_local(&mut *transport, &mut session, grace)).await
                {
                    break end;
                }
            }
            {
                let mut next = heartbeat.deadline();
                for d in [session.deadline(), drain_at].into_iter().flatten() {
                    next = next.min(d);
                }
                // Re-register the timer only when its deadline moved.
                let next = tokio::time::Instant::from_std(next);
                if timer.deadline() != next || timer.is_elapsed() {
                    timer.as_mut().reset(next);
                }
            }
            // The select only says what woke the connection; what follows
            // is handled after it, each branch behind a box of its own, so
            // that the wait (where an idle connection spends its life) holds
            // nothing but the five small futures it polls.
            let wake = tokio::select! {
                biased;
                kick = out.kicked() => Wake::Kick(kick),
                delay = &mut closing, if drain_at.is_none() => Wake::Closing(delay),
                Some(frame) = rx.recv() => Wake::Frame(frame),
                inbound = transport.recv() => Wake::Inbound(inbound),
                _ = &mut timer => Wake::Timer,
            };
            let grace = cfg.slow_consumer_grace;
            let step = match wake {
                Wake::Kick(kick) => Err(kick.into()),
                Wake::Closing(delay) => {
                    drain_at = Some(Instant::now() + delay);
                    Ok(())
                }
                Wake::Frame(frame) => {
                    let t = &mut *transport;
                    Box::pin(write_queued(t, &mut session, &mut rx, frame, grace)).await
                }
                Wake::Inbound(inbound) => {
                    let t = &mut *transport;
                    let r = Box::pin(on_inbound(t, &mut session, &mut heartbeat, inbound)).await;
                    if !limited && session.is_connected() {
                        limited = true;
                        t.connected(crate::read_budget::connected_limit(cfg.max_payload));
                    }
                    r
                }
                Wake::Timer => {
                    let now = Instant::now();
                    if drain_at.is_some_and(|t| t <= now) {
                        break End::Drain;
                    }
                    match heartbeat.on_timer(now) {
                        Beat::TimedOut => break End::PingTimeout,
                        Beat::Ping => {
                            session.push_local(OutFrame::Text(Utf8Bytes::from_static("2")))
                        }
                        Beat::Idle => {}
                    }
                    // Lock renewals and expiry checks go through the engine.
                    Box::pin(session.on_timer(now)).await
                }
            };
            if let Err(end) = step {
                break end;
            }
        };

        // A write the client never took is a slow consumer as much as a
        // queue overflow: counted the same way (a kick counts once, so an
        // overflow that ended the loop is not counted twice).
        if end == End::SlowConsumer {
            out.kick(Kick::SlowConsumer);
        }
        report(&app, &end);
        // Boxed: closing runs once, through the engine (presence, locks) and
        // the last writes; its state would otherwise take room in every
        // connection's future for the connection's whole life.
        Box::pin(finish(transport, session, rx, out, end)).await;
    }
}

/// Ends the session, writes what it still has to say (unless the client is
/// gone or too slow), then the close frame.
async fn finish<T: Transport>(
    mut transport: Box<T>,
    mut session: Session,
    mut rx: OutboundRx,
    out: Outbound,
    end: End,
) {
    session.close(&end).await;
    // A slow consumer's queue is discarded; otherwise what is still queued
    // (an `error` event, a DISCONNECT) is written before the close.
    if !matches!(
        end,
        End::SlowConsumer | End::WriteFailed | End::ClientClosed
    ) {
        let grace = Duration::from_secs(1);
        let _ = tokio::time::timeout(grace, async {
            write_local(&mut *transport, &mut session, grace).await?;
            while let Some(f) = rx.try_recv() {
                feed(&mut *transport, &mut session, f, grace).await?;
            }
            transport.flush().await
        })
        .await;
    }
    drop(out);
    let _ = tokio::time::timeout(Duration::from_secs(5), transport.close(end.close_frame())).await;
}

/// What woke a connection's task.
enum Wake {
    Kick(Kick),
    Closing(Duration),
    Frame(OutFrame),
    Inbound(Option<Result<Incoming, End>>),
    Timer,
}

/// One frame from the client (or the end of its stream).
async fn on_inbound<T: Transport>(
    transport: &mut T,
    session: &mut Session,
    heartbeat: &mut Heartbeat,
    inbound: Option<Result<Incoming, End>>,
) -> Result<(), End> {
    match inbound {
        None => return Err(End::ClientClosed),
        Some(Err(end)) => return Err(end),
        Some(Ok(Incoming::Text(t))) => on_text(session, heartbeat, t.as_str()).await?,
        Some(Ok(Incoming::Binary(b))) => session.on_binary(b).await?,
    }
    // A frame that asked for no answer (a pong, most often): nothing will
    // flush, so the transport is told it may give back its read state now.
    if !session.has_local() {
        transport.rest();
    }
    Ok(())
}

fn report(app: &App, end: &End) {
    match end {
        End::Protocol(reason, detail) => {
            app.metrics
                .protocol_errors
                .with_label_values(&[reason])
                .inc();
            if crate::log_sample::allow(reason) {
                let detail: String = detail.chars().take(64).collect();
                warn!(reason, detail = ?detail, "closing connection: malformed input");
            }
        }
        End::Oversize => {
            app.metrics
                .protocol_errors
                .with_label_values(&["oversize frame"])
                .inc();
            if crate::log_sample::allow("oversize frame") {
                warn!(
                    max_payload = app.config.max_payload,
                    "closing connection: frame over max payload"
                );
            }
        }
        End::ReadBudget => {
            if crate::log_sample::allow("read budget") {
                warn!(
                    read_budget = app.config.read_budget,
                    "closing connection: the node's read budget is spent"
                );
            }
        }
        End::SlowConsumer => {
            if crate::log_sample::allow("slow consumer") {
                warn!("closing connection: slow consumer");
            }
        }
        other => debug!(reason = ?other, "connection ends"),
    }
}

/// One Engine.IO text packet from the client.
async fn on_text(session: &mut Session, heartbeat: &mut Heartbeat, frame: &str) -> Result<(), End> {
    let packet = EnginePacket::decode(frame)
        .map_err(|e| End::Protocol("bad engine.io packet", e.to_string()))?;
    match packet {
        EnginePacket::Pong(_) => {
            heartbeat.on_pong();
            Ok(())
        }
        EnginePacket::Ping(p) => {
            // Only the upgrade probe is echoed: a client cannot make the
            // server queue what it sends.
            let pong = if p == "probe" { "3probe" } else { "3" };
            session.push_local(OutFrame::Text(Utf8Bytes::from_static(pong)));
            Ok(())
        }
        EnginePacket::Close => Err(End::ClientClosed),
        EnginePacket::Noop => Ok(()),
        EnginePacket::Open(_) | EnginePacket::Upgrade => Err(End::Protocol(
            "unexpected engine.io packet",
            frame.chars().take(1).collect(),
        )),
        // (The caller boxes this future: joins, recovery and the engine's
        // round trips live only while a packet is handled.)
        EnginePacket::Message(m) => session.on_message(m).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// A transport that never yields, only to size the connection future.
    struct Idle;

    impl Transport for Idle {
        async fn recv(&mut self) -> Option<Result<Incoming, End>> {
            std::future::pending().await
        }
        async fn feed_text(&mut self, _: Utf8Bytes) -> Result<(), End> {
            Ok(())
        }
        async fn feed_binary(&mut self, _: bytes::Bytes) -> Result<(), End> {
            Ok(())
        }
        async fn flush(&mut self) -> Result<(), End> {
            Ok(())
        }
        async fn close(&mut self, _: Option<(u16, &'static str)>) {}
        fn name(&self) -> &'static str {
            "idle"
        }
    }

    /// The one future a connection keeps resident: cold paths (join,
    /// recovery, refresh) are behind `.await`s of their own, but their
    /// state machines are inlined; this bounds the total so a change that
    /// balloons it is noticed. (Run with `--nocapture` to see the figure.)
    #[tokio::test]
    async fn the_resident_connection_future_stays_small() {
        let vars = [("JWT_ACCESS_TOKEN_SECRET", "s")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let app = App::new(Config::from_vars(&vars).unwrap(), None)
            .await
            .unwrap();
        let fut = serve(Box::new(Idle), app, Handshake::default(), "sid".into(), ());
        let size = std::mem::size_of_val(&fut);
        println!("resident connection future: {size} bytes");
        // 4.4 KiB with the WebSocket transport in a release build before
        // the transport was boxed (it was resident three times), 2.8 KiB
        // after; this debug build's figure with the idle transport: 2.4
        // KiB, then 1,072 bytes once the writes were boxed, `serve` stopped
        // keeping its arguments twice and the select only said what woke
        // the connection (docs/benchmarks.md, eighth session: the release
        // WebSocket task cell is then 1,280 bytes, a jemalloc size class
        // boundary — a few bytes more cost 256 per connection).
        assert!(size < 1200, "{size} bytes");
    }
}
