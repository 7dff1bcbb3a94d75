//! `--engine postgres`: the scenarios that touch the store (send-code, the sms-logins,
//! me) on the PostgreSQL engine, as a cluster runs it: the release binary (`smsauth
//! serve`) as processes of their own on one database of a throwaway PostgreSQL that the
//! bench starts, and stops at the end. One instance, then two on a fresh database, with
//! the client's connections split evenly across them.
//!
//! The data is prepared as in the sled mode, through the engine itself: the bench opens
//! the same database with `Store::open` and writes users and pending codes through its
//! parts, with the code key it makes before any instance starts (so they all find and
//! use it) and the token secret of the configuration.
//!
//! Besides the sled figures, each row has what a cluster is sized by: each instance's
//! peak RSS, PostgreSQL's RSS, and the SQL statements a request costs, read from each
//! instance's `/metrics`.

#[allow(dead_code)] // the tests' harness, of which the bench uses a part
#[path = "../../tests/common/postgres.rs"]
mod harness;

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use http::StatusCode;
use http_body_util::BodyExt;
use serde::Serialize;

use smsauth::codes::Codes;
use smsauth::model::{Purpose, User};
use smsauth::phone::{IndexedPhone, Phone};
use smsauth::store::{PhoneVault, Store};
use smsauth::token::Tokens;

use super::{
    Bench, FIXED_CODE, Load, ME_USERS, MakeRequest, Opts, Raw, Stats, Target, bench_config,
    bench_user, e164, fmt_ms, free_port, get_once, load_config, me_requests, measure, national,
    new_user, post_json, serve, sms_logins, status_kib,
};

/// The scenarios run here, in this order (as in the sled mode).
const SCENARIOS: [&str; 4] = ["send-code", "sms-login-existing", "sms-login-new", "me"];
/// Instances per run: one, then two sharing the database.
const INSTANCE_COUNTS: [usize; 2] = [1, 2];
/// The cluster's settings that the figures depend on; set if initdb chose otherwise.
/// Durability stays as in production: every acknowledged write is on disk.
const SETTINGS: [(&str, &str); 4] = [
    ("shared_buffers", "128MB"),
    ("max_connections", "200"),
    ("fsync", "on"),
    ("synchronous_commit", "on"),
];
/// Each instance's pool and statement deadline: the defaults of `[storage.postgres]`.
const INSTANCE_POOL: usize = 16;
const STATEMENT_TIMEOUT_MS: u64 = 2000;
/// The bench's own store, which prepares the data: each user or code is a commit of its
/// own, so the fill is bound by round trips and runs this many at once.
const FILL_POOL: usize = 32;
const FILL_IN_FLIGHT: usize = 32;
const TOKEN_SECRET: &str = "bench-token-secret-of-at-least-32-characters";
/// The goals on this engine: (scenario, lowest ratio to the ceiling), and the p99 for all.
const TARGETS: [(&str, Option<f64>); 4] = [
    ("send-code", Some(0.03)),
    ("sms-login-existing", None),
    ("sms-login-new", Some(0.03)),
    ("me", Some(0.10)),
];
const TARGET_P99_MS: f64 = 50.0;
/// The ops of the periodic clean-up (`App::housekeeping`: at start, then every 60 s),
/// which no request runs: counted apart, so that a pass that falls inside a scenario does
/// not pass for what its requests cost.
const HOUSEKEEPING_OPS: [&str; 6] = [
    "sweep_codes",
    "prune_waits",
    "prune_captchas",
    "prune_counters",
    "prune_addresses",
    "prune_revocations",
];
/// Log lines of warnings and errors kept per scenario in the report.
const LOG_LINES_KEPT: usize = 5;

/// Statement counts by `op` label, as one scrape of `/metrics` reports them.
type Ops = BTreeMap<String, u64>;

/// What one scrape of an instance's /metrics says of its statements.
#[derive(Default)]
struct Scrape {
    /// `smsauth_postgres_statement_seconds_count` by op.
    counts: Ops,
    /// `smsauth_postgres_statement_seconds_sum` by op.
    seconds: BTreeMap<String, f64>,
    /// `smsauth_postgres_pool_wait_seconds`: the waits for a pooled connection.
    pool_wait_s: f64,
    pool_waits: u64,
}

