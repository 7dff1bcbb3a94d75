//! WeChat login (seed 000's `WX` login method): the OAuth round trip through WeChat and
//! the single-use grants that carry its result from one request to the next, kept in
//! the store so every instance of a cluster honours them.
//!
//! 1. `start` makes a `state` (128 random bits, 10 minutes) remembering where to go
//!    after, and for a link, which account asked. The browser holds the same value in a
//!    cookie, so a callback is only honoured in the browser that started it.
//! 2. The callback takes the state (once), exchanges WeChat's code for the user's
//!    profile ([`client`]), and hands the page a ticket (60 seconds) for that profile.
//! 3. The exchange takes the ticket (once): a bound WeChat id logs in; an unbound one
//!    gets a bind token (10 minutes) to be spent, once, with a phone and its SMS code.
//!
//! Grants are stored under the SHA-256 of their token, never the token itself.

mod client;

use std::sync::Arc;

use rand::RngExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use self::client::WechatClient;
use crate::config::WechatConfig;
use crate::model::UserId;
use crate::store::{GrantKind, Grants, StoreError};

pub const STATE_TTL_SECS: i64 = 600;
pub const TICKET_TTL_SECS: i64 = 60;
pub const BIND_TTL_SECS: i64 = 600;

/// What the callback and the bind learnt of a WeChat user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WechatProfile {
    /// The unionid or openid, per `wechat.identity`: the `wechat` method's identification.
    pub id: String,
    pub nickname: String,
    pub avatar_url: Option<String>,
}

/// What a `state` remembers between the start and the callback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OauthState {
    /// Where the browser goes after the callback: a path on this site.
    pub next: String,
    /// For a link from a session: which session asked. The link is refused if that
    /// session has ended meanwhile (logged out, or every session ended).
    pub link: Option<LinkingSession>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkingSession {
    pub user_id: UserId,
    pub session_gen: u32,
    /// The session token's id, to tell a logout.
    pub jti: String,
    /// Its login session's revocation key, to tell that the session ended (none for a
    /// token from before sessions, and in states stored before this field).
    #[serde(default)]
    pub sid_key: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum WechatError {
    /// WeChat refused the code: unknown (40029), used (40163) or expired (42003).
    #[error("WeChat refused the authorization code ({0})")]
    CodeInvalid(i64),
    /// WeChat refused our own configuration; the text names the key.
    #[error("{0}")]
    Config(&'static str),
    /// WeChat is unreachable, too slow, busy twice, or answered what we cannot use.
    #[error("{0}")]
    Failed(String),
}

pub struct Wechat {
    client: WechatClient,
    grants: Arc<dyn Grants>,
}

impl Wechat {
    /// None when `wechat.enabled` is off.
    pub fn from_config(
        cfg: &WechatConfig,
        grants: Arc<dyn Grants>,
    ) -> anyhow::Result<Option<Self>> {
        if !cfg.enabled {
            return Ok(None);
        }
        Ok(Some(Wechat {
            client: WechatClient::new(cfg)?,
            grants,
        }))
    }

    /// A new state for `oauth` and the URL that sends the browser to WeChat with it.
    pub async fn start(
        &self,
        oauth: &OauthState,
        now: i64,
    ) -> Result<(String, String), StoreError> {
        let state = hex::encode(random::<16>());
        self.put(GrantKind::WechatState, &state, oauth, now + STATE_TTL_SECS)
            .await?;
        let url = self.client.authorize_url(&state);
        Ok((state, url))
    }

    /// Takes the state (once): what it remembers, if it was live.
    pub async fn take_state(
        &self,
        state: &str,
        now: i64,
    ) -> Result<Option<OauthState>, StoreError> {
        self.take(GrantKind::WechatState, state, now).await
    }

    pub async fn user_for_code(&self, code: &str) -> Result<WechatProfile, WechatError> {
        self.client.user_for_code(code).await
    }

    /// A new single-use token of `kind` for `profile`, valid `ttl` seconds.
    pub async fn grant(
        &self,
        kind: GrantKind,
        profile: &WechatProfile,
        now: i64,
        ttl: i64,
    ) -> Result<String, StoreError> {
        let token = base64_url(&random::<32>());
        self.put(kind, &token, profile, now + ttl).await?;
        Ok(token)
    }

    /// Takes a token of `kind` (once): its profile, if it was live.
    pub async fn redeem(
        &self,
        kind: GrantKind,
        token: &str,
        now: i64,
    ) -> Result<Option<WechatProfile>, StoreError> {
        self.take(kind, token, now).await
    }

    /// Forgets grants that expired.
    pub async fn prune(&self, now: i64) -> Result<usize, StoreError> {
        self.grants.prune_grants(now).await
    }

    async fn put<T: Serialize>(
        &self,
        kind: GrantKind,
        token: &str,
        value: &T,
        expires_at: i64,
    ) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value).map_err(|e| StoreError::Engine(e.to_string()))?;
        self.grants
            .put_grant(kind, digest(token), &bytes, expires_at)
            .await
    }

    async fn take<T: for<'de> Deserialize<'de>>(
        &self,
        kind: GrantKind,
        token: &str,
        now: i64,
    ) -> Result<Option<T>, StoreError> {
        // A token of another shape was never given out: no need to ask the store.
        if token.is_empty() || token.len() > 64 {
            return Ok(None);
        }
        match self.grants.take_grant(kind, digest(token)).await? {
            Some((bytes, expires_at)) if expires_at >= now => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| StoreError::Corrupt(format!("grant: {e}"))),
            _ => Ok(None),
        }
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn random<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    rand::rng().fill(&mut bytes[..]);
    bytes
}

