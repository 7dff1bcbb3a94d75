//! Abuse limits. Per client address: GCRA limits ([`AddressLimits`]). Per phone and for
//! the whole service: counters in the store, in fixed windows (UTC day, clock hour), so a
//! restart does not reset what costs money (SMS) or guards codes (wrong-guess lockout).
//! Where each is kept is the engine's: in a cluster every instance counts against the
//! same limits, so N instances never allow N times the tries.

use std::net::IpAddr;
use std::sync::Arc;

use crate::clock::now;
use crate::config::LimitsConfig;
use crate::model::Counter;
use crate::phone::IndexedPhone;
use crate::store::{AddressLimit, AddressLimits, Counters, StoreError};

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

pub struct Limits {
    cfg: LimitsConfig,
    counters: Arc<dyn Counters>,
    addresses: Arc<dyn AddressLimits>,
}

/// Quota taken for one send; [`Limits::give_back`] returns it if the send fails.
pub struct SendQuota {
    day: i64,
    phone: crate::store::PhoneIndex,
}

fn window(counter: Counter, now: i64) -> i64 {
    now.div_euclid(counter.window_secs())
}

fn secs_left(counter: Counter, now: i64) -> u64 {
    (counter.window_secs() - now.rem_euclid(counter.window_secs())) as u64
}

impl Limits {
    pub fn new(
        cfg: &LimitsConfig,
        counters: Arc<dyn Counters>,
        addresses: Arc<dyn AddressLimits>,
    ) -> Self {
        Limits {
            cfg: cfg.clone(),
            counters,
            addresses,
        }
    }

    async fn address(&self, limit: AddressLimit, ip: IpAddr) -> Result<(), Limited> {
        self.addresses
            .check_address(limit, ip)
            .await?
            .map_err(|retry_after| Limited::Address { retry_after })
    }

    /// A code request from `ip`.
    pub async fn address_send(&self, ip: IpAddr) -> Result<(), Limited> {
        self.address(AddressLimit::Send, ip).await
    }

    /// A code or password check from `ip`.
    pub async fn address_check(&self, ip: IpAddr) -> Result<(), Limited> {
        self.address(AddressLimit::Check, ip).await
    }

    /// A captcha from `ip`.
    pub async fn address_captcha(&self, ip: IpAddr) -> Result<(), Limited> {
        self.address(AddressLimit::Captcha, ip).await
    }

    /// Takes one send from the phone's and the service's daily quota, or says how long to
    /// wait. Durable after the next store flush.
    pub async fn take_send_quota(&self, phone: &IndexedPhone) -> Result<SendQuota, Limited> {
        let now = now();
        let day = window(Counter::SendsPerDay, now);
        let retry_after = secs_left(Counter::SendsPerDay, now);
        let p = &phone.index;
        let mut limit = self.cfg.phone_per_day;
        if let (Some(other), true) = (&phone.other, limit > 0) {
            // While the phone key rotates, today's sends counted under the other key
            // count too.
            let before = self
                .counters
                .count(Counter::PhoneSendsPerDay, day, other)
                .await?;
            if before >= limit {
                return Err(Limited::PhoneDaily { retry_after });
            }
            limit -= before;
        }
        if self
            .counters
            .count_up(Counter::PhoneSendsPerDay, day, p, limit)
            .await?
            .is_err()
        {
            return Err(Limited::PhoneDaily { retry_after });
        }
        if !self
            .counters
            .take_budget(day, self.cfg.global_per_day)
            .await?
        {
            self.counters
                .count_down(Counter::PhoneSendsPerDay, day, p)
                .await?;
            return Err(Limited::Global { retry_after });
        }
        Ok(SendQuota { day, phone: *p })
    }

    /// Returns the quota of a send that did not happen.
    pub async fn give_back(&self, quota: SendQuota) -> Result<(), StoreError> {
        self.counters.give_back_budget(quota.day).await?;
        self.counters
            .count_down(Counter::PhoneSendsPerDay, quota.day, &quota.phone)
            .await
    }

    /// Stores what is counted ahead; call it before the final flush.
    pub async fn close(&self) -> Result<(), StoreError> {
        self.counters.close_budget().await
    }

    /// Err while the phone is locked for too many wrong codes this hour.
    pub async fn check_lockout(&self, phone: &IndexedPhone) -> Result<(), Limited> {
        let limit = self.cfg.phone_failures_per_hour;
        if limit == 0 {
            return Ok(());
        }
        let now = now();
        let hour = window(Counter::PhoneFailuresPerHour, now);
        let mut failures = 0;
        for index in std::iter::once(&phone.index).chain(&phone.other) {
            failures += self
                .counters
                .count(Counter::PhoneFailuresPerHour, hour, index)
                .await?;
        }
        if failures >= limit {
            return Err(Limited::LockedOut {
                retry_after: secs_left(Counter::PhoneFailuresPerHour, now),
            });
        }
        Ok(())
    }

    /// Counts a wrong code tried against a live code of `phone`. Durable after the next
    /// store flush.
    pub async fn record_failure(&self, phone: &IndexedPhone) -> Result<(), StoreError> {
        let hour = window(Counter::PhoneFailuresPerHour, now());
        // Limit 0: counting never refuses; check_lockout decides the lockout.
        let _always_counted = self
            .counters
            .count_up(Counter::PhoneFailuresPerHour, hour, &phone.index, 0)
            .await?;
        Ok(())
    }

    /// Drops idle addresses and counters of past windows.
    pub async fn prune(&self) -> Result<usize, StoreError> {
        self.addresses.prune_addresses().await?;
        let now = now();
        self.counters.prune_counters(&move |c| window(c, now)).await
    }

    /// Addresses tracked, per limit, for metrics.
    pub async fn tracked_addresses(&self) -> Result<Vec<(&'static str, u64)>, StoreError> {
        Ok(self
            .addresses
            .tracked_addresses()
            .await?
            .into_iter()
            .map(|(limit, n)| (limit.as_str(), n))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_and_seconds_left() {
        assert_eq!(window(Counter::SendsPerDay, 86_399), 0);
        assert_eq!(window(Counter::SendsPerDay, 86_400), 1);
        assert_eq!(secs_left(Counter::SendsPerDay, 86_399), 1);
        assert_eq!(secs_left(Counter::PhoneFailuresPerHour, 7_200), 3_600);
    }
}
