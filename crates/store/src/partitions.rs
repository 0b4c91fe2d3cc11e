//! Month partitions of `room_events`: creating the ones writes need (and
//! the next month ahead of time) and dropping the ones past retention.

use tracing::info;

use crate::{q, Store, StoreError};

/// The name of the partition holding `month` (first day of it).
fn partition_name(year: i32, month: u8) -> String {
    format!("room_events_y{year:04}m{month:02}")
}

fn next_month(year: i32, month: u8) -> (i32, u8) {
    if month == 12 {
        (year + 1, 1)
    } else {
        (year, month + 1)
    }
}

impl Store {
    /// Creates the month partition if missing.
    pub async fn ensure_partition(&self, year: i32, month: u8) -> Result<(), StoreError> {
        let (ny, nm) = next_month(year, month);
        let sql = format!(
            "CREATE TABLE IF NOT EXISTS {} PARTITION OF room_events \
             FOR VALUES FROM ('{year:04}-{month:02}-01 00:00:00+00') TO ('{ny:04}-{nm:02}-01 00:00:00+00')",
            partition_name(year, month)
        );
        self.timed("create partition", async {
            self.client().await?.batch_execute(&sql).await.map_err(q)
        })
        .await
    }

    /// Creates the partitions of the current and next months.
    pub async fn ensure_partitions_ahead(&self) -> Result<(), StoreError> {
        let now = time::OffsetDateTime::now_utc();
        let (y, m) = (now.year(), now.month() as u8);
        self.ensure_partition(y, m).await?;
        let (ny, nm) = next_month(y, m);
        self.ensure_partition(ny, nm).await
    }

    /// Drops the partitions that end on or before the first day of
    /// (`year`, `month`); returns their names.
    pub async fn drop_partitions_before(
        &self,
        year: i32,
        month: u8,
    ) -> Result<Vec<String>, StoreError> {
        let cutoff = partition_name(year, month);
        let names: Vec<String> = self
            .timed("list partitions", async {
                let rows = self
                    .client()
                    .await?
                    .query_typed(
                        "SELECT c.relname::text FROM pg_inherits i \
                         JOIN pg_class c ON c.oid = i.inhrelid \
                         JOIN pg_class p ON p.oid = i.inhparent \
                         WHERE p.relname = 'room_events' ORDER BY 1",
                        &[],
                    )
                    .await
                    .map_err(q)?;
                Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
            })
            .await?;
        // Names sort by month: room_events_yYYYYmMM.
        let old: Vec<String> = names.into_iter().filter(|n| *n < cutoff).collect();
        for n in &old {
            self.timed("drop partition", async {
                self.client()
                    .await?
                    .batch_execute(&format!("DROP TABLE IF EXISTS {n}"))
                    .await
                    .map_err(q)
            })
            .await?;
            info!(partition = %n, "dropped an expired event-log partition");
        }
        Ok(old)
    }

    /// Drops partitions older than `months` whole months before now.
    pub async fn apply_retention(&self, months: u32) -> Result<Vec<String>, StoreError> {
        let now = time::OffsetDateTime::now_utc();
        let mut y = now.year();
        let mut m = now.month() as i32 - months as i32;
        while m < 1 {
            m += 12;
            y -= 1;
        }
        self.drop_partitions_before(y, m as u8).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_names_and_months() {
        assert_eq!(partition_name(2026, 1), "room_events_y2026m01");
        assert_eq!(next_month(2026, 12), (2027, 1));
    }
}
