//! [`Counters`] and [`AddressLimits`] on PostgreSQL. Both count once for the whole
//! cluster: with a limit of n, n requests pass in all, whichever instances they reach.

use std::net::IpAddr;

use super::{PgStore, Result};
use crate::clock::now_ms;
use crate::config::LimitsConfig;
use crate::model::Counter;
use crate::store::{AddressLimit, AddressLimits, BoxFuture, Counters, PhoneIndex, budget_block};

pub(super) fn counter_number(c: Counter) -> i16 {
    match c {
        Counter::PhoneSendsPerDay => 1,
        Counter::SendsPerDay => 2,
        Counter::PhoneFailuresPerHour => 3,
    }
}

fn limit_number(l: AddressLimit) -> i16 {
    match l {
        AddressLimit::Send => 1,
        AddressLimit::Check => 2,
        AddressLimit::Captcha => 3,
    }
}

/// GCRA parameters of one limit: a request every `emission_ms`, `burst` at once.
#[derive(Clone, Copy)]
struct Gcra {
    emission_ms: i64,
    burst: i64,
}

/// The quotas of `[limits]` as GCRA, as governor reads them in the embedded engine
/// (n per hour: a burst of n, then one every hour / n). None: no limit.
pub(super) struct Quotas([Option<Gcra>; 3]);

impl Quotas {
    pub(super) fn new(cfg: &LimitsConfig) -> Self {
        let gcra = |n: u32, period_ms: i64| {
            (n > 0).then(|| Gcra {
                emission_ms: (period_ms / n as i64).max(1),
                burst: n as i64,
            })
        };
        Quotas([
            gcra(cfg.ip_per_hour, 3_600_000),
            gcra(cfg.verify_per_ip_per_minute, 60_000),
            gcra(cfg.captcha_per_ip_per_minute, 60_000),
        ])
    }

    fn of(&self, limit: AddressLimit) -> Option<Gcra> {
        self.0[match limit {
            AddressLimit::Send => 0,
            AddressLimit::Check => 1,
            AddressLimit::Captcha => 2,
        }]
    }
}

/// Sends of the daily budget this instance has reserved in the database and not used
/// yet. Every send in the cluster takes one, so counting each in the database made one
/// row the cluster's hottest: every code request waited for the commits of all the
/// others. Reserved in blocks, a crash of an instance costs at most one block.
#[derive(Default)]
pub(super) struct ReservedBudget(std::sync::Mutex<Option<(i64, u64)>>);

impl ReservedBudget {
    /// Takes one of `day`'s, if any is left.
    fn take(&self, day: i64) -> bool {
        let mut r = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match r.as_mut() {
            Some((d, left)) if *d == day && *left > 0 => {
                *left -= 1;
                true
            }
            _ => false,
        }
    }

    /// Adds `n` of `day`'s (a new block, or a send given back); those of another day lapse.
    fn add(&self, day: i64, n: u64) {
        let mut r = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match r.as_mut() {
            Some((d, left)) if *d == day => *left += n,
            _ => *r = Some((day, n)),
        }
    }

    /// What is left, to give back at shutdown.
    fn drain(&self) -> Option<(i64, u64)> {
        let taken = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        taken.filter(|(_, left)| *left > 0)
    }
}

impl PgStore {
    /// A counter of `subject`: a phone's index as text, or '' for the service's budget.
    async fn count_subject_up(
        &self,
        counter: Counter,
        window: i64,
        subject: &str,
        limit: u64,
    ) -> Result<std::result::Result<u64, u64>> {
        let kind = counter_number(counter);
        let limit = limit as i64;
        let counted = self
            .query_opt(
                "count_up",
                "INSERT INTO counters (kind, win, subject, count) VALUES ($1, $2, $3, 1)
                 ON CONFLICT (kind, win, subject) DO UPDATE SET count = counters.count + 1
                 WHERE $4::bigint = 0 OR counters.count < $4::bigint
                 RETURNING count",
                &[&kind, &window, &subject, &limit],
            )
            .await?;
        if let Some(row) = counted {
            return Ok(Ok(row.get::<_, i64>(0) as u64));
        }
        Ok(Err(self.count_subject(counter, window, subject).await?))
    }

    async fn count_subject(&self, counter: Counter, window: i64, subject: &str) -> Result<u64> {
        let row = self
            .query_opt(
                "count",
                "SELECT count FROM counters WHERE kind = $1 AND win = $2 AND subject = $3",
                &[&counter_number(counter), &window, &subject],
            )
            .await?;
        Ok(row.map_or(0, |r| r.get::<_, i64>(0).max(0) as u64))
    }
}

