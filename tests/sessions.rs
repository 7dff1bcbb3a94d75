//! Refresh tokens and login sessions over real HTTP, on the engine the harness runs
//! (TEST_STORAGE_ENGINE=postgres for PostgreSQL): rotation, the reuse window, reuse
//! detection, racing refreshes, the session list, logout scopes, what else ends sessions,
//! the refresh cookie, the old `ttl_secs` name, and a cluster of two instances.

mod common;

use std::time::{Duration, Instant};

use base64::Engine;
use common::cluster::Cluster;
use common::{TestServer, admin, assert_error, ok_stdout};
use futures::future::join_all;
use serde_json::{Value, json};

/// Limits out of the way, for tests about something else.
const OPEN: &str = "[code]\nresend_interval_secs = 0\n[limits]\nip_per_hour = 0\nverify_per_ip_per_minute = 0\nphone_per_day = 0\nphone_failures_per_hour = 0\n";

fn field(v: &Value, key: &str) -> String {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("no {key} in {v}"))
        .to_owned()
}

fn claims(token: &str) -> Value {
    let part = token.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .unwrap(),
    )
    .unwrap()
}

async fn refresh(s: &TestServer, token: &str) -> (u16, Value) {
    s.post("/api/v1/auth/refresh", json!({ "refresh_token": token }))
        .await
}

async fn me(s: &TestServer, token: &str) -> u16 {
    s.get("/api/v1/me", Some(token)).await.0
}

async fn sessions(s: &TestServer, token: &str) -> Vec<Value> {
    let (status, body) = s.get("/api/v1/me/sessions", Some(token)).await;
    assert_eq!(status, 200, "{body}");
    body.as_array().unwrap().clone()
}

/// A code login with the given User-Agent.
async fn login_as(s: &TestServer, phone: &str, agent: &str) -> Value {
    let code = s.send_code(phone, "login").await;
    let req = s
        .client
        .post(s.url("/api/v1/auth/sms-login"))
        .header("user-agent", agent)
        .json(&json!({ "phone": phone, "code": code }));
    let (status, body) = s.send(req).await;
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test]
async fn refresh_rotates_and_a_reuse_within_the_window_gets_the_same_successor() {
    let s = TestServer::start(OPEN).await;
    let login = s.sms_login("13812347001").await;
    assert_eq!(login["expires_in"], 3600, "token.access_ttl_secs default");
    assert_eq!(login["refresh_expires_in"], 2_592_000);
    let first = field(&login, "refresh_token");
    assert_eq!(first.len(), 43, "256 bits, base64url");
    let sid = field(&claims(&field(&login, "access_token")), "sid");

    let (status, next) = refresh(&s, &first).await;
    assert_eq!(status, 200, "{next}");
    assert_eq!(next["token_type"], "Bearer");
    assert_eq!(next["user"]["phone"], "+8613812347001");
    let second = field(&next, "refresh_token");
    assert_ne!(second, first);
    let access = field(&next, "access_token");
    assert_eq!(
        field(&claims(&access), "sid"),
        sid,
        "the same session goes on"
    );
    assert_eq!(me(&s, &access).await, 200);

    // Two tabs: the used token within token.refresh_reuse_interval_secs gets the same
    // successor, and a new access token of the same session.
    let (status, again) = refresh(&s, &first).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(field(&again, "refresh_token"), second);
    assert_eq!(field(&claims(&field(&again, "access_token")), "sid"), sid);

    // The chain goes on from the successor, once.
    let (status, third) = refresh(&s, &second).await;
    assert_eq!(status, 200, "{third}");
    assert_ne!(field(&third, "refresh_token"), second);

    assert_error(
        &refresh(&s, "not-a-token").await,
        401,
        "invalid_refresh_token",
    );
    assert_error(
        &refresh(&s, &"A".repeat(43)).await,
        401,
        "invalid_refresh_token",
    );
    assert_error(
        &s.post("/api/v1/auth/refresh", json!({})).await,
        401,
        "invalid_refresh_token",
    );
    let log = s.log_lines();
    let text = serde_json::to_string(&log).unwrap();
    for secret in [&first, &second] {
        assert!(
            !text.contains(secret.as_str()),
            "a refresh token was logged"
        );
    }
}

