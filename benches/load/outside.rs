//! The processes of a run: the server under test and the ceiling each run as a process
//! of their own on the server's cores, and this process (the load generator) on the
//! others, so that the ratios are what an outside load generator sees. `wrk`, where it
//! is installed, drives the same server in the same run as a check on this client.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Which cores the server side (server under test, ceiling) and the client use.
#[derive(Debug, Clone, Serialize)]
pub struct Cores {
    pub server: Vec<usize>,
    pub client: Vec<usize>,
}

static CORES: OnceLock<Cores> = OnceLock::new();

/// The cores of this run, once [`pin`] has split them.
pub fn cores() -> Option<&'static Cores> {
    CORES.get()
}

/// Splits the cores this process may use into two halves, the first for the server side
/// and the second for the client, and moves this process (every thread it makes from now
/// on) onto the client's. With fewer than two cores nothing is pinned.
pub fn pin() -> Option<&'static Cores> {
    let allowed = rustix::thread::sched_getaffinity(None).ok()?;
    let cpus: Vec<usize> = (0..rustix::thread::CpuSet::MAX_CPU)
        .filter(|&c| allowed.is_set(c))
        .collect();
    if cpus.len() < 2 {
        return None;
    }
    let (server, client) = cpus.split_at(cpus.len() / 2);
    let mut set = rustix::thread::CpuSet::new();
    for &c in client {
        set.set(c);
    }
    rustix::thread::sched_setaffinity(None, &set).ok()?;
    CORES
        .set(Cores {
            server: server.to_vec(),
            client: client.to_vec(),
        })
        .ok()?;
    CORES.get()
}

fn list(cpus: &[usize]) -> String {
    cpus.iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// `program` to run on the server's cores (through `taskset`), or as it is unpinned.
pub fn on_server_cores(program: &Path) -> Command {
    match cores() {
        Some(c) => {
            let mut cmd = Command::new("taskset");
            cmd.arg("-c").arg(list(&c.server)).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

/// The flag under which this binary serves as the ceiling.
pub const CEILING_FLAG: &str = "--ceiling-server";

/// Serves the ceiling and never returns, if this process was started as it.
pub fn serve_ceiling_if_asked() {
    let mut args = std::env::args().skip_while(|a| a != CEILING_FLAG).skip(1);
    let Some(port) = args.next() else { return };
    let port: u16 = port.parse().expect("ceiling port");
    // As many workers as `smsauth serve` makes on these cores (its default).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind the ceiling");
        super::serve_ceiling(listener).await
    });
    std::process::exit(0);
}

/// The ceiling as a child process on the server's cores, once it answers.
pub async fn ceiling() -> (ChildGuard, SocketAddr) {
    let port = super::free_port();
    let exe = std::env::current_exe().expect("this binary");
    let child = on_server_cores(&exe)
        .arg(CEILING_FLAG)
        .arg(port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("start the ceiling");
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let started = Instant::now();
    while super::get_once(addr, "/").await.is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the ceiling did not start"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (ChildGuard(child), addr)
}

/// Kills its process when dropped, so that no child outlives the run.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One `wrk` run, as it reports it.
#[derive(Debug, Clone, Serialize)]
pub struct WrkRow {
    pub scenario: String,
    pub rps: f64,
    pub p99_ms: f64,
    /// Non-2xx answers and socket errors.
    pub errors: u64,
    pub ratio_to_ceiling: Option<f64>,
}

/// What `wrk` drives: a path, or a Lua script that makes each request.
pub enum WrkLoad<'a> {
    Get(&'a str),
    /// A path and one header line.
    GetWith(&'a str, &'a str),
    Script(&'a str),
}

/// `wrk` on the client's cores against `addr` for `seconds`, with `connections`; None
/// when wrk is not installed.
pub fn wrk(
    name: &str,
    addr: SocketAddr,
    load: WrkLoad<'_>,
    connections: usize,
    seconds: f64,
    dir: &Path,
) -> Option<WrkRow> {
    let threads = cores().map_or(1, |c| c.client.len());
    let mut cmd = Command::new("wrk");
    cmd.arg(format!("-t{threads}"))
        .arg(format!("-c{connections}"))
        .arg(format!("-d{}s", seconds.ceil() as u64))
        .arg("--latency");
    let url = match load {
        WrkLoad::Get(path) => format!("http://{addr}{path}"),
        WrkLoad::GetWith(path, header) => {
            cmd.arg("-H").arg(header);
            format!("http://{addr}{path}")
        }
        WrkLoad::Script(lua) => {
            let script = dir.join(format!("{}.lua", name.replace([' ', '/'], "-")));
            std::fs::write(&script, lua).expect("write the wrk script");
            cmd.arg("-s").arg(script);
            format!("http://{addr}")
        }
    };
    let out = cmd.arg(url).stderr(Stdio::inherit()).output().ok()?;
    if !out.status.success() {
        eprintln!("    wrk failed: {}", String::from_utf8_lossy(&out.stdout));
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Some(WrkRow {
        scenario: name.to_owned(),
        rps: field(&text, "Requests/sec:").unwrap_or(0.0),
        p99_ms: text
            .lines()
            .find_map(|l| l.trim().strip_prefix("99%").map(|v| duration_ms(v.trim())))
            .unwrap_or(f64::NAN),
        errors: (field(&text, "Non-2xx or 3xx responses:").unwrap_or(0.0) + socket_errors(&text))
            as u64,
        ratio_to_ceiling: None,
    })
}

fn field(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(name)?.trim().parse().ok())
}

/// "Socket errors: connect 0, read 0, write 0, timeout 0", summed.
fn socket_errors(text: &str) -> f64 {
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Socket errors:"))
        .map_or(0.0, |rest| {
            rest.split(',')
                .filter_map(|part| part.split_whitespace().last()?.parse::<f64>().ok())
                .sum()
        })
}

/// wrk's "1.23ms", "456.00us" or "1.01s" in milliseconds.
fn duration_ms(v: &str) -> f64 {
    let (number, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000.0)
    } else {
        (v, f64::NAN)
    };
    number.parse::<f64>().map_or(f64::NAN, |n| n * scale)
}

/// A wrk script that sends a code to a new phone of `series` with each request.
pub fn send_code_script(series: u32) -> String {
    format!(
        r#"local n = 0
request = function()
  n = n + 1
  local body = string.format('{{"phone":"{series}%08d"}}', n)
  return wrk.format("POST", "/api/v1/sms/code", {{["Content-Type"] = "application/json"}}, body)
end
"#
    )
}
