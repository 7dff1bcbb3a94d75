//! Sending codes. A [`Sender`] per provider, chosen by `sms.provider`; [`Sms`] wraps the
//! chosen one with the send budget (`sms.timeout_secs`) so no provider can hold a
//! request longer than that.

mod log;
mod webhook;

use std::time::Duration;

use crate::config::{Provider, SmsConfig};
use crate::model::Purpose;
use crate::phone::Phone;
use crate::store::BoxFuture;

/// One message to send.
pub struct Outgoing<'a> {
    pub phone: &'a Phone,
    pub code: &'a str,
    pub purpose: Purpose,
    pub expires_in: u64,
}

/// Why a send failed. Messages are for the log and name no secret.
#[derive(Debug, thiserror::Error)]
pub enum SmsError {
    /// Transport trouble: connect error, timeout, 5xx. Worth retrying later.
    #[error("transport: {0}")]
    Transport(String),
    /// The provider answered and said no.
    #[error("refused: {0}")]
    Refused(String),
    /// The provider says the number cannot receive messages.
    #[error("the provider rejected the number: {0}")]
    InvalidPhone(String),
    /// The provider's own per-number limit.
    #[error("the provider's rate limit: {0}")]
    RateLimited(String),
}

pub trait Sender: Send + Sync {
    fn send<'a>(&'a self, msg: &'a Outgoing<'a>) -> BoxFuture<'a, Result<(), SmsError>>;
}

pub struct Sms {
    provider: Provider,
    sender: Box<dyn Sender>,
    timeout: Duration,
}

impl Sms {
    pub fn from_config(cfg: &SmsConfig) -> anyhow::Result<Self> {
        let timeout = Duration::from_secs(cfg.timeout_secs);
        let sender: Box<dyn Sender> = match cfg.provider {
            Provider::Log => Box::new(log::LogSender),
            Provider::Webhook => Box::new(webhook::WebhookSender::new(&cfg.webhook, timeout)?),
        };
        Ok(Sms {
            provider: cfg.provider,
            sender,
            timeout,
        })
    }

    pub fn provider(&self) -> &'static str {
        self.provider.as_str()
    }

    pub async fn send(&self, msg: &Outgoing<'_>) -> Result<(), SmsError> {
        match tokio::time::timeout(self.timeout, self.sender.send(msg)).await {
            Ok(result) => result,
            Err(_) => Err(SmsError::Transport(format!(
                "no answer within {:?}",
                self.timeout
            ))),
        }
    }
}
