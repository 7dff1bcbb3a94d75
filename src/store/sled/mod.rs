//! The embedded engine: every part of [`super::Store`] that must persist, on sled 0.34
//! (what need not persist is in [`super::memory`]). Trees are named `<key>_<value>`;
//! their layout, which is also a backup's, is in [`super::layout`].
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
//!   [`super::Engine::maintain`] every minute, with the ids deleted since, each listed before
//!   its deletion's commit point. An open that finds no `closed_cleanly` takes the
//!   checkpoint, takes off the listed deletions that committed and adds the users made
//!   since (ids from the checkpoint's `next_id` on, reachable through the index). Only
//!   with no checkpoint does it count the phone index: with 1,000,000 users that count
//!   took a start from 0.6 s and 109 MiB to 1.3 s and 285 MiB.
//!
//! sled has no snapshot across trees, so writes pass a gate: every write method holds a
//! read guard of `gate` while it changes trees, and [`super::Snapshots::snapshot`] holds the write
//! guard while it reads them. Writers never wait for each other (a read guard is one
//! atomic operation when no snapshot runs); a snapshot waits for changes in flight and
//! then sees none start until it is done.
//!
//! The work of each call is done in the call: the futures it returns are ready. Reads and
//! writes take microseconds; only the scans of the clean-up and of a snapshot take long,
//! and those run where the runtime allows blocking ([`blocking`]).

mod activity;
mod codes;
mod counters;
mod grants;
mod group_commit;
mod privacy;
mod rotation;
mod sessions;
#[cfg(test)]
mod tests;
mod user_cache;
mod users;
mod wechat;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock, RwLockReadGuard};

use self::codes::CodeCache;
use self::counters::DailyBudget;
use self::group_commit::GroupCommit;
use self::user_cache::UserCache;
use super::codec::{
    decode, decode_sealed_user, decode_user, encode, encode_sealed_user, read_u64, u64_key,
};
use super::layout::{self, STORED_METHODS, method_byte, method_key};
use super::{BoxFuture, Engine, Keys, RecordSink, Snapshots, StoreError, UserChange, ready};
use crate::config::MemoryConfig;
use crate::model::{Method, User, UserId};
use crate::privacy::PhoneVault;
use crate::sharded::KeyLocks;

/// 1: the first layout. 2: `sms` login methods are implied, no longer stored. 3: a
/// deletion is listed in the user-count checkpoint before it commits; a release that
/// does not know this would delete without listing, and a start after a crash would then
/// count wrong, so a version 2 release must refuse the store (it refuses newer ones).
/// 4: user records of format 2 (with `avatar_url`), WeChat login methods and their
/// index, and grants; a version 3 release could not read those users. 5: no phone in
/// the clear (user records of format 3, everything else keyed by the blind index), login
/// activity (`useridtimeseq_activity`) and `delete_account` codes; a version 4 release
/// would find no user. 6: blind indexes of 16 bytes (22 characters, from 43), and a
/// phone key rotation's state; a version 5 release would find no user.
use super::layout::{META_NEXT_ID, META_SCHEMA, META_USERS, SCHEMA_VERSION};
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
    /// The data dir: sled's files are in `db/`, the key files beside it.
    dir: PathBuf,
    /// Seals the phone of every user record and indexes every phone ([`crate::privacy`]).
    vault: Arc<PhoneVault>,
    db: sled::Db,
    meta: sled::Tree,
    users: sled::Tree,
    phones: sled::Tree,
    methods: sled::Tree,
    /// WeChat id -> user id; an entry counts only while the user's `wechat` method names
    /// that id (see [`wechat`]).
    wechats: sled::Tree,
    grants: sled::Tree,
    codes: sled::Tree,
    revoked: sled::Tree,
    counters: sled::Tree,
    /// Login sessions by (user id, session id), and refresh tokens by digest.
    sessions: sled::Tree,
    refresh: sled::Tree,
    /// Login activity by (user id, time, seq).
    activity: sled::Tree,
    /// Serializes every use of a refresh token: a read of its record and the writes
    /// that use it up are one step (see [`sessions`]).
    refresh_lock: std::sync::Mutex<()>,
    commit: Arc<GroupCommit>,
    /// Read-held by every write, write-held by a snapshot (see the module doc).
    gate: RwLock<()>,
    next_id: AtomicU64,
    users_total: AtomicU64,
    /// `next_id` of the stored checkpoint: deletions of ids below it are listed in it.
    checkpoint_next_id: AtomicU64,
    /// Serialize the creation and deletion of one phone's user.
    phone_locks: KeyLocks,
    /// Serializes every change of a WeChat binding (rare: a login's first scan), so a
    /// WeChat id and an account are checked and bound as one step. Taken before a phone
    /// lock, never after.
    wechat_binds: std::sync::Mutex<()>,
    /// Users recently read; every write to the users tree forgets its user after writing.
    cached: UserCache,
    /// jti -> exp of revoked tokens, mirrored from `revoked` for the per-request check.
    /// Each change is one map operation, so a lock poisoned by a panic elsewhere still
    /// holds a whole map and is used as it is.
    revoked_ids: RwLock<HashMap<String, i64>>,
    /// Pending codes in memory in front of `codes`, and the locks of their changes.
    pending: CodeCache,
    /// The service's sends of the day, counted ahead of `counters`.
    budget: DailyBudget,
    /// Serializes replacements of key files (one process owns the data dir, so this is
    /// every writer of them).
    key_files: std::sync::Mutex<()>,
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Engine(e.to_string())
    }
}

