//! [`PendingCodes`] on sled: a moka cache (per-entry expiry) written through to
//! `phonepurpose_code`, so a restart, kill -9 included, loses none. The tree is the
//! authority: a code not in the cache (after a restart, or pushed out for space) is read
//! from it, so the cache is not refilled at start, where 100,000 pending codes would cost
//! 75 MiB before the first request. Every change to one phone's codes runs under a lock of
//! that phone's (one of [`PHONE_LOCKS`], picked by hash), which is what makes "of many
//! concurrent tries with the right code exactly one wins". The work under it is short and
//! never waits for I/O beyond one store write, so the lock is a plain mutex: moka's own
//! per-key `and_compute_with` cost more than the rest of a login. Expiry is decided by
//! `expires_at` in the record; moka's timer only frees memory.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use moka::sync::Cache;
use subtle::ConstantTimeEq;

use super::SledStore;
use crate::clock::now;
use crate::model::{PendingCode, Purpose};
use crate::sharded::KeyLocks;
use crate::store::codec::{decode, encode};
use crate::store::layout::{code_key, parse_code_key};
use crate::store::{BoxFuture, CodeCheck, PendingCodes, PhoneIndex, StoreError, ready};

type Result<T> = std::result::Result<T, StoreError>;

/// Locks that serialize the changes to one phone's codes.
const PHONE_LOCKS: usize = 256;
/// The code cache's hasher. Keys are phones, which clients choose; foldhash is seeded per
/// process, and a phone is a short run of digits, so colliding keys cannot be chosen
/// from outside.
type Hasher = foldhash::fast::RandomState;

#[derive(Clone, PartialEq, Eq, Hash)]
struct CodeKey {
    phone: PhoneIndex,
    purpose: Purpose,
}

fn key(phone: &PhoneIndex, purpose: Purpose) -> CodeKey {
    CodeKey {
        phone: *phone,
        purpose,
    }
}

pub(super) struct CodeCache {
    pending: Cache<CodeKey, PendingCode, Hasher>,
    locks: KeyLocks,
    /// Code records in the tree; expired ones count until the sweep removes them. Signed:
    /// a sweep's count can race a deletion and leave it one short for a while.
    stored: AtomicI64,
}

struct UntilExpiresAt;

impl moka::Expiry<CodeKey, PendingCode> for UntilExpiresAt {
    fn expire_after_create(
        &self,
        _: &CodeKey,
        v: &PendingCode,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(remaining(v))
    }
    fn expire_after_update(
        &self,
        _: &CodeKey,
        v: &PendingCode,
        _: std::time::Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(remaining(v))
    }
}

fn remaining(v: &PendingCode) -> Duration {
    Duration::from_secs((v.expires_at - now()).max(0) as u64)
}

impl CodeCache {
    /// At most `capacity` codes in memory (`memory.code_cache_entries`); past it, records
    /// are still in the store and read from there on a miss.
    pub(super) fn new(capacity: u64) -> Self {
        CodeCache {
            pending: Cache::builder()
                .max_capacity(capacity)
                .expire_after(UntilExpiresAt)
                .build_with_hasher(Hasher::default()),
            locks: KeyLocks::new(PHONE_LOCKS),
            stored: AtomicI64::new(0),
        }
    }
}

impl SledStore {
    /// The pass over the codes at start: deletes the expired ones, counts the others and
    /// shows `recent` each phone sent a code at or after `since`, with the time.
    pub fn open_codes(
        &self,
        now: i64,
        since: i64,
        recent: &mut dyn FnMut(&PhoneIndex, i64),
    ) -> Result<()> {
        let live = self.sweep_now(now, &mut |phone, code| {
            if code.sent_at >= since {
                recent(phone, code.sent_at);
            }
        })?;
        self.pending.stored.store(live as i64, Ordering::Relaxed);
        Ok(())
    }

