//! The shared engine: every part of [`super::Store`] in one PostgreSQL database, so any
//! number of instances behind a proxy act as one service. Each instance is stateless
//! apart from its pool; nothing it answers comes from a cache another instance could
//! have made stale.
//!
//! - Every check-and-change is one statement (`INSERT ... ON CONFLICT ... RETURNING`,
//!   `DELETE ... RETURNING`, `UPDATE ... WHERE ... RETURNING`), so it is atomic across
//!   instances and costs one round trip. Each statement commits on its own before its
//!   call returns: a 2xx is only ever sent after the commit.
//! - Statements are prepared once per connection (deadpool's statement cache).
//! - An unreachable or overloaded database is [`StoreError::Unavailable`] (503 to the
//!   client), never a hang: the pool's wait, the connect and every statement have
//!   deadlines (`statement_timeout_ms`).
//! - The schema is versioned (`smsauth_schema`) and migrated at start under an advisory
//!   lock, so instances starting together migrate once.

mod activity;
mod backup;
mod codes;
mod grants;
mod limits;
mod metrics;
mod privacy;
mod rotation;
mod sessions;
mod users;
mod wechat;

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use super::{BoxFuture, Engine, Keys, NamedKey, StoreError};
use crate::config::{LimitsConfig, PostgresConfig};

type Result<T> = std::result::Result<T, StoreError>;

/// The schema this release writes; numbered scripts take a database from one to the next.
const SCHEMA_VERSION: i32 = 6;
const MIGRATIONS: [&str; 6] = [
    include_str!("schema_1.sql"),
    include_str!("schema_2.sql"),
    include_str!("schema_3.sql"),
    include_str!("schema_4.sql"),
    include_str!("schema_5.sql"),
    include_str!("schema_6.sql"),
];
/// Where a script stops for the phone numbers to be sealed ([`privacy`]), in the same
/// transaction, before the rest of it runs.
const SEAL_HERE: &str = "-- smsauth: the phone numbers are sealed here";
/// Any fixed number: the advisory lock every instance takes while it migrates.
const MIGRATION_LOCK: i64 = 0x0073_6d73_6175_7468; // "smsauth"

pub struct PgStore {
    pool: Pool,
    /// How long one operation may take in all: the wait for a connection and the
    /// statement. Past it the caller gets `Unavailable`.
    deadline: Duration,
    /// The per-address quotas, as GCRA parameters.
    quotas: limits::Quotas,
    /// The daily budget reserved by this instance and not used yet.
    budget: limits::ReservedBudget,
    /// Host and port, for messages (never the password).
    target: String,
    metrics: metrics::PgMetrics,
    /// For [`super::Snapshots`], which is called from a blocking thread.
    runtime: tokio::runtime::Handle,
    /// Seals the phone of every user row and indexes every phone. The key comes from a
    /// file every instance reads; the database only holds its id.
    vault: std::sync::Arc<crate::privacy::PhoneVault>,
}

/// A database error as the store's: what says "not now" is `Unavailable`.
fn classify(e: tokio_postgres::Error) -> StoreError {
    let unavailable = match e.code() {
        None => true, // the connection: refused, closed or broken
        Some(code) => {
            code.code().starts_with("08") // connection exception
                || [
                    &SqlState::ADMIN_SHUTDOWN,
                    &SqlState::CRASH_SHUTDOWN,
                    &SqlState::CANNOT_CONNECT_NOW,
                    &SqlState::TOO_MANY_CONNECTIONS,
                    &SqlState::QUERY_CANCELED, // statement_timeout
                    &SqlState::T_R_SERIALIZATION_FAILURE,
                    &SqlState::T_R_DEADLOCK_DETECTED,
                ]
                .contains(&code)
        }
    };
    let detail = detail(&e);
    if unavailable {
        StoreError::Unavailable(detail)
    } else {
        StoreError::Engine(detail)
    }
}

/// tokio-postgres says only "db error" or "error connecting to server" itself; the
/// server's words, or the socket's, are its source.
fn detail(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({}): {}", e, db.code().code(), db.message()),
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}

/// Why a start gives up at once on this answer of the server: waiting will not mend it.
fn refusal(code: &SqlState) -> Option<&'static str> {
    if code == &SqlState::INVALID_PASSWORD || code == &SqlState::INVALID_AUTHORIZATION_SPECIFICATION
    {
        Some("the credentials in storage.postgres.url were refused")
    } else if code == &SqlState::INVALID_CATALOG_NAME {
        Some(
            "the database named in storage.postgres.url does not exist (see docs: create it first)",
        )
    } else {
        None
    }
}

fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => classify(e),
        other => StoreError::Unavailable(format!("connection pool: {other}")),
    }
}