impl SledStore {
    /// The store in `dir`, its caches at their default sizes, its phone key in
    /// `dir/phone.key`.
    pub fn open(dir: &Path, cache_capacity_mb: u64) -> Result<Self, StoreError> {
        Self::open_sized(dir, cache_capacity_mb, &MemoryConfig::default())
    }

    /// The store in `dir`, its caches sized by `memory`, its phone key in `dir/phone.key`.
    pub fn open_sized(
        dir: &Path,
        cache_capacity_mb: u64,
        memory: &MemoryConfig,
    ) -> Result<Self, StoreError> {
        Self::open_keyed(dir, cache_capacity_mb, memory, None)
    }

    /// The store in `dir`, its caches sized by `memory`, its phone key read from
    /// `phone_key_file` (or `dir/phone.key`, made if the store has none yet).
    pub fn open_keyed(
        dir: &Path,
        cache_capacity_mb: u64,
        memory: &MemoryConfig,
        phone_key_file: Option<&Path>,
    ) -> Result<Self, StoreError> {
        privacy::finish_compaction(dir)?;
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
        let meta = db.open_tree(layout::META)?;
        let phones = db.open_tree(layout::PHONES)?;
        let vault = privacy::open_vault(dir, &meta, phones.is_empty(), phone_key_file)?;
        let store = SledStore {
            dir: dir.to_owned(),
            vault,
            meta,
            users: db.open_tree(layout::USERS)?,
            phones,
            methods: db.open_tree(layout::METHODS)?,
            wechats: db.open_tree(layout::WECHATS)?,
            grants: db.open_tree(layout::GRANTS)?,
            codes: db.open_tree(layout::CODES)?,
            revoked: db.open_tree(layout::REVOKED)?,
            counters: db.open_tree(layout::COUNTERS)?,
            sessions: db.open_tree(layout::SESSIONS)?,
            refresh: db.open_tree(layout::REFRESH)?,
            activity: db.open_tree(layout::ACTIVITY)?,
            refresh_lock: std::sync::Mutex::new(()),
            commit: GroupCommit::new(db.clone(), log_file),
            db,
            gate: RwLock::new(()),
            next_id: AtomicU64::new(1),
            users_total: AtomicU64::new(0),
            checkpoint_next_id: AtomicU64::new(1),
            phone_locks: KeyLocks::new(PHONE_LOCKS),
            wechat_binds: std::sync::Mutex::new(()),
            cached: UserCache::new(memory.user_cache_entries),
            revoked_ids: RwLock::new(HashMap::new()),
            pending: CodeCache::new(memory.code_cache_entries),
            budget: DailyBudget::new(),
            key_files: std::sync::Mutex::new(()),
        };
        store.migrate()?;
        store.recover()?;
        store.load_revocations()?;
        if privacy::copy_due(&store.db)? {
            // The numbers it held in the clear are sealed now, but their old bytes are
            // still in sled's files: a copy without them replaces the database.
            let db = store.db.clone();
            drop(store);
            privacy::compact(dir, db, drop)?;
            return retry_while_locked(
                || Self::open_keyed(dir, cache_capacity_mb, memory, phone_key_file),
                |e| matches!(e, StoreError::Locked(_)),
            );
        }
        Ok(store)
    }

    /// [`SledStore::open`] for a store this process has just closed: sled lets go of its
    /// file lock only when its last background task is done, a moment after the close,
    /// so a lock held meanwhile is waited for (up to two seconds) instead of refused.
    pub fn reopen(dir: &Path, cache_capacity_mb: u64) -> Result<Self, StoreError> {
        Self::reopen_keyed(dir, cache_capacity_mb, None)
    }

    /// [`SledStore::reopen`] with the phone key from `phone_key_file`.
    pub fn reopen_keyed(
        dir: &Path,
        cache_capacity_mb: u64,
        phone_key_file: Option<&Path>,
    ) -> Result<Self, StoreError> {
        retry_while_locked(
            || {
                Self::open_keyed(
                    dir,
                    cache_capacity_mb,
                    &MemoryConfig::default(),
                    phone_key_file,
                )
            },
            |e| matches!(e, StoreError::Locked(_)),
        )
    }

