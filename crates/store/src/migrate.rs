//! The schema: applying the embedded migrations over a direct connection,
//! and refusing to serve on a schema older than this binary.

use crate::{q, Store, StoreError};

mod embedded {
    refinery::embed_migrations!("../../migrations");
}

/// Applies the embedded migrations over a direct connection; idempotent.
/// Returns the versions applied now.
pub async fn migrate(direct_url: &str) -> Result<Vec<i32>, StoreError> {
    let (config, tls) = crate::tls::connect_config(direct_url)?;
    let (mut client, conn) = config
        .connect(tls)
        .await
        .map_err(|e| StoreError::Pool(with_source(&e)))?;
    let task = tokio::spawn(conn);
    // Runs started together (a Job retried while another runs, several
    // deploy steps) take turns: without the lock all but one fail on the
    // schema history table or a type the first one just created. A
    // session lock, released when this connection closes.
    client
        .batch_execute(&format!("SELECT pg_advisory_lock({MIGRATE_LOCK})"))
        .await
        .map_err(q)?;
    let report = embedded::migrations::runner()
        .run_async(&mut client)
        .await
        .map_err(q)?;
    drop(client);
    let _ = task.await;
    Ok(report
        .applied_migrations()
        .iter()
        .map(|m| m.version())
        .collect())
}

/// The advisory lock key migrations take turns on.
const MIGRATE_LOCK: i64 = 0x666c_6f77_6d69_6772; // "flowmigr"

/// A tokio-postgres error with its cause: its own text is only "db error"
/// or "error performing TLS handshake", which tells an operator nothing.
fn with_source(e: &tokio_postgres::Error) -> String {
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

/// The newest migration this binary carries.
pub fn latest_migration() -> i32 {
    embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| m.version())
        .max()
        .unwrap_or(0)
}

impl Store {
    /// Refuses a schema older than this binary.
    pub async fn check_schema(&self) -> Result<(), StoreError> {
        let needed = latest_migration();
        let found: i32 = self
            .timed("schema version", async {
                let c = self.client().await?;
                let rows = c
                    .query_typed(
                        "SELECT COALESCE(MAX(version), 0) FROM refinery_schema_history",
                        &[],
                    )
                    .await;
                match rows {
                    Ok(rows) => Ok(rows.first().map(|r| r.get::<_, i32>(0)).unwrap_or(0)),
                    // No history table: nothing was ever migrated.
                    Err(e)
                        if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) =>
                    {
                        Ok(0)
                    }
                    Err(e) => Err(q(e)),
                }
            })
            .await?;
        if found < needed {
            return Err(StoreError::SchemaBehind { found, needed });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_migration_is_embedded() {
        assert!(latest_migration() >= 1);
    }
}
