//! The phone key of a sled store, and the migration that seals the phone numbers of a
//! store written by an earlier release (schema 4 to 5).
//!
//! The store records the id of the key it is sealed with (`meta/phone_key_id`), so a
//! start with another key, or with none, is refused rather than finding no user. The
//! migration runs before the store serves, each step idempotent and each record moved by
//! writing the new one before removing the old, so a start after a crash (kill -9
//! included) simply runs it again and finishes.
//!
//! sled is log-structured: a record rewritten in place leaves its old bytes in the file
//! until sled reuses the segment, which may be never. So a store that held numbers in the
//! clear is then copied, record by record, into a new sled database that replaces it
//! ([`compact`]), and only that copy is free of them. Until the copy has replaced the old
//! database, `meta/plain_bytes_left` says one is due; the swap is two renames, and a
//! start after a crash between them finishes it ([`finish_compaction`]).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::SledStore;
use crate::model::Method;
use crate::privacy::{
    DEFAULT_KEY_FILE, KeyId, PhoneKey, PhoneVault, create_key_file, plain_phone, read_key_file,
};
use crate::store::StoreError;
use crate::store::codec::{decode, decode_plain_user, encode, encode_user};
use crate::store::layout::{
    META_PHONE_KEY, code_key, counter_key, parse_code_key, parse_counter_key,
};
use crate::store::{PhoneIndex, stored_identification};

type Result<T> = std::result::Result<T, StoreError>;

/// Set while the files may still hold numbers in the clear (see the module doc).
pub(super) const META_PLAIN_BYTES_LEFT: &[u8] = b"plain_bytes_left";
const COMPACTING: &str = "db.compacting";
const REPLACED: &str = "db.replaced";

/// How often a long migration says how far it is.
const PROGRESS_EVERY: Duration = Duration::from_secs(3);

fn refused(why: String) -> StoreError {
    StoreError::Schema(why)
}

/// The phone keys of the store whose `meta` tree this is: from `file`, or from
/// `dir/phone.key`, made now if the store was never sealed with a key.
pub(super) fn open_vault(
    dir: &Path,
    meta: &sled::Tree,
    no_accounts: bool,
    file: Option<&Path>,
) -> Result<Arc<PhoneVault>> {
    let stored = match meta.get(META_PHONE_KEY)? {
        Some(v) => Some(
            KeyId::from_bytes(&v).ok_or_else(|| StoreError::Corrupt("meta/phone_key_id".into()))?,
        ),
        None => None,
    };
    let default = dir.join(DEFAULT_KEY_FILE);
    let path = file.unwrap_or(&default);
    let bytes = if path.exists() {
        read_key_file(path).map_err(|e| refused(format!("{e:#}")))?
    } else if file.is_some() {
        return Err(refused(format!(
            "the phone key file {} (privacy.phone_key_file) does not exist",
            path.display()
        )));
    } else if let Some(id) = stored {
        return Err(refused(format!(
            "the phone key file {} is missing, and this store's phone numbers are sealed \
             with phone key {id}: put that file back (or set privacy.phone_key_file to it)",
            path.display()
        )));
    } else {
        let key = PhoneKey::generate();
        create_key_file(path, &key).map_err(|e| StoreError::Engine(format!("{e:#}")))?;
        key
    };
    let key = PhoneKey::new(&bytes);
    let rotation = super::rotation::stored_rotation(meta)?;
    if let (Some(stored), Some(rotation), false) = (stored, &rotation, no_accounts) {
        // A rotation decides which keys are needed (see `crate::rotation`).
        let vault = PhoneVault::new(key);
        crate::rotation::settle_vault(&vault, Some(stored), Some(rotation))?;
        return Ok(vault);
    }
    if rotation.is_some() {
        // Nothing is sealed: a rotation recorded before the last account went is moot.
        meta.remove(super::rotation::META_ROTATION)?;
    }
    // A store with no account has nothing sealed yet: it takes the key it is given.
    match stored.filter(|_| !no_accounts) {
        Some(id) if id != key.id() => {
            return Err(refused(format!(
                "the phone key in {} (id {}) is not the key this store is sealed with \
                 (id {id})",
                path.display(),
                key.id()
            )));
        }
        Some(_) => {}
        None => {
            meta.insert(META_PHONE_KEY, &key.id().0[..])?;
        }
    }
    Ok(PhoneVault::new(key))
}

