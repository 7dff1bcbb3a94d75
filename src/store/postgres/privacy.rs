//! The phone key of a PostgreSQL store, and the migration that seals the phone numbers of
//! a database written by an earlier release (schema 3 to 4).
//!
//! The migration runs inside the schema migration's transaction, under its advisory lock:
//! instances starting together seal once, and a start cut short (kill -9 included)
//! leaves the database as it was, to be migrated whole by the next.

use std::time::{Duration, Instant};

use deadpool_postgres::Transaction;

use super::{PgStore, Result, classify};
use crate::model::UserId;
use crate::privacy::{KeyId, user_aad};
use crate::store::StoreError;

/// Users sealed per statement.
const BATCH: i64 = 1000;
const PROGRESS_EVERY: Duration = Duration::from_secs(3);

impl PgStore {
    /// Seals every `users.phone` and re-keys pending codes, resend waits and per-phone
    /// counters by the blind index.
    pub(super) async fn seal_plain_rows(&self, tx: &Transaction<'_>) -> Result<()> {
        let started = Instant::now();
        let mut last_report = started;
        let total: i64 = tx
            .query_one("SELECT count(*) FROM users WHERE phone IS NOT NULL", &[])
            .await
            .map_err(classify)?
            .get(0);
        let (mut after, mut done) = (0i64, 0i64);
        loop {
            let rows = tx
                .query(
                    "SELECT id, phone FROM users WHERE id > $1 AND phone IS NOT NULL
                     ORDER BY id LIMIT $2",
                    &[&after, &BATCH],
                )
                .await
                .map_err(classify)?;
            let Some(last) = rows.last() else { break };
            after = last.get(0);
            let mut ids = Vec::with_capacity(rows.len());
            let mut indexes = Vec::with_capacity(rows.len());
            let mut sealed = Vec::with_capacity(rows.len());
            for row in &rows {
                let id: i64 = row.get(0);
                let phone: &str = row.get(1);
                ids.push(id);
                indexes.push(self.vault.index(phone).as_str().to_owned());
                sealed.push(self.vault.seal(phone, &user_aad(id as UserId)));
            }
            tx.execute(
                "UPDATE users u SET phone_index = x.idx, phone_sealed = x.sealed, phone = NULL
                 FROM unnest($1::bigint[], $2::text[], $3::bytea[]) AS x(id, idx, sealed)
                 WHERE u.id = x.id",
                &[&ids, &indexes, &sealed],
            )
            .await
            .map_err(classify)?;
            done += rows.len() as i64;
            if last_report.elapsed() >= PROGRESS_EVERY {
                last_report = Instant::now();
                tracing::info!(done, of = total, "sealing phone numbers: users");
            }
        }
        // Pending codes, resend waits and counters: few rows (they expire within a day).
        for (table, column) in [
            ("pending_codes", "phone_index"),
            ("resend_waits", "phone_index"),
            ("counters", "subject"),
        ] {
            let select = format!("SELECT DISTINCT {column} FROM {table} WHERE {column} LIKE '+%'");
            let update = format!("UPDATE {table} SET {column} = $2 WHERE {column} = $1");
            for row in tx.query(&select, &[]).await.map_err(classify)? {
                let phone: &str = row.get(0);
                let index = self.vault.index(phone);
                tx.execute(&update, &[&phone, &index.as_str()])
                    .await
                    .map_err(classify)?;
            }
        }
        tracing::info!(
            users = done,
            took_ms = started.elapsed().as_millis() as u64,
            "PostgreSQL store migrated to schema 4: phone numbers sealed"
        );
        Ok(())
    }

    /// Records the phone key's id in a database that has none, and refuses a key that
    /// is not the one the database is sealed with.
    pub(super) async fn check_phone_key(&self, tx: &Transaction<'_>) -> Result<()> {
        let ours = self.vault.key_id();
        let row = tx
            .query_one("SELECT phone_key_id FROM smsauth_schema", &[])
            .await
            .map_err(classify)?;
        let stored = row.get::<_, Option<&[u8]>>(0);
        let empty: bool = tx
            .query_one("SELECT NOT EXISTS (SELECT 1 FROM users)", &[])
            .await
            .map_err(classify)?
            .get(0);
        let rotation = match tx
            .query_opt("SELECT state FROM phone_key_rotation", &[])
            .await
            .map_err(classify)?
        {
            Some(row) => Some(crate::rotation::RotationState::decode(
                row.get::<_, &str>(0).as_bytes(),
            )?),
            None => None,
        };
        if let (Some(stored), Some(rotation), false) = (stored, &rotation, empty) {
            // A rotation decides which keys are needed (see `crate::rotation`).
            let stored = KeyId::from_bytes(stored)
                .ok_or_else(|| StoreError::Corrupt("smsauth_schema.phone_key_id".into()))?;
            return crate::rotation::settle_vault(&self.vault, Some(stored), Some(rotation));
        }
        if rotation.is_some() && empty {
            // Nothing is sealed: a rotation recorded before the last account went is moot.
            tx.execute("DELETE FROM phone_key_rotation", &[])
                .await
                .map_err(classify)?;
        }
        // A database with no account has nothing sealed yet: it takes the key it is given
        // (say, after a restore that was refused for the wrong key).
        match stored.filter(|_| !empty) {
            None => {
                tx.execute(
                    "UPDATE smsauth_schema SET phone_key_id = $1",
                    &[&&ours.0[..]],
                )
                .await
                .map_err(classify)?;
                Ok(())
            }
            Some(stored) => {
                let stored = KeyId::from_bytes(stored)
                    .ok_or_else(|| StoreError::Corrupt("smsauth_schema.phone_key_id".into()))?;
                if stored == ours {
                    Ok(())
                } else {
                    Err(StoreError::Schema(format!(
                        "the phone key in privacy.phone_key_file (id {ours}) is not the key this \
                         database is sealed with (id {stored}); every instance needs the same key file"
                    )))
                }
            }
        }
    }
}
