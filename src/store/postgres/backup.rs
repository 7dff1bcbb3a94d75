//! [`Snapshots`] on PostgreSQL, in the embedded engine's record layout
//! ([`crate::store::layout`]): one backup format for both engines, so a deployment moves
//! between them with `smsauth backup` and `smsauth restore`. Records of what needs no
//! backup (resend waits, captchas, per-address limits, grants) are not written, as the embedded
//! engine keeps none of them on disk either.

use std::collections::BTreeMap;

use tokio_postgres::IsolationLevel;

use super::users::{method_number, user_columns};
use super::{PgStore, Result, classify, pool_error};
use crate::model::{LoginMethod, Method, PendingCode, Purpose, User};
use crate::privacy::user_aad;
use crate::store::codec::{
    decode, decode_plain_user, decode_sealed_user, encode, encode_sealed_user, read_i64, read_u64,
    u64_key,
};
use crate::store::layout::{
    self, code_key, counter_key, method_key, parse_code_key, parse_counter_key,
};
use crate::store::{
    ActivityEntry, ActivityValue, PhoneIndex, RecordSink, Snapshots, StoreError,
    stored_identification,
};

type Trees = BTreeMap<&'static str, BTreeMap<Vec<u8>, Vec<u8>>>;

fn purpose_of(n: i16) -> Result<Purpose> {
    Purpose::ALL
        .into_iter()
        .find(|p| super::codes::purpose_number(*p) == n)
        .ok_or_else(|| StoreError::Corrupt(format!("purpose {n}")))
}

fn counter_of(n: i16) -> Result<crate::model::Counter> {
    crate::model::Counter::ALL
        .into_iter()
        .find(|c| super::limits::counter_number(*c) == n)
        .ok_or_else(|| StoreError::Corrupt(format!("counter {n}")))
}