impl PgStore {
    /// Connects (retrying for `connect_timeout_secs` while the database does not
    /// answer), migrates the schema under an advisory lock and builds the pool.
    pub async fn open(
        cfg: &PostgresConfig,
        limits: &LimitsConfig,
        phone_key: crate::privacy::PhoneKey,
    ) -> anyhow::Result<PgStore> {
        let mut pg: tokio_postgres::Config = cfg.url.expose().parse().map_err(|e| {
            // The parser's message never holds the password; the URL might.
            anyhow::anyhow!("configuration key `storage.postgres.url`: not a PostgreSQL URL ({e})")
        })?;
        let target = describe(&pg);
        let statement = Duration::from_millis(cfg.statement_timeout_ms);
        pg.options(format!("-c statement_timeout={}", cfg.statement_timeout_ms));
        pg.application_name("smsauth");
        pg.connect_timeout(statement.max(Duration::from_secs(1)));
        let manager = Manager::from_config(
            pg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        // A request waits this long for a connection at most, and a new connection takes
        // this long at most: together with the statement's own, the deadline.
        let wait = statement;
        let pool = Pool::builder(manager)
            .max_size(cfg.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(wait))
            .create_timeout(Some(wait))
            .recycle_timeout(Some(wait))
            .build()
            .map_err(|e| anyhow::anyhow!("PostgreSQL pool: {e}"))?;
        let store = PgStore {
            pool,
            deadline: wait + statement,
            quotas: limits::Quotas::new(limits),
            budget: limits::ReservedBudget::default(),
            target,
            metrics: metrics::PgMetrics::new(),
            runtime: tokio::runtime::Handle::current(),
            vault: crate::privacy::PhoneVault::new(phone_key),
        };
        store
            .wait_until_up(Duration::from_secs(cfg.connect_timeout_secs))
            .await?;
        store.migrate().await?;
        Ok(store)
    }

    /// The phone keys this store seals and indexes with.
    pub fn vault(&self) -> std::sync::Arc<crate::privacy::PhoneVault> {
        self.vault.clone()
    }

    /// Tries to connect until the database answers or `patience` runs out. Refused
    /// credentials or a missing database end it at once: waiting will not mend those.
    async fn wait_until_up(&self, patience: Duration) -> anyhow::Result<()> {
        let give_up = tokio::time::Instant::now() + patience;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let err = match self.pool.get().await {
                Ok(_) => return Ok(()),
                Err(deadpool_postgres::PoolError::Backend(e)) => {
                    if let Some(why) = e.code().and_then(refusal) {
                        anyhow::bail!("PostgreSQL at {}: {why}: {}", self.target, detail(&e));
                    }
                    detail(&e)
                }
                Err(other) => other.to_string(),
            };
            tracing::warn!(target_db = %self.target, attempt, error = %err, "PostgreSQL does not answer yet; retrying");
            if tokio::time::Instant::now() >= give_up {
                anyhow::bail!(
                    "PostgreSQL at {} did not answer within {} s: {err}",
                    self.target,
                    patience.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Brings the schema to [`SCHEMA_VERSION`] in one transaction under the advisory
    /// lock; a database of a newer release is refused untouched.
    async fn migrate(&self) -> anyhow::Result<()> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = client.transaction().await.map_err(classify)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(classify)?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS smsauth_schema (version integer NOT NULL)")
            .await
            .map_err(classify)?;
        let found: i32 = match tx
            .query_opt("SELECT version FROM smsauth_schema", &[])
            .await
            .map_err(classify)?
        {
            Some(row) => row.get(0),
            None => 0,
        };
        if found > SCHEMA_VERSION {
            return Err(StoreError::Schema(format!(
                "the database has schema version {found}, this smsauth knows up to {SCHEMA_VERSION}; use a newer release"
            ))
            .into());
        }
        let mut sealed = false;
        for (i, script) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            match script.split_once(SEAL_HERE) {
                Some((before, after)) => {
                    tx.batch_execute(before).await.map_err(classify)?;
                    self.seal_plain_rows(&tx).await?;
                    sealed = found > 0;
                    tx.batch_execute(after).await.map_err(classify)?;
                }
                None => tx.batch_execute(script).await.map_err(classify)?,
            }
            tracing::info!(version = i + 1, "PostgreSQL schema migrated");
        }
        if found == 0 {
            tx.execute(
                "INSERT INTO smsauth_schema (version) VALUES ($1)",
                &[&SCHEMA_VERSION],
            )
            .await
            .map_err(classify)?;
        } else if found < SCHEMA_VERSION {
            tx.execute("UPDATE smsauth_schema SET version = $1", &[&SCHEMA_VERSION])
                .await
                .map_err(classify)?;
        }
        self.check_phone_key(&tx).await?;
        tx.commit().await.map_err(classify)?;
        if sealed {
            // An update leaves the row it replaced in the table's files until a vacuum:
            // rewritten now, so no number in the clear stays behind in them.
            // One statement per call: several would be one transaction, where VACUUM
            // cannot run.
            for sql in [
                "SET statement_timeout = 0",
                "VACUUM FULL users, login_methods, pending_codes, resend_waits, counters",
                "RESET statement_timeout",
            ] {
                client.batch_execute(sql).await.map_err(classify)?;
            }
            tracing::info!("PostgreSQL tables rewritten: no number in the clear is left in them");
        }
        Ok(())
    }

    /// Runs `work` on a pooled connection within the deadline; `op` names it in metrics.
    async fn with_client<T>(
        &self,
        op: &'static str,
        work: impl AsyncFnOnce(
            &mut deadpool_postgres::Client,
        ) -> std::result::Result<T, tokio_postgres::Error>,
    ) -> Result<T> {
        let run = async {
            let asked = std::time::Instant::now();
            let mut client = self.pool.get().await.map_err(pool_error)?;
            let got = std::time::Instant::now();
            self.metrics.pool_wait.observe((got - asked).as_secs_f64());
            // A transaction cut short by the deadline is rolled back as it is dropped.
            let result = work(&mut client).await.map_err(classify);
            self.metrics
                .statements
                .get_or_create(&metrics::OpLabels { op })
                .observe(got.elapsed().as_secs_f64());
            result
        };
        match tokio::time::timeout(self.deadline, run).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Unavailable(format!(
                "PostgreSQL at {} did not answer within {} ms",
                self.target,
                self.deadline.as_millis()
            ))),
        }
    }

