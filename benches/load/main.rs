//! `cargo bench --bench load`: the real server, `smsauth serve` as a child process on a
//! loopback port with a temporary data dir, driven by keep-alive HTTP/1.1 connections
//! from a hyper client in this process, one scenario after another, each for a fixed
//! time after a warm-up. The ceiling is a bare hyper server answering a constant 200, a
//! child process too, driven the same way in the same run, so the ratios compare like
//! with like on whatever machine this runs on. The server and the ceiling run on one
//! half of the cores and this process on the other ([`outside`]), so the ratios are what
//! an outside load generator sees; `wrk`, where installed, checks that in the same run.
//!
//! With `--engine postgres` the scenarios run against the PostgreSQL engine instead, on
//! `smsauth serve` processes sharing a throwaway PostgreSQL: see [`postgres`].
//!
//! Output: a markdown table on stdout, and JSON in target/bench/load-<time>.json and
//! target/bench/load-latest.json.
//!
//! Options: `cargo bench --bench load -- --help` ([`USAGE`]).

mod outside;
mod postgres;
mod soak;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};

use smsauth::codes::Codes;
use smsauth::config::Config;
use smsauth::model::{LoginMethod, Method as LoginKind, Purpose, User};
use smsauth::password::Passwords;
use smsauth::phone::{IndexedPhone, Phone};
use smsauth::store::{NewUser, PhoneVault, SledStore, Store};
use smsauth::token::Tokens;

/// The server's allocator (see src/main.rs), for the client and the ceiling as well.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const USAGE: &str = "\
cargo bench --bench load [-- OPTIONS]   (or the BENCH_* variables)

  --quick            BENCH_QUICK=1        short runs (0.5 s warm-up, 2 s in 2 slices): < 1 min
                                          (--engine postgres: < 2 min)
  --duration SECS    BENCH_DURATION       measured time per scenario (default 9)
  --rounds N         BENCH_ROUNDS         slices it is measured in, each right after a
                                          slice of the ceiling (default 3)
  --pool-rate N      BENCH_POOL_RATE      logins/s to prepare single-use codes for
                                          (default 20,000; a row says if they ran out)
  --warmup SECS      BENCH_WARMUP         warm-up per scenario (default 2)
  --connections N    BENCH_CONNECTIONS    connections per scenario (default 64)
  --scenarios A,B    BENCH_SCENARIOS      only scenarios whose name contains A or B
  --scale            BENCH_SCALE=1        scale mode: 1,000,000 users and 100,000
                                          pending codes, server as a child process
  --scale-users N    BENCH_SCALE_USERS    users in scale mode (default 1,000,000)
  --scale-codes N    BENCH_SCALE_CODES    pending codes in scale mode (default 100,000)
  --no-log           BENCH_LOG=0          the server logs at warn (default: at info, a
                                          JSON line per request, into /dev/null)
  --no-pin           BENCH_PIN=0          leave every process on every core (default:
                                          server and ceiling on the first half of the
                                          cores, the client on the second, by taskset)
  --no-wrk           BENCH_WRK=0          skip the check with wrk (run when installed)
  --token-algorithm A BENCH_TOKEN_ALGORITHM sign the sled run's sessions with ES256 or
                                          EdDSA (default: HS256 with a fixed secret)
  --engine E         BENCH_ENGINE         sled (default): the scenarios above;
                                          postgres: send-code, sms-login-existing,
                                          sms-login-new and me on the PostgreSQL engine,
                                          on 1 and then 2 `smsauth serve` processes
                                          sharing a throwaway PostgreSQL the bench starts
                                          (PostgreSQL must be installed); both: sled, then
                                          postgres, with the sled ratios beside
  --pg-pool-rate N   BENCH_PG_POOL_RATE   postgres: logins/s to prepare codes for
                                          (default 6,000)
  --soak SECS        BENCH_SOAK           soak mode: `smsauth serve` as a child process
                                          under a mix of code logins (new and existing
                                          phones), /me and password logins at half the
                                          rate it sustains, for SECS seconds; RSS, open
                                          files and on-disk size every 10 s, and their
                                          growth after the first minute
";

/// Every code the `log` sender "sends" in this run.
const FIXED_CODE: &str = "246810";
const PASSWORD: &str = "bench password 1";
/// Users whose tokens GET /me rotates through.
const ME_USERS: u64 = 10_000;
/// Password-login connections beside /me in the mixed scenario: enough to keep every
/// hashing slot busy with a queue behind it.
const MIXED_PASSWORD_CONNECTIONS: usize = 16;

// ---------------------------------------------------------------------------------------
// Options

#[derive(Debug, Clone, Serialize)]
struct Opts {
    quick: bool,
    #[serde(serialize_with = "secs")]
    duration: Duration,
    #[serde(serialize_with = "secs")]
    warmup: Duration,
    connections: usize,
    scenarios: Vec<String>,
    scale: bool,
    scale_users: u64,
    scale_codes: u64,
    /// Slices each scenario is measured in, each after a slice of the ceiling.
    rounds: u32,
    /// Logins per second to prepare codes for (they are single use).
    pool_rate: f64,
    log: bool,
    engine: EngineChoice,
    /// [`Opts::pool_rate`] for the PostgreSQL engine: it logs in far fewer a second, and
    /// each code prepared costs a commit.
    pg_pool_rate: f64,
    /// Soak mode's length in seconds, if asked for.
    soak: Option<u64>,
    /// Server side and client on cores of their own (sled runs only).
    pin: bool,
    /// Drive the same server with wrk too, where it is installed.
    wrk: bool,
    /// `token.algorithm` of the sled run's server; None: HS256 with a fixed secret.
    token_algorithm: Option<String>,
}

/// Which storage engine(s) the scenarios run on (`--engine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum EngineChoice {
    Sled,
    Postgres,
    Both,
}

impl EngineChoice {
    fn sled(self) -> bool {
        self != EngineChoice::Postgres
    }

