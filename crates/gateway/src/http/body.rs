//! Reading a polling POST's body into memory: at most a limit, and charged
//! to the node's read budget while it arrives (`read_budget.rs`), as a
//! WebSocket's unfinished frame is.
//!
//! Bodies are read before the session sees them, and a client may send
//! many at once (each on its own HTTP connection) and send them slowly;
//! without the budget, each could hold a max payload of the node's memory.

use std::time::Duration;

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;

use crate::read_budget::{Held, OverRead};

/// Why a body was not read whole.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum BodyError {
    /// Over the limit, or the node's budget is spent.
    Over(OverRead),
    /// The connection broke (or the body was malformed) part-way.
    Broken,
    /// The body did not arrive whole in time.
    TimedOut,
}

/// The whole body, at most `held`'s limit, within `timeout`: each chunk
/// is charged as it arrives and the account settles when the body is
/// whole (from then on the session's input bound holds it). A
/// `Content-Length` over the limit is refused before anything is read.
pub(crate) async fn read(
    body: Body,
    held: Held,
    declared: Option<u64>,
    timeout: Duration,
) -> Result<Bytes, BodyError> {
    if declared.is_some_and(|n| n > held.limit() as u64) {
        return Err(BodyError::Over(OverRead::Connection));
    }
    tokio::time::timeout(timeout, read_all(body, held))
        .await
        .unwrap_or(Err(BodyError::TimedOut))
}

/// Reads a body to its end and keeps none of it: at most `max` bytes,
/// within `timeout`.
pub(crate) async fn discard(
    mut body: Body,
    max: usize,
    timeout: Duration,
) -> Result<(), BodyError> {
    let drain = async {
        let mut seen = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|_| BodyError::Broken)?;
            if let Ok(data) = frame.into_data() {
                seen += data.len();
                if seen > max {
                    return Err(BodyError::Over(OverRead::Connection));
                }
            }
        }
        Ok(())
    };
    tokio::time::timeout(timeout, drain)
        .await
        .unwrap_or(Err(BodyError::TimedOut))
}

async fn read_all(mut body: Body, mut held: Held) -> Result<Bytes, BodyError> {
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| BodyError::Broken)?;
        if let Ok(data) = frame.into_data() {
            held.charge(data.len()).map_err(BodyError::Over)?;
            buf.extend_from_slice(&data);
        }
    }
    held.settle();
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::read_budget::budget;

    const LONG: Duration = Duration::from_secs(5);

    /// A body that arrives in `chunks`.
    fn chunked(chunks: &[&'static [u8]]) -> Body {
        let s = futures_util::stream::iter(
            chunks
                .iter()
                .map(|c| Ok::<_, std::io::Error>(Bytes::from_static(c)))
                .collect::<Vec<_>>(),
        );
        Body::from_stream(s)
    }

    #[tokio::test]
    async fn a_body_is_read_whole_within_its_limit_and_gives_its_bytes_back() {
        let b = budget(1 << 20);
        let got = read(chunked(&[b"4hel", b"lo"]), b.account(6), None, LONG).await;
        assert_eq!(got.unwrap(), Bytes::from_static(b"4hello"));
        assert_eq!(b.held(), 0);
    }

    #[tokio::test]
    async fn over_the_limit_or_the_budget_it_is_refused() {
        let b = budget(1 << 20);
        let over = read(chunked(&[b"4hel", b"lo!"]), b.account(6), None, LONG).await;
        assert_eq!(over, Err(BodyError::Over(OverRead::Connection)));
        let declared = read(chunked(&[b"x"]), b.account(6), Some(7), LONG).await;
        assert_eq!(declared, Err(BodyError::Over(OverRead::Connection)));
        assert_eq!(b.held(), 0, "a refused body gives its bytes back");

        // Another request holds most of the node's budget.
        let small = budget(1 << 20);
        let mut other = small.account(usize::MAX);
        other.charge((1 << 20) - 4).unwrap();
        let spent = read(chunked(&[b"4hel", b"lo"]), small.account(100), None, LONG).await;
        assert_eq!(spent, Err(BodyError::Over(OverRead::Node)));
    }

    #[tokio::test]
    async fn a_body_that_never_finishes_times_out_and_gives_its_bytes_back() {
        let b = budget(1 << 20);
        let first =
            futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b"4hel"))]);
        let stalled = Body::from_stream(futures_util::StreamExt::chain(
            first,
            futures_util::stream::pending(),
        ));
        let got = read(stalled, b.account(100), None, Duration::from_millis(100)).await;
        assert_eq!(got, Err(BodyError::TimedOut));
        assert_eq!(b.held(), 0);
    }
}