impl PgStore {
    /// Every table's rows as layout records, read in one repeatable-read transaction so
    /// they are one consistent state.
    async fn read_trees(&self) -> Result<Trees> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(classify)?;
        let mut trees = Trees::new();
        let mut put = |tree: &'static str, k: Vec<u8>, v: Vec<u8>| {
            trees.entry(tree).or_default().insert(k, v);
        };
        // Users as they are stored: the phone stays sealed, the index stays an index.
        let users = tx
            .query(
                concat!("SELECT ", user_columns!(), ", phone_index FROM users"),
                &[],
            )
            .await
            .map_err(classify)?;
        for row in &users {
            let (bare, sealed) = super::users::sealed_row_user(row);
            let index = PhoneIndex::parse(row.get(8))
                .ok_or_else(|| StoreError::Corrupt("users.phone_index".into()))?;
            put(
                layout::PHONES,
                index.bytes().to_vec(),
                u64_key(bare.id).to_vec(),
            );
            put(
                layout::USERS,
                u64_key(bare.id).to_vec(),
                encode_sealed_user(&bare, sealed),
            );
        }
        for row in tx
            .query(
                "SELECT identification, user_id FROM login_methods WHERE method = 3",
                &[],
            )
            .await
            .map_err(classify)?
        {
            let wechat_id: String = row.get(0);
            put(
                layout::WECHATS,
                wechat_id.into_bytes(),
                u64_key(row.get::<_, i64>(1) as u64).to_vec(),
            );
        }
        for row in tx
            .query(
                "SELECT user_id, method, identification, access_code FROM login_methods",
                &[],
            )
            .await
            .map_err(classify)?
        {
            let method = super::users::method_of(row.get(1))?;
            let m = LoginMethod {
                method,
                identification: row.get(2),
                access_code: row.get(3),
            };
            put(
                layout::METHODS,
                method_key(row.get::<_, i64>(0) as u64, method).to_vec(),
                encode(&m),
            );
        }
        for row in tx
            .query(
                "SELECT phone_index, purpose, hash, sent_at, expires_at, attempts FROM pending_codes",
                &[],
            )
            .await
            .map_err(classify)?
        {
            let hash: Vec<u8> = row.get(2);
            let code = PendingCode {
                hash: hash
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("code hash length".into()))?,
                sent_at: row.get(3),
                expires_at: row.get(4),
                attempts: row.get::<_, i32>(5) as u32,
            };
            let index = PhoneIndex::parse(row.get(0))
                .ok_or_else(|| StoreError::Corrupt("pending_codes.phone_index".into()))?;
            put(
                layout::CODES,
                code_key(&index, purpose_of(row.get(1))?),
                encode(&code),
            );
        }
        for row in tx
            .query("SELECT jti, exp FROM revoked_tokens", &[])
            .await
            .map_err(classify)?
        {
            let jti: String = row.get(0);
            put(
                layout::REVOKED,
                jti.into_bytes(),
                row.get::<_, i64>(1).to_be_bytes().to_vec(),
            );
        }
        for row in tx
            .query("SELECT kind, win, subject, count FROM counters", &[])
            .await
            .map_err(classify)?
        {
            // A phone's index, or '' for the service's budget.
            let subject: &str = row.get(2);
            let subject = match subject {
                "" => Vec::new(),
                index => PhoneIndex::parse(index)
                    .ok_or_else(|| StoreError::Corrupt("counters.subject".into()))?
                    .bytes()
                    .to_vec(),
            };
            let key = counter_key(counter_of(row.get(0))?, row.get(1), &subject);
            put(
                layout::COUNTERS,
                key,
                u64_key(row.get::<_, i64>(3).max(0) as u64).to_vec(),
            );
        }
        for row in tx
            .query(
                "SELECT user_id, at, seq, event, method, ip, user_agent FROM login_activity",
                &[],
            )
            .await
            .map_err(classify)?
        {
            let e = super::activity::row_activity(&row)?;
            let value = ActivityValue {
                event: e.event,
                method: e.method,
                ip: e.ip,
                user_agent: e.user_agent,
            };
            put(
                layout::ACTIVITY,
                layout::activity_key(e.user_id, e.at, e.seq).to_vec(),
                encode(&value),
            );
        }
        // The identity's next value: ids of deleted users are never given out again.
        let next: i64 = tx
            .query_one(
                "SELECT CASE WHEN is_called THEN last_value + 1 ELSE last_value END
                 FROM users_id_seq",
                &[],
            )
            .await
            .map_err(classify)?
            .get(0);
        put(
            layout::META,
            layout::META_SCHEMA.to_vec(),
            layout::SCHEMA_VERSION.to_be_bytes().to_vec(),
        );
        put(
            layout::META,
            layout::META_NEXT_ID.to_vec(),
            u64_key(next.max(1) as u64).to_vec(),
        );
        put(
            layout::META,
            layout::META_USERS.to_vec(),
            u64_key(users.len() as u64).to_vec(),
        );
        put(
            layout::META,
            layout::META_PHONE_KEY.to_vec(),
            self.vault.key_id().0.to_vec(),
        );
        tx.commit().await.map_err(classify)?;
        Ok(trees)
    }

    /// The index a backup's phone key names: an index already (as bytes, or as text
    /// before schema 7), or a phone in the clear (a backup before schema 5).
    fn index_of(&self, key: &[u8]) -> Result<PhoneIndex> {
        if let Some(phone) = crate::privacy::plain_phone(key) {
            return Ok(self.vault.index(phone));
        }
        PhoneIndex::from_key(key).ok_or_else(|| StoreError::Corrupt("a phone index".into()))
    }

    /// A counter's subject as this store keys it: a phone's index as text, or '' for
    /// the service's budget.
    fn subject_of(&self, subject: &[u8]) -> Result<String> {
        if subject.is_empty() {
            return Ok(String::new());
        }
        Ok(self.index_of(subject)?.as_str().to_owned())
    }

    /// Moves the identity past `id`, so ids from the backup are never given out again.
    async fn keep_ids_past(&self, id: i64) -> Result<()> {
        self.query_opt(
            "import",
            "SELECT setval('users_id_seq', GREATEST($1::bigint, (SELECT last_value FROM users_id_seq)))",
            &[&id],
        )
        .await?;
        Ok(())
    }

    async fn import_record(&self, tree: &str, key: &[u8], value: &[u8]) -> Result<()> {
        let op = "import";
        match tree {
            layout::USERS => {
                // Sealed (this release's backups) or in the clear (an earlier one's): the
                // index comes from the phone, which also proves the key opens it.
                let (u, sealed) = match decode_plain_user(value)? {
                    Some(u) => {
                        let sealed = self.vault.seal(&u.phone, &user_aad(u.id));
                        (u, sealed)
                    }
                    None => {
                        let (bare, sealed) = decode_sealed_user(value)?;
                        let phone = self.vault.open(sealed, &user_aad(bare.id))?;
                        (User { phone, ..bare }, sealed.to_vec())
                    }
                };
                let index = self.vault.index(&u.phone);
                self.execute(
                    op,
                    "INSERT INTO users (id, phone_index, phone_sealed, nickname, created_at, last_login_at, disabled, session_gen, avatar_url)
                     VALUES ($1, $2, $9, $3, $4, $5, $6, $7, $8)",
                    &[
                        &(u.id as i64),
                        &index.as_str(),
                        &u.nickname,
                        &u.created_at,
                        &u.last_login_at,
                        &u.disabled,
                        &(u.session_gen as i64),
                        &u.avatar_url,
                        &sealed,
                    ],
                )
                .await?;
                self.keep_ids_past(u.id as i64).await
            }
            layout::METHODS => {
                let m: LoginMethod = decode(value)?;
                let user = layout::method_key_user(key)
                    .ok_or_else(|| StoreError::Corrupt("login method key".into()))?;
                if m.method == Method::Sms {
                    return Ok(()); // implied (a schema-1 backup still lists it)
                }
                self.execute(
                    op,
                    "INSERT INTO login_methods (user_id, method, identification, access_code)
                     VALUES ($1, $2, $3, $4)",
                    &[
                        &(user as i64),
                        &method_number(m.method),
                        &stored_identification(&m),
                        &m.access_code,
                    ],
                )
                .await?;
                Ok(())
            }
            layout::CODES => {
                let (phone, purpose) =
                    parse_code_key(key).ok_or_else(|| StoreError::Corrupt("code key".into()))?;
                let c: PendingCode = decode(value)?;
                let index = self.index_of(phone)?;
                crate::store::PendingCodes::put_code(self, &index, purpose, c).await
            }
            layout::REVOKED => {
                let jti = String::from_utf8_lossy(key).into_owned();
                crate::store::Sessions::revoke(self, &jti, read_i64(value)?).await?;
                Ok(())
            }
            layout::COUNTERS => {
                let (counter, window, subject) = parse_counter_key(key)
                    .ok_or_else(|| StoreError::Corrupt("counter key".into()))?;
                self.execute(
                    op,
                    "INSERT INTO counters (kind, win, subject, count) VALUES ($1, $2, $3, $4)",
                    &[
                        &super::limits::counter_number(counter),
                        &window,
                        &self.subject_of(subject)?,
                        &(read_u64(value)? as i64),
                    ],
                )
                .await?;
                Ok(())
            }
            layout::ACTIVITY => {
                let (user_id, at, seq) = layout::parse_activity_key(key)
                    .ok_or_else(|| StoreError::Corrupt("activity key".into()))?;
                let v: ActivityValue = decode(value)?;
                let entry = ActivityEntry {
                    user_id,
                    at,
                    seq,
                    event: v.event,
                    method: v.method,
                    ip: v.ip,
                    user_agent: v.user_agent,
                };
                self.insert_activity(op, &entry).await
            }
            layout::META if key == layout::META_SCHEMA => {
                let found = u32::from_be_bytes(
                    value
                        .try_into()
                        .map_err(|_| StoreError::Corrupt("schema_version".into()))?,
                );
                if found > layout::SCHEMA_VERSION {
                    return Err(StoreError::Schema(format!(
                        "the backup has schema version {found}, this smsauth knows up to {}; use a newer release",
                        layout::SCHEMA_VERSION
                    )));
                }
                Ok(())
            }
            layout::META if key == layout::META_NEXT_ID => {
                self.keep_ids_past(read_u64(value)? as i64 - 1).await
            }
            // The phone index is users.phone_index and the WeChat index the wechat methods;
            // the other meta records are the embedded engine's own bookkeeping. Grants
            // live minutes and are not carried over.
            _ => Ok(()),
        }
    }
}

impl Snapshots for PgStore {
    fn snapshot(&self, sink: &mut RecordSink<'_>) -> Result<()> {
        let trees = self.runtime.block_on(self.read_trees())?;
        let fail = |e: std::io::Error| StoreError::Engine(format!("snapshot: {e}"));
        for (tree, records) in trees {
            for (k, v) in records {
                sink(tree, &k, &v).map_err(fail)?;
            }
        }
        Ok(())
    }

    fn import(&self, tree: &str, key: &[u8], value: &[u8]) -> Result<()> {
        self.runtime.block_on(self.import_record(tree, key, value))
    }
}
