mod common;

// A deployment moves between the storage engines with `smsauth backup FILE` and
// `smsauth restore FILE`: from sled to PostgreSQL and back again, through the real binary,
// over HTTP and the command line. What the users had on one engine they have on the
// other: sessions and the ends of sessions, passwords, nicknames, disabled and deleted
// accounts, pending codes, WeChat bindings, and ids that are never given out twice.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;
use std::sync::Arc;

use common::cluster::Cluster;
use common::wechat::{WechatMock, WechatUser};
use common::wechat_flow::{APP_ID, APP_SECRET, bind_phone, exchange, ticket_for, wechat_section};
use common::{TestServer, admin, ok_stdout, run_cli};
use serde_json::{Value, json};

/// Every server's configuration, whichever the engine. Ten-digit codes, so that a code
/// found among a backup's bytes cannot be chance.
const EXTRA: &str = "[code]\nlength = 10\n";
const PASSWORD: &str = "a long enough password 42";
const NICKNAME: &str = "Ada 阿达";

/// Made on sled: a kept session, and a nickname of its own.
const A: &str = "13800002001";
/// Made on sled: its session logged out.
const B: &str = "13800002002";
/// Registered on sled with a password.
const C: &str = "13800002003";
/// Made on sled, then disabled.
const D: &str = "13800002004";
/// Made on sled, then all its sessions ended (`user logout`).
const X: &str = "13800002005";
/// Made on sled last, then deleted: the highest id sled gave out.
const E: &str = "13800002006";
/// A login code pending in the sled backup; the account is made on PostgreSQL with it.
const F: &str = "13800002007";
/// Made on PostgreSQL last, then deleted: the highest id PostgreSQL gave out.
const Q: &str = "13800002008";
/// A login code pending in the PostgreSQL backup; the account is made back on sled.
const G: &str = "13800002009";
/// Made on sled by binding a WeChat user: a scan logs in to it on every engine.
const W: &str = "13800002010";

/// Where the admin commands of one deployment run.
enum Site<'a> {
    /// The harness dir of a sled deployment (`admin`).
    Sled(&'a Path),
    /// The configuration file of the PostgreSQL deployment; commands run beside it.
    Postgres(&'a Path),
}

impl Site<'_> {
    fn run(&self, args: &[&str]) -> Output {
        match self {
            Site::Sled(dir) => admin(dir, args),
            Site::Postgres(config) => {
                let mut all = args.to_vec();
                all.extend(["--config", config.to_str().unwrap()]);
                run_cli(&all, &[], config.parent().unwrap())
            }
        }
    }

    /// `user list`, then `user show` of every user listed: all the command line tells of
    /// the accounts (ids, phones, nicknames, times, disabled, session generations, login
    /// methods), to compare across a move.
    fn accounts(&self) -> String {
        let list = ok_stdout(&self.run(&["user", "list", "--full"]));
        let mut all = list.clone();
        for row in list.lines().skip(1) {
            let phone = row.split('\t').nth(1).expect("phone column");
            all.push_str(&ok_stdout(&self.run(&["user", "show", phone])));
        }
        all
    }

    fn user_count(&self) -> u64 {
        ok_stdout(&self.run(&["user", "list"])).lines().count() as u64 - 1
    }
}

