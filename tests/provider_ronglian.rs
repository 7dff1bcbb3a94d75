//! The `ronglian` sender against a fake cloopen gateway that checks every request as the
//! real one does (sms-providers.md section 2): the URL and its `sig` recomputed here from
//! the documented algorithm, the `Authorization` header, the Beijing-time timestamp, the
//! headers and the JSON body; and answers with the gateway's success and error bodies.

mod common;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use common::TestServer;
use common::receiver::{Answer, Received, Receiver};
use md5::{Digest, Md5};
use serde_json::{Value, json};

const SID: &str = "8a216da86f17653b016f3b4046bb1234";
const TOKEN: &str = "ronglian-test-token-7c1d";
const APP_ID: &str = "8a216da86f17653b016f3b4047f01235";

const OK: &str = r#"{"statusCode":"000000","templateSMS":{"dateCreated":"20130201155306","smsMessageSid":"ff8080813c373cab013c94b0f0512345"}}"#;

fn status(code: &str, message: &str) -> (u16, String) {
    (
        200,
        json!({ "statusCode": code, "statusMsg": message }).to_string(),
    )
}

#[derive(Clone)]
enum Reply {
    Body(u16, String),
    Hang,
}

impl From<(u16, String)> for Reply {
    fn from((status, body): (u16, String)) -> Self {
        Reply::Body(status, body)
    }
}

/// One request the gateway accepted.
#[derive(Debug, Clone)]
struct Accepted {
    timestamp: String,
    body: Value,
}

#[derive(Default)]
struct Gateway {
    token: String,
    replies: Mutex<VecDeque<Reply>>,
    accepted: Mutex<Vec<Accepted>>,
    violations: Mutex<Vec<String>>,
    bad_sigs: Mutex<usize>,
}

/// Beijing time now, as the gateway's own clock reads it.
fn beijing_now() -> jiff::civil::DateTime {
    jiff::tz::Offset::constant(8).to_datetime(jiff::Timestamp::now())
}

impl Gateway {
    fn answer(&self, req: &Received) -> Answer {
        match self.check(req) {
            Err((status, body)) => Answer::Status(status, body),
            Ok(accepted) => {
                self.accepted.lock().unwrap().push(accepted);
                match self.replies.lock().unwrap().pop_front() {
                    None => Answer::Status(200, OK.into()),
                    Some(Reply::Body(status, body)) => Answer::Status(status, body),
                    Some(Reply::Hang) => Answer::Delay(Duration::from_secs(30)),
                }
            }
        }
    }

    fn violation(&self, what: String, code: &str) -> (u16, String) {
        self.violations.lock().unwrap().push(what.clone());
        status(code, &what)
    }

    fn check(&self, req: &Received) -> Result<Accepted, (u16, String)> {
        if req.method != "POST" {
            return Err(self.violation(format!("method {}", req.method), "111100"));
        }
        let prefix = format!("/2013-12-26/Accounts/{SID}/SMS/TemplateSMS?sig=");
        let Some(sig) = req.path_and_query.strip_prefix(&prefix) else {
            return Err(self.violation(format!("path {}", req.path_and_query), "111141"));
        };
        let header = |name: &str| {
            req.headers
                .get(name)
                .map(|v| v.to_str().unwrap().to_owned())
        };
        if header("accept").as_deref() != Some("application/json") {
            return Err(self.violation(format!("accept {:?}", header("accept")), "111100"));
        }
        if header("content-type").as_deref() != Some("application/json;charset=utf-8") {
            return Err(self.violation(
                format!("content-type {:?}", header("content-type")),
                "111100",
            ));
        }
        let Some(auth) = header("authorization") else {
            return Err(self.violation("no Authorization".into(), "111101"));
        };
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(&auth) else {
            return Err(self.violation(format!("Authorization {auth}"), "111102"));
        };
        let decoded = String::from_utf8(decoded).unwrap();
        let Some((sid, timestamp)) = decoded.split_once(':') else {
            return Err(self.violation(format!("Authorization {decoded}"), "111103"));
        };
        if sid != SID {
            return Err(self.violation(format!("Authorization sid {sid}"), "111107"));
        }
        let parsed = jiff::civil::DateTime::strptime("%Y%m%d%H%M%S", timestamp)
            .ok()
            .filter(|_| timestamp.len() == 14);
        let Some(parsed) = parsed else {
            return Err(self.violation(format!("timestamp {timestamp}"), "111113"));
        };
        // Beijing time, not UTC or the host's zone: eight hours off shows up here.
        let skew = beijing_now().duration_since(parsed).as_secs().abs();
        if skew > 60 {
            return Err(self.violation(format!("timestamp {timestamp} is {skew}s off"), "111106"));
        }
        let expected = hex::encode_upper(Md5::digest(
            format!("{SID}{}{timestamp}", self.token).as_bytes(),
        ));
        if sig != expected {
            *self.bad_sigs.lock().unwrap() += 1;
            return Err(status("111109", "sig验证失败"));
        }
        let Ok(body) = serde_json::from_slice::<Value>(&req.body) else {
            return Err(self.violation("body not JSON".into(), "160031"));
        };
        let keys: Vec<&String> = body
            .as_object()
            .map(|o| o.keys().collect())
            .unwrap_or_default();
        if keys.len() != 4 {
            return Err(self.violation(format!("body keys {keys:?}"), "160031"));
        }
        let to = body["to"].as_str().unwrap_or("");
        if to.len() != 11 || !to.bytes().all(|b| b.is_ascii_digit()) {
            return Err(self.violation(format!("to {to}"), "160042"));
        }
        if body["appId"] != APP_ID {
            return Err(self.violation(format!("appId {}", body["appId"]), "111181"));
        }
        let template = body["templateId"].as_str().unwrap_or("");
        if template.is_empty() || !template.bytes().all(|b| b.is_ascii_digit()) {
            return Err(self.violation(format!("templateId {}", body["templateId"]), "160057"));
        }
        let datas = body["datas"].as_array().cloned().unwrap_or_default();
        let code_ok = datas
            .first()
            .and_then(Value::as_str)
            .is_some_and(|c| c.len() == 6 && c.bytes().all(|b| b.is_ascii_digit()));
        if datas.len() != 2 || !code_ok || datas[1] != "5" {
            return Err(self.violation(format!("datas {datas:?}"), "112308"));
        }
        Ok(Accepted {
            timestamp: timestamp.to_owned(),
            body,
        })
    }
}

