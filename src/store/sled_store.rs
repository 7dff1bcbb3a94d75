//! [`Store`] on sled 0.34. Trees are named `<key>_<value>`:
//!
//! | tree | key | value |
//! | --- | --- | --- |
//! | `meta` | name | `schema_version` u32 BE; `next_user_id`, `users_total`, `first_id_of_run` u64 BE; `closed_cleanly`; `users_checkpoint` codec([`UserCountCheckpoint`]) |
//! | `userid_user` | user id u64 BE | codec([`User`]) |
//! | `phone_userid` | E.164 bytes | user id u64 BE |
//! | `useridmethod_login` | user id u64 BE, method byte | codec([`LoginMethod`]) |
//! | `phonepurpose_code` | E.164 bytes, 0xff, purpose byte | codec([`PendingCode`]) |
//! | `jti_exp` | token id bytes | expiry unix secs i64 BE |
//! | `counter_count` | counter byte, window i64 BE, subject bytes | count u64 BE |
//!
//! No sled transaction or batch is ever used. The first one switches sled 0.34 into a
//! mode where every operation takes a process-wide lock that transactions take
//! exclusively and a flush holds while it waits for the disk, so one registration would
//! stall every reader behind every group commit. Multi-key changes are instead ordered so
//! that each prefix of them is harmless, and one write is the commit point: sled recovers
//! a prefix of its log, so after a crash a later write of one thread is never present
//! without the earlier ones.
//!
//! - Creating a user writes the user record and its login methods, then the phone index
//!   entry, which commits it: a user is reachable only through the index. Of two creates
//!   for one phone, a per-phone lock lets one in.
//! - User ids come from an in-memory counter, set at open past the highest stored id and
//!   past `next_user_id`, which a deletion records so ids are never given out again
//!   (sled's own `generate_id` jumps by two million at every reopen).
//! - A crash can leave records of a create without its index entry (orphans). Only ids
//!   handed out since the last open can be one, so an open after a crash checks those
//!   (`first_id_of_run` onwards) and removes the orphans.
//! - The user count lives in memory; it is stored with `closed_cleanly` when the store
//!   closes. A checkpoint of it (`users_checkpoint`) is stored at open and by
//!   [`Store::checkpoint`] every minute, with the ids deleted since, each listed before
//!   its deletion's commit point. An open that finds no `closed_cleanly` takes the
//!   checkpoint, takes off the listed deletions that committed and adds the users made
//!   since (ids from the checkpoint's `next_id` on, reachable through the index). Only
//!   with no checkpoint does it count the phone index: with 1,000,000 users that count
//!   took a start from 0.6 s and 109 MiB to 1.3 s and 285 MiB.
//!
//! sled has no snapshot across trees, so writes pass a gate: every write method holds a
//! read guard of `gate` while it changes trees, and [`Store::snapshot`] holds the write
//! guard while it reads them. Writers never wait for each other (a read guard is one
//! atomic operation when no snapshot runs); a snapshot waits for changes in flight and
//! then sees none start until it is done.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock, RwLockReadGuard};

use super::codec::{decode, encode, read_i64, read_u64, u64_key};
use super::group_commit::GroupCommit;
use super::user_cache::UserCache;
use super::{BoxFuture, NewUser, RecordSink, Store, StoreError};
use crate::model::{Counter, LoginMethod, Method, PendingCode, Purpose, User, UserId};
use crate::sharded::KeyLocks;

/// 1: the first layout. 2: `sms` login methods are implied, no longer stored. 3: a
/// deletion is listed in the user-count checkpoint before it commits; a release that
/// does not know this would delete without listing, and a start after a crash would then
/// count wrong, so a version 2 release must refuse the store (it refuses newer ones).
const SCHEMA_VERSION: u32 = 3;
const META_SCHEMA: &[u8] = b"schema_version";
const META_NEXT_ID: &[u8] = b"next_user_id";
const META_USERS: &[u8] = b"users_total";
const META_FIRST_ID_OF_RUN: &[u8] = b"first_id_of_run";
const META_CLOSED_CLEANLY: &[u8] = b"closed_cleanly";
const META_USERS_CHECKPOINT: &[u8] = b"users_checkpoint";
/// Locks for creating and deleting users, picked by phone.
const PHONE_LOCKS: usize = 64;
/// What an open after a crash starts its user count from (see the module doc).
#[derive(serde::Serialize, serde::Deserialize)]
struct UserCountCheckpoint {
    total: u64,
    next_id: UserId,
    /// Ids below `next_id` whose deletion started after the checkpoint.
    deleted: Vec<UserId>,
}

/// sled's own unnamed tree, which we never use.
const DEFAULT_TREE: &str = "__sled__default";

pub struct SledStore {
    db: sled::Db,
    meta: sled::Tree,
    users: sled::Tree,
    phones: sled::Tree,
    methods: sled::Tree,
    codes: sled::Tree,
    revoked: sled::Tree,
    counters: sled::Tree,
    commit: Arc<GroupCommit>,
    /// Read-held by every write, write-held by a snapshot (see the module doc).
    gate: RwLock<()>,
    next_id: AtomicU64,
    users_total: AtomicU64,
    /// `next_id` of the stored checkpoint: deletions of ids below it are listed in it.
    checkpoint_next_id: AtomicU64,
    /// Serialize the creation and deletion of one phone's user.
    phone_locks: KeyLocks,
    /// Users recently read; every write to the users tree forgets its user after writing.
    cached: UserCache,
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Engine(e.to_string())
    }
}

