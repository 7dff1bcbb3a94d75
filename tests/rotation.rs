//! Rotation of the phone key (`smsauth keys rotate-phone-key --new-key-file FILE`) while
//! the server serves: no request fails, every account keeps its id, the old key can go,
//! and a rotation cut short by kill -9 is finished by the next start. On the harness's
//! engine (sled, or PostgreSQL with TEST_STORAGE_ENGINE=postgres), and on a cluster of
//! two instances on one PostgreSQL.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::{TestServer, admin, ok_stdout};
use serde_json::json;
use tokio::sync::Mutex;

const CODE: &str = "246810";

/// Codes live `ttl` seconds: a rotation is done no sooner than that after its switch.
fn config(ttl: u64, extra_limits: &str) -> String {
    format!(
        "[code]\nresend_interval_secs = 0\nttl_secs = {ttl}\n[sms]\nfixed_code = \"{CODE}\"\n\
         [limits]\nip_per_hour = 0\nglobal_per_day = 1000000\nverify_per_ip_per_minute = 0\n\
         phone_failures_per_hour = 0\n{extra_limits}"
    )
}

fn phone(n: u64) -> String {
    format!("1390000{n:04}")
}

/// A code login with the fixed code: the status, and the user id and token if 200.
async fn login(s: &TestServer, phone: &str) -> Result<(u64, String), String> {
    let (status, body) = s
        .post(
            "/api/v1/sms/code",
            json!({ "phone": phone, "purpose": "login" }),
        )
        .await;
    if status != 200 {
        return Err(format!("send-code {phone}: {status} {body}"));
    }
    let (status, body) = s
        .post(
            "/api/v1/auth/sms-login",
            json!({ "phone": phone, "code": CODE }),
        )
        .await;
    if status != 200 {
        return Err(format!("sms-login {phone}: {status} {body}"));
    }
    let token = body["access_token"].as_str().unwrap_or_default().to_owned();
    let (status, me) = s.get("/api/v1/me", Some(&token)).await;
    if status != 200 {
        return Err(format!("/me {phone}: {status} {me}"));
    }
    Ok((me["id"].as_u64().expect("id"), token))
}

fn new_key(dir: &Path) -> PathBuf {
    let file = dir.join("new-phone.key");
    smsauth::privacy::create_key_file(&file, &smsauth::privacy::PhoneKey::generate()).unwrap();
    file
}

fn key_of(file: &Path) -> [u8; 32] {
    smsauth::privacy::read_key_file(file).unwrap()
}

/// The file the harness's server reads its phone key from.
fn configured_key(s: &TestServer) -> PathBuf {
    match common::engine() {
        "postgres" => s.dir().path().join("phone.key"),
        _ => s.data_dir().join("phone.key"),
    }
}

/// Logins of known users, registrations of new phones and /me, on `servers` in turn, until
/// `stop`: every failure, and how many logins were made.
struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    users: Arc<Mutex<BTreeMap<String, u64>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(servers: Vec<Arc<TestServer>>, users: BTreeMap<String, u64>) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let known: Vec<String> = users.keys().cloned().collect();
        // Each worker logs in its own share of the users: two logins of one phone at once
        // would race for its one pending code, and one would rightly fail.
        let users = Arc::new(Mutex::new(users));
        let next_new = Arc::new(AtomicU64::new(5000));
        let mut tasks = Vec::new();
        for worker in 0..4usize {
            let (stop, done, failures, users, next_new, known) = (
                stop.clone(),
                done.clone(),
                failures.clone(),
                users.clone(),
                next_new.clone(),
                known
                    .iter()
                    .skip(worker)
                    .step_by(4)
                    .cloned()
                    .collect::<Vec<_>>(),
            );
            let servers = servers.clone();
            tasks.push(tokio::spawn(async move {
                let mut i = worker;
                while !stop.load(Ordering::SeqCst) {
                    i += 4;
                    let s = &servers[(i / 4) % servers.len()];
                    // Every other request a new phone, which registers.
                    let phone = if i % 2 == 0 {
                        phone(next_new.fetch_add(1, Ordering::SeqCst))
                    } else {
                        known[(i / 4) % known.len()].clone()
                    };
                    match login(s, &phone).await {
                        Ok((id, _)) => {
                            let mut users = users.lock().await;
                            match users.get(&phone) {
                                Some(&known) if known != id => failures
                                    .lock()
                                    .await
                                    .push(format!("{phone}: id {id}, was {known}")),
                                Some(_) => {}
                                None => {
                                    users.insert(phone, id);
                                }
                            }
                            done.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => failures.lock().await.push(e),
                    }
                }
            }));
        }
        Load {
            stop,
            done,
            failures,
            users,
            tasks,
        }
    }

    /// Stops it: the failures, and every phone with its user id.
    async fn stop(self) -> (Vec<String>, BTreeMap<String, u64>) {
        self.stop.store(true, Ordering::SeqCst);
        for task in self.tasks {
            task.await.unwrap();
        }
        let failures = self.failures.lock().await.clone();
        let users = self.users.lock().await.clone();
        (failures, users)
    }
}