#[derive(Serialize)]
pub struct PgReport {
    server_version: String,
    /// [`SETTINGS`] as the running cluster reports them (`SHOW`).
    settings: BTreeMap<String, String>,
    instance_pool_size: usize,
    statement_timeout_ms: u64,
    /// Logins per second that single-use codes were prepared for.
    pool_rate: f64,
    /// What `statements_per_request` is the quotient of.
    statements_per_request_is: &'static str,
    /// Whether VmHWM could be reset before each scenario (else it is the peak since start).
    peak_rss_per_scenario: bool,
    rows: Vec<PgRow>,
    targets: Vec<Target>,
}

const STATEMENTS_PER_REQUEST_IS: &str = "statements the instances ran during the scenario (sum \
     over op of smsauth_postgres_statement_seconds_count on each instance's /metrics, after \
     minus before, less the statements of the after-scrape itself and of the periodic \
     clean-up) / HTTP answers those instances gave during it, warm-ups and error answers \
     included";

#[derive(Serialize)]
struct PgRow {
    instances: usize,
    #[serde(flatten)]
    stats: Stats,
    /// The same scenario's sled row of this run, when sled ran too.
    sled_rps: Option<f64>,
    sled_ratio_to_ceiling: Option<f64>,
    /// After the scenario: VmRSS summed over the cluster's processes (the postmaster and
    /// its children). Shared memory (shared_buffers) counts once in every process that
    /// touched it, so this overstates: `postgres_pss_mib` shares each page out among the
    /// processes that map it (what the cluster holds), `postgres_rss_anon_mib` is the
    /// private part alone.
    postgres_rss_mib: f64,
    postgres_pss_mib: f64,
    postgres_rss_anon_mib: f64,
    postgres_processes: usize,
    statements: u64,
    answers: u64,
    statements_per_request: Option<f64>,
    /// Means over the instances' statements (see [`InstanceRow`]), in ms.
    statement_ms: Option<f64>,
    pool_wait_ms: Option<f64>,
    per_instance: Vec<InstanceRow>,
    /// WARN and ERROR lines of the instances' logs during the scenario (the first few).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    server_log: Vec<String>,
    server_log_lines: usize,
    /// ERROR, FATAL and WARNING lines of PostgreSQL's log during the scenario.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    postgres_log: Vec<String>,
}

#[derive(Serialize)]
struct InstanceRow {
    /// VmHWM of the process: its peak during the scenario (see `peak_rss_per_scenario`).
    peak_rss_mib: f64,
    answers: u64,
    statements: u64,
    statements_per_request: Option<f64>,
    /// Statements per op during the scenario, the clean-up's apart.
    ops: Ops,
    /// The mean time of a statement by op, in ms: from having the pooled connection to
    /// the answer (the round trip, PostgreSQL's work and, for a write, its commit).
    op_ms: BTreeMap<String, f64>,
    /// The same over all of them, and the mean wait for a pooled connection before one.
    statement_ms: Option<f64>,
    pool_wait_ms: Option<f64>,
    /// Statements of the periodic clean-up during the scenario ([`HOUSEKEEPING_OPS`]).
    housekeeping_statements: u64,
}

