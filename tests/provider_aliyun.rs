//! The `aliyun` sender against a fake dysmsapi gateway that checks every request as the
//! real one does (sms-providers.md section 1): the V1 signature recomputed here from the
//! documented algorithm, every required parameter, the timestamp's format and freshness,
//! nonce reuse; and answers with the gateway's real success and error bodies.

mod common;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use common::TestServer;
use common::receiver::{Answer, Received, Receiver};
use hmac::{Hmac, KeyInit, Mac};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use serde_json::{Value, json};
use sha1::Sha1;

const KEY_ID: &str = "LTAI5tTestKeyId";
const SECRET: &str = "aliyun-test-secret-Kx93";
const SIGN_NAME: &str = "阿里云短信测试";
const TEMPLATE: &str = "SMS_154950909";

const OK: &str = r#"{"Code":"OK","Message":"OK","BizId":"900619746936498440^0","RequestId":"F655A8D5-B967-440B-8683-DAD6FF8DE990"}"#;

fn business(code: &str, message: &str) -> (u16, String) {
    (
        200,
        json!({ "Code": code, "Message": message, "RequestId": "A1B2C3D4-0000-4000-8000-000000000001" })
            .to_string(),
    )
}

fn gateway_error(status: u16, code: &str, message: &str) -> (u16, String) {
    (
        status,
        json!({
            "RequestId": "A1B2C3D4-0000-4000-8000-000000000002",
            "HostId": "dysmsapi.aliyuncs.com",
            "Code": code,
            "Message": message,
            "Recommend": format!("https://api.aliyun.com/troubleshoot?q={code}&product=Dysmsapi"),
        })
        .to_string(),
    )
}

const POP: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

fn pop(s: &str) -> String {
    utf8_percent_encode(s, POP).to_string()
}

/// The documented V1 algorithm (sms-providers.md 1.4), written out again here so a
/// mistake in the server's signer cannot also hide in the check.
fn string_to_sign(method: &str, params: &BTreeMap<String, String>) -> String {
    let mut pairs: Vec<(String, String)> = params
        .iter()
        .filter(|(k, _)| *k != "Signature")
        .map(|(k, v)| (pop(k), pop(v)))
        .collect();
    pairs.sort();
    let canonical = pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    format!("{method}&{}&{}", pop("/"), pop(&canonical))
}

