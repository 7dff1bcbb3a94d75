//! [`PendingCodes`], [`ResendWaits`] and [`CaptchaAnswers`] on PostgreSQL: what is
//! single use is used up by the statement that checks it, so no two instances can both
//! win it.

use super::{PgStore, Result};
use crate::model::{PendingCode, Purpose};
use crate::store::{BoxFuture, CaptchaAnswers, CodeCheck, PendingCodes, PhoneIndex, ResendWaits};

pub(super) fn purpose_number(p: Purpose) -> i16 {
    match p {
        Purpose::Login => 1,
        Purpose::Register => 2,
        Purpose::ResetPassword => 3,
        Purpose::DeleteAccount => 4,
    }
}

impl PendingCodes for PgStore {
    fn put_code<'a>(
        &'a self,
        phone: &'a PhoneIndex,
        purpose: Purpose,
        code: PendingCode,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let phone = phone.as_str();
            self.execute(
                "put_code",
                "INSERT INTO pending_codes (phone_index, purpose, hash, sent_at, expires_at, attempts)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (phone_index, purpose) DO UPDATE
                 SET hash = EXCLUDED.hash, sent_at = EXCLUDED.sent_at,
                     expires_at = EXCLUDED.expires_at, attempts = EXCLUDED.attempts",
                &[
                    &phone,
                    &purpose_number(purpose),
                    &&code.hash[..],
                    &code.sent_at,
                    &code.expires_at,
                    &(code.attempts as i32),
                ],
            )
            .await?;
            Ok(())
        })
    }

    fn check_code<'a>(
        &'a self,
        phone: &'a PhoneIndex,
        purpose: Purpose,
        presented: [u8; 32],
        max_attempts: u32,
        now: i64,
    ) -> BoxFuture<'a, Result<CodeCheck>> {
        Box::pin(async move {
            let phone = phone.as_str();
            // One round trip decides every case. `used` takes the right code out and
            // `wrong` counts a wrong one; their conditions on `hash` exclude each other,
            // so at most one touches the row, and each re-checks it after waiting for a
            // concurrent check's lock: of racing right codes exactly one deletes it.
            // `seen` is the row as it was, to tell a dead code from none. The hash is
            // compared by the database, not in constant time: it is an HMAC under the
            // server's key, so how much of it matched tells nothing about the code.
            let row = self
                .query_opt(
                    "check_code",
                    "WITH used AS (
                        DELETE FROM pending_codes
                        WHERE phone_index = $1 AND purpose = $2 AND hash = $3
                          AND expires_at > $4 AND attempts < $5
                        RETURNING 1
                    ), wrong AS (
                        UPDATE pending_codes SET attempts = attempts + 1
                        WHERE phone_index = $1 AND purpose = $2 AND hash <> $3
                          AND expires_at > $4 AND attempts < $5
                        RETURNING attempts, expires_at
                    ), seen AS (
                        SELECT attempts, expires_at FROM pending_codes
                        WHERE phone_index = $1 AND purpose = $2
                    )
                    SELECT (SELECT count(*) FROM used),
                           (SELECT attempts FROM wrong), (SELECT expires_at FROM wrong),
                           (SELECT attempts FROM seen), (SELECT expires_at FROM seen)",
                    &[
                        &phone,
                        &purpose_number(purpose),
                        &&presented[..],
                        &now,
                        &(max_attempts as i32),
                    ],
                )
                .await?
                .ok_or_else(|| crate::store::StoreError::Engine("check_code: no row".into()))?;
            let used: i64 = row.get(0);
            let wrong: Option<i32> = row.get(1);
            let wrong_expires: Option<i64> = row.get(2);
            let seen: Option<i32> = row.get(3);
            let seen_expires: Option<i64> = row.get(4);
            Ok(match (used, wrong, wrong_expires, seen, seen_expires) {
                (1.., ..) => CodeCheck::Used,
                (_, Some(attempts), Some(expires_at), ..) if attempts as u32 >= max_attempts => {
                    CodeCheck::Dead {
                        expires_at,
                        guessed: true,
                    }
                }
                (_, Some(_), ..) => CodeCheck::Wrong,
                (_, None, _, Some(attempts), Some(expires_at))
                    if expires_at > now && attempts as u32 >= max_attempts =>
                {
                    CodeCheck::Dead {
                        expires_at,
                        guessed: false,
                    }
                }
                // None, expired, or used up by a concurrent check.
                _ => CodeCheck::Invalid,
            })
        })
    }

    fn discard_code<'a>(
        &'a self,
        phone: &'a PhoneIndex,
        purpose: Purpose,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let phone = phone.as_str();
            self.execute(
                "discard_code",
                "DELETE FROM pending_codes WHERE phone_index = $1 AND purpose = $2",
                &[&phone, &purpose_number(purpose)],
            )
            .await?;
            Ok(())
        })
    }

    fn pending_code_count(&self) -> BoxFuture<'_, Result<u64>> {
        Box::pin(async move {
            let row = self
                .query_opt(
                    "pending_code_count",
                    "SELECT count(*) FROM pending_codes",
                    &[],
                )
                .await?;
            Ok(row.map_or(0, |r| r.get::<_, i64>(0) as u64))
        })
    }

    fn sweep_codes(&self, now: i64) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.execute(
                "sweep_codes",
                "DELETE FROM pending_codes WHERE expires_at <= $1",
                &[&now],
            )
            .await?;
            Ok(())
        })
    }
}

