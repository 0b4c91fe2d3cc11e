//! One Socket.IO client connection over a raw WebSocket, and the frame
//! helpers the scenarios share.
//!
//! Every Socket.IO packet travels inside an Engine.IO message, hence the
//! leading `4` of `40/flows,…` (CONNECT), `42/flows,…` (EVENT) and
//! `43/flows,…` (ACK). The server pings with `2`; we answer `3`.
//!
//! Parsing is deliberately minimal: the hot path (a `pod:moved` delivery)
//! is recognised by its prefix and its send timestamp is found with a
//! substring search, never a JSON parse.

use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::Common;

/// A client WebSocket over plain TCP.
pub type Ws = WebSocketStream<TcpStream>;

/// Prefix of every `pod:moved` delivery.
pub const MOVED_PREFIX: &str = "42/flows,[\"pod:moved\",";
/// Prefix of every `error` event.
pub const ERROR_PREFIX: &str = "42/flows,[\"error\",";
/// Prefix of every ack on `/flows`.
pub const ACK_PREFIX: &str = "43/flows,";

/// Microseconds since this process's first call; the clock of every
/// timestamp the load generator sends and checks (sender and receivers
/// live in the same process).
pub fn now_micros() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// Mints HS256 user tokens.
#[derive(Clone)]
pub struct Minter {
    key: EncodingKey,
    header: Header,
    ttl_secs: u64,
}

impl std::fmt::Debug for Minter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Minter")
            .field("ttl_secs", &self.ttl_secs)
            .finish()
    }
}

impl Minter {
    /// Tokens valid for `ttl` signed with `secret`.
    pub fn new(secret: &str, ttl: Duration) -> Self {
        Minter {
            key: EncodingKey::from_secret(secret.as_bytes()),
            header: Header::new(Algorithm::HS256),
            ttl_secs: ttl.as_secs().max(60),
        }
    }

    /// A token whose `userId` is `user`.
    pub fn token(&self, user: &str) -> String {
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default()
            + self.ttl_secs;
        let claims = serde_json::json!({"userId": user, "sub": user, "exp": exp});
        jsonwebtoken::encode(&self.header, &claims, &self.key).expect("HS256 signing cannot fail")
    }
}

fn ws_config() -> WebSocketConfig {
    // Small buffers: the client holds tens of thousands of these.
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

/// TCP connect to `target` (bound to `source` first when given), WebSocket
/// upgrade at the Engine.IO path, and the Engine.IO open packet.
pub async fn open(target: SocketAddr, source: Option<IpAddr>) -> anyhow::Result<Ws> {
    let sock = if target.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        sock.bind(SocketAddr::new(ip, 0))
            .with_context(|| format!("binding source address {ip}"))?;
    }
    let stream = sock
        .connect(target)
        .await
        .with_context(|| format!("TCP connect to {target}"))?;
    stream.set_nodelay(true)?;
    let url = format!("ws://{target}/socket.io/?EIO=4&transport=websocket");
    let (mut ws, _) =
        tokio_tungstenite::client_async_with_config(url.as_str(), stream, Some(ws_config()))
            .await
            .context("WebSocket upgrade")?;
    let first = next_text(&mut ws)
        .await?
        .ok_or_else(|| anyhow!("closed before the Engine.IO open packet"))?;
    if !first.starts_with('0') {
        bail!("first frame is not an Engine.IO open packet: {first}");
    }
    Ok(ws)
}

/// The next text frame that is not an Engine.IO ping (pings are answered);
/// `None` when the connection ended.
pub async fn next_text(ws: &mut Ws) -> anyhow::Result<Option<String>> {
    loop {
        match ws.next().await {
            None => return Ok(None),
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(Message::Text(t))) => {
                if t.as_str() == "2" {
                    ws.send(Message::text("3")).await?;
                } else {
                    return Ok(Some(t.as_str().to_owned()));
                }
            }
            Some(Ok(Message::Close(_))) => return Ok(None),
            Some(Ok(_)) => {}
        }
    }
}

async fn expect(ws: &mut Ws, what: &str, accept: impl Fn(&str) -> bool) -> anyhow::Result<String> {
    loop {
        let t = next_text(ws)
            .await?
            .ok_or_else(|| anyhow!("connection closed while waiting for {what}"))?;
        if t.starts_with("44/flows,") {
            bail!("connect refused: {t}");
        }
        if accept(&t) {
            return Ok(t);
        }
    }
}

