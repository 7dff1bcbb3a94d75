//! Each account's login activity: every login, failed password login, logout, password
//! change and WeChat binding, with when, how, and from where (the client address masked
//! to its /24 or /48, the User-Agent cut to 200 characters, as sessions keep them).
//! Entries older than `privacy.activity_retention_days` are deleted by the housekeeping
//! pass; an account's go with it when it is deleted.
//!
//! An entry is written like the change it records, before the flush that makes that
//! change durable: a login's entry rides the login's own flush (one group commit on
//! sled; on PostgreSQL one statement, sent beside the session's).

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};

use rand::RngExt;

use crate::model::{ActivityEvent, Method, UserId};
use crate::sessions::{cut_user_agent, mask_ip};
use crate::store::{Activity, ActivityEntry, StoreError};

/// Entries per page of GET /me/activity.
pub const PAGE: usize = 50;
/// The retention is counted in days: a pass an hour is soon enough, and spares the sled
/// engine a scan of every entry at each housekeeping pass.
const PRUNE_EVERY_SECS: i64 = 3600;

pub struct ActivityLog {
    store: Arc<dyn Activity>,
    retention_secs: i64,
    /// Tells apart entries of one user in one second. Starts at a random value, so that
    /// instances (and restarts) sharing a store do not reuse one another's.
    seq: AtomicU32,
    /// When this instance last pruned (unix seconds; 0: not yet).
    pruned_at: AtomicI64,
}

/// Where a request came from, as an entry records it.
pub struct Origin<'a> {
    pub ip: IpAddr,
    pub user_agent: &'a str,
}

impl ActivityLog {
    pub fn new(store: Arc<dyn Activity>, cfg: &crate::config::PrivacyConfig) -> ActivityLog {
        ActivityLog {
            store,
            retention_secs: i64::from(cfg.activity_retention_days) * 86_400,
            // The lower half, so that wrapping around (which would put a second's later
            // entries before its earlier ones) takes two billion entries.
            seq: AtomicU32::new(rand::rng().random::<u32>() >> 1),
            pruned_at: AtomicI64::new(0),
        }
    }

    /// Records `event` of `user` at `now`. Durable after the next store flush.
    pub async fn record(
        &self,
        user: UserId,
        event: ActivityEvent,
        method: Option<Method>,
        from: Origin<'_>,
        now: i64,
    ) -> Result<(), StoreError> {
        let entry = ActivityEntry {
            user_id: user,
            at: now,
            seq: self.seq.fetch_add(1, Ordering::Relaxed),
            event,
            method,
            ip: mask_ip(from.ip),
            user_agent: cut_user_agent(from.user_agent),
        };
        self.store.record_activity(&entry).await
    }

    /// Up to `limit` entries of `user` before `before` (an entry's [`id_text`]), newest
    /// first.
    pub async fn page(
        &self,
        user: UserId,
        before: Option<(i64, u32)>,
        limit: usize,
    ) -> Result<Vec<ActivityEntry>, StoreError> {
        self.store.activity_page(user, before, limit).await
    }

    /// Every entry of `user` that is kept, newest first (for an export).
    pub async fn all(&self, user: UserId) -> Result<Vec<ActivityEntry>, StoreError> {
        let mut all = Vec::new();
        let mut before = None;
        loop {
            let page = self.store.activity_page(user, before, 1000).await?;
            let full = page.len() == 1000;
            before = page.last().map(|e| (e.at, e.seq));
            all.extend(page);
            if !full {
                return Ok(all);
            }
        }
    }

    /// Deletes the entries older than the retention (the housekeeping pass): at the
    /// first pass, then at most once an hour.
    pub async fn prune(&self, now: i64) -> Result<usize, StoreError> {
        let last = self.pruned_at.load(Ordering::Relaxed);
        if last != 0 && now - last < PRUNE_EVERY_SECS {
            return Ok(0);
        }
        let pruned = self.store.prune_activity(now - self.retention_secs).await?;
        self.pruned_at.store(now, Ordering::Relaxed);
        Ok(pruned)
    }
}

/// An entry's id as the API shows it (and `?before=` takes it): `AT.SEQ`.
pub fn id_text(entry: &ActivityEntry) -> String {
    format!("{}.{}", entry.at, entry.seq)
}

pub fn parse_id(text: &str) -> Option<(i64, u32)> {
    let (at, seq) = text.split_once('.')?;
    Some((at.parse().ok()?, seq.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_back() {
        let e = ActivityEntry {
            user_id: 1,
            at: 1_700_000_000,
            seq: 4_000_000_000,
            event: ActivityEvent::Login,
            method: Some(Method::Sms),
            ip: String::new(),
            user_agent: String::new(),
        };
        assert_eq!(parse_id(&id_text(&e)), Some((e.at, e.seq)));
        assert_eq!(parse_id("12"), None);
        assert_eq!(parse_id("a.b"), None);
        assert_eq!(parse_id("1.-1"), None);
    }
}