fn base64_url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A WeChat id for the log: its first four and last two characters.
pub fn mask_id(id: &str) -> String {
    let n = id.chars().count();
    if n <= 8 {
        return "*".repeat(n);
    }
    id.chars()
        .enumerate()
        .map(|(i, c)| if i < 4 || i >= n - 2 { c } else { '*' })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wechat() -> (tempfile::TempDir, Wechat) {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::SledStore::open(dir.path(), 8).unwrap();
        let cfg = WechatConfig {
            enabled: true,
            app_id: "wx".into(),
            app_secret: crate::config::Secret::new("s"),
            redirect_uri: "https://a.example/cb".into(),
            ..WechatConfig::default()
        };
        let wechat = Wechat::from_config(&cfg, Arc::new(store)).unwrap().unwrap();
        (dir, wechat)
    }

    #[tokio::test]
    async fn a_late_ticket_or_state_is_refused_and_used_up() {
        let (_dir, w) = wechat();
        let profile = WechatProfile {
            id: "u1".into(),
            nickname: "n".into(),
            avatar_url: None,
        };
        let ticket = w
            .grant(GrantKind::WechatTicket, &profile, 1_000, TICKET_TTL_SECS)
            .await
            .unwrap();
        assert_eq!(
            w.redeem(GrantKind::WechatTicket, &ticket, 1_061)
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            w.redeem(GrantKind::WechatTicket, &ticket, 1_000)
                .await
                .unwrap(),
            None
        );
        let ticket = w
            .grant(GrantKind::WechatTicket, &profile, 1_000, TICKET_TTL_SECS)
            .await
            .unwrap();
        assert_eq!(
            w.redeem(GrantKind::WechatBind, &ticket, 1_000)
                .await
                .unwrap(),
            None,
            "another kind"
        );
        assert_eq!(
            w.redeem(GrantKind::WechatTicket, &ticket, 1_060)
                .await
                .unwrap(),
            Some(profile)
        );

        let oauth = OauthState {
            next: "/".into(),
            link: None,
        };
        let (state, url) = w.start(&oauth, 1_000).await.unwrap();
        assert_eq!(state.len(), 32, "128 bits, hex");
        assert!(url.contains(&format!("state={state}")));
        assert_eq!(w.take_state(&state, 1_601).await.unwrap(), None);
        let (state, _) = w.start(&oauth, 1_000).await.unwrap();
        assert_eq!(w.take_state(&state, 1_600).await.unwrap(), Some(oauth));
    }

    #[test]
    fn ids_are_masked_for_the_log() {
        assert_eq!(
            mask_id("o6_bmjrPTlm6_2sgVt7hMZOPfL2M"),
            "o6_b**********************2M"
        );
        assert_eq!(mask_id("short"), "*****");
    }
}
