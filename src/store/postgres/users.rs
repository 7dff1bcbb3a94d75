//! [`Users`] and [`Sessions`] on PostgreSQL: `users`, `login_methods`, `revoked_tokens`
//! (login sessions and refresh tokens in [`super::sessions`]).

use tokio_postgres::Row;

use super::{PgStore, Result};
use crate::model::{LoginMethod, Method, User, UserId};
use crate::privacy::user_aad;
use crate::store::{
    BoxFuture, NewUser, PhoneIndex, Sessions, StoreError, UserChange, Users, WechatBind,
    identified, stored_identification,
};

/// The columns [`PgStore::row_user`] reads, in its order: for `concat!` into each
/// statement.
macro_rules! user_columns {
    () => {
        "id, phone_sealed, nickname, created_at, last_login_at, disabled, session_gen, avatar_url"
    };
}
pub(super) use user_columns;

/// A user as [`user_columns`] read it, its phone left sealed: the user without it, and
/// the sealed bytes.
pub(super) fn sealed_row_user(row: &Row) -> (User, &[u8]) {
    let user = User {
        id: row.get::<_, i64>(0) as UserId,
        phone: String::new(),
        nickname: row.get(2),
        created_at: row.get(3),
        last_login_at: row.get(4),
        disabled: row.get(5),
        session_gen: row.get::<_, i64>(6) as u32,
        avatar_url: row.get(7),
    };
    (user, row.get(1))
}

impl PgStore {
    /// A user as [`user_columns`] read it, its phone opened.
    pub(super) fn row_user(&self, row: &Row) -> Result<User> {
        let (user, sealed) = sealed_row_user(row);
        let phone = self.vault.open(sealed, &user_aad(user.id))?;
        Ok(User { phone, ..user })
    }

    /// [`Self::row_user`] of a row that may be missing.
    pub(super) fn maybe_user(&self, row: Option<&Row>) -> Result<Option<User>> {
        row.map(|r| self.row_user(r)).transpose()
    }
}

/// The phone of a user to insert, sealed for the id it will get: `nextval` is taken by
/// the caller first, so the sealed bytes name their record.
pub(super) const NEXT_USER_ID: &str = "SELECT nextval(pg_get_serial_sequence('users', 'id'))";

/// `wechat` in `login_methods.method`; schema 2's unique index names it.
pub(super) const WECHAT: i16 = 3;

pub(super) fn method_number(m: Method) -> i16 {
    match m {
        Method::Sms => 1,
        Method::Password => 2,
        Method::Wechat => WECHAT,
    }
}

pub(super) fn method_of(n: i16) -> Result<Method> {
    match n {
        1 => Ok(Method::Sms),
        2 => Ok(Method::Password),
        WECHAT => Ok(Method::Wechat),
        other => Err(StoreError::Corrupt(format!("login method {other}"))),
    }
}

/// The stored methods as three arrays, for `unnest` (sms is implied, never stored).
fn method_arrays(methods: &[LoginMethod]) -> (Vec<i16>, Vec<String>, Vec<Option<String>>) {
    let stored = methods.iter().filter(|m| m.method != Method::Sms);
    (
        stored.clone().map(|m| method_number(m.method)).collect(),
        stored
            .clone()
            .map(|m| stored_identification(m).to_owned())
            .collect(),
        stored.map(|m| m.access_code.clone()).collect(),
    )
}

impl PgStore {
    /// The account a create found in its way: under `index`, or under `other` while the
    /// phone key rotates. The other is read first, as
    /// [`crate::store::Users::find_by_phone`] does.
    async fn existing(&self, index: &PhoneIndex, other: Option<&PhoneIndex>) -> Result<User> {
        if let Some(other) = other
            && let Some(user) = self.user_by_phone(other).await?
        {
            return Ok(user);
        }
        self.user_by_phone(index).await?.ok_or_else(|| {
            StoreError::Unavailable("the account was deleted while it was used".into())
        })
    }

    async fn user_where(
        &self,
        op: &'static str,
        sql: &str,
        key: &(dyn tokio_postgres::types::ToSql + Sync),
    ) -> Result<Option<User>> {
        let row = self.query_opt(op, sql, &[key]).await?;
        self.maybe_user(row.as_ref())
    }