impl SledStore {
    pub fn open(dir: &Path, cache_capacity_mb: u64) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir.join("db"))
            .cache_capacity(cache_capacity_mb * 1024 * 1024)
            .open()
            .map_err(|e| match e {
                sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock => {
                    StoreError::Locked(dir.display().to_string())
                }
                other if other.to_string().contains("lock") => {
                    StoreError::Locked(dir.display().to_string())
                }
                other => other.into(),
            })?;
        // sled 0.34 keeps its log and pages in one file, `<path>/db`.
        let log_path = dir.join("db").join("db");
        let log_file = std::fs::File::open(&log_path)
            .map_err(|e| StoreError::Engine(format!("cannot open {}: {e}", log_path.display())))?;
        let store = SledStore {
            meta: db.open_tree("meta")?,
            users: db.open_tree("userid_user")?,
            phones: db.open_tree("phone_userid")?,
            methods: db.open_tree("useridmethod_login")?,
            codes: db.open_tree("phonepurpose_code")?,
            revoked: db.open_tree("jti_exp")?,
            counters: db.open_tree("counter_count")?,
            commit: GroupCommit::new(db.clone(), log_file),
            db,
            gate: RwLock::new(()),
            next_id: AtomicU64::new(1),
            users_total: AtomicU64::new(0),
            checkpoint_next_id: AtomicU64::new(1),
            phone_locks: KeyLocks::new(PHONE_LOCKS),
            cached: UserCache::new(),
        };
        store.migrate()?;
        store.recover()?;
        Ok(store)
    }

    /// [`SledStore::open`] for a store this process has just closed: sled lets go of its
    /// file lock only when its last background task is done, a moment after the close,
    /// so a lock held meanwhile is waited for (up to two seconds) instead of refused.
    pub fn reopen(dir: &Path, cache_capacity_mb: u64) -> Result<Self, StoreError> {
        retry_while_locked(
            || Self::open(dir, cache_capacity_mb),
            |e| matches!(e, StoreError::Locked(_)),
        )
    }

    fn meta_u64(&self, key: &[u8]) -> Result<Option<u64>, StoreError> {
        self.meta.get(key)?.map(|v| read_u64(&v)).transpose()
    }

    /// Sets the id counter and the user count; after a crash, first removes the orphans
    /// of creates that did not reach their commit point (see the module doc).
    fn recover(&self) -> Result<(), StoreError> {
        let closed_cleanly = self.meta.get(META_CLOSED_CLEANLY)?.is_some();
        if !closed_cleanly && let Some(first) = self.meta_u64(META_FIRST_ID_OF_RUN)? {
            for kv in self.users.range(u64_key(first)..) {
                let (k, v) = kv?;
                let user: User = decode(&v)?;
                if !self.is_indexed(&user)? {
                    for method in STORED_METHODS {
                        self.methods.remove(method_key(user.id, method))?;
                    }
                    self.users.remove(&k)?;
                }
            }
        }
        let highest = match self.users.last()? {
            Some((k, _)) => read_u64(&k)?,
            None => 0,
        };
        let next = (highest + 1).max(self.meta_u64(META_NEXT_ID)?.unwrap_or(1));
        self.next_id.store(next, Ordering::SeqCst);
        let total = match self.meta_u64(META_USERS)? {
            Some(n) if closed_cleanly => n,
            _ => match self.meta.get(META_USERS_CHECKPOINT)? {
                Some(v) => self.count_from(&decode(&v)?)?,
                None => self.phones.len() as u64,
            },
        };
        self.users_total.store(total, Ordering::SeqCst);
        self.meta.insert(META_USERS, &u64_key(total))?;
        self.store_checkpoint(total, next)?;
        // Until the next clean close, the stored count is stale and ids from `next` on may
        // have orphans. sled keeps order, so this is durable before any later write is.
        self.meta.insert(META_FIRST_ID_OF_RUN, &u64_key(next))?;
        self.meta.remove(META_CLOSED_CLEANLY)?;
        Ok(())
    }

    /// The user count after a crash, from `cp` (see the module doc).
    fn count_from(&self, cp: &UserCountCheckpoint) -> Result<u64, StoreError> {
        let mut total = cp.total;
        for &id in &cp.deleted {
            // Listed before its commit point: the deletion happened unless the user is
            // still reachable through the index.
            let live = match self.users.get(u64_key(id))? {
                Some(v) => self.is_indexed(&decode(&v)?)?,
                None => false,
            };
            if !live {
                total = total.saturating_sub(1);
            }
        }
        for kv in self.users.range(u64_key(cp.next_id)..) {
            if self.is_indexed(&decode(&kv?.1)?)? {
                total += 1;
            }
        }
        Ok(total)
    }

    /// Whether the phone index leads to this user: a user is reachable, and counted, only
    /// through it (the commit point of a create, and of a deletion).
    fn is_indexed(&self, user: &User) -> Result<bool, StoreError> {
        Ok(self.phones.get(user.phone.as_bytes())?.as_deref() == Some(&u64_key(user.id)[..]))
    }

    /// Stores a checkpoint of the user count with an empty list of deletions. The
    /// caller holds off writers (at open, or under the exclusive gate).
    fn store_checkpoint(&self, total: u64, next_id: UserId) -> Result<(), StoreError> {
        let cp = UserCountCheckpoint {
            total,
            next_id,
            deleted: Vec::new(),
        };
        self.meta.insert(META_USERS_CHECKPOINT, encode(&cp))?;
        self.checkpoint_next_id.store(next_id, Ordering::SeqCst);
        Ok(())
    }

    /// Lists `id` in the checkpoint as being deleted, if the checkpoint counts it.
    fn list_deletion(&self, id: UserId) -> Result<(), StoreError> {
        if id >= self.checkpoint_next_id.load(Ordering::SeqCst) {
            return Ok(()); // made after the checkpoint: found by the scan, or not
        }
        let mut failure = None;
        self.meta.update_and_fetch(META_USERS_CHECKPOINT, |old| {
            let old = old?;
            match decode::<UserCountCheckpoint>(old) {
                Ok(mut cp) => {
                    // Two racing deletions of one user both get here; one commits.
                    if !cp.deleted.contains(&id) {
                        cp.deleted.push(id);
                    }
                    Some(encode(&cp))
                }
                Err(e) => {
                    failure = Some(e);
                    Some(old.to_vec())
                }
            }
        })?;
        failure.map_or(Ok(()), Err)
    }

    /// Numbered migrations run at open, each from one version to the next; a newer
    /// store is refused.
    fn migrate(&self) -> Result<(), StoreError> {
        let found = match self.meta.get(META_SCHEMA)? {
            None => 0,
            Some(v) => u32::from_be_bytes(
                v.as_ref()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("schema_version".into()))?,
            ),
        };
        if found > SCHEMA_VERSION {
            return Err(StoreError::Corrupt(format!(
                "the data dir has schema version {found}, this smsauth knows up to {SCHEMA_VERSION}; use a newer release"
            )));
        }
        if found == SCHEMA_VERSION {
            return Ok(());
        }
        if found == 1 {
            // Version 2 implies the `sms` method from the user record: drop the stored
            // ones (a third of the keys of a store of code-login users).
            let mut dropped = 0u64;
            for key in self.methods.iter().keys() {
                let key = key?;
                if key.last() == Some(&method_byte(Method::Sms)) {
                    self.methods.remove(key)?;
                    dropped += 1;
                }
            }
            tracing::info!(
                dropped,
                "store migrated to schema 2: sms login methods are implied"
            );
        }
        // 2 to 3 changes no record: the checkpoint is stored at every open (`recover`).
        self.meta
            .insert(META_SCHEMA, &SCHEMA_VERSION.to_be_bytes())?;
        self.flush_blocking()
    }

    /// Makes every write durable, from a plain thread (no async runtime needed): for
    /// tools such as restore that run outside the server.
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.commit.flush_blocking()
    }

    /// Held for the whole of one write (see the module doc). A panic elsewhere cannot
    /// leave the unit value inconsistent, so a poisoned gate is still a good gate.
    fn write_gate(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// [`Store::update_user`] for a caller that holds the write gate already.
    fn change_user(
        &self,
        id: UserId,
        change: &mut dyn FnMut(&mut User),
    ) -> Result<Option<User>, StoreError> {
        let mut failure = None;
        let updated = self.users.update_and_fetch(u64_key(id), |old| {
            let old = old?;
            match decode::<User>(old) {
                Ok(mut user) => {
                    change(&mut user);
                    Some(encode(&user))
                }
                Err(e) => {
                    failure = Some(e);
                    Some(old.to_vec())
                }
            }
        })?;
        self.cached.forget(id);
        if let Some(e) = failure {
            return Err(e);
        }
        self.wrote();
        updated.map(|v| decode(&v)).transpose()
    }

    fn wrote(&self) {
        self.commit.wrote();
    }
}

