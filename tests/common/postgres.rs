//! A throwaway PostgreSQL cluster that a test starts itself: its own temp dir, port on
//! 127.0.0.1 and socket dir, so a test never talks to (or stops) a server it did not
//! start, and can stop, restart or crash it for fault tests.
//!
//! As root the server tools run as the `postgres` user (PostgreSQL refuses root), on a
//! temp dir that user owns; otherwise they run as the current user.

use std::ffi::OsString;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::free_port;

pub const ROLE: &str = "smsauth";
pub const PASSWORD: &str = "smsauth-test-pw";
pub const DATABASE: &str = "smsauth";
/// Named explicitly at initdb: by default it would be whoever ran initdb.
const SUPERUSER: &str = "postgres";
/// Set to make a missing PostgreSQL fail the tests instead of skipping them (CI).
const REQUIRE_VAR: &str = "REQUIRE_POSTGRES_TESTS";
const DEADLINE: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(50);
/// A port free when we looked may be taken by the time the postmaster binds it.
const PORT_TRIES: usize = 5;

pub struct Postgres {
    tools: Tools,
    port: u16,
    databases: AtomicU32,
    /// Stops the cluster once this process is gone, however it went; see `spawn_watchdog`.
    watchdog: Child,
    dir: tempfile::TempDir,
}

/// Where the programs are and whom they run as.
struct Tools {
    bin: PathBuf,
    psql: PathBuf,
    /// Absent in some minimal installs; `is_up` then falls back to a TCP connect.
    isready: Option<PathBuf>,
    as_postgres: bool,
}

impl Tools {
    /// A server-side program (initdb, pg_ctl), run as a user PostgreSQL accepts.
    fn server(&self, program: &str, cwd: &Path) -> Command {
        let path = self.bin.join(program);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        // The postgres user may not be allowed into the test's working directory, and
        // the tools complain (or fail) when they cannot get back into it.
        cmd.current_dir(cwd).stdin(Stdio::null());
        cmd
    }
}