    /// A new id and the phone sealed for it.
    pub(super) async fn seal_for_new_user(&self, phone: &str) -> Result<(i64, Vec<u8>)> {
        let row = self
            .query_opt("next_user_id", NEXT_USER_ID, &[])
            .await?
            .ok_or_else(|| StoreError::Engine("nextval: no row".into()))?;
        let id: i64 = row.get(0);
        Ok((id, self.vault.seal(phone, &user_aad(id as UserId))))
    }
}

impl Users for PgStore {
    fn user(&self, id: UserId) -> BoxFuture<'_, Result<Option<User>>> {
        Box::pin(async move {
            let sql = concat!("SELECT ", user_columns!(), " FROM users WHERE id = $1");
            self.user_where("user", sql, &(id as i64)).await
        })
    }

    fn user_by_phone<'a>(&'a self, phone: &'a PhoneIndex) -> BoxFuture<'a, Result<Option<User>>> {
        Box::pin(async move {
            let sql = concat!(
                "SELECT ",
                user_columns!(),
                " FROM users WHERE phone_index = $1"
            );
            self.user_where("user_by_phone", sql, &phone.as_str()).await
        })
    }

    fn has_user<'a>(&'a self, phone: &'a PhoneIndex) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let row = self
                .query_opt(
                    "has_user",
                    "SELECT 1 FROM users WHERE phone_index = $1",
                    &[&phone.as_str()],
                )
                .await?;
            Ok(row.is_some())
        })
    }

    fn create_user_if_absent<'a>(
        &'a self,
        new: NewUser<'a>,
        methods: &'a [LoginMethod],
    ) -> BoxFuture<'a, Result<(User, bool)>> {
        Box::pin(async move {
            let (kinds, idents, codes) = method_arrays(methods);
            let (id, sealed) = self.seal_for_new_user(new.phone).await?;
            // The vault's indexes now, not the caller's: a request that began before a
            // rotation's switch must not make the account under the key it left.
            let (index, other) = self.vault.indexes(new.phone);
            // One statement: the user and its methods commit together, and of racing
            // creates for one phone the unique index lets exactly one insert.
            let sql = concat!(
                        "WITH u AS (
                            INSERT INTO users (id, phone_index, phone_sealed, nickname, created_at, last_login_at, avatar_url)
                            SELECT $9, $1, $10, $2, $3, $4, $8
                            WHERE NOT EXISTS (SELECT 1 FROM users WHERE phone_index = $11)
                            ON CONFLICT (phone_index) DO NOTHING
                            RETURNING ",
                        user_columns!(),
                        "
                        ), m AS (
                            INSERT INTO login_methods (user_id, method, identification, access_code)
                            SELECT u.id, x.method, x.identification, x.access_code
                            FROM u, unnest($5::smallint[], $6::text[], $7::text[])
                                AS x(method, identification, access_code)
                        )
                        SELECT * FROM u"
                    );
            let other_index = other.as_ref().map(PhoneIndex::as_str);
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 11] = [
                &index.as_str(),
                &new.nickname,
                &new.created_at,
                &new.last_login_at,
                &kinds,
                &idents,
                &codes,
                &new.avatar_url,
                &id,
                &sealed,
                // NULL unless the phone key rotates: then an account under the
                // other index is the phone's, and none is made.
                &other_index,
            ];
            let created = match other_index {
                None => {
                    self.query_opt("create_user_if_absent", sql, &params)
                        .await?
                }
                // While the phone key rotates, one instance may make the account under the
                // old index and another under the new: the unique index sees only one of
                // them, so creates of the phone take a lock on the pair, and the insert's
                // own snapshot, taken after it, sees the other's commit.
                Some(other) => {
                    let pair = rotation_lock_key(index.as_str(), other);
                    self.with_client("create_user_if_absent", async |c| {
                        let tx = c.transaction().await?;
                        tx.execute(
                            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                            &[&pair],
                        )
                        .await?;
                        let st = tx.prepare_cached(sql).await?;
                        let row = tx.query_opt(&st, &params).await?;
                        tx.commit().await?;
                        Ok(row)
                    })
                    .await?
                }
            };
            if let Some(row) = created {
                return Ok((self.row_user(&row)?, true));
            }
            // The other create has committed (the insert waited for it): a new statement
            // sees its user.
            Ok((self.existing(&index, other.as_ref()).await?, false))
        })
    }

    fn log_in_or_create<'a>(
        &'a self,
        new: NewUser<'a>,
        methods: &'a [LoginMethod],
    ) -> BoxFuture<'a, Result<(User, bool)>> {
        Box::pin(async move {
            // Most code logins are of existing accounts: one update records the login.
            // Tried before the insert, because an insert that finds the phone taken still
            // uses up a number of the id sequence: ids would grow with every login.
            let at = new.last_login_at;
            // While the phone key rotates the account may still be under the other
            // index: that is tried second, and a miss of both ends in the create, which
            // finds the account wherever the rotation has put it by then.
            let indexes = [Some(new.index), new.other];
            let login = async || -> Result<Option<User>> {
                for phone in indexes.iter().flatten() {
                    let Some(at) = at else {
                        match self.user_by_phone(phone).await? {
                            Some(user) => return Ok(Some(user)),
                            None => continue,
                        }
                    };
                    let row = self
                        .query_opt(
                            "log_in",
                            concat!(
                                "UPDATE users SET last_login_at = $2 WHERE phone_index = $1 AND NOT disabled RETURNING ",
                                user_columns!()
                            ),
                            &[&phone.as_str(), &at],
                        )
                        .await?;
                    if let Some(user) = self.maybe_user(row.as_ref())? {
                        return Ok(Some(user));
                    }
                }
                Ok(None)
            };
            if let Some(user) = login().await? {
                return Ok((user, false));
            }
            let (user, created) = self.create_user_if_absent(new, methods).await?;
            if created || user.disabled {
                return Ok((user, created)); // a disabled account: the caller refuses it
            }
            // Another instance made it between the two statements: log in to it.
            Ok((login().await?.unwrap_or(user), false))
        })
    }

    fn update_user(&self, id: UserId, change: UserChange) -> BoxFuture<'_, Result<Option<User>>> {
        Box::pin(async move {
            let id = id as i64;
            let row = match &change {
                UserChange::LoggedIn { at } => {
                    self.query_opt("update_user", 
                        concat!("UPDATE users SET last_login_at = $2 WHERE id = $1 RETURNING ", user_columns!()),
                        &[&id, at],
                    )
                    .await?
                }
                UserChange::Nickname(n) => {
                    self.query_opt("update_user", 
                        concat!("UPDATE users SET nickname = $2 WHERE id = $1 RETURNING ", user_columns!()),
                        &[&id, n],
                    )
                    .await?
                }
                UserChange::Disabled(d) => {
                    self.query_opt("update_user", 
                        concat!("UPDATE users SET disabled = $2 WHERE id = $1 RETURNING ", user_columns!()),
                        &[&id, d],
                    )
                    .await?
                }
                UserChange::Avatar(a) => {
                    self.query_opt("update_user",
                        concat!("UPDATE users SET avatar_url = $2 WHERE id = $1 RETURNING ", user_columns!()),
                        &[&id, a],
                    )
                    .await?
                }
                UserChange::EndSessions => {
                    self.query_opt("update_user", 
                        concat!("UPDATE users SET session_gen = (session_gen + 1) % 4294967296 WHERE id = $1 RETURNING ", user_columns!()),
                        &[&id],
                    )
                    .await?
                }
            };
            self.maybe_user(row.as_ref())
        })
    }

    fn login_methods<'a>(&'a self, u: &'a User) -> BoxFuture<'a, Result<Vec<LoginMethod>>> {
        Box::pin(async move {
            let rows = self
                .query("login_methods", 
                    "SELECT method, identification, access_code FROM login_methods WHERE user_id = $1 ORDER BY method",
                    &[&(u.id as i64)],
                )
                .await?;
            let mut found = vec![LoginMethod {
                method: Method::Sms,
                identification: u.phone.clone(),
                access_code: None,
            }];
            for row in rows {
                let method = LoginMethod {
                    method: method_of(row.get(0))?,
                    identification: row.get(1),
                    access_code: row.get(2),
                };
                found.push(identified(method, u));
            }
            Ok(found)
        })
    }

    fn put_login_method<'a>(
        &'a self,
        id: UserId,
        method: &'a LoginMethod,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            if method.method == Method::Sms {
                return Ok(()); // implied
            }
            self.execute(
                "put_login_method",
                "INSERT INTO login_methods (user_id, method, identification, access_code)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (user_id, method) DO UPDATE
                 SET identification = EXCLUDED.identification, access_code = EXCLUDED.access_code",
                &[
                    &(id as i64),
                    &method_number(method.method),
                    &stored_identification(method),
                    &method.access_code,
                ],
            )
            .await?;
            Ok(())
        })
    }

    fn put_login_method_ending_sessions<'a>(
        &'a self,
        id: UserId,
        method: &'a LoginMethod,
    ) -> BoxFuture<'a, Result<Option<User>>> {
        Box::pin(async move {
            // One statement, so one commit: the sessions end with the new method in place.
            let row = self
                .query_opt("put_login_method_ending_sessions", 
                    concat!("WITH u AS (
                        UPDATE users SET session_gen = (session_gen + 1) % 4294967296
                        WHERE id = $1
                        RETURNING ", user_columns!(), "
                    ), m AS (
                        INSERT INTO login_methods (user_id, method, identification, access_code)
                        SELECT u.id, $2, $3, $4 FROM u
                        ON CONFLICT (user_id, method) DO UPDATE
                        SET identification = EXCLUDED.identification, access_code = EXCLUDED.access_code
                    )
                    SELECT * FROM u"),
                    &[
                        &(id as i64),
                        &method_number(method.method),
                        &stored_identification(method),
                        &method.access_code,
                    ],
                )
                .await?;
            self.maybe_user(row.as_ref())
        })
    }

    fn user_count(&self) -> BoxFuture<'_, Result<u64>> {
        Box::pin(async move {
            let row = self
                .query_opt("user_count", "SELECT count(*) FROM users", &[])
                .await?;
            Ok(row.map_or(0, |r| r.get::<_, i64>(0) as u64))
        })
    }

    fn users(&self) -> BoxFuture<'_, Result<Vec<User>>> {
        Box::pin(async move {
            let sql = concat!("SELECT ", user_columns!(), " FROM users ORDER BY id");
            self.query("users", sql, &[])
                .await?
                .iter()
                .map(|row| self.row_user(row))
                .collect()
        })
    }

    fn user_by_wechat<'a>(&'a self, wechat_id: &'a str) -> BoxFuture<'a, Result<Option<User>>> {
        Box::pin(self.user_by_wechat_id(wechat_id))
    }

    fn log_in_wechat<'a>(
        &'a self,
        wechat_id: &'a str,
        at: i64,
        avatar_url: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Option<User>>> {
        Box::pin(self.log_in_wechat_id(wechat_id, at, avatar_url))
    }

    fn bind_wechat_to_phone<'a>(
        &'a self,
        new: NewUser<'a>,
        wechat_id: &'a str,
    ) -> BoxFuture<'a, Result<WechatBind>> {
        Box::pin(self.bind_to_phone(new, wechat_id))
    }

    fn link_wechat<'a>(
        &'a self,
        id: UserId,
        wechat_id: &'a str,
        avatar_url: Option<&'a str>,
    ) -> BoxFuture<'a, Result<WechatBind>> {
        Box::pin(self.link(id, wechat_id, avatar_url))
    }

    fn unlink_wechat(&self, id: UserId) -> BoxFuture<'_, Result<Option<User>>> {
        Box::pin(self.unlink(id))
    }

    fn delete_user(&self, id: UserId) -> BoxFuture<'_, Result<Option<User>>> {
        Box::pin(async move {
            // Its login methods, sessions (with their refresh tokens) and activity go
            // with it (ON DELETE CASCADE), in the same commit; the identity column never
            // gives the id out again. Counters are kept by phone and stay.
            let row = self
                .query_opt(
                    "delete_user",
                    concat!(
                        "DELETE FROM users WHERE id = $1 RETURNING ",
                        user_columns!()
                    ),
                    &[&(id as i64)],
                )
                .await?;
            self.maybe_user(row.as_ref())
        })
    }
}

