//! A fixed set of mutexes, one picked by a key's hash: mutual exclusion per key (a phone
//! number) without a lock per key, and the shards of our small bounded maps. Two keys may
//! share a shard, which only costs a short wait; the work held under one must be short
//! and never await.

use std::hash::{BuildHasher, Hash};
use std::sync::{Mutex, MutexGuard, PoisonError};

pub struct Sharded<T> {
    shards: Box<[Mutex<T>]>,
    /// Seeded per process, so keys that share a shard cannot be chosen from outside. A
    /// map kept in a shard needs a hasher of its own: with this one, the low bits of its
    /// keys' hashes would all be the same.
    pick: foldhash::fast::RandomState,
}

/// Locks that serialize the changes to one key; nothing is kept under them.
pub type KeyLocks = Sharded<()>;

impl<T: Default> Sharded<T> {
    pub fn new(count: usize) -> Self {
        Sharded {
            shards: (0..count.max(1)).map(|_| Mutex::default()).collect(),
            pick: foldhash::fast::RandomState::default(),
        }
    }
}

impl<T> Sharded<T> {
    /// The shard of `key`, held until the guard drops. A poisoned one is used as it is:
    /// what is kept under these locks is changed one whole operation at a time, so a
    /// panic elsewhere cannot leave it half changed.
    pub fn lock<K: Hash + ?Sized>(&self, key: &K) -> MutexGuard<'_, T> {
        let i = self.pick.hash_one(key) as usize % self.shards.len();
        self.shards[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Every shard in turn, each held only while it is looked at.
    pub fn each(&self) -> impl Iterator<Item = MutexGuard<'_, T>> {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner))
    }
}
