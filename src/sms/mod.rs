//! Sending codes. A [`Sender`] per provider, chosen by `sms.provider`; [`Sms`] wraps the
//! chosen one with the send budget (`sms.timeout_secs`) and the retry policy, so no
//! provider can hold a request longer than that and every provider retries the same way.

mod aliyun;
mod log;
mod ronglian;
mod webhook;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::RngExt;
use tokio::time::Instant;

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

/// What the provider said when it refused a message: kept apart so the log line can
/// carry them as fields an operator can search for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The provider's own code (`isv.MOBILE_NUMBER_ILLEGAL`, `160038`, an HTTP status).
    pub code: String,
    pub message: String,
    /// The provider's id of the request, for its support desk.
    pub request_id: Option<String>,
}

impl Refusal {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
            request_id: None,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// Why a send failed. Messages are for the log and name no secret.
#[derive(Debug, thiserror::Error)]
pub enum SmsError {
    /// Transport trouble: connect error, timeout, 5xx, account-wide throttling.
    /// The message did not get through; another attempt may.
    #[error("transport: {0}")]
    Transport(String),
    /// The provider answered and said no. Asking again would get the same answer.
    #[error("refused: {0}")]
    Refused(Refusal),
    /// The provider says the number cannot receive messages.
    #[error("the provider rejected the number: {0}")]
    InvalidPhone(Refusal),
    /// The provider's own per-number frequency or daily limit.
    #[error("the provider's rate limit: {0}")]
    RateLimited(Refusal),
}

impl SmsError {
    /// Only transport trouble is worth another attempt; a provider's answer about the
    /// message would repeat, and SendSms-like calls are not idempotent.
    pub fn is_retryable(&self) -> bool {
        matches!(self, SmsError::Transport(_))
    }

    pub fn outcome(&self) -> Outcome {
        match self {
            SmsError::Transport(_) => Outcome::Failed,
            SmsError::Refused(_) | SmsError::InvalidPhone(_) | SmsError::RateLimited(_) => {
                Outcome::Rejected
            }
        }
    }

    pub fn refusal(&self) -> Option<&Refusal> {
        match self {
            SmsError::Transport(_) => None,
            SmsError::Refused(r) | SmsError::InvalidPhone(r) | SmsError::RateLimited(r) => Some(r),
        }
    }
}

/// How one send ended, as a label for logs and metrics: `ok`, `rejected` (the provider
/// answered no) or `failed` (it could not be reached in time: an outage looks like this).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Rejected,
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Rejected => "rejected",
            Outcome::Failed => "failed",
        }
    }
}

pub trait Sender: Send + Sync {
    /// One attempt. [`Sms`] bounds it in time and decides whether to try again, so a
    /// sender must build every attempt afresh (new timestamp, new nonce).
    fn send<'a>(&'a self, msg: &'a Outgoing<'a>) -> BoxFuture<'a, Result<(), SmsError>>;
}

/// The first wait between attempts; it doubles after each, plus up to as much again
/// at random so many servers throttled at once do not come back in step.
const BACKOFF: Duration = Duration::from_millis(100);
/// Aliyun recommends at least a second per call; a shorter attempt would cut off
/// answers that were on their way, and SendSms may deliver even when cut off.
const MIN_ATTEMPT: Duration = Duration::from_secs(1);

pub struct Sms {
    provider: Provider,
    sender: Box<dyn Sender>,
    timeout: Duration,
    retries: u32,
    /// Running average of successful sends, in microseconds: how long a request that
    /// sends nothing waits so its timing matches one that sends (see [`Sms::imitate`]).
    typical_micros: AtomicU64,
}

impl Sms {
    pub fn from_config(cfg: &SmsConfig) -> anyhow::Result<Self> {
        let timeout = Duration::from_secs(cfg.timeout_secs);
        let sender: Box<dyn Sender> = match cfg.provider {
            Provider::Log => Box::new(log::LogSender),
            Provider::Webhook => Box::new(webhook::WebhookSender::new(&cfg.webhook, timeout)?),
            Provider::Aliyun => Box::new(aliyun::AliyunSender::new(&cfg.aliyun, timeout)?),
            Provider::Ronglian => Box::new(ronglian::RonglianSender::new(&cfg.ronglian, timeout)?),
        };
        Ok(Sms {
            provider: cfg.provider,
            sender,
            timeout,
            retries: cfg.retries,
            typical_micros: AtomicU64::new(0),
        })
    }

    /// Takes about as long as a successful send, sending nothing. For answers that must
    /// not tell, by their timing, whether a message went out (a reset code for a phone
    /// without an account).
    pub async fn imitate(&self) {
        let typical = self.typical_micros.load(Ordering::Relaxed);
        if typical > 0 {
            let jittered = typical as f64 * rand::rng().random_range(0.8..1.2);
            tokio::time::sleep(Duration::from_micros(jittered as u64)).await;
        }
    }

