//! The code-login flow end to end over HTTP: send code, log in or register, /me, logout.

mod common;

use common::TestServer;
use serde_json::json;

/// For tests that log one phone in more than once.
const NO_RESEND_WAIT: &str = "[code]\nresend_interval_secs = 0\n";

#[tokio::test]
async fn first_login_registers_then_logs_in() {
    let s = TestServer::start(NO_RESEND_WAIT).await;
    let first = s.sms_login("13812340001").await;
    assert_eq!(first["created"], true);
    assert_eq!(first["token_type"], "Bearer");
    assert_eq!(first["expires_in"], 3600, "token.access_ttl_secs");
    let user = &first["user"];
    assert_eq!(user["phone"], "+8613812340001");
    assert_eq!(user["nickname"], "138****0001");
    assert_eq!(user["login_methods"], json!(["sms"]));
    assert!(user["created_at"].as_str().unwrap().ends_with('Z'));

    // The international form is the same phone, so the same user.
    let second = s.sms_login("+8613812340001").await;
    assert_eq!(second["created"], false);
    assert_eq!(second["user"]["id"], user["id"]);
    assert_ne!(second["access_token"], first["access_token"]);
}

#[tokio::test]
async fn me_shows_and_updates_the_account() {
    let s = TestServer::start("").await;
    let login = s.sms_login("13812340002").await;
    let token = login["access_token"].as_str().unwrap();
    let (status, me) = s.get("/api/v1/me", Some(token)).await;
    assert_eq!(status, 200);
    assert_eq!(me, login["user"]);

    let patch = |body| {
        s.client
            .patch(s.url("/api/v1/me"))
            .bearer_auth(token)
            .json(&body)
    };
    let (status, me) = s.send(patch(json!({ "nickname": "  小明 🐱  " }))).await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["nickname"], "小明 🐱");
    let (_, me) = s.get("/api/v1/me", Some(token)).await;
    assert_eq!(me["nickname"], "小明 🐱");

    for bad in [
        json!({ "nickname": "" }),
        json!({ "nickname": "x".repeat(33) }),
        json!({ "nickname": "a\u{0}b" }),
        json!({ "nickname": 5 }),
        json!({ "nick": "x" }),
    ] {
        let (status, body) = s.send(patch(bad.clone())).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("invalid_request")),
            "{bad}"
        );
    }
    let (_, me) = s.get("/api/v1/me", Some(token)).await;
    assert_eq!(me["nickname"], "小明 🐱");
}

#[tokio::test]
async fn logout_ends_only_that_session() {
    let s = TestServer::start(NO_RESEND_WAIT).await;
    let a = s.sms_login("13812340003").await;
    let b = s.sms_login("13812340003").await;
    let (ta, tb) = (
        a["access_token"].as_str().unwrap(),
        b["access_token"].as_str().unwrap(),
    );
    let (status, body) = s.post_auth("/api/v1/auth/logout", ta, json!({})).await;
    assert_eq!(status, 204, "{body}");
    let (status, body) = s.get("/api/v1/me", Some(ta)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("unauthorized"))
    );
    let (status, _) = s.post_auth("/api/v1/auth/logout", ta, json!({})).await;
    assert_eq!(status, 401);
    assert_eq!(s.get("/api/v1/me", Some(tb)).await.0, 200);
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    let s = TestServer::start("").await;
    let login = s.sms_login("13812340005").await;
    let token = login["access_token"].as_str().unwrap();
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let req = s
            .client
            .get(s.url("/api/v1/me"))
            .header("authorization", format!("{scheme} {token}"));
        assert_eq!(s.send(req).await.0, 200, "{scheme}");
    }
}

#[tokio::test]
async fn me_requires_a_token() {
    let s = TestServer::start("").await;
    for auth in [
        None,
        Some("Bearer"),
        Some("Bearer not.a.jwt"),
        Some("Basic dXNlcjpwYXNz"),
    ] {
        let mut req = s.client.get(s.url("/api/v1/me"));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let (status, body) = s.send(req).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("unauthorized")),
            "{auth:?}"
        );
    }
}

#[tokio::test]
async fn verify_gives_a_ticket_and_uses_the_code() {
    let s = TestServer::start("").await;
    let code = s.send_code("13812340004", "register").await;
    let (status, body) = s
        .post(
            "/api/v1/auth/verify",
            json!({ "phone": "13812340004", "code": code, "purpose": "register" }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["expires_in"], 600);
    let ticket = body["verification_token"].as_str().unwrap();
    // A ticket is not a session.
    assert_eq!(s.get("/api/v1/me", Some(ticket)).await.0, 401);
    // The code is used up.
    let (status, body) = s
        .post(
            "/api/v1/auth/verify",
            json!({ "phone": "13812340004", "code": code, "purpose": "register" }),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_code"))
    );
    // A purpose is required and must be known.
    for bad in [
        json!({ "phone": "13812340004", "code": code }),
        json!({ "phone": "13812340004", "code": code, "purpose": "admin" }),
    ] {
        let (status, body) = s.post("/api/v1/auth/verify", bad).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("invalid_request"))
        );
    }
}

#[tokio::test]
async fn healthz_answers_at_the_root() {
    let s = TestServer::start("").await;
    let (status, body) = s.get("/healthz", None).await;
    assert_eq!((status, body), (200, json!({ "status": "ok" })));
    assert_eq!(s.get("/api/v1/healthz", None).await.0, 404);
}
