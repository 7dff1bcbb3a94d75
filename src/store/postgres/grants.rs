//! [`Grants`] on PostgreSQL: the `grants` table (schema 2). A take is one
//! `DELETE ... RETURNING`: of racing takes, on any instance, one gets the row.

use super::{PgStore, Result};
use crate::store::{BoxFuture, GrantKind, Grants};

fn kind_number(kind: GrantKind) -> i16 {
    crate::store::layout::grant_byte(kind) as i16
}

impl Grants for PgStore {
    fn put_grant<'a>(
        &'a self,
        kind: GrantKind,
        key: [u8; 32],
        value: &'a [u8],
        expires_at: i64,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.execute(
                "put_grant",
                "INSERT INTO grants (kind, key, value, expires_at) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (kind, key) DO UPDATE SET value = EXCLUDED.value, expires_at = EXCLUDED.expires_at",
                &[&kind_number(kind), &&key[..], &value, &expires_at],
            )
            .await?;
            Ok(())
        })
    }

    fn take_grant(
        &self,
        kind: GrantKind,
        key: [u8; 32],
    ) -> BoxFuture<'_, Result<Option<crate::store::TakenGrant>>> {
        Box::pin(async move {
            let row = self
                .query_opt(
                    "take_grant",
                    "DELETE FROM grants WHERE kind = $1 AND key = $2 RETURNING value, expires_at",
                    &[&kind_number(kind), &&key[..]],
                )
                .await?;
            Ok(row.map(|r| (r.get(0), r.get(1))))
        })
    }

    fn prune_grants(&self, now: i64) -> BoxFuture<'_, Result<usize>> {
        Box::pin(async move {
            let n = self
                .execute(
                    "prune_grants",
                    "DELETE FROM grants WHERE expires_at < $1",
                    &[&now],
                )
                .await?;
            Ok(n as usize)
        })
    }
}
