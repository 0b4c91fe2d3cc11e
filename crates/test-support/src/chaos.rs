//! A TCP proxy the test controls, between a node and a dependency (Redis):
//! it can cut every connection (and refuse new ones for a while) or stall
//! the link (bytes wait, nothing is lost), so a test can break a node's
//! link and assert what clients see, then restore it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The proxy's state, as the test sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Forward.
    Open,
    /// Hold every byte (in both directions) until open again.
    Stalled,
    /// Drop every connection; refuse new ones.
    Cut,
}

/// A proxy listening on 127.0.0.1 in front of `target`.
#[derive(Debug)]
pub struct ChaosProxy {
    /// Where the node connects.
    pub addr: SocketAddr,
    mode: Arc<watch::Sender<Mode>>,
    task: tokio::task::JoinHandle<()>,
}

impl ChaosProxy {
    /// Starts forwarding to `target`.
    pub async fn start(target: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, _) = watch::channel(Mode::Open);
        let mode = Arc::new(tx);
        let m = mode.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if *m.borrow() == Mode::Cut {
                    drop(client);
                    continue;
                }
                let rx = m.subscribe();
                tokio::spawn(async move {
                    if let Ok(upstream) = TcpStream::connect(target).await {
                        pipe(client, upstream, rx).await;
                    }
                });
            }
        });
        Ok(ChaosProxy { addr, mode, task })
    }

    /// `redis://` URL of the proxy.
    pub fn redis_url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Drops every connection and refuses new ones until [`ChaosProxy::open`].
    pub fn cut(&self) {
        self.mode.send_replace(Mode::Cut);
    }

    /// Holds every byte until [`ChaosProxy::open`].
    pub fn stall(&self) {
        self.mode.send_replace(Mode::Stalled);
    }

    /// Forwards again.
    pub fn open(&self) {
        self.mode.send_replace(Mode::Open);
    }
}

impl Drop for ChaosProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pipe(client: TcpStream, upstream: TcpStream, rx: watch::Receiver<Mode>) {
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    tokio::select! {
        _ = copy(cr, uw, rx.clone()) => {}
        _ = copy(ur, cw, rx) => {}
    }
}

/// Copies one direction, honouring the mode before each write.
async fn copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut rx: watch::Receiver<Mode>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if *rx.borrow() == Mode::Cut {
            return;
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = rx.changed() => continue,
        };
        loop {
            let mode = *rx.borrow();
            match mode {
                Mode::Open => break,
                Mode::Cut => return,
                Mode::Stalled => {
                    if tokio::time::timeout(Duration::from_secs(60), rx.changed())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