impl Sessions for PgStore {
    fn revoke<'a>(&'a self, jti: &'a str, exp: i64) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let inserted = self
                .execute("revoke", 
                    "INSERT INTO revoked_tokens (jti, exp) VALUES ($1, $2) ON CONFLICT (jti) DO NOTHING",
                    &[&jti, &exp],
                )
                .await?;
            Ok(inserted == 1)
        })
    }

    fn is_revoked<'a>(&'a self, jti: &'a str) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let row = self
                .query_opt(
                    "is_revoked",
                    "SELECT 1 FROM revoked_tokens WHERE jti = $1",
                    &[&jti],
                )
                .await?;
            Ok(row.is_some())
        })
    }

    fn session_user<'a>(
        &'a self,
        id: UserId,
        jti: &'a str,
        sid: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Option<User>>> {
        Box::pin(async move {
            // The user and the revocation check in one round trip.
            let row = self
                .query_opt(
                    "session_user",
                    concat!(
                        "SELECT ",
                        user_columns!(),
                        " FROM users
                     WHERE id = $1 AND NOT EXISTS (SELECT 1 FROM revoked_tokens WHERE jti IN ($2, $3))"
                    ),
                    &[&(id as i64), &jti, &sid],
                )
                .await?;
            self.maybe_user(row.as_ref())
        })
    }

    fn session_account<'a>(
        &'a self,
        id: UserId,
        jti: &'a str,
        sid: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Option<crate::store::Account>>> {
        Box::pin(async move {
            // The user, its stored methods and the revocation check in one statement: a
            // row per stored method, or one with no method.
            let rows = self
                .query(
                    "session_account",
                    "SELECT u.id, u.phone_sealed, u.nickname, u.created_at, u.last_login_at, u.disabled,
                            u.session_gen, u.avatar_url, m.method, m.identification, m.access_code
                     FROM users u LEFT JOIN login_methods m ON m.user_id = u.id
                     WHERE u.id = $1 AND NOT EXISTS (SELECT 1 FROM revoked_tokens WHERE jti IN ($2, $3))
                     ORDER BY m.method",
                    &[&(id as i64), &jti, &sid],
                )
                .await?;
            let Some(first) = rows.first() else {
                return Ok(None);
            };
            let user = self.row_user(first)?;
            let mut methods = vec![LoginMethod {
                method: Method::Sms,
                identification: user.phone.clone(),
                access_code: None,
            }];
            for row in &rows {
                if let Some(method) = row.get::<_, Option<i16>>(8) {
                    let method = LoginMethod {
                        method: method_of(method)?,
                        identification: row.get(9),
                        access_code: row.get(10),
                    };
                    methods.push(identified(method, &user));
                }
            }
            Ok(Some((user, methods)))
        })
    }

    fn prune_revocations(&self, now: i64) -> BoxFuture<'_, Result<usize>> {
        Box::pin(async move {
            let n = self
                .execute(
                    "prune_revocations",
                    "DELETE FROM revoked_tokens WHERE exp < $1",
                    &[&now],
                )
                .await?;
            Ok(n as usize)
        })
    }

    fn create_session<'a>(
        &'a self,
        session: &'a crate::store::SessionRecord,
        refresh: [u8; 32],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.create_session_now(session, refresh))
    }

    fn use_refresh(
        &self,
        presented: [u8; 32],
        successor: [u8; 32],
        now: i64,
        expires_at: i64,
    ) -> BoxFuture<'_, Result<crate::store::RefreshUse>> {
        Box::pin(self.use_refresh_now(presented, successor, now, expires_at))
    }

    fn user_sessions(
        &self,
        user: UserId,
    ) -> BoxFuture<'_, Result<Vec<crate::store::SessionRecord>>> {
        Box::pin(self.user_sessions_now(user))
    }

    fn end_session(
        &self,
        user: UserId,
        id: crate::store::SessionId,
        revoke_until: i64,
    ) -> BoxFuture<'_, Result<bool>> {
        Box::pin(self.end_session_now(user, id, revoke_until))
    }

    fn prune_sessions(&self, now: i64) -> BoxFuture<'_, Result<usize>> {
        Box::pin(self.prune_sessions_now(now))
    }
}

/// The name both indexes of a phone lock under while the phone key rotates: the same on
/// every instance, whichever of the two it makes records with.
pub(super) fn rotation_lock_key(a: &str, b: &str) -> String {
    let (first, second) = if a <= b { (a, b) } else { (b, a) };
    format!("smsauth phone {first} {second}")
}
