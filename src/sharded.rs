//! A fixed set of mutexes, one picked by a key's hash: mutual exclusion per key (a phone
//! number) without a lock per key, and the shards of our small bounded maps. Two keys may
//! share a shard, which only costs a short wait; the work held under one must be short
//! and never await.

use std::borrow::Borrow;
use std::collections::HashMap;
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

/// A map of at most about `capacity` entries in shards of plain maps, for what may be
/// forgotten or found again (checked tokens, resend times). A full shard first drops its stale entries, and if none are, empties: that
/// bounds memory without a cache's bookkeeping, which costs more than the lookup on our
/// hot paths (moka's insert and lookup were each 2 to 5% of a send-code, a shard's map a
/// fraction of that).
pub struct BoundedMap<K, V> {
    shards: Sharded<HashMap<K, V, foldhash::fast::RandomState>>,
    per_shard: usize,
}

impl<K: Hash + Eq, V: Clone> BoundedMap<K, V> {
    pub fn new(capacity: usize, shards: usize) -> Self {
        let shards = shards.max(1);
        BoundedMap {
            shards: Sharded::new(shards),
            per_shard: capacity.div_ceil(shards).max(1),
        }
    }

    pub fn get<Q: Hash + Eq + ?Sized>(&self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
    {
        self.shards.lock(key).get(key).cloned()
    }

    /// Inserts or replaces. `stale` says which entries a full shard may drop first.
    pub fn insert(&self, key: K, value: V, stale: impl Fn(&V) -> bool) {
        let mut shard = self.shards.lock(&key);
        if shard.len() >= self.per_shard && !shard.contains_key(&key) {
            shard.retain(|_, v| !stale(v));
            if shard.len() >= self.per_shard {
                shard.clear();
            }
        }
        shard.insert(key, value);
    }

    pub fn remove<Q: Hash + Eq + ?Sized>(&self, key: &Q)
    where
        K: Borrow<Q>,
    {
        self.shards.lock(key).remove(key);
    }

    /// Drops every stale entry (the periodic clean-up), one shard at a time.
    pub fn retain_fresh(&self, stale: impl Fn(&V) -> bool) {
        for mut shard in self.shards.each() {
            shard.retain(|_, v| !stale(v));
        }
    }

    #[cfg(test)]
    pub fn entries(&self) -> usize {
        self.shards.each().map(|shard| shard.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_shard_drops_stale_entries_first_and_stays_bounded() {
        let map = BoundedMap::new(64, 4);
        // Odd values are stale. Far more keys than fit: the bound holds throughout.
        for i in 0..10_000u32 {
            map.insert(i, i, |v| v % 2 == 1);
            assert!(map.entries() <= 64, "{} entries", map.entries());
            assert_eq!(map.get(&i), Some(i), "the entry just put is kept");
        }
        // A full shard of fresh entries is emptied rather than grown.
        let map = BoundedMap::new(8, 1);
        for i in 0..8u32 {
            map.insert(i, i, |_| false);
        }
        map.insert(100, 100, |_| false);
        assert_eq!(map.entries(), 1);
        // With stale entries to drop, the fresh ones stay.
        let map = BoundedMap::new(8, 1);
        for i in 0..8u32 {
            map.insert(i, i, |_| false);
        }
        map.insert(100, 100, |v| *v < 4);
        assert_eq!(map.entries(), 5);
        assert_eq!(map.get(&7), Some(7));
        map.retain_fresh(|v| *v == 100);
        assert_eq!(map.get(&100), None);
        assert_eq!(map.entries(), 4);
    }
}
