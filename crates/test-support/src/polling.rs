//! A raw Engine.IO HTTP long-polling client: plain HTTP/1.1 requests, one
//! per GET or POST (as a browser may send them over any connection), so a
//! test can check every rule of the polling protocol byte by byte.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The record separator between the packets of a polling payload.
pub const SEP: char = '\x1e';

/// One HTTP answer.
#[derive(Debug, Clone)]
pub struct HttpReply {
    /// The status code.
    pub status: u16,
    /// Header lines, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body as text (chunked bodies decoded).
    pub body: String,
}

impl HttpReply {
    /// The first header of this (lowercase) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request on a new connection (`Connection: close`), with a
/// raw body; fails if no complete answer comes within `wait`.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    wait: Duration,
) -> anyhow::Result<HttpReply> {
    let mut s = TcpStream::connect(addr).await?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await?;
    // A peer may answer (413) before reading a large body.
    let _ = s.write_all(body).await;
    let mut buf = Vec::new();
    tokio::time::timeout(wait, s.read_to_end(&mut buf))
        .await
        .context("no HTTP answer in time")??;
    parse(&buf)
}

fn parse(buf: &[u8]) -> anyhow::Result<HttpReply> {
    let text = String::from_utf8_lossy(buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("bad HTTP answer: {text}"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line: {head}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 || tail.len() < n {
                break;
            }
            out.push_str(&tail[..n]);
            rest = tail[n..].trim_start_matches("\r\n");
        }
        out
    } else {
        body.to_owned()
    };
    Ok(HttpReply {
        status,
        headers,
        body,
    })
}

/// A polling session seen from the client.
#[derive(Debug)]
pub struct PollClient {
    /// Where requests go (a node or the load balancer).
    pub addr: SocketAddr,
    /// The Engine.IO session id.
    pub sid: String,
    /// The open packet.
    pub open: Value,
    /// Packets received but not consumed yet.
    queue: VecDeque<String>,
}

const WAIT: Duration = Duration::from_secs(5);

impl PollClient {
    /// The query path of this session.
    pub fn path(&self) -> String {
        format!("/socket.io/?EIO=4&transport=polling&sid={}", self.sid)
    }

    /// The handshake GET.
    pub async fn open(addr: SocketAddr) -> anyhow::Result<Self> {
        let r = request(
            addr,
            "GET",
            "/socket.io/?EIO=4&transport=polling",
            &[],
            b"",
            WAIT,
        )
        .await?;
        if r.status != 200 {
            bail!("handshake: {} {}", r.status, r.body);
        }
        let open: Value = serde_json::from_str(
            r.body
                .strip_prefix('0')
                .ok_or_else(|| anyhow!("not an open packet: {}", r.body))?,
        )?;
        Ok(PollClient {
            addr,
            sid: open["sid"].as_str().unwrap_or_default().to_owned(),
            open,
            queue: VecDeque::new(),
        })
    }

    /// Opens and connects to `/flows` with `token`.
    pub async fn connect(addr: SocketAddr, token: &str) -> anyhow::Result<Self> {
        let mut c = Self::open(addr).await?;
        c.post_ok(&format!("40/flows,{}", json!({"token": token})))
            .await?;
        let reply = c.next_packet().await?;
        if !reply.starts_with("40/flows,") {
            bail!("connect refused: {reply}");
        }
        c.expect_event("connected").await?;
        Ok(c)
    }

    /// One GET of this session, waiting at most `wait`.
    pub async fn get(&self, wait: Duration) -> anyhow::Result<HttpReply> {
        request(self.addr, "GET", &self.path(), &[], b"", wait).await
    }

    /// One POST of this session.
    pub async fn post(&self, body: &str) -> anyhow::Result<HttpReply> {
        request(self.addr, "POST", &self.path(), &[], body.as_bytes(), WAIT).await
    }

    /// A POST that must be accepted.
    pub async fn post_ok(&self, body: &str) -> anyhow::Result<()> {
        let r = self.post(body).await?;
        if r.status != 200 || r.body != "ok" {
            bail!("POST {body:?}: {} {}", r.status, r.body);
        }
        Ok(())
    }

    /// The next packet, polling as needed; pings are answered with a pong.
    pub async fn next_packet(&mut self) -> anyhow::Result<String> {
        loop {
            while let Some(p) = self.queue.pop_front() {
                if p == "2" {
                    self.post_ok("3").await?;
                    continue;
                }
                return Ok(p);
            }
            let r = self.get(WAIT).await?;
            if r.status != 200 {
                bail!("GET: {} {}", r.status, r.body);
            }
            self.queue.extend(r.body.split(SEP).map(str::to_owned));
        }
    }

    /// Waits for the `/flows` event `name`, skipping other packets.
    pub async fn expect_event(&mut self, name: &str) -> anyhow::Result<Value> {
        loop {
            let p = self.next_packet().await?;
            if let Some(json) = p.strip_prefix("42/flows,") {
                let v: Value = serde_json::from_str(json)?;
                if v[0] == name {
                    return Ok(v.get(1).cloned().unwrap_or(Value::Null));
                }
            }
        }
    }

    /// Emits with ack id `id`; returns the ack payload.
    pub async fn emit_ack(&mut self, id: u64, event: &str, data: Value) -> anyhow::Result<Value> {
        self.post_ok(&format!("42/flows,{id}{}", json!([event, data])))
            .await?;
        let prefix = format!("43/flows,{id}");
        loop {
            let p = self.next_packet().await?;
            if let Some(rest) = p.strip_prefix(&prefix) {
                let v: Value = serde_json::from_str(rest)?;
                return Ok(v[0].clone());
            }
        }
    }
}
