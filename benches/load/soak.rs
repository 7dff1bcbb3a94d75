//! Soak mode (`--soak SECONDS`): the release binary as a child process, as `smsauth
//! serve` runs in production, under a realistic mix of visitors at half the rate it
//! sustains, with its RSS, open files and on-disk size sampled every 10 s. What a
//! long-running server must not do is grow: the report gives each figure's growth from
//! the second minute (the median of its samples) to the last minute.
//!
//! A visitor does one of: a code login of a new phone (send-code, then sms-login; 2%), a
//! code login of an existing user (30%), GET /me with a token from an earlier login
//! (67.5%), or a password login (0.5%). New accounts are what a store rightly grows by,
//! so every sample also gives the number of users. Each connection paces its visitors
//! so that all of them together keep to the target rate; one that falls behind sends at
//! once.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpStream;

use super::{
    Body, FIXED_CODE, PASSWORD, bench_config, dir_bytes, e164, free_port, get_with_token, national,
    post_json, serve, status_kib,
};

/// Connections the visitors come over.
const CONNECTIONS: usize = 32;
/// How long the sustainable rate is measured for, before the soak.
const PROBE: Duration = Duration::from_secs(10);
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// Password accounts made at the start, for the password logins.
const PASSWORD_USERS: u64 = 20;
/// Tokens kept for GET /me (the newest replace the oldest).
const TOKENS: usize = 10_000;
/// The phone series (a 3-digit prefix, see `national`) of the code-login visitors and of
/// the password accounts.
const SOAK_NEW: u32 = 135;
/// Existing users needed before existing users log in again (until then those visitors
/// are new phones, which makes them).
const MIN_EXISTING: usize = 2_000;
const SOAK_PASSWORD: u32 = 134;

#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub at_s: f64,
    pub rss_mib: f64,
    pub open_files: u64,
    pub disk_mib: f64,
    pub users: u64,
    pub visitors: u64,
    pub errors: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    pub sustained_visitors_per_s: f64,
    pub target_visitors_per_s: f64,
    pub achieved_visitors_per_s: f64,
    pub samples: Vec<Sample>,
    /// From the sample at 60 s to the last taken while visitors came, in percent.
    pub rss_growth_pct: f64,
    pub disk_growth_pct: f64,
    pub users_growth_pct: f64,
    pub open_files_growth: i64,
    pub errors: u64,
}

/// What the visitors share: tokens of earlier logins, the phones of existing users.
struct Visitors {
    next_phone: AtomicU64,
    /// Phones with an account and no login in flight, oldest first: an existing user's
    /// login takes one and gives it back when done, so no two visitors log in to one
    /// phone at once (the second would find its code used up by the first).
    idle_phones: Mutex<std::collections::VecDeque<u64>>,
    tokens: Mutex<Vec<String>>,
    done: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

/// One keep-alive connection.
struct Conn {
    addr: SocketAddr,
    sender: Option<hyper::client::conn::http1::SendRequest<Body>>,
}

impl Conn {
    async fn send(&mut self, req: Request<Body>) -> Result<(StatusCode, Bytes), String> {
        if self.sender.is_none() {
            let stream = TcpStream::connect(self.addr)
                .await
                .map_err(|e| e.to_string())?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            self.sender = Some(sender);
        }
        let sender = self.sender.as_mut().expect("connected");
        let resp = match sender.send_request(req).await {
            Ok(resp) => resp,
            Err(e) => {
                self.sender = None;
                return Err(e.to_string());
            }
        };
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, body))
    }
}

impl Conn {
    /// For the set-up, where a lost connection (the server just started) is tried again
    /// on a new one; the request must be safe to repeat.
    async fn send_again(&mut self, req: Request<Body>) -> StatusCode {
        let (parts, body) = req.into_parts();
        let body = body.collect().await.expect("a full body").to_bytes();
        let mut last = String::new();
        for _ in 0..3 {
            let req = Request::from_parts(parts.clone(), Body::new(body.clone()));
            match self.send(req).await {
                Ok((status, _)) => return status,
                Err(e) => last = e,
            }
        }
        panic!("soak set-up: {last}");
    }
}

impl Visitors {
    fn fail(&self, what: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.first_error.lock().unwrap().get_or_insert(what);
    }

