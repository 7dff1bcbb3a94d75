//! The cluster mode: two instances, A and B, on one PostgreSQL that each test starts for
//! itself, talked to over HTTP as nginx would. Whatever one instance does, the other sees
//! on its very next request, and every limit counts once for the cluster.

mod common;

use common::cluster::Cluster;
use common::{TestServer, admin, assert_error, e164, ok_stdout};
use futures::future::join_all;
use serde_json::{Value, json};

/// Limits out of the way, for tests about something else.
const OPEN: &str = "[limits]\nip_per_hour = 0\nverify_per_ip_per_minute = 0\ncaptcha_per_ip_per_minute = 0\nphone_per_day = 0\nglobal_per_day = 0\nphone_failures_per_hour = 0\n";

fn cluster(extra: &str) -> Option<Cluster> {
    let c = Cluster::new(extra);
    if c.is_none() {
        eprintln!("skipped: no PostgreSQL to run a cluster on");
    }
    c
}

async fn login(s: &TestServer, phone: &str, code: &str) -> (u16, Value) {
    s.post(
        "/api/v1/auth/sms-login",
        json!({ "phone": phone, "code": code }),
    )
    .await
}

async fn send(s: &TestServer, phone: &str) -> (u16, Value) {
    s.post("/api/v1/sms/code", json!({ "phone": phone })).await
}

/// A request that says it comes from `ip` (heard with trust_proxy).
async fn post_from(s: &TestServer, ip: &str, path: &str, body: Value) -> (u16, Value) {
    let req = s
        .client
        .post(s.url(path))
        .header("x-real-ip", ip)
        .json(&body);
    s.send(req).await
}

async fn register_with_ticket(s: &TestServer, phone: &str, ticket: &str) -> (u16, Value) {
    s.post(
        "/api/v1/auth/register",
        json!({ "phone": phone, "verification_token": ticket, "password": "a long enough password 42" }),
    )
    .await
}

async fn me(s: &TestServer, token: &str) -> u16 {
    s.get("/api/v1/me", Some(token)).await.0
}

fn token(body: &Value) -> String {
    body["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no token in {body}"))
        .to_owned()
}

#[tokio::test]
async fn a_code_sent_through_one_instance_logs_in_through_the_other_once() {
    let Some(c) = cluster(OPEN) else { return };
    let (a, b) = c.pair().await;
    let phone = "13800001001";
    let code = a.send_code(phone, "login").await;
    let got = login(&b, phone, &code).await;
    assert_eq!(got.0, 200, "{}", got.1);
    assert_eq!(got.1["created"], true);
    assert_error(&login(&a, phone, &code).await, 400, "invalid_code");
    assert_error(&login(&b, phone, &code).await, 400, "invalid_code");
    // The session works on both.
    let t = token(&got.1);
    for s in [&a, &b] {
        let me = s.get("/api/v1/me", Some(&t)).await;
        assert_eq!(
            (me.0, me.1["phone"].as_str()),
            (200, Some("+8613800001001"))
        );
    }
}

/// Of 50 concurrent logins with the right code, split across A and B, exactly one gets
/// 200; 20 rounds, each with a code of its own.
#[tokio::test]
async fn fifty_concurrent_right_codes_across_two_instances_win_once() {
    let Some(c) = cluster(OPEN) else { return };
    let (a, b) = c.pair().await;
    for round in 0..20 {
        let phone = format!("1390002{round:04}");
        let code = a.send_code(&phone, "login").await;
        let tries = (0..50).map(|i| {
            let s = if i % 2 == 0 { &a } else { &b };
            login(s, &phone, &code)
        });
        let answers = join_all(tries).await;
        let won = answers.iter().filter(|(status, _)| *status == 200).count();
        assert_eq!(won, 1, "round {round}: {won} logins won: {answers:?}");
        for got in answers.iter().filter(|(status, _)| *status != 200) {
            assert_error(got, 400, "invalid_code");
        }
    }
    let (_, metrics) = b.get_text("/metrics").await;
    assert!(metrics.contains("\nsmsauth_users 20\n"), "{metrics}");
}

