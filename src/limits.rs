//! Abuse limits. Per client address: governor's GCRA limiters in memory (a restart may
//! forget them; they only slow one source down). Per phone and for the whole service:
//! counters in the store, in fixed windows (UTC day, clock hour), so a restart does not
//! reset what costs money (SMS) or guards codes (wrong-guess lockout).

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, PoisonError, RwLock};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::clock::now;
use crate::config::LimitsConfig;
use crate::model::Counter;
use crate::phone::Phone;
use crate::store::{Store, StoreError};

/// Why a request was limited, with the seconds to wait.
#[derive(Debug, thiserror::Error)]
pub enum Limited {
    #[error("too many requests from this address")]
    Address { retry_after: u64 },
    #[error("too many codes for this phone today")]
    PhoneDaily { retry_after: u64 },
    #[error("the service's daily SMS budget is used up")]
    Global { retry_after: u64 },
    #[error("too many wrong codes for this phone")]
    LockedOut { retry_after: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Limited {
    /// Label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Limited::Address { .. } => "address",
            Limited::PhoneDaily { .. } => "phone_daily",
            Limited::Global { .. } => "global_daily",
            Limited::LockedOut { .. } => "phone_lockout",
            Limited::Store(_) => "store",
        }
    }
}

/// One in-memory per-address limiter whose memory stays bounded.
struct AddressLimiter {
    quota: Option<Quota>,
    /// Replaced whole when it outgrows its bound; the lock only guards that swap, so one
    /// poisoned by a panic elsewhere still holds a good limiter and is used as it is.
    limiter: RwLock<Arc<DefaultKeyedRateLimiter<IpAddr>>>,
    max_keys: usize,
}

