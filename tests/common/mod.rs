//! Test harness: runs the real `smsauth` binary on an ephemeral loopback port with a
//! temporary data dir, reads its JSON log (where the `log` sender writes codes), and
//! talks HTTP to it. Restarts are real processes: SIGTERM, or kill -9.
//!
//! With TEST_STORAGE_ENGINE=postgres every server and admin command runs on PostgreSQL
//! instead of sled: one database per harness dir, in this test binary's shared cluster.

#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod cluster;
pub mod postgres;
pub mod receiver;
pub mod webdriver;
pub mod wechat;
pub mod wechat_flow;

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub const BIN: &str = env!("CARGO_BIN_EXE_smsauth");
const WAIT: Duration = Duration::from_secs(20);
/// `postgres` runs every server on PostgreSQL instead of sled. Not an SMSAUTH_ name: the
/// servers inherit the environment, and smsauth refuses unknown SMSAUTH_ variables.
pub const ENGINE_VAR: &str = "TEST_STORAGE_ENGINE";
/// In a harness dir (beside `data/`): the URL of that dir's PostgreSQL database.
const POSTGRES_URL_FILE: &str = "postgres.url";

/// Log lines of one server process, shared with the thread that reads them.
#[derive(Default)]
struct LogBook {
    lines: Mutex<Vec<Value>>,
    grew: Condvar,
}

pub struct TestServer {
    pub base: String,
    pub client: reqwest::Client,
    dir: Arc<tempfile::TempDir>,
    config_path: PathBuf,
    child: Child,
    log: Arc<LogBook>,
    /// Log lines already handed out as codes.
    codes_seen: Mutex<usize>,
}

impl TestServer {
    /// A server on the default configuration plus `extra` TOML (sections of its own).
    pub async fn start(extra: &str) -> TestServer {
        let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
        Self::start_in(dir, extra).await
    }

    /// A server whose data dir is `dir` (to share it with an earlier process).
    pub async fn start_in(dir: Arc<tempfile::TempDir>, extra: &str) -> TestServer {
        let config_path = dir.path().join("smsauth.toml");
        std::fs::write(&config_path, extra).expect("write config");
        Self::spawn(dir, config_path).await
    }

