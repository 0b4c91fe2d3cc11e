//! Test support: start gateway nodes in process on free loopback ports, mint
//! JWTs, and speak raw Engine.IO / Socket.IO frames (WebSocket or HTTP
//! long-polling) and plain HTTP to them.
//!
//! Real dependencies (Redis, Postgres, PgBouncer, HAProxy) are started as
//! child processes by the modules that need them; nothing here mocks them.

pub mod chaos;
pub mod polling;
pub mod procs;
pub mod redis_cluster;
pub mod sentinel;
pub mod tls;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use flowgate_gateway::engine::memory::MemoryHub;
use flowgate_gateway::{App, Config};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The HS256 secret every test node uses.
pub const SECRET: &str = "test-secret";
/// The service token every test node accepts.
pub const SERVICE_TOKEN: &str = "test-service-token";

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// An HS256 token for `user_id` valid for `ttl_secs`, signed with [`SECRET`].
pub fn token(user_id: &str, ttl_secs: i64) -> String {
    token_with(json!({"userId": user_id, "exp": now_secs() as i64 + ttl_secs}))
}

/// An HS256 token with arbitrary claims, signed with [`SECRET`].
pub fn token_with(claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("HS256 signing cannot fail")
}

/// A gateway node running in this process.
#[derive(Debug)]
pub struct TestNode {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its state, for metrics and assertions.
    pub app: Arc<App>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestNode {
    /// Starts a node with the test defaults overridden by `vars`.
    pub async fn start(vars: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::start_on(vars, None).await
    }

    /// Starts `n` nodes on one Redis (`REDIS_URL` = `redis_url`), named
    /// `<prefix>0`, `<prefix>1`, …, each with `vars`.
    pub async fn start_redis_nodes(
        redis_url: &str,
        prefix: &str,
        n: usize,
        vars: &[(&str, &str)],
    ) -> anyhow::Result<Vec<Self>> {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let id = format!("{prefix}{i}");
            let mut all: Vec<(&str, &str)> =
                vec![("REDIS_URL", redis_url), ("FLOWGATE_NODE_ID", &id)];
            all.extend_from_slice(vars);
            out.push(Self::start(&all).await?);
        }
        Ok(out)
    }

    /// Starts a node sharing an in-memory engine with other nodes.
    pub async fn start_on(
        vars: &[(&str, &str)],
        hub: Option<Arc<MemoryHub>>,
    ) -> anyhow::Result<Self> {
        let mut map: HashMap<String, String> = [
            ("HOST", "127.0.0.1"),
            ("PORT", "0"),
            ("JWT_ACCESS_TOKEN_SECRET", SECRET),
            ("JWT_LEEWAY_SECS", "0"),
            ("FLOWGATE_SERVICE_TOKEN", SERVICE_TOKEN),
            ("FLOWGATE_DRAIN_NOTICE_MS", "0"),
            ("FLOWGATE_DRAIN_WINDOW_MS", "100"),
            ("FLOWGATE_SHUTDOWN_DEADLINE_MS", "3000"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        for (k, v) in vars {
            map.insert(k.to_string(), v.to_string());
        }
        let config = Config::from_vars(&map)?;
        let listener = TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let app = App::new(config, hub).await?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(flowgate_gateway::serve(app.clone(), listener, async {
            let _ = stopped.await;
        }));
        Ok(TestNode {
            addr,
            app,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// `ws://…/socket.io/?EIO=4&transport=websocket`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/socket.io/?EIO=4&transport=websocket", self.addr)
    }

    /// Drains and stops the node; returns once `serve` returned.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.task.take() {
            Some(t) => t.await?,
            None => Ok(()),
        }
    }

    /// The value of a metric sample line (`name{labels} value`) in `/metrics`.
    pub fn metric(&self, sample: &str) -> f64 {
        metric_value(&self.app.metrics.render(), sample)
    }

    /// The sessions `GET /v1/flows/{flow}/presence` lists (panics unless
    /// it answers 200 with an array).
    pub async fn presence(&self, flow: &str) -> Vec<Value> {
        let (s, body) = api(
            self.addr,
            "GET",
            &format!("/v1/flows/{flow}/presence"),
            None,
        )
        .await
        .expect("presence request");
        assert_eq!(s, 200, "{body}");
        match serde_json::from_str::<Value>(&body) {
            Ok(Value::Array(a)) => a,
            other => panic!("presence is not an array: {other:?}"),
        }
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// The value of `sample` (a metric name with its labels, exactly as
/// rendered) in a Prometheus text exposition; 0 when absent.
pub fn metric_value(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(sample)?;
            rest.strip_prefix(' ')?.trim().parse().ok()
        })
        .unwrap_or(0.0)
}

/// A raw WebSocket client that speaks frames, not Socket.IO semantics.
#[derive(Debug)]
pub struct RawClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// The Engine.IO handshake the server sent.
    pub open: Value,
}

/// How a connection ended, seen from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closed {
    /// A close frame with this code.
    Code(u16),
    /// The TCP stream ended without a close frame.
    Eof,
}