/// Calls `open` again while it fails with a lock this process is letting go of (see
/// [`SledStore::reopen`]), for up to two seconds.
fn retry_while_locked<T, E>(
    mut open: impl FnMut() -> Result<T, E>,
    locked: impl Fn(&E) -> bool,
) -> Result<T, E> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match open() {
            Err(e) if locked(&e) && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

/// Login methods with a stored record, in key order (`sms` is implied, never stored).
const STORED_METHODS: [Method; 1] = [Method::Password];

fn method_byte(method: Method) -> u8 {
    match method {
        Method::Sms => 1,
        Method::Password => 2,
    }
}

fn method_key(id: UserId, method: Method) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[..8].copy_from_slice(&u64_key(id));
    k[8] = method_byte(method);
    k
}

fn purpose_byte(p: Purpose) -> u8 {
    match p {
        Purpose::Login => 1,
        Purpose::Register => 2,
        Purpose::ResetPassword => 3,
    }
}

fn code_key(phone: &str, purpose: Purpose) -> Vec<u8> {
    let mut k = Vec::with_capacity(phone.len() + 2);
    k.extend_from_slice(phone.as_bytes());
    k.push(0xff);
    k.push(purpose_byte(purpose));
    k
}

fn parse_code_key(k: &[u8]) -> Option<(String, Purpose)> {
    let (&p, rest) = k.split_last()?;
    let (&sep, phone) = rest.split_last()?;
    if sep != 0xff {
        return None;
    }
    let purpose = Purpose::ALL.into_iter().find(|x| purpose_byte(*x) == p)?;
    Some((String::from_utf8(phone.to_vec()).ok()?, purpose))
}

fn counter_byte(c: Counter) -> u8 {
    match c {
        Counter::PhoneSendsPerDay => 1,
        Counter::SendsPerDay => 2,
        Counter::PhoneFailuresPerHour => 3,
    }
}

fn counter_key(counter: Counter, window: i64, subject: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + subject.len());
    k.push(counter_byte(counter));
    k.extend_from_slice(&window.to_be_bytes());
    k.extend_from_slice(subject.as_bytes());
    k
}

