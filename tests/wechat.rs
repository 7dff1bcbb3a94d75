//! WeChat login over HTTP, against a local stand-in for WeChat's hosts that checks every
//! request as WeChat does: the browser's round trip (start, WeChat's authorize page, the
//! callback), the ticket exchange, binding a phone, linking from a session, and every
//! way it can go wrong.

mod common;

use std::time::{Duration, Instant};

use common::wechat::{WechatMock, WechatUser};
use common::wechat_flow::*;
use common::{TestServer, admin, assert_error, e164, ok_stdout};
use futures::future::join_all;
use serde_json::{Value, json};

#[tokio::test]
async fn a_first_login_binds_a_new_phone_then_wechat_logs_straight_in() {
    let (s, mock) = start("").await;
    let user = WechatUser::new("new");
    let ticket = ticket_for(&s, &mock, &user).await;
    let (status, body) = exchange(&s, &ticket).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["phone_required"], true);
    assert_eq!(body["expires_in"], 600);
    assert_eq!(body["profile"]["nickname"], user.nickname);
    assert_eq!(body["profile"]["avatar_url"], user.headimgurl);
    assert!(
        body.get("access_token").is_none(),
        "no session before a phone is bound"
    );

    let phone = "13800138001";
    let code = s.send_code(phone, "login").await;
    let (status, bound) = bind(&s, body["bind_token"].as_str().unwrap(), phone, &code).await;
    assert_eq!(status, 200, "{bound}");
    assert_eq!(bound["created"], true);
    assert_eq!(bound["user"]["phone"], e164(phone));
    assert_eq!(
        bound["user"]["nickname"], user.nickname,
        "the WeChat nickname"
    );
    assert_eq!(bound["user"]["login_methods"], json!(["sms", "wechat"]));
    assert_eq!(bound["user"]["avatar_url"], user.headimgurl);
    let (status, me) = s.get("/api/v1/me", bound["access_token"].as_str()).await;
    assert_eq!(status, 200);
    assert_eq!(me["login_methods"], json!(["sms", "wechat"]));
    assert_eq!(me["avatar_url"], user.headimgurl);

    // Returning: the scan alone logs in, to the same account.
    let ticket = ticket_for(&s, &mock, &user).await;
    let (status, again) = exchange(&s, &ticket).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["created"], false);
    assert_eq!(again["user"]["id"], bound["user"]["id"]);
    assert!(again["user"]["last_login_at"].is_string());
    assert!(again["access_token"].is_string());
    // And the phone still logs in by SMS, to that account.
    let by_sms = s.sms_login(phone).await;
    assert_eq!(by_sms["user"]["id"], bound["user"]["id"]);

    // WeChat's exchange had every parameter as WeChat wants it.
    let exchanges: Vec<_> = mock
        .requests()
        .into_iter()
        .filter(|r| r.path == "/sns/oauth2/access_token")
        .collect();
    assert_eq!(exchanges.len(), 2);
    assert!(mock.problems().is_empty(), "{:?}", mock.problems());
}

#[tokio::test]
async fn binding_an_existing_phone_adds_wechat_to_its_account() {
    let (s, mock) = start("").await;
    let phone = "13800138002";
    let first = s.sms_login(phone).await;
    let user = WechatUser::new("existing");
    let bound = bind_phone(&s, &mock, &user, phone).await;
    assert_eq!(bound["created"], false);
    assert_eq!(bound["user"]["id"], first["user"]["id"]);
    assert_eq!(bound["user"]["login_methods"], json!(["sms", "wechat"]));
    assert_ne!(
        bound["user"]["nickname"], user.nickname,
        "an existing nickname stays"
    );
    // `smsauth user show` names the binding, its id masked.
    let out = ok_stdout(&admin(s.dir().path(), &["user", "show", phone]));
    let unionid = user.unionid.as_deref().unwrap();
    assert!(out.contains("wechat"), "{out}");
    assert!(!out.contains(unionid), "the WeChat id is masked: {out}");
}