const WAIT: Duration = Duration::from_secs(5);

impl RawClient {
    /// Opens a WebSocket and reads the Engine.IO open packet.
    pub async fn open(url: &str) -> anyhow::Result<Self> {
        let (ws, _) = tokio_tungstenite::connect_async(url).await?;
        let mut c = RawClient {
            ws,
            open: Value::Null,
        };
        let first = c.recv_text().await?;
        let json = first
            .strip_prefix('0')
            .ok_or_else(|| anyhow!("first frame is not an open packet: {first}"))?;
        c.open = serde_json::from_str(json)?;
        Ok(c)
    }

    /// Opens and connects to `/flows` with `token`; returns the socket id.
    pub async fn connect(url: &str, token: &str) -> anyhow::Result<Self> {
        let mut c = Self::open(url).await?;
        c.send_text(&format!("40/flows,{}", json!({"token": token})))
            .await?;
        let reply = c.recv_text().await?;
        if !reply.starts_with("40/flows,") {
            bail!("connect refused: {reply}");
        }
        let connected = c.recv_event().await?;
        if connected.0 != "connected" {
            bail!("expected `connected`, got {connected:?}");
        }
        Ok(c)
    }

    /// Sends one text frame.
    pub async fn send_text(&mut self, text: &str) -> anyhow::Result<()> {
        self.ws.send(Message::text(text)).await?;
        Ok(())
    }

    /// Sends one binary frame.
    pub async fn send_binary(&mut self, data: Vec<u8>) -> anyhow::Result<()> {
        self.ws.send(Message::binary(data)).await?;
        Ok(())
    }

    /// Writes `bytes` to the socket as they are, under the WebSocket codec:
    /// for frames split or padded in ways tungstenite never sends.
    pub async fn send_wire(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        let io = self.ws.get_mut();
        io.write_all(bytes).await?;
        io.flush().await?;
        Ok(())
    }