struct Setup {
    gateway: Arc<Gateway>,
    receiver: Receiver,
    server: TestServer,
    /// Codes asked for so far: each writes one `sms sent` / `sms not sent` line.
    sends: AtomicUsize,
}

impl Setup {
    fn accepted(&self) -> Vec<Accepted> {
        self.gateway.accepted.lock().unwrap().clone()
    }

    fn assert_clean(&self) {
        assert_eq!(
            *self.gateway.violations.lock().unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(*self.gateway.bad_sigs.lock().unwrap(), 0);
    }

    async fn request_code(&self, phone: &str, purpose: &str) -> (u16, Value) {
        self.sends.fetch_add(1, Ordering::SeqCst);
        self.server
            .post(
                "/api/v1/sms/code",
                json!({ "phone": phone, "purpose": purpose }),
            )
            .await
    }

    /// The log line of the latest send.
    fn send_line(&self) -> Value {
        let n = self.sends.load(Ordering::SeqCst);
        self.server.nth_line(n - 1, |l| {
            l["message"] == "sms sent" || l["message"] == "sms not sent"
        })
    }

    fn assert_log_clean(&self, extra: &[&str]) {
        let log = serde_json::to_string(&self.server.log_lines()).unwrap();
        for s in [TOKEN, "ronglian-file-token"].iter().chain(extra) {
            assert!(!log.contains(s), "{s:?} leaked into the log: {log}");
        }
        for a in self.accepted() {
            assert!(
                !log.contains(a.body["to"].as_str().unwrap()),
                "a full phone number leaked"
            );
            let code = a.body["datas"][0].as_str().unwrap();
            assert!(!log.contains(&format!("\"{code}\"")), "a code leaked");
        }
    }
}

async fn setup_with(gateway_token: &str, ronglian_extra: &str, sms_extra: &str) -> Setup {
    let receiver = Receiver::start().await;
    let gateway = Arc::new(Gateway {
        token: gateway_token.into(),
        ..Default::default()
    });
    let g = gateway.clone();
    receiver.respond_with(move |req| g.answer(req));
    let config = format!(
        "[sms]\nprovider = \"ronglian\"\n{sms_extra}\n[sms.ronglian]\naccount_sid = \"{SID}\"\napp_id = \"{APP_ID}\"\nbase_url = \"{}\"\n{ronglian_extra}\n",
        receiver.url("")
    );
    let server = TestServer::start(&config).await;
    Setup {
        gateway,
        receiver,
        server,
        sends: AtomicUsize::new(0),
    }
}

async fn setup() -> Setup {
    setup_with(
        TOKEN,
        &format!("auth_token = \"{TOKEN}\"\ntemplate_id = \"1\""),
        "",
    )
    .await
}

fn code_of(a: &Accepted) -> String {
    a.body["datas"][0].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_signed_template_sms_delivers_a_code_that_logs_in() {
    let t = setup().await;
    let (got, body) = t.request_code("13912340001", "login").await;
    assert_eq!(got, 200, "{body}");
    t.assert_clean();
    let accepted = t.accepted();
    assert_eq!(accepted.len(), 1);
    assert_eq!(accepted[0].body["to"], "13912340001");
    assert_eq!(accepted[0].body["templateId"], "1");
    let (got, body) = t
        .server
        .post(
            "/api/v1/auth/sms-login",
            json!({ "phone": "13912340001", "code": code_of(&accepted[0]) }),
        )
        .await;
    assert_eq!(got, 200, "{body}");
    let line = t.send_line();
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["provider"], "ronglian");
    assert_eq!(line["result"], "ok");
    assert_eq!(line["attempts"], 1);
    assert_eq!(line["phone"], "+86139****0001");
    t.assert_log_clean(&[]);
}

#[tokio::test]
async fn business_answers_map_to_api_errors_and_are_not_retried() {
    let t = setup().await;
    let cases = [
        ("160042", "号码格式有误", 400, "invalid_phone"),
        ("160038", "短信验证码发送过频繁", 429, "rate_limited"),
        (
            "160039",
            "超出同模板同号天发送次数上限",
            429,
            "rate_limited",
        ),
        (
            "160040",
            "验证码超出同模板同号码天发送上限",
            429,
            "rate_limited",
        ),
        ("160032", "短信模板无效", 502, "sms_failed"),
    ];
    for (i, (provider_code, message, want_status, error)) in cases.into_iter().enumerate() {
        let phone = format!("1391234010{i}");
        let before = t.accepted().len();
        t.gateway
            .replies
            .lock()
            .unwrap()
            .push_back(status(provider_code, message).into());
        let (got, body) = t.request_code(&phone, "login").await;
        assert_eq!(
            (got, body["error"].as_str()),
            (want_status, Some(error)),
            "{provider_code}: {body}"
        );
        assert_eq!(
            t.accepted().len(),
            before + 1,
            "{provider_code} was retried"
        );
        let line = t.send_line();
        assert_eq!(line["level"], "WARN");
        assert_eq!(line["result"], "rejected");
        assert_eq!(line["attempts"], 1);
        assert_eq!(line["provider_code"], provider_code);
        assert_eq!(line["provider_message"], message);
        // No code kept, no resend wait started.
        let (got, body) = t.request_code(&phone, "login").await;
        assert_eq!(got, 200, "{body}");
        let accepted = t.accepted();
        let (dead, live) = (code_of(&accepted[before]), code_of(&accepted[before + 1]));
        if dead != live {
            let (got, _) = t
                .server
                .post(
                    "/api/v1/auth/sms-login",
                    json!({ "phone": phone, "code": dead }),
                )
                .await;
            assert_eq!(got, 400, "a code the provider refused works");
        }
    }
    t.assert_clean();
    t.assert_log_clean(&[]);
}

#[tokio::test]
async fn a_500_is_retried_and_one_code_works() {
    let t = setup().await;
    t.gateway.replies.lock().unwrap().push_back(
        (
            500,
            "<html><body>500 Internal Server Error</body></html>".to_owned(),
        )
            .into(),
    );
    let (got, body) = t.request_code("13912340201", "login").await;
    assert_eq!(got, 200, "{body}");
    let accepted = t.accepted();
    assert_eq!(accepted.len(), 2);
    let code = code_of(&accepted[1]);
    assert_eq!(code, code_of(&accepted[0]), "a retry resends the same code");
    let (got, body) = t
        .server
        .post(
            "/api/v1/auth/sms-login",
            json!({ "phone": "13912340201", "code": code }),
        )
        .await;
    assert_eq!(got, 200, "{body}");
    let line = t.send_line();
    assert_eq!(
        (line["result"].as_str(), line["attempts"].as_u64()),
        (Some("ok"), Some(2))
    );
    t.assert_clean();
}

#[tokio::test]
async fn a_hung_gateway_fails_with_502_within_the_budget() {
    let t = setup_with(
        TOKEN,
        &format!("auth_token = \"{TOKEN}\"\ntemplate_id = \"1\""),
        "timeout_secs = 2",
    )
    .await;
    t.gateway
        .replies
        .lock()
        .unwrap()
        .extend([Reply::Hang, Reply::Hang, Reply::Hang]);
    let started = Instant::now();
    let (got, body) = t.request_code("13912340401", "login").await;
    let took = started.elapsed();
    assert_eq!(
        (got, body["error"].as_str()),
        (502, Some("sms_failed")),
        "{body}"
    );
    assert!(took < Duration::from_millis(3000), "{took:?}");
    assert_eq!(t.receiver.received().len(), 2);
    let line = t.send_line();
    assert_eq!(
        (line["result"].as_str(), line["attempts"].as_u64()),
        (Some("failed"), Some(2))
    );
}

#[tokio::test]
async fn a_wrong_token_is_refused_by_the_gateway_and_answers_502() {
    let t = setup_with(
        "the-token-ronglian-knows",
        &format!("auth_token = \"{TOKEN}\"\ntemplate_id = \"1\""),
        "",
    )
    .await;
    let (got, body) = t.request_code("13912340501", "login").await;
    assert_eq!(
        (got, body["error"].as_str()),
        (502, Some("sms_failed")),
        "{body}"
    );
    assert!(!body.to_string().contains(TOKEN), "{body}");
    assert_eq!(*t.gateway.bad_sigs.lock().unwrap(), 1, "not retried");
    let line = t.send_line();
    assert_eq!(line["result"], "rejected");
    assert_eq!(line["provider_code"], "111109");
    // The sig is a credential for its timestamp: the URL carrying it stays out of the log.
    let log = serde_json::to_string(&t.server.log_lines()).unwrap();
    assert!(!log.contains("sig="), "{log}");
    t.assert_log_clean(&["the-token-ronglian-knows"]);
}

#[tokio::test]
async fn each_purpose_uses_its_own_template() {
    let t = setup_with(
        TOKEN,
        &format!(
            "auth_token = \"{TOKEN}\"\n[sms.ronglian.template_id]\nlogin = \"101\"\nregister = \"102\"\nreset_password = \"103\""
        ),
        // Lift the resend wait: one phone gets a login and then a reset code.
        "[code]\nresend_interval_secs = 0",
    )
    .await;
    for (phone, purpose) in [("13912340601", "login"), ("13912340602", "register")] {
        let (got, body) = t.request_code(phone, purpose).await;
        assert_eq!(got, 200, "{purpose}: {body}");
    }
    // A reset code only goes to a phone with an account: make 13912340601 one.
    let code = code_of(&t.accepted()[0]);
    let (got, body) = t
        .server
        .post(
            "/api/v1/auth/sms-login",
            json!({ "phone": "13912340601", "code": code }),
        )
        .await;
    assert_eq!(got, 200, "{body}");
    let (got, body) = t.request_code("13912340601", "reset_password").await;
    assert_eq!(got, 200, "{body}");
    let templates: Vec<Value> = t
        .accepted()
        .iter()
        .map(|a| a.body["templateId"].clone())
        .collect();
    assert_eq!(templates, ["101", "102", "103"]);
    t.assert_clean();
}

#[tokio::test]
async fn the_token_can_come_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ronglian-token");
    std::fs::write(&path, "ronglian-file-token\n").unwrap();
    let t = setup_with(
        "ronglian-file-token",
        &format!(
            "auth_token_file = \"{}\"\ntemplate_id = \"1\"",
            path.display()
        ),
        "",
    )
    .await;
    let (got, body) = t.request_code("13912340701", "login").await;
    assert_eq!(got, 200, "{body}");
    t.assert_clean();
    // The timestamp the gateway accepted is Beijing time to the second.
    assert_eq!(t.accepted()[0].timestamp.len(), 14);
    t.assert_log_clean(&[]);
}

