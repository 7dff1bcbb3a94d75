//! The account holder's own data over real HTTP, on the engine the harness runs
//! (TEST_STORAGE_ENGINE=postgres for PostgreSQL): the login activity (each event, the
//! masked address and cut User-Agent, paging, the retention pass), the export, and the
//! erase with its `delete_account` code.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::wechat::WechatUser;
use common::{TestServer, admin, assert_error, e164, mask, ok_stdout, wechat_flow};
use serde_json::{Value, json};
use smsauth::admin::backup::{Backup, Record, Writer};

/// Limits out of the way, and client addresses taken from X-Real-IP.
const OPEN: &str = "[server]\ntrust_proxy = true\n[code]\nresend_interval_secs = 0\n[limits]\nip_per_hour = 0\nverify_per_ip_per_minute = 0\nphone_per_day = 0\nphone_failures_per_hour = 0\n";
const PASSWORD: &str = "correct horse battery";

fn token(login: &Value) -> String {
    login["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no access_token in {login}"))
        .to_owned()
}

async fn activity(s: &TestServer, token: &str, before: Option<&str>) -> Value {
    let path = match before {
        Some(b) => format!("/api/v1/me/activity?before={b}"),
        None => "/api/v1/me/activity".to_owned(),
    };
    let (status, body) = s.get(&path, Some(token)).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// (event, method) of each entry of a page, newest first.
fn events(page: &Value) -> Vec<(String, Value)> {
    page["activity"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["event"].as_str().unwrap().to_owned(), e["method"].clone()))
        .collect()
}

