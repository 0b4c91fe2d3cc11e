//! Flow memberships: the rows the `members` access policy reads, and the
//! grants and revocations of the server API.

use tokio_postgres::types::Type;

use crate::{q, Store, StoreError};

impl Store {
    /// Whether `user_id` holds a membership of `flow_id`.
    pub async fn is_member(&self, flow_id: &str, user_id: &str) -> Result<bool, StoreError> {
        self.timed("is_member", async {
            let rows = self
                .client()
                .await?
                .query_typed(
                    "SELECT 1 FROM flow_members WHERE flow_id = $1 AND user_id = $2",
                    &[(&flow_id, Type::TEXT), (&user_id, Type::TEXT)],
                )
                .await
                .map_err(q)?;
            Ok(!rows.is_empty())
        })
        .await
    }

    /// Grants (or updates) a membership.
    pub async fn grant(&self, flow_id: &str, user_id: &str, role: &str) -> Result<(), StoreError> {
        self.timed("grant", async {
            self.client()
                .await?
                .execute_typed(
                    "INSERT INTO flow_members (flow_id, user_id, role) VALUES ($1, $2, $3) \
                     ON CONFLICT (flow_id, user_id) DO UPDATE SET role = EXCLUDED.role",
                    &[
                        (&flow_id, Type::TEXT),
                        (&user_id, Type::TEXT),
                        (&role, Type::TEXT),
                    ],
                )
                .await
                .map_err(q)?;
            Ok(())
        })
        .await
    }

    /// Revokes a membership; `true` if there was one.
    pub async fn revoke(&self, flow_id: &str, user_id: &str) -> Result<bool, StoreError> {
        self.timed("revoke", async {
            let n = self
                .client()
                .await?
                .execute_typed(
                    "DELETE FROM flow_members WHERE flow_id = $1 AND user_id = $2",
                    &[(&flow_id, Type::TEXT), (&user_id, Type::TEXT)],
                )
                .await
                .map_err(q)?;
            Ok(n > 0)
        })
        .await
    }
}