    fn postgres(self) -> bool {
        self != EngineChoice::Sled
    }
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// The options that take a value or are flags (see [`USAGE`]), with `-` as `_`.
const OPTIONS: &[&str] = &[
    "quick",
    "duration",
    "rounds",
    "pool_rate",
    "warmup",
    "connections",
    "scenarios",
    "scale",
    "scale_users",
    "scale_codes",
    "engine",
    "pg_pool_rate",
    "soak",
    "pin",
    "wrk",
    "token_algorithm",
];

impl Opts {
    fn parse() -> Opts {
        let mut vars: BTreeMap<String, String> = std::env::vars()
            .filter_map(|(k, v)| Some((k.strip_prefix("BENCH_")?.to_ascii_lowercase(), v)))
            .collect();
        let mut args = std::env::args().skip(1).peekable();
        while let Some(arg) = args.next() {
            // cargo bench passes --bench; criterion-style filters are not ours.
            let Some(flag) = arg.strip_prefix("--") else {
                continue;
            };
            let (key, value) = match flag.split_once('=') {
                Some((k, v)) => (k.to_owned(), v.to_owned()),
                None if [
                    "quick", "scale", "no-log", "no-pin", "no-wrk", "bench", "help",
                ]
                .contains(&flag) =>
                {
                    (flag.to_owned(), "1".to_owned())
                }
                None => (flag.to_owned(), args.next().unwrap_or_default()),
            };
            let key = key.replace('-', "_");
            match key.as_str() {
                "help" => {
                    print!("{USAGE}");
                    std::process::exit(0);
                }
                "no_log" => vars.insert("log".into(), "0".into()),
                "no_pin" => vars.insert("pin".into(), "0".into()),
                "no_wrk" => vars.insert("wrk".into(), "0".into()),
                "bench" => None,
                k if OPTIONS.contains(&k) => vars.insert(key, value),
                _ => {
                    eprint!("unknown option --{flag}\n\n{USAGE}");
                    std::process::exit(2);
                }
            };
        }
        let flag = |k: &str| vars.get(k).is_some_and(|v| v != "0" && !v.is_empty());
        let num = |k: &str, default: f64| -> f64 {
            vars.get(k).map_or(default, |v| {
                v.parse()
                    .unwrap_or_else(|_| panic!("{k}: expected a number, got {v:?}"))
            })
        };
        let engine = match vars.get("engine").map(|e| e.trim()) {
            None | Some("" | "sled") => EngineChoice::Sled,
            Some("postgres" | "pg") => EngineChoice::Postgres,
            Some("both") => EngineChoice::Both,
            Some(other) => {
                eprint!("--engine: sled, postgres or both, not {other:?}\n\n{USAGE}");
                std::process::exit(2);
            }
        };
        if flag("scale") && engine.postgres() {
            eprintln!("--scale runs on sled only; drop --engine or --scale");
            std::process::exit(2);
        }
        let quick = flag("quick");
        let (duration, warmup) = if quick { (2.0, 0.5) } else { (9.0, 2.0) };
        Opts {
            quick,
            duration: Duration::from_secs_f64(num("duration", duration)),
            warmup: Duration::from_secs_f64(num("warmup", warmup)),
            connections: num("connections", 64.0) as usize,
            scenarios: vars
                .get("scenarios")
                .map(|s| {
                    s.split(',')
                        .map(|x| x.trim().to_owned())
                        .filter(|x| !x.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
            scale: flag("scale"),
            scale_users: num("scale_users", 1_000_000.0) as u64,
            scale_codes: num("scale_codes", 100_000.0) as u64,
            rounds: num("rounds", if quick { 2.0 } else { 3.0 }) as u32,
            pool_rate: num("pool_rate", 20_000.0),
            log: vars.get("log").is_none_or(|v| v != "0"),
            engine,
            pg_pool_rate: num("pg_pool_rate", 6_000.0),
            soak: vars.get("soak").map(|_| num("soak", 600.0) as u64),
            pin: vars.get("pin").is_none_or(|v| v != "0"),
            wrk: vars.get("wrk").is_none_or(|v| v != "0"),
            token_algorithm: vars.get("token_algorithm").cloned(),
        }
    }

    fn wants(&self, scenario: &str) -> bool {
        self.scenarios.is_empty() || self.scenarios.iter().any(|s| scenario.contains(s))
    }
}

// ---------------------------------------------------------------------------------------
// The client: N keep-alive connections, each sending its next request when the last
// answer is in.

type Body = Full<Bytes>;
/// Builds request number `seq` of connection `conn`; None when the scenario's prepared
/// data is used up (the scenario then ends there and says so).
type MakeRequest = Arc<dyn Fn(usize, u64) -> Option<Request<Body>> + Send + Sync>;

#[derive(Clone)]
struct Load {
    name: String,
    connections: usize,
    make: MakeRequest,
    expect: StatusCode,
}

#[derive(Default)]
struct ConnOutcome {
    latencies_us: Vec<u32>,
    errors: u64,
    first_error: Option<String>,
    /// Every answer with a status, warm-up and errors included: what the server did
    /// work for (the PostgreSQL runs divide their statements by it).
    answered: u64,
}

#[derive(Debug, Clone, Serialize)]
struct Stats {
    scenario: String,
    connections: usize,
    requests: u64,
    seconds: f64,
    rps: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    errors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_error: Option<String>,
    /// The prepared data ran out before the end: the figures cover the time until then.
    #[serde(skip_serializing_if = "Option::is_none")]
    ran_out_after_s: Option<f64>,
    /// The bare hyper server's rate in the slices next to this scenario's.
    ceiling_rps: Option<f64>,
    ratio_to_ceiling: Option<f64>,
    /// [`ConnOutcome::answered`] summed per server address (the index in `drive`'s).
    #[serde(skip)]
    answered_by_address: Vec<u64>,
}

fn get(path: &str) -> Request<Body> {
    Request::builder()
        .method(Method::GET)
        .uri(path)
        .header(HOST, "127.0.0.1")
        .body(Full::new(Bytes::new()))
        .expect("request")
}

fn get_with_token(path: &str, token: &str) -> Request<Body> {
    let mut req = get(path);
    req.headers_mut().insert(
        AUTHORIZATION,
        format!("Bearer {token}").parse().expect("header"),
    );
    req
}

fn post_json(path: &str, body: String) -> Request<Body> {
    Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(HOST, "127.0.0.1")
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("request")
}

/// Runs `loads` at the same time against `addrs`, each load's connections split evenly
/// across them (connection `i` to `addrs[i % len]`): all connections are opened first,
/// then `warmup`, then `duration` measured.
async fn drive(
    addrs: &[SocketAddr],
    loads: Vec<Load>,
    warmup: Duration,
    duration: Duration,
) -> Vec<Raw> {
    let total: usize = loads.iter().map(|l| l.connections).sum();
    let ready = Arc::new(tokio::sync::Barrier::new(total + 1));
    let start: Arc<OnceLock<Instant>> = Arc::new(OnceLock::new());
    // Nanoseconds after the start when a load's data ran out (u64::MAX: never).
    let mut tasks = Vec::new();
    let mut ran_out = Vec::new();
    for load in &loads {
        let out = Arc::new(AtomicU64::new(u64::MAX));
        ran_out.push(out.clone());
        let mut handles = Vec::new();
        for conn in 0..load.connections {
            let addr = addrs[conn % addrs.len()];
            let make = load.make.clone();
            let expect = load.expect;
            let (ready, start, out) = (ready.clone(), start.clone(), out.clone());
            handles.push(tokio::spawn(async move {
                connection(
                    addr, conn, make, expect, ready, start, out, warmup, duration,
                )
                .await
            }));
        }
        tasks.push(handles);
    }
    ready.wait().await;
    start.get_or_init(Instant::now);
    let mut raws = Vec::new();
    for ((load, handles), out) in loads.iter().zip(tasks).zip(ran_out) {
        let mut raw = Raw {
            name: load.name.clone(),
            connections: load.connections,
            answered: vec![0; addrs.len()],
            ..Default::default()
        };
        for (conn, h) in handles.into_iter().enumerate() {
            let o = h.await.expect("connection task");
            raw.answered[conn % addrs.len()] += o.answered;
            raw.latencies_us.extend(o.latencies_us);
            raw.errors += o.errors;
            if raw.first_error.is_none() {
                raw.first_error = o.first_error;
            }
        }
        let out_at = out.load(Ordering::SeqCst);
        let measured_to = if out_at == u64::MAX {
            warmup + duration
        } else {
            raw.ran_out_after_s = Some(
                Duration::from_nanos(out_at)
                    .saturating_sub(warmup)
                    .as_secs_f64(),
            );
            Duration::from_nanos(out_at).clamp(warmup, warmup + duration)
        };
        raw.seconds = (measured_to - warmup).as_secs_f64();
        raws.push(raw);
    }
    raws
}

/// What one load measured, before percentiles: rounds of a scenario add up.
#[derive(Default)]
struct Raw {
    name: String,
    connections: usize,
    latencies_us: Vec<u32>,
    seconds: f64,
    errors: u64,
    first_error: Option<String>,
    ran_out_after_s: Option<f64>,
    /// Answers per server address, warm-ups included (see [`ConnOutcome::answered`]).
    answered: Vec<u64>,
}

impl Raw {
    fn add(&mut self, other: Raw) {
        if self.name.is_empty() {
            *self = other;
            return;
        }
        self.latencies_us.extend(other.latencies_us);
        self.seconds += other.seconds;
        self.errors += other.errors;
        for (sum, n) in self.answered.iter_mut().zip(other.answered) {
            *sum += n;
        }
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        if let Some(t) = other.ran_out_after_s {
            self.ran_out_after_s = Some(self.seconds - other.seconds + t);
        }
    }

    fn stats(mut self, ceiling_rps: Option<f64>) -> Stats {
        let answered_by_address = std::mem::take(&mut self.answered);
        let lat = &mut self.latencies_us;
        lat.sort_unstable();
        let pct = |p: f64| -> f64 {
            if lat.is_empty() {
                return f64::NAN;
            }
            let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
            lat[i] as f64 / 1000.0
        };
        let rps = if self.seconds > 0.0 {
            lat.len() as f64 / self.seconds
        } else {
            0.0
        };
        Stats {
            scenario: self.name,
            connections: self.connections,
            requests: lat.len() as u64,
            seconds: self.seconds,
            rps,
            p50_ms: pct(0.50),
            p90_ms: pct(0.90),
            p99_ms: pct(0.99),
            max_ms: lat.last().map_or(f64::NAN, |&m| m as f64 / 1000.0),
            errors: self.errors,
            first_error: self.first_error,
            ran_out_after_s: self.ran_out_after_s,
            ceiling_rps,
            ratio_to_ceiling: ceiling_rps.map(|c| rps / c),
            answered_by_address,
        }
    }
}

/// Measures `loads` in `rounds` slices, each right after a slice of the ceiling of the
/// same length, so both see the same machine (other processes come and go). Returns
/// the scenario's rows, each with the ceiling of its own slices, and the ceiling's raw
/// samples.
async fn measure(bench: &Bench, loads: Vec<Load>) -> (Vec<Stats>, Raw) {
    let rounds = bench.opts.rounds.max(1);
    let slice = bench.opts.duration / rounds;
    let mut ceiling = Raw::default();
    let mut sums: Vec<Raw> = Vec::new();
    for round in 0..rounds {
        // The first warm-up is the full one; later ones only open the connections again.
        let warmup = if round == 0 {
            bench.opts.warmup
        } else {
            bench.opts.warmup.min(Duration::from_millis(300))
        };
        let ceiling_load = Load {
            name: "ceiling (bare hyper)".into(),
            connections: loads.iter().map(|l| l.connections).sum(),
            make: Arc::new(|_, _| Some(get("/"))),
            expect: StatusCode::OK,
        };
        ceiling.add(
            drive(&[bench.ceiling], vec![ceiling_load], warmup, slice)
                .await
                .remove(0),
        );
        eprintln!("    slice {}/{rounds}: {}", round + 1, loads[0].name);
        let raws = drive(&bench.addrs, loads.clone(), warmup, slice).await;
        let done = raws.iter().any(|r| r.ran_out_after_s.is_some());
        if sums.is_empty() {
            sums = raws;
        } else {
            for (sum, raw) in sums.iter_mut().zip(raws) {
                sum.add(raw);
            }
        }
        if done {
            break;
        }
    }
    let ceiling_rps = ceiling.latencies_us.len() as f64 / ceiling.seconds;
    (
        sums.into_iter()
            .map(|r| r.stats(Some(ceiling_rps)))
            .collect(),
        ceiling,
    )
}

/// One load of `connections` answered 200 each.
fn single(name: &str, connections: usize, make: MakeRequest) -> Vec<Load> {
    vec![Load {
        name: name.into(),
        connections,
        make,
        expect: StatusCode::OK,
    }]
}

/// Where the ceiling and the server(s) under test listen, and the options.
struct Bench {
    opts: Opts,
    ceiling: SocketAddr,
    /// One address, or one per instance when several serve one PostgreSQL database.
    addrs: Vec<SocketAddr>,
}

#[allow(clippy::too_many_arguments)]
async fn connection(
    addr: SocketAddr,
    conn: usize,
    make: MakeRequest,
    expect: StatusCode,
    ready: Arc<tokio::sync::Barrier>,
    start: Arc<OnceLock<Instant>>,
    ran_out: Arc<AtomicU64>,
    warmup: Duration,
    duration: Duration,
) -> ConnOutcome {
    let mut outcome = ConnOutcome::default();
    let connected = async {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(conn);
        Ok::<_, std::io::Error>(sender)
    }
    .await;
    ready.wait().await;
    let t0 = *start.get_or_init(Instant::now);
    let mut sender = match connected {
        Ok(s) => s,
        Err(e) => {
            outcome.errors += 1;
            outcome.first_error = Some(format!("connect: {e}"));
            return outcome;
        }
    };
    let (measure_from, end) = (t0 + warmup, t0 + warmup + duration);
    let mut seq = 0u64;
    let error = |outcome: &mut ConnOutcome, what: String| {
        outcome.errors += 1;
        outcome.first_error.get_or_insert(what);
    };
    loop {
        if Instant::now() >= end || ran_out.load(Ordering::Relaxed) != u64::MAX {
            break;
        }
        let Some(req) = make(conn, seq) else {
            let at = t0.elapsed().as_nanos() as u64;
            ran_out.fetch_min(at, Ordering::SeqCst);
            break;
        };
        seq += 1;
        if let Err(e) = sender.ready().await {
            error(&mut outcome, format!("connection closed: {e}"));
            break;
        }
        let sent = Instant::now();
        let answer = match sender.send_request(req).await {
            Ok(resp) => {
                let status = resp.status();
                resp.into_body()
                    .collect()
                    .await
                    .map(|b| (status, b.to_bytes()))
            }
            Err(e) => {
                error(&mut outcome, format!("request failed: {e}"));
                break;
            }
        };
        let done = Instant::now();
        if answer.is_ok() {
            outcome.answered += 1;
        }
        match answer {
            Ok((status, _)) if status == expect => {
                // Counted if it completes in the measured window: a slow request
                // (a queued password check) counts even if sent during the warm-up.
                if done >= measure_from && done <= end {
                    let us = (done - sent).as_micros().min(u32::MAX as u128) as u32;
                    outcome.latencies_us.push(us);
                }
            }
            Ok((status, body)) => error(
                &mut outcome,
                format!("{status}: {}", String::from_utf8_lossy(&body)),
            ),
            Err(e) => error(&mut outcome, format!("body: {e}")),
        }
    }
    outcome
}

// ---------------------------------------------------------------------------------------
// The ceiling: hyper with nothing behind it, on the same builder settings as smsauth,
// in a process of its own ([`outside::ceiling`]).

async fn serve_ceiling(listener: TcpListener) {
    // The server's own connection settings, so the ceiling differs only in the work.
    let builder = smsauth::http::connection_builder();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = service_fn(|_req| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
        });
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

// ---------------------------------------------------------------------------------------
// The server under test and its data.

/// National number `n` of series `series` (a distinct 3-digit prefix per scenario).
/// The numbers do not follow `n`'s order: a site's phones arrive in no order, and keys in
/// order would favour a store that keys records by the number (each write at the end of
/// its tree) over one keyed by a blind index. Multiplying by a prime coprime to 10^8 is a
/// bijection on the eight digits, so `n` still names one phone.
fn national(series: u32, n: u64) -> String {
    const SPREAD: u64 = 73_939_133;
    format!("{series}{:08}", n.wrapping_mul(SPREAD) % 100_000_000)
}

fn e164(national: &str) -> String {
    format!("+86{national}")
}

/// `storage`: more of the `[storage]` table (TOML lines, which may open
/// `[storage.postgres]`); empty for the default engine.
fn bench_config(
    data_dir: &Path,
    listen: &str,
    token_secret: &str,
    code_ttl: u64,
    storage: &str,
) -> String {
    // The load is many phones from one address, so the limits are raised out of its way,
    // not turned off (0 would skip their checks): every request does the work it does in
    // production. The resend interval stays at its default, as no phone gets two codes.
    // Everything else is the default configuration.
    format!(
        r#"[server]
listen = "{listen}"
[storage]
data_dir = "{data_dir}"
{storage}[token]
secret = "{token_secret}"
[code]
ttl_secs = {code_ttl}
[sms]
provider = "log"
fixed_code = "{FIXED_CODE}"
[limits]
phone_per_day = 1000000000
ip_per_hour = 4000000000
global_per_day = 1000000000000
verify_per_ip_per_minute = 4000000000
captcha_per_ip_per_minute = 4000000000
phone_failures_per_hour = 1000000000
[log]
format = "json"
"#,
        data_dir = data_dir.display()
    )
}

fn load_config(dir: &Path, text: &str) -> Config {
    let path = dir.join("smsauth.toml");
    std::fs::write(&path, text).expect("write config");
    Config::load(Some(&path), std::iter::empty()).expect("bench configuration")
}

fn sms_method(phone: &str) -> LoginMethod {
    LoginMethod {
        method: LoginKind::Sms,
        identification: phone.to_owned(),
        access_code: None,
    }
}

/// The phone and login methods of bench user `i` of `series`.
fn bench_user(series: u32, i: u64, password_phc: Option<&str>) -> (String, Vec<LoginMethod>) {
    let phone = e164(&national(series, i));
    let mut methods = vec![sms_method(&phone)];
    if let Some(phc) = password_phc {
        methods.push(LoginMethod {
            method: LoginKind::Password,
            identification: phone.clone(),
            access_code: Some(phc.to_owned()),
        });
    }
    (phone, methods)
}

fn new_user<'a>(phone: &'a str, vault: &PhoneVault) -> NewUser<'a> {
    NewUser {
        phone,
        other: None,
        index: vault.index(phone),
        nickname: "bench".into(),
        created_at: smsauth::clock::now(),
        last_login_at: None,
        avatar_url: None,
    }
}

/// Creates users for national numbers `series`/0..n through the store, on every core.
fn create_users(store: &Store, series: u32, n: u64, password_phc: Option<&str>) -> Vec<User> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    let per = n.div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut users = Vec::new();
                    for i in (t * per)..((t + 1) * per).min(n) {
                        let (phone, methods) = bench_user(series, i, password_phc);
                        let made = store
                            .users
                            .create_user_if_absent(new_user(&phone, &store.phones), &methods);
                        users.push(futures::executor::block_on(made).expect("create user").0);
                    }
                    users
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("user creation"))
            .collect()
    })
}

