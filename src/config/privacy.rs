//! `[privacy]`: where the phone key comes from ([`crate::privacy`]), and what is kept
//! about each account's own use of the service.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrivacyConfig {
    /// The phone key: a file of 32 random bytes (raw or base64). Empty: with sled,
    /// `data_dir/phone.key`, made on first start; PostgreSQL refuses to start without it.
    pub phone_key_file: PathBuf,
    /// Days an entry of an account's login activity is kept; the housekeeping pass
    /// deletes older ones.
    pub activity_retention_days: u32,
}

impl Default for PrivacyConfig {
    fn default() -> Self {
        Self {
            phone_key_file: PathBuf::new(),
            activity_retention_days: 90,
        }
    }
}
