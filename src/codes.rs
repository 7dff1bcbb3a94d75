//! Verification codes: made from a CSPRNG, kept only as a keyed hash, bound to a phone and
//! a purpose, single use, dead after `max_attempts` wrong tries, one per phone and purpose.
//!
//! Pending codes live in a moka cache (per-entry expiry) written through to the store, so
//! a restart, kill -9 included, loses none. The store is the authority: a code not in the
//! cache (after a restart, or pushed out for space) is read from it, so the cache is not
//! refilled at start, where 100,000 pending codes would cost 75 MiB before the first
//! request. Expired records leave the store in the periodic sweep. Every change
//! to one phone runs under a lock of that phone's (one of [`PHONE_LOCKS`], picked by
//! hash), which is what makes "of many concurrent tries with the right code exactly one
//! wins". The work under it is short and never waits for I/O beyond one store write, so
//! the lock is a plain mutex: moka's own per-key `and_compute_with` cost more than the
//! rest of a login. Expiry is decided by `expires_at` in the record; moka's timer only
//! frees memory.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, MutexGuard};
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use moka::sync::Cache;
use rand::RngExt;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::clock::now;
use crate::config::CodeConfig;
use crate::model::{PendingCode, Purpose};
use crate::phone::Phone;
use crate::sharded::{BoundedMap, KeyLocks};
use crate::store::{Store, StoreError};

/// Upper bound on pending codes held in memory; past it, records are still in the store
/// and read from there on a miss.
const CACHE_CAPACITY: u64 = 50_000;
/// Upper bound on phones whose resend interval is remembered. A full shard drops the
/// intervals that are over first; only one full of running intervals is emptied, and a
/// phone in it can then be sent to again early (the daily cap still holds).
const RESEND_CAPACITY: usize = 200_000;
/// Shards of the map of resend times (seeded hashers, as for [`Hasher`]).
const RESEND_SHARDS: usize = 64;
/// Locks that serialize the changes to one phone's codes and resend reservation.
const PHONE_LOCKS: usize = 256;
/// The code cache's hasher. Keys are phones, which clients choose; foldhash is seeded per
/// process, and a phone is a short run of digits, so colliding keys cannot be chosen
/// from outside.
type Hasher = foldhash::fast::RandomState;

#[derive(Debug, thiserror::Error)]
pub enum CodeError {
    /// No live code to check against: none sent, expired, already used, or sent for
    /// another purpose.
    #[error("invalid code")]
    Invalid,
    /// A wrong guess at a live code.
    #[error("wrong code")]
    Wrong,
    /// The code took `max_attempts` wrong tries and is dead until it expires.
    /// `guessed`: this very try was a wrong guess (the one that killed it).
    #[error("too many wrong tries")]
    Dead { retry_after: u64, guessed: bool },
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct CodeKey {
    phone: String,
    purpose: Purpose,
}

fn key(phone: &Phone, purpose: Purpose) -> CodeKey {
    CodeKey {
        phone: phone.as_str().to_owned(),
        purpose,
    }
}

pub struct Codes {
    pending: Cache<CodeKey, PendingCode, Hasher>,
    /// Phone -> unix time of its last send, for the resend interval.
    last_sent: BoundedMap<String, i64>,
    phone_locks: KeyLocks,
    /// Code records in the store; expired ones count until the sweep removes them. Signed:
    /// a sweep's count can race a deletion and leave it one short for a while.
    stored: AtomicI64,
    store: Arc<dyn Store>,
    hash_key: Vec<u8>,
    cfg: CodeConfig,
    fixed: Option<String>,
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

impl Codes {
    /// Builds the caches, deletes expired codes from the store and restores the resend
    /// interval of phones sent to recently.
    pub fn open(
        cfg: CodeConfig,
        fixed_code: Option<String>,
        hash_key: Vec<u8>,
        store: Arc<dyn Store>,
    ) -> Result<Self, StoreError> {
        let pending = Cache::builder()
            .max_capacity(CACHE_CAPACITY)
            .expire_after(UntilExpiresAt)
            .build_with_hasher(Hasher::default());
        let codes = Codes {
            pending,
            last_sent: BoundedMap::new(RESEND_CAPACITY, RESEND_SHARDS),
            phone_locks: KeyLocks::new(PHONE_LOCKS),
            stored: AtomicI64::new(0),
            store,
            hash_key,
            cfg,
            fixed: fixed_code,
        };
        let now = now();
        let interval = codes.cfg.resend_interval_secs as i64;
        let live = codes.store.sweep_codes(now, &mut |phone, rec| {
            if now - rec.sent_at < interval {
                let newest = codes.last_sent.get(phone).unwrap_or(i64::MIN);
                codes.last_sent.insert(
                    phone.to_owned(),
                    newest.max(rec.sent_at),
                    codes.resend_over(now),
                );
            }
        })?;
        codes.stored.store(live as i64, Ordering::Relaxed);
        Ok(codes)
    }

