//! The `webhook` sender against a local receiver that checks every request as a site's
//! own endpoint would: method, JSON body, and the HMAC signature over the raw bytes.

mod common;

use std::time::Duration;

use common::TestServer;
use common::receiver::{Answer, Receiver};
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

const SECRET: &str = "webhook-test-secret";

async fn setup(extra: &str) -> (Receiver, TestServer) {
    let receiver = Receiver::start().await;
    let config = format!(
        "[sms]\nprovider = \"webhook\"\ntimeout_secs = 1\n[sms.webhook]\nurl = \"{}\"\nsecret = \"{SECRET}\"\n{extra}",
        receiver.url("/hooks/sms?token=abc")
    );
    let server = TestServer::start(&config).await;
    (receiver, server)
}

/// Checks one delivery as the receiving site would, and returns its JSON.
fn verified(req: &common::receiver::Received) -> Value {
    assert_eq!(req.method, "POST");
    assert_eq!(req.path_and_query, "/hooks/sms?token=abc");
    assert_eq!(req.headers["content-type"], "application/json");
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(&req.body);
    let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    assert_eq!(req.headers["x-smsauth-signature"], expected.as_str());
    serde_json::from_slice(&req.body).unwrap()
}

#[tokio::test]
async fn delivers_a_signed_code_that_logs_in() {
    let (receiver, s) = setup("").await;
    let (status, body) = s
        .post(
            "/api/v1/sms/code",
            json!({ "phone": "13812345001", "purpose": "login" }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let delivered = verified(&receiver.wait_for(1).await[0]);
    assert_eq!(delivered["phone"], "+8613812345001");
    assert_eq!(delivered["purpose"], "login");
    assert_eq!(delivered["expires_in"], 300);
    let code = delivered["code"].as_str().unwrap();
    assert_eq!(code.len(), 6);
    let (status, body) = s
        .post(
            "/api/v1/auth/sms-login",
            json!({ "phone": "13812345001", "code": code }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // The code itself never reaches the log with a real sender.
    let log = serde_json::to_string(&s.log_lines()).unwrap();
    assert!(!log.contains(code), "the code leaked into the log");
    assert!(
        !log.contains("13812345001"),
        "a full phone number leaked into the log"
    );
    assert!(!log.contains(SECRET));
}

#[tokio::test]
async fn a_failed_send_answers_502_keeps_no_code_and_costs_no_wait() {
    let (receiver, s) = setup("").await;
    // A 5xx is retried (sms.retries = 2): the first send fails for good only after its
    // third 500; a 403 is final at once. However the retries fall within the 1 s budget,
    // the four answers are used up by the two sends and the 403 goes to the second.
    receiver.script([
        Answer::Status(500, "oops".into()),
        Answer::Status(500, "oops".into()),
        Answer::Status(500, "oops".into()),
        Answer::Status(403, "no".into()),
    ]);
    for _ in 0..2 {
        let (status, body) = s
            .post("/api/v1/sms/code", json!({ "phone": "13812345002" }))
            .await;
        assert_eq!(
            (status, body["error"].as_str()),
            (502, Some("sms_failed")),
            "{body}"
        );
        assert!(!body["message"].as_str().unwrap().contains(SECRET));
    }
    let failed = receiver.wait_for(4).await;
    assert_eq!(failed.len(), 4);
    let dead_code = verified(&failed[3])["code"].as_str().unwrap().to_owned();
    // The code that never arrived does not work.
    let (status, _) = s
        .post(
            "/api/v1/auth/sms-login",
            json!({ "phone": "13812345002", "code": dead_code }),
        )
        .await;
    assert_eq!(status, 400);
    // And the failures did not start the resend interval.
    let (status, _) = s
        .post("/api/v1/sms/code", json!({ "phone": "13812345002" }))
        .await;
    assert_eq!(status, 200);
    let code = verified(&receiver.wait_for(5).await[4])["code"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, _) = s
        .post(
            "/api/v1/auth/sms-login",
            json!({ "phone": "13812345002", "code": code }),
        )
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_hung_receiver_times_out_with_502() {
    let (receiver, s) = setup("").await;
    receiver.script([Answer::Delay(Duration::from_secs(5))]);
    let started = std::time::Instant::now();
    let (status, body) = s
        .post("/api/v1/sms/code", json!({ "phone": "13812345003" }))
        .await;
    assert_eq!((status, body["error"].as_str()), (502, Some("sms_failed")));
    // Bounded by sms.timeout_secs (1 s), not by the receiver's 5 s.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn sigterm_lets_a_request_in_flight_finish_then_exits_0() {
    let (receiver, mut s) = setup("").await;
    receiver.script([Answer::Delay(Duration::from_millis(700))]);
    let request = {
        let (client, url) = (s.client.clone(), s.url("/api/v1/sms/code"));
        tokio::spawn(async move {
            client
                .post(url)
                .json(&json!({ "phone": "13812345004" }))
                .send()
                .await
        })
    };
    receiver.wait_for(1).await; // the request is now inside the server, waiting on the sender
    let status = tokio::task::spawn_blocking(move || s.terminate())
        .await
        .unwrap();
    assert!(status.success(), "{status}");
    let resp = request
        .await
        .unwrap()
        .expect("the request in flight got its answer");
    assert_eq!(resp.status(), 200);
}

/// A reset code for a phone without an account sends nothing, but must not answer
/// faster for it: it waits about as long as real sends have been taking.
#[tokio::test]
async fn a_reset_for_an_unknown_phone_takes_as_long_as_a_real_send() {
    let (receiver, s) = setup("[code]\nresend_interval_secs = 0\n").await;
    let slow = || Answer::Delay(Duration::from_millis(300));
    receiver.script([slow(), slow(), slow()]);
    // An account, whose reset code really goes out.
    let (status, _) = s
        .post("/api/v1/sms/code", json!({ "phone": "13812345010" }))
        .await;
    assert_eq!(status, 200);
    let code = verified(&receiver.wait_for(1).await[0])["code"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        s.post(
            "/api/v1/auth/sms-login",
            json!({ "phone": "13812345010", "code": code })
        )
        .await
        .0,
        200
    );
    let timed = |phone: &'static str| {
        let s = &s;
        async move {
            let started = std::time::Instant::now();
            let (status, body) = s
                .post(
                    "/api/v1/sms/code",
                    json!({ "phone": phone, "purpose": "reset_password" }),
                )
                .await;
            (status, body, started.elapsed())
        }
    };
    let (status, known_body, known) = timed("13812345010").await;
    assert_eq!(status, 200);
    let (status, unknown_body, unknown) = timed("13812345011").await;
    assert_eq!((status, &unknown_body), (200, &known_body));
    assert_eq!(
        receiver.received().len(),
        2,
        "nothing was sent for the unknown phone"
    );
    // Jitter is +-20 %; a nothing-sent answer would take a few ms against 300.
    assert!(
        unknown.as_secs_f64() > known.as_secs_f64() * 0.5,
        "unknown {unknown:?} vs known {known:?}"
    );
}