impl Store for SledStore {
    fn user(&self, id: UserId) -> Result<Option<User>, StoreError> {
        let miss = match self.cached.get(id) {
            Ok(user) => return Ok(Some(user)),
            Err(miss) => miss,
        };
        let user: Option<User> = self
            .users
            .get(u64_key(id))?
            .map(|v| decode(&v))
            .transpose()?;
        if let Some(user) = &user {
            self.cached.fill(user, miss);
        }
        Ok(user)
    }

    fn user_by_phone(&self, phone: &str) -> Result<Option<User>, StoreError> {
        match self.phones.get(phone.as_bytes())? {
            Some(id) => self.user(read_u64(&id)?),
            None => Ok(None),
        }
    }

    fn has_user(&self, phone: &str) -> Result<bool, StoreError> {
        Ok(self.phones.contains_key(phone.as_bytes())?)
    }

    fn create_user_if_absent(
        &self,
        new: NewUser<'_>,
        methods: &[LoginMethod],
    ) -> Result<(User, bool), StoreError> {
        // Most calls are logins of existing users: two plain reads, no lock.
        if let Some(user) = self.user_by_phone(new.phone)? {
            return Ok((user, false));
        }
        let _gate = self.write_gate();
        let _phone = self.phone_locks.lock(new.phone);
        if let Some(user) = self.user_by_phone(new.phone)? {
            return Ok((user, false));
        }
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let user = User {
            id,
            phone: new.phone.to_owned(),
            nickname: new.nickname,
            created_at: new.created_at,
            last_login_at: new.last_login_at,
            disabled: false,
            session_gen: 0,
        };
        self.users.insert(u64_key(id), encode(&user))?;
        for m in methods.iter().filter(|m| m.method != Method::Sms) {
            self.methods.insert(method_key(id, m.method), encode(m))?;
        }
        // The commit point (see the module doc).
        self.phones.insert(new.phone.as_bytes(), &u64_key(id))?;
        self.users_total.fetch_add(1, Ordering::SeqCst);
        self.wrote();
        Ok((user, true))
    }

    fn update_user(
        &self,
        id: UserId,
        change: &mut dyn FnMut(&mut User),
    ) -> Result<Option<User>, StoreError> {
        let _gate = self.write_gate();
        self.change_user(id, change)
    }

    fn login_methods(&self, user: &User) -> Result<Vec<LoginMethod>, StoreError> {
        let mut found = vec![LoginMethod {
            method: Method::Sms,
            identification: user.phone.clone(),
            access_code: None,
        }];
        // Point reads of the few possible keys: in sled a prefix scan costs several times
        // a get, and GET /me reads this on every call.
        for method in STORED_METHODS {
            if let Some(v) = self.methods.get(method_key(user.id, method))? {
                found.push(decode(&v)?);
            }
        }
        Ok(found)
    }

    fn put_login_method(&self, id: UserId, method: &LoginMethod) -> Result<(), StoreError> {
        if method.method == Method::Sms {
            return Ok(()); // implied
        }
        let _gate = self.write_gate();
        self.methods
            .insert(method_key(id, method.method), encode(method))?;
        self.wrote();
        Ok(())
    }

    fn put_login_method_ending_sessions(
        &self,
        id: UserId,
        method: &LoginMethod,
    ) -> Result<Option<User>, StoreError> {
        let _gate = self.write_gate();
        // Sessions end first: a crash between the two writes leaves the old password with
        // its sessions ended (the caller got no answer and tries again), never the new
        // password with the old sessions still working.
        let Some(user) = self.change_user(id, &mut |u| {
            u.session_gen = u.session_gen.wrapping_add(1);
        })?
        else {
            return Ok(None);
        };
        self.methods
            .insert(method_key(id, method.method), encode(method))?;
        self.wrote();
        Ok(Some(user))
    }

    fn user_count(&self) -> Result<u64, StoreError> {
        Ok(self.users_total.load(Ordering::SeqCst))
    }

    fn checkpoint(&self) -> Result<(), StoreError> {
        // Exclusive: no create or delete is half done, so the count and the next id agree.
        let _all_writes_wait = self.gate.write().unwrap_or_else(PoisonError::into_inner);
        let total = self.users_total.load(Ordering::SeqCst);
        self.store_checkpoint(total, self.next_id.load(Ordering::SeqCst))?;
        self.wrote();
        Ok(())
    }
    fn save_code(
        &self,
        phone: &str,
        purpose: Purpose,
        code: &PendingCode,
    ) -> Result<bool, StoreError> {
        let _gate = self.write_gate();
        let old = self.codes.insert(code_key(phone, purpose), encode(code))?;
        self.wrote();
        Ok(old.is_none())
    }

    fn load_code(&self, phone: &str, purpose: Purpose) -> Result<Option<PendingCode>, StoreError> {
        self.codes
            .get(code_key(phone, purpose))?
            .map(|v| decode(&v))
            .transpose()
    }

    fn delete_code(&self, phone: &str, purpose: Purpose) -> Result<bool, StoreError> {
        let _gate = self.write_gate();
        let old = self.codes.remove(code_key(phone, purpose))?;
        if old.is_some() {
            self.wrote();
        }
        Ok(old.is_some())
    }

    fn sweep_codes(
        &self,
        now: i64,
        each_live: &mut dyn FnMut(&str, &PendingCode),
    ) -> Result<u64, StoreError> {
        let mut live = 0;
        let mut swept = false;
        for kv in self.codes.iter() {
            let (k, v) = kv?;
            let code: PendingCode = decode(&v)?;
            if code.expires_at <= now {
                let _gate = self.write_gate();
                // Only if unchanged: a new code for the phone may have replaced it meanwhile.
                swept |= self
                    .codes
                    .compare_and_swap(&k, Some(v), None as Option<&[u8]>)?
                    .is_ok();
            } else if let Some((phone, _)) = parse_code_key(&k) {
                each_live(&phone, &code);
                live += 1;
            }
        }
        if swept {
            self.wrote();
        }
        Ok(live)
    }

