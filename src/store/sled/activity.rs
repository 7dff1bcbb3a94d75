//! [`Activity`] on sled: `useridtimeseq_activity`, keyed by user, then time, so one
//! user's entries are one range and a page is a reverse scan of it.

use super::SledStore;
use crate::model::UserId;
use crate::store::codec::{decode, encode, u64_key};
use crate::store::layout::{activity_key, parse_activity_key};
use crate::store::{Activity, ActivityEntry, ActivityValue, BoxFuture, StoreError, ready};

type Result<T> = std::result::Result<T, StoreError>;

impl SledStore {
    fn record_activity_now(&self, e: &ActivityEntry) -> Result<()> {
        let _gate = self.write_gate();
        let value = ActivityValue {
            event: e.event,
            method: e.method,
            ip: e.ip.clone(),
            user_agent: e.user_agent.clone(),
        };
        self.activity
            .insert(activity_key(e.user_id, e.at, e.seq), encode(&value))?;
        self.wrote();
        Ok(())
    }

    fn activity_page_now(
        &self,
        user: UserId,
        before: Option<(i64, u32)>,
        limit: usize,
    ) -> Result<Vec<ActivityEntry>> {
        // Times are unix seconds, never negative: their big-endian bytes sort as they do.
        let prefix = u64_key(user);
        let entries = match before {
            Some((at, seq)) => self
                .activity
                .range(prefix.to_vec()..activity_key(user, at, seq).to_vec()),
            None => self.activity.scan_prefix(prefix),
        };
        entries
            .rev()
            .take(limit)
            .map(|kv| {
                let (k, v) = kv?;
                let (user_id, at, seq) = parse_activity_key(&k)
                    .ok_or_else(|| StoreError::Corrupt("activity key".into()))?;
                let value: ActivityValue = decode(&v)?;
                Ok(ActivityEntry {
                    user_id,
                    at,
                    seq,
                    event: value.event,
                    method: value.method,
                    ip: value.ip,
                    user_agent: value.user_agent,
                })
            })
            .collect()
    }

    fn prune_activity_now(&self, oldest_kept: i64) -> Result<usize> {
        let _gate = self.write_gate();
        let mut pruned = 0;
        for k in self.activity.iter().keys() {
            let k = k?;
            match parse_activity_key(&k) {
                Some((_, at, _)) if at >= oldest_kept => {}
                _ => {
                    self.activity.remove(k)?;
                    pruned += 1;
                }
            }
        }
        if pruned > 0 {
            self.wrote();
        }
        Ok(pruned)
    }

    /// Removes every activity entry of `user`. The caller holds the write gate.
    pub(super) fn erase_activity(&self, user: UserId) -> Result<()> {
        for k in self.activity.scan_prefix(u64_key(user)).keys() {
            self.activity.remove(k?)?;
        }
        Ok(())
    }
}

impl Activity for SledStore {
    fn record_activity<'a>(&'a self, entry: &'a ActivityEntry) -> BoxFuture<'a, Result<()>> {
        ready(self.record_activity_now(entry))
    }

    fn activity_page(
        &self,
        user: UserId,
        before: Option<(i64, u32)>,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<ActivityEntry>>> {
        ready(self.activity_page_now(user, before, limit))
    }

    fn prune_activity(&self, oldest_kept: i64) -> BoxFuture<'_, Result<usize>> {
        ready(super::blocking(|| self.prune_activity_now(oldest_kept)))
    }
}
