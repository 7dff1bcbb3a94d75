//! [`Activity`] on PostgreSQL: `login_activity`. A page is one index range scan of the
//! primary key (user, time, seq) backwards.

use tokio_postgres::Row;

use super::users::{method_number, method_of};
use super::{PgStore, Result};
use crate::model::UserId;
use crate::store::layout::{event_byte, event_of};
use crate::store::{Activity, ActivityEntry, BoxFuture, StoreError};

pub(super) fn row_activity(row: &Row) -> Result<ActivityEntry> {
    let event: i16 = row.get(3);
    Ok(ActivityEntry {
        user_id: row.get::<_, i64>(0) as UserId,
        at: row.get(1),
        seq: row.get::<_, i64>(2) as u32,
        event: event_of(event as u8)
            .ok_or_else(|| StoreError::Corrupt(format!("activity event {event}")))?,
        method: row.get::<_, Option<i16>>(4).map(method_of).transpose()?,
        ip: row.get(5),
        user_agent: row.get(6),
    })
}

impl PgStore {
    pub(super) async fn insert_activity(&self, op: &'static str, e: &ActivityEntry) -> Result<()> {
        // An entry of an account deleted meanwhile is dropped, not an error.
        self.execute(
            op,
            "INSERT INTO login_activity (user_id, at, seq, event, method, ip, user_agent)
             SELECT $1, $2, $3, $4, $5, $6, $7 WHERE EXISTS (SELECT 1 FROM users WHERE id = $1)
             ON CONFLICT DO NOTHING",
            &[
                &(e.user_id as i64),
                &e.at,
                &(e.seq as i64),
                &(event_byte(e.event) as i16),
                &e.method.map(method_number),
                &e.ip,
                &e.user_agent,
            ],
        )
        .await?;
        Ok(())
    }
}

impl Activity for PgStore {
    fn record_activity<'a>(&'a self, entry: &'a ActivityEntry) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.insert_activity("record_activity", entry))
    }

    fn activity_page(
        &self,
        user: UserId,
        before: Option<(i64, u32)>,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<ActivityEntry>>> {
        Box::pin(async move {
            let (at, seq) = before.map_or((i64::MAX, i64::MAX), |(a, s)| (a, s as i64));
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows = self
                .query(
                    "activity_page",
                    "SELECT user_id, at, seq, event, method, ip, user_agent FROM login_activity
                     WHERE user_id = $1 AND (at, seq) < ($2, $3)
                     ORDER BY at DESC, seq DESC LIMIT $4",
                    &[&(user as i64), &at, &seq, &limit],
                )
                .await?;
            rows.iter().map(row_activity).collect()
        })
    }

    fn prune_activity(&self, oldest_kept: i64) -> BoxFuture<'_, Result<usize>> {
        Box::pin(async move {
            let n = self
                .execute(
                    "prune_activity",
                    "DELETE FROM login_activity WHERE at < $1",
                    &[&oldest_kept],
                )
                .await?;
            Ok(n as usize)
        })
    }
}