/// Says every [`PROGRESS_EVERY`] how far a pass over one tree is.
struct Progress {
    what: &'static str,
    total: usize,
    done: usize,
    last: Instant,
}

impl Progress {
    fn new(what: &'static str, total: usize) -> Progress {
        Progress {
            what,
            total,
            done: 0,
            last: Instant::now(),
        }
    }

    fn step(&mut self) {
        self.done += 1;
        if self.last.elapsed() >= PROGRESS_EVERY {
            self.last = Instant::now();
            tracing::info!(
                done = self.done,
                of = self.total,
                "sealing phone numbers: {}",
                self.what
            );
        }
    }
}

impl SledStore {
    /// Seals every phone number an earlier release kept in the clear: user records
    /// rewritten with the phone sealed, and the phone index, pending codes and per-phone
    /// counters re-keyed by the blind index. Records already moved are skipped, so a
    /// run cut short is finished by the next.
    pub(super) fn seal_plain_records(&self) -> Result<()> {
        // Before the first record changes: from here a copy is due.
        self.meta.insert(META_PLAIN_BYTES_LEFT, &[1u8][..])?;
        let started = Instant::now();
        let mut users = Progress::new("user records", self.users.len());
        for kv in self.users.iter() {
            let (k, v) = kv?;
            if let Some(user) = decode_plain_user(&v)? {
                self.users.insert(k, encode_user(&user, &self.vault))?;
            }
            users.step();
        }
        let mut phones = Progress::new("phone index", self.phones.len());
        for kv in self.phones.iter() {
            let (k, id) = kv?;
            if let Some(phone) = plain_phone(&k) {
                // Written before the plain entry goes: a crash between leaves both, and
                // the next run removes the plain one.
                self.phones.insert(self.vault.index(phone).bytes(), id)?;
                self.phones.remove(&k)?;
            }
            phones.step();
        }
        for kv in self.methods.iter() {
            let (k, v) = kv?;
            let mut method: crate::model::LoginMethod = decode(&v)?;
            if method.method == Method::Password && !method.identification.is_empty() {
                method.identification = stored_identification(&method).to_owned();
                self.methods.insert(k, encode(&method))?;
            }
        }
        for kv in self.codes.iter() {
            let (k, v) = kv?;
            let Some((phone, purpose)) = parse_code_key(&k) else {
                continue;
            };
            if let Some(phone) = plain_phone(phone) {
                let new = code_key(&self.vault.index(phone), purpose);
                let _ = self
                    .codes
                    .compare_and_swap(new, None as Option<&[u8]>, Some(v))?;
                self.codes.remove(&k)?;
            }
        }
        for kv in self.counters.iter() {
            let (k, v) = kv?;
            let Some((counter, window, subject)) = parse_counter_key(&k) else {
                continue;
            };
            if let Some(phone) = plain_phone(subject) {
                let new = counter_key(counter, window, &self.vault.index(phone).bytes());
                let _ = self
                    .counters
                    .compare_and_swap(new, None as Option<&[u8]>, Some(v))?;
                self.counters.remove(&k)?;
            }
        }
        tracing::info!(
            users = users.done,
            took_ms = started.elapsed().as_millis() as u64,
            "store migrated to schema 5: phone numbers sealed"
        );
        Ok(())
    }
}

