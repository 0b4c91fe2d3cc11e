//! The Engine.IO v4 HTTP long-polling payload: several packets in one HTTP
//! body, joined by the record separator `\x1e`.
//!
//! Over polling a body is text only, so a binary packet travels as `b`
//! followed by its bytes in standard base64; every other packet is written
//! as over WebSocket (a type digit and its payload). A packet's text never
//! contains `\x1e` (JSON escapes control characters), which is why the
//! separator needs no escaping. The caller bounds the body before it gets
//! here (the HTTP read stops at the max payload); this codec only splits
//! and joins.

use base64::Engine as _;
use thiserror::Error;

/// The record separator between the packets of one payload.
pub const SEPARATOR: char = '\x1e';

/// One packet of a polling payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PayloadPacket<'a> {
    /// An Engine.IO text packet (`4…`, `2`, `3`, `1`, …), borrowed from the
    /// body.
    Text(&'a str),
    /// A binary `message` (an attachment), decoded from its base64.
    Binary(Vec<u8>),
}

/// Why a payload could not be split.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PayloadError {
    /// An empty body or an empty packet between two separators.
    #[error("empty packet in polling payload")]
    EmptyPacket,
    /// A `b` packet whose payload is not standard base64.
    #[error("invalid base64 in binary packet")]
    BadBase64,
}

/// Splits a POSTed body into its packets, in order.
pub fn decode_payload(body: &str) -> Result<Vec<PayloadPacket<'_>>, PayloadError> {
    body.split(SEPARATOR)
        .map(|p| match p.strip_prefix('b') {
            _ if p.is_empty() => Err(PayloadError::EmptyPacket),
            Some(b64) => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map(PayloadPacket::Binary)
                .map_err(|_| PayloadError::BadBase64),
            None => Ok(PayloadPacket::Text(p)),
        })
        .collect()
}

/// A packet to join into a GET response, borrowing what it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutPacket<'a> {
    /// A text packet, written as is.
    Text(&'a str),
    /// Binary bytes, written as `b` + base64.
    Binary(&'a [u8]),
}

impl OutPacket<'_> {
    /// Bytes this packet takes in a payload.
    pub fn encoded_len(&self) -> usize {
        match self {
            OutPacket::Text(t) => t.len(),
            OutPacket::Binary(b) => 1 + b.len().div_ceil(3) * 4,
        }
    }
}

/// Joins packets into one GET response body.
pub fn encode_payload<'a>(packets: impl IntoIterator<Item = OutPacket<'a>>) -> String {
    let packets: Vec<OutPacket<'a>> = packets.into_iter().collect();
    let len = packets.iter().map(|p| p.encoded_len() + 1).sum::<usize>();
    let mut out = String::with_capacity(len);
    for (i, p) in packets.iter().enumerate() {
        if i > 0 {
            out.push(SEPARATOR);
        }
        match p {
            OutPacket::Text(t) => out.push_str(t),
            OutPacket::Binary(b) => {
                out.push('b');
                base64::engine::general_purpose::STANDARD.encode_string(b, &mut out);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn splits_text_and_binary() {
        let got = decode_payload("40{\"token\":\"t\"}\x1e3\x1ebAQID").unwrap();
        assert_eq!(
            got,
            vec![
                PayloadPacket::Text("40{\"token\":\"t\"}"),
                PayloadPacket::Text("3"),
                PayloadPacket::Binary(vec![1, 2, 3]),
            ]
        );
    }

    #[test]
    fn joins_as_the_stock_server_does() {
        let body = encode_payload([
            OutPacket::Text("2"),
            OutPacket::Binary(&[1, 2, 3]),
            OutPacket::Text("6"),
        ]);
        assert_eq!(body, "2\x1ebAQID\x1e6");
        assert_eq!(encode_payload([OutPacket::Text("6")]), "6");
    }

    #[test]
    fn rejects_empty_packets_and_bad_base64() {
        assert_eq!(decode_payload(""), Err(PayloadError::EmptyPacket));
        assert_eq!(decode_payload("2\x1e"), Err(PayloadError::EmptyPacket));
        assert_eq!(decode_payload("\x1e2"), Err(PayloadError::EmptyPacket));
        assert_eq!(decode_payload("b!!"), Err(PayloadError::BadBase64));
        // An empty binary packet is valid: zero bytes.
        assert_eq!(
            decode_payload("b").unwrap(),
            vec![PayloadPacket::Binary(vec![])]
        );
    }

    #[test]
    fn encoded_len_is_exact() {
        for n in 0..10usize {
            let data = vec![7u8; n];
            let p = OutPacket::Binary(&data);
            assert_eq!(encode_payload([p]).len(), p.encoded_len());
        }
    }

    /// A packet as the server or client could send it: text never starts
    /// with `b` (a type digit does) and never holds the separator.
    fn packet() -> impl Strategy<Value = (bool, String, Vec<u8>)> {
        (
            any::<bool>(),
            "[0-6][^\x1e]{0,40}",
            proptest::collection::vec(any::<u8>(), 0..64),
        )
    }

    proptest! {
        #[test]
        fn round_trips(packets in proptest::collection::vec(packet(), 1..20)) {
            let out: Vec<OutPacket<'_>> = packets
                .iter()
                .map(|(bin, t, b)| if *bin { OutPacket::Binary(b) } else { OutPacket::Text(t) })
                .collect();
            let body = encode_payload(out.iter().copied());
            prop_assert_eq!(body.len() + 1, out.iter().map(|p| p.encoded_len() + 1).sum::<usize>());
            let back = decode_payload(&body).unwrap();
            prop_assert_eq!(back.len(), out.len());
            for (b, o) in back.iter().zip(&out) {
                match (b, o) {
                    (PayloadPacket::Text(a), OutPacket::Text(e)) => prop_assert_eq!(a, e),
                    (PayloadPacket::Binary(a), OutPacket::Binary(e)) => prop_assert_eq!(a.as_slice(), *e),
                    _ => prop_assert!(false, "kind changed"),
                }
            }
        }

        #[test]
        fn never_panics(s in "\\PC*") {
            let _ = decode_payload(&s);
        }
    }
}