    async fn query_opt(
        &self,
        op: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>> {
        self.with_client(op, async |c| {
            let statement = c.prepare_cached(sql).await?;
            c.query_opt(&statement, params).await
        })
        .await
    }

    async fn query(
        &self,
        op: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>> {
        self.with_client(op, async |c| {
            let statement = c.prepare_cached(sql).await?;
            c.query(&statement, params).await
        })
        .await
    }

    async fn execute(
        &self,
        op: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64> {
        self.with_client(op, async |c| {
            let statement = c.prepare_cached(sql).await?;
            c.execute(&statement, params).await
        })
        .await
    }
}

/// `host:port` of the first host, for messages: never the user or password.
fn describe(pg: &tokio_postgres::Config) -> String {
    let host = match pg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}")
}

impl Engine for PgStore {
    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        // Every statement has committed before its call returned.
        super::ready(Ok(()))
    }

    fn ready(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { self.query_opt("ready", "SELECT 1", &[]).await.map(|_| ()) })
    }

    fn size_on_disk(&self) -> BoxFuture<'_, Result<u64>> {
        Box::pin(async move {
            let row = self
                .query_opt(
                    "size_on_disk",
                    "SELECT pg_database_size(current_database())",
                    &[],
                )
                .await?;
            Ok(row.map_or(0, |r| r.get::<_, i64>(0).max(0) as u64))
        })
    }

    fn maintain(&self) -> BoxFuture<'_, Result<()>> {
        super::ready(Ok(())) // PostgreSQL's autovacuum does the upkeep
    }

    fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.metrics.register(registry);
    }

    fn observe(&self) {
        let status = self.pool.status();
        let m = &self.metrics;
        m.pool_max.set(status.max_size as i64);
        m.pool_size.set(status.size as i64);
        m.pool_in_use
            .set(status.size.saturating_sub(status.available) as i64);
        m.pool_waiting.set(status.waiting as i64);
    }
}

impl Keys for PgStore {
    fn key_or_insert<'a>(
        &'a self,
        name: &'a str,
        fresh: Vec<u8>,
    ) -> BoxFuture<'a, Result<Vec<u8>>> {
        Box::pin(async move {
            // Two statements: the second reads after the first has seen any racing
            // instance's insert commit, so every instance gets the one key kept.
            self.execute(
                "key_or_insert",
                "INSERT INTO server_keys (name, key) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
                &[&name, &fresh],
            )
            .await?;
            let row = self
                .query_opt(
                    "key_or_insert",
                    "SELECT key FROM server_keys WHERE name = $1",
                    &[&name],
                )
                .await?
                .ok_or_else(|| StoreError::Engine(format!("server key {name} vanished")))?;
            Ok(row.get(0))
        })
    }

    fn key<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>>> {
        Box::pin(async move {
            let row = self
                .query_opt(
                    "key",
                    "SELECT key FROM server_keys WHERE name = $1",
                    &[&name],
                )
                .await?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    fn replace_key<'a>(
        &'a self,
        name: &'a str,
        current: &'a [u8],
        new: Vec<u8>,
    ) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            // Compare and swap in one statement: of racing instances, one row update wins.
            let changed = self
                .execute(
                    "replace_key",
                    "UPDATE server_keys SET key = $3 WHERE name = $1 AND key = $2",
                    &[&name, &current, &new],
                )
                .await?;
            Ok(changed == 1)
        })
    }

    fn export_keys(&self) -> BoxFuture<'_, Result<Vec<NamedKey>>> {
        Box::pin(async move {
            let rows = self
                .query(
                    "export_keys",
                    "SELECT name, key FROM server_keys ORDER BY name",
                    &[],
                )
                .await?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }
}
