//! flowgate's gateway node: Socket.IO flow rooms over WebSocket and HTTP
//! long-polling, with health, metrics and graceful drain.
//!
//! The binary (`main.rs`) only parses configuration, starts tracing and
//! calls [`serve`]; tests call [`serve`] on a listener bound to port 0.

pub mod access;
pub mod app;
pub mod auth;
pub mod config;
pub mod demo;
pub mod drain;
pub mod engineio;
pub mod eventlog;
pub mod events;
pub mod http;
pub mod ids;
pub mod listener;
pub mod lock_keeper;
pub mod log_sample;
pub mod metrics;
pub mod outbound;
pub mod read_budget;
pub mod recovery_keeper;
pub mod rooms;
pub mod session;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use app::App;
pub use config::Config;
/// The engine seam, re-exported so tests and the gateway share one path.
pub use flowgate_engine as engine;

/// The URL other nodes forward this node's polling requests to:
/// `FLOWGATE_ADVERTISE_URL`, else the bound address (loopback when bound to
/// every interface, which suits one machine; set the variable otherwise).
fn advertise_url(config: &Config, bound: std::net::SocketAddr) -> String {
    if let Some(url) = &config.advertise_url {
        return url.clone();
    }
    let ip = if bound.ip().is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        bound.ip()
    };
    format!("http://{}", std::net::SocketAddr::new(ip, bound.port()))
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains:
/// `/health` turns 503 and upgrades are refused, the load balancer is given
/// `drain_notice` to notice, sockets are closed spread over `drain_window`,
/// and the function returns by `shutdown_deadline` after the signal.
pub async fn serve(
    app: Arc<App>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    info!(addr = %addr, node = %app.config.node_id, engine = app.engine.kind, "listening");
    if let Some(directory) = &app.eio_sessions.directory {
        if app.config.advertise_url.is_none() && addr.ip().is_unspecified() {
            warn!(
                "FLOWGATE_ADVERTISE_URL is unset: other nodes will forward polling requests of this node's sessions to 127.0.0.1, which only works when every node runs on this machine"
            );
        }
        directory.advertise(advertise_url(&app.config, addr));
    }
    let stop_accepting = CancellationToken::new();
    let limits = listener::Limits {
        max_connections: app.config.max_http_connections,
        header_timeout: app.config.http_header_timeout,
    };
    if let Some(port) = app.config.admin_port {
        let admin = TcpListener::bind((app.config.listen.ip(), port)).await?;
        info!(addr = %admin.local_addr()?, "admin listening");
        // Its own cap: /health answers even when the client port is full.
        let admin_limits = listener::Limits {
            max_connections: 256,
            ..limits.clone()
        };
        tokio::spawn(listener::run(
            admin,
            http::admin_router(app.clone()),
            admin_limits,
            app.metrics.clone(),
            stop_accepting.clone(),
        ));
    }
    let server = listener::run(
        listener,
        http::router(app.clone()),
        limits,
        app.metrics.clone(),
        stop_accepting.clone(),
    );
    let mut server = tokio::spawn(server);

    tokio::select! {
        _ = shutdown => {}
        r = &mut server => {
            r??;
            return Ok(());
        }
    }
    let cfg = &app.config;
    let deadline = Instant::now() + cfg.shutdown_deadline;
    info!(
        notice_ms = cfg.drain_notice.as_millis() as u64,
        window_ms = cfg.drain_window.as_millis() as u64,
        "draining"
    );
    app.drain.begin();
    app.metrics.draining.set(1);
    app.metrics.drains.inc();
    tokio::time::sleep(cfg.drain_notice).await;
    app.drain.close_sockets();
    // The listener keeps accepting until every session is closed: a
    // polling session of this node is carried by requests that may come on
    // new connections (from the load balancer, or forwarded by another
    // node), and each is closed at its own moment in the window with its
    // close packet. Refusing connections now broke all of them at once with
    // an error and dropped what their POSTs in flight carried. New sessions
    // are refused all the same (`/health` 503, handshakes and upgrades
    // refused while draining).
    let tracker = app.drain.tracker();
    tracker.close();
    let left = deadline.saturating_duration_since(Instant::now());
    if tokio::time::timeout(left, tracker.wait()).await.is_err() {
        warn!(
            open = tracker.len(),
            "shutdown deadline reached with connections still open"
        );
    }
    stop_accepting.cancel();
    let left = deadline.saturating_duration_since(Instant::now());
    match tokio::time::timeout(left, &mut server).await {
        Ok(r) => r??,
        Err(_) => server.abort(),
    }
    let (tasks, stop) = &app.background;
    stop.cancel();
    tasks.close();
    let left = deadline.saturating_duration_since(Instant::now());
    let _ = tokio::time::timeout(left.max(Duration::from_millis(200)), tasks.wait()).await;
    info!("stopped");
    Ok(())
}