impl Counters for PgStore {
    fn count_up<'a>(
        &'a self,
        counter: Counter,
        window: i64,
        phone: &'a PhoneIndex,
        limit: u64,
    ) -> BoxFuture<'a, Result<std::result::Result<u64, u64>>> {
        Box::pin(self.count_subject_up(counter, window, phone.as_str(), limit))
    }

    fn count_down<'a>(
        &'a self,
        counter: Counter,
        window: i64,
        phone: &'a PhoneIndex,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.execute(
                "count_down",
                "UPDATE counters SET count = count - 1
                 WHERE kind = $1 AND win = $2 AND subject = $3 AND count > 0",
                &[&counter_number(counter), &window, &phone.as_str()],
            )
            .await?;
            Ok(())
        })
    }

    fn count<'a>(
        &'a self,
        counter: Counter,
        window: i64,
        phone: &'a PhoneIndex,
    ) -> BoxFuture<'a, Result<u64>> {
        Box::pin(self.count_subject(counter, window, phone.as_str()))
    }

    fn take_budget(&self, day: i64, limit: u64) -> BoxFuture<'_, Result<bool>> {
        Box::pin(async move {
            if self.budget.take(day) {
                return Ok(true);
            }
            // Reserve a block for this instance in one statement, only if all of it fits:
            // the cluster never sends more than the limit, and near it, where no block
            // fits, each send is counted alone, exactly.
            let block = budget_block(limit).min(if limit == 0 { u64::MAX } else { limit });
            let reserved = self
                .query_opt(
                    "reserve_budget",
                    "INSERT INTO counters (kind, win, subject, count) VALUES ($1, $2, '', $3)
                     ON CONFLICT (kind, win, subject) DO UPDATE SET count = counters.count + $3
                     WHERE $4::bigint = 0 OR counters.count + $3 <= $4::bigint
                     RETURNING count",
                    &[
                        &counter_number(Counter::SendsPerDay),
                        &day,
                        &(block as i64),
                        &(limit as i64),
                    ],
                )
                .await?;
            if reserved.is_some() {
                self.budget.add(day, block - 1);
                return Ok(true);
            }
            Ok(self
                .count_subject_up(Counter::SendsPerDay, day, "", limit)
                .await?
                .is_ok())
        })
    }

    fn give_back_budget(&self, day: i64) -> BoxFuture<'_, Result<()>> {
        self.budget.add(day, 1); // kept for this instance's next send
        crate::store::ready(Ok(()))
    }

    fn close_budget(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let Some((day, left)) = self.budget.drain() else {
                return Ok(());
            };
            self.execute(
                "close_budget",
                "UPDATE counters SET count = GREATEST(count - $3, 0)
                 WHERE kind = $1 AND win = $2 AND subject = ''",
                &[&counter_number(Counter::SendsPerDay), &day, &(left as i64)],
            )
            .await?;
            Ok(())
        })
    }

    fn prune_counters<'a>(
        &'a self,
        oldest_kept: &'a (dyn Fn(Counter) -> i64 + Sync),
    ) -> BoxFuture<'a, Result<usize>> {
        Box::pin(async move {
            let mut pruned = 0;
            for counter in Counter::ALL {
                pruned += self
                    .execute(
                        "prune_counters",
                        "DELETE FROM counters WHERE kind = $1 AND win < $2",
                        &[&counter_number(counter), &oldest_kept(counter)],
                    )
                    .await?;
            }
            Ok(pruned as usize)
        })
    }
}

impl AddressLimits for PgStore {
    fn check_address(
        &self,
        limit: AddressLimit,
        ip: IpAddr,
    ) -> BoxFuture<'_, Result<std::result::Result<(), u64>>> {
        Box::pin(async move {
            let Some(q) = self.quotas.of(limit) else {
                return Ok(Ok(()));
            };
            let now = now_ms();
            let ip = ip.to_string();
            let kind = limit_number(limit);
            // GCRA: the theoretical arrival time moves one emission interval per request
            // and may run at most `burst` intervals ahead of now.
            let allowed = self
                .query_opt("check_address", 
                    "INSERT INTO address_limits (kind, ip, tat_ms) VALUES ($1, $2, $3::bigint + $4::bigint)
                     ON CONFLICT (kind, ip) DO UPDATE
                     SET tat_ms = GREATEST(address_limits.tat_ms, $3::bigint) + $4::bigint
                     WHERE GREATEST(address_limits.tat_ms, $3::bigint) + $4::bigint - $3::bigint <= $5::bigint
                     RETURNING 1",
                    &[&kind, &ip, &now, &q.emission_ms, &(q.emission_ms * q.burst)],
                )
                .await?;
            if allowed.is_some() {
                return Ok(Ok(()));
            }
            let tat: i64 = self
                .query_opt(
                    "check_address",
                    "SELECT tat_ms FROM address_limits WHERE kind = $1 AND ip = $2",
                    &[&kind, &ip],
                )
                .await?
                .map_or(now, |r| r.get(0));
            let wait_ms = tat + q.emission_ms - now - q.emission_ms * q.burst;
            Ok(Err((wait_ms.max(0) as u64).div_ceil(1000).max(1)))
        })
    }

    fn prune_addresses(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.execute(
                "prune_addresses",
                "DELETE FROM address_limits WHERE tat_ms < $1",
                &[&now_ms()],
            )
            .await?;
            Ok(())
        })
    }

    fn tracked_addresses(&self) -> BoxFuture<'_, Result<Vec<(AddressLimit, u64)>>> {
        Box::pin(async move {
            let rows = self
                .query(
                    "tracked_addresses",
                    "SELECT kind, count(*) FROM address_limits GROUP BY kind",
                    &[],
                )
                .await?;
            Ok(AddressLimit::ALL
                .into_iter()
                .map(|l| {
                    let n = rows
                        .iter()
                        .find(|r| r.get::<_, i16>(0) == limit_number(l))
                        .map_or(0, |r| r.get::<_, i64>(1) as u64);
                    (l, n)
                })
                .collect())
        })
    }
}