#[tokio::test]
async fn a_wechat_id_binds_one_account_and_an_account_one_wechat_id() {
    let (s, mock) = start("").await;
    let user = WechatUser::new("one");
    // Two bind tokens for the same WeChat user (two tabs), bound to two phones.
    let first = bind_token_for(&s, &mock, &user).await;
    let second = bind_token_for(&s, &mock, &user).await;
    let code = s.send_code("13800138003", "login").await;
    assert_eq!(bind(&s, &first, "13800138003", &code).await.0, 200);
    let code = s.send_code("13800138004", "login").await;
    let taken = bind(&s, &second, "13800138004", &code).await;
    assert_error(&taken, 409, "wechat_taken");
    // The refused bind made no account: the phone's first code login creates it.
    assert_eq!(s.sms_login("13800138004").await["created"], true);

    // Another WeChat user cannot bind a phone whose account has WeChat already.
    let other = WechatUser::new("two");
    let token = bind_token_for(&s, &mock, &other).await;
    let code = s.send_code("13800138003", "login").await;
    assert_error(
        &bind(&s, &token, "13800138003", &code).await,
        409,
        "wechat_already_bound",
    );
}

#[tokio::test]
async fn racing_binds_of_one_wechat_id_let_exactly_one_through() {
    let (s, mock) = start("[limits]\nverify_per_ip_per_minute = 0\n").await;
    let user = WechatUser::new("race");
    let mut attempts = Vec::new();
    for i in 0..4 {
        let phone = format!("1380013810{i}");
        let token = bind_token_for(&s, &mock, &user).await;
        let code = s.send_code(&phone, "login").await;
        attempts.push((token, phone, code));
    }
    let results = join_all(attempts.iter().map(|(t, p, c)| bind(&s, t, p, c))).await;
    let won: Vec<_> = results.iter().filter(|r| r.0 == 200).collect();
    assert_eq!(won.len(), 1, "{results:?}");
    for r in results.iter().filter(|r| r.0 != 200) {
        assert_error(r, 409, "wechat_taken");
    }
    // One ticket exchanged at once by many: one exchange.
    let ticket = ticket_for(&s, &mock, &user).await;
    let results = join_all((0..6).map(|_| exchange(&s, &ticket))).await;
    assert_eq!(
        results.iter().filter(|r| r.0 == 200).count(),
        1,
        "{results:?}"
    );
}