    /// Held while one phone's codes or reservation change.
    fn lock(&self, phone: &Phone) -> MutexGuard<'_, ()> {
        self.phone_locks.lock(phone.as_str())
    }

    pub fn ttl_secs(&self) -> u64 {
        self.cfg.ttl_secs
    }

    pub fn resend_interval_secs(&self) -> u64 {
        self.cfg.resend_interval_secs
    }

    /// A fresh code: `length` digits, uniform over all of them (rand's range sampling
    /// rejects rather than taking a modulo), from the thread-local CSPRNG.
    pub fn generate(&self) -> String {
        if let Some(code) = &self.fixed {
            return code.clone();
        }
        let len = self.cfg.length as usize;
        let n = rand::rng().random_range(0..10u64.pow(self.cfg.length));
        format!("{n:0len$}")
    }

    /// Claims the right to send to `phone` now. Err(seconds to wait) inside the resend
    /// interval. Atomic per phone, so two racing requests cannot both send.
    pub fn reserve_send(&self, phone: &Phone) -> Result<(), u64> {
        let interval = self.cfg.resend_interval_secs as i64;
        if interval == 0 {
            return Ok(());
        }
        let now = now();
        let _phone = self.lock(phone);
        match self.last_sent.get(phone.as_str()) {
            Some(at) if now - at < interval => Err((interval - (now - at)) as u64),
            _ => {
                self.last_sent
                    .insert(phone.as_str().to_owned(), now, self.resend_over(now));
                Ok(())
            }
        }
    }

    /// Gives back a reservation whose send failed: a failed send costs the user no wait.
    pub fn release_send(&self, phone: &Phone) {
        let _phone = self.lock(phone);
        self.last_sent.remove(phone.as_str());
    }

    /// Records `code` as the pending code for phone+purpose, replacing any older one.
    /// Durable after the next store flush.
    pub fn put(&self, phone: &Phone, purpose: Purpose, code: &str) -> Result<(), StoreError> {
        let now = now();
        let rec = PendingCode {
            hash: self.hash(phone, purpose, code),
            sent_at: now,
            expires_at: now + self.cfg.ttl_secs as i64,
            attempts: 0,
        };
        let _phone = self.lock(phone);
        if self.store.save_code(phone.as_str(), purpose, &rec)? {
            self.stored.fetch_add(1, Ordering::Relaxed);
        }
        self.pending.insert(key(phone, purpose), rec);
        Ok(())
    }

    /// Drops the pending code of phone+purpose (its SMS could not be sent).
    pub fn discard(&self, phone: &Phone, purpose: Purpose) -> Result<(), StoreError> {
        let _phone = self.lock(phone);
        self.pending.invalidate(&key(phone, purpose));
        self.delete_stored(phone, purpose)
    }

    fn delete_stored(&self, phone: &Phone, purpose: Purpose) -> Result<(), StoreError> {
        if self.store.delete_code(phone.as_str(), purpose)? {
            self.stored.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Checks `code` and uses it up if right. A wrong try counts against the code; the
    /// attempt that reaches `max_attempts` kills it. Durable after the next store flush.
    pub fn consume(&self, phone: &Phone, purpose: Purpose, code: &str) -> Result<(), CodeError> {
        let presented = self.hash(phone, purpose, code);
        let key = key(phone, purpose);
        let _phone = self.lock(phone);
        let now = now();
        let (rec, cached) = match self.pending.get(&key) {
            Some(rec) => (rec, true),
            // Not in memory: pushed out for space, so the store is authoritative.
            None => match self.store.load_code(phone.as_str(), purpose)? {
                Some(rec) => (rec, false),
                None => return Err(CodeError::Invalid),
            },
        };
        // Under the phone's lock nothing can put it in the cache meanwhile, so a code
        // read from the store has nothing there to take out.
        let forget = |key: &CodeKey| {
            if cached {
                self.pending.invalidate(key);
            }
        };
        if rec.expires_at <= now {
            forget(&key);
            self.delete_stored(phone, purpose)?;
            return Err(CodeError::Invalid);
        }
        let retry_after = (rec.expires_at - now) as u64;
        if rec.attempts >= self.cfg.max_attempts {
            return Err(CodeError::Dead {
                retry_after,
                guessed: false,
            });
        }
        if bool::from(rec.hash.ct_eq(&presented)) {
            // Gone from memory first: a failed store write then leaves the code usable
            // only through the store, never the other way round.
            forget(&key);
            self.delete_stored(phone, purpose)?;
            return Ok(());
        }
        let rec = PendingCode {
            attempts: rec.attempts + 1,
            ..rec
        };
        self.store.save_code(phone.as_str(), purpose, &rec)?;
        let dead = rec.attempts >= self.cfg.max_attempts;
        self.pending.insert(key, rec);
        if dead {
            Err(CodeError::Dead {
                retry_after,
                guessed: true,
            })
        } else {
            Err(CodeError::Wrong)
        }
    }

    /// Codes sent and not yet used; expired ones count until the next sweep.
    pub fn pending_count(&self) -> u64 {
        self.stored.load(Ordering::Relaxed).max(0) as u64
    }

    /// Deletes expired codes from the store, lets moka do its deferred work and forgets
    /// resend intervals that are over. A full pass over the stored codes: run it from the
    /// periodic clean-up, not per request.
    pub fn housekeeping(&self) -> Result<(), StoreError> {
        let now = now();
        let live = self.store.sweep_codes(now, &mut |_, _| {})?;
        self.stored.store(live as i64, Ordering::Relaxed);
        self.pending.run_pending_tasks();
        self.last_sent.retain_fresh(self.resend_over(now));
        Ok(())
    }

    /// Whether a send at the given time is past its resend interval, as of `now`.
    fn resend_over(&self, now: i64) -> impl Fn(&i64) -> bool {
        let interval = self.cfg.resend_interval_secs as i64;
        move |sent_at| now - sent_at >= interval
    }

    /// HMAC-SHA256 over phone, purpose and code, so a stored hash says nothing about the
    /// digits without the server key, and a code for one phone or purpose fits no other.
    fn hash(&self, phone: &Phone, purpose: Purpose, code: &str) -> [u8; 32] {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.hash_key).expect("HMAC takes any key length");
        for part in [phone.as_str(), purpose.as_str(), code] {
            mac.update(&(part.len() as u32).to_be_bytes());
            mac.update(part.as_bytes());
        }
        mac.finalize().into_bytes().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;

    async fn codes(cfg: CodeConfig) -> (tempfile::TempDir, Codes) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path(), 8).unwrap());
        let codes = Codes::open(cfg, None, vec![7; 32], store).unwrap();
        (dir, codes)
    }