    /// Deletes every code that expired before `now`; `each_live` sees the others. Returns
    /// how many are left.
    fn sweep_now(
        &self,
        now: i64,
        each_live: &mut dyn FnMut(&PhoneIndex, &PendingCode),
    ) -> Result<u64> {
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
            } else if let Some(phone) =
                parse_code_key(&k).and_then(|(p, _)| PhoneIndex::from_key(p))
            {
                each_live(&phone, &code);
                live += 1;
            }
        }
        if swept {
            self.wrote();
        }
        Ok(live)
    }

    fn save_code(&self, phone: &PhoneIndex, purpose: Purpose, code: &PendingCode) -> Result<()> {
        let _gate = self.write_gate();
        let old = self.codes.insert(code_key(phone, purpose), encode(code))?;
        self.wrote();
        if old.is_none() {
            self.pending.stored.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn delete_code(&self, phone: &PhoneIndex, purpose: Purpose) -> Result<()> {
        let _gate = self.write_gate();
        if self.codes.remove(code_key(phone, purpose))?.is_some() {
            self.wrote();
            self.pending.stored.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn put_code_now(&self, phone: &PhoneIndex, purpose: Purpose, rec: PendingCode) -> Result<()> {
        let _phone = self.pending.locks.lock(phone);
        self.save_code(phone, purpose, &rec)?;
        self.pending.pending.insert(key(phone, purpose), rec);
        Ok(())
    }

    fn check_now(
        &self,
        phone: &PhoneIndex,
        purpose: Purpose,
        presented: [u8; 32],
        max_attempts: u32,
        now: i64,
    ) -> Result<CodeCheck> {
        let key = key(phone, purpose);
        let _phone = self.pending.locks.lock(phone);
        let (rec, cached) = match self.pending.pending.get(&key) {
            Some(rec) => (rec, true),
            // Not in memory: pushed out for space, so the tree is authoritative.
            None => match self.codes.get(code_key(phone, purpose))? {
                Some(v) => (decode::<PendingCode>(&v)?, false),
                None => return Ok(CodeCheck::Invalid),
            },
        };
        // Under the phone's lock nothing can put it in the cache meanwhile, so a code
        // read from the tree has nothing there to take out.
        let forget = |key: &CodeKey| {
            if cached {
                self.pending.pending.invalidate(key);
            }
        };
        if rec.expires_at <= now {
            forget(&key);
            self.delete_code(phone, purpose)?;
            return Ok(CodeCheck::Invalid);
        }
        if rec.attempts >= max_attempts {
            return Ok(CodeCheck::Dead {
                expires_at: rec.expires_at,
                guessed: false,
            });
        }
        if bool::from(rec.hash.ct_eq(&presented)) {
            // Gone from memory first: a failed store write then leaves the code usable
            // only through the tree, never the other way round.
            forget(&key);
            self.delete_code(phone, purpose)?;
            return Ok(CodeCheck::Used);
        }
        let rec = PendingCode {
            attempts: rec.attempts + 1,
            ..rec
        };
        self.save_code(phone, purpose, &rec)?;
        let dead = rec.attempts >= max_attempts;
        let expires_at = rec.expires_at;
        self.pending.pending.insert(key, rec);
        Ok(if dead {
            CodeCheck::Dead {
                expires_at,
                guessed: true,
            }
        } else {
            CodeCheck::Wrong
        })
    }

    fn discard_now(&self, phone: &PhoneIndex, purpose: Purpose) -> Result<()> {
        let _phone = self.pending.locks.lock(phone);
        self.pending.pending.invalidate(&key(phone, purpose));
        self.delete_code(phone, purpose)
    }
}

impl PendingCodes for SledStore {
    fn put_code<'a>(
        &'a self,
        phone: &'a PhoneIndex,
        purpose: Purpose,
        code: PendingCode,
    ) -> BoxFuture<'a, Result<()>> {
        ready(self.put_code_now(phone, purpose, code))
    }

    fn check_code<'a>(
        &'a self,
        phone: &'a PhoneIndex,
        purpose: Purpose,
        presented: [u8; 32],
        max_attempts: u32,
        now: i64,
    ) -> BoxFuture<'a, Result<CodeCheck>> {
        ready(self.check_now(phone, purpose, presented, max_attempts, now))
    }

    fn discard_code<'a>(
        &'a self,
        phone: &'a PhoneIndex,
        purpose: Purpose,
    ) -> BoxFuture<'a, Result<()>> {
        ready(self.discard_now(phone, purpose))
    }

    fn pending_code_count(&self) -> BoxFuture<'_, Result<u64>> {
        ready(Ok(self.pending.stored.load(Ordering::Relaxed).max(0) as u64))
    }

    fn sweep_codes(&self, now: i64) -> BoxFuture<'_, Result<()>> {
        ready(super::blocking(|| {
            let live = self.sweep_now(now, &mut |_, _| {})?;
            self.pending.stored.store(live as i64, Ordering::Relaxed);
            self.pending.pending.run_pending_tasks();
            Ok(())
        }))
    }
}
