//! Several smsauth instances on one PostgreSQL that the test starts itself: the cluster
//! mode, as nginx would see it. Each instance has its own data dir and port; the
//! database is the only thing they share.

use std::sync::Arc;

use super::TestServer;
use super::postgres::Postgres;

pub struct Cluster {
    /// The database's own cluster, to stop, kill and start again in fault tests.
    pub pg: Postgres,
    /// The URL every instance uses.
    pub url: String,
    /// The configuration every instance shares, apart from its port and data dir.
    pub extra: String,
    /// The phone key file every instance reads (a PostgreSQL store needs one).
    pub phone_key: std::path::PathBuf,
    _key_dir: tempfile::TempDir,
}

impl Cluster {
    /// A fresh PostgreSQL and the configuration `extra` (TOML; no `[storage]` table of
    /// its own). None, with a message, where PostgreSQL is not installed and
    /// REQUIRE_POSTGRES_TESTS is unset.
    pub fn new(extra: &str) -> Option<Cluster> {
        let pg = Postgres::start()?;
        let url = pg.url();
        let key_dir = tempfile::tempdir().expect("temp dir");
        let phone_key = super::phone_key_file(key_dir.path());
        Some(Cluster {
            pg,
            url,
            extra: extra.to_owned(),
            phone_key,
            _key_dir: key_dir,
        })
    }

    /// The `[storage]` part of every instance's configuration.
    pub fn storage_toml(&self) -> String {
        format!(
            "[privacy]\nphone_key_file = \"{}\"\n[storage]\nengine = \"postgres\"\n[storage.postgres]\nurl = \"{}\"\nconnect_timeout_secs = 10\nstatement_timeout_ms = 1000\n",
            self.phone_key.display(),
            self.url
        )
    }

    /// A new instance on its own data dir and port.
    pub async fn instance(&self) -> TestServer {
        let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
        // Under TEST_STORAGE_ENGINE=postgres the harness would give the dir a database of
        // its own; this is the one it finds there instead.
        std::fs::write(dir.path().join("postgres.url"), &self.url).expect("write url");
        // And the key it would give the dir: the cluster's, as every instance has.
        std::fs::copy(&self.phone_key, dir.path().join("phone.key")).expect("copy the key");
        TestServer::start_in(dir, &format!("{}{}", self.storage_toml(), self.extra)).await
    }

    /// Two instances, A and B.
    pub async fn pair(&self) -> (TestServer, TestServer) {
        (self.instance().await, self.instance().await)
    }
}
