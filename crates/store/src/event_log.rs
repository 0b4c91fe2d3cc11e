//! The room event log: batched, idempotent writes of the events rooms
//! persist, and history reads in room order below a watermark the caller
//! gives (the writers commit out of order; see the gateway's `eventlog`).

use serde::Serialize;
use tokio_postgres::types::{ToSql, Type};

use crate::{q, Store, StoreError};

/// One event of the durable log.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoggedEvent {
    /// The flow.
    pub flow_id: String,
    /// Its room offset (Redis stream id).
    pub offset: String,
    /// The event members received.
    pub event: String,
    /// Its payload.
    pub data: serde_json::Value,
    /// The sender, when a user sent it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
}

/// A batch of events as column arrays, for one `INSERT … SELECT FROM
/// unnest(…)` (one round trip, one unnamed statement, whatever the size).
#[derive(Default)]
struct Columns<'a> {
    flow: Vec<&'a str>,
    ms: Vec<i64>,
    seq: Vec<i64>,
    event: Vec<&'a str>,
    data: Vec<String>,
    user: Vec<Option<&'a str>>,
}

/// The largest offset time the log can date: the end of year 9999, where
/// Postgres timestamps end. A larger one is a malformed offset, not a
/// database error.
pub const MAX_OFFSET_MS: i64 = 253_402_300_799_999;

/// Splits a Redis stream id `<ms>-<seq>` (digits only, time within what
/// Postgres can date).
pub fn parse_offset(offset: &str) -> Result<(i64, i64), StoreError> {
    let bad = || StoreError::BadOffset(offset.to_owned());
    let (ms, seq) = offset.split_once('-').ok_or_else(bad)?;
    let num = |p: &str| {
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        p.parse::<i64>().map_err(|_| bad())
    };
    let (ms, seq) = (num(ms)?, num(seq)?);
    if ms > MAX_OFFSET_MS {
        return Err(bad());
    }
    Ok((ms, seq))
}

impl Store {
    /// Writes a batch of events in one transaction; events already in the
    /// log are skipped, so a retried batch is written exactly once. Creates
    /// a missing month partition and retries once.
    pub async fn write_events(&self, events: &[LoggedEvent]) -> Result<u64, StoreError> {
        if events.is_empty() {
            return Ok(0);
        }
        let mut cols = Columns::default();
        for e in events {
            let (ms, seq) = parse_offset(&e.offset)?;
            cols.flow.push(&e.flow_id);
            cols.ms.push(ms);
            cols.seq.push(seq);
            cols.event.push(&e.event);
            cols.data.push(e.data.to_string());
            cols.user.push(e.user_id.as_deref());
        }
        let insert = || async {
            let mut c = self.client().await?;
            let tx = c.transaction().await.map_err(q)?;
            tx.batch_execute(&format!(
                "SET LOCAL statement_timeout = {}",
                self.settings.statement_timeout.as_millis()
            ))
            .await
            .map_err(q)?;
            let params: [(&(dyn ToSql + Sync), Type); 6] = [
                (&cols.flow, Type::TEXT_ARRAY),
                (&cols.ms, Type::INT8_ARRAY),
                (&cols.seq, Type::INT8_ARRAY),
                (&cols.event, Type::TEXT_ARRAY),
                (&cols.data, Type::TEXT_ARRAY),
                (&cols.user, Type::TEXT_ARRAY),
            ];
            let n = tx
                .execute_typed(
                    "INSERT INTO room_events (flow_id, offset_ms, offset_seq, created_at, event, data, user_id) \
                     SELECT f, ms, s, to_timestamp(ms / 1000.0), e, d::jsonb, u \
                     FROM unnest($1::text[], $2::int8[], $3::int8[], $4::text[], $5::text[], $6::text[]) \
                          AS t(f, ms, s, e, d, u) \
                     ON CONFLICT DO NOTHING",
                    &params,
                )
                .await;
            match n {
                Ok(n) => {
                    tx.commit().await.map_err(q)?;
                    Ok(Ok(n))
                }
                Err(e)
                    if e.code() == Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION)
                        || e.to_string().contains("no partition") =>
                {
                    Ok(Err(()))
                }
                Err(e) if e.code().is_some_and(|c| c.code().starts_with("22")) => {
                    Err(StoreError::Rejected(crate::with_causes(&e)))
                }
                Err(e) => Err(q(e)),
            }
        };
        match self.timed("write_events", insert()).await? {
            Ok(n) => Ok(n),
            Err(()) => {
                // Events dated in a month without a partition: create the
                // partitions their offsets fall in, then write again.
                for ms in cols
                    .ms
                    .iter()
                    .copied()
                    .collect::<std::collections::BTreeSet<_>>()
                {
                    let t = time::OffsetDateTime::from_unix_timestamp(ms / 1000)
                        .map_err(|e| StoreError::BadOffset(e.to_string()))?;
                    self.ensure_partition(t.year(), t.month() as u8).await?;
                }
                match self.timed("write_events", insert()).await? {
                    Ok(n) => Ok(n),
                    Err(()) => Err(StoreError::Query("no partition for the events".into())),
                }
            }
        }
    }

    /// The log of a flow after `after` and below the offset time
    /// `below_ms` (both exclusive), in room order.
    pub async fn events(
        &self,
        flow_id: &str,
        after: Option<&str>,
        below_ms: i64,
        limit: i64,
    ) -> Result<Vec<LoggedEvent>, StoreError> {
        let (ms, seq) = match after {
            Some(a) => parse_offset(a)?,
            None => (0, -1),
        };
        self.timed("events", async {
            let rows = self
                .client()
                .await?
                .query_typed(
                    "SELECT offset_ms, offset_seq, event, data::text, user_id FROM room_events \
                     WHERE flow_id = $1 AND (offset_ms, offset_seq) > ($2, $3) AND offset_ms < $5 \
                       AND created_at >= to_timestamp(floor($2 / 1000.0)) \
                     ORDER BY offset_ms, offset_seq LIMIT $4",
                    &[
                        (&flow_id, Type::TEXT),
                        (&ms, Type::INT8),
                        (&seq, Type::INT8),
                        (&limit, Type::INT8),
                        (&below_ms, Type::INT8),
                    ],
                )
                .await
                .map_err(q)?;
            rows.iter()
                .map(|r| {
                    let data: String = r.get(3);
                    Ok(LoggedEvent {
                        flow_id: flow_id.to_owned(),
                        offset: format!("{}-{}", r.get::<_, i64>(0), r.get::<_, i64>(1)),
                        event: r.get(2),
                        data: serde_json::from_str(&data).map_err(q)?,
                        user_id: r.get(4),
                    })
                })
                .collect()
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets() {
        assert_eq!(
            parse_offset("1700000000123-4").unwrap(),
            (1_700_000_000_123, 4)
        );
        assert!(parse_offset("x").is_err());
        assert!(parse_offset("1-x").is_err());
        assert!(parse_offset("-1-0").is_err());
        assert!(parse_offset("+1-0").is_err());
        assert!(parse_offset("1-").is_err());
        assert!(parse_offset("99999999999999999999-0").is_err());
        assert_eq!(
            parse_offset(&format!("{MAX_OFFSET_MS}-0")).unwrap(),
            (MAX_OFFSET_MS, 0)
        );
        assert!(parse_offset(&format!("{}-0", MAX_OFFSET_MS + 1)).is_err());
    }
}
