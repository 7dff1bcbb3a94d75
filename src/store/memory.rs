//! What the embedded engine keeps in this process's memory only: state that one process
//! serving alone need not share and may forget in a restart without harm. A restart
//! forgets captchas (a user asks for a new one) and per-address limits (they only slow one
//! source down; the per-phone and daily caps persist). Resend waits are restored at open
//! from the pending codes ([`super::Store::embedded`]).

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use super::{
    AddressLimit, AddressLimits, BoxFuture, CaptchaAnswers, PhoneIndex, ResendWaits, StoreError,
    ready,
};
use crate::config::LimitsConfig;
use crate::sharded::{BoundedMap, KeyLocks};

type Result<T> = std::result::Result<T, StoreError>;

/// Shards of the map of resend times (seeded hashers).
const RESEND_SHARDS: usize = 64;
/// Locks that make a phone's check-and-claim one step.
const PHONE_LOCKS: usize = 256;

/// Phone (by its blind index) -> unix time of its last send.
pub struct Waits {
    last_sent: BoundedMap<PhoneIndex, i64>,
    locks: KeyLocks,
}

impl Waits {
    /// Remembers the resend intervals of `capacity` phones at most
    /// (`memory.resend_wait_entries`). A full shard drops the intervals that are over
    /// first; only one full of running intervals is emptied, and a phone in it can then
    /// be sent to again early (the daily cap still holds).
    pub fn new(capacity: usize) -> Self {
        Waits {
            last_sent: BoundedMap::new(capacity, RESEND_SHARDS),
            locks: KeyLocks::new(PHONE_LOCKS),
        }
    }

    /// Remembers a send found in the store at start.
    pub fn restore(&self, phone: &PhoneIndex, sent_at: i64, now: i64, interval: i64) {
        let newest = self.last_sent.get(phone).unwrap_or(i64::MIN);
        self.last_sent
            .insert(*phone, newest.max(sent_at), over(now, interval));
    }
}

/// Whether a send at the given time is past its resend interval, as of `now`.
fn over(now: i64, interval: i64) -> impl Fn(&i64) -> bool {
    move |sent_at| now - sent_at >= interval
}

impl ResendWaits for Waits {
    fn reserve_send<'a>(
        &'a self,
        phone: &'a PhoneIndex,
        now: i64,
        interval: i64,
    ) -> BoxFuture<'a, Result<std::result::Result<(), u64>>> {
        let _phone = self.locks.lock(phone.as_str());
        ready(Ok(match self.last_sent.get(phone) {
            Some(at) if now - at < interval => Err((interval - (now - at)) as u64),
            _ => {
                self.last_sent.insert(*phone, now, over(now, interval));
                Ok(())
            }
        }))
    }

    fn release_send<'a>(&'a self, phone: &'a PhoneIndex) -> BoxFuture<'a, Result<()>> {
        let _phone = self.locks.lock(phone.as_str());
        self.last_sent.remove(phone);
        ready(Ok(()))
    }

    fn prune_waits(&self, now: i64, interval: i64) -> BoxFuture<'_, Result<()>> {
        self.last_sent.retain_fresh(over(now, interval));
        ready(Ok(()))
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

    fn check(&self, ip: IpAddr) -> std::result::Result<(), u64> {
        if self.quota.is_none() {
            return Ok(());
        }
        let limiter = self
            .limiter
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let result = limiter.check_key(&ip).map_err(|not_until| {
            not_until
                .wait_time_from(DefaultClock::default().now())
                .as_secs()
                .max(1)
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

/// governor's GCRA limiters, one per [`AddressLimit`].
pub struct Addresses {
    send: AddressLimiter,
    check: AddressLimiter,
    captcha: AddressLimiter,
}

impl Addresses {
    pub fn new(cfg: &LimitsConfig) -> Self {
        let quota = |n: u32, per: fn(NonZeroU32) -> Quota| NonZeroU32::new(n).map(per);
        let max = cfg.max_tracked_ips;
        Addresses {
            send: AddressLimiter::new(quota(cfg.ip_per_hour, Quota::per_hour), max),
            check: AddressLimiter::new(quota(cfg.verify_per_ip_per_minute, Quota::per_minute), max),
            captcha: AddressLimiter::new(
                quota(cfg.captcha_per_ip_per_minute, Quota::per_minute),
                max,
            ),
        }
    }

    fn limiter(&self, limit: AddressLimit) -> &AddressLimiter {
        match limit {
            AddressLimit::Send => &self.send,
            AddressLimit::Check => &self.check,
            AddressLimit::Captcha => &self.captcha,
        }
    }
}

impl AddressLimits for Addresses {
    fn check_address(
        &self,
        limit: AddressLimit,
        ip: IpAddr,
    ) -> BoxFuture<'_, Result<std::result::Result<(), u64>>> {
        ready(Ok(self.limiter(limit).check(ip)))
    }

    fn prune_addresses(&self) -> BoxFuture<'_, Result<()>> {
        for limit in AddressLimit::ALL {
            self.limiter(limit).prune();
        }
        ready(Ok(()))
    }

    fn tracked_addresses(&self) -> BoxFuture<'_, Result<Vec<(AddressLimit, u64)>>> {
        ready(Ok(AddressLimit::ALL
            .into_iter()
            .map(|l| (l, self.limiter(l).len() as u64))
            .collect()))
    }
}

/// Answers of pending captchas in a bounded moka cache; past its bound the oldest go first.
pub struct Captchas(moka::sync::Cache<String, (String, i64)>);

impl Captchas {
    /// `ttl`: how long a captcha lives. moka's timer only frees memory; each answer's own
    /// deadline is checked by the caller.
    pub fn new(ttl: Duration, capacity: u64) -> Self {
        Captchas(
            moka::sync::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .build(),
        )
    }
}

impl CaptchaAnswers for Captchas {
    fn put_captcha<'a>(
        &'a self,
        id: &'a str,
        answer: &'a str,
        expires_at: i64,
    ) -> BoxFuture<'a, Result<()>> {
        self.0
            .insert(id.to_owned(), (answer.to_owned(), expires_at));
        ready(Ok(()))
    }

    fn take_captcha<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<(String, i64)>>> {
        ready(Ok(self.0.remove(id)))
    }

    fn prune_captchas(&self, _now: i64) -> BoxFuture<'_, Result<()>> {
        self.0.run_pending_tasks();
        ready(Ok(()))
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

    #[tokio::test]
    async fn resend_interval_is_reserved_atomically() {
        let waits = Waits::new(1_000);
        let phone = &crate::privacy::PhoneVault::random().index("+8613812345678");
        assert_eq!(waits.reserve_send(phone, 1000, 60).await.unwrap(), Ok(()));
        assert_eq!(waits.reserve_send(phone, 1001, 60).await.unwrap(), Err(59));
        waits.release_send(phone).await.unwrap();
        assert_eq!(waits.reserve_send(phone, 1001, 60).await.unwrap(), Ok(()));
    }
}
