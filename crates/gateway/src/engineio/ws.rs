//! The WebSocket transport: one text frame per Engine.IO packet, binary
//! frames for attachments.

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tracing::debug;

use super::{End, Incoming, Transport};

/// An upgraded WebSocket as a [`Transport`].
#[derive(Debug)]
pub struct WsTransport(pub WebSocket);

impl Transport for WsTransport {
    async fn recv(&mut self) -> Option<Result<Incoming, End>> {
        loop {
            return Some(match self.0.next().await? {
                Ok(Message::Text(t)) => Ok(Incoming::Text(t)),
                Ok(Message::Binary(b)) => Ok(Incoming::Binary(b)),
                Ok(Message::Close(_)) => return None,
                // WebSocket-level pings are answered by tungstenite.
                Ok(Message::Ping(_) | Message::Pong(_)) => continue,
                Err(e) => {
                    let e = e.to_string();
                    if e.contains("too long") || e.contains("Space limit") {
                        Err(End::Oversize)
                    } else {
                        debug!(error = %e, "read failed");
                        return None;
                    }
                }
            });
        }
    }

    async fn feed_text(&mut self, text: Utf8Bytes) -> Result<(), End> {
        self.0
            .feed(Message::Text(text))
            .await
            .map_err(|_| End::WriteFailed)
    }

    async fn feed_binary(&mut self, data: Bytes) -> Result<(), End> {
        self.0
            .feed(Message::Binary(data))
            .await
            .map_err(|_| End::WriteFailed)
    }

    async fn flush(&mut self) -> Result<(), End> {
        self.0.flush().await.map_err(|_| End::WriteFailed)
    }

    async fn close(&mut self, code: Option<(u16, &'static str)>) {
        if let Some((code, reason)) = code {
            let _ = self
                .0
                .send(Message::Close(Some(CloseFrame {
                    code,
                    reason: Utf8Bytes::from_static(reason),
                })))
                .await;
        }
        let _ = self.0.close().await;
    }

    fn name(&self) -> &'static str {
        "websocket"
    }
}