    fn phone() -> Phone {
        Phone::from_e164("+8613812345678")
    }

    #[test]
    fn generated_codes_are_uniform_digits() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (_d, c) = rt.block_on(codes(CodeConfig::default()));
        let mut first_digit = [0u32; 10];
        for _ in 0..20_000 {
            let code = c.generate();
            assert_eq!(code.len(), 6);
            assert!(code.bytes().all(|b| b.is_ascii_digit()));
            first_digit[(code.as_bytes()[0] - b'0') as usize] += 1;
        }
        // Each leading digit expects 2,000; a leading zero must not be missing (padding).
        assert!(
            first_digit.iter().all(|&n| (1_600..2_400).contains(&n)),
            "{first_digit:?}"
        );
    }

    #[tokio::test]
    async fn right_code_works_once_and_only_for_its_purpose() {
        let (_d, c) = codes(CodeConfig::default()).await;
        c.put(&phone(), Purpose::Login, "123456").unwrap();
        assert!(matches!(
            c.consume(&phone(), Purpose::Register, "123456"),
            Err(CodeError::Invalid)
        ));
        c.consume(&phone(), Purpose::Login, "123456").unwrap();
        assert!(matches!(
            c.consume(&phone(), Purpose::Login, "123456"),
            Err(CodeError::Invalid)
        ));
    }

    #[tokio::test]
    async fn wrong_tries_kill_the_code() {
        let (_d, c) = codes(CodeConfig {
            max_attempts: 3,
            ..Default::default()
        })
        .await;
        c.put(&phone(), Purpose::Login, "123456").unwrap();
        for _ in 0..2 {
            assert!(matches!(
                c.consume(&phone(), Purpose::Login, "000000"),
                Err(CodeError::Wrong)
            ));
        }
        assert!(matches!(
            c.consume(&phone(), Purpose::Login, "000000"),
            Err(CodeError::Dead { guessed: true, .. })
        ));
        assert!(matches!(
            c.consume(&phone(), Purpose::Login, "123456"),
            Err(CodeError::Dead { guessed: false, .. })
        ));
    }

    #[tokio::test]
    async fn new_code_replaces_old() {
        let (_d, c) = codes(CodeConfig::default()).await;
        c.put(&phone(), Purpose::Login, "111111").unwrap();
        c.put(&phone(), Purpose::Login, "222222").unwrap();
        assert!(c.consume(&phone(), Purpose::Login, "111111").is_err());
        c.consume(&phone(), Purpose::Login, "222222").unwrap();
    }

    #[tokio::test]
    async fn resend_interval_is_reserved_atomically() {
        let (_d, c) = codes(CodeConfig::default()).await;
        assert!(c.reserve_send(&phone()).is_ok());
        let wait = c.reserve_send(&phone()).unwrap_err();
        assert!((59..=60).contains(&wait), "{wait}");
        c.release_send(&phone());
        assert!(c.reserve_send(&phone()).is_ok());
    }
}