    fn learn_duration(&self, took: Duration) {
        let took = took.as_micros().min(u64::MAX as u128) as u64;
        let old = self.typical_micros.load(Ordering::Relaxed);
        // An average over roughly the last 16 sends; races only blur it a little.
        let new = if old == 0 {
            took
        } else {
            old - old / 16 + took / 16
        };
        self.typical_micros.store(new, Ordering::Relaxed);
    }

    pub fn provider(&self) -> &'static str {
        self.provider.as_str()
    }

    /// Sends within `timeout_secs`, retrying transport failures up to `retries` times,
    /// and writes one log line saying how it went.
    pub async fn send(&self, msg: &Outgoing<'_>) -> Result<(), SmsError> {
        let started = Instant::now();
        let (result, attempts) = self.attempt_all(msg).await;
        if result.is_ok() {
            self.learn_duration(started.elapsed());
        }
        self.record(msg, &result, attempts);
        result
    }

    async fn attempt_all(&self, msg: &Outgoing<'_>) -> (Result<(), SmsError>, u32) {
        let deadline = Instant::now() + self.timeout;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let left = deadline.saturating_duration_since(Instant::now());
            // Share what is left among the attempts still allowed, so a hung attempt
            // leaves room for another on a fresh connection.
            let attempts_left = self.retries + 2 - attempts;
            let limit = (left / attempts_left).max(MIN_ATTEMPT).min(left);
            let result = match tokio::time::timeout(limit, self.sender.send(msg)).await {
                Ok(result) => result,
                Err(_) => Err(SmsError::Transport(format!("no answer within {limit:?}"))),
            };
            let error = match result {
                Ok(()) => return (Ok(()), attempts),
                Err(e) if e.is_retryable() && attempts <= self.retries => e,
                Err(e) => return (Err(e), attempts),
            };
            let base = BACKOFF * 2u32.pow(attempts - 1);
            let jitter = base.mul_f64(rand::rng().random::<f64>());
            let wake = Instant::now() + base + jitter;
            if wake + Duration::from_millis(50) >= deadline {
                return (Err(error), attempts);
            }
            tracing::debug!(provider = self.provider(), attempt = attempts, error = %error, "sms attempt failed; retrying");
            tokio::time::sleep_until(wake).await;
        }
    }

    /// The one log line per send. Metrics hook in here: `outcome` is the label.
    fn record(&self, msg: &Outgoing<'_>, result: &Result<(), SmsError>, attempts: u32) {
        let phone = msg.phone.masked();
        match result {
            Ok(()) => tracing::info!(
                provider = self.provider(),
                result = Outcome::Ok.as_str(),
                attempts,
                phone = %phone,
                purpose = msg.purpose.as_str(),
                "sms sent"
            ),
            Err(e) => {
                let refusal = e.refusal();
                tracing::warn!(
                    provider = self.provider(),
                    result = e.outcome().as_str(),
                    attempts,
                    phone = %phone,
                    purpose = msg.purpose.as_str(),
                    provider_code = refusal.map(|r| r.code.as_str()),
                    provider_message = refusal.map(|r| r.message.as_str()),
                    provider_request_id = refusal.and_then(|r| r.request_id.as_deref()),
                    error = %e,
                    "sms not sent"
                )
            }
        }
    }
}

/// What a Chinese gateway expects in its number field: the national number for
/// mainland China (both providers document it), else the digits with the country code.
fn gateway_number(phone: &Phone) -> &str {
    let e164 = phone.as_str();
    e164.strip_prefix("+86")
        .or_else(|| e164.strip_prefix('+'))
        .unwrap_or(e164)
}

/// Keeps a provider's message fit for one log line: bounded, on one line.
fn short(message: &str) -> String {
    const MAX: usize = 200;
    let one_line: String = message
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    match one_line.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &one_line[..i]),
        None => one_line,
    }
}

/// Maps a reqwest failure to a transport error, without the URL: Ronglian's carries
/// the request signature, a webhook's may carry the receiver's token.
fn transport(e: reqwest::Error) -> SmsError {
    SmsError::Transport(e.without_url().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_numbers() {
        assert_eq!(
            gateway_number(&Phone::from_e164("+8613812345678")),
            "13812345678"
        );
        assert_eq!(
            gateway_number(&Phone::from_e164("+85291234567")),
            "85291234567"
        );
    }

    #[test]
    fn short_messages_stay_one_bounded_line() {
        assert_eq!(short("a\nb"), "a b");
        let long = "字".repeat(300);
        assert_eq!(short(&long).chars().count(), 201);
    }
}
