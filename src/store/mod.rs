//! Storage behind a small interface of ours. Everything the service keeps goes through
//! [`Store`]; the only implementation is [`SledStore`], and no `sled` type leaves this
//! module, so another embedded engine could replace it by implementing the trait.

mod codec;
mod group_commit;
mod sled_store;
mod user_cache;

use std::future::Future;
use std::pin::Pin;

pub use sled_store::SledStore;

use crate::model::{Counter, LoginMethod, PendingCode, Purpose, User, UserId};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Receives one record of a [`Store::snapshot`]: (tree, key, value).
pub type RecordSink<'a> = dyn FnMut(&str, &[u8], &[u8]) -> std::io::Result<()> + 'a;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the data dir {0} is in use by another smsauth process; stop it first")]
    Locked(String),
    #[error("storage: {0}")]
    Engine(String),
    #[error("stored record is unreadable: {0}")]
    Corrupt(String),
}

/// A user to create; the store gives it its id.
pub struct NewUser<'a> {
    pub phone: &'a str,
    pub nickname: String,
    pub created_at: i64,
    pub last_login_at: Option<i64>,
}

/// Writes are applied at once but durable only after [`Store::flush`]; a handler flushes
/// before it answers 2xx. Concurrent flushes are batched into one (group commit).
pub trait Store: Send + Sync + 'static {
    fn user(&self, id: UserId) -> Result<Option<User>, StoreError>;
    fn user_by_phone(&self, phone: &str) -> Result<Option<User>, StoreError>;
    /// Whether the phone has an account: one read of the phone index, not of the user.
    fn has_user(&self, phone: &str) -> Result<bool, StoreError>;
    /// Creates the user unless the phone already has one, atomically: of two racing
    /// calls for one phone exactly one creates. Returns the user and whether it was created.
    fn create_user_if_absent(
        &self,
        new: NewUser<'_>,
        methods: &[LoginMethod],
    ) -> Result<(User, bool), StoreError>;
    /// Applies `change` to the stored user (it may run more than once under contention).
    fn update_user(
        &self,
        id: UserId,
        change: &mut dyn FnMut(&mut User),
    ) -> Result<Option<User>, StoreError>;
    /// The user's login methods: `sms` always (every account was made by proving its
    /// phone, so the method is implied by the user record and not stored), then the
    /// stored ones.
    fn login_methods(&self, user: &User) -> Result<Vec<LoginMethod>, StoreError>;
    fn put_login_method(&self, id: UserId, method: &LoginMethod) -> Result<(), StoreError>;
    /// Bumps the user's session generation, then stores `method`: a new password is never
    /// in place while the sessions it should end still work, crashes included.
    fn put_login_method_ending_sessions(
        &self,
        id: UserId,
        method: &LoginMethod,
    ) -> Result<Option<User>, StoreError>;
    fn user_count(&self) -> Result<u64, StoreError>;
    /// Records the user count so that a start after a crash need not count every user
    /// (the periodic clean-up calls it). Durable after the next flush.
    fn checkpoint(&self) -> Result<(), StoreError>;

    /// Stores the pending code of phone+purpose, replacing any; true if there was none.
    fn save_code(
        &self,
        phone: &str,
        purpose: Purpose,
        code: &PendingCode,
    ) -> Result<bool, StoreError>;
    fn load_code(&self, phone: &str, purpose: Purpose) -> Result<Option<PendingCode>, StoreError>;
    /// True if there was a code to delete.
    fn delete_code(&self, phone: &str, purpose: Purpose) -> Result<bool, StoreError>;
    /// Deletes every code that expired before `now`; `each_live` sees the others. Returns
    /// how many are left.
    fn sweep_codes(
        &self,
        now: i64,
        each_live: &mut dyn FnMut(&str, &PendingCode),
    ) -> Result<u64, StoreError>;
    fn pending_codes(&self) -> Result<Vec<(String, Purpose, PendingCode)>, StoreError>;

    /// Marks a token id as used up until `exp`. True if it was not marked before: the
    /// caller that gets true is the one that used it.
    fn revoke(&self, jti: &str, exp: i64) -> Result<bool, StoreError>;
    fn revocations(&self) -> Result<Vec<(String, i64)>, StoreError>;
    /// Forgets revocations of tokens that have expired anyway.
    fn prune_revocations(&self, now: i64) -> Result<usize, StoreError>;

    /// Adds one to a counter in window `window` unless it has reached `limit`. Ok(new
    /// value), or Err(current value) when at the limit. Atomic.
    fn count_up(
        &self,
        counter: Counter,
        window: i64,
        subject: &str,
        limit: u64,
    ) -> Result<Result<u64, u64>, StoreError>;
    /// Takes one back (a send that failed should not cost quota).
    fn count_down(&self, counter: Counter, window: i64, subject: &str) -> Result<(), StoreError>;
    fn count(&self, counter: Counter, window: i64, subject: &str) -> Result<u64, StoreError>;
    /// Sets a counter outright, for a caller that counts in memory and stores ahead (the
    /// service's daily budget): one writer per counter, so no compare-and-swap.
    fn set_count(
        &self,
        counter: Counter,
        window: i64,
        subject: &str,
        value: u64,
    ) -> Result<(), StoreError>;
    /// Drops counters of windows before `oldest_kept` (per counter kind).
    fn prune_counters(&self, oldest_kept: &dyn Fn(Counter) -> i64) -> Result<usize, StoreError>;
    /// Every user, in id order (admin listing).
    fn users(&self) -> Result<Vec<User>, StoreError>;
    /// Removes the user, its phone index entry and its login methods (gone for every
    /// reader at once, crashes included), and counts it out of `users_total`. Ids are never given out again, so an old token
    /// cannot pass for a later user. None if there was no such user.
    fn delete_user(&self, id: UserId) -> Result<Option<User>, StoreError>;
    /// Hands every stored record to `sink` as (tree, key, value), tree by tree in key
    /// order. Writes wait while it runs, so the records form one consistent state across
    /// trees (never half of a multi-tree change). Keep `sink` fast: it holds up writers.
    fn snapshot(&self, sink: &mut RecordSink<'_>) -> Result<(), StoreError>;
    /// Writes one record of a snapshot as it is. Only for restoring into a new, empty
    /// store: it bypasses every rule the other methods keep.
    fn import(&self, tree: &str, key: &[u8], value: &[u8]) -> Result<(), StoreError>;

    /// Makes every write made before the call durable.
    fn flush(&self) -> BoxFuture<'_, Result<(), StoreError>>;
    /// Bytes on disk, for metrics.
    fn size_on_disk(&self) -> u64;
}
