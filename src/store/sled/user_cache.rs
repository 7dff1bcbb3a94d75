//! Decoded user records of recently used ids, in front of the users tree. Every
//! authenticated request reads its user (is it enabled, is its session generation the
//! token's?), and a sled read plus decoding was a tenth of GET /me.
//!
//! Only the store's own writes change users, and each one calls [`UserCache::forget`]
//! after it has written. A read that missed fills the cache only if no write to its shard
//! came in between (the shard's epoch): otherwise a read that fetched the old record just
//! before a write could put it back after the write had forgotten it. So a write is seen
//! by every read that starts after the write returns, as without the cache.

use std::collections::HashMap;

use crate::model::{User, UserId};
use crate::sharded::Sharded;

const SHARDS: usize = 16;

#[derive(Default)]
struct Shard {
    users: HashMap<UserId, User, foldhash::fast::RandomState>,
    /// Bumped by every write to a user of this shard.
    epoch: u64,
}

/// At most `per_shard` users per shard (`memory.user_cache_entries` in all); a full
/// shard is emptied and refilled by later reads.
pub struct UserCache {
    shards: Sharded<Shard>,
    per_shard: usize,
}

/// What a read that missed must show to fill the cache: the epoch it started in.
#[derive(Debug)]
pub struct Miss(u64);

impl UserCache {
    pub fn new(capacity: usize) -> Self {
        UserCache {
            shards: Sharded::new(SHARDS),
            per_shard: (capacity / SHARDS).max(1),
        }
    }

    pub fn get(&self, id: UserId) -> Result<User, Miss> {
        let shard = self.shards.lock(&id);
        shard.users.get(&id).cloned().ok_or(Miss(shard.epoch))
    }

    /// Keeps `user`, read from the store after `miss`, unless a write came in between.
    pub fn fill(&self, user: &User, miss: Miss) {
        let mut shard = self.shards.lock(&user.id);
        if shard.epoch != miss.0 {
            return;
        }
        if shard.users.len() >= self.per_shard {
            shard.users.clear();
        }
        shard.users.insert(user.id, user.clone());
    }

    /// Called after every write to user `id`.
    pub fn forget(&self, id: UserId) {
        let mut shard = self.shards.lock(&id);
        shard.users.remove(&id);
        shard.epoch += 1;
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards.each().map(|shard| shard.users.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPACITY: usize = 1_024;

    fn user(id: UserId, nickname: &str) -> User {
        User {
            id,
            phone: format!("+86138{id:08}"),
            nickname: nickname.into(),
            created_at: 0,
            last_login_at: None,
            disabled: false,
            session_gen: 0,
            avatar_url: None,
        }
    }

    #[test]
    fn a_read_that_raced_a_write_does_not_put_the_old_record_back() {
        let cache = UserCache::new(CAPACITY);
        let miss = cache.get(7).unwrap_err();
        // The read fetched the old record; a write lands and forgets before the fill.
        cache.forget(7);
        cache.fill(&user(7, "old"), miss);
        assert!(cache.get(7).is_err());
        let miss = cache.get(7).unwrap_err();
        cache.fill(&user(7, "new"), miss);
        assert_eq!(cache.get(7).unwrap().nickname, "new");
        cache.forget(7);
        assert!(cache.get(7).is_err());
    }

    #[test]
    fn memory_stays_under_its_bound() {
        let cache = UserCache::new(CAPACITY);
        for id in 0..(3 * CAPACITY as u64) {
            let miss = cache.get(id).unwrap_err();
            cache.fill(&user(id, "n"), miss);
            assert!(cache.get(id).is_ok(), "the user just read is kept");
            assert!(cache.len() <= CAPACITY);
        }
    }
}