    fn pending_codes(&self) -> Result<Vec<(String, Purpose, PendingCode)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.codes.iter() {
            let (k, v) = kv?;
            let (phone, purpose) =
                parse_code_key(&k).ok_or_else(|| StoreError::Corrupt("pending code key".into()))?;
            out.push((phone, purpose, decode(&v)?));
        }
        Ok(out)
    }

    fn revoke(&self, jti: &str, exp: i64) -> Result<bool, StoreError> {
        let _gate = self.write_gate();
        let fresh = self
            .revoked
            .compare_and_swap(
                jti.as_bytes(),
                None as Option<&[u8]>,
                Some(&exp.to_be_bytes()),
            )?
            .is_ok();
        if fresh {
            self.wrote();
        }
        Ok(fresh)
    }

    fn revocations(&self) -> Result<Vec<(String, i64)>, StoreError> {
        self.revoked
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                Ok((String::from_utf8_lossy(&k).into_owned(), read_i64(&v)?))
            })
            .collect()
    }

    fn prune_revocations(&self, now: i64) -> Result<usize, StoreError> {
        let _gate = self.write_gate();
        let mut pruned = 0;
        for kv in self.revoked.iter() {
            let (k, v) = kv?;
            if read_i64(&v)? < now {
                self.revoked.remove(k)?;
                pruned += 1;
            }
        }
        if pruned > 0 {
            self.wrote();
        }
        Ok(pruned)
    }

    fn count_up(
        &self,
        counter: Counter,
        window: i64,
        subject: &str,
        limit: u64,
    ) -> Result<Result<u64, u64>, StoreError> {
        let _gate = self.write_gate();
        let key = counter_key(counter, window, subject);
        let mut outcome = Ok(0);
        self.counters.update_and_fetch(&key, |old| {
            let current = old.and_then(|v| read_u64(v).ok()).unwrap_or(0);
            if limit != 0 && current >= limit {
                outcome = Err(current);
                old.map(|v| v.to_vec())
            } else {
                outcome = Ok(current + 1);
                Some(u64_key(current + 1).to_vec())
            }
        })?;
        if outcome.is_ok() {
            self.wrote();
        }
        Ok(outcome)
    }

    fn count_down(&self, counter: Counter, window: i64, subject: &str) -> Result<(), StoreError> {
        let _gate = self.write_gate();
        let key = counter_key(counter, window, subject);
        self.counters.update_and_fetch(&key, |old| {
            let current = old.and_then(|v| read_u64(v).ok()).unwrap_or(0);
            (current > 1).then(|| u64_key(current - 1).to_vec())
        })?;
        self.wrote();
        Ok(())
    }

    fn users(&self) -> Result<Vec<User>, StoreError> {
        self.users.iter().map(|kv| decode(&kv?.1)).collect()
    }

    fn delete_user(&self, id: UserId) -> Result<Option<User>, StoreError> {
        let _gate = self.write_gate();
        let Some(user) = self.user(id)? else {
            return Ok(None);
        };
        let _phone = self.phone_locks.lock(&user.phone);
        // Recorded first, so the id is never given out again even if it was the highest.
        let next = self.next_id.load(Ordering::SeqCst);
        self.meta.insert(META_NEXT_ID, &u64_key(next))?;
        self.list_deletion(id)?;
        // Removing the index entry is the commit point: from here the user is gone.
        let indexed = self.phones.compare_and_swap(
            user.phone.as_bytes(),
            Some(&u64_key(id)[..]),
            None as Option<&[u8]>,
        )?;
        if indexed.is_ok() {
            self.users_total.fetch_sub(1, Ordering::SeqCst);
        }
        for method in STORED_METHODS {
            self.methods.remove(method_key(id, method))?;
        }
        self.users.remove(u64_key(id))?;
        self.cached.forget(id);
        self.wrote();
        Ok(Some(user))
    }

    fn snapshot(&self, sink: &mut RecordSink<'_>) -> Result<(), StoreError> {
        let _all_writes_wait = self.gate.write().unwrap_or_else(PoisonError::into_inner);
        let mut names: Vec<String> = self
            .db
            .tree_names()
            .iter()
            .filter_map(|n| std::str::from_utf8(n).ok().map(str::to_owned))
            // sled's default tree is not ours; nothing is kept there.
            .filter(|n| n != DEFAULT_TREE)
            .collect();
        names.sort();
        let fail = |e: std::io::Error| StoreError::Engine(format!("snapshot: {e}"));
        for name in names {
            for kv in self.db.open_tree(&name)?.iter() {
                let (k, v) = kv?;
                // The stored count is only brought up to date at close; give the live one.
                if name == "meta" && &k[..] == META_USERS {
                    let live = u64_key(self.users_total.load(Ordering::SeqCst));
                    sink(&name, &k, &live).map_err(fail)?;
                } else {
                    sink(&name, &k, &v).map_err(fail)?;
                }
            }
        }
        Ok(())
    }

    fn import(&self, tree: &str, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let _gate = self.write_gate();
        if tree == DEFAULT_TREE {
            return Err(StoreError::Corrupt(format!("record for tree {tree}")));
        }
        let old = self.db.open_tree(tree)?.insert(key, value)?;
        if tree == "userid_user"
            && let Ok(id) = read_u64(key)
        {
            self.cached.forget(id);
        }
        if tree == "phone_userid" && old.is_none() {
            self.users_total.fetch_add(1, Ordering::SeqCst);
        }
        self.wrote();
        Ok(())
    }

    fn count(&self, counter: Counter, window: i64, subject: &str) -> Result<u64, StoreError> {
        match self.counters.get(counter_key(counter, window, subject))? {
            Some(v) => read_u64(&v),
            None => Ok(0),
        }
    }

    fn set_count(
        &self,
        counter: Counter,
        window: i64,
        subject: &str,
        value: u64,
    ) -> Result<(), StoreError> {
        let _gate = self.write_gate();
        self.counters
            .insert(counter_key(counter, window, subject), &u64_key(value)[..])?;
        self.wrote();
        Ok(())
    }

    fn prune_counters(&self, oldest_kept: &dyn Fn(Counter) -> i64) -> Result<usize, StoreError> {
        let _gate = self.write_gate();
        let mut pruned = 0;
        for counter in Counter::ALL {
            let keep_from = counter_key(counter, oldest_kept(counter), "");
            let start = [counter_byte(counter)];
            for kv in self.counters.range(start.as_slice()..keep_from.as_slice()) {
                self.counters.remove(kv?.0)?;
                pruned += 1;
            }
        }
        if pruned > 0 {
            self.wrote();
        }
        Ok(pruned)
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(Arc::clone(&self.commit).flush())
    }

    fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}