/// One phone, a login on A and a registration on B at the same moment: one account.
/// Two registrations of one phone on A and B at once: one 201, one 409.
#[tokio::test]
async fn racing_first_logins_and_registrations_make_one_account() {
    let extra = format!("{OPEN}[code]\nresend_interval_secs = 0\n");
    let Some(c) = cluster(&extra) else { return };
    let (a, b) = c.pair().await;
    for round in 0..10 {
        let phone = format!("1370003{round:04}");
        let login_code = a.send_code(&phone, "login").await;
        let register_code = b.send_code(&phone, "register").await;
        let (logged_in, registered) = tokio::join!(
            login(&a, &phone, &login_code),
            b.post(
                "/api/v1/auth/register",
                json!({ "phone": phone, "code": register_code, "password": "a long enough password 42" }),
            )
        );
        assert_eq!(logged_in.0, 200, "{}", logged_in.1);
        match registered.0 {
            // The registration made it: the login found it.
            201 => assert_eq!(logged_in.1["created"], false, "round {round}"),
            // The login made it: the registration found the phone taken.
            409 => {
                assert_error(&registered, 409, "phone_taken");
                assert_eq!(logged_in.1["created"], true, "round {round}");
            }
            other => panic!("round {round}: register answered {other}: {}", registered.1),
        }
    }
    for round in 0..10 {
        let phone = format!("1360003{round:04}");
        let mut tickets = Vec::new();
        for s in [&a, &b] {
            let code = s.send_code(&phone, "register").await;
            let (status, body) = s
                .post(
                    "/api/v1/auth/verify",
                    json!({ "phone": phone, "code": code, "purpose": "register" }),
                )
                .await;
            assert_eq!(status, 200, "{body}");
            tickets.push(body["verification_token"].as_str().unwrap().to_owned());
        }
        let (x, y) = tokio::join!(
            register_with_ticket(&a, &phone, &tickets[0]),
            register_with_ticket(&b, &phone, &tickets[1])
        );
        let mut statuses = [x.0, y.0];
        statuses.sort();
        assert_eq!(statuses, [201, 409], "round {round}: {x:?} {y:?}");
    }
    let (_, metrics) = a.get_text("/metrics").await;
    assert!(metrics.contains("\nsmsauth_users 20\n"), "{metrics}");
}

/// The resend wait, the per-phone and the service's daily caps: the configured limit for
/// the cluster, never one per instance.
#[tokio::test]
async fn send_limits_count_once_across_the_cluster() {
    let extra = "[limits]\nip_per_hour = 0\nphone_per_day = 3\nglobal_per_day = 5\n";
    let Some(c) = cluster(extra) else { return };
    let (a, b) = c.pair().await;
    // The resend wait: A sent, so B must wait.
    assert_eq!(send(&a, "13800004001").await.0, 200);
    let got = send(&b, "13800004001").await;
    assert_error(&got, 429, "rate_limited");
    assert!(got.1["retry_after"].as_u64().unwrap() > 50, "{:?}", got.1);
}

#[tokio::test]
async fn daily_caps_count_once_across_the_cluster() {
    let extra = "[limits]\nip_per_hour = 0\nphone_per_day = 3\nglobal_per_day = 5\n[code]\nresend_interval_secs = 0\n";
    let Some(c) = cluster(extra) else { return };
    let (a, b) = c.pair().await;
    // Per phone: 3 a day, alternating instances.
    for (i, s) in [&a, &b, &a].into_iter().enumerate() {
        assert_eq!(send(s, "13800005001").await.0, 200, "send {i}");
    }
    assert_error(&send(&b, "13800005001").await, 429, "rate_limited");
    assert_error(&send(&a, "13800005001").await, 429, "rate_limited");
    // The service: 5 a day in all; 3 are used.
    assert_eq!(send(&b, "13800005002").await.0, 200);
    assert_eq!(send(&a, "13800005003").await.0, 200);
    assert_error(&send(&b, "13800005004").await, 429, "rate_limited");
    assert_error(&send(&a, "13800005005").await, 429, "rate_limited");
}

