//! [`PhoneRotations`] on PostgreSQL (schema 6): the state in `phone_key_rotation`, and
//! every instance in `smsauth_instances` with the phase it holds the keys for.
//!
//! A user is moved by one update of its row (index and sealed phone together), made only
//! if the row still holds what was read, so a move races nothing: a change to the row
//! meanwhile leaves it for the next pass, and a move done twice changes nothing.

use super::PgStore;
use crate::model::UserId;
use crate::privacy::{sealed_key_id, user_aad};
use crate::rotation::{LIVE_SECS, Phase, RotationState};
use crate::store::{BoxFuture, PhoneRotations, StoreError};

type Result<T> = std::result::Result<T, StoreError>;

impl PhoneRotations for PgStore {
    fn rotation(&self) -> BoxFuture<'_, Result<Option<RotationState>>> {
        Box::pin(async move {
            let row = self
                .query_opt("rotation", "SELECT state FROM phone_key_rotation", &[])
                .await?;
            row.map(|r| RotationState::decode(r.get::<_, &str>(0).as_bytes()))
                .transpose()
        })
    }

    fn swap_rotation<'a>(
        &'a self,
        expected: Option<&'a RotationState>,
        new: &'a RotationState,
    ) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let state = new.encode();
            // Done: the store is sealed with the new key alone, in the same statement.
            let sealed_with = match new.phase {
                Phase::Done => Some(new.to_id()?.0.to_vec()),
                _ => None,
            };
            let swapped = match expected {
                None => {
                    self.execute(
                        "swap_rotation",
                        "INSERT INTO phone_key_rotation (state) VALUES ($1) ON CONFLICT DO NOTHING",
                        &[&state],
                    )
                    .await?
                }
                Some(expected) => {
                    let row = self
                        .query_opt(
                            "swap_rotation",
                            "WITH r AS (
                                UPDATE phone_key_rotation SET state = $2 WHERE state = $1 RETURNING 1
                             ), k AS (
                                UPDATE smsauth_schema SET phone_key_id = $3
                                WHERE $3::bytea IS NOT NULL AND EXISTS (SELECT 1 FROM r)
                             )
                             SELECT count(*) FROM r",
                            &[&expected.encode(), &state, &sealed_with],
                        )
                        .await?;
                    row.map_or(0, |r| r.get::<_, i64>(0) as u64)
                }
            };
            Ok(swapped == 1)
        })
    }

    fn move_users(
        &self,
        from: UserId,
        limit: usize,
    ) -> BoxFuture<'_, Result<(Option<UserId>, u64)>> {
        Box::pin(async move {
            let rows = self
                .query(
                    "move_users",
                    "SELECT id, phone_sealed FROM users WHERE id >= $1 ORDER BY id LIMIT $2",
                    &[&(from as i64), &(limit as i64)],
                )
                .await?;
            let current = self.vault.key_id();
            let next = rows.last().map(|r| r.get::<_, i64>(0) as UserId + 1);
            let (mut ids, mut indexes, mut sealed, mut was) = (vec![], vec![], vec![], vec![]);
            for row in &rows {
                let (id, old): (i64, Vec<u8>) = (row.get(0), row.get(1));
                if sealed_key_id(&old) == Some(current) {
                    continue;
                }
                let aad = user_aad(id as UserId);
                let phone = self.vault.open(&old, &aad)?;
                ids.push(id);
                indexes.push(self.vault.index(&phone).as_str().to_owned());
                sealed.push(self.vault.seal(&phone, &aad));
                was.push(old);
            }
            if ids.is_empty() {
                return Ok((next, 0));
            }
            let moved = self
                .execute(
                    "move_users",
                    "UPDATE users u SET phone_index = x.phone_index, phone_sealed = x.sealed
                     FROM unnest($1::bigint[], $2::text[], $3::bytea[], $4::bytea[])
                         AS x(id, phone_index, sealed, was)
                     WHERE u.id = x.id AND u.phone_sealed = x.was",
                    &[&ids, &indexes, &sealed, &was],
                )
                .await?;
            Ok((next, moved))
        })
    }

    fn first_unmoved(&self) -> BoxFuture<'_, Result<Option<UserId>>> {
        Box::pin(async move {
            // The sealed layout: a version byte, then the key id (`crate::privacy`).
            let row = self
                .query_opt(
                    "first_unmoved",
                    "SELECT min(id) FROM users WHERE substring(phone_sealed FROM 2 FOR 8) <> $1",
                    &[&&self.vault.key_id().0[..]],
                )
                .await?;
            Ok(row
                .and_then(|r| r.get::<_, Option<i64>>(0))
                .map(|id| id as UserId))
        })
    }

    fn report_phase<'a>(
        &'a self,
        instance: &'a str,
        phase: Option<(&'a str, Phase)>,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let (to, number) = match phase {
                Some((to, phase)) => (Some(to), phase.number()),
                None => (None, 0),
            };
            self.execute(
                "report_phase",
                "INSERT INTO smsauth_instances (instance, rotation_to, phase, seen_at)
                 VALUES ($1, $2, $3, now())
                 ON CONFLICT (instance) DO UPDATE
                 SET rotation_to = EXCLUDED.rotation_to, phase = EXCLUDED.phase, seen_at = now()",
                &[&instance, &to, &number],
            )
            .await?;
            Ok(())
        })
    }

    fn instances_behind<'a>(
        &'a self,
        to: &'a str,
        phase: Phase,
    ) -> BoxFuture<'a, Result<Vec<String>>> {
        Box::pin(async move {
            // Instances that stopped without saying so are forgotten after a while.
            self.execute(
                "instances_behind",
                "DELETE FROM smsauth_instances WHERE seen_at < now() - interval '1 hour'",
                &[],
            )
            .await?;
            let rows = self
                .query(
                    "instances_behind",
                    "SELECT instance FROM smsauth_instances
                     WHERE seen_at > now() - make_interval(secs => $3)
                       AND (rotation_to IS DISTINCT FROM $1 OR phase < $2)
                     ORDER BY instance",
                    &[&to, &phase.number(), &(LIVE_SECS as f64)],
                )
                .await?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
    }

    fn leave<'a>(&'a self, instance: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.execute(
                "leave",
                "DELETE FROM smsauth_instances WHERE instance = $1",
                &[&instance],
            )
            .await?;
            Ok(())
        })
    }
}
