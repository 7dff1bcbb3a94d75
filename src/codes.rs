//! Verification codes: made from a CSPRNG, kept only as a keyed hash, bound to a phone and
//! a purpose, single use, dead after `max_attempts` wrong tries, one per phone and purpose.
//! Where they are kept, and how "of many concurrent tries with the right code exactly one
//! wins" is made to hold, is the store's ([`PendingCodes`]); expiry is decided by
//! `expires_at` in the record, against our clock.

use std::sync::Arc;

use hmac::{Hmac, KeyInit, Mac};
use rand::RngExt;
use sha2::Sha256;

use crate::clock::now;
use crate::config::CodeConfig;
use crate::model::{PendingCode, Purpose};
use crate::phone::{IndexedPhone, Phone};
use crate::store::{CodeCheck, PendingCodes, ResendWaits, StoreError};

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

pub struct Codes {
    store: Arc<dyn PendingCodes>,
    waits: Arc<dyn ResendWaits>,
    hash_key: Vec<u8>,
    cfg: CodeConfig,
    fixed: Option<String>,
}

impl Codes {
    pub fn new(
        cfg: CodeConfig,
        fixed_code: Option<String>,
        hash_key: Vec<u8>,
        store: Arc<dyn PendingCodes>,
        waits: Arc<dyn ResendWaits>,
    ) -> Self {
        Codes {
            store,
            waits,
            hash_key,
            cfg,
            fixed: fixed_code,
        }
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

    /// Claims the right to send to `phone` now. Ok(Err(seconds to wait)) inside the
    /// resend interval. Atomic per phone, so two racing requests cannot both send.
    pub async fn reserve_send(&self, phone: &IndexedPhone) -> Result<Result<(), u64>, StoreError> {
        let interval = self.cfg.resend_interval_secs as i64;
        if interval == 0 {
            return Ok(Ok(()));
        }
        let now = now();
        if let Some(other) = &phone.other {
            // A wait started under the rotation's other key still holds.
            if let Err(wait) = self.waits.reserve_send(other, now, interval).await? {
                return Ok(Err(wait));
            }
            self.waits.release_send(other).await?;
        }
        self.waits.reserve_send(&phone.index, now, interval).await
    }

    /// Gives back a reservation whose send failed: a failed send costs the user no wait.
    pub async fn release_send(&self, phone: &IndexedPhone) -> Result<(), StoreError> {
        self.waits.release_send(&phone.index).await
    }

    /// Records `code` as the pending code for phone+purpose, replacing any older one.
    /// Durable after the next store flush.
    pub async fn put(
        &self,
        phone: &IndexedPhone,
        purpose: Purpose,
        code: &str,
    ) -> Result<(), StoreError> {
        let now = now();
        let rec = PendingCode {
            hash: self.hash(phone, purpose, code),
            sent_at: now,
            expires_at: now + self.cfg.ttl_secs as i64,
            attempts: 0,
        };
        self.store.put_code(&phone.index, purpose, rec).await
    }

    /// Drops the pending code of phone+purpose (its SMS could not be sent).
    pub async fn discard(&self, phone: &IndexedPhone, purpose: Purpose) -> Result<(), StoreError> {
        self.store.discard_code(&phone.index, purpose).await
    }

    /// Checks `code` and uses it up if right. A wrong try counts against the code; the
    /// attempt that reaches `max_attempts` kills it. Durable after the next store flush.
    pub async fn consume(
        &self,
        phone: &IndexedPhone,
        purpose: Purpose,
        code: &str,
    ) -> Result<(), CodeError> {
        let presented = self.hash(phone, purpose, code);
        let now = now();
        let mut checked = self
            .store
            .check_code(&phone.index, purpose, presented, self.cfg.max_attempts, now)
            .await?;
        if let (CodeCheck::Invalid, Some(other)) = (&checked, &phone.other) {
            // Sent under the rotation's other key (before the switch, or by an instance on
            // the other side of it): codes are not moved, they expire.
            checked = self
                .store
                .check_code(other, purpose, presented, self.cfg.max_attempts, now)
                .await?;
        }
        match checked {
            CodeCheck::Used => Ok(()),
            CodeCheck::Invalid => Err(CodeError::Invalid),
            CodeCheck::Wrong => Err(CodeError::Wrong),
            CodeCheck::Dead {
                expires_at,
                guessed,
            } => Err(CodeError::Dead {
                retry_after: (expires_at - now).max(1) as u64,
                guessed,
            }),
        }
    }

    /// Codes sent and not yet used; expired ones count until the next sweep.
    pub async fn pending_count(&self) -> Result<u64, StoreError> {
        self.store.pending_code_count().await
    }

    /// Deletes expired codes and forgets resend intervals that are over: for the
    /// periodic clean-up, not per request.
    pub async fn housekeeping(&self) -> Result<(), StoreError> {
        let now = now();
        self.store.sweep_codes(now).await?;
        self.waits
            .prune_waits(now, self.cfg.resend_interval_secs as i64)
            .await
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
        let sled = Arc::new(SledStore::open(dir.path(), 8).unwrap());
        let codes = Codes::new(cfg, None, vec![7; 32], sled.clone(), Arc::new(NoWaits));
        (dir, codes)
    }

    /// These tests are about codes; the waits have their own.
    struct NoWaits;

    impl ResendWaits for NoWaits {
        fn reserve_send<'a>(
            &'a self,
            _: &'a crate::store::PhoneIndex,
            _: i64,
            _: i64,
        ) -> crate::store::BoxFuture<'a, Result<Result<(), u64>, StoreError>> {
            crate::store::ready(Ok(Ok(())))
        }
        fn release_send<'a>(
            &'a self,
            _: &'a crate::store::PhoneIndex,
        ) -> crate::store::BoxFuture<'a, Result<(), StoreError>> {
            crate::store::ready(Ok(()))
        }
        fn prune_waits(
            &self,
            _: i64,
            _: i64,
        ) -> crate::store::BoxFuture<'_, Result<(), StoreError>> {
            crate::store::ready(Ok(()))
        }
    }

    fn phone() -> IndexedPhone {
        let key = crate::privacy::PhoneKey::new(&[3; 32]);
        let vault = crate::privacy::PhoneVault::new(key);
        IndexedPhone::new(Phone::from_e164("+8613812345678"), &vault)
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
}