async fn register(s: &TestServer, n: u64) -> BTreeMap<String, u64> {
    let mut users = BTreeMap::new();
    for i in 0..n {
        let p = phone(i);
        let (id, _) = login(s, &p).await.unwrap();
        users.insert(p, id);
    }
    users
}

/// Runs the rotation to `key` through the command line on the harness dir `dir` (beside
/// the running servers): its stdout, once it reports done.
async fn rotate(dir: &Path, key: &Path) -> String {
    let (dir, key) = (dir.to_owned(), key.to_owned());
    let out = tokio::task::spawn_blocking(move || {
        admin(
            &dir,
            &[
                "keys",
                "rotate-phone-key",
                "--new-key-file",
                key.to_str().unwrap(),
            ],
        )
    })
    .await
    .unwrap();
    let stdout = ok_stdout(&out);
    assert!(stdout.contains("phone key rotation done"), "{stdout}");
    stdout
}

async fn every_user_logs_in(s: &TestServer, users: &BTreeMap<String, u64>) {
    for (phone, id) in users {
        let (got, _) = login(s, phone).await.unwrap();
        assert_eq!(got, *id, "{phone} has a new account after the rotation");
    }
}

/// How many accounts `smsauth user list` lists (a header, then one line each).
fn accounts(dir: &Path) -> usize {
    ok_stdout(&admin(dir, &["user", "list"])).lines().count() - 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rotation_under_load_fails_no_request_and_the_old_key_can_go() {
    let s = Arc::new(TestServer::start(&config(8, "phone_per_day = 0\n")).await);
    let dir = s.dir();
    let before = register(&s, 30).await;
    let old_key = key_of(&configured_key(&s));
    let new_file = new_key(dir.path());

    let load = Load::start(vec![s.clone()], before.clone());
    let logins_before = load.done.load(Ordering::SeqCst);
    let stdout = rotate(dir.path(), &new_file).await;
    let logins_during = load.done.load(Ordering::SeqCst) - logins_before;
    let (failures, users) = load.stop().await;
    assert_eq!(failures, Vec::<String>::new(), "{stdout}");
    assert!(
        logins_during > 20,
        "the load did not run during the rotation: {logins_during}"
    );
    assert!(
        users.len() > before.len(),
        "no account was made during the rotation"
    );
    every_user_logs_in(&s, &users).await;
    assert_eq!(accounts(dir.path()), users.len(), "an account is doubled");

    // The old key can go: a sled data dir's own key file holds the new key now; a
    // configured file is the operator's to point at the new key.
    let key_file = configured_key(&s);
    match common::engine() {
        "postgres" => std::fs::copy(&new_file, &key_file).map(|_| ()).unwrap(),
        _ => assert_eq!(key_of(&key_file), key_of(&new_file), "{stdout}"),
    }
    let s = Arc::into_inner(s).expect("the load is stopped");
    let s = s.restart().await;
    every_user_logs_in(&s, &users).await;
    assert_eq!(accounts(dir.path()), users.len());

    // The old key opens nothing any more: with it alone (the new key's file gone too),
    // the store is refused.
    let mut s = s;
    assert!(s.terminate().success());
    std::fs::remove_file(&new_file).unwrap();
    std::fs::write(&key_file, old_key).unwrap();
    let out = admin(dir.path(), &["user", "list"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the old key still opens the store");
    assert!(stderr.contains("was rotated to phone key"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_cut_short_by_kill_9_is_finished_by_the_next_start() {
    // Three codes a day: each user logs in three times (before, during and after), whether
    // or not the end of the rotation forgets what the old index counted.
    let s = TestServer::start(&config(20, "phone_per_day = 3\n")).await;
    let dir = s.dir();
    let users = register(&s, 10).await;
    // Three codes today for one phone before the rotation: its daily limit.
    let limited = phone(900);
    let _ = login(&s, &limited).await.unwrap();
    for _ in 0..2 {
        let (status, body) = s
            .post(
                "/api/v1/sms/code",
                json!({ "phone": limited, "purpose": "login" }),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let new_file = new_key(dir.path());

    // Started through the server's admin socket (sled) or the store (PostgreSQL), and
    // left running: the command line is stopped before it is done.
    let mut cli = std::process::Command::new(common::BIN)
        .args(["keys", "rotate-phone-key", "--new-key-file"])
        .arg(&new_file)
        .arg("--config")
        .arg(dir.path().join("smsauth.toml"))
        .envs(common::storage_env(dir.path()))
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(cli.stdout.take().unwrap()));
    let moving = tokio::task::spawn_blocking(move || {
        lines.find(|l| l.as_ref().is_ok_and(|l| l.contains("users moved")))
    })
    .await
    .unwrap();
    assert!(moving.is_some(), "the rotation never moved users");

    // While it runs: the code sent before it logs in, the day's count under the old
    // index still counts, and a backup is refused (it would name one key of two).
    let (status, body) = s
        .post(
            "/api/v1/auth/sms-login",
            json!({ "phone": limited, "code": CODE }),
        )
        .await;
    assert_eq!(status, 200, "a code sent before the rotation: {body}");
    let (status, body) = s
        .post(
            "/api/v1/sms/code",
            json!({ "phone": limited, "purpose": "login" }),
        )
        .await;
    assert_eq!(
        status, 429,
        "the day's sends before the rotation were forgotten: {body}"
    );
    let backup = admin(
        dir.path(),
        &["backup", dir.path().join("b.bin").to_str().unwrap()],
    );
    assert!(!backup.status.success());
    assert!(
        String::from_utf8_lossy(&backup.stderr).contains("rotation is running"),
        "{}",
        String::from_utf8_lossy(&backup.stderr)
    );

    let _ = cli.kill();
    let _ = cli.wait();
    let s = s.kill9_and_restart().await;
    // The start settled on both keys: everyone logs in while the rotation goes on.
    every_user_logs_in(&s, &users).await;
    let stdout = rotate(dir.path(), &new_file).await;
    every_user_logs_in(&s, &users).await;
    assert_eq!(accounts(dir.path()), users.len() + 1, "{stdout}");
    // After it, a backup is taken again.
    ok_stdout(&admin(
        dir.path(),
        &["backup", dir.path().join("b.bin").to_str().unwrap()],
    ));
}

#[tokio::test]
async fn a_rotation_to_a_bad_or_the_same_key_is_refused() {
    let s = TestServer::start(&config(8, "")).await;
    let dir = s.dir();
    login(&s, &phone(1)).await.unwrap();
    let run = |file: &Path| {
        admin(
            dir.path(),
            &[
                "keys",
                "rotate-phone-key",
                "--new-key-file",
                file.to_str().unwrap(),
            ],
        )
    };
    let bad = dir.path().join("bad.key");
    std::fs::write(&bad, "not a key").unwrap();
    for (file, says) in [
        (bad, "32 random bytes"),
        (dir.path().join("missing.key"), "cannot read"),
        (configured_key(&s), "sealed with that key already"),
    ] {
        let out = run(&file);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{}: {stderr}", file.display());
        assert!(stderr.contains(says), "{}: {stderr}", file.display());
    }
    let (id, _) = login(&s, &phone(1)).await.unwrap();
    assert_eq!(id, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_rotates_with_every_instance_and_no_request_fails() {
    let Some(cluster) = common::cluster::Cluster::new(&config(8, "phone_per_day = 0\n")) else {
        return;
    };
    let (a, b) = cluster.pair().await;
    let (a, b) = (Arc::new(a), Arc::new(b));
    let mut before = register(&a, 15).await;
    for i in 15..30 {
        let p = phone(i);
        before.insert(p.clone(), login(&b, &p).await.unwrap().0);
    }
    let new_file = new_key(cluster.phone_key.parent().unwrap());
    let load = Load::start(vec![a.clone(), b.clone()], before.clone());
    // The command line acts on the database directly, as one more participant.
    let stdout = rotate(a.dir().path(), &new_file).await;
    let (failures, users) = load.stop().await;
    assert_eq!(failures, Vec::<String>::new(), "{stdout}");
    assert!(users.len() > before.len());
    for s in [&a, &b] {
        every_user_logs_in(s, &users).await;
    }
    let count = cluster.pg.psql_url(
        &cluster.url,
        "SELECT count(*), count(DISTINCT phone_index) FROM users",
    );
    assert_eq!(count, format!("{}|{}", users.len(), users.len()));
    assert!(stdout.contains("still holds the old key"), "{stdout}");

    // Every instance moves to the new key file, and the old one goes.
    std::fs::copy(&new_file, &cluster.phone_key).unwrap();
    std::fs::remove_file(&new_file).unwrap();
    for s in [a, b] {
        let mut s = Arc::into_inner(s).expect("the load is stopped");
        assert!(s.terminate().success());
    }
    let c = cluster.instance().await;
    every_user_logs_in(&c, &users).await;
    let listed = cluster
        .pg
        .psql_url(&cluster.url, "SELECT count(*) FROM smsauth_instances");
    assert_eq!(listed, "1", "a stopped instance is still listed");
}
