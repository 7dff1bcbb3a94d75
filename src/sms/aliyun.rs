//! Alibaba Cloud SMS: dysmsapi `SendSms`, API version 2017-05-25, RPC style, signed
//! with signature V1 (HMAC-SHA1 over the sorted, percent-encoded parameters), as
//! /work/shared/sms-providers.md section 1 specifies. Parameters go in a form POST body
//! rather than the query string, so the phone number stays out of proxies' URL logs.

use std::time::Duration;

use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use rand::RngExt;
use serde::Deserialize;
use sha1::Sha1;

use super::{Outgoing, Refusal, Sender, SmsError, gateway_number, short, transport};
use crate::config::{AliyunConfig, Secret, Templates};
use crate::store::BoxFuture;

/// POP's percentEncode: everything but `A-Z a-z 0-9 - _ . ~` becomes upper-case `%XY`,
/// so a space is `%20` (never `+`) and `*` is `%2A`.
const POP: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

fn encode(s: &str) -> String {
    utf8_percent_encode(s, POP).to_string()
}

/// The parameters, encoded, sorted by encoded name and joined: what is signed, and
/// (with the signature added) what is sent.
fn canonical(params: &[(&str, &str)]) -> String {
    let mut pairs: Vec<(String, String)> =
        params.iter().map(|(k, v)| (encode(k), encode(v))).collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// Signature V1: Base64(HMAC-SHA1(secret + "&", method & %2F & encode(canonical))).
pub fn sign(method: &str, params: &[(&str, &str)], secret: &str) -> String {
    let string_to_sign = format!("{method}&{}&{}", encode("/"), encode(&canonical(params)));
    let mut mac = Hmac::<Sha1>::new_from_slice(format!("{secret}&").as_bytes())
        .expect("HMAC takes any key length");
    mac.update(string_to_sign.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// A UUID v4 in its usual text form, the nonce the documentation suggests; the gateway
/// refuses a nonce it has seen in the last 15 minutes.
fn nonce() -> String {
    let mut n: u128 = rand::rng().random();
    n = (n & !(0xf << 76)) | (0x4 << 76);
    n = (n & !(0x3 << 62)) | (0x2 << 62);
    let h = format!("{n:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

pub struct AliyunSender {
    client: reqwest::Client,
    endpoint: String,
    access_key_id: String,
    access_key_secret: Secret,
    sign_name: String,
    templates: Templates,
    region: String,
}

impl AliyunSender {
    pub fn new(cfg: &AliyunConfig, timeout: Duration) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder().timeout(timeout).build()?;
        Ok(Self {
            client,
            endpoint: cfg.endpoint.clone(),
            access_key_id: cfg.access_key_id.clone(),
            access_key_secret: cfg.access_key_secret.clone(),
            sign_name: cfg.sign_name.clone(),
            templates: cfg.template_code.clone(),
            region: cfg.region.clone(),
        })
    }

    /// The signed form body of one attempt (fresh nonce and timestamp each time).
    fn body(&self, msg: &Outgoing<'_>) -> String {
        let template_param = serde_json::json!({ "code": msg.code }).to_string();
        let timestamp = jiff::Timestamp::now()
            .strftime("%Y-%m-%dT%H:%M:%SZ")
            .to_string();
        let nonce = nonce();
        let params: [(&str, &str); 13] = [
            ("AccessKeyId", &self.access_key_id),
            ("Action", "SendSms"),
            ("Format", "JSON"),
            ("PhoneNumbers", gateway_number(msg.phone)),
            ("RegionId", &self.region),
            ("SignName", &self.sign_name),
            ("SignatureMethod", "HMAC-SHA1"),
            ("SignatureNonce", &nonce),
            ("SignatureVersion", "1.0"),
            ("TemplateCode", self.templates.get(msg.purpose)),
            ("TemplateParam", &template_param),
            ("Timestamp", &timestamp),
            ("Version", "2017-05-25"),
        ];
        let signature = sign("POST", &params, self.access_key_secret.expose());
        format!("{}&Signature={}", canonical(&params), encode(&signature))
    }
}

/// Both the SendSms answer and the gateway's error body have this shape.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Answer {
    code: Option<String>,
    message: Option<String>,
    request_id: Option<String>,
}

/// Turns the gateway's answer into ours, per the table in sms-providers.md 1.7.
fn classify(status: reqwest::StatusCode, body: &str) -> Result<(), SmsError> {
    let answer: Option<Answer> = serde_json::from_str(body).ok();
    if status.is_server_error() {
        let code = answer
            .and_then(|a| a.code)
            .map(|c| format!(" ({c})"))
            .unwrap_or_default();
        return Err(SmsError::Transport(format!(
            "gateway answered {status}{code}"
        )));
    }
    let Some(Answer {
        code: Some(code),
        message,
        request_id,
    }) = answer
    else {
        return Err(SmsError::Refused(Refusal::new(
            status.as_str(),
            "the gateway's answer is not SendSms JSON",
        )));
    };
    if status.is_success() && code == "OK" {
        return Ok(());
    }
    let refusal = Refusal {
        message: short(&without_string_to_sign(message.as_deref().unwrap_or(""))),
        request_id,
        code,
    };
    Err(match refusal.code.as_str() {
        // Account-wide API flow control: nothing wrong with this message, the gateway
        // asks us to come back a moment later.
        c if c == "Throttling" || c.starts_with("Throttling.") => {
            SmsError::Transport(format!("gateway throttling: {refusal}"))
        }
        "isv.MOBILE_NUMBER_ILLEGAL" => SmsError::InvalidPhone(refusal),
        "isv.BUSINESS_LIMIT_CONTROL" => SmsError::RateLimited(refusal),
        _ => SmsError::Refused(refusal),
    })
}

/// `SignatureDoesNotMatch` echoes the server's string to sign, which holds the full
/// phone number and the code: neither may reach our log.
fn without_string_to_sign(message: &str) -> String {
    match message.find("server string to sign is") {
        Some(i) => format!("{}[string to sign withheld]", &message[..i]),
        None => message.to_owned(),
    }
}

impl Sender for AliyunSender {
    fn send<'a>(&'a self, msg: &'a Outgoing<'a>) -> BoxFuture<'a, Result<(), SmsError>> {
        Box::pin(async move {
            let response = self
                .client
                .post(&self.endpoint)
                .header(
                    reqwest::header::CONTENT_TYPE,
                    "application/x-www-form-urlencoded",
                )
                .header(reqwest::header::ACCEPT, "application/json")
                .body(self.body(msg))
                .send()
                .await
                .map_err(transport)?;
            let status = response.status();
            let body = response.text().await.map_err(transport)?;
            classify(status, &body)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::StatusCode;

    /// sms-providers.md 6.1 (a): the SMS documentation's SendSms example, byte for byte.
    #[test]
    fn published_sendsms_example() {
        let params = [
            ("AccessKeyId", "testId"),
            ("Action", "SendSms"),
            ("Format", "XML"),
            ("OutId", "123"),
            ("PhoneNumbers", "15300000001"),
            ("RegionId", "cn-hangzhou"),
            ("SignName", "阿里云短信测试专用"),
            ("SignatureMethod", "HMAC-SHA1"),
            ("SignatureNonce", "45e25e9b-0a6f-4070-8c85-2956eda1b466"),
            ("SignatureVersion", "1.0"),
            ("TemplateCode", "SMS_71390007"),
            ("TemplateParam", r#"{"customer":"test"}"#),
            ("Timestamp", "2017-07-12T02:42:19Z"),
            ("Version", "2017-05-25"),
        ];
        assert_eq!(
            canonical(&params),
            "AccessKeyId=testId&Action=SendSms&Format=XML&OutId=123&PhoneNumbers=15300000001&RegionId=cn-hangzhou&SignName=%E9%98%BF%E9%87%8C%E4%BA%91%E7%9F%AD%E4%BF%A1%E6%B5%8B%E8%AF%95%E4%B8%93%E7%94%A8&SignatureMethod=HMAC-SHA1&SignatureNonce=45e25e9b-0a6f-4070-8c85-2956eda1b466&SignatureVersion=1.0&TemplateCode=SMS_71390007&TemplateParam=%7B%22customer%22%3A%22test%22%7D&Timestamp=2017-07-12T02%3A42%3A19Z&Version=2017-05-25"
        );
        let signature = sign("GET", &params, "testSecret");
        assert_eq!(signature, "zJDF+Lrzhj/ThnlvIToysFRq6t4=");
        assert_eq!(encode(&signature), "zJDF%2BLrzhj%2FThnlvIToysFRq6t4%3D");
    }

    /// 6.1 (b): the generic RPC example, in both editions of the page; the order must
    /// come from sorting, not from how the parameters were listed.
    #[test]
    fn published_describe_regions_examples() {
        let mut params = vec![
            ("Timestamp", "2016-02-23T12:46:24Z"),
            ("Format", "XML"),
            ("AccessKeyId", "testid"),
            ("Action", "DescribeRegions"),
            ("SignatureMethod", "HMAC-SHA1"),
            ("SignatureNonce", "3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf"),
            ("Version", "2014-05-26"),
            ("SignatureVersion", "1.0"),
        ];
        assert_eq!(
            sign("GET", &params, "testsecret"),
            "OLeaidS1JvxuMvnyHOwuJ+uX5qY="
        );
        params[0].0 = "TimeStamp";
        assert_eq!(
            sign("GET", &params, "testsecret"),
            "CT9X0VtwR86fNWSnsc6v8YGOjuE="
        );
    }

    /// 6.1 (c): the HMAC-SHA1 primitive, from the Aliyun SDK core's tests.
    #[test]
    fn hmac_sha1_primitive() {
        let b64 = |key: &str, data: &str| {
            let mut mac = Hmac::<Sha1>::new_from_slice(key.as_bytes()).unwrap();
            mac.update(data.as_bytes());
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
        };
        assert_eq!(b64("secret", "source"), "Jv4yi8SobFhg5t1C7nWLbhBSFZQ=");
        assert_eq!(b64("secret", "中文unicode"), "szlfHs3WVaO/HgY3Cg7/uyXDaRw=");
    }

    #[test]
    fn pop_encoding_rules() {
        assert_eq!(encode("a b*c~d+e/f"), "a%20b%2Ac~d%2Be%2Ff");
    }

    #[test]
    fn nonces_are_fresh_uuid_v4() {
        let (a, b) = (nonce(), nonce());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert!(matches!(&a[19..20], "8" | "9" | "a" | "b"), "{a}");
    }

    #[test]
    fn answers_map_as_tabulated() {
        let ok = StatusCode::OK;
        let body = |code: &str| format!(r#"{{"Code":"{code}","Message":"m","RequestId":"r"}}"#);
        assert!(classify(ok, &body("OK")).is_ok());
        assert!(matches!(
            classify(ok, &body("isv.MOBILE_NUMBER_ILLEGAL")),
            Err(SmsError::InvalidPhone(_))
        ));
        assert!(matches!(
            classify(ok, &body("isv.BUSINESS_LIMIT_CONTROL")),
            Err(SmsError::RateLimited(_))
        ));
        assert!(matches!(
            classify(ok, &body("isv.DAY_LIMIT_CONTROL")),
            Err(SmsError::Refused(_))
        ));
        assert!(matches!(
            classify(StatusCode::BAD_REQUEST, &body("Throttling.User")),
            Err(SmsError::Transport(_))
        ));
        assert!(matches!(
            classify(StatusCode::SERVICE_UNAVAILABLE, &body("ServiceUnavailable")),
            Err(SmsError::Transport(_))
        ));
        assert!(matches!(
            classify(ok, "<SendSmsResponse/>"),
            Err(SmsError::Refused(_))
        ));
        // "OK" with an error status is not a success.
        assert!(classify(StatusCode::BAD_REQUEST, &body("OK")).is_err());
    }

    #[test]
    fn the_servers_string_to_sign_is_not_kept() {
        let body = r#"{"Code":"SignatureDoesNotMatch","Message":"Specified signature is not matched with our calculation. server string to sign is:POST&%2F&PhoneNumbers%3D13812345678%26TemplateParam%3D123456","RequestId":"r"}"#;
        let Err(SmsError::Refused(r)) = classify(StatusCode::BAD_REQUEST, body) else {
            panic!("not a refusal")
        };
        assert_eq!(r.code, "SignatureDoesNotMatch");
        assert!(!r.message.contains("13812345678"), "{}", r.message);
        assert!(!r.message.contains("123456"), "{}", r.message);
        assert!(r.message.starts_with("Specified signature is not matched"));
    }
}
