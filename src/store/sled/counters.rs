//! [`Counters`] on sled: `counter_count`, one key per counter, window and subject.
//!
//! The service's daily budget is one counter that every send in the service changes, so
//! it would make one key the hottest in the store (a compare-and-swap on it per send,
//! retried under contention). It is counted in memory ([`DailyBudget`]) and stored ahead:
//! before the count passes what is stored, the store is set to the count plus a block,
//! and the send's flush makes that durable with the rest of the send. A restart after a
//! crash starts from what is stored, so it can count up to a block too many, never too
//! few: the cap outlives crashes. A clean shutdown stores the exact count.

use std::sync::{Mutex, PoisonError};

use super::SledStore;
use crate::model::Counter;
use crate::store::codec::{read_u64, u64_key};
use crate::store::layout::{counter_byte, counter_key};
use crate::store::{BoxFuture, Counters, PhoneIndex, StoreError, budget_block, ready};

type Result<T> = std::result::Result<T, StoreError>;

pub(super) struct DailyBudget(Mutex<BudgetDay>);

struct BudgetDay {
    /// i64::MIN until the first send of this run reads the stored count.
    day: i64,
    used: u64,
    stored: u64,
}

impl DailyBudget {
    pub(super) fn new() -> Self {
        DailyBudget(Mutex::new(BudgetDay {
            day: i64::MIN,
            used: 0,
            stored: 0,
        }))
    }
}

impl SledStore {
    fn count_now(&self, counter: Counter, window: i64, subject: &[u8]) -> Result<u64> {
        match self.counters.get(counter_key(counter, window, subject))? {
            Some(v) => read_u64(&v),
            None => Ok(0),
        }
    }

    /// Sets a counter outright: for the budget, which has one writer.
    fn set_count(&self, counter: Counter, window: i64, subject: &[u8], value: u64) -> Result<()> {
        let _gate = self.write_gate();
        self.counters
            .insert(counter_key(counter, window, subject), &u64_key(value)[..])?;
        self.wrote();
        Ok(())
    }

    fn count_up_now(
        &self,
        counter: Counter,
        window: i64,
        subject: &[u8],
        limit: u64,
    ) -> Result<std::result::Result<u64, u64>> {
        let _gate = self.write_gate();
        let key = counter_key(counter, window, subject);
        let mut outcome = Ok(0);
        self.counters.update_and_fetch(&key, |old| {
            let current = old.and_then(|v| read_u64(v).ok()).unwrap_or(0);
            if limit != 0 && current >= limit {
                outcome = Err(current);
                old.map(|v| v.to_vec())
            } else {
                outcome = Ok(current + 1);
                Some(u64_key(current + 1).to_vec())
            }
        })?;
        if outcome.is_ok() {
            self.wrote();
        }
        Ok(outcome)
    }

    fn count_down_now(&self, counter: Counter, window: i64, subject: &[u8]) -> Result<()> {
        let _gate = self.write_gate();
        let key = counter_key(counter, window, subject);
        self.counters.update_and_fetch(&key, |old| {
            let current = old.and_then(|v| read_u64(v).ok()).unwrap_or(0);
            (current > 1).then(|| u64_key(current - 1).to_vec())
        })?;
        self.wrote();
        Ok(())
    }

    fn take_budget_now(&self, day: i64, limit: u64) -> Result<bool> {
        let mut d = self.budget.0.lock().unwrap_or_else(PoisonError::into_inner);
        if d.day != day {
            let stored = self.count_now(Counter::SendsPerDay, day, b"")?;
            *d = BudgetDay {
                day,
                used: stored,
                stored,
            };
        }
        if limit != 0 && d.used >= limit {
            return Ok(false);
        }
        if d.used >= d.stored {
            let ahead = d.used + budget_block(limit);
            let ahead = if limit == 0 { ahead } else { ahead.min(limit) };
            self.set_count(Counter::SendsPerDay, day, b"", ahead)?;
            d.stored = ahead;
        }
        d.used += 1;
        Ok(true)
    }

    fn give_back_budget_now(&self, day: i64) {
        let mut d = self.budget.0.lock().unwrap_or_else(PoisonError::into_inner);
        if d.day == day {
            d.used = d.used.saturating_sub(1); // what is stored stays ahead
        }
    }

    fn close_budget_now(&self) -> Result<()> {
        let d = self.budget.0.lock().unwrap_or_else(PoisonError::into_inner);
        if d.day != i64::MIN && d.stored != d.used {
            self.set_count(Counter::SendsPerDay, d.day, b"", d.used)?;
        }
        Ok(())
    }

    fn prune_counters_now(&self, oldest_kept: &dyn Fn(Counter) -> i64) -> Result<usize> {
        let _gate = self.write_gate();
        let mut pruned = 0;
        for counter in Counter::ALL {
            let keep_from = counter_key(counter, oldest_kept(counter), b"");
            let start = [counter_byte(counter)];
            for kv in self.counters.range(start.as_slice()..keep_from.as_slice()) {
                self.counters.remove(kv?.0)?;
                pruned += 1;
            }
        }
        if pruned > 0 {
            self.wrote();
        }
        Ok(pruned)
    }
}

impl Counters for SledStore {
    fn count_up<'a>(
        &'a self,
        counter: Counter,
        window: i64,
        phone: &'a PhoneIndex,
        limit: u64,
    ) -> BoxFuture<'a, Result<std::result::Result<u64, u64>>> {
        ready(self.count_up_now(counter, window, &phone.bytes(), limit))
    }

    fn count_down<'a>(
        &'a self,
        counter: Counter,
        window: i64,
        phone: &'a PhoneIndex,
    ) -> BoxFuture<'a, Result<()>> {
        ready(self.count_down_now(counter, window, &phone.bytes()))
    }

    fn count<'a>(
        &'a self,
        counter: Counter,
        window: i64,
        phone: &'a PhoneIndex,
    ) -> BoxFuture<'a, Result<u64>> {
        ready(self.count_now(counter, window, &phone.bytes()))
    }

    fn take_budget(&self, day: i64, limit: u64) -> BoxFuture<'_, Result<bool>> {
        ready(self.take_budget_now(day, limit))
    }

    fn give_back_budget(&self, day: i64) -> BoxFuture<'_, Result<()>> {
        self.give_back_budget_now(day);
        ready(Ok(()))
    }

    fn close_budget(&self) -> BoxFuture<'_, Result<()>> {
        ready(self.close_budget_now())
    }

    fn prune_counters<'a>(
        &'a self,
        oldest_kept: &'a (dyn Fn(Counter) -> i64 + Sync),
    ) -> BoxFuture<'a, Result<usize>> {
        ready(super::blocking(|| self.prune_counters_now(oldest_kept)))
    }
}
