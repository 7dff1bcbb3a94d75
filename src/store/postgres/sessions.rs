//! Login sessions and refresh tokens on PostgreSQL: `login_sessions`, `refresh_tokens`.
//! A refresh is one statement that uses the token up (`UPDATE ... WHERE used_at IS NULL
//! RETURNING`), stores its successor and moves the session on, so of racing refreshes
//! on any instance exactly one rotates.

use tokio_postgres::Row;

use super::users::{method_number, method_of};
use super::{PgStore, Result};
use crate::model::UserId;
use crate::store::{RefreshUse, SessionId, SessionRecord, StoreError, session_revocation_key};

/// The columns [`row_session`] reads from its offset on, in its order.
macro_rules! session_columns {
    ($t:literal) => {
        concat!(
            $t,
            ".id, ",
            $t,
            ".user_id, ",
            $t,
            ".session_gen, ",
            $t,
            ".method, ",
            $t,
            ".created_at, ",
            $t,
            ".last_used_at, ",
            $t,
            ".expires_at, ",
            $t,
            ".ip, ",
            $t,
            ".user_agent, ",
            $t,
            ".ended"
        )
    };
}

fn row_session(row: &Row, at: usize) -> Result<SessionRecord> {
    let id: Vec<u8> = row.get(at);
    Ok(SessionRecord {
        id: id
            .try_into()
            .map_err(|_| StoreError::Corrupt("session id length".into()))?,
        user_id: row.get::<_, i64>(at + 1) as UserId,
        session_gen: row.get::<_, i64>(at + 2) as u32,
        method: method_of(row.get(at + 3))?,
        created_at: row.get(at + 4),
        last_used_at: row.get(at + 5),
        expires_at: row.get(at + 6),
        ip: row.get(at + 7),
        user_agent: row.get(at + 8),
        ended: row.get(at + 9),
    })
}

impl PgStore {
    pub(super) async fn create_session_now(
        &self,
        s: &SessionRecord,
        refresh: [u8; 32],
    ) -> Result<()> {
        self.execute(
            "create_session",
            "WITH s AS (
                 INSERT INTO login_sessions
                     (id, user_id, session_gen, method, created_at, last_used_at, expires_at, ip, user_agent)
                 VALUES ($1, $2, $3, $4, $5, $5, $6, $7, $8) RETURNING id
             )
             INSERT INTO refresh_tokens (hash, session_id, expires_at)
             SELECT $9, id, $6 FROM s",
            &[
                &&s.id[..],
                &(s.user_id as i64),
                &(s.session_gen as i64),
                &method_number(s.method),
                &s.created_at,
                &s.expires_at,
                &s.ip,
                &s.user_agent,
                &&refresh[..],
            ],
        )
        .await?;
        Ok(())
    }

    /// One statement. Its last part reads the token as the statement's snapshot saw it:
    /// when a racing refresh used it up first, the update finds nothing to change but the
    /// snapshot still shows the token unused. That is a use by the racer, just now.
    pub(super) async fn use_refresh_now(
        &self,
        presented: [u8; 32],
        successor: [u8; 32],
        now: i64,
        expires_at: i64,
    ) -> Result<RefreshUse> {
        let row = self
            .query_opt(
                "use_refresh",
                concat!(
                    "WITH consumed AS (
                         UPDATE refresh_tokens r SET used_at = $3
                         FROM login_sessions s
                         WHERE r.hash = $1 AND r.used_at IS NULL AND r.expires_at >= $3
                           AND s.id = r.session_id AND NOT s.ended
                         RETURNING r.session_id
                     ), successor AS (
                         INSERT INTO refresh_tokens (hash, session_id, expires_at)
                         SELECT $2, session_id, $4 FROM consumed
                         ON CONFLICT (hash) DO NOTHING
                     ), touched AS (
                         UPDATE login_sessions SET last_used_at = $3, expires_at = $4
                         WHERE id = (SELECT session_id FROM consumed)
                         RETURNING *
                     )
                     SELECT true, NULL::bigint, ",
                    session_columns!("t"),
                    " FROM touched t
                     UNION ALL
                     SELECT false, r.used_at, ",
                    session_columns!("s"),
                    " FROM refresh_tokens r JOIN login_sessions s ON s.id = r.session_id
                     WHERE r.hash = $1 AND r.expires_at >= $3 AND NOT s.ended
                       AND NOT EXISTS (SELECT 1 FROM consumed)"
                ),
                &[&&presented[..], &&successor[..], &now, &expires_at],
            )
            .await?;
        let Some(row) = row else {
            return Ok(RefreshUse::Invalid);
        };
        let session = row_session(&row, 2)?;
        if row.get::<_, bool>(0) {
            return Ok(RefreshUse::Rotated(session));
        }
        let used_at: Option<i64> = row.get(1);
        Ok(RefreshUse::Used {
            session,
            used_at: used_at.unwrap_or(now),
        })
    }

    pub(super) async fn user_sessions_now(&self, user: UserId) -> Result<Vec<SessionRecord>> {
        let rows = self
            .query(
                "user_sessions",
                concat!(
                    "SELECT ",
                    session_columns!("s"),
                    " FROM login_sessions s WHERE s.user_id = $1 ORDER BY s.created_at, s.id"
                ),
                &[&(user as i64)],
            )
            .await?;
        rows.iter().map(|r| row_session(r, 0)).collect()
    }

    /// The session ends and its access tokens are revoked in one statement.
    pub(super) async fn end_session_now(
        &self,
        user: UserId,
        id: SessionId,
        revoke_until: i64,
    ) -> Result<bool> {
        let row = self
            .query_opt(
                "end_session",
                "WITH e AS (
                     UPDATE login_sessions SET ended = true
                     WHERE user_id = $1 AND id = $2 AND NOT ended RETURNING id
                 ), r AS (
                     INSERT INTO revoked_tokens (jti, exp) SELECT $3, $4 FROM e
                     ON CONFLICT (jti) DO NOTHING
                 )
                 SELECT count(*) FROM e",
                &[
                    &(user as i64),
                    &&id[..],
                    &session_revocation_key(&id),
                    &revoke_until,
                ],
            )
            .await?;
        Ok(row.is_some_and(|r| r.get::<_, i64>(0) > 0))
    }

    /// Ended and expired sessions go with their tokens (the foreign key cascades).
    pub(super) async fn prune_sessions_now(&self, now: i64) -> Result<usize> {
        let sessions = self
            .execute(
                "prune_sessions",
                "DELETE FROM login_sessions WHERE ended OR expires_at < $1",
                &[&now],
            )
            .await?;
        let tokens = self
            .execute(
                "prune_sessions",
                "DELETE FROM refresh_tokens WHERE expires_at < $1",
                &[&now],
            )
            .await?;
        Ok((sessions + tokens) as usize)
    }
}