    async fn spawn(dir: Arc<tempfile::TempDir>, config_path: PathBuf) -> TestServer {
        let mut child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&config_path)
            .env_remove("RUST_LOG")
            // The harness's own settings, as variables so the file is all the test's.
            .env("SMSAUTH_SERVER__LISTEN", "127.0.0.1:0")
            .envs(storage_env(dir.path()))
            .env("SMSAUTH_LOG__FORMAT", "json")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start smsauth");
        let log = Arc::new(LogBook::default());
        let stdout = child.stdout.take().expect("stdout");
        let book = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let value = serde_json::from_str(&line).unwrap_or_else(|_| json!({ "raw": line }));
                book.lines.lock().unwrap().push(value);
                book.grew.notify_all();
            }
        });
        let listening =
            wait_for_line(&log, 0, |l| l["message"] == "listening").unwrap_or_else(|| {
                panic!("server did not start; log: {:?}", log.lines.lock().unwrap())
            });
        let addr = listening["addr"].as_str().expect("addr").to_owned();
        TestServer {
            base: format!("http://{addr}"),
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .unwrap(),
            dir,
            config_path,
            child,
            log,
            codes_seen: Mutex::new(0),
        }
    }

    pub fn dir(&self) -> Arc<tempfile::TempDir> {
        self.dir.clone()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// kill -9, then a new process on the same data dir and config.
    pub async fn kill9_and_restart(mut self) -> TestServer {
        self.kill9();
        Self::spawn(self.dir.clone(), self.config_path.clone()).await
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM; returns the exit status once the process has stopped.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        self.child.wait().expect("wait for smsauth")
    }

    /// SIGTERM, then a new process on the same data dir and config.
    pub async fn restart(mut self) -> TestServer {
        let status = self.terminate();
        assert!(status.success(), "smsauth exited with {status}");
        Self::spawn(self.dir.clone(), self.config_path.clone()).await
    }

    /// All log lines so far.
    pub fn log_lines(&self) -> Vec<Value> {
        self.log.lines.lock().unwrap().clone()
    }

    /// The `n`th (from 0) log line that satisfies `pred`, waiting for it: a line may
    /// reach us a moment after the answer it belongs to.
    pub fn nth_line(&self, n: usize, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        let mut lines = self.log.lines.lock().unwrap();
        loop {
            if let Some(l) = lines.iter().filter(|l| pred(l)).nth(n) {
                return l.clone();
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                panic!("no log line #{n} of that kind; log: {:?}", *lines);
            };
            lines = self.log.grew.wait_timeout(lines, left).unwrap().0;
        }
    }

    /// Waits for a log line that `pred` accepts (since the server started).
    pub fn wait_for_log(&self, pred: impl Fn(&Value) -> bool) -> Value {
        wait_for_line(&self.log, 0, pred).expect("the awaited log line did not come")
    }

    /// GET returning the raw text (e.g. /metrics).
    pub async fn get_text(&self, path: &str) -> (u16, String) {
        let resp = self
            .client
            .get(self.url(path))
            .send()
            .await
            .expect("request");
        (resp.status().as_u16(), resp.text().await.expect("body"))
    }

    /// The newest code the `log` sender wrote for `phone` (E.164) since the last call.
    pub fn take_code(&self, phone: &str) -> String {
        let masked = mask(phone);
        let mut seen = self.codes_seen.lock().unwrap();
        let found = wait_for_line(&self.log, *seen, |l| {
            l["message"] == "verification code (log sender)" && l["phone"] == masked.as_str()
        })
        .unwrap_or_else(|| panic!("no code was logged for {masked}"));
        let lines = self.log.lines.lock().unwrap();
        *seen = lines.iter().rposition(|l| *l == found).unwrap() + 1;
        found["code"].as_str().expect("code field").to_owned()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(self.client.post(self.url(path)).json(&body))
            .await
    }

    pub async fn post_auth(&self, path: &str, token: &str, body: Value) -> (u16, Value) {
        self.send(
            self.client
                .post(self.url(path))
                .bearer_auth(token)
                .json(&body),
        )
        .await
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        let mut req = self.client.get(self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        self.send(req).await
    }

    pub async fn send(&self, req: reqwest::RequestBuilder) -> (u16, Value) {
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, body)
    }

    /// Sends a login code to `phone` and reads it from the log.
    pub async fn send_code(&self, phone: &str, purpose: &str) -> String {
        let (status, body) = self
            .post(
                "/api/v1/sms/code",
                json!({ "phone": phone, "purpose": purpose }),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        self.take_code(&e164(phone))
    }

    /// Code login (registering if new); returns the token response.
    pub async fn sms_login(&self, phone: &str) -> Value {
        let code = self.send_code(phone, "login").await;
        let (status, body) = self
            .post(
                "/api/v1/auth/sms-login",
                json!({ "phone": phone, "code": code }),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for_line(log: &LogBook, from: usize, pred: impl Fn(&Value) -> bool) -> Option<Value> {
    let deadline = Instant::now() + WAIT;
    let mut lines = log.lines.lock().unwrap();
    loop {
        if let Some(l) = lines.iter().skip(from).rev().find(|l| pred(l)) {
            return Some(l.clone());
        }
        let left = deadline.checked_duration_since(Instant::now())?;
        lines = log.grew.wait_timeout(lines, left).unwrap().0;
    }
}

/// A loopback port free now, for a process that must be told its port before it starts
/// (nginx, PostgreSQL, chromedriver, a server whose log is not read at first).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// An error answer: this status, this `error` code, and a message in words.
pub fn assert_error(got: &(u16, Value), status: u16, code: &str) {
    assert_eq!(
        (got.0, got.1["error"].as_str()),
        (status, Some(code)),
        "{:?}",
        got.1
    );
    assert!(
        got.1["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{got:?}"
    );
}

/// `13812345678` -> `+8613812345678` (test phones are Chinese mobile numbers).
pub fn e164(phone: &str) -> String {
    if phone.starts_with('+') {
        phone.to_owned()
    } else {
        format!("+86{phone}")
    }
}

/// As the server masks phones in its log: `+86138****5678`.
pub fn mask(e164: &str) -> String {
    let n = e164.len();
    format!("{}{}{}", &e164[..6], "*".repeat(n - 10), &e164[n - 4..])
}

/// Runs the binary with `args` and waits for it; for command-line tests.
pub fn run_cli(args: &[&str], env: &[(&str, &str)], cwd: &Path) -> std::process::Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).current_dir(cwd).env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run smsauth")
}

/// Runs an admin command (`user list`, `backup FILE`, ...) on the data dir the harness
/// lays out under `dir` (`dir/data`, configuration `dir/smsauth.toml`, and the dir's
/// database under TEST_STORAGE_ENGINE=postgres), as an operator would beside a running or
/// stopped server.
pub fn admin(dir: &Path, args: &[&str]) -> std::process::Output {
    let config = dir.join("smsauth.toml");
    if !config.exists() {
        std::fs::write(&config, "").expect("write config");
    }
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .arg("--config")
        .arg(&config)
        .env_remove("RUST_LOG")
        .envs(storage_env(dir))
        .current_dir(dir);
    cmd.output().expect("run smsauth")
}

/// The storage engine the harness runs servers and commands on: `sled` (the default) or
/// `postgres` (TEST_STORAGE_ENGINE=postgres), for tests that must know.
pub fn engine() -> &'static str {
    match std::env::var(ENGINE_VAR).as_deref() {
        Err(std::env::VarError::NotPresent) | Ok("" | "sled") => "sled",
        Ok("postgres") => "postgres",
        other => panic!("{ENGINE_VAR} must be `sled` or `postgres`, not {other:?}"),
    }
}

/// The storage settings of a process (server or command) on the harness dir `dir`, as
/// variables: the data dir `dir/data` and, under TEST_STORAGE_ENGINE=postgres, the
/// engine and the dir's own database (see `postgres_url`).
pub fn storage_env(dir: &Path) -> Vec<(&'static str, OsString)> {
    let mut env = vec![(
        "SMSAUTH_STORAGE__DATA_DIR",
        dir.join("data").into_os_string(),
    )];
    if engine() == "postgres" {
        env.push(("SMSAUTH_STORAGE__ENGINE", "postgres".into()));
        env.push(("SMSAUTH_STORAGE__POSTGRES__URL", postgres_url(dir).into()));
        env.push((
            "SMSAUTH_PRIVACY__PHONE_KEY_FILE",
            phone_key_file(dir).into_os_string(),
        ));
    }
    env
}

/// The phone key of the harness dir `dir` for a PostgreSQL store (which must be given
/// one): `dir/phone.key`, outside the data dir, made by the first process on the dir.
pub fn phone_key_file(dir: &Path) -> PathBuf {
    static MAKING: Mutex<()> = Mutex::new(());
    let _making = MAKING.lock().unwrap_or_else(|e| e.into_inner());
    let file = dir.join("phone.key");
    if !file.exists() {
        smsauth::privacy::create_key_file(&file, &smsauth::privacy::PhoneKey::generate())
            .unwrap_or_else(|e| panic!("write {}: {e:#}", file.display()));
    }
    file
}

/// The shared PostgreSQL cluster of this test binary; TEST_STORAGE_ENGINE=postgres only.
pub fn shared_postgres() -> &'static postgres::Postgres {
    postgres::Postgres::shared().unwrap_or_else(|| {
        panic!(
            "{ENGINE_VAR}=postgres, but there is no PostgreSQL to run the servers on \
             (install the PostgreSQL server binaries: Debian package `postgresql`)"
        )
    })
}

/// The PostgreSQL database of the harness dir `dir`: made by the first server or command
/// on the dir, its URL kept in `dir/postgres.url`, so that restarts and later processes
/// on the same dir find the same data.
pub fn postgres_url(dir: &Path) -> String {
    // Two threads must not both make one for the same dir.
    static MAKING: Mutex<()> = Mutex::new(());
    let _making = MAKING.lock().unwrap_or_else(|e| e.into_inner());
    let file = dir.join(POSTGRES_URL_FILE);
    match std::fs::read_to_string(&file) {
        Ok(url) => url.trim().to_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let url = shared_postgres().new_database();
            std::fs::write(&file, &url).unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
            url
        }
        Err(e) => panic!("read {}: {e}", file.display()),
    }
}

/// Every table of the PostgreSQL database of `dir` with all its rows as text (one row
/// per line, `(col,col,...)`), schema-blind: for checks of what the engine stored,
/// whatever its tables are.
pub fn postgres_tables(dir: &Path) -> Vec<(String, String)> {
    let pg = shared_postgres();
    let url = postgres_url(dir);
    let names = pg.psql_url(
        &url,
        "SELECT quote_ident(table_schema) || '.' || quote_ident(table_name) \
         FROM information_schema.tables \
         WHERE table_type = 'BASE TABLE' \
         AND table_schema NOT IN ('pg_catalog', 'information_schema') \
         ORDER BY 1;",
    );
    names
        .lines()
        .map(|table| {
            let rows = pg.psql_url(&url, &format!("SELECT t::text FROM {table} t;"));
            (table.to_owned(), rows)
        })
        .collect()
}

/// stdout of a command that must have succeeded.
pub fn ok_stdout(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl TestServer {
    /// Waits for a log line that matches `pred`, starting from the first line.
    pub fn wait_log(&self, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        wait_for_line(&self.log, 0, pred)
    }
}
