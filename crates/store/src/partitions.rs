//! Month partitions of `room_events`: creating the ones writes need (and
//! the next month ahead of time) and dropping the ones past retention.
//!
//! Retention drops only what this module creates: an ordinary table
//! attached to `room_events` whose name is exactly `room_events_yYYYYmMM`
//! with a real month, compared as a (year, month) date. Anything else an
//! operator attached — `room_events_default`, an archive partition, a
//! foreign table, a name that merely starts like ours — is never touched.

use tracing::info;

use crate::{q, Store, StoreError};

/// The name of the partition holding `month` (first day of it).
fn partition_name(year: i32, month: u8) -> String {
    format!("room_events_y{year:04}m{month:02}")
}

/// The month of a partition this module names, or `None` for any other
/// name: exactly `room_events_y` + four digits + `m` + two digits, 01–12.
fn partition_month(name: &str) -> Option<(i32, u8)> {
    let rest = name.strip_prefix("room_events_y")?;
    let (year, month) = rest.split_once('m')?;
    let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(year, 4) || !digits(month, 2) {
        return None;
    }
    let month: u8 = month.parse().ok()?;
    (1..=12)
        .contains(&month)
        .then_some((year.parse().ok()?, month))
}

/// The advisory lock key partition creation takes turns on.
const PARTITION_LOCK: i64 = 0x666c_6f77_7061_7274; // "flowpart"

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
        // `IF NOT EXISTS` alone still races: nodes starting together each
        // find the table missing and all but one fail on the catalog's
        // unique index ("already exists"). A transaction-scoped advisory
        // lock makes them take turns (one statement batch: one
        // transaction, also through PgBouncer in transaction mode).
        let sql = format!(
            "BEGIN; SELECT pg_advisory_xact_lock({PARTITION_LOCK}); \
             CREATE TABLE IF NOT EXISTS {} PARTITION OF room_events \
             FOR VALUES FROM ('{year:04}-{month:02}-01 00:00:00+00') TO ('{ny:04}-{nm:02}-01 00:00:00+00'); \
             COMMIT;",
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

    /// Drops the month partitions of months before (`year`, `month`);
    /// returns their names.
    pub async fn drop_partitions_before(
        &self,
        year: i32,
        month: u8,
    ) -> Result<Vec<String>, StoreError> {
        // Ordinary tables only (relkind 'r'): a foreign table or a
        // sub-partitioned one attached by hand is not ours. Each comes with
        // the name to drop it by (`regclass` quotes and qualifies it).
        let parts: Vec<(String, String)> = self
            .timed("list partitions", async {
                let rows = self
                    .client()
                    .await?
                    .query_typed(
                        "SELECT c.relname::text, c.oid::regclass::text FROM pg_inherits i \
                         JOIN pg_class c ON c.oid = i.inhrelid \
                         WHERE i.inhparent = 'room_events'::regclass AND c.relkind = 'r' \
                         ORDER BY 1",
                        &[],
                    )
                    .await
                    .map_err(q)?;
                Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
            })
            .await?;
        let mut old = Vec::new();
        for (name, qualified) in parts {
            // Not one of ours, or not expired.
            if partition_month(&name).is_none_or(|m| m >= (year, month)) {
                continue;
            }
            self.timed("drop partition", async {
                self.client()
                    .await?
                    .batch_execute(&format!("DROP TABLE IF EXISTS {qualified}"))
                    .await
                    .map_err(q)
            })
            .await?;
            info!(partition = %name, "dropped an expired event-log partition");
            old.push(name);
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

    #[test]
    fn only_our_names_are_months() {
        assert_eq!(partition_month("room_events_y2026m01"), Some((2026, 1)));
        assert_eq!(partition_month(&partition_name(2024, 12)), Some((2024, 12)));
        for other in [
            "room_events_default",
            "room_events_y2026m13",
            "room_events_y2026m00",
            "room_events_y2026m1",
            "room_events_y26m01",
            "room_events_y2026m01_old",
            "room_events_y+026m01",
            "room_events_archive",
            "other_y2026m01",
        ] {
            assert_eq!(partition_month(other), None, "{other}");
        }
        // Dates, not strings: 2026-02 is before 2026-10 and after 2025-12.
        assert!(partition_month("room_events_y2026m02") < Some((2026, 10)));
        assert!(partition_month("room_events_y2026m02") > Some((2025, 12)));
    }
}
