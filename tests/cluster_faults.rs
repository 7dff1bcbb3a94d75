//! The cluster mode when things break: PostgreSQL stopped, restarted or crashed under
//! two serving instances, one instance killed with -9 under load, and starts that cannot
//! reach their database. Every outage is real: the tests stop their own PostgreSQL.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::{TestServer, run_cli};
use serde_json::{Value, json};

const CODE: &str = "246810";
/// Limits out of the way and a fixed code, so load can run without reading logs.
const LOAD: &str = "[limits]\nip_per_hour = 0\nverify_per_ip_per_minute = 0\ncaptcha_per_ip_per_minute = 0\nphone_per_day = 0\nglobal_per_day = 0\nphone_failures_per_hour = 0\n[code]\nresend_interval_secs = 0\n[sms]\nfixed_code = \"246810\"\n";

fn cluster(extra: &str) -> Option<Cluster> {
    let c = Cluster::new(extra);
    if c.is_none() {
        eprintln!("skipped: no PostgreSQL to run a cluster on");
    }
    c
}

/// A client that gives up after 5 s: an answer must come, whatever the database does.
fn patient() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

/// Registers `phone` by code on `s`: Some(token) if it was answered 200.
async fn register(client: &reqwest::Client, s: &TestServer, phone: &str) -> Option<String> {
    let post = |path: &str, body: Value| client.post(s.url(path)).json(&body).send();
    let sent = post("/api/v1/sms/code", json!({ "phone": phone }))
        .await
        .ok()?;
    if sent.status() != 200 {
        return None;
    }
    let login = post(
        "/api/v1/auth/sms-login",
        json!({ "phone": phone, "code": CODE }),
    )
    .await
    .ok()?;
    if login.status() != 200 {
        return None;
    }
    let body: Value = login.json().await.ok()?;
    Some(body["access_token"].as_str()?.to_owned())
}