#[tokio::test]
async fn a_late_reuse_ends_the_whole_session_and_is_logged() {
    let s = TestServer::start(&format!("{OPEN}[token]\nrefresh_reuse_interval_secs = 0\n")).await;
    let other = s.sms_login("13812347002").await;
    let login = s.sms_login("13812347002").await;
    let first = field(&login, "refresh_token");
    let (status, next) = refresh(&s, &first).await;
    assert_eq!(status, 200, "{next}");
    let successor = field(&next, "refresh_token");
    let access = field(&next, "access_token");

    // Within the second of its use the token still counts as a second tab; once that
    // second has passed, the same token is a stolen copy.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, body) = refresh(&s, &first).await;
        if status == 401 {
            assert_eq!(body["error"], "invalid_refresh_token");
            break;
        }
        assert_eq!(field(&body, "refresh_token"), successor);
        assert!(Instant::now() < deadline, "the reuse window never closed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Everything of that session is refused at once, the thief's and the owner's alike.
    assert_error(&refresh(&s, &successor).await, 401, "invalid_refresh_token");
    assert_eq!(me(&s, &access).await, 401);
    assert_eq!(me(&s, &field(&login, "access_token")).await, 401);
    // Another session of the same user is not touched.
    assert_eq!(me(&s, &field(&other, "access_token")).await, 200);
    assert_eq!(refresh(&s, &field(&other, "refresh_token")).await.0, 200);
    let line = s
        .wait_log(|l| {
            l["level"] == "WARN"
                && l["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("taken as stolen"))
        })
        .expect("the reuse is logged");
    assert!(line["session"].is_string(), "{line}");
}

#[tokio::test]
async fn racing_refreshes_of_one_token_get_one_successor() {
    let s = TestServer::start(OPEN).await;
    let login = s.sms_login("13812347003").await;
    let first = field(&login, "refresh_token");
    let answers = join_all((0..16).map(|_| refresh(&s, &first))).await;
    let mut successors: Vec<String> = Vec::new();
    for (status, body) in &answers {
        // Within the window every racer gets the same successor; none may get another.
        assert_eq!(*status, 200, "{body}");
        successors.push(field(body, "refresh_token"));
    }
    successors.dedup();
    assert_eq!(
        successors.len(),
        1,
        "two different successors: {successors:?}"
    );
    let (status, _) = refresh(&s, &successors[0]).await;
    assert_eq!(status, 200, "the one successor is live");
    assert_eq!(sessions(&s, &field(&login, "access_token")).await.len(), 1);
}

#[tokio::test]
async fn the_session_list_and_ending_one_session() {
    let s = TestServer::start(OPEN).await;
    let long_agent = "x".repeat(300);
    let a = login_as(&s, "13812347004", "browser A").await;
    let b = login_as(&s, "13812347004", &long_agent).await;
    let a_token = field(&a, "access_token");
    let list = sessions(&s, &a_token).await;
    assert_eq!(list.len(), 2, "{list:?}");
    let a_sid = field(&claims(&a_token), "sid");
    let b_sid = field(&claims(&field(&b, "access_token")), "sid");
    let mine = list.iter().find(|x| x["id"] == a_sid).unwrap();
    assert_eq!(mine["current"], true);
    assert_eq!(mine["method"], "sms");
    assert_eq!(mine["ip"], "127.0.0.0/24");
    assert_eq!(mine["user_agent"], "browser A");
    assert!(mine["created_at"].as_str().unwrap().ends_with('Z'));
    assert!(mine["last_used_at"].is_string());
    let theirs = list.iter().find(|x| x["id"] == b_sid).unwrap();
    assert_eq!(theirs["current"], false);
    assert_eq!(theirs["user_agent"].as_str().unwrap().chars().count(), 200);

    // Another user cannot end it, nor see it.
    let stranger = s.sms_login("13812347005").await;
    let stranger_token = field(&stranger, "access_token");
    assert_eq!(sessions(&s, &stranger_token).await.len(), 1);
    let path = format!("/api/v1/me/sessions/{b_sid}");
    let req = s.client.delete(s.url(&path)).bearer_auth(&stranger_token);
    assert_error(&s.send(req).await, 404, "not_found");

    let req = s.client.delete(s.url(&path)).bearer_auth(&a_token);
    assert_eq!(s.send(req).await.0, 204);
    assert_eq!(me(&s, &field(&b, "access_token")).await, 401);
    assert_error(
        &refresh(&s, &field(&b, "refresh_token")).await,
        401,
        "invalid_refresh_token",
    );
    assert_eq!(me(&s, &a_token).await, 200);
    let req = s.client.delete(s.url(&path)).bearer_auth(&a_token);
    assert_error(&s.send(req).await, 404, "not_found");
    let req = s
        .client
        .delete(s.url("/api/v1/me/sessions/nothex"))
        .bearer_auth(&a_token);
    assert_error(&s.send(req).await, 404, "not_found");
    assert_eq!(sessions(&s, &a_token).await.len(), 1);

    // Ended, and still refused after a restart.
    let s = s.restart().await;
    assert_eq!(me(&s, &field(&b, "access_token")).await, 401);
    assert_eq!(me(&s, &a_token).await, 200);
}

#[tokio::test]
async fn logout_scopes() {
    let s = TestServer::start(OPEN).await;
    let phone = "13812347006";
    let [a, b, c] = [
        s.sms_login(phone).await,
        s.sms_login(phone).await,
        s.sms_login(phone).await,
    ];
    let tok = |v: &Value| field(v, "access_token");

    // others: every session but this one.
    let (status, body) = s
        .post_auth(
            "/api/v1/auth/logout",
            &tok(&a),
            json!({ "scope": "others" }),
        )
        .await;
    assert_eq!(status, 204, "{body}");
    assert_eq!(me(&s, &tok(&a)).await, 200);
    for ended in [&b, &c] {
        assert_eq!(me(&s, &tok(ended)).await, 401);
        assert_eq!(refresh(&s, &field(ended, "refresh_token")).await.0, 401);
    }
    assert_eq!(sessions(&s, &tok(&a)).await.len(), 1);

    // local, by a missing body: this session and its refresh token.
    let req = s
        .client
        .post(s.url("/api/v1/auth/logout"))
        .bearer_auth(tok(&a));
    assert_eq!(s.send(req).await.0, 204);
    assert_eq!(me(&s, &tok(&a)).await, 401);
    assert_error(
        &refresh(&s, &field(&a, "refresh_token")).await,
        401,
        "invalid_refresh_token",
    );

    // local, by name; a bad scope is refused.
    let d = s.sms_login(phone).await;
    let e = s.sms_login(phone).await;
    assert_error(
        &s.post_auth("/api/v1/auth/logout", &tok(&d), json!({ "scope": "all" }))
            .await,
        400,
        "invalid_request",
    );
    let (status, _) = s
        .post_auth("/api/v1/auth/logout", &tok(&d), json!({ "scope": "local" }))
        .await;
    assert_eq!(status, 204);
    assert_eq!(me(&s, &tok(&d)).await, 401);
    assert_eq!(me(&s, &tok(&e)).await, 200);

    // global: every session, this one too.
    let f = s.sms_login(phone).await;
    let (status, _) = s
        .post_auth(
            "/api/v1/auth/logout",
            &tok(&f),
            json!({ "scope": "global" }),
        )
        .await;
    assert_eq!(status, 204);
    for ended in [&e, &f] {
        assert_eq!(me(&s, &tok(ended)).await, 401);
        assert_eq!(refresh(&s, &field(ended, "refresh_token")).await.0, 401);
    }
    let g = s.sms_login(phone).await;
    assert_eq!(me(&s, &tok(&g)).await, 200);
    assert_eq!(sessions(&s, &tok(&g)).await.len(), 1);
}

#[tokio::test]
async fn reset_admin_logout_disable_and_delete_end_refresh_tokens() {
    let s = TestServer::start(OPEN).await;
    let dir = s.dir();
    let phone = "13812347007";
    let refresh_live =
        async |s: &TestServer, v: &Value| refresh(s, &field(v, "refresh_token")).await.0;

    // A password reset.
    let before = s.sms_login(phone).await;
    let code = s.send_code(phone, "reset_password").await;
    let (status, body) = s
        .post(
            "/api/v1/auth/password/reset",
            json!({ "phone": phone, "code": code, "new_password": "a brand new secret" }),
        )
        .await;
    assert_eq!(status, 204, "{body}");
    assert_eq!(refresh_live(&s, &before).await, 401);

    // smsauth user logout.
    let before = s.sms_login(phone).await;
    ok_stdout(&admin(dir.path(), &["user", "logout", phone]));
    assert_eq!(refresh_live(&s, &before).await, 401);

    // disable: refused while disabled, and the sessions stay ended after enabling.
    let before = s.sms_login(phone).await;
    ok_stdout(&admin(dir.path(), &["user", "disable", phone]));
    assert_eq!(refresh_live(&s, &before).await, 401);

    // delete.
    let other = "13812347008";
    let before = s.sms_login(other).await;
    assert_eq!(refresh_live(&s, &before).await, 200);
    let before = s.sms_login(other).await;
    ok_stdout(&admin(dir.path(), &["user", "delete", other]));
    assert_eq!(refresh_live(&s, &before).await, 401);
    assert_eq!(me(&s, &field(&before, "access_token")).await, 401);
}

#[tokio::test]
async fn the_refresh_cookie_and_the_same_origin_rule() {
    let s = TestServer::start(&format!(
        "{OPEN}[token]\ncookie = true\ncookie_secure = false\n"
    ))
    .await;
    let code = s.send_code("13812347009", "login").await;
    let resp = s
        .client
        .post(s.url("/api/v1/auth/sms-login"))
        .json(&json!({ "phone": "13812347009", "code": code }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let cookies: Vec<String> = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    let body: Value = resp.json().await.unwrap();
    let refresh_cookie = cookies
        .iter()
        .find(|c| c.starts_with("smsauth_session_refresh="))
        .unwrap_or_else(|| panic!("no refresh cookie in {cookies:?}"));
    assert_eq!(
        *refresh_cookie,
        format!(
            "smsauth_session_refresh={}; Path=/api/v1/auth/refresh; Max-Age=2592000; HttpOnly; SameSite=Strict",
            field(&body, "refresh_token")
        )
    );
    let cookie = format!("smsauth_session_refresh={}", field(&body, "refresh_token"));

    // From another site: refused before the token is looked at (still live after).
    let req = s
        .client
        .post(s.url("/api/v1/auth/refresh"))
        .header("cookie", &cookie)
        .header("sec-fetch-site", "cross-site");
    assert_error(&s.send(req).await, 403, "forbidden");
    let req = s
        .client
        .post(s.url("/api/v1/auth/refresh"))
        .header("cookie", &cookie);
    assert_error(&s.send(req).await, 403, "forbidden");

    // From our own page, with no body at all.
    let resp = s
        .client
        .post(s.url("/api/v1/auth/refresh"))
        .header("cookie", &cookie)
        .header("sec-fetch-site", "same-origin")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let set: Vec<String> = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    let next: Value = resp.json().await.unwrap();
    assert!(
        set.iter().any(|c| c.starts_with(&format!(
            "smsauth_session_refresh={};",
            field(&next, "refresh_token")
        ))),
        "{set:?}"
    );
    assert!(set.iter().any(|c| c.starts_with(&format!(
        "smsauth_session={};",
        field(&next, "access_token")
    ))));

    // Logout clears both cookies.
    let resp = s
        .client
        .post(s.url("/api/v1/auth/logout"))
        .bearer_auth(field(&next, "access_token"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let cleared: Vec<&str> = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert!(cleared.iter().any(|c| c.starts_with("smsauth_session=;")));
    assert!(
        cleared
            .iter()
            .any(|c| c.starts_with("smsauth_session_refresh=;"))
    );
}

#[tokio::test]
async fn the_refresh_endpoint_counts_toward_the_verify_limit() {
    let s = TestServer::start(
        "[code]\nresend_interval_secs = 0\n[limits]\nverify_per_ip_per_minute = 3\n",
    )
    .await;
    let login = s.sms_login("13812347010").await; // one
    let mut token = field(&login, "refresh_token");
    for _ in 0..2 {
        let (status, body) = refresh(&s, &token).await;
        assert_eq!(status, 200, "{body}");
        token = field(&body, "refresh_token");
    }
    assert_error(&refresh(&s, &token).await, 429, "rate_limited");
}

#[tokio::test]
async fn the_former_ttl_secs_name_still_works_with_a_warning() {
    let s = TestServer::start("[token]\nttl_secs = 120\n").await;
    let login = s.sms_login("13812347011").await;
    assert_eq!(login["expires_in"], 120);
    let line = s
        .wait_log(|l| {
            l["level"] == "WARN"
                && l["message"].as_str().is_some_and(|m| {
                    m.contains("`token.ttl_secs` is now called `token.access_ttl_secs`")
                })
        })
        .expect("a warning at start");
    assert!(line.is_object());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("both.toml"),
        "[token]\nttl_secs = 120\naccess_ttl_secs = 60\n",
    )
    .unwrap();
    let both = common::run_cli(&["serve", "--config", "both.toml"], &[], dir.path());
    assert!(!both.status.success());
    assert!(
        String::from_utf8_lossy(&both.stderr).contains("former name"),
        "{}",
        String::from_utf8_lossy(&both.stderr)
    );
}

#[tokio::test]
async fn sessions_across_two_instances_of_a_cluster() {
    let Some(c) = Cluster::new(OPEN) else {
        eprintln!("skipped: no PostgreSQL to run a cluster on");
        return;
    };
    let (a, b) = c.pair().await;
    let on_a = a.sms_login("13812347012").await;
    let on_b = b.sms_login("13812347012").await;
    // Each instance lists both sessions.
    assert_eq!(sessions(&a, &field(&on_b, "access_token")).await.len(), 2);
    assert_eq!(sessions(&b, &field(&on_a, "access_token")).await.len(), 2);
    // A refresh made on A goes on on B.
    let (status, next) = refresh(&a, &field(&on_b, "refresh_token")).await;
    assert_eq!(status, 200, "{next}");
    let (status, again) = refresh(&b, &field(&on_b, "refresh_token")).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(
        again["refresh_token"], next["refresh_token"],
        "one successor"
    );
    let b_token = field(&next, "access_token");
    assert_eq!(me(&b, &b_token).await, 200);
    assert_eq!(me(&a, &b_token).await, 200);
    // Ended on A: refused on B at once.
    let sid = field(&claims(&b_token), "sid");
    let req = a
        .client
        .delete(a.url(&format!("/api/v1/me/sessions/{sid}")))
        .bearer_auth(field(&on_a, "access_token"));
    assert_eq!(a.send(req).await.0, 204);
    assert_eq!(me(&b, &b_token).await, 401);
    assert_eq!(me(&b, &field(&again, "access_token")).await, 401);
    assert_error(
        &refresh(&b, &field(&next, "refresh_token")).await,
        401,
        "invalid_refresh_token",
    );
    assert_eq!(sessions(&b, &field(&on_a, "access_token")).await.len(), 1);
}