/// Wrong tries spread over A and B: the code dies after `max_attempts` in all, and the
/// phone locks after `phone_failures_per_hour` in all.
#[tokio::test]
async fn wrong_tries_count_once_across_the_cluster() {
    let extra = format!("{OPEN}[code]\nmax_attempts = 3\nresend_interval_secs = 0\n");
    let Some(c) = cluster(&extra) else { return };
    let (a, b) = c.pair().await;
    let phone = "13800006001";
    let code = a.send_code(phone, "login").await;
    let wrong = if code == "000000" { "111111" } else { "000000" };
    assert_error(&login(&b, phone, wrong).await, 400, "invalid_code");
    assert_error(&login(&a, phone, wrong).await, 400, "invalid_code");
    assert_error(&login(&b, phone, wrong).await, 429, "too_many_attempts");
    assert_error(&login(&a, phone, &code).await, 429, "too_many_attempts");

    let extra = "[limits]\nip_per_hour = 0\nverify_per_ip_per_minute = 0\nphone_failures_per_hour = 2\n[code]\nmax_attempts = 10\nresend_interval_secs = 0\n";
    let Some(c) = cluster(extra) else { return };
    let (a, b) = c.pair().await;
    let phone = "13800006002";
    let code = b.send_code(phone, "login").await;
    let wrong = if code == "000000" { "111111" } else { "000000" };
    assert_error(&login(&a, phone, wrong).await, 400, "invalid_code");
    assert_error(&login(&b, phone, wrong).await, 400, "invalid_code");
    // Locked for the hour, on both, whatever the code.
    assert_error(&login(&a, phone, &code).await, 429, "too_many_attempts");
    assert_error(&login(&b, phone, &code).await, 429, "too_many_attempts");
}

/// The bug of every multi-instance OTP service: in-memory per-address limiters behind a
/// balancer give an attacker N times the tries. Here one address alternating between A
/// and B gets what one instance allows, no more.
#[tokio::test]
async fn per_address_limits_are_shared() {
    let extra = "[server]\ntrust_proxy = true\n[limits]\nip_per_hour = 4\nverify_per_ip_per_minute = 3\ncaptcha_per_ip_per_minute = 2\nphone_per_day = 0\nglobal_per_day = 0\n";
    let Some(c) = cluster(extra) else { return };
    let (a, b) = c.pair().await;
    let ip = "203.0.113.7";
    let mut sent = Vec::new();
    for i in 0..6 {
        let s = if i % 2 == 0 { &a } else { &b };
        let phone = format!("1380000700{i}");
        sent.push(
            post_from(s, ip, "/api/v1/sms/code", json!({ "phone": phone }))
                .await
                .0,
        );
    }
    assert_eq!(sent, [200, 200, 200, 200, 429, 429], "ip_per_hour = 4");
    // Another address is not held back.
    let other = post_from(
        &b,
        "203.0.113.8",
        "/api/v1/sms/code",
        json!({ "phone": "13800007100" }),
    )
    .await;
    assert_eq!(other.0, 200, "{}", other.1);

    let mut checked = Vec::new();
    for i in 0..5 {
        let s = if i % 2 == 0 { &b } else { &a };
        let body = json!({ "phone": "13800007000", "code": "000000" });
        checked.push(post_from(s, ip, "/api/v1/auth/sms-login", body).await.0);
    }
    assert_eq!(
        checked[3..],
        [429, 429],
        "verify_per_ip_per_minute = 3: {checked:?}"
    );
    assert!(checked[..3].iter().all(|s| *s != 429), "{checked:?}");

    let mut captchas = Vec::new();
    for i in 0..4 {
        let s = if i % 2 == 0 { &a } else { &b };
        captchas.push(post_from(s, ip, "/api/v1/captcha", json!({})).await.0);
    }
    assert_eq!(
        captchas,
        [200, 200, 429, 429],
        "captcha_per_ip_per_minute = 2"
    );
}

