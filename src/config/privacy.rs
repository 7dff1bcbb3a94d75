//! `[privacy]`: where the phone key comes from ([`crate::privacy`]).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrivacyConfig {
    /// The phone key: a file of 32 random bytes (raw or base64). Empty: with sled,
    /// `data_dir/phone.key`, made on first start; PostgreSQL refuses to start without it.
    pub phone_key_file: PathBuf,
}
