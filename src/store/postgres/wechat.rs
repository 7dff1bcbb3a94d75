//! WeChat bindings on PostgreSQL: `login_methods` rows of method 3, whose unique index
//! (schema 2) lets one WeChat id belong to one account at most.
//!
//! A bind is one transaction: the account's row is locked (`FOR UPDATE`), so two binds of
//! one account run one after the other, and the method row is inserted with
//! `ON CONFLICT DO NOTHING`, so of two binds of one WeChat id the second waits for the
//! first to commit and then inserts nothing. A bind that is refused rolls back whole,
//! the account it would have made included.

use deadpool_postgres::Transaction;

use super::users::{NEXT_USER_ID, WECHAT, user_columns};
use super::{PgStore, Result};
use crate::model::{User, UserId};
use crate::privacy::user_aad;
use crate::store::{NewUser, WechatBind};

/// Which account a bind is for.
enum Target<'a> {
    /// The account of this phone, made if there is none.
    Phone(NewUser<'a>),
    /// This account (a link from its session).
    User(UserId, Option<&'a str>),
}

type PgResult<T> = std::result::Result<T, tokio_postgres::Error>;

impl PgStore {
    pub(super) async fn user_by_wechat_id(&self, wechat_id: &str) -> Result<Option<User>> {
        let row = self
            .query_opt(
                "user_by_wechat",
                concat!(
                    "SELECT ",
                    user_columns!(),
                    " FROM users JOIN login_methods ON user_id = id
                     WHERE method = 3 AND identification = $1"
                ),
                &[&wechat_id],
            )
            .await?;
        self.maybe_user(row.as_ref())
    }

    pub(super) async fn log_in_wechat_id(
        &self,
        wechat_id: &str,
        at: i64,
        avatar_url: Option<&str>,
    ) -> Result<Option<User>> {
        let row = self
            .query_opt(
                "log_in_wechat",
                concat!(
                    "UPDATE users SET last_login_at = $2, avatar_url = $3
                     FROM login_methods
                     WHERE method = 3 AND identification = $1 AND user_id = id AND NOT disabled
                     RETURNING ",
                    user_columns!()
                ),
                &[&wechat_id, &at, &avatar_url],
            )
            .await?;
        match row {
            Some(row) => Ok(Some(self.row_user(&row)?)),
            // Not bound, or bound to a disabled account, which the caller refuses.
            None => self.user_by_wechat_id(wechat_id).await,
        }
    }

    pub(super) async fn bind_to_phone(
        &self,
        new: NewUser<'_>,
        wechat_id: &str,
    ) -> Result<WechatBind> {
        self.bind(Target::Phone(new), wechat_id).await
    }

    pub(super) async fn link(
        &self,
        id: UserId,
        wechat_id: &str,
        avatar_url: Option<&str>,
    ) -> Result<WechatBind> {
        self.bind(Target::User(id, avatar_url), wechat_id).await
    }

    async fn bind(&self, target: Target<'_>, wechat_id: &str) -> Result<WechatBind> {
        self.with_client("bind_wechat", async |c| {
            let tx = c.transaction().await?;
            let outcome = self.bind_in(&tx, target, wechat_id).await?;
            if matches!(outcome, Ok(WechatBind::Bound { .. })) {
                tx.commit().await?;
            } // else rolled back as `tx` is dropped
            Ok(outcome)
        })
        .await?
    }

    pub(super) async fn unlink(&self, id: UserId) -> Result<Option<User>> {
        let row = self
            .query_opt(
                "unlink_wechat",
                concat!(
                    "WITH m AS (DELETE FROM login_methods WHERE user_id = $1 AND method = 3)
                     UPDATE users SET avatar_url = NULL WHERE id = $1 RETURNING ",
                    user_columns!()
                ),
                &[&(id as i64)],
            )
            .await?;
        self.maybe_user(row.as_ref())
    }

    /// The bind, in `tx`. A row that does not open (the store's error) ends it, rolled
    /// back, as the inner error.
    async fn bind_in(
        &self,
        tx: &Transaction<'_>,
        target: Target<'_>,
        wechat_id: &str,
    ) -> PgResult<Result<WechatBind>> {
        macro_rules! user {
            ($row:expr) => {
                match self.row_user($row) {
                    Ok(user) => user,
                    Err(e) => return Ok(Err(e)),
                }
            };
        }
        let lock_by_phone = concat!(
            "SELECT ",
            user_columns!(),
            " FROM users WHERE phone_index = ANY($1::text[]) FOR UPDATE"
        );
        let (user, created, login_at, avatar_url) = match &target {
            Target::User(id, avatar) => {
                let sql = concat!(
                    "SELECT ",
                    user_columns!(),
                    " FROM users WHERE id = $1 FOR UPDATE"
                );
                let st = tx.prepare_cached(sql).await?;
                match tx.query_opt(&st, &[&(*id as i64)]).await? {
                    Some(row) => (user!(&row), false, None, *avatar),
                    None => return Ok(Ok(WechatBind::NoUser)),
                }
            }
            Target::Phone(new) => {
                let st = tx.prepare_cached(lock_by_phone).await?;
                // The vault's indexes now, as a create takes them (see `users`).
                let (index, other) = self.vault.indexes(new.phone);
                let index = index.as_str();
                // While the phone key rotates the account may still be under the
                // other index; one statement reads both, and the rotation's move of a
                // row is one update, so the row is found under one of them.
                let indexes: Vec<&str> = std::iter::once(index)
                    .chain(other.as_ref().map(crate::store::PhoneIndex::as_str))
                    .collect();
                if let Some(other) = &other {
                    // As a create does (see `create_user_if_absent`).
                    let pair = super::users::rotation_lock_key(index, other.as_str());
                    tx.execute(
                        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                        &[&pair],
                    )
                    .await?;
                }
                let found = match tx.query_opt(&st, &[&indexes]).await? {
                    Some(row) => Some((user!(&row), false)),
                    None => {
                        let next = tx.prepare_cached(NEXT_USER_ID).await?;
                        let id: i64 = tx.query_one(&next, &[]).await?.get(0);
                        let sealed = self.vault.seal(new.phone, &user_aad(id as UserId));
                        let insert = concat!(
                        "INSERT INTO users (id, phone_index, phone_sealed, nickname, created_at, last_login_at, avatar_url)
                         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (phone_index) DO NOTHING RETURNING ",
                        user_columns!()
                    );
                        let ins = tx.prepare_cached(insert).await?;
                        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 7] = [
                            &id,
                            &index,
                            &sealed,
                            &new.nickname,
                            &new.created_at,
                            &new.last_login_at,
                            &new.avatar_url,
                        ];
                        match tx.query_opt(&ins, &params).await? {
                            Some(row) => Some((user!(&row), true)),
                            // A code login made it meanwhile (the insert waited for its
                            // commit): this statement sees it, and locks it.
                            None => match tx.query_opt(&st, &[&indexes]).await? {
                                Some(row) => Some((user!(&row), false)),
                                None => None,
                            },
                        }
                    }
                };
                let Some((user, created)) = found else {
                    return Ok(Ok(WechatBind::NoUser)); // made and deleted between two statements
                };
                (user, created, new.last_login_at, new.avatar_url.as_deref())
            }
        };
        if user.disabled {
            return Ok(Ok(WechatBind::Disabled));
        }
        let st = tx
            .prepare_cached(
                "SELECT identification FROM login_methods WHERE user_id = $1 AND method = $2",
            )
            .await?;
        let bound: Option<String> = tx
            .query_opt(&st, &[&(user.id as i64), &WECHAT])
            .await?
            .map(|r| r.get(0));
        match bound {
            Some(other) if other != wechat_id => return Ok(Ok(WechatBind::AlreadyBound)),
            Some(_) => {}
            None => {
                let st = tx
                .prepare_cached(
                    "INSERT INTO login_methods (user_id, method, identification) VALUES ($1, $2, $3)
                     ON CONFLICT DO NOTHING",
                )
                .await?;
                if tx
                    .execute(&st, &[&(user.id as i64), &WECHAT, &wechat_id])
                    .await?
                    == 0
                {
                    return Ok(Ok(WechatBind::Taken)); // the unique index: another account has it
                }
            }
        }
        if created {
            return Ok(Ok(WechatBind::Bound { user, created }));
        }
        let st = tx
            .prepare_cached(concat!(
                "UPDATE users SET last_login_at = COALESCE($2, last_login_at), avatar_url = $3
             WHERE id = $1 RETURNING ",
                user_columns!()
            ))
            .await?;
        let row = tx
            .query_one(&st, &[&(user.id as i64), &login_at, &avatar_url])
            .await?;
        Ok(Ok(WechatBind::Bound {
            user: user!(&row),
            created: false,
        }))
    }
}