/// POST `path` from client address `ip` with User-Agent `agent`.
async fn post_from(
    s: &TestServer,
    path: &str,
    ip: &str,
    agent: &str,
    token: Option<&str>,
    body: Value,
) -> (u16, Value) {
    let mut req = s
        .client
        .post(s.url(path))
        .header("x-real-ip", ip)
        .header("user-agent", agent)
        .json(&body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    s.send(req).await
}

#[tokio::test]
async fn every_event_is_recorded_with_a_masked_address_and_a_cut_user_agent() {
    // wechat_config has the [code] section of its own.
    let (s, mock) =
        wechat_flow::start(&OPEN.replace("[code]\nresend_interval_secs = 0\n", "")).await;
    let phone = "13812360001";
    // 250 two-byte characters: cut by characters, not bytes.
    let long_agent = "é".repeat(250);

    let code = s.send_code(phone, "login").await;
    let login = "/api/v1/auth/sms-login";
    let body = json!({ "phone": phone, "code": code });
    let (status, first) = post_from(&s, login, "203.0.113.77", &long_agent, None, body).await;
    assert_eq!(status, 200, "{first}");

    let code = s.send_code(phone, "reset_password").await;
    let body = json!({ "phone": phone, "code": code, "new_password": PASSWORD });
    let reset = "/api/v1/auth/password/reset";
    let (status, _) = post_from(&s, reset, "2001:db8:1:2::9", "reset-agent", None, body).await;
    assert_eq!(status, 204);

    let password_login = "/api/v1/auth/login";
    let wrong = json!({ "phone": phone, "password": "wrong horse battery" });
    let (status, _) = post_from(&s, password_login, "198.51.100.9", "ua-w", None, wrong).await;
    assert_eq!(status, 401);
    // A wrong password for a phone without an account has no account to record it on.
    let stranger = json!({ "phone": "13812360002", "password": "wrong horse battery" });
    let (status, _) = post_from(&s, password_login, "198.51.100.9", "ua", None, stranger).await;
    assert_eq!(status, 401);
    let right = json!({ "phone": phone, "password": PASSWORD });
    let (status, by_password) =
        post_from(&s, password_login, "198.51.100.10", "ua-p", None, right).await;
    assert_eq!(status, 200, "{by_password}");

    let wechat_user = WechatUser::new("act");
    let by_wechat = wechat_flow::bind_phone(&s, &mock, &wechat_user, phone).await;
    assert_eq!(by_wechat["created"], false, "bound to the phone's account");

    let logout = "/api/v1/auth/logout";
    let (status, _) = post_from(
        &s,
        logout,
        "198.51.100.11",
        "ua-l",
        Some(&token(&by_password)),
        json!({}),
    )
    .await;
    assert_eq!(status, 204);

    let page = activity(&s, &token(&by_wechat), None).await;
    assert_eq!(
        events(&page),
        [
            ("logout".to_owned(), Value::Null),
            ("login".to_owned(), json!("wechat")),
            ("wechat_bind".to_owned(), json!("wechat")),
            ("login".to_owned(), json!("password")),
            ("login_failed".to_owned(), json!("password")),
            ("password_change".to_owned(), Value::Null),
            ("login".to_owned(), json!("sms")),
        ],
        "{page}"
    );
    assert_eq!(page["next_before"], Value::Null);
    let entries = page["activity"].as_array().unwrap();
    let first_login = &entries[6];
    assert_eq!(first_login["ip"], "203.0.113.0/24");
    assert_eq!(first_login["user_agent"], "é".repeat(200));
    assert!(first_login["at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(entries[5]["ip"], "2001:db8:1::/48");
    assert_eq!(entries[5]["user_agent"], "reset-agent");
    assert_eq!(entries[4]["ip"], "198.51.100.0/24");
    assert_eq!(entries[0]["user_agent"], "ua-l");
    // The first login's session ended with the password change: its token is refused.
    assert_eq!(
        s.get("/api/v1/me/activity", Some(&token(&first))).await.0,
        401
    );
    assert_eq!(s.get("/api/v1/me/activity", None).await.0, 401);
}

#[tokio::test]
async fn activity_pages_back_fifty_at_a_time() {
    let s = TestServer::start(OPEN).await;
    let phone = "13812360101";
    let mut last = Value::Null;
    for _ in 0..55 {
        last = s.sms_login(phone).await;
    }
    let token = token(&last);
    let first = activity(&s, &token, None).await;
    let first_ids: Vec<&str> = first["activity"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(first_ids.len(), 50);
    let before = first["next_before"]
        .as_str()
        .expect("a next page")
        .to_owned();
    assert_eq!(before, *first_ids.last().unwrap());

    let second = activity(&s, &token, Some(&before)).await;
    let second_ids: Vec<&str> = second["activity"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(second_ids.len(), 5, "{second}");
    assert_eq!(second["next_before"], Value::Null);
    assert!(second_ids.iter().all(|id| !first_ids.contains(id)));
    // Newest first across both pages: the times never go up.
    let times: Vec<String> = [&first, &second]
        .iter()
        .flat_map(|p| p["activity"].as_array().unwrap().clone())
        .map(|e| e["at"].as_str().unwrap().to_owned())
        .collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "{times:?}");

    let bad = s
        .get("/api/v1/me/activity?before=yesterday", Some(&token))
        .await;
    assert_error(&bad, 400, "invalid_request");
}

/// The backup of `dir` with every activity entry of `user` moved `days` into the past.
fn aged_backup(dir: &std::path::Path, ages: &[(u64, i64)]) -> std::path::PathBuf {
    let file = dir.join("live.bak");
    // With the phone key in it, so that it restores anywhere (tests/backup.rs has the
    // restores that must find the key elsewhere).
    ok_stdout(&admin(
        dir,
        &["backup", "--include-keys", file.to_str().unwrap()],
    ));
    let bytes = std::fs::read(&file).unwrap();
    let backup = Backup::parse(&bytes).unwrap();
    let mut w = Writer::new();
    let mut aged = 0;
    for r in &backup.records {
        match *r {
            Record::Tree { tree, key, value } if tree == "useridtimeseq_activity" => {
                let user = u64::from_be_bytes(key[..8].try_into().unwrap());
                let mut key = key.to_vec();
                if let Some((_, days)) = ages.iter().find(|(u, _)| *u == user) {
                    let at = i64::from_be_bytes(key[8..16].try_into().unwrap());
                    key[8..16].copy_from_slice(&(at - days * 86_400).to_be_bytes());
                    aged += 1;
                }
                w.tree(tree, &key, value).unwrap();
            }
            ref other => w.record(other).unwrap(),
        }
    }
    assert!(
        aged >= 2,
        "the backup holds the activity ({aged} entries aged)"
    );
    let out = dir.join("aged.bak");
    std::fs::write(&out, w.finish()).unwrap();
    out
}

#[tokio::test]
async fn the_housekeeping_pass_deletes_activity_past_its_retention_and_backups_carry_it() {
    let s = TestServer::start(OPEN).await;
    let old = s.sms_login("13812360201").await;
    let kept = s.sms_login("13812360202").await;
    let (old_id, kept_id) = (
        old["user"]["id"].as_u64().unwrap(),
        kept["user"]["id"].as_u64().unwrap(),
    );
    // One more entry each: a logout.
    for login in [&old, &kept] {
        let (status, _) = s
            .post_auth("/api/v1/auth/logout", &token(login), json!({}))
            .await;
        assert_eq!(status, 204);
    }
    // 91 days old is past the default 90; 89 days is not.
    let dir = s.dir();
    let file = aged_backup(dir.path(), &[(old_id, 91), (kept_id, 89)]);
    drop(s);

    let target = Arc::new(tempfile::tempdir().unwrap());
    if common::engine() == "postgres" {
        // A shared store reads its key from its own file, never from a backup.
        std::fs::copy(
            common::phone_key_file(dir.path()),
            common::phone_key_file(target.path()),
        )
        .unwrap();
    }
    ok_stdout(&admin(target.path(), &["restore", file.to_str().unwrap()]));
    let every_second = OPEN.replace("[server]\n", "[server]\nhousekeeping_secs = 1\n");
    let r = TestServer::start_in(target, &every_second).await;
    let kept_again = r.sms_login("13812360202").await;
    let old_again = r.sms_login("13812360201").await;
    assert_eq!(old_again["user"]["id"], old_id, "the restored account");

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let page = activity(&r, &token(&old_again), None).await;
        if events(&page).len() == 1 {
            assert_eq!(events(&page), [("login".to_owned(), json!("sms"))]);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "entries 91 days old are still there: {page}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let page = activity(&r, &token(&kept_again), None).await;
    assert_eq!(
        events(&page),
        [
            ("login".to_owned(), json!("sms")),
            ("logout".to_owned(), Value::Null),
            ("login".to_owned(), json!("sms")),
        ],
        "entries 89 days old are kept: {page}"
    );
}

#[tokio::test]
async fn the_export_holds_every_record_of_the_account_without_secrets() {
    let s = TestServer::start(OPEN).await;
    let phone = "13812360301";
    let first = s.sms_login(phone).await;
    let code = s.send_code(phone, "reset_password").await;
    let (status, _) = s
        .post(
            "/api/v1/auth/password/reset",
            json!({ "phone": phone, "code": code, "new_password": PASSWORD }),
        )
        .await;
    assert_eq!(status, 204);
    let (status, login) = s
        .post(
            "/api/v1/auth/login",
            json!({ "phone": phone, "password": PASSWORD }),
        )
        .await;
    assert_eq!(status, 200, "{login}");
    let someone_else = s.sms_login("13812360302").await;

    let resp = s
        .client
        .get(s.url("/api/v1/me/export"))
        .bearer_auth(token(&login))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-disposition"],
        "attachment; filename=\"smsauth-export.json\""
    );
    assert_eq!(resp.headers()["content-type"], "application/json");
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let text = resp.text().await.unwrap();
    assert!(!text.contains("argon2"), "a password hash in {text}");
    let export: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(export["profile"]["id"], first["user"]["id"]);
    assert_eq!(export["profile"]["phone"], e164(phone));
    assert_eq!(export["profile"]["disabled"], false);
    assert_eq!(
        export["login_methods"],
        json!([
            { "method": "sms", "identification": e164(phone) },
            { "method": "password", "identification": e164(phone) },
        ])
    );
    // Both sessions: the one the reset ended is still stored, and shown.
    let sessions = export["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 2, "{export}");
    let mut methods: Vec<&str> = sessions
        .iter()
        .map(|s| s["method"].as_str().unwrap())
        .collect();
    methods.sort();
    assert_eq!(methods, ["password", "sms"]);
    assert!(sessions.iter().all(|s| s["ip"] == "127.0.0.0/24"));
    let events: Vec<&str> = export["activity"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(events, ["login", "password_change", "login"]);
    assert!(
        !text.contains(&e164("13812360302")),
        "another account's data"
    );
    assert_ne!(someone_else["user"]["id"], export["profile"]["id"]);
    assert_eq!(s.get("/api/v1/me/export", None).await.0, 401);
}

#[tokio::test]
async fn an_erased_account_is_gone_its_tokens_refused_and_its_phone_new() {
    // Five codes a day per phone: the erase must not give the phone a fresh allowance.
    let config = OPEN.replace("phone_per_day = 0", "phone_per_day = 5");
    let s = TestServer::start(&config).await;

    // A phone without an account: 200 as always, and no code goes out.
    let stranger = "13812360401";
    let (status, body) = s
        .post(
            "/api/v1/sms/code",
            json!({ "phone": stranger, "purpose": "delete_account" }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["expires_in"].is_u64());
    let logged = |p: &str| {
        s.log_lines()
            .iter()
            .filter(|l| {
                l["message"] == "verification code (log sender)" && l["phone"] == mask(&e164(p))
            })
            .count()
    };
    assert_eq!(
        logged(stranger),
        0,
        "a code was sent to a phone without an account"
    );

    let phone = "13812360402";
    let login = s.sms_login(phone).await; // send 1
    let other_session = s.sms_login(phone).await; // send 2
    let old_id = login["user"]["id"].as_u64().unwrap();
    let token = token(&login);
    // A login code does not delete.
    let code = s.send_code(phone, "login").await; // send 3
    let (status, body) = s
        .post_auth("/api/v1/me/delete", &token, json!({ "code": code }))
        .await;
    assert_error(&(status, body), 400, "invalid_code");
    let code = s.send_code(phone, "delete_account").await; // send 4
    assert_eq!(logged(phone), 4);
    let wrong = if code == "000000" { "111111" } else { "000000" };
    let refused = s
        .post_auth("/api/v1/me/delete", &token, json!({ "code": wrong }))
        .await;
    assert_error(&refused, 400, "invalid_code");
    assert_eq!(
        s.get("/api/v1/me", Some(&token)).await.0,
        200,
        "still there"
    );
    let (status, body) = s
        .post_auth("/api/v1/me/delete", &token, json!({ "code": code }))
        .await;
    assert_eq!((status, &body), (204, &Value::Null));

    // Every session of it ends at once, restarts included.
    let s = s.kill9_and_restart().await;
    for t in [
        token.as_str(),
        other_session["access_token"].as_str().unwrap(),
    ] {
        assert_eq!(s.get("/api/v1/me", Some(t)).await.0, 401);
        assert_eq!(s.get("/api/v1/me/export", Some(t)).await.0, 401);
        assert_eq!(s.get("/api/v1/me/activity", Some(t)).await.0, 401);
    }
    let (status, _) = s
        .post(
            "/api/v1/auth/refresh",
            json!({ "refresh_token": other_session["refresh_token"] }),
        )
        .await;
    assert_eq!(status, 401);
    let again = s
        .post_auth("/api/v1/me/delete", &token, json!({ "code": code }))
        .await;
    assert_error(&again, 401, "unauthorized");

    // The phone registers anew: a new user, with nothing of the old one.
    let fresh = s.sms_login(phone).await; // send 5
    assert_eq!(fresh["created"], true);
    let new_id = fresh["user"]["id"].as_u64().unwrap();
    assert!(new_id > old_id, "ids are never given out again");
    let (status, export) = s.get("/api/v1/me/export", Some(&token_of(&fresh))).await;
    assert_eq!(status, 200);
    assert_eq!(export["sessions"].as_array().unwrap().len(), 1, "{export}");
    let events: Vec<&str> = export["activity"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(events, ["login"]);

    // The phone's daily count went on through the erase: the sixth code is refused.
    let (status, body) = s
        .post(
            "/api/v1/sms/code",
            json!({ "phone": phone, "purpose": "login" }),
        )
        .await;
    assert_error(&(status, body), 429, "rate_limited");
}

fn token_of(login: &Value) -> String {
    token(login)
}
