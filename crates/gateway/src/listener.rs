//! The HTTP server's accept loop, written out instead of `axum::serve` for
//! what a public listener needs and `axum::serve` does not offer: a cap on
//! open TCP connections (not only WebSockets), a deadline for the request
//! headers (so connections that never finish a request, or idle between
//! requests, do not pin memory and slots), and TCP_NODELAY.
//!
//! Every connection is served by hyper's HTTP/1 server with upgrades (the
//! WebSocket transport), the router getting the peer address as axum's
//! `ConnectInfo`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::metrics::Metrics;

/// Limits of one listener.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Open TCP connections at most; beyond, new ones are closed at once.
    pub max_connections: usize,
    /// Time to receive a request's headers, from the connection's start or
    /// the end of the previous response.
    pub header_timeout: Duration,
}

/// Serves `router` on `listener` until `stop`; returns once the loop
/// stopped accepting and every plain HTTP connection ended (upgraded
/// WebSockets live on, tracked by the drain).
pub async fn run(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    metrics: Metrics,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let conns = TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off, go on.
                    debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics
                .connections_refused
                .with_label_values(&["http cap"])
                .inc();
            drop(tcp);
            continue;
        };
        // Small frames must leave at once: Nagle's algorithm would hold a
        // pod:moved behind the previous one's ACK (tens of ms at p99).
        let _ = tcp.set_nodelay(true);
        let svc = tower::ServiceExt::map_request(
            router.clone(),
            move |mut req: axum::http::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                req
            },
        );
        let stop = stop.clone();
        let header_timeout = limits.header_timeout;
        conns.spawn(async move {
            let _slot = slot;
            serve_one(tcp, peer, svc, header_timeout, stop).await;
        });
    }
    conns.close();
    conns.wait().await;
    Ok(())
}

async fn serve_one<S>(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    svc: S,
    header_timeout: Duration,
    stop: CancellationToken,
) where
    S: tower::Service<
            axum::http::Request<hyper::body::Incoming>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(64 * 1024);
    let conn = builder
        .serve_connection(TokioIo::new(tcp), TowerToHyperService::new(svc))
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                debug!(peer = %peer, error = %e, "http connection ended");
            }
        }
        _ = stop.cancelled() => {
            // Finish the request in flight, then close.
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        }
    }
}
