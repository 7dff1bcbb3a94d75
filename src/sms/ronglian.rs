//! Ronglian Cloud (容联云通讯, cloopen) template SMS: `TemplateSMS` of REST version
//! 2013-12-26, authenticated by `sig` = upper-case MD5(sid + token + timestamp) in the
//! URL and `Authorization` = Base64(sid:timestamp), as /work/shared/sms-providers.md
//! section 2 specifies.

use std::time::Duration;

use base64::Engine;
use md5::{Digest, Md5};
use serde::Deserialize;

use super::{Outgoing, Refusal, Sender, SmsError, gateway_number, short, transport};
use crate::config::{RonglianConfig, Secret, Templates};
use crate::store::BoxFuture;

/// `yyyyMMddHHmmss` in Beijing time: the official SDKs send the local clock of a server
/// in China, so the gateway reads it as UTC+8 whatever our host's zone is.
fn timestamp(now: jiff::Timestamp) -> String {
    jiff::tz::Offset::constant(8)
        .to_datetime(now)
        .strftime("%Y%m%d%H%M%S")
        .to_string()
}

/// SigParameter: upper-case hex MD5(account_sid + auth_token + timestamp).
pub fn sig(account_sid: &str, auth_token: &str, timestamp: &str) -> String {
    let digest = Md5::digest(format!("{account_sid}{auth_token}{timestamp}").as_bytes());
    hex::encode_upper(digest)
}

/// `Authorization`: Base64(account_sid + ":" + timestamp), with the sig's timestamp.
pub fn authorization(account_sid: &str, timestamp: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{account_sid}:{timestamp}"))
}

pub struct RonglianSender {
    client: reqwest::Client,
    base_url: String,
    account_sid: String,
    auth_token: Secret,
    app_id: String,
    templates: Templates,
}

impl RonglianSender {
    pub fn new(cfg: &RonglianConfig, timeout: Duration) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder().timeout(timeout).build()?;
        Ok(Self {
            client,
            base_url: cfg.base_url.trim_end_matches('/').to_owned(),
            account_sid: cfg.account_sid.clone(),
            auth_token: cfg.auth_token.clone(),
            app_id: cfg.app_id.clone(),
            templates: cfg.template_id.clone(),
        })
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Answer {
    status_code: Option<serde_json::Value>,
    status_msg: Option<String>,
}

/// Turns the gateway's answer into ours, per the table in sms-providers.md 2.4.
fn classify(status: reqwest::StatusCode, body: &str) -> Result<(), SmsError> {
    if status.is_server_error() {
        return Err(SmsError::Transport(format!("gateway answered {status}")));
    }
    if !status.is_success() {
        return Err(SmsError::Refused(Refusal::new(
            status.as_str(),
            format!("gateway answered {status}"),
        )));
    }
    let answer: Option<Answer> = serde_json::from_str(body).ok();
    // The documentation shows a string; accept a number too rather than call a
    // success a failure.
    let code = match answer.as_ref().and_then(|a| a.status_code.as_ref()) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Number(n)) => format!("{:0>6}", n.to_string()),
        _ => {
            return Err(SmsError::Refused(Refusal::new(
                status.as_str(),
                "the gateway's answer is not TemplateSMS JSON",
            )));
        }
    };
    if code == "000000" {
        return Ok(());
    }
    let message = answer.and_then(|a| a.status_msg).unwrap_or_default();
    let refusal = Refusal::new(code, short(&message));
    Err(match refusal.code.as_str() {
        "160038" | "160039" | "160040" => SmsError::RateLimited(refusal),
        "160042" => SmsError::InvalidPhone(refusal),
        _ => SmsError::Refused(refusal),
    })
}

impl Sender for RonglianSender {
    fn send<'a>(&'a self, msg: &'a Outgoing<'a>) -> BoxFuture<'a, Result<(), SmsError>> {
        Box::pin(async move {
            let ts = timestamp(jiff::Timestamp::now());
            let sid = &self.account_sid;
            let url = format!(
                "{}/2013-12-26/Accounts/{sid}/SMS/TemplateSMS?sig={}",
                self.base_url,
                sig(sid, self.auth_token.expose(), &ts)
            );
            let body = serde_json::json!({
                "to": gateway_number(msg.phone),
                "appId": self.app_id,
                "templateId": self.templates.get(msg.purpose),
                "datas": [msg.code, (msg.expires_in / 60).to_string()],
            });
            let response = self
                .client
                .post(url)
                .header(reqwest::header::ACCEPT, "application/json")
                .header(
                    reqwest::header::CONTENT_TYPE,
                    "application/json;charset=utf-8",
                )
                .header(reqwest::header::AUTHORIZATION, authorization(sid, &ts))
                .body(body.to_string())
                .send()
                .await
                .map_err(transport)?;
            let status = response.status();
            let text = response.text().await.map_err(transport)?;
            classify(status, &text)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::StatusCode;

    /// sms-providers.md 6.3: no unmasked published example exists; the MD5 primitive
    /// (RFC 1321) and the documentation's Authorization, as far as it is unmasked.
    #[test]
    fn published_checks() {
        assert_eq!(sig("ab", "c", ""), "900150983CD24FB0D6963F7D28E17F72");
        let auth = authorization("ff8080813c37da53013c804f8072007c", "20130201155306");
        assert_eq!(
            auth,
            "ZmY4MDgwODEzYzM3ZGE1MzAxM2M4MDRmODA3MjAwN2M6MjAxMzAyMDExNTUzMDY="
        );
        let masked_doc_example = "ZmY4MDgwODEzYzM3ZGE1MzAxM2M4MDRmODA3MjAwN2M6MjAxMzAyMDExNTABCDE=";
        assert_eq!(auth[..58], masked_doc_example[..58]);
    }

    #[test]
    fn timestamp_is_beijing_time() {
        let utc: jiff::Timestamp = "2013-02-01T07:53:06Z".parse().unwrap();
        assert_eq!(timestamp(utc), "20130201155306");
        let late: jiff::Timestamp = "2024-12-31T16:30:00Z".parse().unwrap();
        assert_eq!(timestamp(late), "20250101003000");
    }

    #[test]
    fn answers_map_as_tabulated() {
        let ok = StatusCode::OK;
        let body = |code: &str| format!(r#"{{"statusCode":"{code}","statusMsg":"m"}}"#);
        assert!(classify(ok, &body("000000")).is_ok());
        for limit in ["160038", "160039", "160040"] {
            assert!(matches!(
                classify(ok, &body(limit)),
                Err(SmsError::RateLimited(_))
            ));
        }
        assert!(matches!(
            classify(ok, &body("160042")),
            Err(SmsError::InvalidPhone(_))
        ));
        assert!(matches!(
            classify(ok, &body("111109")),
            Err(SmsError::Refused(_))
        ));
        assert!(matches!(
            classify(StatusCode::BAD_GATEWAY, ""),
            Err(SmsError::Transport(_))
        ));
        assert!(matches!(
            classify(StatusCode::NOT_FOUND, ""),
            Err(SmsError::Refused(_))
        ));
        assert!(matches!(classify(ok, "<html/>"), Err(SmsError::Refused(_))));
    }
}