impl SledStore {
    /// Schemas 5 and 6 to 7: records keyed by a blind index as text (43 characters in
    /// schema 5, 22 in 6) re-keyed by the index's 16 bytes ([`PhoneIndex::bytes`]),
    /// which needs no key. Each record is written under its new key before the old one
    /// goes, and only keys as text are touched, so a run cut short is finished by the
    /// next.
    pub(super) fn key_by_index_bytes(&self) -> Result<()> {
        let started = Instant::now();
        let mut moved = 0u64;
        let mut put_if_absent = |tree: &sled::Tree, old: &[u8], new: Vec<u8>, v: &[u8]| {
            let _ = tree.compare_and_swap(new, None as Option<&[u8]>, Some(v))?;
            tree.remove(old)?;
            moved += 1;
            Ok::<_, StoreError>(())
        };
        for kv in self.phones.iter() {
            let (k, id) = kv?;
            if let Some(index) = PhoneIndex::from_text_key(&k) {
                put_if_absent(&self.phones, &k, index.bytes().to_vec(), &id)?;
            }
        }
        for kv in self.codes.iter() {
            let (k, v) = kv?;
            if let Some((phone, purpose)) = parse_code_key(&k)
                && let Some(index) = PhoneIndex::from_text_key(phone)
            {
                put_if_absent(&self.codes, &k, code_key(&index, purpose), &v)?;
            }
        }
        for kv in self.counters.iter() {
            let (k, v) = kv?;
            if let Some((counter, window, subject)) = parse_counter_key(&k)
                && let Some(index) = PhoneIndex::from_text_key(subject)
            {
                put_if_absent(
                    &self.counters,
                    &k,
                    counter_key(counter, window, &index.bytes()),
                    &v,
                )?;
            }
        }
        tracing::info!(
            records = moved,
            took_ms = started.elapsed().as_millis() as u64,
            "store migrated to schema 7: records keyed by the phone index's bytes"
        );
        Ok(())
    }
}

/// Whether the store in `db` still has old bytes to shed (a copy is due).
pub(super) fn copy_due(db: &sled::Db) -> Result<bool> {
    Ok(db
        .open_tree(crate::store::layout::META)?
        .contains_key(META_PLAIN_BYTES_LEFT)?)
}

/// Finishes a compaction a crash cut short, before sled opens `dir/db`: a copy that was
/// complete replaces the old database; a partial one is dropped (the next copy redoes it).
pub(super) fn finish_compaction(dir: &Path) -> Result<()> {
    let (db, copy, old) = (dir.join("db"), dir.join(COMPACTING), dir.join(REPLACED));
    let io = |what: &str, e: std::io::Error| StoreError::Engine(format!("{what}: {e}"));
    if !db.exists() && old.exists() && copy.exists() {
        std::fs::rename(&copy, &db).map_err(|e| io("finish the compaction", e))?;
    }
    if db.exists() {
        for leftover in [&copy, &old] {
            if leftover.exists() {
                std::fs::remove_dir_all(leftover).map_err(|e| io("clean up", e))?;
            }
        }
    }
    Ok(())
}

/// Copies every record of `old` (the database in `dir/db`) into a new database and puts
/// that in its place, without `meta/plain_bytes_left`. `old` is closed by the caller after
/// the copy and before the swap, through `close`.
pub(super) fn compact(dir: &Path, old: sled::Db, close: impl FnOnce(sled::Db)) -> Result<()> {
    let started = Instant::now();
    let copy_path = dir.join(COMPACTING);
    if copy_path.exists() {
        std::fs::remove_dir_all(&copy_path)
            .map_err(|e| StoreError::Engine(format!("remove {}: {e}", copy_path.display())))?;
    }
    let copy = sled::Config::new().path(&copy_path).open()?;
    let mut records = 0u64;
    for name in old.tree_names() {
        let (from, to) = (old.open_tree(&name)?, copy.open_tree(&name)?);
        for kv in from.iter() {
            let (k, v) = kv?;
            if &name[..] == crate::store::layout::META.as_bytes() && &k[..] == META_PLAIN_BYTES_LEFT
            {
                continue;
            }
            to.insert(k, v)?;
            records += 1;
        }
    }
    copy.flush()?;
    drop(copy);
    close(old);
    let io = |what: &str, e: std::io::Error| StoreError::Engine(format!("{what}: {e}"));
    std::fs::rename(dir.join("db"), dir.join(REPLACED)).map_err(|e| io("compaction", e))?;
    std::fs::rename(&copy_path, dir.join("db")).map_err(|e| io("compaction", e))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("compaction", e))?;
    std::fs::remove_dir_all(dir.join(REPLACED)).map_err(|e| io("compaction", e))?;
    tracing::info!(
        records,
        took_ms = started.elapsed().as_millis() as u64,
        "store copied into a new database: the old one, with the numbers in the clear, is gone"
    );
    Ok(())
}