async fn put_codes(codes: &Codes, vault: &PhoneVault, phones: impl Iterator<Item = String>) {
    for p in phones {
        codes
            .put(
                &IndexedPhone::new(Phone::from_e164(p), vault),
                Purpose::Login,
                FIXED_CODE,
            )
            .await
            .expect("put code");
    }
}

/// A request maker that hands out each of `phones` once, as an sms-login.
fn sms_logins(phones: Vec<String>) -> MakeRequest {
    let next = AtomicU64::new(0);
    Arc::new(move |_, _| {
        let i = next.fetch_add(1, Ordering::Relaxed) as usize;
        let phone = phones.get(i)?;
        Some(post_json(
            "/api/v1/auth/sms-login",
            format!(r#"{{"phone":"{phone}","code":"{FIXED_CODE}"}}"#),
        ))
    })
}

fn me_requests(tokens: Arc<Vec<String>>) -> MakeRequest {
    Arc::new(move |conn, seq| {
        let i = (conn as u64 * 7919 + seq * 13) as usize % tokens.len();
        Some(get_with_token("/api/v1/me", &tokens[i]))
    })
}

fn password_logins(series: u32, users: u64) -> MakeRequest {
    Arc::new(move |conn, seq| {
        let i = (conn as u64 * 7919 + seq) % users;
        Some(post_json(
            "/api/v1/auth/login",
            format!(
                r#"{{"phone":"{}","password":"{PASSWORD}"}}"#,
                national(series, i)
            ),
        ))
    })
}

/// argon2id hashes per second on `threads` threads at the configured parameters,
/// outside the server: what password logins are bounded by.
fn raw_hash_rate(cfg: &smsauth::config::PasswordConfig, threads: usize, time: Duration) -> f64 {
    let params = argon2::Params::new(cfg.memory_kib, cfg.iterations, cfg.parallelism, None)
        .expect("argon2 params");
    let count = AtomicU64::new(0);
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let argon = argon2::Argon2::new(
                    argon2::Algorithm::Argon2id,
                    argon2::Version::V0x13,
                    params.clone(),
                );
                let mut out = [0u8; 32];
                while started.elapsed() < time {
                    argon
                        .hash_password_into(PASSWORD.as_bytes(), b"0123456789abcdef", &mut out)
                        .expect("hash");
                    count.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    count.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

// ---------------------------------------------------------------------------------------
// The sled run: one `smsauth serve` process for every scenario.

/// What the server process did over the sled run.
#[derive(Serialize, Default)]
struct ServerReport {
    /// VmRSS after each scenario, in MiB.
    rss_after_mib: Vec<(String, f64)>,
    /// VmHWM at the end: the peak over the whole run.
    peak_rss_mib: f64,
    /// The same server driven by wrk, and wrk's ceiling.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    wrk: Vec<outside::WrkRow>,
}

struct SledRun {
    rows: Vec<Stats>,
    ceiling: Raw,
    raw_hash: Option<RawHash>,
    server: ServerReport,
}

/// What the scenarios need: users written into the data dir before the server starts;
/// the phones that log in get their codes through the API just before their scenario.
struct Prepared {
    existing: Vec<String>,
    new: Vec<String>,
    me_tokens: Arc<Vec<String>>,
    password_users: u64,
}

const SECRET: &str = "bench-token-secret-of-at-least-32-characters";

/// Users and session tokens, through the store's own API with the server's keys, as the
/// server would have made them.
async fn prepare(opts: &Opts, cfg: &Config, data: &Path) -> Prepared {
    let pool = (opts.pool_rate * (opts.warmup + opts.duration).as_secs_f64()) as u64;
    let sled = Arc::new(
        SledStore::open_sized(data, cfg.storage.cache_capacity_mb, &cfg.memory)
            .expect("open store"),
    );
    let store = Store::embedded(sled.clone(), cfg).expect("store");
    let users = |series: u32, n: u64, phc: Option<String>| {
        let store = store.clone();
        tokio::task::spawn_blocking(move || create_users(&store, series, n, phc.as_deref()))
    };
    let mut prepared = Prepared {
        existing: Vec::new(),
        new: Vec::new(),
        me_tokens: Arc::new(Vec::new()),
        password_users: 0,
    };
    if opts.wants("sms-login-existing") {
        eprintln!("  preparing {pool} users...");
        let made = users(135, pool, None).await.expect("users");
        prepared.existing = made.iter().map(|u| u.phone.clone()).collect();
    }
    if opts.wants("sms-login-new") {
        prepared.new = (0..pool).map(|i| e164(&national(136, i))).collect();
    }
    if opts.wants("me") {
        let made = users(138, ME_USERS, None).await.expect("users");
        let tokens = Tokens::new(
            signing_keys(cfg, &store).await,
            &cfg.token,
            store.sessions.clone(),
        );
        prepared.me_tokens = Arc::new(
            made.iter()
                .map(|u| {
                    tokens
                        .issue_session(u, &u.id.to_be_bytes().repeat(2).try_into().unwrap())
                        .token
                })
                .collect(),
        );
    }
    if opts.wants("password") {
        let passwords = Passwords::new(&cfg.password).expect("password settings");
        let phc = passwords.hash(PASSWORD).await.expect("hash");
        prepared.password_users = 1_000;
        users(137, prepared.password_users, Some(phc))
            .await
            .expect("users");
    }
    drop(store);
    sled.flush_blocking().expect("flush");
    prepared
}

/// Sends a code to each of `phones` through the API, as fast as the server takes them:
/// the codes a login scenario uses, made just before it, so the server holds no more
/// pending codes than one scenario's (a store full of codes for every scenario at once
/// cost 90 MiB at start, for the pass over them, and no site holds that many).
async fn send_codes(bench: &Bench, phones: &[String]) {
    eprintln!("    sending {} codes...", phones.len());
    let phones = Arc::new(phones.to_vec());
    let next = Arc::new(AtomicU64::new(0));
    let make: MakeRequest = Arc::new(move |_, _| {
        let phone = phones.get(next.fetch_add(1, Ordering::Relaxed) as usize)?;
        Some(post_json(
            "/api/v1/sms/code",
            format!(r#"{{"phone":"{phone}"}}"#),
        ))
    });
    let load = Load {
        name: "sending codes".into(),
        connections: bench.opts.connections,
        make,
        expect: StatusCode::OK,
    };
    let sent = drive(
        &bench.addrs,
        vec![load],
        Duration::ZERO,
        Duration::from_secs(600),
    )
    .await
    .remove(0);
    assert_eq!(sent.errors, 0, "sending codes: {:?}", sent.first_error);
}

/// The signing keys the server will load from this store at its start.
async fn signing_keys(cfg: &Config, store: &Store) -> smsauth::signing::SigningKeys {
    smsauth::signing::SigningKeys::open(
        cfg,
        store.keys.clone(),
        Tokens::lifetime(cfg.token.access_ttl_secs),
    )
    .await
    .expect("token keys")
}

async fn sled_run(opts: &Opts, ceiling: SocketAddr) -> SledRun {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    let port = free_port();
    let mut text = bench_config(&data, &format!("127.0.0.1:{port}"), SECRET, 3600, "");
    if let Some(alg) = &opts.token_algorithm {
        text = text.replace(
            &format!("secret = \"{SECRET}\""),
            &format!("algorithm = \"{alg}\""),
        );
    }
    if !opts.log {
        text.push_str("level = \"warn\"\n");
    }
    let cfg = load_config(dir.path(), &text);
    let prepared = prepare(opts, &cfg, &data).await;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    // Its log lines go where journald's would, minus journald's own work.
    let null = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .expect("/dev/null");
    let (child, _) = serve(&dir.path().join("smsauth.toml"), addr, Stdio::from(null)).await;
    let child = outside::ChildGuard(child);
    let pid = child.0.id();
    let rss = || status_kib(pid, "VmRSS:").unwrap_or(f64::NAN) / 1024.0;

    let bench = Bench {
        opts: opts.clone(),
        ceiling,
        addrs: vec![addr],
    };
    let one = |name: &str, make: MakeRequest| single(name, opts.connections, make);
    let mut out = SledRun {
        rows: Vec::new(),
        ceiling: Raw::default(),
        raw_hash: None,
        server: ServerReport::default(),
    };
    let record = |out: &mut SledRun, (stats, ceiling): (Vec<Stats>, Raw)| {
        let name = stats
            .first()
            .map(|s| s.scenario.clone())
            .unwrap_or_default();
        out.rows.extend(stats);
        out.ceiling.add(ceiling);
        out.server.rss_after_mib.push((name, rss()));
    };
    let phase = |name: &str| eprintln!("  {name}...");

    if opts.wants("healthz") {
        phase("healthz");
        let make: MakeRequest = Arc::new(|_, _| Some(get("/healthz")));
        record(&mut out, measure(&bench, one("healthz", make)).await);
    }
    if opts.wants("send-code") {
        phase("send-code");
        let next = Arc::new(AtomicU64::new(0));
        let make: MakeRequest = Arc::new(move |_, _| {
            let n = next.fetch_add(1, Ordering::Relaxed);
            Some(post_json(
                "/api/v1/sms/code",
                format!(r#"{{"phone":"{}"}}"#, national(139, n)),
            ))
        });
        record(&mut out, measure(&bench, one("send-code", make)).await);
    }
    if opts.wants("sms-login-existing") {
        phase("sms-login-existing");
        send_codes(&bench, &prepared.existing).await;
        let make = sms_logins(prepared.existing.clone());
        record(
            &mut out,
            measure(&bench, one("sms-login-existing", make)).await,
        );
    }
    if opts.wants("sms-login-new") {
        phase("sms-login-new");
        send_codes(&bench, &prepared.new).await;
        let make = sms_logins(prepared.new.clone());
        record(&mut out, measure(&bench, one("sms-login-new", make)).await);
    }
    if opts.wants("me") {
        phase("me");
        let make = me_requests(prepared.me_tokens.clone());
        record(&mut out, measure(&bench, one("me", make)).await);
    }
    if opts.wants("password") {
        let slots = match cfg.password.max_concurrent_hashes {
            0 => outside::cores()
                .map_or_else(smsauth::password::default_slots, |c| c.server.len().max(1)),
            n => n,
        };
        phase("raw argon2id rate");
        let hash_time = if opts.quick { 1.0 } else { 5.0 };
        let pcfg = cfg.password.clone();
        let rate = tokio::task::spawn_blocking(move || {
            raw_hash_rate(&pcfg, slots, Duration::from_secs_f64(hash_time))
        })
        .await
        .expect("raw hash rate");
        let mut raw = RawHash {
            threads: slots,
            hashes_per_s: rate,
            password_logins_per_s: None,
            ratio: None,
        };
        let users = prepared.password_users;
        if opts.wants("password-login") {
            phase("password-login");
            let (s, ceiling) =
                measure(&bench, one("password-login", password_logins(137, users))).await;
            if let Some(s) = s.first() {
                raw.password_logins_per_s = Some(s.rps);
                raw.ratio = Some(s.rps / raw.hashes_per_s);
            }
            record(&mut out, (s, ceiling));
        }
        if opts.wants("me") && opts.wants("me-under-password-load") {
            phase("me-under-password-load");
            let mut loads = one(
                "me-under-password-load",
                me_requests(prepared.me_tokens.clone()),
            );
            loads.push(Load {
                name: "(password-login beside it)".into(),
                connections: MIXED_PASSWORD_CONNECTIONS,
                make: password_logins(137, users),
                expect: StatusCode::OK,
            });
            record(&mut out, measure(&bench, loads).await);
        }
        out.raw_hash = Some(raw);
    }
    if opts.wrk {
        out.server.wrk = wrk_check(opts, ceiling, addr, &prepared, dir.path());
    }
    out.server.peak_rss_mib = status_kib(pid, "VmHWM:").unwrap_or(f64::NAN) / 1024.0;
    // A clean stop, as systemd would ask for it.
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let mut child = child;
    let _ = child.0.wait();
    out
}

/// The ceiling, /me and send-code driven by wrk against the same processes; nothing if
/// wrk is not installed.
fn wrk_check(
    opts: &Opts,
    ceiling: SocketAddr,
    server: SocketAddr,
    prepared: &Prepared,
    dir: &Path,
) -> Vec<outside::WrkRow> {
    if Command::new("wrk").arg("--version").output().is_err() {
        eprintln!("  wrk is not installed: no check against it (apt-get install wrk)");
        return Vec::new();
    }
    let seconds = opts.duration.as_secs_f64();
    let c = opts.connections;
    eprintln!("  wrk: ceiling, me, send-code...");
    let Some(top) = outside::wrk(
        "ceiling (bare hyper)",
        ceiling,
        outside::WrkLoad::Get("/"),
        c,
        seconds,
        dir,
    ) else {
        return Vec::new();
    };
    let mut rows = vec![top.clone()];
    if let Some(token) = prepared.me_tokens.first() {
        // One token in a header, no script: a script's work per request is wrk's own, on
        // the client's cores, and /me is the scenario fast enough for that to show.
        let header = format!("Authorization: Bearer {token}");
        let load = outside::WrkLoad::GetWith("/api/v1/me", &header);
        rows.extend(outside::wrk("me", server, load, c, seconds, dir));
    }
    if opts.wants("send-code") {
        let script = outside::send_code_script(131);
        rows.extend(outside::wrk(
            "send-code",
            server,
            outside::WrkLoad::Script(&script),
            c,
            seconds,
            dir,
        ));
    }
    for row in &mut rows {
        row.ratio_to_ceiling = Some(row.rps / top.rps);
    }
    rows
}

// ---------------------------------------------------------------------------------------
// Report

#[derive(Serialize)]
struct Report {
    date: String,
    git_commit: Option<String>,
    cores: usize,
    loadavg_before: Option<String>,
    loadavg_after: Option<String>,
    options: Opts,
    ceiling_rps: f64,
    raw_hash_rate: Option<RawHash>,
    scenarios: Vec<Stats>,
    targets: Vec<Target>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scale: Option<ScaleReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    postgres: Option<postgres::PgReport>,
    /// Where the server side and the client ran; None: unpinned.
    cores_split: Option<outside::Cores>,
    #[serde(skip_serializing_if = "Option::is_none")]
    server: Option<ServerReport>,
}

#[derive(Serialize, Clone)]
struct RawHash {
    threads: usize,
    hashes_per_s: f64,
    password_logins_per_s: Option<f64>,
    ratio: Option<f64>,
}

#[derive(Serialize, Clone)]
struct Target {
    what: String,
    goal: String,
    measured: String,
    met: bool,
}

#[derive(Serialize, Clone, Default)]
struct ScaleReport {
    users: u64,
    pending_codes: u64,
    fill_s: f64,
    db_bytes: u64,
    start_to_serving_ms: f64,
    rss_serving_mib: f64,
    /// VmRSS after [`SCALE_IDLE`] with no requests: what an idle server holds once the
    /// start's transient memory has gone back (the allocator returns it with a delay).
    rss_idle_mib: f64,
    /// VmHWM after the read-only `me` run, before the logins write.
    rss_peak_after_reads_mib: f64,
    rss_peak_mib: f64,
    rss_after_mib: f64,
    /// The same, for a start right after kill -9 of the server (no clean close).
    crash_start_to_serving_ms: f64,
    crash_rss_serving_mib: f64,
    /// `smsauth_users` as that start reports it; must be `users`.
    crash_users: Option<u64>,
    scenarios: Vec<Stats>,
}

fn loadavg() -> Option<String> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

fn git_commit() -> Option<String> {
    let out = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn fmt_ms(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if v < 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.1}")
    }
}

fn table(rows: &[Stats]) -> String {
    let mut t = String::from(
        "| scenario | conns | req/s | p50 ms | p90 ms | p99 ms | max ms | errors | ceiling req/s | vs ceiling |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for s in rows {
        let note = s
            .ran_out_after_s
            .map(|t| format!(" (data ran out after {t:.1} s)"))
            .unwrap_or_default();
        t.push_str(&format!(
            "| {}{} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} |\n",
            s.scenario,
            note,
            s.connections,
            s.rps,
            fmt_ms(s.p50_ms),
            fmt_ms(s.p90_ms),
            fmt_ms(s.p99_ms),
            fmt_ms(s.max_ms),
            s.errors,
            s.ceiling_rps.map_or("-".into(), |r| format!("{r:.0}")),
            s.ratio_to_ceiling.map_or("-".into(), |r| format!("{r:.2}"))
        ));
    }
    t
}

/// Peak RSS of the server over a whole sled run, at most (MiB).
const PEAK_RSS_GOAL_MIB: f64 = 128.0;

fn targets(rows: &[Stats], server: Option<&ServerReport>) -> Vec<Target> {
    let find = |name: &str| rows.iter().find(|s| s.scenario == name);
    let mut out = Vec::new();
    for (name, min_ratio) in [
        ("healthz", 0.9),
        ("me", 0.6),
        ("send-code", 0.25),
        ("sms-login-existing", 0.25),
        ("sms-login-new", 0.25),
    ] {
        let Some(s) = find(name) else { continue };
        let ratio = s.ratio_to_ceiling.unwrap_or(0.0);
        out.push(Target {
            what: name.into(),
            goal: format!("ratio >= {min_ratio}, p99 <= 10 ms, 0 errors"),
            measured: format!(
                "ratio {ratio:.2}, p99 {} ms, {} errors",
                fmt_ms(s.p99_ms),
                s.errors
            ),
            met: ratio >= min_ratio && s.p99_ms <= 10.0 && s.errors == 0,
        });
    }
    if let (Some(alone), Some(mixed)) = (find("me"), find("me-under-password-load")) {
        out.push(Target {
            what: "me-under-password-load".into(),
            goal: format!(
                "p99 <= 2 x unloaded p99 ({} ms)",
                fmt_ms(2.0 * alone.p99_ms)
            ),
            measured: format!(
                "p99 {} ms = {:.2} x",
                fmt_ms(mixed.p99_ms),
                mixed.p99_ms / alone.p99_ms
            ),
            met: mixed.p99_ms <= 2.0 * alone.p99_ms && mixed.errors == 0,
        });
    }
    if let Some(s) = server {
        out.push(Target {
            what: "server peak RSS over the run".into(),
            goal: format!("<= {PEAK_RSS_GOAL_MIB} MiB"),
            measured: format!("{:.1} MiB", s.peak_rss_mib),
            met: s.peak_rss_mib <= PEAK_RSS_GOAL_MIB,
        });
    }
    out
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("bench")
}

// ---------------------------------------------------------------------------------------

fn main() {
    outside::serve_ceiling_if_asked();
    let opts = Opts::parse();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // The PostgreSQL runs share the machine with the database and stay unpinned.
    let split = if opts.pin && !opts.engine.postgres() {
        let split = outside::pin();
        if split.is_none() {
            eprintln!("fewer than 2 cores: server and client share them");
        }
        split
    } else {
        None
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(split.map_or(cores, |s| s.client.len()))
        .enable_all()
        .build()
        .expect("runtime");
    let loadavg_before = loadavg();
    eprintln!(
        "load bench: {cores} cores, load average {}, {} connections, {:?} warm-up + {:?} per scenario",
        loadavg_before.as_deref().unwrap_or("?"),
        opts.connections,
        opts.warmup,
        opts.duration
    );
    if let Some(seconds) = opts.soak {
        let report = runtime.block_on(soak::soak_mode(seconds));
        soak::print(&report);
        let dir = target_dir();
        std::fs::create_dir_all(&dir).expect("target/bench");
        let json = serde_json::to_string_pretty(&report).expect("report");
        std::fs::write(dir.join("soak.json"), json).expect("write the report");
        return;
    }
    let report = runtime.block_on(run(opts, cores, loadavg_before));
    let dir = target_dir();
    std::fs::create_dir_all(&dir).expect("target/bench");
    let json = serde_json::to_string_pretty(&report).expect("report");
    let stamp = report.date.replace([':', '-'], "");
    std::fs::write(dir.join(format!("load-{stamp}.json")), &json).expect("write report");
    std::fs::write(dir.join("load-latest.json"), &json).expect("write report");
    eprintln!("wrote {}", dir.join(format!("load-{stamp}.json")).display());
}

async fn run(opts: Opts, cores: usize, loadavg_before: Option<String>) -> Report {
    let date = jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let c = opts.connections;
    let (_ceiling_process, ceiling) = outside::ceiling().await;
    let mut rows = Vec::new();
    let mut ceiling_all = Raw::default();
    let mut raw_hash = None;
    let mut scale = None;
    let mut server = None;

    if opts.scale {
        let (report, ceiling) = scale_mode(&opts, ceiling).await;
        ceiling_all.add(ceiling);
        scale = Some(report);
    } else if opts.engine.sled() {
        let run = sled_run(&opts, ceiling).await;
        rows.extend(run.rows);
        ceiling_all.add(run.ceiling);
        raw_hash = run.raw_hash;
        server = Some(run.server);
    }
    // After sled, so that its rows can stand beside the same scenarios on PostgreSQL.
    let pg = if opts.engine.postgres() && !opts.scale {
        let (report, ceiling) = postgres::run(&opts, ceiling, &rows).await;
        ceiling_all.add(ceiling);
        Some(report)
    } else {
        None
    };
    let ceiling_rps = ceiling_all.latencies_us.len() as f64 / ceiling_all.seconds.max(1e-9);
    rows.insert(0, {
        let mut c = ceiling_all;
        c.name = "ceiling (bare hyper), all slices".into();
        c.connections = opts.connections;
        c.stats(None)
    });
    let targets = targets(&rows, server.as_ref());
    let loadavg_after = loadavg();
    let split = outside::cores();
    let placement = match split {
        Some(c) => format!(
            "server and ceiling as processes of their own on core(s) {:?}, this client on {:?}",
            c.server, c.client
        ),
        None => "server, ceiling and client as processes of their own, unpinned".into(),
    };

    println!(
        "\n## smsauth load benchmark, {date}\n\n{cores} cores, load average {} before / {} after; {} connections; {:.1} s warm-up + {:.1} s measured per scenario in {} slices, each after a slice of the ceiling; {placement}.\n",
        loadavg_before.as_deref().unwrap_or("?"),
        loadavg_after.as_deref().unwrap_or("?"),
        c,
        opts.warmup.as_secs_f64(),
        opts.duration.as_secs_f64(),
        opts.rounds
    );
    println!("{}", table(&rows));
    if let Some(s) = &server {
        println!(
            "Server RSS after each scenario (MiB): {}; peak over the run (VmHWM): {:.1} MiB.\n",
            s.rss_after_mib
                .iter()
                .map(|(name, mib)| format!("{name} {mib:.1}"))
                .collect::<Vec<_>>()
                .join(", "),
            s.peak_rss_mib
        );
        if !s.wrk.is_empty() {
            println!(
                "The same server driven by wrk (-t{} -c{c}, {:.0} s each, on the client's cores):\n\n\
                 | scenario | req/s | p99 ms | errors | vs wrk's ceiling | this client's ratio |\n\
                 | --- | ---: | ---: | ---: | ---: | ---: |",
                split.map_or(1, |c| c.client.len()),
                opts.duration.as_secs_f64()
            );
            for w in &s.wrk {
                let ours = rows
                    .iter()
                    .find(|r| r.scenario == w.scenario)
                    .and_then(|r| r.ratio_to_ceiling);
                println!(
                    "| {} | {:.0} | {} | {} | {} | {} |",
                    w.scenario,
                    w.rps,
                    fmt_ms(w.p99_ms),
                    w.errors,
                    w.ratio_to_ceiling.map_or("-".into(), |r| format!("{r:.2}")),
                    ours.map_or("-".into(), |r| format!("{r:.2}"))
                );
            }
            println!();
        }
    }
    if let Some(r) = &raw_hash {
        println!(
            "Raw argon2id rate at the configured parameters on {} threads: {:.1} hashes/s; password logins: {}.\n",
            r.threads,
            r.hashes_per_s,
            match (r.password_logins_per_s, r.ratio) {
                (Some(p), Some(x)) => format!("{p:.1}/s = {x:.2} of it"),
                _ => "not run".into(),
            }
        );
    }
    if let Some(s) = &scale {
        println!(
            "### Scale: {} users, {} pending codes (server as a child process)\n\n\
             - fill through the store API: {:.1} s, {:.0} MiB on disk\n\
             - start to serving (spawn to first 200 on /healthz): {:.0} ms\n\
             - RSS when serving: {:.1} MiB, after {} s idle: {:.1} MiB; peak (VmHWM) after \
             the `me` run: {:.1} MiB, after the sms-login run too: {:.1} MiB\n\
             - after kill -9, start to serving: {:.0} ms, RSS when serving: {:.1} MiB, \
             smsauth_users: {}\n",
            s.users,
            s.pending_codes,
            s.fill_s,
            s.db_bytes as f64 / 1048576.0,
            s.start_to_serving_ms,
            s.rss_serving_mib,
            SCALE_IDLE.as_secs(),
            s.rss_idle_mib,
            s.rss_peak_after_reads_mib,
            s.rss_peak_mib,
            s.crash_start_to_serving_ms,
            s.crash_rss_serving_mib,
            s.crash_users
                .map_or_else(|| "unreadable".to_owned(), |n| n.to_string()),
        );
        println!("{}", table(&s.scenarios));
    }
    if !targets.is_empty() {
        println!("| target | goal | measured | met |\n| --- | --- | --- | --- |");
        for t in &targets {
            println!(
                "| {} | {} | {} | {} |",
                t.what,
                t.goal,
                t.measured,
                if t.met { "yes" } else { "NO" }
            );
        }
        println!();
    }
    if let Some(pg) = &pg {
        println!("{}", postgres::markdown(pg));
    }
    Report {
        date,
        git_commit: git_commit(),
        cores,
        loadavg_before,
        loadavg_after,
        options: opts,
        ceiling_rps,
        raw_hash_rate: raw_hash,
        scenarios: rows,
        targets,
        scale,
        postgres: pg,
        cores_split: split.cloned(),
        server,
    }
}

// ---------------------------------------------------------------------------------------
// Scale mode: a big store, filled through the store API, served by the real binary.

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

fn status_kib(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

async fn healthy(addr: SocketAddr) -> bool {
    matches!(get_once(addr, "/healthz").await, Some(r) if r.status() == StatusCode::OK)
}

/// One GET on a connection of its own; None if the server is not (yet) there.
async fn get_once(addr: SocketAddr, path: &str) -> Option<Response<hyper::body::Incoming>> {
    let stream = TcpStream::connect(addr).await.ok()?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(conn);
    sender.send_request(get(path)).await.ok()
}

/// How long scale mode lets the server idle before it reads its resting RSS.
const SCALE_IDLE: Duration = Duration::from_secs(15);

async fn scale_mode(opts: &Opts, ceiling: SocketAddr) -> (ScaleReport, Raw) {
    const SECRET: &str = "bench-token-secret-of-at-least-32-characters";
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    let port = free_port();
    let cfg = load_config(
        dir.path(),
        &bench_config(&data, &format!("127.0.0.1:{port}"), SECRET, 3600, ""),
    );
    let mut report = ScaleReport {
        users: opts.scale_users,
        pending_codes: opts.scale_codes.min(opts.scale_users),
        ..Default::default()
    };

    eprintln!("  scale: filling {} users...", report.users);
    let filled = Instant::now();
    let (login_phones, tokens) = {
        let sled =
            Arc::new(SledStore::open(&data, cfg.storage.cache_capacity_mb).expect("open store"));
        let store = Store::embedded(sled.clone(), &cfg).expect("store");
        let users = {
            let store = store.clone();
            let n = report.users;
            tokio::task::spawn_blocking(move || create_users(&store, 135, n, None))
                .await
                .expect("users")
        };
        // Pending login codes for every (users / codes)-th user, written by the codes
        // module with the server's own code key, as /sms/code would.
        eprintln!("  scale: {} pending codes...", report.pending_codes);
        let code_key = smsauth::keys::load_or_create(&data, "code.key").expect("code key");
        let codes = Codes::new(
            cfg.code.clone(),
            Some(FIXED_CODE.into()),
            code_key,
            store.codes.clone(),
            store.waits.clone(),
        );
        let step = (report.users / report.pending_codes.max(1)).max(1) as usize;
        let login_phones: Vec<String> = users
            .iter()
            .step_by(step)
            .take(report.pending_codes as usize)
            .map(|u| u.phone.clone())
            .collect();
        put_codes(&codes, &store.phones, login_phones.iter().cloned()).await;
        let tokens = Tokens::new(
            signing_keys(&cfg, &store).await,
            &cfg.token,
            store.sessions.clone(),
        );
        let sample = (report.users / ME_USERS).max(1) as usize;
        let tokens: Vec<String> = users
            .iter()
            .step_by(sample)
            .map(|u| {
                tokens
                    .issue_session(u, &u.id.to_be_bytes().repeat(2).try_into().unwrap())
                    .token
            })
            .collect();
        drop(codes);
        drop(store);
        sled.flush_blocking().expect("flush");
        (login_phones, tokens)
    };
    report.fill_s = filled.elapsed().as_secs_f64();
    report.db_bytes = dir_bytes(&data);
    eprintln!(
        "  scale: filled in {:.1} s, {:.0} MiB; starting the server",
        report.fill_s,
        report.db_bytes as f64 / 1048576.0
    );

    let config_path = dir.path().join("smsauth.toml");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let (mut child, spawned) = serve(&config_path, addr, Stdio::null()).await;
    let pid = child.id();
    report.start_to_serving_ms = spawned.as_secs_f64() * 1000.0;
    report.rss_serving_mib = status_kib(pid, "VmRSS:").unwrap_or(f64::NAN) / 1024.0;
    tokio::time::sleep(SCALE_IDLE).await;
    report.rss_idle_mib = status_kib(pid, "VmRSS:").unwrap_or(f64::NAN) / 1024.0;

    let bench = Bench {
        opts: opts.clone(),
        ceiling,
        addrs: vec![addr],
    };
    let one = |name: &str, make: MakeRequest| single(name, opts.connections, make);
    let mut ceiling_all = Raw::default();
    eprintln!("  scale: me");
    let (rows, c) = measure(&bench, one("scale: me", me_requests(Arc::new(tokens)))).await;
    report.scenarios.extend(rows);
    ceiling_all.add(c);
    report.rss_peak_after_reads_mib = status_kib(pid, "VmHWM:").unwrap_or(f64::NAN) / 1024.0;
    eprintln!("  scale: sms-login-existing");
    let (rows, c) = measure(
        &bench,
        one("scale: sms-login-existing", sms_logins(login_phones)),
    )
    .await;
    report.scenarios.extend(rows);
    ceiling_all.add(c);
    report.rss_peak_mib = status_kib(pid, "VmHWM:").unwrap_or(f64::NAN) / 1024.0;
    report.rss_after_mib = status_kib(pid, "VmRSS:").unwrap_or(f64::NAN) / 1024.0;

    // A start with no clean close behind it: the user count must come back all the same.
    eprintln!("  scale: kill -9 and start again");
    let _ = child.kill();
    let _ = child.wait();
    let (mut child, spawned) = serve(&config_path, addr, Stdio::null()).await;
    report.crash_start_to_serving_ms = spawned.as_secs_f64() * 1000.0;
    report.crash_rss_serving_mib = status_kib(child.id(), "VmRSS:").unwrap_or(f64::NAN) / 1024.0;
    report.crash_users = users_metric(addr).await;
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    (report, ceiling_all)
}

/// Starts the release binary on `config_path`, its log (stdout) into `log`; returns it
/// once it answers `/healthz` on `addr`, with the time that took from spawn.
async fn serve(
    config_path: &Path,
    addr: SocketAddr,
    log: Stdio,
) -> (std::process::Child, Duration) {
    let spawned = Instant::now();
    let mut child = outside::on_server_cores(Path::new(env!("CARGO_BIN_EXE_smsauth")))
        .args(["serve", "--config"])
        .arg(config_path)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start smsauth");
    loop {
        if healthy(addr).await {
            return (child, spawned.elapsed());
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("smsauth exited during start: {status}");
        }
        assert!(
            spawned.elapsed() < Duration::from_secs(120),
            "smsauth did not start"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// `smsauth_users` from the server's `/metrics`.
async fn users_metric(addr: SocketAddr) -> Option<u64> {
    let resp = get_once(addr, "/metrics").await?;
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    std::str::from_utf8(&body)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("smsauth_users ")?.trim().parse().ok())
}