#[tokio::test]
async fn linking_and_unlinking_from_a_session() {
    let (s, mock) = start("").await;
    let phone = "13800138005";
    let login = s.sms_login(phone).await;
    let token = login["access_token"].as_str().unwrap();
    let user = WechatUser::new("link");
    mock.scanner(&user);

    let link = start_link(&s, token, Some("/account")).await;
    let back = at_wechat(&s, &link.authorize).await;
    assert_eq!(
        callback(&back, Some(&link.cookie)).await,
        "/account#wechat_linked=1"
    );
    let (_, me) = s.get("/api/v1/me", Some(token)).await;
    assert_eq!(me["login_methods"], json!(["sms", "wechat"]));
    assert_eq!(me["avatar_url"], user.headimgurl);
    // The scan now logs in to that account.
    let (_, answer) = exchange(&s, &ticket_for(&s, &mock, &user).await).await;
    assert_eq!(answer["user"]["id"], login["user"]["id"]);

    // A WeChat user bound elsewhere cannot be linked here.
    let elsewhere = WechatUser::new("elsewhere");
    bind_phone(&s, &mock, &elsewhere, "13800138006").await;
    let other = s.sms_login("13800138007").await;
    mock.scanner(&elsewhere);
    let link = start_link(&s, other["access_token"].as_str().unwrap(), None).await;
    let back = at_wechat(&s, &link.authorize).await;
    assert_eq!(
        callback(&back, Some(&link.cookie)).await,
        "/#wechat_error=wechat_taken"
    );

    // Unlinking: 204, WeChat and its avatar gone, and the scan asks for a phone again.
    let resp = s
        .client
        .delete(s.url("/api/v1/me/wechat"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let (_, me) = s.get("/api/v1/me", Some(token)).await;
    assert_eq!(me["login_methods"], json!(["sms"]));
    assert_eq!(me["avatar_url"], Value::Null);
    let (_, answer) = exchange(&s, &ticket_for(&s, &mock, &user).await).await;
    assert_eq!(answer["phone_required"], true, "{answer}");
    // Linking needs a session, and one that lasts until WeChat sends the browser back.
    let (status, _) = s.post("/api/v1/me/wechat", json!({})).await;
    assert_eq!(status, 401);
    let link = start_link(&s, token, None).await;
    let back = at_wechat(&s, &link.authorize).await;
    let resp = s
        .client
        .post(s.url("/api/v1/auth/logout"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(
        callback(&back, Some(&link.cookie)).await,
        "/#wechat_error=unauthorized"
    );
    let (_, me) = s
        .get("/api/v1/me", Some(by_sms(&s, phone).await.as_str()))
        .await;
    assert_eq!(me["login_methods"], json!(["sms"]), "nothing was linked");
}

async fn by_sms(s: &TestServer, phone: &str) -> String {
    s.sms_login(phone).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn the_official_account_flow_uses_its_own_page_and_scope() {
    let mock = WechatMock::start(APP_ID, APP_SECRET).await;
    mock.expect_redirect_uri(REDIRECT_URI);
    let config = wechat_config(&mock, "").replace("[wechat]\n", "[wechat]\nflow = \"oauth2\"\n");
    let s = TestServer::start(&config).await;
    let user = WechatUser::new("oauth2");
    mock.scanner(&user);
    let started = start_login(&s, "/").await;
    assert!(
        started.authorize.contains("/connect/oauth2/authorize?"),
        "{}",
        started.authorize
    );
    assert!(
        started.authorize.contains("scope=snsapi_userinfo"),
        "{}",
        started.authorize
    );
    let back = at_wechat(&s, &started.authorize).await;
    let landed = callback(&back, Some(&started.cookie)).await;
    assert!(fragment(&landed, "wechat_ticket").is_some(), "{landed}");
    assert!(mock.problems().is_empty(), "{:?}", mock.problems());
}

#[tokio::test]
async fn a_state_forged_reused_or_from_another_browser_is_refused() {
    let (s, mock) = start("").await;
    let user = WechatUser::new("state");
    mock.scanner(&user);
    let refused = "/#wechat_error=wechat_state_invalid";

    // Another browser (no cookie), or one with another login's cookie.
    let started = start_login(&s, "/").await;
    let back = at_wechat(&s, &started.authorize).await;
    assert_eq!(callback(&back, None).await, refused);
    let other = start_login(&s, "/").await;
    assert_eq!(callback(&back, Some(&other.cookie)).await, refused);
    // A state we never gave out, even with a cookie to match.
    let forged = back.replace(&started.cookie, "0123456789abcdef0123456789abcdef");
    assert_eq!(
        callback(&forged, Some("0123456789abcdef0123456789abcdef")).await,
        refused
    );
    // None of these reached WeChat's API.
    assert_eq!(mock.count("/sns/oauth2/access_token"), 0);

    // The right browser: once, and not again.
    let ok = callback(&back, Some(&started.cookie)).await;
    assert!(fragment(&ok, "wechat_ticket").is_some(), "{ok}");
    assert_eq!(callback(&back, Some(&started.cookie)).await, refused);
    // And no state in the URL at all.
    let bare = s.url("/api/v1/auth/wechat/callback?code=abc");
    assert_eq!(callback(&bare, Some(&started.cookie)).await, refused);
}

#[tokio::test]
async fn next_only_ever_leads_to_a_path_on_this_site() {
    let (s, mock) = start("").await;
    let user = WechatUser::new("next");
    let good = scan(&s, &mock, &user, "/app/welcome?tab=2").await;
    assert!(
        good.starts_with("/app/welcome?tab=2#wechat_ticket="),
        "{good}"
    );
    for bad in [
        "https://evil.example/",
        "//evil.example/",
        "/\\evil.example",
        "evil.example",
        "javascript:alert(1)",
        "/ spaced",
    ] {
        mock.refuse_next(); // the user refuses: the quickest way back to `next`
        let started = start_login(&s, bad).await;
        let back = at_wechat(&s, &started.authorize).await;
        assert_eq!(
            callback(&back, Some(&started.cookie)).await,
            "/#wechat_error=wechat_denied",
            "next = {bad:?}"
        );
    }
}

#[tokio::test]
async fn each_wechat_error_is_told_apart() {
    let (s, mock) = start("").await;
    let user = WechatUser::new("errors");
    mock.scanner(&user);
    // The callback with a code of our choosing, in the right browser.
    let with_code = async |code: &str| {
        let started = start_login(&s, "/").await;
        let back = at_wechat(&s, &started.authorize).await;
        let state = back.split("state=").nth(1).unwrap().to_owned();
        let url = s.url(&format!(
            "/api/v1/auth/wechat/callback?code={code}&state={state}"
        ));
        callback(&url, Some(&started.cookie)).await
    };
    let invalid = "/#wechat_error=wechat_code_invalid";
    let failed = "/#wechat_error=wechat_failed";
    // 40029: a code WeChat never gave.
    assert_eq!(with_code("not-a-code").await, invalid);
    // 40163: a code used once already.
    let code = mock.issue_code(&user);
    assert!(fragment(&with_code(&code).await, "wechat_ticket").is_some());
    assert_eq!(with_code(&code).await, invalid);
    // 42003: a code older than five minutes.
    let code = mock.issue_code(&user);
    mock.age_codes(301);
    assert_eq!(with_code(&code).await, invalid);
    // -1 (busy) once is tried again; twice is a failure.
    mock.fail_token(-1, 1);
    assert!(fragment(&with_code(&mock.issue_code(&user)).await, "wechat_ticket").is_some());
    mock.fail_token(-1, 2);
    assert_eq!(with_code(&mock.issue_code(&user)).await, failed);
    // 40013 and 40125: our own configuration, logged as such, naming the key.
    mock.fail_token(40013, 1);
    assert_eq!(with_code(&mock.issue_code(&user)).await, failed);
    s.wait_for_log(|l| {
        l["level"] == "ERROR"
            && l["problem"]
                .as_str()
                .is_some_and(|p| p.contains("wechat.app_id"))
    });
    mock.fail_token(40125, 1);
    assert_eq!(with_code(&mock.issue_code(&user)).await, failed);
    s.wait_for_log(|l| {
        l["level"] == "ERROR"
            && l["problem"]
                .as_str()
                .is_some_and(|p| p.contains("wechat.app_secret"))
    });
    // The user refused: no code at all.
    mock.refuse_next();
    let started = start_login(&s, "/").await;
    let back = at_wechat(&s, &started.authorize).await;
    assert_eq!(
        callback(&back, Some(&started.cookie)).await,
        "/#wechat_error=wechat_denied"
    );
}

#[tokio::test]
async fn a_wechat_user_without_unionid_is_refused_when_unionid_identifies() {
    let (s, mock) = start("").await;
    let mut user = WechatUser::new("nounion");
    user.unionid = None;
    let back = scan(&s, &mock, &user, "/").await;
    assert_eq!(back, "/#wechat_error=wechat_failed");
    s.wait_for_log(|l| {
        l["problem"]
            .as_str()
            .is_some_and(|p| p.contains("wechat.identity"))
    });

    // With identity = "openid" the same user logs in.
    let mock = WechatMock::start(APP_ID, APP_SECRET).await;
    let s = TestServer::start(
        &wechat_config(&mock, "").replace("[wechat]\n", "[wechat]\nidentity = \"openid\"\n"),
    )
    .await;
    let back = scan(&s, &mock, &user, "/").await;
    assert!(fragment(&back, "wechat_ticket").is_some(), "{back}");
}

#[tokio::test]
async fn wechat_down_or_hanging_fails_within_the_timeout() {
    let (s, mock) = start("").await;
    let user = WechatUser::new("slow");
    mock.hang_token(Duration::from_secs(30));
    let began = Instant::now();
    assert_eq!(
        scan(&s, &mock, &user, "/").await,
        "/#wechat_error=wechat_failed"
    );
    // Within wechat.timeout_secs (plus the round trips of the test itself), not after
    // WeChat's 30 s.
    assert!(
        began.elapsed() < Duration::from_secs(TIMEOUT_SECS + 5),
        "{:?}",
        began.elapsed()
    );
    mock.hang_token(Duration::ZERO);
    mock.hang_userinfo(Duration::from_secs(30));
    let began = Instant::now();
    assert_eq!(
        scan(&s, &mock, &user, "/").await,
        "/#wechat_error=wechat_failed"
    );
    assert!(began.elapsed() < Duration::from_secs(TIMEOUT_SECS + 5));
    mock.hang_userinfo(Duration::ZERO);

    // WeChat's API unreachable: the start still works (it only builds a URL); the
    // callback fails cleanly.
    let started = start_login(&s, "/").await;
    let back = at_wechat(&s, &started.authorize).await;
    mock.stop();
    assert_eq!(
        callback(&back, Some(&started.cookie)).await,
        "/#wechat_error=wechat_failed"
    );
}

#[tokio::test]
async fn tickets_and_bind_tokens_work_once() {
    let (s, mock) = start("").await;
    let user = WechatUser::new("once");
    let ticket = ticket_for(&s, &mock, &user).await;
    let (status, body) = exchange(&s, &ticket).await;
    assert_eq!(status, 200);
    assert_error(&exchange(&s, &ticket).await, 400, "invalid_request");
    assert_error(&exchange(&s, "made-up").await, 400, "invalid_request");
    assert_error(
        &exchange(&s, &"x".repeat(5000)).await,
        400,
        "invalid_request",
    );

    let token = body["bind_token"].as_str().unwrap();
    let phone = "13800138008";
    // A wrong code leaves the bind token for the next try.
    s.send_code(phone, "login").await;
    assert_error(&bind(&s, token, phone, "000000").await, 400, "invalid_code");
    let code = s.send_code(phone, "login").await;
    assert_eq!(bind(&s, token, phone, &code).await.0, 200);
    let code = s.send_code(phone, "login").await;
    assert_error(&bind(&s, token, phone, &code).await, 400, "invalid_request");
    // Bad input is a clear 400.
    let (status, body) = s
        .post(
            "/api/v1/auth/wechat/bind",
            json!({ "bind_token": 1, "phone": [], "code": null }),
        )
        .await;
    assert_error(&(status, body), 400, "invalid_request");
    assert_error(
        &bind(&s, token, "not a phone", "123456").await,
        400,
        "invalid_phone",
    );
}

#[tokio::test]
async fn a_disabled_account_cannot_log_in_with_wechat() {
    let (s, mock) = start("").await;
    let user = WechatUser::new("disabled");
    let phone = "13800138009";
    bind_phone(&s, &mock, &user, phone).await;
    ok_stdout(&admin(s.dir().path(), &["user", "disable", phone]));
    let (status, body) = exchange(&s, &ticket_for(&s, &mock, &user).await).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("unauthorized")),
        "{body}"
    );
}

#[tokio::test]
async fn exchange_and_bind_count_toward_the_check_limit() {
    let (s, _mock) = start("[limits]\nverify_per_ip_per_minute = 3\n").await;
    for _ in 0..3 {
        assert_error(&exchange(&s, "nope").await, 400, "invalid_request");
    }
    assert_error(&exchange(&s, "nope").await, 429, "rate_limited");
    assert_error(
        &bind(&s, "nope", "13800138010", "123456").await,
        429,
        "rate_limited",
    );
}

#[tokio::test]
async fn no_secret_token_or_full_wechat_id_reaches_the_log() {
    let (s, mock) = start("[log]\nlevel = \"trace\"\n").await;
    let user = WechatUser::new("secret");
    let ticket = ticket_for(&s, &mock, &user).await;
    let (_, body) = exchange(&s, &ticket).await;
    let bind_token = body["bind_token"].as_str().unwrap().to_owned();
    let code = s.send_code("13800138011", "login").await;
    assert_eq!(bind(&s, &bind_token, "13800138011", &code).await.0, 200);
    let (_, again) = exchange(&s, &ticket_for(&s, &mock, &user).await).await;
    assert!(again["access_token"].is_string());
    s.wait_for_log(|l| l["message"] == "wechat login");
    let access_tokens: Vec<String> = mock
        .requests()
        .iter()
        .filter_map(|r| r.param("access_token").map(str::to_owned))
        .collect();
    assert!(!access_tokens.is_empty());
    let log = serde_json::to_string(&s.log_lines()).unwrap();
    let mut secrets = vec![
        APP_SECRET.to_owned(),
        user.openid.clone(),
        user.unionid.clone().unwrap(),
        ticket,
        bind_token,
    ];
    secrets.extend(access_tokens);
    for secret in secrets {
        if let Some(at) = log.find(&secret) {
            panic!(
                "{secret} is in the log: …{}…",
                &log[at.saturating_sub(300)..at + 100]
            );
        }
    }
}

#[tokio::test]
async fn with_wechat_off_every_route_is_not_found() {
    let s = TestServer::start("").await;
    let routes = [
        ("GET", "/api/v1/auth/wechat/start?next=/"),
        ("GET", "/api/v1/auth/wechat/callback?code=a&state=b"),
        ("POST", "/api/v1/auth/wechat/exchange"),
        ("POST", "/api/v1/auth/wechat/bind"),
        ("POST", "/api/v1/me/wechat"),
        ("DELETE", "/api/v1/me/wechat"),
    ];
    for (method, path) in routes {
        let req = s
            .client
            .request(method.parse().unwrap(), s.url(path))
            .json(&json!({}));
        let got = s.send(req).await;
        assert_error(&got, 404, "not_found");
    }
}

#[test]
fn enabling_wechat_without_its_keys_stops_start_up_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (config, key) in [
        (
            "[wechat]\nenabled = true\napp_secret = \"s\"\nredirect_uri = \"https://a.example/cb\"\n",
            "wechat.app_id",
        ),
        (
            "[wechat]\nenabled = true\napp_id = \"wx\"\nredirect_uri = \"https://a.example/cb\"\n",
            "wechat.app_secret",
        ),
        (
            "[wechat]\nenabled = true\napp_id = \"wx\"\napp_secret = \"s\"\n",
            "wechat.redirect_uri",
        ),
    ] {
        let path = dir.path().join("smsauth.toml");
        std::fs::write(&path, config).unwrap();
        let out = common::run_cli(
            &["serve", "--config", path.to_str().unwrap()],
            &[(
                "SMSAUTH_STORAGE__DATA_DIR",
                dir.path().join("data").to_str().unwrap(),
            )],
            dir.path(),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(key), "{stderr}");
    }
}

/// A cluster of two instances on one PostgreSQL, with WeChat on. None (the test skips)
/// where PostgreSQL is not installed and REQUIRE_POSTGRES_TESTS is unset.
async fn cluster_pair() -> Option<(common::cluster::Cluster, TestServer, TestServer, WechatMock)> {
    let mock = WechatMock::start(APP_ID, APP_SECRET).await;
    mock.expect_redirect_uri(REDIRECT_URI);
    let Some(c) = common::cluster::Cluster::new(&wechat_config(&mock, "")) else {
        eprintln!("skipped: no PostgreSQL to run a cluster on");
        return None;
    };
    let (a, b) = c.pair().await;
    Some((c, a, b, mock))
}

#[tokio::test]
async fn the_whole_flow_hops_between_two_instances_of_a_cluster() {
    let Some((c, a, b, mock)) = cluster_pair().await else {
        return;
    };
    let user = WechatUser::new("cluster");
    mock.scanner(&user);
    // Started on A, WeChat sends the browser back to B.
    let started = start_login(&a, "/").await;
    let back = at_wechat(&b, &started.authorize).await;
    let landed = callback(&back, Some(&started.cookie)).await;
    let ticket = fragment(&landed, "wechat_ticket").unwrap().to_owned();
    // The ticket exchanged on A, once for the cluster.
    let (status, body) = exchange(&a, &ticket).await;
    assert_eq!(
        (status, &body["phone_required"]),
        (200, &json!(true)),
        "{body}"
    );
    assert_error(&exchange(&b, &ticket).await, 400, "invalid_request");
    // Bound on B with a code sent by A.
    let phone = "13800138020";
    let code = a.send_code(phone, "login").await;
    let (status, bound) = bind(&b, body["bind_token"].as_str().unwrap(), phone, &code).await;
    assert_eq!((status, &bound["created"]), (200, &json!(true)), "{bound}");
    // Returning: the scan on B, the exchange on A.
    mock.scanner(&user);
    let started = start_login(&b, "/").await;
    let back = at_wechat(&a, &started.authorize).await;
    let ticket = fragment(
        &callback(&back, Some(&started.cookie)).await,
        "wechat_ticket",
    )
    .unwrap()
    .to_owned();
    let (_, login) = exchange(&a, &ticket).await;
    assert_eq!(login["user"]["id"], bound["user"]["id"]);

    // Racing binds of one WeChat user to two phones, one on each instance.
    let racer = WechatUser::new("racer");
    let ta = bind_token_for(&a, &mock, &racer).await;
    let tb = bind_token_for(&b, &mock, &racer).await;
    let (ca, cb) = (
        a.send_code("13800138021", "login").await,
        b.send_code("13800138022", "login").await,
    );
    let (ra, rb) = tokio::join!(
        bind(&a, &ta, "13800138021", &ca),
        bind(&b, &tb, "13800138022", &cb)
    );
    let mut statuses = [ra.0, rb.0];
    statuses.sort();
    assert_eq!(statuses, [200, 409], "{ra:?} {rb:?}");

    // A link started on B from a session, its callback on A; the unlink on A.
    let other = WechatUser::new("linked");
    let session = b.sms_login("13800138023").await;
    let token = session["access_token"].as_str().unwrap();
    mock.scanner(&other);
    let link = start_link(&b, token, None).await;
    let back = at_wechat(&a, &link.authorize).await;
    assert_eq!(
        callback(&back, Some(&link.cookie)).await,
        "/#wechat_linked=1"
    );
    let (_, me) = a.get("/api/v1/me", Some(token)).await;
    assert_eq!(me["login_methods"], json!(["sms", "wechat"]));

    // Grants expire for every instance: a ticket made old in the database is refused.
    let ticket = ticket_for(&a, &mock, &other).await;
    c.pg.psql("smsauth", "UPDATE grants SET expires_at = expires_at - 61");
    assert_error(&exchange(&b, &ticket).await, 400, "invalid_request");
}

#[tokio::test]
async fn a_database_of_schema_1_is_migrated_and_its_accounts_bind_wechat() {
    let mock = WechatMock::start(APP_ID, APP_SECRET).await;
    let Some(c) = common::cluster::Cluster::new(&wechat_config(&mock, "")) else {
        eprintln!("skipped: no PostgreSQL");
        return;
    };
    // The previous release's schema and one of its accounts, as the application's role.
    let schema_1 = include_str!("../src/store/postgres/schema_1.sql");
    c.pg.psql_url(
        &c.url,
        &format!(
            "{schema_1}\nCREATE TABLE smsauth_schema (version integer NOT NULL);\n\
             INSERT INTO smsauth_schema VALUES (1);\n\
             INSERT INTO users (phone, nickname, created_at) VALUES ('+8613800138030', 'old', 1);"
        ),
    );
    let a = c.instance().await;
    assert_eq!(
        c.pg.psql("smsauth", "SELECT version FROM smsauth_schema"),
        "6",
        "migrated through every script to this release's schema"
    );
    let user = WechatUser::new("upgrade");
    let bound = bind_phone(&a, &mock, &user, "13800138030").await;
    assert_eq!(
        (
            bound["created"].as_bool(),
            bound["user"]["nickname"].as_str()
        ),
        (Some(false), Some("old"))
    );
    assert_eq!(bound["user"]["login_methods"], json!(["sms", "wechat"]));
}

#[tokio::test]
async fn a_backup_carries_the_wechat_bindings() {
    let (s, mock) = start("").await;
    let user = WechatUser::new("backup");
    let bound = bind_phone(&s, &mock, &user, "13800138040").await;
    // A shared store's key is a file of its own, never in the backup: kept for the restore.
    let phone_key = std::fs::read(common::phone_key_file(s.dir().path())).unwrap();
    let kept = tempfile::tempdir().unwrap();
    let file = kept.path().join("smsauth.backup");
    ok_stdout(&admin(
        s.dir().path(),
        &["backup", "--include-keys", file.to_str().unwrap()],
    ));
    drop(s);

    let target = std::sync::Arc::new(tempfile::tempdir().unwrap());
    if common::engine() == "postgres" {
        std::fs::write(common::phone_key_file(target.path()), &phone_key).unwrap();
    }
    ok_stdout(&admin(target.path(), &["restore", file.to_str().unwrap()]));
    let restored = TestServer::start_in(target, &wechat_config(&mock, "")).await;
    let (status, login) = exchange(&restored, &ticket_for(&restored, &mock, &user).await).await;
    assert_eq!(status, 200, "{login}");
    assert_eq!(login["user"]["id"], bound["user"]["id"]);
    assert_eq!(login["user"]["login_methods"], json!(["sms", "wechat"]));
    assert_eq!(login["user"]["avatar_url"], user.headimgurl);
    // The id stays taken for every other phone.
    let token = bind_token_for(&restored, &mock, &WechatUser::new("other")).await;
    let code = restored.send_code("13800138040", "login").await;
    assert_error(
        &bind(&restored, &token, "13800138040", &code).await,
        409,
        "wechat_already_bound",
    );
}
