//! Session tokens: HS256 pinned; forged, tampered, expired and foreign tokens are refused.

mod common;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use common::TestServer;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const SECRET: &str = "test-secret-that-is-at-least-32-bytes-long";

fn parts(token: &str) -> (Value, Value, String) {
    let mut it = token.split('.');
    let header = serde_json::from_slice(&B64.decode(it.next().unwrap()).unwrap()).unwrap();
    let claims = serde_json::from_slice(&B64.decode(it.next().unwrap()).unwrap()).unwrap();
    (header, claims, it.next().unwrap().to_owned())
}

fn join(header: &Value, claims: &Value, sig: &str) -> String {
    format!(
        "{}.{}.{sig}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    )
}

async fn me_status(s: &TestServer, token: &str) -> u16 {
    let (status, body) = s.get("/api/v1/me", Some(token)).await;
    if status == 401 {
        assert_eq!(body["error"], "unauthorized");
    }
    status
}

#[tokio::test]
async fn forged_and_tampered_tokens_are_refused() {
    let s = TestServer::start(&format!(
        "[token]\nsecret = \"{SECRET}\"\n[code]\nresend_interval_secs = 0\n"
    ))
    .await;
    let victim = s.sms_login("13812343001").await;
    let attacker = s.sms_login("13812343002").await;
    let token = attacker["access_token"].as_str().unwrap();
    assert_eq!(me_status(&s, token).await, 200);
    let (header, claims, sig) = parts(token);

    // The attacker's signature on the victim's id.
    let mut as_victim = claims.clone();
    as_victim["sub"] = victim["user"]["id"].to_string().into();
    assert_eq!(me_status(&s, &join(&header, &as_victim, &sig)).await, 401);

    // alg none, with and without a signature.
    let none = json!({ "alg": "none", "typ": "JWT" });
    assert_eq!(me_status(&s, &join(&none, &as_victim, "")).await, 401);
    assert_eq!(me_status(&s, &join(&none, &claims, &sig)).await, 401);

    // Right key, other algorithm.
    let hs512 = jsonwebtoken::encode(
        &Header::new(Algorithm::HS512),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    assert_eq!(me_status(&s, &hs512).await, 401);

    // Right algorithm, other key.
    let other_key = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(b"another-secret-another-secret-another"),
    )
    .unwrap();
    assert_eq!(me_status(&s, &other_key).await, 401);

    // Re-signed with the real key but a later expiry or another issuer: only the
    // real key could do this, so these prove the claims checks, not the signature.
    let sign = |c: &Value| {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            c,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    assert_eq!(
        me_status(&s, &sign(&claims)).await,
        200,
        "control: the same claims, properly signed"
    );
    let mut foreign = claims.clone();
    foreign["iss"] = "someone-else".into();
    assert_eq!(me_status(&s, &sign(&foreign)).await, 401);
    let mut expired = claims.clone();
    expired["exp"] = (claims["iat"].as_i64().unwrap() - 1).into();
    assert_eq!(me_status(&s, &sign(&expired)).await, 401);
    let mut no_jti = claims.clone();
    no_jti.as_object_mut().unwrap().remove("jti");
    assert_eq!(me_status(&s, &sign(&no_jti)).await, 401);
    let mut old_generation = claims.clone();
    old_generation["gen"] = 7.into();
    assert_eq!(me_status(&s, &sign(&old_generation)).await, 401);

    // Truncated and padded.
    assert_eq!(me_status(&s, &token[..token.len() - 2]).await, 401);
    assert_eq!(me_status(&s, &format!("{token}x")).await, 401);
    assert_eq!(me_status(&s, &"a".repeat(10_000)).await, 401);
}

#[tokio::test]
async fn tokens_expire() {
    let s = TestServer::start("[token]\nttl_secs = 1\n").await;
    let login = s.sms_login("13812343003").await;
    let token = login["access_token"].as_str().unwrap();
    assert_eq!(login["expires_in"], 1);
    // Used once while valid, so the server has it among the tokens it checked already:
    // expiry must still apply to those.
    assert_eq!(me_status(&s, token).await, 200);
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    assert_eq!(me_status(&s, token).await, 401);
}

#[tokio::test]
async fn a_token_from_another_issuer_is_refused() {
    let a = TestServer::start(&format!(
        "[token]\nsecret = \"{SECRET}\"\nissuer = \"site-a\"\n"
    ))
    .await;
    let b = TestServer::start(&format!(
        "[token]\nsecret = \"{SECRET}\"\nissuer = \"site-b\"\n"
    ))
    .await;
    let login = a.sms_login("13812343004").await;
    let token = login["access_token"].as_str().unwrap();
    assert_eq!(me_status(&a, token).await, 200);
    assert_eq!(me_status(&b, token).await, 401);
}