impl Postgres {
    /// Starts a new cluster (see the module comment). `None`, after saying so on stderr,
    /// when PostgreSQL is not installed and `REQUIRE_POSTGRES_TESTS` is unset.
    pub fn start() -> Option<Postgres> {
        let (bin, psql, isready) = match find_tools() {
            Ok(found) => found,
            Err(why) => return unavailable(&why),
        };
        // /tmp and not $TMPDIR: the postgres user must be able to reach the dir, and the
        // socket path (dir/sock/.s.PGSQL.PORT) must stay under the 107-byte limit.
        let base = if Path::new("/tmp").is_dir() {
            PathBuf::from("/tmp")
        } else {
            std::env::temp_dir()
        };
        let dir = tempfile::Builder::new()
            .prefix("smsauth-pg-")
            .tempdir_in(base)
            .expect("temp dir for PostgreSQL");
        // std has no geteuid; a file we just made belongs to our effective uid.
        let root = dir.path().metadata().expect("stat temp dir").uid() == 0;
        if root && !user_exists("postgres") {
            return unavailable("running as root, and there is no `postgres` user to run it as");
        }
        if root && find_on_path("runuser").is_none() {
            return unavailable("running as root, and there is no runuser to run it as `postgres`");
        }
        let tools = Tools {
            bin,
            psql,
            isready,
            as_postgres: root,
        };

        for sub in ["data", "sock"] {
            let path = dir.path().join(sub);
            std::fs::create_dir(&path).expect("create dir for PostgreSQL");
            // initdb refuses a data dir that others can read.
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))
                .expect("chmod dir for PostgreSQL");
        }
        if root {
            chown_to_postgres(dir.path());
        }
        let watchdog = spawn_watchdog(&tools, dir.path());
        let mut pg = Postgres {
            tools,
            port: 0,
            databases: AtomicU32::new(0),
            watchdog,
            dir,
        };
        pg.initdb();

        let mut tries = 0;
        loop {
            tries += 1;
            pg.port = free_port();
            pg.write_settings();
            match pg.try_start() {
                Ok(()) => break,
                Err(e) if e.port_taken && tries < PORT_TRIES => continue,
                Err(e) => panic!("PostgreSQL did not start on port {}: {}", pg.port, e.text),
            }
        }
        pg.psql(
            "postgres",
            &format!(
                "CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}';\n\
                 CREATE DATABASE {DATABASE} OWNER {ROLE};\n"
            ),
        );
        Some(pg)
    }

    /// One cluster per test binary, started on first use. It lives in a static and is
    /// never dropped: an exit hook stops it as the process exits, and the watchdog then
    /// removes its dir (and stops it too, should the process die without exiting).
    pub fn shared() -> Option<&'static Postgres> {
        SHARED
            .get_or_init(|| {
                let pg = Postgres::start();
                if pg.is_some() {
                    // SAFETY: atexit is libc's; the hook neither panics nor unwinds.
                    unsafe { atexit(stop_shared) };
                }
                pg
            })
            .as_ref()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// postgres://smsauth:smsauth-test-pw@127.0.0.1:PORT/smsauth
    pub fn url(&self) -> String {
        self.url_for(DATABASE)
    }

    /// A new empty database owned by `smsauth`, and its URL (the form of `url()`).
    /// Owned, not merely granted: since PostgreSQL 15 only the database owner may create
    /// tables in `public`.
    pub fn new_database(&self) -> String {
        let n = self.databases.fetch_add(1, Ordering::Relaxed) + 1;
        let name = format!("{DATABASE}_test_{n}");
        self.psql("postgres", &format!("CREATE DATABASE {name} OWNER {ROLE};"));
        self.url_for(&name)
    }

    /// Runs `sql` (any number of statements) through psql as the superuser on database
    /// `db`, over the unix socket; returns stdout (`-tA`: tuples only, unaligned) without
    /// its final newline. Panics with psql's stderr on any error.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let mut args: Vec<OsString> = vec!["-h".into(), self.sock_dir().into()];
        args.extend(["-p".into(), self.port.to_string().into()]);
        args.extend(["-U".into(), SUPERUSER.into(), "-d".into(), db.into()]);
        self.run_psql(&args, &format!("database {db}"), sql)
    }

    /// As `psql`, but connecting to `url` (say from `url()` or `new_database()`), so as
    /// the role the application uses, over TCP with its password.
    pub fn psql_url(&self, url: &str, sql: &str) -> String {
        self.run_psql(&["-d".into(), url.into()], url, sql)
    }

    /// pg_ctl stop -m fast: clients are disconnected, and it returns once stopped.
    pub fn stop(&self) {
        self.pg_ctl_stop("fast");
    }

    /// pg_ctl stop -m immediate: no shutdown checkpoint, so the next start recovers from
    /// the WAL as after a crash.
    pub fn kill(&self) {
        self.pg_ctl_stop("immediate");
    }

    /// Starts the stopped (or killed) cluster again on the same port; returns once it
    /// accepts connections.
    pub fn start_again(&self) {
        if let Err(e) = self.try_start() {
            panic!(
                "PostgreSQL did not start again on port {}: {}",
                self.port, e.text
            );
        }
    }

    /// stop(), then start_again().
    pub fn restart(&self) {
        self.stop();
        self.start_again();
    }

    /// Whether the server accepts connections now (not just the TCP port: a server still
    /// recovering listens but refuses sessions).
    pub fn is_up(&self) -> bool {
        match &self.tools.isready {
            Some(isready) => Command::new(isready)
                .args(["-q", "-t", "2", "-h", "127.0.0.1"])
                .args(["-U", SUPERUSER, "-d", "postgres"])
                .arg("-p")
                .arg(self.port.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
            None => TcpStream::connect_timeout(
                &SocketAddr::from((Ipv4Addr::LOCALHOST, self.port)),
                Duration::from_secs(2),
            )
            .is_ok(),
        }
    }

    /// The server's log so far (all starts of this cluster).
    pub fn log(&self) -> String {
        std::fs::read(self.log_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    fn url_for(&self, db: &str) -> String {
        format!("postgres://{ROLE}:{PASSWORD}@127.0.0.1:{}/{db}", self.port)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn sock_dir(&self) -> PathBuf {
        self.dir.path().join("sock")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    fn initdb(&self) {
        let out = self
            .tools
            .server("initdb", self.dir.path())
            .arg("-D")
            .arg(self.data_dir())
            .args(["-U", SUPERUSER, "-E", "UTF8", "--locale=C"])
            // The superuser needs no password over the socket (psql()); the role the
            // application uses must give its password over TCP, as in production.
            .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
            // initdb's own closing fsync of every file: a throwaway cluster outlives no
            // power cut, and the server itself still runs with fsync on.
            .arg("--no-sync")
            .output()
            .expect("run initdb");
        check(&out, "initdb");
        // An include keeps our settings in one file we may rewrite (a new port per try).
        let conf = self.data_dir().join("postgresql.conf");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&conf)
            .expect("open postgresql.conf");
        writeln!(f, "\ninclude 'harness.conf'").expect("write postgresql.conf");
    }

    fn write_settings(&self) {
        let path = self.data_dir().join("harness.conf");
        let text = format!(
            "listen_addresses = '127.0.0.1'\n\
             port = {}\n\
             unix_socket_directories = '{}'\n\
             max_connections = 200\n\
             fsync = on\n\
             synchronous_commit = on\n\
             full_page_writes = on\n",
            self.port,
            self.sock_dir().display()
        );
        std::fs::write(&path, text).expect("write harness.conf");
        if self.tools.as_postgres {
            chown_to_postgres(&path);
        }
    }

    fn try_start(&self) -> Result<(), StartError> {
        let log_before = self.log().len();
        let deadline = Instant::now() + DEADLINE;
        let out = self
            .tools
            .server("pg_ctl", self.dir.path())
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.log_path())
            // -w: wait until the postmaster reports it is ready (or has died).
            .args(["start", "-w", "-t", &DEADLINE.as_secs().to_string()])
            .output()
            .expect("run pg_ctl start");
        let fail = |what: String| {
            let log = self.log();
            let new = log.get(log_before..).unwrap_or(&log);
            StartError {
                port_taken: new.contains("Address already in use")
                    || new.contains("could not create any TCP/IP sockets"),
                text: format!("{what}\n--- server log ---\n{log}"),
            }
        };
        if !out.status.success() {
            return Err(fail(format!(
                "pg_ctl start exited with {}: {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        while !self.is_up() {
            if Instant::now() > deadline {
                return Err(fail(format!(
                    "no connections accepted on 127.0.0.1:{} within {DEADLINE:?}",
                    self.port
                )));
            }
            std::thread::sleep(POLL);
        }
        Ok(())
    }

    fn pg_ctl_stop(&self, mode: &str) {
        let out = self
            .tools
            .server("pg_ctl", self.dir.path())
            .arg("-D")
            .arg(self.data_dir())
            .args(["stop", "-m", mode])
            .args(["-w", "-t", &DEADLINE.as_secs().to_string()])
            .output()
            .expect("run pg_ctl stop");
        if !out.status.success() {
            panic!(
                "pg_ctl stop -m {mode} exited with {}: {}{}\n--- server log ---\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log()
            );
        }
    }

    /// pg_ctl stop -m immediate, errors ignored (it may be stopped already).
    fn stop_quietly(&self) -> std::io::Result<std::process::ExitStatus> {
        self.tools
            .server("pg_ctl", self.dir.path())
            .arg("-D")
            .arg(self.data_dir())
            .args(["stop", "-m", "immediate", "-w"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
    }

    /// `pg_dump` of the database at `url`, as an operator's backup of it would be: every
    /// byte a copy of the database gives away.
    pub fn dump(&self, url: &str) -> Vec<u8> {
        let pg_dump = self.tools.psql.with_file_name("pg_dump");
        let pg_dump = if pg_dump.is_file() {
            pg_dump
        } else {
            self.tools.bin.join("pg_dump")
        };
        let out = Command::new(&pg_dump)
            .args(["--no-owner", "-d", url])
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::null())
            .output()
            .expect("run pg_dump");
        assert!(
            out.status.success(),
            "pg_dump exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    fn run_psql(&self, conn: &[OsString], target: &str, sql: &str) -> String {
        let mut child = Command::new(&self.tools.psql)
            // -X: no ~/.psqlrc; -q: no command tags mixed into the results.
            .args(["-X", "-q", "-tA", "-v", "ON_ERROR_STOP=1"])
            .args(conn)
            // From stdin rather than -c: -c sends all statements as one implicit
            // transaction, where CREATE DATABASE is not allowed.
            .args(["-f", "-"])
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run psql");
        let mut stdin = child.stdin.take().expect("psql stdin");
        let input = sql.to_owned();
        // Written from another thread: psql may fill its stdout pipe before it has read
        // all of a long script.
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(input.as_bytes());
        });
        let out = child.wait_with_output().expect("wait for psql");
        let _ = writer.join();
        if !out.status.success() {
            panic!(
                "psql on {target} exited with {}: {}\n--- SQL ---\n{sql}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if stdout.ends_with('\n') {
            stdout.pop();
        }
        stdout
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.stop_quietly();
        // Closing its pipe sets the watchdog off now (a no-op stop, then it removes the
        // dir); waiting for it leaves no zombie and no race with TempDir's own removal.
        drop(self.watchdog.stdin.take());
        let _ = self.watchdog.wait();
    }
}

static SHARED: OnceLock<Option<Postgres>> = OnceLock::new();

unsafe extern "C" {
    fn atexit(hook: extern "C" fn()) -> std::ffi::c_int;
}

/// Without it the shared cluster would outlive the test binary by the moment the
/// watchdog needs to notice; a check right after `cargo test` could still see it.
extern "C" fn stop_shared() {
    if let Some(Some(pg)) = SHARED.get() {
        let _ = pg.stop_quietly();
    }
}

struct StartError {
    port_taken: bool,
    text: String,
}

/// A cluster in a static is never dropped, and a test binary can die by kill -9 or
/// Ctrl-C: without this, its postmaster would run on forever. The watchdog is a shell
/// that blocks reading a pipe only this process holds open (CLOEXEC, so no child
/// inherits it); the kernel closes the pipe however this process ends, and the watchdog
/// then stops the cluster (-m immediate) and removes its dir. That needs no polling and
/// cannot mistake a reused pid for us. It runs as the current user (not as postgres, so
/// it can remove the dir as root), in a process group of its own and ignoring
/// HUP/INT/TERM, so that the Ctrl-C or hangup that kills the tests does not kill it first.
fn spawn_watchdog(tools: &Tools, dir: &Path) -> Child {
    let mut stop: Vec<OsString> = Vec::new();
    if tools.as_postgres {
        stop.extend(["runuser", "-u", "postgres", "--"].map(OsString::from));
    }
    stop.push(tools.bin.join("pg_ctl").into());
    stop.push("-D".into());
    stop.push(dir.join("data").into());
    stop.extend(["stop", "-m", "immediate", "-w"].map(OsString::from));
    Command::new("sh")
        .arg("-c")
        .arg(r#"trap '' HUP INT TERM; cat >/dev/null; dir=$1; shift; "$@"; rm -rf -- "$dir""#)
        .arg("smsauth-pg-watchdog")
        .arg(dir)
        .args(stop)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Not inside the dir it is going to remove.
        .current_dir("/")
        .process_group(0)
        .spawn()
        .expect("start the PostgreSQL watchdog")
}

fn unavailable<T>(why: &str) -> Option<T> {
    if std::env::var_os(REQUIRE_VAR).is_some() {
        panic!("{REQUIRE_VAR} is set, but PostgreSQL is not installed ({why})");
    }
    eprintln!("skipped: PostgreSQL is not installed ({why}); set {REQUIRE_VAR} to fail instead");
    None
}

/// The server tools' directory (newest /usr/lib/postgresql/N/bin, else from PATH), psql
/// and pg_isready.
fn find_tools() -> Result<(PathBuf, PathBuf, Option<PathBuf>), String> {
    let has_server = |dir: &Path| {
        ["initdb", "pg_ctl", "postgres"]
            .iter()
            .all(|p| dir.join(p).is_file())
    };
    let mut versioned: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let version = name
                .split('.')
                .map(|n| n.parse().ok())
                .collect::<Option<Vec<u32>>>()?;
            let bin = entry.path().join("bin");
            has_server(&bin).then_some((version, bin))
        })
        .collect();
    versioned.sort();
    let bin = match versioned.pop() {
        Some((_, bin)) => bin,
        None => {
            let initdb = find_on_path("initdb")
                .ok_or("no initdb, pg_ctl and postgres in /usr/lib/postgresql/*/bin or on PATH")?;
            // PATH often holds links (/usr/local/bin/initdb); the real dir has the rest.
            let real = std::fs::canonicalize(&initdb).unwrap_or(initdb.clone());
            [real, initdb]
                .iter()
                .filter_map(|p| p.parent())
                .find(|d| has_server(d))
                .ok_or("initdb is on PATH, but pg_ctl or postgres is not beside it")?
                .to_path_buf()
        }
    };
    let client = |name: &str| {
        Some(bin.join(name))
            .filter(|p| p.is_file())
            .or_else(|| find_on_path(name))
    };
    let psql = client("psql").ok_or("no psql")?;
    Ok((bin.clone(), psql, client("pg_isready")))
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn user_exists(name: &str) -> bool {
    Command::new("id")
        .arg("-u")
        .arg(name)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn chown_to_postgres(path: &Path) {
    let out = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(path)
        .output()
        .expect("run chown");
    check(&out, "chown -R postgres:postgres");
}

/// A port nobody listens on now. The listener is dropped so the postmaster can bind it;
/// someone may take it in between, hence the retries in start().
fn check(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} exited with {}: {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