/// A captcha made by A is answered at B, once; a ticket from A is used at B, once.
#[tokio::test]
async fn captchas_and_tickets_work_once_on_any_instance() {
    let extra = format!(
        "{OPEN}[captcha]\nrequired = true\n[log]\nlevel = \"info,smsauth::captcha=trace\"\n"
    );
    let Some(c) = cluster(&extra) else { return };
    let (a, b) = c.pair().await;
    let (status, body) = a.post("/api/v1/captcha", json!({})).await;
    assert_eq!(status, 200, "{body}");
    let id = body["captcha_id"].as_str().unwrap().to_owned();
    let made = a.wait_for_log(|l| l["message"] == "captcha made" && l["captcha_id"] == id.as_str());
    let answer = made["answer"].as_str().unwrap();
    let phone = "13800008001";
    let solved = json!({ "phone": phone, "purpose": "register", "captcha_id": id, "captcha_answer": answer });
    let got = b.post("/api/v1/sms/code", solved.clone()).await;
    assert_eq!(got.0, 200, "{}", got.1);
    assert_error(
        &a.post("/api/v1/sms/code", solved.clone()).await,
        400,
        "captcha_invalid",
    );
    assert_error(
        &b.post("/api/v1/sms/code", solved).await,
        400,
        "captcha_invalid",
    );

    let code = b.take_code(&e164(phone));
    let (status, body) = a
        .post(
            "/api/v1/auth/verify",
            json!({ "phone": phone, "code": code, "purpose": "register" }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let ticket = body["verification_token"].as_str().unwrap();
    assert_eq!(register_with_ticket(&b, phone, ticket).await.0, 201);
    assert_error(
        &register_with_ticket(&a, phone, ticket).await,
        400,
        "invalid_code",
    );
    assert_error(
        &register_with_ticket(&b, phone, ticket).await,
        400,
        "invalid_code",
    );
}

/// Logout, a password reset and the admin commands, done through A, are refused at B on
/// the very next request: no cache stands between B and what A ended.
#[tokio::test]
async fn what_one_instance_ends_the_other_refuses_at_once() {
    let extra = format!("{OPEN}[code]\nresend_interval_secs = 0\n");
    let Some(c) = cluster(&extra) else { return };
    let (a, b) = c.pair().await;

    let t = token(&a.sms_login("13800009001").await);
    assert_eq!(me(&b, &t).await, 200);
    let (status, _) = a.post_auth("/api/v1/auth/logout", &t, json!({})).await;
    assert_eq!(status, 204);
    assert_eq!(me(&b, &t).await, 401, "logged out at A");

    let phone = "13800009002";
    let code = a.send_code(phone, "register").await;
    let (status, body) = a
        .post(
            "/api/v1/auth/register",
            json!({ "phone": phone, "code": code, "password": "a long enough password 42" }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let t = token(&body);
    assert_eq!(me(&b, &t).await, 200);
    let code = b.send_code(phone, "reset_password").await;
    let (status, body) = a
        .post(
            "/api/v1/auth/password/reset",
            json!({ "phone": phone, "code": code, "new_password": "another long password 43" }),
        )
        .await;
    assert_eq!(status, 204, "{body}");
    assert_eq!(me(&b, &t).await, 401, "reset at A ends the session at B");

    // The admin commands, run beside A (on the shared database).
    let phone = "13800009003";
    let dir = a.dir();
    let user = |action: &str| ok_stdout(&admin(dir.path(), &["user", action, phone]));
    let t = token(&b.sms_login(phone).await);
    user("disable");
    assert_eq!(me(&b, &t).await, 401, "disabled at A");
    user("enable");
    assert_eq!(me(&b, &t).await, 200, "enabled again at A");
    user("logout");
    assert_eq!(me(&b, &t).await, 401, "logged out everywhere at A");
    let t = token(&b.sms_login(phone).await);
    assert_eq!(me(&b, &t).await, 200);
    user("delete");
    assert_eq!(me(&b, &t).await, 401, "deleted at A");
}

/// Each instance's /metrics is its own, but the user count is the cluster's, and the
/// PostgreSQL pool and statements are shown.
#[tokio::test]
async fn metrics_stay_per_instance_and_count_the_cluster_users() {
    let Some(c) = cluster(OPEN) else { return };
    let (a, b) = c.pair().await;
    a.sms_login("13800010001").await;
    b.sms_login("13800010002").await;
    b.sms_login("13800010003").await;
    for s in [&a, &b] {
        let (_, m) = s.get_text("/metrics").await;
        assert!(m.contains("\nsmsauth_users 3\n"), "{m}");
        assert!(m.contains("\nsmsauth_postgres_pool_max 16\n"), "{m}");
        assert!(
            m.contains("smsauth_postgres_statement_seconds_count{op=\"check_code\"}"),
            "{m}"
        );
    }
    let logins = |m: &str| {
        m.lines()
            .find(|l| l.starts_with("smsauth_logins_total{method=\"sms\"}"))
            .map(|l| l.rsplit(' ').next().unwrap().to_owned())
    };
    let (_, ma) = a.get_text("/metrics").await;
    let (_, mb) = b.get_text("/metrics").await;
    assert_eq!(logins(&ma).as_deref(), Some("1"), "{ma}");
    assert_eq!(logins(&mb).as_deref(), Some("2"), "{mb}");
}
