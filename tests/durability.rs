//! A 2xx means it is on disk: users, sessions, logouts and pending codes survive a clean
//! restart and kill -9, also with requests in flight.

mod common;

use std::collections::HashMap;

use common::{TestServer, admin, e164, ok_stdout};
use serde_json::json;

#[tokio::test]
async fn a_restart_keeps_users_sessions_logouts_and_pending_codes() {
    let s = TestServer::start("").await;
    let kept = s.sms_login("13812344001").await;
    let ended = s.sms_login("13812344002").await;
    let ended_token = ended["access_token"].as_str().unwrap().to_owned();
    assert_eq!(
        s.post_auth("/api/v1/auth/logout", &ended_token, json!({}))
            .await
            .0,
        204
    );
    let pending = s.send_code("13812344003", "login").await;

    let s = s.restart().await;

    let (status, me) = s.get("/api/v1/me", kept["access_token"].as_str()).await;
    assert_eq!((status, &me), (200, &kept["user"]));
    assert_eq!(s.get("/api/v1/me", Some(&ended_token)).await.0, 401);
    // The resend interval of the pending code still holds.
    let (status, body) = s
        .post("/api/v1/sms/code", json!({ "phone": "13812344003" }))
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("rate_limited"))
    );
    let (status, body) = s
        .post(
            "/api/v1/auth/sms-login",
            json!({ "phone": "13812344003", "code": pending }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // Ids continue densely after a restart.
    assert_eq!(body["user"]["id"], 3);
}

#[tokio::test]
async fn kill9_right_after_a_send_keeps_the_code() {
    let s = TestServer::start("").await;
    let code = s.send_code("13812344004", "login").await;
    let s = s.kill9_and_restart().await;
    let (status, body) = s
        .post(
            "/api/v1/auth/sms-login",
            json!({ "phone": "13812344004", "code": code }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn kill9_after_a_login_keeps_the_code_used_up() {
    let s = TestServer::start("").await;
    let code = s.send_code("13812344005", "login").await;
    let (status, _) = s
        .post(
            "/api/v1/auth/sms-login",
            json!({ "phone": "13812344005", "code": code }),
        )
        .await;
    assert_eq!(status, 200);
    let s = s.kill9_and_restart().await;
    let (status, body) = s
        .post(
            "/api/v1/auth/sms-login",
            json!({ "phone": "13812344005", "code": code }),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_code"))
    );
}

#[tokio::test]
async fn kill9_with_registrations_in_flight_loses_no_acknowledged_user() {
    const N: usize = 48;
    // All from one address: lift the per-address limits, which are not under test here;
    // and the resend wait, which a shared store (PostgreSQL) keeps across the kill.
    let mut s = TestServer::start(
        "[code]\nresend_interval_secs = 0\n[limits]\nip_per_hour = 0\nverify_per_ip_per_minute = 0\n",
    )
    .await;
    let phones: Vec<String> = (0..N).map(|i| format!("1391234{i:04}")).collect();
    let mut codes = HashMap::new();
    for p in &phones {
        codes.insert(p.clone(), s.send_code(p, "login").await);
    }

    // All logins at once; kill -9 as soon as a third of them have been answered.
    let (answered_tx, mut answered_rx) = tokio::sync::mpsc::unbounded_channel();
    for p in &phones {
        let (client, url) = (s.client.clone(), s.url("/api/v1/auth/sms-login"));
        let (p, code, tx) = (p.clone(), codes[p].clone(), answered_tx.clone());
        tokio::spawn(async move {
            let req = client.post(url).json(&json!({ "phone": p, "code": code }));
            let answer = match req.send().await {
                Ok(resp) if resp.status() == 200 => resp.json::<serde_json::Value>().await.ok(),
                _ => None,
            };
            let _ = tx.send((p, answer));
        });
    }
    drop(answered_tx);
    let mut acknowledged = HashMap::new();
    let mut answered = 0;
    while let Some((phone, answer)) = answered_rx.recv().await {
        answered += 1;
        if let Some(body) = answer {
            acknowledged.insert(phone, body);
        }
        if answered == N / 3 {
            break;
        }
    }
    s.kill9();
    // Answers that raced the kill still count as acknowledged.
    while let Some((phone, answer)) = answered_rx.recv().await {
        if let Some(body) = answer {
            acknowledged.insert(phone, body);
        }
    }
    assert!(
        acknowledged.len() >= N / 3,
        "only {} acknowledged",
        acknowledged.len()
    );

    let s = s.kill9_and_restart().await;
    for (phone, body) in &acknowledged {
        let (status, me) = s.get("/api/v1/me", body["access_token"].as_str()).await;
        assert_eq!(status, 200, "acknowledged user {phone} lost: {me}");
        assert_eq!(me["phone"], e164(phone));
        assert_eq!(me["id"], body["user"]["id"]);
    }
    // Every phone has at most one user: logging each in again finds the same id.
    let mut ids = std::collections::HashSet::new();
    for phone in &phones {
        let (status, body) = s
            .post(
                "/api/v1/auth/sms-login",
                json!({ "phone": phone, "code": codes[phone] }),
            )
            .await;
        let body = if status == 200 {
            body
        } else {
            assert_eq!(body["error"], "invalid_code", "{phone}: {body}");
            s.sms_login(phone).await
        };
        if let Some(before) = acknowledged.get(phone) {
            assert_eq!(body["user"]["id"], before["user"]["id"]);
            assert_eq!(body["created"], false);
        }
        assert!(
            ids.insert(body["user"]["id"].as_u64().unwrap()),
            "two phones share an id"
        );
    }
    // The count was not closed cleanly, so the restart counted users anew: every phone
    // has one, and no half-made create is counted.
    let (_, metrics) = s.get_text("/metrics").await;
    assert!(
        metrics.lines().any(|l| l == format!("smsauth_users {N}")),
        "smsauth_users is not {N}: {metrics}"
    );
}

/// A client that hangs up while its request waits for the store's flush cancels that
/// request, and the flush with it if it was the one running it. The next flush must not
/// start beside the one still running (sled 0.34 can hang for good on that): after a
/// crowd of clients hanging up mid-request, a durable request still gets its answer.
#[tokio::test]
async fn clients_hanging_up_mid_request_do_not_stall_durable_writes() {
    let s = TestServer::start(
        "[code]\nresend_interval_secs = 0\n[limits]\nip_per_hour = 0\nglobal_per_day = 0\n",
    )
    .await;
    let addr = s.url("").trim_start_matches("http://").to_owned();
    let clients: Vec<_> = (0..32u64)
        .map(|c| {
            let addr = addr.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                for i in 0..40u64 {
                    let body = json!({ "phone": format!("138{c:04}{i:04}") }).to_string();
                    let request = format!(
                        "POST /api/v1/sms/code HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
                    tcp.write_all(request.as_bytes()).await.unwrap();
                    // Hang up at once or a moment later: before, during or after a flush.
                    let patience = std::time::Duration::from_micros((c * 131 + i * 37) % 3000);
                    tokio::time::sleep(patience).await;
                    drop(tcp);
                }
            })
        })
        .collect();
    for client in clients {
        client.await.unwrap();
    }
    let login = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        s.sms_login("13900000000"),
    )
    .await
    .expect("a durable request hung after clients hung up mid-request");
    assert_eq!(login["created"], true);
}

/// A start after kill -9 takes the user count from its last checkpoint, not from a count
/// of every user: the users deleted since must come off and those made since must count.
#[tokio::test]
async fn kill9_after_deletions_and_registrations_keeps_the_user_count() {
    let s = TestServer::start("").await;
    for i in 1..=3 {
        s.sms_login(&format!("1381234700{i}")).await;
    }
    // A clean restart, whose start stores a checkpoint of 3 users.
    let s = s.restart().await;
    let dir = s.dir();
    let out = ok_stdout(&admin(dir.path(), &["user", "delete", "13812347001"]));
    assert!(out.contains("deleted"), "{out}");
    s.sms_login("13812347004").await;
    let s = s.kill9_and_restart().await;
    let (_, metrics) = s.get_text("/metrics").await;
    assert!(
        metrics.lines().any(|l| l == "smsauth_users 3"),
        "smsauth_users is not 3: {metrics}"
    );
}