/// Runs [`SCENARIOS`] on one and then two instances; returns the report and the ceiling's
/// samples. `sled_rows`: this run's sled rows, to put beside.
pub async fn run(opts: &Opts, ceiling: SocketAddr, sled_rows: &[Stats]) -> (PgReport, Raw) {
    eprintln!("  postgres: starting a throwaway PostgreSQL...");
    let mut cluster = tokio::task::spawn_blocking(Cluster::start)
        .await
        .expect("start PostgreSQL");
    eprintln!(
        "  postgres: PostgreSQL {} on port {} ({})",
        cluster.version,
        cluster.pg.port(),
        cluster
            .settings
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut rows = Vec::new();
    let mut ceiling_all = Raw::default();
    let mut peak_reset = true;
    for n in INSTANCE_COUNTS {
        let run = run_instances(opts, ceiling, &mut cluster, n, sled_rows).await;
        rows.extend(run.rows);
        ceiling_all.add(run.ceiling);
        peak_reset &= run.peak_reset;
    }
    let report = PgReport {
        server_version: cluster.version.clone(),
        settings: cluster.settings.clone(),
        instance_pool_size: INSTANCE_POOL,
        statement_timeout_ms: STATEMENT_TIMEOUT_MS,
        pool_rate: opts.pg_pool_rate,
        statements_per_request_is: STATEMENTS_PER_REQUEST_IS,
        peak_rss_per_scenario: peak_reset,
        targets: targets(&rows),
        rows,
    };
    // Dropping the harness stops the cluster and removes its files.
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .expect("stop PostgreSQL");
    (report, ceiling_all)
}

struct InstancesRun {
    rows: Vec<PgRow>,
    ceiling: Raw,
    peak_reset: bool,
}

/// The scenarios on `n` instances sharing a new database of `cluster`.
async fn run_instances(
    opts: &Opts,
    ceiling: SocketAddr,
    cluster: &mut Cluster,
    n: usize,
    sled_rows: &[Stats],
) -> InstancesRun {
    let label = if n == 1 {
        "1 instance".to_owned()
    } else {
        format!("{n} instances")
    };
    // A database of its own: the first run's resend waits and used codes would get in
    // the way of this one's, and each run starts from the same empty tables.
    let url = cluster.pg.new_database();
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = load_config(
        dir.path(),
        &bench_config(
            &dir.path().join("bench-data"),
            "127.0.0.1:0",
            TOKEN_SECRET,
            3600,
            &storage_toml(&url, FILL_POOL),
        ),
    );
    let store = Store::open(&cfg).await.expect("open the PostgreSQL store");
    // Made before any instance starts, so that every instance finds this key and checks
    // the codes written with it. (The token key is `token.secret`, the same for all.)
    let code_key = store
        .keys
        .key_or_insert("code", smsauth::keys::fresh())
        .await
        .expect("code key");
    let codes = Codes::new(
        cfg.code.clone(),
        Some(FIXED_CODE.into()),
        code_key,
        store.codes.clone(),
        store.waits.clone(),
    );
    let tokens = Tokens::new(
        smsauth::signing::SigningKeys::open(
            &cfg,
            store.keys.clone(),
            Tokens::lifetime(cfg.token.access_ttl_secs),
        )
        .await
        .expect("token keys"),
        &cfg.token,
        store.sessions.clone(),
    );

    eprintln!("  postgres, {label}: starting `smsauth serve`");
    let mut instances = Vec::new();
    for i in 0..n {
        instances.push(Instance::start(dir.path(), i, &url).await);
    }
    let bench = Bench {
        opts: opts.clone(),
        ceiling,
        addrs: instances.iter().map(|i| i.addr).collect(),
    };
    // Logins consume their code: enough for every warm-up and slice at `pg_pool_rate`.
    let later_warmups = opts.warmup.min(Duration::from_millis(300)) * opts.rounds.saturating_sub(1);
    let pool =
        (opts.pg_pool_rate * (opts.warmup + later_warmups + opts.duration).as_secs_f64()) as u64;

    let mut out = InstancesRun {
        rows: Vec::new(),
        ceiling: Raw::default(),
        peak_reset: true,
    };
    for name in SCENARIOS.into_iter().filter(|s| opts.wants(s)) {
        eprintln!("  postgres, {label}: {name}: preparing");
        let prepared = Instant::now();
        let make = match name {
            "send-code" => send_codes(),
            "sms-login-existing" => {
                let users = fill_users(&store, 135, pool).await;
                let phones: Vec<String> = users.into_iter().map(|u| u.phone).collect();
                fill_codes(&codes, &store.phones, &phones).await;
                sms_logins(phones)
            }
            "sms-login-new" => {
                let phones: Vec<String> = (0..pool).map(|i| e164(&national(136, i))).collect();
                fill_codes(&codes, &store.phones, &phones).await;
                sms_logins(phones)
            }
            "me" => {
                let users = fill_users(&store, 138, ME_USERS).await;
                me_requests(Arc::new(
                    users
                        .iter()
                        .map(|u| {
                            tokens
                                .issue_session(u, &u.id.to_be_bytes().repeat(2).try_into().unwrap())
                                .token
                        })
                        .collect(),
                ))
            }
            other => unreachable!("no scenario {other}"),
        };
        eprintln!(
            "  postgres, {label}: {name} (prepared in {:.1} s)",
            prepared.elapsed().as_secs_f64()
        );
        let load = Load {
            name: name.into(),
            connections: opts.connections,
            make,
            expect: StatusCode::OK,
        };
        let scenario = Scenario {
            bench: &bench,
            cluster: &mut *cluster,
            instances: &mut instances,
            sled_rows,
        };
        let (row, ceiling, peak_reset) = scenario.measure(load).await;
        if !row.server_log.is_empty() || !row.postgres_log.is_empty() {
            eprintln!(
                "  postgres, {label}: {name}: {} warnings/errors in the instances' logs:\n    {}",
                row.server_log_lines,
                row.server_log
                    .iter()
                    .chain(&row.postgres_log)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("\n    ")
            );
        }
        out.rows.push(row);
        out.ceiling.add(ceiling);
        out.peak_reset &= peak_reset;
    }
    for instance in &mut instances {
        instance.stop();
    }
    out
}

/// `[storage]` lines for the PostgreSQL engine at `url`.
fn storage_toml(url: &str, pool_size: usize) -> String {
    format!(
        "engine = \"postgres\"\n[storage.postgres]\nurl = \"{url}\"\npool_size = {pool_size}\n\
         statement_timeout_ms = {STATEMENT_TIMEOUT_MS}\n"
    )
}

/// POST /sms/code to a new phone each time, as in the sled mode.
fn send_codes() -> MakeRequest {
    let next = AtomicU64::new(0);
    Arc::new(move |_, _| {
        let n = next.fetch_add(1, Ordering::Relaxed);
        Some(post_json(
            "/api/v1/sms/code",
            format!(r#"{{"phone":"{}"}}"#, national(139, n)),
        ))
    })
}

/// The users of national numbers `series`/0..n, created through the store with
/// [`FILL_IN_FLIGHT`] creates at once (the sled mode's `create_users` makes them one after
/// another on each core, which on this engine would wait out one commit at a time).
async fn fill_users(store: &Store, series: u32, n: u64) -> Vec<User> {
    futures::stream::iter(0..n)
        .map(|i| async move {
            let (phone, methods) = bench_user(series, i, None);
            let made = store
                .users
                .create_user_if_absent(new_user(&phone, &store.phones), &methods);
            made.await.expect("create user").0
        })
        .buffer_unordered(FILL_IN_FLIGHT)
        .collect()
        .await
}

/// A pending login code for each of `phones`, written by the codes module as
/// /sms/code would, [`FILL_IN_FLIGHT`] at once.
async fn fill_codes(codes: &Codes, vault: &PhoneVault, phones: &[String]) {
    futures::stream::iter(phones)
        .for_each_concurrent(FILL_IN_FLIGHT, |p| async move {
            let phone = IndexedPhone::new(Phone::from_e164(p.as_str()), vault);
            codes
                .put(&phone, Purpose::Login, FIXED_CODE)
                .await
                .expect("put code");
        })
        .await
}

/// What one scenario is measured on.
struct Scenario<'a> {
    bench: &'a Bench,
    cluster: &'a mut Cluster,
    instances: &'a mut [Instance],
    sled_rows: &'a [Stats],
}

impl Scenario<'_> {
    /// Measures `load` as the sled mode does, with each instance's statement counts and
    /// peak memory around it. Returns the row, the ceiling's samples and whether every
    /// instance's peak could be reset first.
    async fn measure(self, load: Load) -> (PgRow, Raw, bool) {
        let name = load.name.clone();
        let mut peak_reset = true;
        let mut before = Vec::new();
        for instance in self.instances.iter() {
            peak_reset &= instance.reset_peak();
            before.push(instance.scrape().await);
        }
        let (mut stats, ceiling) = measure(self.bench, vec![load]).await;
        let stats = stats.remove(0);
        let mut per_instance = Vec::new();
        let mut server_log = Vec::new();
        let mut server_log_lines = 0;
        // Seconds in statements and in pool waits, and the waits, over all instances.
        let (mut statement_s, mut wait_s, mut waits) = (0.0, 0.0, 0);
        for (i, (instance, before)) in self.instances.iter_mut().zip(before).enumerate() {
            let after = instance.scrape().await;
            let (housekeeping, ops): (Ops, Ops) =
                minus(&minus(&after.counts, &before.counts), &instance.scrape_cost)
                    .into_iter()
                    .partition(|(op, _)| HOUSEKEEPING_OPS.contains(&op.as_str()));
            let statements: u64 = ops.values().sum();
            let answers = stats.answered_by_address.get(i).copied().unwrap_or(0);
            let op_s = |op: &str| {
                let at = |s: &Scrape| s.seconds.get(op).copied().unwrap_or(0.0);
                at(&after) - at(&before)
            };
            let op_ms = ops
                .iter()
                .map(|(op, n)| (op.clone(), op_s(op) * 1000.0 / *n as f64))
                .collect();
            let instance_s: f64 = ops.keys().map(|op| op_s(op)).sum();
            let instance_waits = after.pool_waits.saturating_sub(before.pool_waits);
            let instance_wait_s = after.pool_wait_s - before.pool_wait_s;
            statement_s += instance_s;
            wait_s += instance_wait_s;
            waits += instance_waits;
            per_instance.push(InstanceRow {
                peak_rss_mib: status_kib(instance.pid(), "VmHWM:").unwrap_or(f64::NAN) / 1024.0,
                answers,
                statements,
                statements_per_request: per(statements, answers),
                ops,
                op_ms,
                statement_ms: mean_ms(instance_s, statements),
                pool_wait_ms: mean_ms(instance_wait_s, instance_waits),
                housekeeping_statements: housekeeping.values().sum(),
            });
            let lines = instance.new_warnings();
            server_log_lines += lines.len();
            let room = LOG_LINES_KEPT.saturating_sub(server_log.len());
            server_log.extend(
                lines
                    .into_iter()
                    .take(room)
                    .map(|l| format!("instance {i}: {l}")),
            );
        }
        let rss = self.cluster.rss();
        let sled = self.sled_rows.iter().find(|s| s.scenario == name);
        let statements = per_instance.iter().map(|i| i.statements).sum();
        let answers = per_instance.iter().map(|i| i.answers).sum();
        let row = PgRow {
            instances: self.instances.len(),
            sled_rps: sled.map(|s| s.rps),
            sled_ratio_to_ceiling: sled.and_then(|s| s.ratio_to_ceiling),
            postgres_rss_mib: rss.vm_rss_kib / 1024.0,
            postgres_pss_mib: rss.pss_kib / 1024.0,
            postgres_rss_anon_mib: rss.anon_kib / 1024.0,
            postgres_processes: rss.processes,
            statements,
            answers,
            statements_per_request: per(statements, answers),
            statement_ms: mean_ms(statement_s, statements),
            pool_wait_ms: mean_ms(wait_s, waits),
            per_instance,
            server_log,
            server_log_lines,
            postgres_log: self.cluster.new_errors(),
            stats,
        };
        (row, ceiling, peak_reset)
    }
}

