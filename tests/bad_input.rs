//! Whatever a client sends, the answer is a clear 4xx JSON error, the server keeps
//! serving, and nothing stored is harmed.

mod common;

use common::{TestServer, assert_error};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn raw(s: &TestServer, body: &str, content_type: Option<&str>) -> (u16, Value) {
    let mut req = s
        .client
        .post(s.url("/api/v1/sms/code"))
        .body(body.to_owned());
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    s.send(req).await
}

#[tokio::test]
async fn malformed_bodies_get_invalid_request() {
    let s = TestServer::start("").await;
    let json_ct = Some("application/json");
    for body in [
        "",
        "{",
        "null",
        "[]",
        "\"13812345678\"",
        "{\"phone\": 13812345678}",
        "{\"phone\": null}",
        "{\"phone\": [\"13812345678\"]}",
        "{}",
        "{\"phone\":\"13812345678\",\"purpose\":\"admin\"}",
        "{\"phone\":\"13812345678\",\"purpose\":7}",
        "{\"phone\":\"13812345678\",\"phone\":\"13812345679\"}",
        &"[".repeat(10_000),
    ] {
        assert_error(&raw(&s, body, json_ct).await, 400, "invalid_request");
    }
    // Invalid UTF-8 inside a JSON string.
    let req = s
        .client
        .post(s.url("/api/v1/sms/code"))
        .header("content-type", "application/json")
        .body(b"{\"phone\":\"\xff\xfe\"}".to_vec());
    assert_error(&s.send(req).await, 400, "invalid_request");
}

#[tokio::test]
async fn odd_phones_get_invalid_phone() {
    let s = TestServer::start("").await;
    for phone in [
        "",
        " ",
        "1",
        "138123456789",
        "+1 212 555 0100",
        "１３８１２３４５６７８",
        "138\u{202e}12345678",
        "13812345678\u{0}",
        "😀😀😀",
        "+86+8613812345678",
        "0x13812345678",
        &"1".repeat(5000),
    ] {
        let got = s.post("/api/v1/sms/code", json!({ "phone": phone })).await;
        assert_error(&got, 400, "invalid_phone");
    }
}

#[tokio::test]
async fn wrong_content_type_gets_415() {
    let s = TestServer::start("").await;
    let body = r#"{"phone":"13812345678"}"#;
    for ct in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("application/jsonx"),
    ] {
        assert_error(&raw(&s, body, ct).await, 415, "unsupported_media_type");
    }
    // Parameters on the media type are fine.
    assert_eq!(
        raw(&s, body, Some("application/json; charset=utf-8"))
            .await
            .0,
        200
    );
}

#[tokio::test]
async fn bodies_over_the_limit_get_413() {
    let s = TestServer::start("[server]\nmax_body_bytes = 1024\n").await;
    let big = format!(r#"{{"phone":"13812345678","pad":"{}"}}"#, "x".repeat(4096));
    assert_error(
        &raw(&s, &big, Some("application/json")).await,
        413,
        "payload_too_large",
    );

    // Chunked, with no Content-Length to refuse it up front: cut off while reading.
    let addr = s.base.trim_start_matches("http://");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = String::from(
        "POST /api/v1/sms/code HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
    );
    for _ in 0..4 {
        req.push_str(&format!("400\r\n{}\r\n", "x".repeat(1024)));
    }
    req.push_str("0\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("\"payload_too_large\""), "{answer}");
}

#[tokio::test]
async fn unknown_routes_and_wrong_methods() {
    let s = TestServer::start("").await;
    assert_error(&s.get("/nope", None).await, 404, "not_found");
    assert_error(&s.get("/api/v1/sms/code/", None).await, 404, "not_found");
    let resp = s
        .client
        .get(s.url("/api/v1/sms/code"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    assert_eq!(resp.headers()["allow"], "POST");
    let resp = s.client.delete(s.url("/api/v1/me")).send().await.unwrap();
    assert_eq!(resp.status(), 405);
    assert_eq!(resp.headers()["allow"], "GET, PATCH");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "method_not_allowed");
}

#[tokio::test]
async fn garbage_on_the_wire_does_not_hurt_the_server_or_its_data() {
    let s = TestServer::start("").await;
    let login = s.sms_login("13812342001").await;
    let token = login["access_token"].as_str().unwrap().to_owned();
    let addr = s.base.trim_start_matches("http://").to_owned();
    for junk in [
        &b"\x00\x01\x02\r\n\r\n"[..],
        b"GET / HTTP/9.9\r\n\r\n",
        b"POST /api/v1/sms/code HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        &[b'A'; 70_000][..],
    ] {
        let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let _ = tcp.write_all(junk).await;
        let _ = tcp.shutdown().await;
        let mut sink = Vec::new();
        let _ = tcp.read_to_end(&mut sink).await;
        let head = String::from_utf8_lossy(&sink[..sink.len().min(12)]).into_owned();
        assert!(sink.is_empty() || head.starts_with("HTTP/1.1 4"), "{head}");
    }
    let (status, me) = s.get("/api/v1/me", Some(&token)).await;
    assert_eq!(status, 200);
    assert_eq!(me, login["user"]);
    assert_eq!(s.get("/healthz", None).await.0, 200);
}
