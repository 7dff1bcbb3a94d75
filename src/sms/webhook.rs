//! The webhook sender: POSTs `{phone, code, purpose, expires_in}` to a URL of the site's
//! own, signed with `X-Smsauth-Signature: sha256=<hex HMAC-SHA256(secret, body)>` so the
//! receiver can check it came from us. Any 2xx means sent.

use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::{Outgoing, Refusal, Sender, SmsError, transport};
use crate::config::WebhookConfig;
use crate::store::BoxFuture;

pub const SIGNATURE_HEADER: &str = "X-Smsauth-Signature";

pub struct WebhookSender {
    client: reqwest::Client,
    url: String,
    secret: Vec<u8>,
}

impl WebhookSender {
    pub fn new(cfg: &WebhookConfig, timeout: Duration) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder().timeout(timeout).build()?;
        Ok(Self {
            client,
            url: cfg.url.clone(),
            secret: cfg.secret.expose().as_bytes().to_vec(),
        })
    }
}

/// `sha256=<lower-case hex HMAC-SHA256(secret, body)>`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

impl Sender for WebhookSender {
    fn send<'a>(&'a self, msg: &'a Outgoing<'a>) -> BoxFuture<'a, Result<(), SmsError>> {
        Box::pin(async move {
            // Sign exactly the bytes we send.
            let body = serde_json::to_vec(&serde_json::json!({
                "phone": msg.phone.as_str(),
                "code": msg.code,
                "purpose": msg.purpose.as_str(),
                "expires_in": msg.expires_in,
            }))
            .expect("JSON of strings and numbers");
            let response = self
                .client
                .post(&self.url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header(SIGNATURE_HEADER, signature(&self.secret, &body))
                .body(body)
                .send()
                .await
                .map_err(transport)?;
            let status = response.status();
            if status.is_success() {
                Ok(())
            } else if status.is_server_error() {
                Err(SmsError::Transport(format!("webhook answered {status}")))
            } else {
                Err(SmsError::Refused(Refusal::new(
                    status.as_str(),
                    format!("webhook answered {status}"),
                )))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc4231_case_2() {
        assert_eq!(
            super::signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