impl Drop for SledStore {
    /// Stores the user count and marks the close as clean, so the next open need not
    /// count. Not reached after a crash; the next open then counts (see the module doc).
    fn drop(&mut self) {
        let close = || -> Result<(), StoreError> {
            let total = self.users_total.load(Ordering::SeqCst);
            self.meta.insert(META_USERS, &u64_key(total))?;
            self.meta.insert(META_CLOSED_CLEANLY, &[1u8][..])?;
            self.flush_blocking()
        };
        if let Err(e) = close() {
            tracing::warn!(error = %e, "could not record a clean close; the next start counts users");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, SledStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path(), 8).unwrap();
        (dir, s)
    }

    /// sled itself on a store just closed (see [`SledStore::reopen`]).
    fn raw_reopen(dir: &std::path::Path) -> sled::Db {
        retry_while_locked(
            || sled::open(dir.join("db")),
            |e| e.to_string().contains("lock"),
        )
        .unwrap()
    }

    /// The two login methods of an account with a password.
    fn sms_and_password(phone: &str) -> (LoginMethod, LoginMethod) {
        let sms = LoginMethod {
            method: Method::Sms,
            identification: phone.into(),
            access_code: None,
        };
        let password = LoginMethod {
            method: Method::Password,
            access_code: Some("$argon2id$x".into()),
            ..sms.clone()
        };
        (sms, password)
    }