    /// The next text frame that is not an Engine.IO ping (answered with a
    /// pong, as a real client would).
    pub async fn recv_text(&mut self) -> anyhow::Result<String> {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .context("no frame in time")?
                .ok_or_else(|| anyhow!("connection ended"))??;
            match msg {
                Message::Text(t) if t.as_str() == "2" => {
                    self.ws.send(Message::text("3")).await?;
                }
                Message::Text(t) => return Ok(t.to_string()),
                Message::Close(c) => bail!("closed: {c:?}"),
                _ => {}
            }
        }
    }

    /// Reads and discards frames for `wait`, answering pings like a live
    /// client; fails if the connection ends.
    pub async fn pump(&mut self, wait: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return Ok(()),
                Ok(None) => bail!("connection ended"),
                Ok(Some(msg)) => match msg? {
                    Message::Text(t) if t.as_str() == "2" => {
                        self.ws.send(Message::text("3")).await?
                    }
                    Message::Close(c) => bail!("closed: {c:?}"),
                    _ => {}
                },
            }
        }
    }

    /// The next frame of any kind, without answering pings.
    pub async fn recv_raw(&mut self, wait: Duration) -> anyhow::Result<Message> {
        tokio::time::timeout(wait, self.ws.next())
            .await
            .context("no frame in time")?
            .ok_or_else(|| anyhow!("connection ended"))?
            .map_err(Into::into)
    }

    /// The next `/flows` event as (name, first argument).
    pub async fn recv_event(&mut self) -> anyhow::Result<(String, Value)> {
        let t = self.recv_text().await?;
        let json = t
            .strip_prefix("42/flows,")
            .ok_or_else(|| anyhow!("not a /flows event: {t}"))?;
        let v: Value = serde_json::from_str(json)?;
        Ok((
            v[0].as_str().unwrap_or_default().to_owned(),
            v.get(1).cloned().unwrap_or(Value::Null),
        ))
    }

    /// Waits for the event `name`, skipping others; returns its argument.
    pub async fn expect_event(&mut self, name: &str) -> anyhow::Result<Value> {
        loop {
            let (event, data) = self.recv_event_or_other().await?;
            if event == name {
                return Ok(data);
            }
        }
    }

    /// The next frame as an event, or ("", frame) for any other frame.
    async fn recv_event_or_other(&mut self) -> anyhow::Result<(String, Value)> {
        let t = self.recv_text().await?;
        match t.strip_prefix("42/flows,") {
            Some(json) => {
                let v: Value = serde_json::from_str(json)?;
                Ok((
                    v[0].as_str().unwrap_or_default().to_owned(),
                    v.get(1).cloned().unwrap_or(Value::Null),
                ))
            }
            None => Ok((String::new(), Value::String(t))),
        }
    }

    /// Emits an event without an ack.
    pub async fn emit(&mut self, event: &str, data: Value) -> anyhow::Result<()> {
        self.send_text(&format!("42/flows,{}", json!([event, data])))
            .await
    }

    /// Emits an event with ack id `id` and returns the ack payload,
    /// skipping other frames.
    pub async fn emit_ack(&mut self, id: u64, event: &str, data: Value) -> anyhow::Result<Value> {
        self.send_text(&format!("42/flows,{id}{}", json!([event, data])))
            .await?;
        let prefix = format!("43/flows,{id}");
        loop {
            let t = self.recv_text().await?;
            if let Some(rest) = t.strip_prefix(&prefix) {
                let v: Value = serde_json::from_str(rest)?;
                return Ok(v[0].clone());
            }
        }
    }

    /// Waits for the server to close; answers pings meanwhile.
    pub async fn closed(&mut self, wait: Duration) -> anyhow::Result<Closed> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .context("not closed in time")?;
            match msg {
                None | Some(Err(_)) => return Ok(Closed::Eof),
                Some(Ok(Message::Close(c))) => {
                    return Ok(Closed::Code(c.map(|c| u16::from(c.code)).unwrap_or(1005)))
                }
                Some(Ok(_)) => {}
            }
        }
    }
}

/// A server API request with the service token (`Authorization: Bearer`);
/// returns status and body.
pub async fn api(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let auth = format!("Bearer {SERVICE_TOKEN}");
    http(addr, method, path, &[("Authorization", &auth)], body).await
}

/// A minimal HTTP/1.1 request (`Connection: close`); returns status and body.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    if let Some(b) = body {
        req.push_str(b);
    }
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .context("no HTTP response in time")??;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status: u16 = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad HTTP response: {text}"))?;
    let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    // Chunked bodies: keep only the chunk payloads (good enough for JSON).
    let body = if text
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body.split("\r\n")
            .enumerate()
            .filter(|(i, _)| i % 2 == 1)
            .map(|(_, s)| s)
            .collect::<String>()
    } else {
        body.to_owned()
    };
    Ok((status, body))
}
