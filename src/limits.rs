//! Abuse limits. Per client address: governor's GCRA limiters in memory (a restart may
//! forget them; they only slow one source down). Per phone and for the whole service:
//! counters in the store, in fixed windows (UTC day, clock hour), so a restart does not
//! reset what costs money (SMS) or guards codes (wrong-guess lockout).
//!
//! The service's daily budget is one counter that every send in the service changes, so
//! it is counted in memory and stored ahead in blocks ([`DailyBudget`]); the per-phone
//! counters are many and each is changed rarely, so they are counted in the store.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

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

/// The service's sends per UTC day. One counter that every send changes would make one
/// stored key the hottest in the service (a compare-and-swap on it per send, retried
/// under contention), so it is counted here and stored ahead: before the count passes
/// what is stored, the store is set to the count plus a block, and the send's flush makes
/// that durable with the rest of the send. A restart after a crash starts from what is
/// stored, so it can count up to a block too many, never too few: the cap outlives
/// crashes. A clean shutdown stores the exact count ([`Limits::close`]).
struct DailyBudget {
    limit: u64,
    block: u64,
    day: Mutex<BudgetDay>,
}

struct BudgetDay {
    /// i64::MIN until the first send of this run reads the stored count.
    day: i64,
    used: u64,
    stored: u64,
}

impl DailyBudget {
    fn new(limit: u64) -> Self {
        DailyBudget {
            limit,
            block: budget_block(limit),
            day: Mutex::new(BudgetDay {
                day: i64::MIN,
                used: 0,
                stored: 0,
            }),
        }
    }

    /// Takes one send of `day`. Ok(false) when the budget is used up.
    fn take(&self, store: &dyn Store, day: i64) -> Result<bool, StoreError> {
        let mut d = self.day.lock().unwrap_or_else(PoisonError::into_inner);
        if d.day != day {
            let stored = store.count(Counter::SendsPerDay, day, "")?;
            *d = BudgetDay {
                day,
                used: stored,
                stored,
            };
        }
        if self.limit != 0 && d.used >= self.limit {
            return Ok(false);
        }
        if d.used >= d.stored {
            let ahead = d.used + self.block;
            let ahead = if self.limit == 0 {
                ahead
            } else {
                ahead.min(self.limit)
            };
            store.set_count(Counter::SendsPerDay, day, "", ahead)?;
            d.stored = ahead;
        }
        d.used += 1;
        Ok(true)
    }

    /// Gives back a send that did not happen. What is stored stays ahead.
    fn give_back(&self, day: i64) {
        let mut d = self.day.lock().unwrap_or_else(PoisonError::into_inner);
        if d.day == day {
            d.used = d.used.saturating_sub(1);
        }
    }

    /// Stores the exact count, so a clean restart loses no budget.
    fn close(&self, store: &dyn Store) -> Result<(), StoreError> {
        let d = self.day.lock().unwrap_or_else(PoisonError::into_inner);
        if d.day != i64::MIN && d.stored != d.used {
            store.set_count(Counter::SendsPerDay, d.day, "", d.used)?;
        }
        Ok(())
    }
}

/// How far the stored daily count runs ahead: what a crash can cost, at most 1% of the
/// budget and never over 64 sends (a budget of 100 or less is stored at every send).
fn budget_block(limit: u64) -> u64 {
    if limit == 0 {
        64
    } else {
        (limit / 100).clamp(1, 64)
    }
}

pub struct Limits {
    cfg: LimitsConfig,
    budget: DailyBudget,
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
            budget: DailyBudget::new(cfg.global_per_day),
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
        if !self.budget.take(self.store.as_ref(), day)? {
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
        self.budget.give_back(quota.day);
        self.store
            .count_down(Counter::PhoneSendsPerDay, quota.day, &quota.phone)
    }

    /// Stores what is counted in memory; call it before the final flush.
    pub fn close(&self) -> Result<(), StoreError> {
        self.budget.close(self.store.as_ref())
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
    fn the_stored_budget_runs_at_most_one_percent_ahead() {
        assert_eq!(budget_block(0), 64);
        assert_eq!(budget_block(100), 1);
        assert_eq!(budget_block(250), 2);
        assert_eq!(budget_block(10_000), 64);
    }

    #[test]
    fn windows_and_seconds_left() {
        assert_eq!(window(Counter::SendsPerDay, 86_399), 0);
        assert_eq!(window(Counter::SendsPerDay, 86_400), 1);
        assert_eq!(secs_left(Counter::SendsPerDay, 86_399), 1);
        assert_eq!(secs_left(Counter::PhoneFailuresPerHour, 7_200), 3_600);
    }
}
