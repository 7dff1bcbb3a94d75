//! Image captchas in front of SMS sending. A challenge is a PNG of distorted characters
//! from an alphabet without look-alikes; only its answer is kept, in a bounded moka
//! cache with a TTL, and the first check of an id removes it, right or wrong. Pending
//! captchas do not survive a restart: a user simply asks for a new one.

use std::time::Duration;

use base64::Engine;
use captcha::Captcha;
use captcha::filters::{Noise, Wave};
use moka::future::Cache;
use rand::RngExt;
use subtle::ConstantTimeEq;

use crate::config::CaptchaConfig;

/// No 0/O, no 1/I/L: what a person reads is what they type. Upper case only; answers
/// are compared case-insensitively.
const ALPHABET: &[char] = &[
    '2', '3', '4', '5', '6', '7', '8', '9', 'A', 'B', 'C', 'D', 'E', 'F', 'G', 'H', 'J', 'K', 'M',
    'N', 'P', 'Q', 'R', 'S', 'T', 'U', 'V', 'W', 'X', 'Y', 'Z',
];

/// Pending captchas held at most; past that the oldest go first.
const CAPACITY: u64 = 100_000;

pub const WIDTH: u32 = 200;
pub const HEIGHT: u32 = 70;

pub struct Challenge {
    pub id: String,
    /// `data:image/png;base64,...`
    pub image: String,
    pub expires_in: u64,
}

pub struct Captchas {
    pending: Cache<String, String>,
    cfg: CaptchaConfig,
}

impl Captchas {
    pub fn new(cfg: &CaptchaConfig) -> Self {
        let pending = Cache::builder()
            .max_capacity(CAPACITY)
            .time_to_live(Duration::from_secs(cfg.ttl_secs))
            .build();
        Captchas {
            pending,
            cfg: cfg.clone(),
        }
    }

    pub fn required(&self) -> bool {
        self.cfg.required
    }

    /// Makes and remembers a new challenge. CPU-bound but short (see README,
    /// "Performance"), so it runs inline.
    pub async fn create(&self) -> Option<Challenge> {
        let (answer, png) = render(self.cfg.length)?;
        let mut id = [0u8; 16];
        rand::rng().fill(&mut id);
        let id = hex::encode(id);
        self.pending.insert(id.clone(), answer).await;
        let image = format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(png)
        );
        Some(Challenge {
            id,
            image,
            expires_in: self.cfg.ttl_secs,
        })
    }

    /// True if `answer` solves captcha `id`. The id is used up either way.
    pub async fn check(&self, id: &str, answer: &str) -> bool {
        let Some(expected) = self.pending.remove(id).await else {
            return false;
        };
        let given = answer.trim().to_ascii_uppercase();
        given.len() == expected.len() && bool::from(given.as_bytes().ct_eq(expected.as_bytes()))
    }
}

/// The answer and the PNG of a fresh challenge.
pub fn render(length: u32) -> Option<(String, Vec<u8>)> {
    let mut c = Captcha::new();
    c.set_chars(ALPHABET)
        .add_chars(length)
        .apply_filter(Noise::new(0.1))
        .apply_filter(Wave::new(2.0, 8.0).horizontal())
        .view(WIDTH, HEIGHT);
    c.as_tuple()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn single_use_and_case_insensitive() {
        let captchas = Captchas::new(&CaptchaConfig::default());
        let challenge = captchas.create().await.unwrap();
        assert!(
            challenge
                .image
                .starts_with("data:image/png;base64,iVBORw0KGgo")
        );
        let answer = captchas.pending.get(&challenge.id).await.unwrap();
        assert_eq!(answer.len(), 5);
        assert!(answer.chars().all(|c| ALPHABET.contains(&c)));
        assert!(
            captchas
                .check(&challenge.id, &answer.to_ascii_lowercase())
                .await
        );
        assert!(!captchas.check(&challenge.id, &answer).await, "used up");

        let wrong = captchas.create().await.unwrap();
        assert!(!captchas.check(&wrong.id, "nope").await);
        let right = captchas.pending.get(&wrong.id).await;
        assert!(right.is_none(), "a wrong answer uses the captcha up too");
    }
}