    fn new_user(phone: &str) -> NewUser<'_> {
        NewUser {
            phone,
            nickname: "n".into(),
            created_at: 1,
            last_login_at: None,
        }
    }

    #[test]
    fn ids_are_dense_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStore::open(dir.path(), 8).unwrap();
            assert_eq!(
                s.create_user_if_absent(new_user("+861"), &[]).unwrap().0.id,
                1
            );
            s.db.flush().unwrap();
        }
        let s = SledStore::reopen(dir.path(), 8).unwrap();
        assert_eq!(
            s.create_user_if_absent(new_user("+862"), &[]).unwrap().0.id,
            2
        );
        assert_eq!(s.user_count().unwrap(), 2);
    }

    /// What a kill -9 in the middle of a create leaves: a user record without its index
    /// entry, and no clean-close marker. The next open removes it and counts anew.
    #[test]
    fn an_open_after_a_crash_removes_orphans_and_recounts() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStore::open(dir.path(), 8).unwrap();
            s.create_user_if_absent(new_user("+861"), &[]).unwrap();
            let orphan = User {
                id: 2,
                phone: "+862".into(),
                nickname: "n".into(),
                created_at: 1,
                last_login_at: None,
                disabled: false,
                session_gen: 0,
            };
            s.users.insert(u64_key(2), encode(&orphan)).unwrap();
        }
        {
            let raw = raw_reopen(dir.path());
            let meta = raw.open_tree("meta").unwrap();
            meta.remove(META_CLOSED_CLEANLY).unwrap();
            meta.insert(META_USERS, &u64_key(7)).unwrap();
            raw.flush().unwrap();
        }
        let s = SledStore::reopen(dir.path(), 8).unwrap();
        assert_eq!(s.user(2).unwrap(), None, "the orphan is gone");
        assert_eq!(s.user_count().unwrap(), 1, "counted, not the stale 7");
        assert_eq!(s.users().unwrap().len(), 1);
        assert_eq!(
            s.create_user_if_absent(new_user("+863"), &[]).unwrap().0.id,
            2
        );
    }

    /// Marks the store as not closed cleanly and its stored count as stale, as a crash
    /// leaves it.
    fn as_after_a_crash(dir: &std::path::Path) {
        let raw = raw_reopen(dir);
        let meta = raw.open_tree("meta").unwrap();
        meta.remove(META_CLOSED_CLEANLY).unwrap();
        meta.insert(META_USERS, &u64_key(7)).unwrap();
        raw.flush().unwrap();
    }

    /// After a crash the count starts from the checkpoint, takes off the users deleted
    /// since and adds the users made since, without counting the index.
    #[test]
    fn a_start_after_a_crash_counts_from_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStore::open(dir.path(), 8).unwrap();
            for phone in ["+861", "+862", "+863"] {
                s.create_user_if_absent(new_user(phone), &[]).unwrap();
            }
            s.checkpoint().unwrap();
            let (made_since, _) = s.create_user_if_absent(new_user("+864"), &[]).unwrap();
            s.create_user_if_absent(new_user("+865"), &[]).unwrap();
            s.delete_user(1).unwrap().unwrap();
            s.delete_user(made_since.id).unwrap().unwrap();
            assert_eq!(s.user_count().unwrap(), 3);
            // An index entry the checkpoint knows nothing of: counting the index would
            // count it, so the figure below shows where the count came from.
            s.phones.insert(b"+869", &u64_key(99)).unwrap();
        }
        as_after_a_crash(dir.path());
        let s = SledStore::reopen(dir.path(), 8).unwrap();
        assert_eq!(s.user_count().unwrap(), 3, "+862, +863 and +865");
    }

    /// A deletion is listed before its commit point; one a crash cut short is not taken
    /// off, and the next start's checkpoint starts a new list.
    #[test]
    fn a_deletion_cut_short_by_a_crash_is_not_taken_off() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStore::open(dir.path(), 8).unwrap();
            s.create_user_if_absent(new_user("+861"), &[]).unwrap();
            s.create_user_if_absent(new_user("+862"), &[]).unwrap();
            s.checkpoint().unwrap();
            s.list_deletion(2).unwrap(); // what delete_user does first
        }
        as_after_a_crash(dir.path());
        {
            let s = SledStore::reopen(dir.path(), 8).unwrap();
            assert_eq!(s.user_count().unwrap(), 2, "the user is still there");
            s.delete_user(2).unwrap().unwrap();
        }
        as_after_a_crash(dir.path());
        let s = SledStore::reopen(dir.path(), 8).unwrap();
        assert_eq!(s.user_count().unwrap(), 1);
    }

    /// A store of this schema is marked with it at open, and one from a newer release is
    /// refused rather than changed: that is what keeps an older release (schema 2) off a
    /// store whose deletions must be listed.
    #[test]
    fn schema_versions_move_forward_only() {
        let dir = tempfile::tempdir().unwrap();
        {
            let raw = sled::open(dir.path().join("db")).unwrap();
            let meta = raw.open_tree("meta").unwrap();
            meta.insert(META_SCHEMA, &2u32.to_be_bytes()).unwrap();
            raw.flush().unwrap();
        }
        drop(SledStore::reopen(dir.path(), 8).unwrap());
        {
            let raw = raw_reopen(dir.path());
            let meta = raw.open_tree("meta").unwrap();
            let version = meta.get(META_SCHEMA).unwrap().unwrap();
            assert_eq!(&version[..], &SCHEMA_VERSION.to_be_bytes());
            meta.insert(META_SCHEMA, &(SCHEMA_VERSION + 1).to_be_bytes())
                .unwrap();
            raw.flush().unwrap();
        }
        let refused = retry_while_locked(
            || SledStore::open(dir.path(), 8),
            |e| matches!(e, StoreError::Locked(_)),
        );
        assert!(
            matches!(&refused, Err(StoreError::Corrupt(m)) if m.contains("use a newer release")),
            "a newer store opened: {:?}",
            refused.err()
        );
    }

    /// A version 1 store kept an `sms` method record per user; opening it drops them
    /// and the method is still there, implied.
    #[test]
    fn schema_1_stores_lose_their_sms_method_records() {
        let dir = tempfile::tempdir().unwrap();
        let user = User {
            id: 1,
            phone: "+861".into(),
            nickname: "n".into(),
            created_at: 1,
            last_login_at: None,
            disabled: false,
            session_gen: 0,
        };
        let (sms, password) = sms_and_password("+861");
        {
            let raw = sled::open(dir.path().join("db")).unwrap();
            let tree = |name: &str| raw.open_tree(name).unwrap();
            tree("meta")
                .insert(META_SCHEMA, &1u32.to_be_bytes())
                .unwrap();
            tree("userid_user")
                .insert(u64_key(1), encode(&user))
                .unwrap();
            tree("phone_userid").insert("+861", &u64_key(1)).unwrap();
            let methods = tree("useridmethod_login");
            methods
                .insert(method_key(1, Method::Sms), encode(&sms))
                .unwrap();
            methods
                .insert(method_key(1, Method::Password), encode(&password))
                .unwrap();
            raw.flush().unwrap();
        }
        let s = SledStore::reopen(dir.path(), 8).unwrap();
        assert_eq!(s.methods.len(), 1, "only the password record is left");
        assert_eq!(s.login_methods(&user).unwrap(), vec![sms, password]);
        assert_eq!(s.user_count().unwrap(), 1);
    }

    #[test]
    fn concurrent_creates_make_one_user() {
        let (_dir, s) = store();
        let s = std::sync::Arc::new(s);
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || s.create_user_if_absent(new_user("+86x"), &[]).unwrap())
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(results.iter().filter(|(_, created)| *created).count(), 1);
        assert!(results.iter().all(|(u, _)| u.id == results[0].0.id));
        assert_eq!(s.user_count().unwrap(), 1);
    }

    #[test]
    fn code_keys_round_trip_and_the_sweep_takes_only_expired_codes() {
        let (_dir, s) = store();
        let expired = PendingCode {
            hash: [1; 32],
            sent_at: 1,
            expires_at: 2,
            attempts: 0,
        };
        let live = PendingCode {
            expires_at: 100,
            ..expired.clone()
        };
        assert!(
            s.save_code("+8613800000001", Purpose::Login, &expired)
                .unwrap()
        );
        assert!(
            s.save_code("+8613800000000", Purpose::ResetPassword, &expired)
                .unwrap()
        );
        assert!(
            !s.save_code("+8613800000000", Purpose::ResetPassword, &live)
                .unwrap()
        );
        let mut seen = Vec::new();
        let left = s
            .sweep_codes(50, &mut |phone, code| {
                seen.push((phone.to_owned(), code.clone()))
            })
            .unwrap();
        assert_eq!(left, 1);
        assert_eq!(seen, vec![("+8613800000000".to_string(), live.clone())]);
        assert_eq!(
            s.pending_codes().unwrap(),
            vec![("+8613800000000".to_string(), Purpose::ResetPassword, live)]
        );
        assert!(
            s.delete_code("+8613800000000", Purpose::ResetPassword)
                .unwrap()
        );
        assert!(
            !s.delete_code("+8613800000000", Purpose::ResetPassword)
                .unwrap()
        );
        assert!(s.pending_codes().unwrap().is_empty());
    }

    #[test]
    fn counters_stop_at_the_limit_and_old_windows_go() {
        let (_dir, s) = store();
        let c = Counter::PhoneSendsPerDay;
        assert_eq!(s.count_up(c, 5, "+861", 2).unwrap(), Ok(1));
        assert_eq!(s.count_up(c, 5, "+861", 2).unwrap(), Ok(2));
        assert_eq!(s.count_up(c, 5, "+861", 2).unwrap(), Err(2));
        s.count_down(c, 5, "+861").unwrap();
        assert_eq!(s.count(c, 5, "+861").unwrap(), 1);
        assert_eq!(
            s.count_up(c, 6, "+861", 2).unwrap(),
            Ok(1),
            "a new window starts at zero"
        );
        assert_eq!(
            s.count_up(Counter::SendsPerDay, 5, "", 0).unwrap(),
            Ok(1),
            "0 = no limit"
        );
        assert_eq!(s.prune_counters(&|_| 6).unwrap(), 2);
        assert_eq!(s.count(c, 5, "+861").unwrap(), 0);
        assert_eq!(s.count(c, 6, "+861").unwrap(), 1);
    }

    #[test]
    fn delete_user_removes_record_index_methods_and_counts_it_out() {
        let (_dir, s) = store();
        let (sms, password) = sms_and_password("+861");
        let (a, _) = s
            .create_user_if_absent(new_user("+861"), &[sms.clone(), password.clone()])
            .unwrap();
        let (b, _) = s
            .create_user_if_absent(new_user("+862"), std::slice::from_ref(&sms))
            .unwrap();
        assert_eq!(s.login_methods(&a).unwrap(), vec![sms.clone(), password]);
        assert_eq!(s.delete_user(a.id).unwrap(), Some(a.clone()));
        assert_eq!(s.delete_user(a.id).unwrap(), None);
        assert_eq!(s.user(a.id).unwrap(), None);
        assert_eq!(s.user_by_phone("+861").unwrap(), None);
        assert!(!s.has_user("+861").unwrap() && s.has_user("+862").unwrap());
        assert_eq!(s.methods.scan_prefix(u64_key(a.id)).count(), 0);
        let sms_b = LoginMethod {
            identification: "+862".into(),
            ..sms
        };
        assert_eq!(s.login_methods(&b).unwrap(), vec![sms_b]);
        assert_eq!(s.user_count().unwrap(), 1);
        assert_eq!(s.users().unwrap(), vec![b]);
        // The id is not given out again.
        let (c, _) = s.create_user_if_absent(new_user("+861"), &[]).unwrap();
        assert_eq!(c.id, 3);
    }

    /// While users are being created on other threads, every snapshot shows each user
    /// with its phone index entry and login method and a users_total that counts them:
    /// never half of a create.
    #[test]
    fn snapshots_never_see_half_a_change() {
        use std::collections::HashMap;
        type Pair = (Vec<u8>, Vec<u8>);
        let (_dir, s) = store();
        let s = std::sync::Arc::new(s);
        let writers: Vec<_> = (0..4)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for i in 0..300 {
                        let phone = format!("+86{t}{i:05}");
                        let m = LoginMethod {
                            method: Method::Password,
                            identification: phone.clone(),
                            access_code: Some("$argon2id$x".into()),
                        };
                        s.create_user_if_absent(new_user(&phone), &[m]).unwrap();
                    }
                })
            })
            .collect();
        let mut snapshots = 0;
        while snapshots < 3 || writers.iter().any(|w| !w.is_finished()) {
            let mut trees: HashMap<String, Vec<Pair>> = HashMap::new();
            s.snapshot(&mut |t, k, v| {
                trees
                    .entry(t.to_owned())
                    .or_default()
                    .push((k.to_vec(), v.to_vec()));
                Ok(())
            })
            .unwrap();
            let count = |t: &str| trees.get(t).map_or(0, Vec::len) as u64;
            let total = trees
                .get("meta")
                .and_then(|m| m.iter().find(|(k, _)| k == META_USERS))
                .map_or(0, |(_, v)| read_u64(v).unwrap());
            assert_eq!(count("userid_user"), total);
            assert_eq!(count("phone_userid"), total);
            assert_eq!(count("useridmethod_login"), total);
            snapshots += 1;
        }
        for w in writers {
            w.join().unwrap();
        }
        assert_eq!(s.user_count().unwrap(), 1200);
    }

    #[test]
    fn revoke_is_first_wins() {
        let (_dir, s) = store();
        assert!(s.revoke("a", 10).unwrap());
        assert!(!s.revoke("a", 10).unwrap());
        assert_eq!(s.prune_revocations(11).unwrap(), 1);
        assert!(s.revocations().unwrap().is_empty());
    }
}