/// Sends the `/flows` CONNECT with `token` and waits for the CONNECT reply
/// and the `connected` event.
pub async fn connect_flows(ws: &mut Ws, token: &str) -> anyhow::Result<()> {
    ws.send(Message::text(format!("40/flows,{{\"token\":\"{token}\"}}")))
        .await?;
    expect(ws, "the CONNECT reply", |t| t.starts_with("40/flows,")).await?;
    expect(ws, "`connected`", |t| {
        t.starts_with("42/flows,[\"connected\"")
    })
    .await?;
    Ok(())
}

/// Emits `flow:join` with ack id `ack_id` and waits for a successful ack.
pub async fn join(ws: &mut Ws, flow: &str, ack_id: u64) -> anyhow::Result<()> {
    ws.send(Message::text(format!(
        "42/flows,{ack_id}[\"flow:join\",{{\"flowId\":\"{flow}\"}}]"
    )))
    .await?;
    let t = expect(ws, "the flow:join ack", |t| {
        parse_ack(t).is_some_and(|(id, _)| id == ack_id)
    })
    .await?;
    match parse_ack(&t) {
        Some((_, true)) => Ok(()),
        _ => bail!("flow:join refused: {t}"),
    }
}

/// Opens, connects to `/flows` as `user` and joins `flow` (when given):
/// everything a scenario needs before its traffic starts, under
/// `common.connect_timeout`.
pub async fn establish(
    common: &Common,
    minter: &Minter,
    index: usize,
    user: &str,
    flow: Option<&str>,
) -> anyhow::Result<Ws> {
    let work = async {
        let mut ws = open(common.target(index), common.source(index)).await?;
        connect_flows(&mut ws, &minter.token(user)).await?;
        if let Some(f) = flow {
            join(&mut ws, f, 1).await?;
        }
        anyhow::Ok(ws)
    };
    tokio::time::timeout(common.connect_timeout, work)
        .await
        .map_err(|_| anyhow!("connection setup timed out"))?
}

/// A `pod:move` frame whose podId carries `step` and the send time.
pub fn pod_move(buf: &mut String, ack: Option<u64>, step: usize, micros: u64) {
    use std::fmt::Write;
    buf.clear();
    buf.push_str("42/flows,");
    if let Some(id) = ack {
        let _ = write!(buf, "{id}");
    }
    let _ = write!(
        buf,
        "[\"pod:move\",{{\"podId\":\"{step}.{micros}\",\"position\":{{\"x\":1,\"y\":2}}}}]"
    );
}

/// The (step, send time) of a `pod:moved` frame sent by [`pod_move`].
pub fn moved_stamp(text: &str) -> Option<(usize, u64)> {
    if !text.starts_with(MOVED_PREFIX) {
        return None;
    }
    const KEY: &str = "\"podId\":\"";
    let at = text.find(KEY)? + KEY.len();
    let rest = &text[at..];
    let end = rest.find('"')?;
    let (step, micros) = rest[..end].split_once('.')?;
    Some((step.parse().ok()?, micros.parse().ok()?))
}

/// The (id, ok) of an ack frame `43/flows,<id>[{"ok":…}]`.
pub fn parse_ack(text: &str) -> Option<(u64, bool)> {
    let rest = text.strip_prefix(ACK_PREFIX)?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let id = rest[..digits].parse().ok()?;
    let ok = rest[digits..].starts_with("[{\"ok\":true");
    Some((id, ok))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip() {
        let mut buf = String::new();
        pod_move(&mut buf, None, 3, 123_456);
        assert_eq!(
            buf,
            r#"42/flows,["pod:move",{"podId":"3.123456","position":{"x":1,"y":2}}]"#
        );
        let relayed =
            r#"42/flows,["pod:moved",{"podId":"3.123456","position":{"x":1,"y":2},"userId":"u"}]"#;
        assert_eq!(moved_stamp(relayed), Some((3, 123_456)));
        assert_eq!(moved_stamp(r#"42/flows,["user:joined",{}]"#), None);
        pod_move(&mut buf, Some(17), 0, 5);
        assert!(buf.starts_with("42/flows,17[\"pod:move\""));
    }

    #[test]
    fn acks() {
        assert_eq!(parse_ack(r#"43/flows,12[{"ok":true}]"#), Some((12, true)));
        assert_eq!(
            parse_ack(r#"43/flows,7[{"ok":false,"code":"RATE_LIMIT"}]"#),
            Some((7, false))
        );
        assert_eq!(parse_ack("42/flows,[]"), None);
    }
}