#[test]
fn a_missing_key_refuses_start_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "auth_token = \"t\"\napp_id = \"a\"\ntemplate_id = \"1\"",
            "sms.ronglian.account_sid",
        ),
        (
            "account_sid = \"s\"\napp_id = \"a\"\ntemplate_id = \"1\"",
            "sms.ronglian.auth_token",
        ),
        (
            "account_sid = \"s\"\nauth_token = \"t\"\ntemplate_id = \"1\"",
            "sms.ronglian.app_id",
        ),
        (
            "account_sid = \"s\"\nauth_token = \"t\"\napp_id = \"a\"",
            "sms.ronglian.template_id",
        ),
        (
            "account_sid = \"s\"\nauth_token = \"t\"\nauth_token_file = \"/etc/hostname\"\napp_id = \"a\"\ntemplate_id = \"1\"",
            "sms.ronglian.auth_token",
        ),
        (
            "account_sid = \"s\"\nauth_token = \"t\"\napp_id = \"a\"\ntemplate_id = \"1\"\nbase_url = \"app.cloopen.com:8883\"",
            "sms.ronglian.base_url",
        ),
    ];
    for (section, key) in cases {
        let path = dir.path().join("smsauth.toml");
        std::fs::write(
            &path,
            format!("[sms]\nprovider = \"ronglian\"\n[sms.ronglian]\n{section}\n"),
        )
        .unwrap();
        let out = common::run_cli(
            &["serve", "--config", path.to_str().unwrap()],
            &[
                ("SMSAUTH_SERVER__LISTEN", "127.0.0.1:0"),
                ("SMSAUTH_STORAGE__DATA_DIR", "/dev/null/data"),
            ],
            dir.path(),
        );
        assert_eq!(out.status.code(), Some(2), "{key}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(&format!("`{key}`")), "{key}: {stderr}");
    }
}