    /// A code login of `national`: its token, or None after counting the failure.
    async fn code_login(&self, conn: &mut Conn, national: &str) -> Option<String> {
        let phone = e164(national);
        let send = post_json("/api/v1/sms/code", format!(r#"{{"phone":"{phone}"}}"#));
        match conn.send(send).await {
            Ok((StatusCode::OK, _)) => {}
            other => {
                self.fail(format!("send-code: {other:?}"));
                return None;
            }
        }
        let login = post_json(
            "/api/v1/auth/sms-login",
            format!(r#"{{"phone":"{phone}","code":"{FIXED_CODE}"}}"#),
        );
        match conn.send(login).await {
            Ok((StatusCode::OK, body)) => token_of(&body),
            other => {
                self.fail(format!("sms-login: {other:?}"));
                None
            }
        }
    }

    async fn new_phone(&self, conn: &mut Conn) {
        let i = self.next_phone.fetch_add(1, Ordering::Relaxed);
        if let Some(token) = self.code_login(conn, &national(SOAK_NEW, i)).await {
            self.keep_token(token);
            self.idle_phones.lock().unwrap().push_back(i);
        }
    }

    fn take_idle_phone(&self) -> Option<u64> {
        let mut idle = self.idle_phones.lock().unwrap();
        if idle.len() < MIN_EXISTING {
            return None;
        }
        idle.pop_front()
    }

    fn keep_token(&self, token: String) {
        let mut tokens = self.tokens.lock().unwrap();
        if tokens.len() >= TOKENS {
            let i = self.done.load(Ordering::Relaxed) as usize % TOKENS;
            tokens[i] = token;
        } else {
            tokens.push(token);
        }
    }

    /// Visitor number `n`: which of the mix it is follows from `n`.
    async fn visit(&self, conn: &mut Conn, n: u64) {
        match n % 200 {
            // A new phone logs in by code (2%).
            0..4 => self.new_phone(conn).await,
            // An existing user logs in by code (30%), once there are enough of them;
            // until then the visitor is a new phone.
            4..64 => match self.take_idle_phone() {
                Some(i) => {
                    let _ = self.code_login(conn, &national(SOAK_NEW, i)).await;
                    self.idle_phones.lock().unwrap().push_back(i);
                }
                None => self.new_phone(conn).await,
            },
            // A password login (0.5%).
            64 => {
                let phone = e164(&national(SOAK_PASSWORD, n % PASSWORD_USERS));
                let login = post_json(
                    "/api/v1/auth/login",
                    format!(r#"{{"phone":"{phone}","password":"{PASSWORD}"}}"#),
                );
                match conn.send(login).await {
                    Ok((StatusCode::OK, _)) => {}
                    other => self.fail(format!("password login: {other:?}")),
                }
            }
            // GET /me (67.5%).
            _ => {
                let token = {
                    let tokens = self.tokens.lock().unwrap();
                    tokens.get(n as usize % tokens.len().max(1)).cloned()
                };
                let Some(token) = token else { return };
                match conn.send(get_with_token("/api/v1/me", &token)).await {
                    Ok((StatusCode::OK, _)) => {}
                    other => self.fail(format!("me: {other:?}")),
                }
            }
        }
        self.done.fetch_add(1, Ordering::Relaxed);
    }
}

fn token_of(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    Some(value["access_token"].as_str()?.to_owned())
}

/// Visitors over [`CONNECTIONS`] connections for `time`, at `rate` a second in all
/// (None: as fast as they are answered). Returns how many were served.
async fn run_visitors(
    visitors: &Arc<Visitors>,
    addr: SocketAddr,
    rate: Option<f64>,
    time: Duration,
) -> u64 {
    let before = visitors.done.load(Ordering::Relaxed);
    let start = Instant::now();
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|c| {
            let visitors = visitors.clone();
            tokio::spawn(async move {
                let mut conn = Conn { addr, sender: None };
                let mut k = 0u64;
                while start.elapsed() < time {
                    let n = k * CONNECTIONS as u64 + c as u64;
                    if let Some(rate) = rate {
                        let due = start + Duration::from_secs_f64(n as f64 / rate);
                        tokio::time::sleep_until(due.into()).await;
                    }
                    visitors.visit(&mut conn, n).await;
                    k += 1;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("a visitor task");
    }
    visitors.done.load(Ordering::Relaxed) - before
}

fn open_files(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}

pub async fn soak_mode(seconds: u64) -> SoakReport {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    // The bench's configuration, with codes that may be sent again at once: existing
    // users log in again and again, as they would over days.
    let config = bench_config(
        &data,
        &addr.to_string(),
        "bench-token-secret-of-at-least-32-characters",
        300,
        "",
    )
    .replace("[code]\n", "[code]\nresend_interval_secs = 0\n");
    let config_path = dir.path().join("smsauth.toml");
    std::fs::write(&config_path, config).expect("write config");
    let (mut child, _) = serve(&config_path, addr, Stdio::null()).await;
    let pid = child.id();

    let visitors = Arc::new(Visitors {
        next_phone: AtomicU64::new(0),
        idle_phones: Mutex::new(std::collections::VecDeque::new()),
        tokens: Mutex::new(Vec::new()),
        done: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        first_error: Mutex::new(None),
    });
    let mut conn = Conn { addr, sender: None };
    for i in 0..PASSWORD_USERS {
        let phone = e164(&national(SOAK_PASSWORD, i));
        let send = post_json(
            "/api/v1/sms/code",
            format!(r#"{{"phone":"{phone}","purpose":"register"}}"#),
        );
        assert_eq!(conn.send_again(send).await, StatusCode::OK);
        let register = post_json(
            "/api/v1/auth/register",
            format!(r#"{{"phone":"{phone}","code":"{FIXED_CODE}","password":"{PASSWORD}"}}"#),
        );
        assert_eq!(conn.send_again(register).await, StatusCode::CREATED);
    }

    eprintln!(
        "soak: measuring the rate the mix is served at ({} s)",
        PROBE.as_secs()
    );
    let sustained = run_visitors(&visitors, addr, None, PROBE).await as f64 / PROBE.as_secs_f64();
    let target = sustained / 2.0;
    eprintln!("soak: {sustained:.0} visitors/s sustained; {seconds} s at {target:.0}/s");

    let soak_start = Instant::now();
    let sampler = {
        let visitors = visitors.clone();
        tokio::spawn(async move {
            let mut samples = Vec::new();
            loop {
                samples.push(Sample {
                    at_s: soak_start.elapsed().as_secs_f64().round(),
                    rss_mib: status_kib(pid, "VmRSS:").unwrap_or(f64::NAN) / 1024.0,
                    open_files: open_files(pid),
                    disk_mib: dir_bytes(&data) as f64 / (1024.0 * 1024.0),
                    users: super::users_metric(addr).await.unwrap_or(0),
                    visitors: visitors.done.load(Ordering::Relaxed),
                    errors: visitors.errors.load(Ordering::Relaxed),
                });
                // The last sample is taken while the visitors still come.
                if soak_start.elapsed() + SAMPLE_EVERY > Duration::from_secs(seconds) {
                    return samples;
                }
                tokio::time::sleep(SAMPLE_EVERY).await;
            }
        })
    };
    let served = run_visitors(&visitors, addr, Some(target), Duration::from_secs(seconds)).await;
    let achieved = served as f64 / soak_start.elapsed().as_secs_f64();
    let samples = sampler.await.expect("the sampler");
    let _ = child.kill();
    let _ = child.wait();
    if let Some(e) = visitors.first_error.lock().unwrap().as_ref() {
        eprintln!("soak: first error: {e}");
    }

    // Medians over the second minute and over the last one: a single RSS sample swings by
    // ±15 MiB with the allocator's purges, a minute of them does not.
    let end = samples.last().expect("a sample").at_s;
    let window = |from: f64, to: f64| -> Vec<&Sample> {
        let w: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.at_s >= from && s.at_s < to)
            .collect();
        if w.is_empty() {
            vec![samples.last().expect("a sample")]
        } else {
            w
        }
    };
    let (first, last) = (window(60.0, 120.0), window(end - 60.0, end + 1.0));
    let median = |w: &[&Sample], f: fn(&Sample) -> f64| -> f64 {
        let mut v: Vec<f64> = w.iter().map(|s| f(s)).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let growth = |f: fn(&Sample) -> f64| (median(&last, f) / median(&first, f) - 1.0) * 100.0;
    SoakReport {
        sustained_visitors_per_s: sustained,
        target_visitors_per_s: target,
        achieved_visitors_per_s: achieved,
        rss_growth_pct: growth(|s| s.rss_mib),
        disk_growth_pct: growth(|s| s.disk_mib),
        users_growth_pct: growth(|s| s.users as f64),
        open_files_growth: median(&last, |s| s.open_files as f64) as i64
            - median(&first, |s| s.open_files as f64) as i64,
        errors: visitors.errors.load(Ordering::Relaxed),
        samples,
    }
}

pub fn print(report: &SoakReport) {
    println!(
        "\nSoak: {:.0} visitors/s sustained, run at {:.0}/s (achieved {:.0}/s), {} errors\n",
        report.sustained_visitors_per_s,
        report.target_visitors_per_s,
        report.achieved_visitors_per_s,
        report.errors
    );
    println!("| at s | RSS MiB | open files | on disk MiB | users | visitors | errors |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for s in &report.samples {
        println!(
            "| {:.0} | {:.1} | {} | {:.1} | {} | {} | {} |",
            s.at_s, s.rss_mib, s.open_files, s.disk_mib, s.users, s.visitors, s.errors
        );
    }
    println!(
        "\nMedian of the second minute's samples to the median of the last minute's: RSS {:+.1}%, on disk {:+.1}%, users {:+.1}%, open files {:+}",
        report.rss_growth_pct,
        report.disk_growth_pct,
        report.users_growth_pct,
        report.open_files_growth
    );
}