fn signature(secret: &str, string_to_sign: &str) -> String {
    let mut mac = Hmac::<Sha1>::new_from_slice(format!("{secret}&").as_bytes()).unwrap();
    mac.update(string_to_sign.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// What the fake gateway does with a request that passed its checks.
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

/// The fake dysmsapi gateway. It keeps what it accepted, and what it found wrong.
#[derive(Default)]
struct Gateway {
    secret: String,
    replies: Mutex<VecDeque<Reply>>,
    nonces: Mutex<HashSet<String>>,
    accepted: Mutex<Vec<BTreeMap<String, String>>>,
    /// Protocol mistakes in our requests; every test expects none.
    violations: Mutex<Vec<String>>,
    /// Requests whose signature did not match (only the wrong-secret test expects any).
    bad_signatures: Mutex<usize>,
}

impl Gateway {
    fn answer(&self, req: &Received) -> Answer {
        match self.check(req) {
            Err((status, body)) => Answer::Status(status, body),
            Ok(params) => {
                self.accepted.lock().unwrap().push(params);
                match self.replies.lock().unwrap().pop_front() {
                    None => Answer::Status(200, OK.into()),
                    Some(Reply::Body(status, body)) => Answer::Status(status, body),
                    Some(Reply::Hang) => Answer::Delay(Duration::from_secs(30)),
                }
            }
        }
    }

    fn violation(&self, what: String) -> (u16, String) {
        self.violations.lock().unwrap().push(what.clone());
        gateway_error(400, "InvalidParameter", &what)
    }

    fn check(&self, req: &Received) -> Result<BTreeMap<String, String>, (u16, String)> {
        if req.method != "POST" || req.path_and_query != "/" {
            return Err(self.violation(format!("{} {}", req.method, req.path_and_query)));
        }
        let content_type = req.headers.get("content-type").map(|v| v.to_str().unwrap());
        if content_type != Some("application/x-www-form-urlencoded") {
            return Err(self.violation(format!("content-type {content_type:?}")));
        }
        let body = std::str::from_utf8(&req.body).unwrap();
        // A literal '+' would be read as a space: everything must be percent-encoded.
        if body.contains('+') || body.contains(' ') {
            return Err(self.violation(format!("body not POP-encoded: {body}")));
        }
        let mut params = BTreeMap::new();
        for pair in body.split('&') {
            let Some((k, v)) = pair.split_once('=') else {
                return Err(self.violation(format!("bad pair {pair}")));
            };
            let k = percent_decode_str(k).decode_utf8().unwrap().into_owned();
            let v = percent_decode_str(v).decode_utf8().unwrap().into_owned();
            if params.insert(k.clone(), v).is_some() {
                return Err(self.violation(format!("{k} twice")));
            }
        }
        let fixed = [
            ("AccessKeyId", KEY_ID),
            ("Action", "SendSms"),
            ("Version", "2017-05-25"),
            ("Format", "JSON"),
            ("RegionId", "cn-hangzhou"),
            ("SignatureMethod", "HMAC-SHA1"),
            ("SignatureVersion", "1.0"),
            ("SignName", SIGN_NAME),
        ];
        for (k, want) in fixed {
            if params.get(k).map(String::as_str) != Some(want) {
                return Err(self.violation(format!("{k} = {:?}", params.get(k))));
            }
        }
        for k in [
            "PhoneNumbers",
            "TemplateCode",
            "TemplateParam",
            "Timestamp",
            "SignatureNonce",
            "Signature",
        ] {
            if !params.contains_key(k) {
                return Err(gateway_error(
                    400,
                    &format!("Missing{k}"),
                    &format!("{k} is mandatory for this action."),
                ));
            }
        }
        let phone = &params["PhoneNumbers"];
        if phone.len() != 11 || !phone.bytes().all(|b| b.is_ascii_digit()) {
            return Err(self.violation(format!("PhoneNumbers {phone}")));
        }
        let template_param: Value = serde_json::from_str(&params["TemplateParam"])
            .map_err(|_| self.violation("TemplateParam not JSON".into()))?;
        let code = template_param["code"].as_str();
        if template_param.as_object().map(|o| o.len()) != Some(1)
            || !code.is_some_and(|c| c.len() == 6 && c.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(self.violation(format!("TemplateParam {template_param}")));
        }
        // UTC, to the second, no offset; and fresh (the gateway allows 15 minutes).
        let ts = &params["Timestamp"];
        let parsed = jiff::civil::DateTime::strptime("%Y-%m-%dT%H:%M:%SZ", ts)
            .ok()
            .filter(|_| ts.len() == 20)
            .and_then(|dt| dt.to_zoned(jiff::tz::TimeZone::UTC).ok());
        let Some(parsed) = parsed else {
            return Err(self.violation(format!("Timestamp {ts}")));
        };
        let skew = (jiff::Timestamp::now().as_second() - parsed.timestamp().as_second()).abs();
        if skew > 60 {
            return Err(gateway_error(
                400,
                "InvalidTimeStamp.Expired",
                "Specified time stamp or date value is expired.",
            ));
        }
        let nonce = params["SignatureNonce"].clone();
        if nonce.len() < 16 {
            return Err(self.violation(format!("SignatureNonce {nonce}")));
        }
        if !self.nonces.lock().unwrap().insert(nonce) {
            return Err(gateway_error(
                400,
                "SignatureNonceUsed",
                "Specified signature nonce was used already.",
            ));
        }
        let to_sign = string_to_sign("POST", &params);
        if params["Signature"] != signature(&self.secret, &to_sign) {
            *self.bad_signatures.lock().unwrap() += 1;
            return Err(gateway_error(
                400,
                "SignatureDoesNotMatch",
                &format!(
                    "Specified signature is not matched with our calculation. server string to sign is:{to_sign}"
                ),
            ));
        }
        Ok(params)
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
    fn accepted(&self) -> Vec<BTreeMap<String, String>> {
        self.gateway.accepted.lock().unwrap().clone()
    }

    fn assert_clean(&self) {
        assert_eq!(
            *self.gateway.violations.lock().unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(*self.gateway.bad_signatures.lock().unwrap(), 0);
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

    /// No secret, full phone number or code anywhere in the server's log.
    fn assert_log_clean(&self, extra: &[&str]) {
        let log = serde_json::to_string(&self.server.log_lines()).unwrap();
        for s in [SECRET, "aliyun-file-secret"].iter().chain(extra) {
            assert!(!log.contains(s), "{s:?} leaked into the log: {log}");
        }
        for p in self.accepted() {
            assert!(
                !log.contains(&p["PhoneNumbers"]),
                "a full phone number leaked"
            );
            let tp: Value = serde_json::from_str(&p["TemplateParam"]).unwrap();
            let code = tp["code"].as_str().unwrap();
            assert!(!log.contains(&format!("\"{code}\"")), "a code leaked");
        }
    }
}

/// A server whose `aliyun` sender points at a fake gateway that knows `gateway_secret`.
async fn setup_with(gateway_secret: &str, aliyun_extra: &str, sms_extra: &str) -> Setup {
    let receiver = Receiver::start().await;
    let gateway = Arc::new(Gateway {
        secret: gateway_secret.into(),
        ..Default::default()
    });
    let g = gateway.clone();
    receiver.respond_with(move |req| g.answer(req));
    let config = format!(
        "[sms]\nprovider = \"aliyun\"\n{sms_extra}\n[sms.aliyun]\naccess_key_id = \"{KEY_ID}\"\nsign_name = \"{SIGN_NAME}\"\nendpoint = \"{}\"\n{aliyun_extra}\n",
        receiver.url("/")
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
        SECRET,
        &format!("access_key_secret = \"{SECRET}\"\ntemplate_code = \"{TEMPLATE}\""),
        "",
    )
    .await
}

fn code_of(params: &BTreeMap<String, String>) -> String {
    let tp: Value = serde_json::from_str(&params["TemplateParam"]).unwrap();
    tp["code"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_signed_sendsms_delivers_a_code_that_logs_in() {
    let t = setup().await;
    let (status, body) = t.request_code("13812340001", "login").await;
    assert_eq!(status, 200, "{body}");
    t.assert_clean();
    let accepted = t.accepted();
    assert_eq!(accepted.len(), 1);
    let p = &accepted[0];
    assert_eq!(p["PhoneNumbers"], "13812340001");
    assert_eq!(p["TemplateCode"], TEMPLATE);
    let code = code_of(p);
    let (status, body) = t
        .server
        .post(
            "/api/v1/auth/sms-login",
            json!({ "phone": "13812340001", "code": code }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["created"], true);
    let line = t.send_line();
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["provider"], "aliyun");
    assert_eq!(line["result"], "ok");
    assert_eq!(line["attempts"], 1);
    assert_eq!(line["phone"], "+86138****0001");
    t.assert_log_clean(&[]);
}

#[tokio::test]
async fn business_answers_map_to_api_errors_and_are_not_retried() {
    let t = setup().await;
    let cases = [
        (
            "isv.MOBILE_NUMBER_ILLEGAL",
            "非法手机号",
            400,
            "invalid_phone",
        ),
        (
            "isv.BUSINESS_LIMIT_CONTROL",
            "触发分钟级流控Permits:1",
            429,
            "rate_limited",
        ),
        ("isv.DAY_LIMIT_CONTROL", "触发日发送限额", 502, "sms_failed"),
        (
            "isv.SMS_TEMPLATE_ILLEGAL",
            "该账号下找不到对应模板",
            502,
            "sms_failed",
        ),
    ];
    for (i, (provider_code, message, status, error)) in cases.into_iter().enumerate() {
        let phone = format!("1381234010{i}");
        let before = t.accepted().len();
        t.gateway
            .replies
            .lock()
            .unwrap()
            .push_back(business(provider_code, message).into());
        let (got, body) = t.request_code(&phone, "login").await;
        assert_eq!(
            (got, body["error"].as_str()),
            (status, Some(error)),
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
        // The refusal kept no code and started no resend wait: the next one goes out,
        // and only its code works.
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
async fn a_500_or_throttling_is_retried_with_a_fresh_signature_and_one_code_works() {
    let t = setup().await;
    t.gateway.replies.lock().unwrap().extend([
        gateway_error(
            500,
            "InternalError",
            "The request processing has failed due to some unknown error.",
        )
        .into(),
        gateway_error(
            400,
            "Throttling.User",
            "Request was denied due to user flow control.",
        )
        .into(),
    ]);
    let (status, body) = t.request_code("13812340201", "login").await;
    assert_eq!(status, 200, "{body}");
    let accepted = t.accepted();
    assert_eq!(accepted.len(), 3, "two retries");
    // Each attempt signed afresh; the gateway refuses a reused nonce anyway.
    assert_ne!(accepted[0]["SignatureNonce"], accepted[1]["SignatureNonce"]);
    let code = code_of(&accepted[2]);
    let (status, body) = t
        .server
        .post(
            "/api/v1/auth/sms-login",
            json!({ "phone": "13812340201", "code": code }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let line = t.send_line();
    assert_eq!(
        (line["result"].as_str(), line["attempts"].as_u64()),
        (Some("ok"), Some(3))
    );
    t.assert_clean();
}

#[tokio::test]
async fn retries_stop_at_sms_retries() {
    let t = setup_with(
        SECRET,
        &format!("access_key_secret = \"{SECRET}\"\ntemplate_code = \"{TEMPLATE}\""),
        "retries = 1",
    )
    .await;
    let unavailable = gateway_error(
        503,
        "ServiceUnavailable",
        "The request has failed due to a temporary failure of the server.",
    );
    t.gateway
        .replies
        .lock()
        .unwrap()
        .extend([unavailable.clone().into(), unavailable.into()]);
    let (status, body) = t.request_code("13812340301", "login").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (502, Some("sms_failed")),
        "{body}"
    );
    assert_eq!(t.accepted().len(), 2);
    let line = t.send_line();
    assert_eq!(
        (line["result"].as_str(), line["attempts"].as_u64()),
        (Some("failed"), Some(2))
    );
}

#[tokio::test]
async fn a_hung_gateway_fails_with_502_within_the_budget() {
    let t = setup_with(
        SECRET,
        &format!("access_key_secret = \"{SECRET}\"\ntemplate_code = \"{TEMPLATE}\""),
        "timeout_secs = 2",
    )
    .await;
    t.gateway
        .replies
        .lock()
        .unwrap()
        .extend([Reply::Hang, Reply::Hang, Reply::Hang]);
    let started = Instant::now();
    let (status, body) = t.request_code("13812340401", "login").await;
    let took = started.elapsed();
    assert_eq!(
        (status, body["error"].as_str()),
        (502, Some("sms_failed")),
        "{body}"
    );
    assert!(took < Duration::from_millis(3000), "{took:?}");
    // The first attempt timed out early enough to try once more on a fresh connection.
    assert_eq!(t.receiver.received().len(), 2);
    let line = t.send_line();
    assert_eq!(
        (line["result"].as_str(), line["attempts"].as_u64()),
        (Some("failed"), Some(2))
    );
}

#[tokio::test]
async fn a_wrong_secret_is_refused_by_the_gateway_and_answers_502() {
    let t = setup_with(
        "the-secret-aliyun-knows",
        &format!("access_key_secret = \"{SECRET}\"\ntemplate_code = \"{TEMPLATE}\""),
        "",
    )
    .await;
    let (status, body) = t.request_code("13812340501", "login").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (502, Some("sms_failed")),
        "{body}"
    );
    assert!(!body.to_string().contains(SECRET), "{body}");
    assert_eq!(*t.gateway.bad_signatures.lock().unwrap(), 1, "not retried");
    let line = t.send_line();
    assert_eq!(line["result"], "rejected");
    assert_eq!(line["provider_code"], "SignatureDoesNotMatch");
    // The gateway's message echoes its string to sign, with the phone and the code in it.
    let log = serde_json::to_string(&t.server.log_lines()).unwrap();
    assert!(!log.contains("13812340501"), "{log}");
    assert!(!log.contains("TemplateParam"), "{log}");
    t.assert_log_clean(&["the-secret-aliyun-knows"]);
}

#[tokio::test]
async fn each_purpose_uses_its_own_template() {
    let t = setup_with(
        SECRET,
        &format!(
            "access_key_secret = \"{SECRET}\"\ntemplate_code = {{ login = \"SMS_1001\", register = \"SMS_1002\", reset_password = \"SMS_1003\" }}"
        ),
        // Lift the resend wait: one phone gets a login and then a reset code.
        "[code]\nresend_interval_secs = 0",
    )
    .await;
    for (phone, purpose) in [("13812340601", "login"), ("13812340602", "register")] {
        let (status, body) = t.request_code(phone, purpose).await;
        assert_eq!(status, 200, "{purpose}: {body}");
    }
    // A reset code only goes to a phone with an account: make 13812340601 one.
    let code = code_of(&t.accepted()[0]);
    let (status, body) = t
        .server
        .post(
            "/api/v1/auth/sms-login",
            json!({ "phone": "13812340601", "code": code }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = t.request_code("13812340601", "reset_password").await;
    assert_eq!(status, 200, "{body}");
    let templates: Vec<String> = t
        .accepted()
        .iter()
        .map(|p| p["TemplateCode"].clone())
        .collect();
    assert_eq!(templates, ["SMS_1001", "SMS_1002", "SMS_1003"]);
    t.assert_clean();
}

#[tokio::test]
async fn the_secret_can_come_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("aliyun-secret");
    // As `systemd-creds` or `echo` would write it: with a final newline.
    std::fs::write(&path, "aliyun-file-secret\n").unwrap();
    let t = setup_with(
        "aliyun-file-secret",
        &format!(
            "access_key_secret_file = \"{}\"\ntemplate_code = \"{TEMPLATE}\"",
            path.display()
        ),
        "",
    )
    .await;
    let (status, body) = t.request_code("13812340701", "login").await;
    assert_eq!(status, 200, "{body}");
    t.assert_clean();
    t.assert_log_clean(&[]);
}

#[test]
fn a_missing_key_refuses_start_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "access_key_secret = \"s\"\nsign_name = \"n\"\ntemplate_code = \"t\"",
            "sms.aliyun.access_key_id",
        ),
        (
            "access_key_id = \"i\"\nsign_name = \"n\"\ntemplate_code = \"t\"",
            "sms.aliyun.access_key_secret",
        ),
        (
            "access_key_id = \"i\"\naccess_key_secret = \"s\"\ntemplate_code = \"t\"",
            "sms.aliyun.sign_name",
        ),
        (
            "access_key_id = \"i\"\naccess_key_secret = \"s\"\nsign_name = \"n\"",
            "sms.aliyun.template_code",
        ),
        (
            "access_key_id = \"i\"\naccess_key_secret = \"s\"\nsign_name = \"n\"\ntemplate_code = { login = \"a\", register = \"b\" }",
            "sms.aliyun.template_code.reset_password",
        ),
        (
            "access_key_id = \"i\"\naccess_key_secret_file = \"/nonexistent/secret\"\nsign_name = \"n\"\ntemplate_code = \"t\"",
            "sms.aliyun.access_key_secret_file",
        ),
    ];
    for (section, key) in cases {
        let path = dir.path().join("smsauth.toml");
        std::fs::write(
            &path,
            format!("[sms]\nprovider = \"aliyun\"\n[sms.aliyun]\n{section}\n"),
        )
        .unwrap();
        // Should validation let it through, an unusable data dir still stops it (exit 1)
        // instead of leaving a server running.
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