/// What a deployment held when its backup was taken, to find on the next one.
struct Moved {
    /// Sessions that must still work, and /me as it answered before the move.
    kept: Vec<(&'static str, String, Value)>,
    /// Sessions that must still be refused, and why they were.
    refused: Vec<(&'static str, String)>,
    /// /me of the password account.
    password_user: Value,
    disabled: &'static str,
    deleted: Vec<&'static str>,
    live: u64,
    /// The highest id given out so far, deleted users' included.
    max_id: u64,
    /// A phone with no account and a login code pending, and that code.
    pending: (&'static str, String),
    /// The WeChat user bound to W, and W's id.
    wechat: (WechatUser, u64),
}

fn token(body: &Value) -> String {
    body["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no token in {body}"))
        .to_owned()
}

fn id(user: &Value) -> u64 {
    user["id"]
        .as_u64()
        .unwrap_or_else(|| panic!("no id in {user}"))
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Every code the server's `log` sender wrote.
fn codes_sent(s: &TestServer) -> Vec<String> {
    s.log_lines()
        .iter()
        .filter(|l| l["message"] == "verification code (log sender)")
        .map(|l| l["code"].as_str().expect("code field").to_owned())
        .collect()
}

async fn users_metric(s: &TestServer) -> u64 {
    let (status, text) = s.get_text("/metrics").await;
    assert_eq!(status, 200, "{text}");
    text.lines()
        .find_map(|l| l.strip_prefix("smsauth_users "))
        .unwrap_or_else(|| panic!("no smsauth_users in {text}"))
        .parse()
        .unwrap()
}

async fn me(s: &TestServer, token: &str) -> (u16, Value) {
    s.get("/api/v1/me", Some(token)).await
}

async fn password_login(s: &TestServer, phone: &str, password: &str) -> (u16, Value) {
    s.post(
        "/api/v1/auth/login",
        json!({ "phone": phone, "password": password }),
    )
    .await
}

async fn logout(s: &TestServer, token: &str) {
    let (status, body) = s.post_auth("/api/v1/auth/logout", token, json!({})).await;
    assert_eq!(status, 204, "{body}");
    assert_eq!(me(s, token).await.0, 401, "logged out");
}

/// A backup: mode 0600, and not one of the codes sent so far in it as text.
fn check_backup_file(file: &Path, codes: &[String]) {
    assert_eq!(mode(file), 0o600, "a backup holds the keys");
    let bytes = std::fs::read(file).unwrap();
    assert!(!codes.is_empty());
    for code in codes {
        assert_eq!(code.len(), 10, "{code}");
        assert!(
            !bytes.windows(code.len()).any(|w| w == code.as_bytes()),
            "the code {code} is in {} as plain text",
            file.display()
        );
    }
}

/// Checks on the deployment `s` (admin commands through `site`), restored from a backup
/// of one that held `was`, that everything arrived. Returns the login response of the
/// account then made with the pending code.
async fn check_arrived(
    s: &TestServer,
    site: &Site<'_>,
    was: &Moved,
    mock: &WechatMock,
    on: &str,
) -> Value {
    // Before anything changes a user, or makes one.
    for (who, token, before) in &was.kept {
        let (status, now) = me(s, token).await;
        assert_eq!((status, &now), (200, before), "{on}: the session of {who}");
    }
    for (why, token) in &was.refused {
        assert_eq!(me(s, token).await.0, 401, "{on}: a session of {why}");
    }
    for phone in &was.deleted {
        let out = site.run(&["user", "show", phone]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{on}: deleted {phone}: {err}");
        assert!(err.contains("no such user"), "{on}: {err}");
    }
    assert_eq!(users_metric(s).await, was.live, "{on}: smsauth_users");
    assert_eq!(site.user_count(), was.live, "{on}: user list");

    // The code sent before the backup, and never used, logs in here; the account it
    // makes gets an id after every id given out before, deleted users' too.
    let (phone, code) = &was.pending;
    let (status, made) = s
        .post(
            "/api/v1/auth/sms-login",
            json!({ "phone": phone, "code": code }),
        )
        .await;
    assert_eq!(status, 200, "{on}: the pending code of {phone}: {made}");
    assert_eq!(made["created"], true, "{on}: {made}");
    assert!(
        id(&made["user"]) > was.max_id,
        "{on}: id {} given out again (ids up to {} were used)",
        made["user"]["id"],
        was.max_id
    );
    assert_eq!(users_metric(s).await, was.live + 1, "{on}");

    let code = s.send_code(was.disabled, "login").await;
    let (status, body) = s
        .post(
            "/api/v1/auth/sms-login",
            json!({ "phone": was.disabled, "code": code }),
        )
        .await;
    assert_eq!(status, 401, "{on}: the disabled account logged in: {body}");

    let phone = was.password_user["phone"].as_str().unwrap();
    let (status, body) = password_login(s, phone, "not the password at all").await;
    assert_eq!(status, 401, "{on}: a wrong password: {body}");
    let (status, body) = password_login(s, phone, PASSWORD).await;
    assert_eq!(status, 200, "{on}: the password: {body}");
    assert_eq!(body["user"]["id"], was.password_user["id"], "{on}");
    assert_eq!(body["user"]["login_methods"], json!(["sms", "password"]));
    assert_eq!(me(s, &token(&body)).await.0, 200, "{on}");

    let (wechat_user, w_id) = &was.wechat;
    let (status, body) = exchange(s, &ticket_for(s, mock, wechat_user).await).await;
    assert_eq!(
        (status, id(&body["user"])),
        (200, *w_id),
        "{on}: the WeChat login: {body}"
    );
    assert_eq!(
        body["user"]["login_methods"],
        json!(["sms", "wechat"]),
        "{on}"
    );
    made
}

#[tokio::test]
async fn a_sled_deployment_moves_to_postgres_and_back() {
    if common::engine() == "postgres" {
        eprintln!("skipped under TEST_STORAGE_ENGINE=postgres: this test picks each engine itself");
        return;
    }

    // 1. On sled.
    let dir1 = Arc::new(tempfile::tempdir().unwrap());
    let sled1 = Site::Sled(dir1.path());
    let mock = WechatMock::start(APP_ID, APP_SECRET).await;
    let extra = format!("{}{EXTRA}", wechat_section(&mock));
    let mut s1 = TestServer::start_in(dir1.clone(), &extra).await;

    let a = s1.sms_login(A).await;
    let a_token = token(&a);
    let (status, body) = s1
        .send(
            s1.client
                .patch(s1.url("/api/v1/me"))
                .bearer_auth(&a_token)
                .json(&json!({ "nickname": NICKNAME })),
        )
        .await;
    assert_eq!(
        (status, &body["nickname"]),
        (200, &json!(NICKNAME)),
        "{body}"
    );

    let b_token = token(&s1.sms_login(B).await);
    logout(&s1, &b_token).await;

    let code = s1.send_code(C, "register").await;
    let (status, c) = s1
        .post(
            "/api/v1/auth/register",
            json!({ "phone": C, "code": code, "password": PASSWORD }),
        )
        .await;
    assert_eq!(status, 201, "{c}");
    let c_token = token(&c);

    let d = s1.sms_login(D).await;
    ok_stdout(&sled1.run(&["user", "disable", D]));
    assert_eq!(me(&s1, &token(&d)).await.0, 401, "disabled");

    let x = s1.sms_login(X).await;
    ok_stdout(&sled1.run(&["user", "logout", X]));
    assert_eq!(me(&s1, &token(&x)).await.0, 401, "sessions ended");

    let wechat_user = WechatUser::new("moved");
    let w = bind_phone(&s1, &mock, &wechat_user, W).await;

    let e = s1.sms_login(E).await;
    ok_stdout(&sled1.run(&["user", "delete", E]));
    assert_eq!(me(&s1, &token(&e)).await.0, 401, "deleted");

    let f_code = s1.send_code(F, "login").await;

    let ids: Vec<u64> = [&a, &d, &x, &e, &c]
        .iter()
        .map(|b| id(&b["user"]))
        .collect();
    let max_id = *ids.iter().max().unwrap();
    assert_eq!(
        id(&e["user"]),
        max_id,
        "the deleted user has the highest id"
    );
    let (status, me_a) = me(&s1, &a_token).await;
    assert_eq!(status, 200);
    assert_eq!(me_a["nickname"], NICKNAME);
    let (status, me_c) = me(&s1, &c_token).await;
    assert_eq!(status, 200);
    assert_eq!(me_c["login_methods"], json!(["sms", "password"]));
    let on_sled = Moved {
        kept: vec![
            ("A", a_token.clone(), me_a),
            ("C", c_token.clone(), me_c.clone()),
        ],
        refused: vec![
            ("B, logged out", b_token.clone()),
            ("D, disabled", token(&d)),
            ("X, all sessions ended", token(&x)),
            ("E, deleted", token(&e)),
        ],
        password_user: me_c,
        disabled: D,
        deleted: vec![E],
        live: 6,
        max_id,
        pending: (F, f_code),
        wechat: (wechat_user, id(&w["user"])),
    };
    assert_eq!(users_metric(&s1).await, on_sled.live);
    let accounts1 = sled1.accounts();
    assert_eq!(sled1.user_count(), on_sled.live, "{accounts1}");

    // Backed up while the server runs, as an operator would before the move.
    let file1 = dir1.path().join("sled.bak");
    let out = ok_stdout(&sled1.run(&["backup", file1.to_str().unwrap()]));
    assert!(out.contains("from the running server"), "{out}");
    check_backup_file(&file1, &codes_sent(&s1));
    assert!(s1.terminate().success());

    // 2. Restored into an empty PostgreSQL database.
    let Some(c) = Cluster::new(&extra) else {
        eprintln!("skipped the move: no PostgreSQL to move to");
        return;
    };
    // The phone key moves with the deployment: the sled data dir's own file becomes the
    // one every PostgreSQL instance reads.
    std::fs::copy(dir1.path().join("data/phone.key"), &c.phone_key).unwrap();
    let pg_dir = tempfile::tempdir().unwrap();
    let pg_config = pg_dir.path().join("smsauth.toml");
    std::fs::write(&pg_config, format!("{}{extra}", c.storage_toml())).unwrap();
    let pg = Site::Postgres(&pg_config);
    let out = ok_stdout(&pg.run(&["restore", file1.to_str().unwrap()]));
    assert!(
        out.contains("(6 users)") && out.contains("into the PostgreSQL database"),
        "{out}"
    );
    assert_eq!(pg.accounts(), accounts1, "the accounts on PostgreSQL");
    // Only ever into an empty database: a second restore is refused and changes nothing.
    let again = pg.run(&["restore", file1.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&again.stderr);
    assert_eq!(again.status.code(), Some(1), "{err}");
    assert!(err.contains("not empty"), "{err}");
    assert_eq!(pg.accounts(), accounts1, "after the refused restore");

    let s2 = c.instance().await;
    let f = check_arrived(&s2, &pg, &on_sled, &mock, "on PostgreSQL").await;
    let f_token = token(&f);

    // Changes made on PostgreSQL, to carry back to sled.
    let (status, body) = password_login(&s2, C, PASSWORD).await;
    assert_eq!(status, 200, "{body}");
    let c_pg_token = token(&body);
    logout(&s2, &c_pg_token).await;
    let q = s2.sms_login(Q).await;
    assert!(id(&q["user"]) > id(&f["user"]), "{q}");
    ok_stdout(&pg.run(&["user", "delete", Q]));
    assert_eq!(me(&s2, &token(&q)).await.0, 401, "deleted");
    let g_code = s2.send_code(G, "login").await;

    let mut kept = Vec::new();
    for (who, t) in [("A", &a_token), ("C", &c_token), ("F", &f_token)] {
        let (status, now) = me(&s2, t).await;
        assert_eq!(status, 200, "{who}: {now}");
        kept.push((who, t.clone(), now));
    }
    let (_, me_c) = me(&s2, &c_token).await;
    let mut refused = on_sled.refused;
    refused.push(("C, logged out on PostgreSQL", c_pg_token));
    refused.push(("Q, deleted on PostgreSQL", token(&q)));
    let on_postgres = Moved {
        kept,
        refused,
        password_user: me_c,
        disabled: D,
        deleted: vec![E, Q],
        live: 7,
        max_id: id(&q["user"]),
        pending: (G, g_code),
        wechat: on_sled.wechat,
    };
    assert_eq!(users_metric(&s2).await, on_postgres.live);
    let accounts2 = pg.accounts();

    // Backed up from PostgreSQL while an instance runs on it.
    let file2 = pg_dir.path().join("postgres.bak");
    let out = ok_stdout(&pg.run(&["backup", file2.to_str().unwrap()]));
    assert!(out.contains("from the store"), "{out}");
    let mut codes = codes_sent(&s1);
    codes.extend(codes_sent(&s2));
    check_backup_file(&file2, &codes);
    drop(s2);

    // 3. Back to sled, in a new empty data dir.
    let dir3 = Arc::new(tempfile::tempdir().unwrap());
    let sled3 = Site::Sled(dir3.path());
    std::fs::create_dir(dir3.path().join("data")).unwrap();
    std::fs::copy(&c.phone_key, dir3.path().join("data/phone.key")).unwrap();
    let out = ok_stdout(&sled3.run(&["restore", file2.to_str().unwrap()]));
    assert!(out.contains("(7 users)"), "{out}");
    for key in ["signing.key", "code.key"] {
        assert_eq!(mode(&dir3.path().join("data").join(key)), 0o600, "{key}");
    }
    assert_eq!(sled3.accounts(), accounts2, "the accounts back on sled");

    let s3 = TestServer::start_in(dir3.clone(), &extra).await;
    let g = check_arrived(&s3, &sled3, &on_postgres, &mock, "back on sled").await;
    assert_eq!(me(&s3, &token(&g)).await.0, 200);
}
