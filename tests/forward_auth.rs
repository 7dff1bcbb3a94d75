//! Browser sessions and nginx forward auth: GET /api/v1/auth/check with a bearer token or
//! the session cookie, the cookie's attributes, logout clearing it, and the same-origin
//! rule for cookie-authenticated changes (CSRF).

mod common;

use common::TestServer;
use reqwest::header::{HeaderMap, SET_COOKIE};
use serde_json::json;

const COOKIES: &str = "[token]\ncookie = true\n";

async fn check(s: &TestServer, headers: &[(&str, &str)]) -> (u16, HeaderMap) {
    let mut req = s.client.get(s.url("/api/v1/auth/check"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.headers().clone())
}

/// Logs in by code and returns (token, Set-Cookie header if any).
async fn login(s: &TestServer, phone: &str) -> (String, Option<String>) {
    let code = s.send_code(phone, "login").await;
    let resp = s
        .client
        .post(s.url("/api/v1/auth/sms-login"))
        .json(&json!({ "phone": phone, "code": code }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let cookie = resp
        .headers()
        .get(SET_COOKIE)
        .map(|v| v.to_str().unwrap().to_owned());
    let body: serde_json::Value = resp.json().await.unwrap();
    (body["access_token"].as_str().unwrap().to_owned(), cookie)
}

#[tokio::test]
async fn check_answers_204_with_the_user_for_a_bearer_token() {
    let s = TestServer::start("").await;
    let (token, cookie) = login(&s, "13812348001").await;
    assert_eq!(cookie, None, "no cookie unless token.cookie is on");
    let (status, headers) = check(&s, &[("authorization", &format!("Bearer {token}"))]).await;
    assert_eq!(status, 204);
    assert_eq!(headers["x-smsauth-user-id"], "1");
    assert_eq!(headers["x-smsauth-phone"], "+8613812348001");
    assert_eq!(check(&s, &[]).await.0, 401);
    assert_eq!(check(&s, &[("authorization", "Bearer nope")]).await.0, 401);
    // Without cookie mode a cookie counts for nothing.
    assert_eq!(
        check(&s, &[("cookie", &format!("smsauth_session={token}"))])
            .await
            .0,
        401
    );
    assert_eq!(
        s.post_auth("/api/v1/auth/logout", &token, json!({}))
            .await
            .0,
        204
    );
    assert_eq!(
        check(&s, &[("authorization", &format!("Bearer {token}"))])
            .await
            .0,
        401
    );
}

#[tokio::test]
async fn the_session_cookie_is_set_accepted_and_cleared() {
    let s = TestServer::start(COOKIES).await;
    let (token, cookie) = login(&s, "13812348002").await;
    let cookie = cookie.expect("Set-Cookie on the login answer");
    assert_eq!(
        cookie,
        format!("smsauth_session={token}; Path=/; Max-Age=3600; HttpOnly; SameSite=Lax; Secure")
    );
    let jar = format!("other=1; smsauth_session={token}");
    let (status, headers) = check(&s, &[("cookie", &jar)]).await;
    assert_eq!(status, 204);
    assert_eq!(headers["x-smsauth-phone"], "+8613812348002");
    let (status, me) = s
        .send(s.client.get(s.url("/api/v1/me")).header("cookie", &jar))
        .await;
    assert_eq!(
        (status, me["phone"].as_str()),
        (200, Some("+8613812348002"))
    );

    // Logout by cookie from our own page: 204, the cookie cleared, the session over.
    let resp = s
        .client
        .post(s.url("/api/v1/auth/logout"))
        .header("cookie", &jar)
        .header("sec-fetch-site", "same-origin")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(
        resp.headers()[SET_COOKIE],
        "smsauth_session=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax; Secure"
    );
    assert_eq!(check(&s, &[("cookie", &jar)]).await.0, 401);
    assert_eq!(s.get("/api/v1/me", Some(&token)).await.0, 401);
}

#[tokio::test]
async fn cookie_attributes_follow_the_configuration() {
    let s = TestServer::start("[token]\ncookie = true\ncookie_name = \"sid\"\ncookie_domain = \"example.com\"\ncookie_secure = false\n").await;
    let (token, cookie) = login(&s, "13812348003").await;
    assert_eq!(
        cookie.unwrap(),
        format!("sid={token}; Path=/; Max-Age=3600; HttpOnly; SameSite=Lax; Domain=example.com")
    );
    assert_eq!(
        check(&s, &[("cookie", &format!("sid={token}"))]).await.0,
        204
    );
}

#[tokio::test]
async fn cookie_authenticated_changes_must_come_from_the_same_origin() {
    let s = TestServer::start(COOKIES).await;
    let (token, _) = login(&s, "13812348004").await;
    let jar = format!("smsauth_session={token}");
    let host = s.base.trim_start_matches("http://").to_owned();
    let patch = |headers: &[(&str, &str)]| {
        let mut req = s
            .client
            .patch(s.url("/api/v1/me"))
            .header("cookie", &jar)
            .json(&json!({ "nickname": "changed" }));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        s.send(req)
    };
    for refused in [
        vec![],
        vec![("sec-fetch-site", "cross-site")],
        vec![("sec-fetch-site", "same-site")],
        vec![("origin", "https://evil.example")],
        vec![("origin", "null")],
        vec![
            ("sec-fetch-site", "cross-site"),
            ("origin", &format!("http://{host}")),
        ],
    ] {
        let (status, body) = patch(&refused).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (403, Some("forbidden")),
            "{refused:?}"
        );
    }
    let (_, me) = s.get("/api/v1/me", Some(&token)).await;
    assert_eq!(
        me["nickname"], "138****8004",
        "a refused change changed nothing"
    );

    let (status, me) = patch(&[("sec-fetch-site", "same-origin")]).await;
    assert_eq!((status, me["nickname"].as_str()), (200, Some("changed")));
    let (status, _) = patch(&[("origin", &format!("http://{host}"))]).await;
    assert_eq!(
        status, 200,
        "Origin matching Host is our own page in a browser without Sec-Fetch-Site"
    );
    // Reading needs no proof of origin, and a bearer token is not a cookie: no CSRF rule.
    assert_eq!(
        s.send(
            s.client
                .get(s.url("/api/v1/me"))
                .header("cookie", &jar)
                .header("sec-fetch-site", "cross-site")
        )
        .await
        .0,
        200
    );
    let bearer = s
        .client
        .patch(s.url("/api/v1/me"))
        .bearer_auth(&token)
        .header("origin", "https://another-app.example")
        .json(&json!({ "nickname": "by bearer" }));
    assert_eq!(s.send(bearer).await.0, 200);
    // Logout by cookie from another site is refused too (it would be a nuisance attack).
    let logout = s
        .client
        .post(s.url("/api/v1/auth/logout"))
        .header("cookie", &jar)
        .header("sec-fetch-site", "cross-site");
    assert_eq!(s.send(logout).await.0, 403);
    assert_eq!(check(&s, &[("cookie", &jar)]).await.0, 204);
}
