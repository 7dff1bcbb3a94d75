//! Verification codes: made from a CSPRNG, kept only as a keyed hash, bound to a phone and
//! a purpose, single use, dead after `max_attempts` wrong tries, one per phone and purpose.
//!
//! Pending codes live in a moka cache (per-entry expiry) written through to the store, so
//! a restart, kill -9 included, loses none; the cache is reloaded at start. Every change
//! to one phone+purpose runs under moka's per-key lock (`and_compute_with`), which is what
//! makes "of many concurrent tries with the right code exactly one wins". Expiry is decided
//! by `expires_at` in the record; moka's timer only frees memory.

use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use moka::future::Cache;
use moka::notification::RemovalCause;
use moka::ops::compute::Op;
use rand::RngExt;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::clock::now;
use crate::config::CodeConfig;
use crate::model::{PendingCode, Purpose};
use crate::phone::Phone;
use crate::store::{Store, StoreError};

/// Upper bound on pending codes held in memory; past it, records are still in the store
/// and read from there on a miss.
const CACHE_CAPACITY: u64 = 200_000;

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

pub struct Codes {
    pending: Cache<CodeKey, PendingCode>,
    /// Phone -> unix time of its last send, for the resend interval.
    last_sent: Cache<String, i64>,
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
    /// Builds the cache and reloads the store's unexpired codes into it (expired ones are
    /// deleted).
    pub async fn open(
        cfg: CodeConfig,
        fixed_code: Option<String>,
        hash_key: Vec<u8>,
        store: Arc<dyn Store>,
    ) -> Result<Self, StoreError> {
        let listener_store = store.clone();
        let pending = Cache::builder()
            .max_capacity(CACHE_CAPACITY)
            .expire_after(UntilExpiresAt)
            .eviction_listener(move |k: Arc<CodeKey>, v: PendingCode, cause| {
                // Only expiry ends a code; a record pushed out for space stays in the store.
                if cause == RemovalCause::Expired
                    && let Err(e) = listener_store.delete_code_if(&k.phone, k.purpose, &v)
                {
                    tracing::warn!(error = %e, "could not delete an expired code");
                }
            })
            .build();
        let last_sent = Cache::builder()
            .max_capacity(CACHE_CAPACITY)
            .time_to_live(Duration::from_secs(cfg.resend_interval_secs.max(1)))
            .build();
        let codes = Codes {
            pending,
            last_sent,
            store,
            hash_key,
            cfg,
            fixed: fixed_code,
        };
        let now = now();
        for (phone, purpose, rec) in codes.store.pending_codes()? {
            if rec.expires_at <= now {
                codes.store.delete_code(&phone, purpose)?;
                continue;
            }
            if now - rec.sent_at < codes.cfg.resend_interval_secs as i64 {
                let newest = codes.last_sent.get(&phone).await.unwrap_or(i64::MIN);
                codes
                    .last_sent
                    .insert(phone.clone(), newest.max(rec.sent_at))
                    .await;
            }
            codes.pending.insert(CodeKey { phone, purpose }, rec).await;
        }
        Ok(codes)
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
    pub async fn reserve_send(&self, phone: &Phone) -> Result<(), u64> {
        let interval = self.cfg.resend_interval_secs as i64;
        if interval == 0 {
            return Ok(());
        }
        let now = now();
        let mut wait = None;
        self.last_sent
            .entry(phone.as_str().to_owned())
            .and_compute_with(|entry| {
                let op = match entry.map(|e| e.into_value()) {
                    Some(at) if now - at < interval => {
                        wait = Some((interval - (now - at)) as u64);
                        Op::Nop
                    }
                    _ => Op::Put(now),
                };
                std::future::ready(op)
            })
            .await;
        wait.map_or(Ok(()), Err)
    }

    /// Gives back a reservation whose send failed: a failed send costs the user no wait.
    pub async fn release_send(&self, phone: &Phone) {
        self.last_sent.invalidate(phone.as_str()).await;
    }

    /// Records `code` as the pending code for phone+purpose, replacing any older one.
    /// Durable after the next store flush.
    pub async fn put(&self, phone: &Phone, purpose: Purpose, code: &str) -> Result<(), StoreError> {
        let now = now();
        let rec = PendingCode {
            hash: self.hash(phone, purpose, code),
            sent_at: now,
            expires_at: now + self.cfg.ttl_secs as i64,
            attempts: 0,
        };
        let key = CodeKey {
            phone: phone.as_str().to_owned(),
            purpose,
        };
        let mut result = Ok(());
        self.pending
            .entry(key)
            .and_compute_with(|_| {
                result = self.store.save_code(phone.as_str(), purpose, &rec);
                std::future::ready(if result.is_ok() {
                    Op::Put(rec)
                } else {
                    Op::Nop
                })
            })
            .await;
        result
    }

    /// Drops the pending code of phone+purpose (its SMS could not be sent).
    pub async fn discard(&self, phone: &Phone, purpose: Purpose) -> Result<(), StoreError> {
        let key = CodeKey {
            phone: phone.as_str().to_owned(),
            purpose,
        };
        let mut result = Ok(());
        self.pending
            .entry(key)
            .and_compute_with(|_| {
                result = self.store.delete_code(phone.as_str(), purpose);
                std::future::ready(Op::Remove)
            })
            .await;
        result
    }

    /// Checks `code` and uses it up if right. A wrong try counts against the code; the
    /// attempt that reaches `max_attempts` kills it. Durable after the next store flush.
    pub async fn consume(
        &self,
        phone: &Phone,
        purpose: Purpose,
        code: &str,
    ) -> Result<(), CodeError> {
        let key = CodeKey {
            phone: phone.as_str().to_owned(),
            purpose,
        };
        let presented = self.hash(phone, purpose, code);
        let mut outcome: Result<(), CodeError> = Err(CodeError::Invalid);
        let store = &self.store;
        let max_attempts = self.cfg.max_attempts;
        self.pending
            .entry(key)
            .and_compute_with(|entry| {
                let now = now();
                let current = match entry {
                    Some(e) => Ok(Some(e.into_value())),
                    // Not in memory: pushed out for space, so the store is authoritative.
                    None => store.load_code(phone.as_str(), purpose),
                };
                let op = match current {
                    Err(e) => {
                        outcome = Err(e.into());
                        Op::Nop
                    }
                    Ok(None) => Op::Nop,
                    Ok(Some(rec)) if rec.expires_at <= now => {
                        outcome = store
                            .delete_code(phone.as_str(), purpose)
                            .map_err(Into::into)
                            .and(Err(CodeError::Invalid));
                        Op::Remove
                    }
                    Ok(Some(rec)) if rec.attempts >= max_attempts => {
                        outcome = Err(CodeError::Dead {
                            retry_after: (rec.expires_at - now) as u64,
                            guessed: false,
                        });
                        Op::Nop
                    }
                    Ok(Some(rec)) if bool::from(rec.hash.ct_eq(&presented)) => {
                        outcome = store
                            .delete_code(phone.as_str(), purpose)
                            .map_err(Into::into);
                        Op::Remove
                    }
                    Ok(Some(mut rec)) => {
                        rec.attempts += 1;
                        outcome = match store.save_code(phone.as_str(), purpose, &rec) {
                            Err(e) => Err(e.into()),
                            Ok(()) if rec.attempts >= max_attempts => Err(CodeError::Dead {
                                retry_after: (rec.expires_at - now) as u64,
                                guessed: true,
                            }),
                            Ok(()) => Err(CodeError::Wrong),
                        };
                        Op::Put(rec)
                    }
                };
                std::future::ready(op)
            })
            .await;
        outcome
    }

    /// Pending codes held in memory. moka counts lazily, so its deferred work runs first.
    pub async fn pending_count(&self) -> u64 {
        self.pending.run_pending_tasks().await;
        self.pending.entry_count()
    }

    /// Lets moka run its deferred work now (expiry clean-up, listener calls).
    pub async fn housekeeping(&self) {
        self.pending.run_pending_tasks().await;
        self.last_sent.run_pending_tasks().await;
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
        let codes = Codes::open(cfg, None, vec![7; 32], store).await.unwrap();
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
        c.put(&phone(), Purpose::Login, "123456").await.unwrap();
        assert!(matches!(
            c.consume(&phone(), Purpose::Register, "123456").await,
            Err(CodeError::Invalid)
        ));
        c.consume(&phone(), Purpose::Login, "123456").await.unwrap();
        assert!(matches!(
            c.consume(&phone(), Purpose::Login, "123456").await,
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
        c.put(&phone(), Purpose::Login, "123456").await.unwrap();
        for _ in 0..2 {
            assert!(matches!(
                c.consume(&phone(), Purpose::Login, "000000").await,
                Err(CodeError::Wrong)
            ));
        }
        assert!(matches!(
            c.consume(&phone(), Purpose::Login, "000000").await,
            Err(CodeError::Dead { guessed: true, .. })
        ));
        assert!(matches!(
            c.consume(&phone(), Purpose::Login, "123456").await,
            Err(CodeError::Dead { guessed: false, .. })
        ));
    }

    #[tokio::test]
    async fn new_code_replaces_old() {
        let (_d, c) = codes(CodeConfig::default()).await;
        c.put(&phone(), Purpose::Login, "111111").await.unwrap();
        c.put(&phone(), Purpose::Login, "222222").await.unwrap();
        assert!(c.consume(&phone(), Purpose::Login, "111111").await.is_err());
        c.consume(&phone(), Purpose::Login, "222222").await.unwrap();
    }

    #[tokio::test]
    async fn resend_interval_is_reserved_atomically() {
        let (_d, c) = codes(CodeConfig::default()).await;
        assert!(c.reserve_send(&phone()).await.is_ok());
        let wait = c.reserve_send(&phone()).await.unwrap_err();
        assert!((59..=60).contains(&wait), "{wait}");
        c.release_send(&phone()).await;
        assert!(c.reserve_send(&phone()).await.is_ok());
    }
}
