//! Mutual exclusion per key (a phone number) without a lock per key: a fixed set of
//! mutexes, one picked by the key's hash. Two keys may share a lock, which only costs a
//! short wait; the work held under one must be short and never await.

use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard, PoisonError};

pub struct KeyLocks {
    locks: Box<[Mutex<()>]>,
    /// Seeded per process, so keys that share a lock cannot be chosen from outside.
    hasher: foldhash::fast::RandomState,
}

impl KeyLocks {
    pub fn new(count: usize) -> Self {
        KeyLocks {
            locks: (0..count.max(1)).map(|_| Mutex::new(())).collect(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    /// Held until the guard drops. Nothing is kept under the lock itself, so one poisoned
    /// by a panic elsewhere is still good.
    pub fn lock(&self, key: &str) -> MutexGuard<'_, ()> {
        let i = self.hasher.hash_one(key) as usize % self.locks.len();
        self.locks[i].lock().unwrap_or_else(PoisonError::into_inner)
    }
}