async fn status(client: &reqwest::Client, s: &TestServer, path: &str, token: Option<&str>) -> u16 {
    let mut req = client.get(s.url(path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send()
        .await
        .expect("an answer within 5 s")
        .status()
        .as_u16()
}

/// Polls until `ready` holds, for at most `within`.
async fn eventually(within: Duration, mut ready: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if ready().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The phones that have an account in the database, by their blind index (the database
/// holds no phone number in the clear).
fn phones_in(c: &Cluster) -> BTreeSet<String> {
    c.pg.psql("smsauth", "SELECT phone_index FROM users")
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The blind index of the national number `p` under the cluster's phone key.
fn index_of(c: &Cluster, p: &str) -> String {
    let key = smsauth::privacy::read_key_file(&c.phone_key).unwrap();
    let index = smsauth::privacy::PhoneKey::new(&key).index(&common::e164(p));
    index.as_str().to_owned()
}

#[tokio::test]
async fn a_database_outage_is_503_and_both_instances_recover_without_a_restart() {
    let Some(c) = cluster(LOAD) else { return };
    let (a, b) = c.pair().await;
    let client = patient();
    let token = register(&client, &a, "13800020001")
        .await
        .expect("registered");
    c.pg.stop();
    for s in [&a, &b] {
        let resp = client
            .get(s.url("/api/v1/me"))
            .bearer_auth(&token)
            .send()
            .await
            .expect("an answer within 5 s, not a hang");
        assert_eq!(resp.status(), 503);
        assert!(resp.headers().contains_key("retry-after"));
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"], "unavailable", "{body}");
        let sent = client
            .post(s.url("/api/v1/sms/code"))
            .json(&json!({ "phone": "13800020002" }))
            .send()
            .await
            .expect("an answer within 5 s");
        assert_eq!(sent.status(), 503);
        assert_eq!(
            status(&client, s, "/healthz", None).await,
            200,
            "the process lives"
        );
        assert_eq!(status(&client, s, "/readyz", None).await, 503);
    }
    c.pg.start_again();
    for s in [&a, &b] {
        assert!(
            eventually(Duration::from_secs(5), async || {
                status(&client, s, "/readyz", None).await == 200
            })
            .await,
            "not ready within 5 s of the database's return"
        );
        assert_eq!(status(&client, s, "/api/v1/me", Some(&token)).await, 200);
    }
    assert!(register(&client, &b, "13800020003").await.is_some());
}

/// Registrations, logouts and password changes run on both instances while PostgreSQL
/// restarts (fast shutdown): every one answered 2xx is in the database afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_under_load_loses_nothing_acknowledged() {
    let Some(c) = cluster(LOAD) else { return };
    let (a, b) = c.pair().await;
    let client = patient();
    let done = std::sync::atomic::AtomicUsize::new(0);
    let worker = async |w: usize| {
        let mut acknowledged = Vec::new();
        let mut logged_out = Vec::new();
        let mut reset = Vec::new();
        for i in 0..60 {
            let s = if (w + i).is_multiple_of(2) { &a } else { &b };
            let phone = format!("1371{w:02}{i:05}");
            if let Some(token) = register(&client, s, &phone).await {
                if i % 3 == 0 {
                    let out = client
                        .post(s.url("/api/v1/auth/logout"))
                        .bearer_auth(&token)
                        .send()
                        .await;
                    if out.is_ok_and(|r| r.status() == 204) {
                        logged_out.push(token.clone());
                    }
                } else if i % 3 == 1 && set_password(&client, s, &phone).await {
                    reset.push(phone.clone());
                }
                acknowledged.push(phone);
            }
            done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        (acknowledged, logged_out, reset)
    };
    let restart = async {
        let started = Instant::now();
        while done.load(std::sync::atomic::Ordering::Relaxed) < 40 {
            assert!(started.elapsed() < Duration::from_secs(60), "no load");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let pg = &c.pg;
        tokio::task::block_in_place(|| pg.restart());
    };
    let (results, ()) = tokio::join!(futures::future::join_all((0..4).map(worker)), restart);
    let stored = phones_in(&c);
    let mut acknowledged = 0;
    let mut passwords = 0;
    for (phones, logged_out, reset) in &results {
        for p in reset {
            let login = client
                .post(b.url("/api/v1/auth/login"))
                .json(&json!({ "phone": p, "password": NEW_PASSWORD }))
                .send()
                .await
                .expect("an answer");
            assert_eq!(
                login.status(),
                200,
                "{p}'s password change was acknowledged and lost"
            );
        }
        passwords += reset.len();
        for p in phones {
            assert!(
                stored.contains(&index_of(&c, p)),
                "{p} was acknowledged and lost"
            );
        }
        acknowledged += phones.len();
        for token in logged_out {
            assert_eq!(status(&client, &a, "/api/v1/me", Some(token)).await, 401);
        }
    }
    assert!(
        acknowledged > 100,
        "only {acknowledged} registrations went through"
    );
    assert!(
        passwords > 20,
        "only {passwords} password changes went through"
    );
}

const NEW_PASSWORD: &str = "a new long enough password 44";

/// Sets `phone`'s password with a reset code on `s`: true if it was answered 204.
async fn set_password(client: &reqwest::Client, s: &TestServer, phone: &str) -> bool {
    let post = |path: &str, body: Value| client.post(s.url(path)).json(&body).send();
    let sent = post(
        "/api/v1/sms/code",
        json!({ "phone": phone, "purpose": "reset_password" }),
    )
    .await;
    if !sent.is_ok_and(|r| r.status() == 200) {
        return false;
    }
    let reset = post(
        "/api/v1/auth/password/reset",
        json!({ "phone": phone, "code": CODE, "new_password": NEW_PASSWORD }),
    )
    .await;
    reset.is_ok_and(|r| r.status() == 204)
}

/// One instance killed with -9 while both serve: the other answers every request of its
/// own without an error; nothing acknowledged by either is lost; the killed one starts
/// again and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_instance_killed_under_load_the_other_serves_on() {
    let Some(c) = cluster(LOAD) else { return };
    let (a, mut b) = c.pair().await;
    let client = patient();
    let token = register(&client, &a, "13800021000")
        .await
        .expect("registered");
    let a_done = std::sync::atomic::AtomicUsize::new(0);
    let on_b = async {
        let mut made = Vec::new();
        for i in 0..40 {
            if let Some(t) = register(&client, &b, &format!("1380002{i:04}")).await {
                made.push(t);
            }
        }
        made
    };
    let on_a = async {
        let mut made = Vec::new();
        for i in 0..80 {
            let phone = format!("1390002{i:04}");
            let t = register(&client, &a, &phone).await;
            assert!(t.is_some(), "A refused {phone} while B died");
            assert_eq!(status(&client, &a, "/api/v1/me", Some(&token)).await, 200);
            made.push(phone);
            a_done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        made
    };
    let pid = b.pid();
    let kill = async {
        while a_done.load(std::sync::atomic::Ordering::Relaxed) < 20 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let killed = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
    };
    let (made_on_b, made_on_a, ()) = tokio::join!(on_b, on_a, kill);
    b.kill9(); // reaps it
    let stored = phones_in(&c);
    for p in &made_on_a {
        assert!(stored.contains(&index_of(&c, p)), "{p} lost");
    }
    for t in &made_on_b {
        assert_eq!(
            status(&client, &a, "/api/v1/me", Some(t)).await,
            200,
            "a session B gave"
        );
    }
    let b = b.kill9_and_restart().await;
    assert_eq!(status(&client, &b, "/api/v1/me", Some(&token)).await, 200);
    assert!(register(&client, &b, "13700021000").await.is_some());
}

/// A config file for a server or command on `url`, in a dir of its own.
fn config_for(url: &str, extra: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("smsauth.toml");
    std::fs::write(
        &path,
        format!(
            "[privacy]\nphone_key_file = \"{}\"\n[storage]\nengine = \"postgres\"\ndata_dir = \"{}\"\n[storage.postgres]\nurl = \"{url}\"\n{extra}",
            common::phone_key_file(dir.path()).display(),
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    (dir, path)
}

fn serve(config: &std::path::Path, cwd: &std::path::Path) -> std::process::Output {
    // The harness's engine variables would override the file: this test is about the file.
    let mut cmd = std::process::Command::new(common::BIN);
    cmd.args(["serve", "--config"])
        .arg(config)
        .current_dir(cwd)
        .env_remove("RUST_LOG")
        .env_remove("SMSAUTH_STORAGE__ENGINE")
        .env_remove("SMSAUTH_STORAGE__POSTGRES__URL")
        .env_remove("SMSAUTH_PRIVACY__PHONE_KEY_FILE")
        .env("SMSAUTH_SERVER__LISTEN", "127.0.0.1:0");
    cmd.output().expect("run smsauth")
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn a_start_that_cannot_reach_its_database_retries_then_exits_1_naming_host_and_port() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://smsauth:not-in-any-log@127.0.0.1:{port}/smsauth");
    let (dir, config) = config_for(&url, "connect_timeout_secs = 2\n");
    let out = serve(&config, dir.path());
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains(&format!("127.0.0.1:{port}")), "{said}");
    assert!(
        said.matches("does not answer yet").count() >= 2,
        "a log line for each try: {said}"
    );
    assert!(
        !said.contains("not-in-any-log"),
        "the password leaked: {said}"
    );
}

#[test]
fn refused_credentials_a_missing_database_and_a_newer_schema_stop_the_start() {
    let Some(c) = cluster("") else { return };
    let wrong = c.url.replace(common::postgres::PASSWORD, "wrong-password");
    let (dir, config) = config_for(&wrong, "connect_timeout_secs = 10\n");
    let out = serve(&config, dir.path());
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("credentials") && said.contains("were refused"),
        "{said}"
    );
    assert!(
        !said.contains("wrong-password"),
        "the password leaked: {said}"
    );

    let missing = format!("{}/no_such_database", c.url.rsplit_once('/').unwrap().0);
    let (dir, config) = config_for(&missing, "connect_timeout_secs = 10\n");
    let out = serve(&config, dir.path());
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("does not exist"), "{said}");

    // `migrate` makes the schema; one from a newer release is refused with status 2.
    let (dir, config) = config_for(&c.url, "");
    let migrate = |dir: &std::path::Path| {
        run_cli(&["migrate", "--config", config.to_str().unwrap()], &[], dir)
    };
    let out = migrate(dir.path());
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        c.pg.psql("smsauth", "SELECT version FROM smsauth_schema"),
        "6"
    );
    c.pg.psql("smsauth", "UPDATE smsauth_schema SET version = 99");
    let out = migrate(dir.path());
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("use a newer release"));
    let out = serve(&config, dir.path());
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

/// Instances starting together on a new database migrate it once and all serve.
#[tokio::test]
async fn instances_starting_together_migrate_once() {
    let Some(c) = cluster(LOAD) else { return };
    let instances = futures::future::join_all((0..3).map(|_| c.instance())).await;
    assert_eq!(
        c.pg.psql("smsauth", "SELECT count(*) FROM smsauth_schema"),
        "1"
    );
    let client = patient();
    for (i, s) in instances.iter().enumerate() {
        assert!(
            register(&client, s, &format!("1360004000{i}"))
                .await
                .is_some()
        );
    }
    // And they share one token key: a session from one works on every other.
    let token = register(&client, &instances[0], "13600040009")
        .await
        .unwrap();
    for s in &instances {
        assert_eq!(status(&client, s, "/api/v1/me", Some(&token)).await, 200);
    }
}