impl AddressLimiter {
    fn new(quota: Option<Quota>, max_keys: usize) -> Self {
        let q = quota.unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN));
        Self {
            quota,
            limiter: RwLock::new(Arc::new(RateLimiter::keyed(q))),
            max_keys,
        }
    }

    fn check(&self, ip: IpAddr) -> Result<(), Limited> {
        if self.quota.is_none() {
            return Ok(());
        }
        let limiter = self
            .limiter
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let result = limiter
            .check_key(&ip)
            .map_err(|not_until| Limited::Address {
                retry_after: not_until
                    .wait_time_from(DefaultClock::default().now())
                    .as_secs()
                    .max(1),
            });
        if limiter.len() > self.max_keys {
            self.prune();
        }
        result
    }

    /// Drops addresses back at full allowance; if that is not enough (a flood of busy
    /// addresses), starts over empty: per-address limits fail open for a moment, while
    /// the persisted per-phone and global caps still hold.
    fn prune(&self) {
        let limiter = self
            .limiter
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        limiter.retain_recent();
        limiter.shrink_to_fit();
        if limiter.len() > self.max_keys
            && let Some(q) = self.quota
        {
            tracing::warn!(
                tracked = limiter.len(),
                "address limiter over its bound; starting over"
            );
            *self.limiter.write().unwrap_or_else(PoisonError::into_inner) =
                Arc::new(RateLimiter::keyed(q));
        }
    }

    fn len(&self) -> usize {
        self.limiter
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

pub struct Limits {
    cfg: LimitsConfig,
    sends: AddressLimiter,
    checks: AddressLimiter,
    captchas: AddressLimiter,
    store: Arc<dyn Store>,
}

/// Quota taken for one send; [`Limits::give_back`] returns it if the send fails.
pub struct SendQuota {
    day: i64,
    phone: String,
}

fn window(counter: Counter, now: i64) -> i64 {
    now.div_euclid(counter.window_secs())
}

fn secs_left(counter: Counter, now: i64) -> u64 {
    (counter.window_secs() - now.rem_euclid(counter.window_secs())) as u64
}

impl Limits {
    pub fn new(cfg: &LimitsConfig, store: Arc<dyn Store>) -> Self {
        let quota = |n: u32, per: fn(NonZeroU32) -> Quota| NonZeroU32::new(n).map(per);
        let max = cfg.max_tracked_ips;
        Limits {
            sends: AddressLimiter::new(quota(cfg.ip_per_hour, Quota::per_hour), max),
            checks: AddressLimiter::new(
                quota(cfg.verify_per_ip_per_minute, Quota::per_minute),
                max,
            ),
            captchas: AddressLimiter::new(
                quota(cfg.captcha_per_ip_per_minute, Quota::per_minute),
                max,
            ),
            cfg: cfg.clone(),
            store,
        }
    }

    /// A code request from `ip`.
    pub fn address_send(&self, ip: IpAddr) -> Result<(), Limited> {
        self.sends.check(ip)
    }

    /// A code or password check from `ip`.
    pub fn address_check(&self, ip: IpAddr) -> Result<(), Limited> {
        self.checks.check(ip)
    }

    /// A captcha from `ip`.
    pub fn address_captcha(&self, ip: IpAddr) -> Result<(), Limited> {
        self.captchas.check(ip)
    }

    /// Takes one send from the phone's and the service's daily quota, or says how long to
    /// wait. Durable after the next store flush.
    pub fn take_send_quota(&self, phone: &Phone) -> Result<SendQuota, Limited> {
        let now = now();
        let day = window(Counter::SendsPerDay, now);
        let retry_after = secs_left(Counter::SendsPerDay, now);
        let p = phone.as_str();
        if self
            .store
            .count_up(Counter::PhoneSendsPerDay, day, p, self.cfg.phone_per_day)?
            .is_err()
        {
            return Err(Limited::PhoneDaily { retry_after });
        }
        if self
            .store
            .count_up(Counter::SendsPerDay, day, "", self.cfg.global_per_day)?
            .is_err()
        {
            self.store.count_down(Counter::PhoneSendsPerDay, day, p)?;
            return Err(Limited::Global { retry_after });
        }
        Ok(SendQuota {
            day,
            phone: p.to_owned(),
        })
    }

    /// Returns the quota of a send that did not happen.
    pub fn give_back(&self, quota: SendQuota) -> Result<(), StoreError> {
        self.store
            .count_down(Counter::PhoneSendsPerDay, quota.day, &quota.phone)?;
        self.store.count_down(Counter::SendsPerDay, quota.day, "")
    }

    /// Err while the phone is locked for too many wrong codes this hour.
    pub fn check_lockout(&self, phone: &Phone) -> Result<(), Limited> {
        let limit = self.cfg.phone_failures_per_hour;
        if limit == 0 {
            return Ok(());
        }
        let now = now();
        let hour = window(Counter::PhoneFailuresPerHour, now);
        if self
            .store
            .count(Counter::PhoneFailuresPerHour, hour, phone.as_str())?
            >= limit
        {
            return Err(Limited::LockedOut {
                retry_after: secs_left(Counter::PhoneFailuresPerHour, now),
            });
        }
        Ok(())
    }

    /// Counts a wrong code tried against a live code of `phone`. Durable after the next
    /// store flush.
    pub fn record_failure(&self, phone: &Phone) -> Result<(), StoreError> {
        let hour = window(Counter::PhoneFailuresPerHour, now());
        // Limit 0: counting never refuses; check_lockout decides the lockout.
        let _always_counted =
            self.store
                .count_up(Counter::PhoneFailuresPerHour, hour, phone.as_str(), 0)?;
        Ok(())
    }

    /// Drops idle addresses and counters of past windows.
    pub fn prune(&self) -> Result<usize, StoreError> {
        for limiter in [&self.sends, &self.checks, &self.captchas] {
            limiter.prune();
        }
        let now = now();
        self.store.prune_counters(&|c| window(c, now))
    }

    /// Addresses held in memory, per limiter, for metrics.
    pub fn tracked_addresses(&self) -> [(&'static str, usize); 3] {
        [
            ("send", self.sends.len()),
            ("check", self.checks.len()),
            ("captcha", self.captchas.len()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_limiter_memory_is_bounded() {
        let quota = Quota::per_hour(NonZeroU32::new(20).unwrap());
        let limiter = AddressLimiter::new(Some(quota), 100);
        for i in 0..10_000u32 {
            let _ = limiter.check(IpAddr::from(i.to_be_bytes()));
            assert!(limiter.len() <= 101, "{} tracked at {i}", limiter.len());
        }
    }

    #[test]
    fn windows_and_seconds_left() {
        assert_eq!(window(Counter::SendsPerDay, 86_399), 0);
        assert_eq!(window(Counter::SendsPerDay, 86_400), 1);
        assert_eq!(secs_left(Counter::SendsPerDay, 86_399), 1);
        assert_eq!(secs_left(Counter::PhoneFailuresPerHour, 7_200), 3_600);
    }
}
