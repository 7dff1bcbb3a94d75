//! Verification-code rules over HTTP: binding to phone and purpose, single use under
//! concurrency, attempts, replacement, resend interval, expiry.

mod common;

use common::TestServer;
use serde_json::json;

async fn login(s: &TestServer, phone: &str, code: &str) -> (u16, serde_json::Value) {
    s.post(
        "/api/v1/auth/sms-login",
        json!({ "phone": phone, "code": code }),
    )
    .await
}

#[tokio::test]
async fn a_code_is_bound_to_its_phone_and_purpose() {
    let s = TestServer::start("").await;
    let code = s.send_code("13812341001", "register").await;
    // Not a login code, and not for another phone.
    let (status, body) = login(&s, "13812341001", &code).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_code"))
    );
    let (status, _) = s
        .post(
            "/api/v1/auth/verify",
            json!({ "phone": "13812341002", "code": code, "purpose": "register" }),
        )
        .await;
    assert_eq!(status, 400);
    // Still good for its own phone and purpose (the wrong tries above were its first two).
    let (status, _) = s
        .post(
            "/api/v1/auth/verify",
            json!({ "phone": "13812341001", "code": code, "purpose": "register" }),
        )
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn of_many_concurrent_tries_with_the_right_code_exactly_one_wins() {
    let s = TestServer::start("").await;
    let code = s.send_code("13812341003", "login").await;
    let tries = (0..16).map(|_| login(&s, "13812341003", &code));
    let results = futures::future::join_all(tries).await;
    let wins = results.iter().filter(|(status, _)| *status == 200).count();
    assert_eq!(wins, 1, "{results:?}");
    assert!(
        results
            .iter()
            .all(|(status, body)| *status == 200 || body["error"] == "invalid_code")
    );
}

#[tokio::test]
async fn wrong_tries_kill_the_code() {
    let s = TestServer::start("").await;
    let code = s.send_code("13812341004", "login").await;
    let wrong = if code == "000000" { "111111" } else { "000000" };
    for _ in 0..4 {
        let (status, body) = login(&s, "13812341004", wrong).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("invalid_code"))
        );
    }
    let (status, body) = login(&s, "13812341004", wrong).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("too_many_attempts")),
        "{body}"
    );
    assert!(body["retry_after"].as_u64().unwrap() > 0);
    // Dead: even the right code no longer works.
    let (status, body) = login(&s, "13812341004", &code).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("too_many_attempts"))
    );
}

#[tokio::test]
async fn malformed_codes_do_not_spend_attempts() {
    let s = TestServer::start("[code]\nmax_attempts = 1\n").await;
    let code = s.send_code("13812341005", "login").await;
    for bad in ["", "12345", "1234567", "abcdef", "１２３４５６"] {
        let (status, body) = login(&s, "13812341005", bad).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("invalid_code")),
            "{bad}"
        );
    }
    assert_eq!(login(&s, "13812341005", &code).await.0, 200);
}

#[tokio::test]
async fn a_new_code_replaces_the_old_one() {
    let s = TestServer::start("[code]\nresend_interval_secs = 0\n").await;
    let old = s.send_code("13812341006", "login").await;
    let new = s.send_code("13812341006", "login").await;
    if old != new {
        assert_eq!(login(&s, "13812341006", &old).await.0, 400);
    }
    assert_eq!(login(&s, "13812341006", &new).await.0, 200);
}

#[tokio::test]
async fn resend_interval_answers_429_with_retry_after() {
    let s = TestServer::start("").await;
    s.send_code("13812341007", "login").await;
    // The other way of writing the number is the same phone.
    let resp = s
        .client
        .post(s.url("/api/v1/sms/code"))
        .json(&json!({ "phone": "+86 138 1234 1007", "purpose": "reset_password" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    let header: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "rate_limited");
    assert_eq!(body["retry_after"].as_u64(), Some(header));
    assert!((1..=60).contains(&header));
    // Another phone is not affected.
    s.send_code("13812341008", "login").await;
}

#[tokio::test]
async fn an_expired_code_is_refused() {
    let s = TestServer::start("[code]\nttl_secs = 1\n").await;
    let code = s.send_code("13812341009", "login").await;
    // Expiry is the condition itself: let the clock pass it.
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let (status, body) = login(&s, "13812341009", &code).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_code"))
    );
}

#[tokio::test]
async fn codes_are_never_written_in_plain_text() {
    let s = TestServer::start("[code]\nttl_secs = 3600\n").await;
    let code = s.send_code("13812341010", "login").await;
    // The code's digits appear in no file of the data dir (only its keyed hash does).
    let mut stack = vec![s.data_dir()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.is_file() {
                // (not admin.sock: a socket has no content to read)
                let bytes = std::fs::read(&path).unwrap();
                assert!(
                    !bytes.windows(6).any(|w| w == code.as_bytes()),
                    "{} holds the code",
                    path.display()
                );
            }
        }
    }
    // Nor in any table, on PostgreSQL.
    if common::engine() == "postgres" {
        let tables = common::postgres_tables(s.dir().path());
        assert!(!tables.is_empty(), "the engine made no tables");
        for (table, rows) in tables {
            assert!(!rows.contains(code.as_str()), "{table} holds the code");
        }
    }
}