    /// The phone keys this store seals and indexes with.
    pub fn vault(&self) -> Arc<PhoneVault> {
        self.vault.clone()
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
                let user = decode_user(&v, &self.vault)?;
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
                Some(v) => self.is_indexed(&decode_user(&v, &self.vault)?)?,
                None => false,
            };
            if !live {
                total = total.saturating_sub(1);
            }
        }
        for kv in self.users.range(u64_key(cp.next_id)..) {
            if self.is_indexed(&decode_user(&kv?.1, &self.vault)?)? {
                total += 1;
            }
        }
        Ok(total)
    }

    /// Whether the phone index leads to this user: a user is reachable, and counted, only
    /// through it (the commit point of a create, and of a deletion).
    fn is_indexed(&self, user: &User) -> Result<bool, StoreError> {
        let (index, other) = self.vault.indexes(&user.phone);
        for index in other.iter().chain([&index]) {
            if self.phones.get(index.bytes())?.as_deref() == Some(&u64_key(user.id)[..]) {
                return Ok(true);
            }
        }
        Ok(false)
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
        // 3 to 4 neither: format-1 user records read as users without an avatar.
        // 4 to 5: the phone numbers are sealed (the activity tree starts empty).
        if (1..5).contains(&found) {
            self.seal_plain_records()?;
        }
        // 5 to 6: shorter blind indexes; 6 to 7: keyed by their bytes. A store sealed
        // just now has those already, but a seal cut short by an earlier release may have
        // left indexes as text.
        if (1..7).contains(&found) {
            self.key_by_index_bytes()?;
        }
        self.meta
            .insert(META_SCHEMA, &SCHEMA_VERSION.to_be_bytes())?;
        self.flush_blocking()
    }

    /// The user count as kept, and the users as listed: two figures that must agree (a
    /// restore checks them).
    pub fn user_counts(&self) -> Result<(u64, u64), StoreError> {
        Ok((
            self.users_total.load(Ordering::SeqCst),
            self.users.len() as u64,
        ))
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

    /// [`super::Users::update_user`] for a caller that holds the write gate already.
    fn change_user(&self, id: UserId, change: &UserChange) -> Result<Option<User>, StoreError> {
        let mut failure = None;
        let updated = self.users.update_and_fetch(u64_key(id), |old| {
            let old = old?;
            // No change touches the phone: its sealed bytes are kept as they are.
            match decode_sealed_user(old) {
                Ok((mut user, sealed)) => {
                    change.apply(&mut user);
                    Some(encode_sealed_user(&user, sealed))
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
        updated.map(|v| decode_user(&v, &self.vault)).transpose()
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

/// Runs `work`, which may take long (a scan of a whole tree), where the runtime allows:
/// on a multi-threaded runtime the worker hands its other tasks over first; outside a
/// runtime it simply runs.
fn blocking<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(rt) if rt.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

impl Engine for SledStore {
    fn flush(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(Arc::clone(&self.commit).flush())
    }

    fn ready(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        // A read that goes to the engine (the user count is kept in memory). Id 0 is never
        // given out, so this finds nothing, but only after asking.
        ready(self.users.get(u64_key(0)).map(|_| ()).map_err(Into::into))
    }

    fn size_on_disk(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        ready(Ok(self.db.size_on_disk().unwrap_or(0)))
    }

    fn maintain(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        ready(self.checkpoint())
    }

    fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "store_flush_duration_seconds",
            "Time each group commit took to make the writes before it durable (flush and fdatasync)",
            self.commit.flush_seconds.clone(),
        );
    }
}

impl SledStore {
    /// Records the user count so that a start after a crash need not count every user.
    /// Durable after the next flush.
    fn checkpoint(&self) -> Result<(), StoreError> {
        // Exclusive: no create or delete is half done, so the count and the next id agree.
        let _all_writes_wait = self.gate.write().unwrap_or_else(PoisonError::into_inner);
        let total = self.users_total.load(Ordering::SeqCst);
        self.store_checkpoint(total, self.next_id.load(Ordering::SeqCst))?;
        self.wrote();
        Ok(())
    }
}

/// The server keys are files in the data dir (so `backup` carries them as files).
impl Keys for SledStore {
    fn key_or_insert<'a>(
        &'a self,
        name: &'a str,
        fresh: Vec<u8>,
    ) -> BoxFuture<'a, Result<Vec<u8>, StoreError>> {
        ready(
            crate::keys::load_or_insert(&self.dir, &format!("{name}.key"), fresh)
                .map_err(|e| StoreError::Engine(format!("{e:#}"))),
        )
    }

    fn key<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, StoreError>> {
        ready(
            crate::keys::load(&self.dir, &format!("{name}.key"))
                .map_err(|e| StoreError::Engine(format!("{e:#}"))),
        )
    }

    fn replace_key<'a>(
        &'a self,
        name: &'a str,
        current: &'a [u8],
        new: Vec<u8>,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let _one_writer = self
            .key_files
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        ready(
            crate::keys::replace(&self.dir, &format!("{name}.key"), current, &new)
                .map_err(|e| StoreError::Engine(format!("{e:#}"))),
        )
    }

    fn export_keys(&self) -> BoxFuture<'_, Result<Vec<super::NamedKey>, StoreError>> {
        ready(crate::keys::in_dir(&self.dir).map_err(|e| StoreError::Engine(format!("{e:#}"))))
    }
}

impl Snapshots for SledStore {
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