impl ResendWaits for PgStore {
    fn reserve_send<'a>(
        &'a self,
        phone: &'a PhoneIndex,
        now: i64,
        interval: i64,
    ) -> BoxFuture<'a, Result<std::result::Result<(), u64>>> {
        Box::pin(async move {
            let phone = phone.as_str();
            // The claim is taken only if the last one is `interval` old: atomic per phone.
            let claimed = self
                .query_opt(
                    "reserve_send",
                    "INSERT INTO resend_waits (phone_index, sent_at) VALUES ($1, $2)
                     ON CONFLICT (phone_index) DO UPDATE SET sent_at = EXCLUDED.sent_at
                     WHERE resend_waits.sent_at <= $2::bigint - $3::bigint
                     RETURNING 1",
                    &[&phone, &now, &interval],
                )
                .await?;
            if claimed.is_some() {
                return Ok(Ok(()));
            }
            let last: i64 = self
                .query_opt(
                    "reserve_send",
                    "SELECT sent_at FROM resend_waits WHERE phone_index = $1",
                    &[&phone],
                )
                .await?
                .map_or(now - interval, |r| r.get(0));
            Ok(Err((interval - (now - last)).max(1) as u64))
        })
    }

    fn release_send<'a>(&'a self, phone: &'a PhoneIndex) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let phone = phone.as_str();
            self.execute(
                "release_send",
                "DELETE FROM resend_waits WHERE phone_index = $1",
                &[&phone],
            )
            .await?;
            Ok(())
        })
    }

    fn prune_waits(&self, now: i64, interval: i64) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.execute(
                "prune_waits",
                "DELETE FROM resend_waits WHERE sent_at <= $1",
                &[&(now - interval)],
            )
            .await?;
            Ok(())
        })
    }
}

impl CaptchaAnswers for PgStore {
    fn put_captcha<'a>(
        &'a self,
        id: &'a str,
        answer: &'a str,
        expires_at: i64,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.execute(
                "put_captcha",
                "INSERT INTO captchas (id, answer, expires_at) VALUES ($1, $2, $3)",
                &[&id, &answer, &expires_at],
            )
            .await?;
            Ok(())
        })
    }

    fn take_captcha<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<(String, i64)>>> {
        Box::pin(async move {
            let row = self
                .query_opt(
                    "take_captcha",
                    "DELETE FROM captchas WHERE id = $1 RETURNING answer, expires_at",
                    &[&id],
                )
                .await?;
            Ok(row.map(|r| (r.get(0), r.get(1))))
        })
    }

    fn prune_captchas(&self, now: i64) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.execute(
                "prune_captchas",
                "DELETE FROM captchas WHERE expires_at <= $1",
                &[&now],
            )
            .await?;
            Ok(())
        })
    }
}
