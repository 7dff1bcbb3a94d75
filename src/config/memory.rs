//! `[memory]`: the bound of every in-memory cache and map, in entries. Each one only
//! saves work (the store stays the authority) or, for the resend waits, holds what a
//! bound must not lose; their byte costs, measured, are in config.example.toml. sled's
//! page cache is `storage.cache_capacity_mb`, the per-address limiters'
//! `limits.max_tracked_ips`.

use serde::{Deserialize, Serialize};

use super::{ConfigError, err};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryConfig {
    /// sled engine: pending codes kept decoded in memory, in front of their tree.
    pub code_cache_entries: u64,
    /// sled engine: decoded users of recently used ids, in front of their tree.
    pub user_cache_entries: usize,
    /// Session tokens whose signature check is remembered (both engines).
    pub token_cache_entries: usize,
    /// sled engine: phones whose resend interval is remembered. A full map drops the
    /// intervals that are over first; only one full of running intervals lets a phone be
    /// sent to early (the per-phone daily cap still holds).
    pub resend_wait_entries: usize,
    /// sled engine: answers of captchas not yet used or expired.
    pub captcha_entries: u64,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            code_cache_entries: 20_000,
            user_cache_entries: 16_384,
            token_cache_entries: 16_384,
            resend_wait_entries: 100_000,
            captcha_entries: 50_000,
        }
    }
}

impl MemoryConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        // Below these, the sharded maps would hold less than one entry per shard.
        for (name, value, min) in [
            ("code_cache_entries", self.code_cache_entries as usize, 100),
            ("user_cache_entries", self.user_cache_entries, 100),
            ("token_cache_entries", self.token_cache_entries, 100),
            ("resend_wait_entries", self.resend_wait_entries, 1_000),
            ("captcha_entries", self.captcha_entries as usize, 100),
        ] {
            if value < min {
                return Err(err(format!(
                    "configuration key `memory.{name}`: must be at least {min}"
                )));
            }
        }
        Ok(())
    }
}