fn per(statements: u64, answers: u64) -> Option<f64> {
    (answers > 0).then(|| statements as f64 / answers as f64)
}

fn mean_ms(seconds: f64, n: u64) -> Option<f64> {
    (n > 0).then(|| seconds * 1000.0 / n as f64)
}

/// `a - b` per op, dropping the zeros.
fn minus(a: &Ops, b: &Ops) -> Ops {
    a.iter()
        .map(|(op, n)| {
            (
                op.clone(),
                n.saturating_sub(b.get(op).copied().unwrap_or(0)),
            )
        })
        .filter(|(_, n)| *n > 0)
        .collect()
}

// ---------------------------------------------------------------------------------------
// The instances under test

/// One `smsauth serve` process on its own port and data dir (which holds only its admin
/// socket: the data is in the database).
struct Instance {
    child: Child,
    addr: SocketAddr,
    /// Its log (stdout, JSON lines), read for warnings and errors after each scenario.
    log: PathBuf,
    log_read: u64,
    /// The statements that a scrape of /metrics runs itself (its gauges are read from the
    /// database), taken off every after-minus-before.
    scrape_cost: Ops,
}

impl Instance {
    async fn start(dir: &Path, i: usize, url: &str) -> Instance {
        let home = dir.join(format!("instance-{i}"));
        std::fs::create_dir_all(&home).expect("instance dir");
        let port = free_port();
        let config_path = home.join("smsauth.toml");
        let config = bench_config(
            &home.join("data"),
            &format!("127.0.0.1:{port}"),
            TOKEN_SECRET,
            3600,
            &storage_toml(url, INSTANCE_POOL),
        );
        std::fs::write(&config_path, config).expect("write config");
        let log = home.join("smsauth.log");
        let file = std::fs::File::create(&log).expect("instance log");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let (child, _) = serve(&config_path, addr, Stdio::from(file)).await;
        let mut instance = Instance {
            child,
            addr,
            log,
            log_read: 0,
            scrape_cost: Ops::new(),
        };
        // Two scrapes in a row with nothing else going on: the second one's statements.
        let first = instance.scrape().await;
        instance.scrape_cost = minus(&instance.scrape().await.counts, &first.counts);
        instance
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The statement and pool figures of its /metrics.
    async fn scrape(&self) -> Scrape {
        let resp = get_once(self.addr, "/metrics").await.unwrap_or_else(|| {
            panic!(
                "instance {} does not answer /metrics; its log: {}",
                self.addr,
                self.log.display()
            )
        });
        assert_eq!(resp.status(), StatusCode::OK, "/metrics of {}", self.addr);
        let body = resp
            .into_body()
            .collect()
            .await
            .expect("metrics")
            .to_bytes();
        let mut scrape = Scrape::default();
        // Lines such as `smsauth_postgres_statement_seconds_count{op="put_code"} 1486`.
        for line in String::from_utf8_lossy(&body).lines() {
            let Some((key, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, op) = match key.split_once("{op=\"") {
                Some((name, rest)) => (name, rest.strip_suffix("\"}")),
                None => (key, None),
            };
            match (name, op) {
                ("smsauth_postgres_statement_seconds_count", Some(op)) => {
                    scrape.counts.insert(op.to_owned(), value as u64);
                }
                ("smsauth_postgres_statement_seconds_sum", Some(op)) => {
                    scrape.seconds.insert(op.to_owned(), value);
                }
                ("smsauth_postgres_pool_wait_seconds_sum", None) => scrape.pool_wait_s = value,
                ("smsauth_postgres_pool_wait_seconds_count", None) => {
                    scrape.pool_waits = value as u64
                }
                _ => {}
            }
        }
        scrape
    }

    /// Resets VmHWM to the current RSS (`clear_refs` 5), so that it reads the peak of
    /// what follows. False if the kernel refused.
    fn reset_peak(&self) -> bool {
        std::fs::write(format!("/proc/{}/clear_refs", self.pid()), "5").is_ok()
    }

    /// The WARN and ERROR lines logged since the last call.
    fn new_warnings(&mut self) -> Vec<String> {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.seek(SeekFrom::Start(self.log_read));
            let _ = f.read_to_string(&mut text);
        }
        // Up to the last whole line; a line being written is read next time.
        let whole = text.rfind('\n').map_or(0, |i| i + 1);
        self.log_read += whole as u64;
        text[..whole]
            .lines()
            .filter(|l| l.contains(r#""level":"WARN""#) || l.contains(r#""level":"ERROR""#))
            .map(str::to_owned)
            .collect()
    }

    /// SIGTERM, as systemd stops it, and the wait for its clean exit.
    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        match self.child.wait() {
            Ok(status) if status.success() => {}
            other => eprintln!("  postgres: instance {} stopped: {other:?}", self.addr),
        }
    }
}

impl Drop for Instance {
    /// A bench that panics must not leave servers running.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------
// The PostgreSQL cluster

/// The tests' throwaway cluster (own temp dir, port and socket dir), with [`SETTINGS`].
struct Cluster {
    pg: harness::Postgres,
    version: String,
    settings: BTreeMap<String, String>,
    postmaster: u32,
    /// How much of its log has been read for errors.
    log_read: usize,
}

struct Rss {
    processes: usize,
    vm_rss_kib: f64,
    pss_kib: f64,
    anon_kib: f64,
}

impl Cluster {
    /// Blocking: initdb, start, and a restart if a setting had to change.
    fn start() -> Cluster {
        let pg = harness::Postgres::start()
            .expect("--engine postgres needs PostgreSQL's server programs (see above)");
        let show = |pg: &harness::Postgres| -> BTreeMap<String, String> {
            SETTINGS
                .iter()
                .map(|(name, _)| {
                    (
                        (*name).to_owned(),
                        pg.psql("postgres", &format!("SHOW {name}")),
                    )
                })
                .collect()
        };
        let found = show(&pg);
        let changes: String = SETTINGS
            .iter()
            .filter(|(name, want)| found[*name] != *want)
            .map(|(name, want)| format!("ALTER SYSTEM SET {name} = '{want}';\n"))
            .collect();
        if !changes.is_empty() {
            pg.psql("postgres", &changes);
            pg.restart();
        }
        let settings = show(&pg);
        for (name, want) in SETTINGS {
            assert_eq!(settings[name], want, "PostgreSQL setting {name}");
        }
        let version = pg.psql("postgres", "SHOW server_version");
        // The postmaster's pid is the first line of postmaster.pid in its data dir.
        let data = pg.psql("postgres", "SHOW data_directory");
        let pidfile = std::fs::read_to_string(Path::new(&data).join("postmaster.pid"))
            .expect("read postmaster.pid");
        let postmaster = pidfile
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .expect("postmaster pid");
        let log_read = pg.log().len();
        Cluster {
            pg,
            version,
            settings,
            postmaster,
            log_read,
        }
    }

    /// Memory of the postmaster and every process it started (backends, checkpointer,
    /// WAL writer, ...).
    fn rss(&self) -> Rss {
        let mut rss = Rss {
            processes: 0,
            vm_rss_kib: 0.0,
            pss_kib: 0.0,
            anon_kib: 0.0,
        };
        let pids = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok());
        for pid in pids {
            let parent = status_kib(pid, "PPid:").map(|p| p as u32);
            if pid != self.postmaster && parent != Some(self.postmaster) {
                continue;
            }
            rss.processes += 1;
            rss.vm_rss_kib += status_kib(pid, "VmRSS:").unwrap_or(0.0);
            rss.anon_kib += status_kib(pid, "RssAnon:").unwrap_or(0.0);
            rss.pss_kib += pss_kib(pid).unwrap_or(0.0);
        }
        rss
    }

    /// ERROR, FATAL, PANIC and WARNING lines logged since the last call (the first few).
    fn new_errors(&mut self) -> Vec<String> {
        let log = self.pg.log();
        let new = log.get(self.log_read..).unwrap_or_default();
        self.log_read = log.len();
        new.lines()
            .filter(|l| {
                ["ERROR:", "FATAL:", "PANIC:", "WARNING:"]
                    .iter()
                    .any(|level| l.contains(level))
            })
            .take(LOG_LINES_KEPT)
            .map(|l| format!("postgres: {l}"))
            .collect()
    }
}

/// The proportional set size of `pid`: its private pages, and each shared page divided
/// by the number of processes mapping it.
fn pss_kib(pid: u32) -> Option<f64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let line = rollup.lines().find(|l| l.starts_with("Pss:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

// ---------------------------------------------------------------------------------------
// Report

fn targets(rows: &[PgRow]) -> Vec<Target> {
    rows.iter().filter_map(judge).collect()
}

/// The row against its scenario's target in [`TARGETS`], if it has one.
fn judge(row: &PgRow) -> Option<Target> {
    let s = &row.stats;
    let (_, min_ratio) = TARGETS.iter().find(|(name, _)| *name == s.scenario)?;
    let ratio = s.ratio_to_ceiling.unwrap_or(0.0);
    let ratio_met = min_ratio.is_none_or(|min| ratio >= min);
    Some(Target {
        what: format!("postgres, {} x {}", s.scenario, row.instances),
        goal: goal(*min_ratio),
        measured: format!(
            "ratio {}, p99 {} ms, {} errors",
            fmt_ratio(ratio),
            fmt_ms(s.p99_ms),
            s.errors
        ),
        met: ratio_met && s.p99_ms <= TARGET_P99_MS && s.errors == 0,
    })
}

/// Three decimals, rounded down: a ratio just under its target never reads as meeting it.
fn fmt_ratio(r: f64) -> String {
    format!("{:.3}", (r * 1000.0).floor() / 1000.0)
}

fn goal(min_ratio: Option<f64>) -> String {
    let ratio = min_ratio.map_or(String::new(), |r| format!("ratio >= {r:.2}, "));
    format!("{ratio}p99 <= {TARGET_P99_MS} ms, 0 errors")
}

/// The PostgreSQL section of the output: the table, what its columns are, and any
/// warnings the servers logged.
pub fn markdown(r: &PgReport) -> String {
    let settings = r
        .settings
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut t = format!(
        "### PostgreSQL engine\n\n\
         `smsauth serve` (release build) as 1 and then 2 processes on one database of a \
         throwaway PostgreSQL {} ({settings}); per instance `pool_size = {}`, \
         `statement_timeout_ms = {}`; a fresh database for each instance count; the \
         connections split evenly across the instances; codes prepared for {:.0} logins/s.\n\n\
         | scenario | instances | req/s | p50 ms | p99 ms | errors | ceiling req/s | vs ceiling \
         | sled vs ceiling | peak RSS MiB per instance | PostgreSQL RSS MiB (PSS) \
         | SQL statements / request | mean ms: pool wait, statement | target | met |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |\n",
        r.server_version, r.instance_pool_size, r.statement_timeout_ms, r.pool_rate
    );
    for row in &r.rows {
        let s = &row.stats;
        let note = s
            .ran_out_after_s
            .map(|t| format!(" (data ran out after {t:.1} s)"))
            .unwrap_or_default();
        let peaks = row
            .per_instance
            .iter()
            .map(|i| format!("{:.0}", i.peak_rss_mib))
            .collect::<Vec<_>>()
            .join(", ");
        let spr = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2}"));
        let mut sql = spr(row.statements_per_request);
        if row.per_instance.len() > 1 {
            let each: Vec<String> = row
                .per_instance
                .iter()
                .map(|i| spr(i.statements_per_request))
                .collect();
            sql.push_str(&format!(" ({})", each.join(", ")));
        }
        let target = judge(row);
        t.push_str(&format!(
            "| {}{note} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {peaks} | {:.0} ({:.0}) | {sql} | {}, {} | {} | {} |\n",
            s.scenario,
            row.instances,
            s.rps,
            fmt_ms(s.p50_ms),
            fmt_ms(s.p99_ms),
            s.errors,
            s.ceiling_rps.map_or("-".into(), |r| format!("{r:.0}")),
            s.ratio_to_ceiling.map_or("-".into(), fmt_ratio),
            row.sled_ratio_to_ceiling
                .map_or("-".into(), |r| format!("{r:.2}")),
            row.postgres_rss_mib,
            row.postgres_pss_mib,
            row.pool_wait_ms.map_or("-".into(), fmt_ms),
            row.statement_ms.map_or("-".into(), fmt_ms),
            target.as_ref().map_or("-", |t| t.goal.as_str()),
            target.as_ref().map_or("-", |t| if t.met { "yes" } else { "NO" }),
        ));
    }
    t.push_str(&format!(
        "\n- SQL statements / request: {}; with two instances, each instance's own in \
         brackets. Per op in the JSON report.\n\
         - mean ms: a statement's wait for a pooled connection, and the statement itself \
         from then to its answer (round trip, PostgreSQL's work and, for a write, its \
         commit); per op in the JSON report.\n\
         - peak RSS: VmHWM of each `smsauth serve` process, {}.\n\
         - PostgreSQL RSS: VmRSS summed over the cluster's processes (postmaster and \
         children) after the scenario; its shared memory counts once in each process that \
         touched it, so the sum overstates; in brackets the PSS sum, which shares each page \
         out among the processes that map it: the memory the cluster holds. (The private \
         part alone, RssAnon, is in the JSON report.)\n",
        STATEMENTS_PER_REQUEST_IS,
        if r.peak_rss_per_scenario {
            "reset before each scenario (clear_refs): the peak during it"
        } else {
            "since the process started (it could not be reset)"
        }
    ));
    // Where a request's time goes: its slowest statement, on average.
    let slowest: Vec<String> = r
        .rows
        .iter()
        .filter_map(|row| {
            let ops = &row.per_instance.first()?.op_ms;
            let (op, ms) = ops.iter().max_by(|a, b| a.1.total_cmp(b.1))?;
            Some(format!(
                "{} x {}: {op} {}",
                row.stats.scenario,
                row.instances,
                fmt_ms(*ms)
            ))
        })
        .collect();
    if !slowest.is_empty() {
        t.push_str(&format!(
            "- the slowest statement (mean ms, first instance): {}\n",
            slowest.join("; ")
        ));
    }
    for row in r.rows.iter().filter(|row| row.stats.errors > 0) {
        t.push_str(&format!(
            "- {} x {}: {} errors, the first: {}\n",
            row.stats.scenario,
            row.instances,
            row.stats.errors,
            row.stats.first_error.as_deref().unwrap_or("?")
        ));
    }
    for row in &r.rows {
        for line in row.server_log.iter().chain(&row.postgres_log) {
            t.push_str(&format!(
                "- {} x {}, log: `{line}`\n",
                row.stats.scenario, row.instances
            ));
        }
    }
    t
}
