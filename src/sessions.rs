//! Login sessions: one login (sms, password or WeChat) and the chain of refresh tokens
//! that follows it. Every access token names its session (`sid`).
//!
//! - A refresh token is 256 random bits (base64url), opaque; the store keeps only its
//!   SHA-256, so nothing copied out of the store works as a token.
//! - A refresh uses the token up and hands out its successor (rotation), in one atomic
//!   step of the store. The successor is not random: it is HMAC-SHA-256 of the used
//!   token under the server's `refresh` key. So a second use of a token within
//!   `token.refresh_reuse_interval_secs` (two tabs refreshing at once) gets the very same
//!   successor back without the store ever holding a successor's text, and racing
//!   refreshes of one token can never make two different live successors. Knowing a
//!   token still gives its successor only to whoever knows the key.
//! - A used token presented later than that is taken for a stolen copy: the session
//!   ends (its refresh tokens refused, its access tokens revoked by the session's
//!   revocation key, which every instance checks on every request) and the log says so.
//! - A bump of the user's `session_gen` (password reset, `smsauth user logout`, "log out
//!   everywhere") ends every session made before it; a disabled or deleted user has none.

use std::net::IpAddr;
use std::sync::Arc;

use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use rand::RngExt;
use sha2::{Digest, Sha256};

use crate::model::{Method, User, UserId};
use crate::store::{RefreshUse, SessionId, SessionRecord, Sessions, StoreError};

/// The most of a User-Agent a session keeps.
pub const USER_AGENT_MAX_CHARS: usize = 200;

/// A new refresh token, as a login or refresh answer gives it.
pub struct RefreshIssued {
    pub token: String,
    pub expires_in: u64,
}

/// What a refresh came to.
pub enum Refreshed {
    /// The session goes on with `refresh` as its refresh token.
    Ok {
        session: SessionRecord,
        refresh: RefreshIssued,
    },
    /// Unknown, expired, or of a session that has ended.
    Invalid,
    /// A used token came back after the reuse window: the session is ended now.
    Stolen(SessionRecord),
}

pub struct LoginSessions {
    store: Arc<dyn Sessions>,
    /// The HMAC key successors are derived with (the store's `refresh` key).
    key: Vec<u8>,
    refresh_ttl: i64,
    reuse_interval: i64,
    access_ttl: i64,
}

impl LoginSessions {
    pub fn new(
        store: Arc<dyn Sessions>,
        key: Vec<u8>,
        cfg: &crate::config::TokenConfig,
    ) -> LoginSessions {
        LoginSessions {
            store,
            key,
            refresh_ttl: cfg.refresh_ttl_secs as i64,
            reuse_interval: cfg.refresh_reuse_interval_secs as i64,
            access_ttl: cfg.access_ttl_secs as i64,
        }
    }

    /// Starts a session for a login of `user` by `method`; its first refresh token.
    /// Durable after the next store flush.
    pub async fn start(
        &self,
        user: &User,
        method: Method,
        ip: IpAddr,
        user_agent: &str,
        now: i64,
    ) -> Result<(SessionId, RefreshIssued), StoreError> {
        let mut id = [0u8; 16];
        rand::rng().fill(&mut id);
        let mut raw = [0u8; 32];
        rand::rng().fill(&mut raw);
        let token = b64(&raw);
        let session = SessionRecord {
            id,
            user_id: user.id,
            session_gen: user.session_gen,
            method,
            created_at: now,
            last_used_at: now,
            expires_at: now + self.refresh_ttl,
            ip: mask_ip(ip),
            user_agent: cut_user_agent(user_agent),
            ended: false,
        };
        self.store.create_session(&session, digest(&token)).await?;
        let refresh = RefreshIssued {
            token,
            expires_in: self.refresh_ttl as u64,
        };
        Ok((id, refresh))
    }

    /// Uses up `token` and gives its successor (see the module doc). Whether the
    /// session's user may still have it (enabled, same `session_gen`) is the caller's
    /// check. Durable after the next store flush.
    pub async fn refresh(&self, token: &str, now: i64) -> Result<Refreshed, StoreError> {
        if !well_formed(token) {
            return Ok(Refreshed::Invalid);
        }
        let successor = self.successor(token);
        let expires_at = now + self.refresh_ttl;
        let used = self
            .store
            .use_refresh(digest(token), digest(&successor), now, expires_at)
            .await?;
        let (session, expires_at) = match used {
            RefreshUse::Invalid => return Ok(Refreshed::Invalid),
            RefreshUse::Rotated(session) => (session, expires_at),
            RefreshUse::Used { session, used_at } if now - used_at <= self.reuse_interval => {
                (session, used_at + self.refresh_ttl)
            }
            RefreshUse::Used { session, used_at } => {
                self.end(session.user_id, session.id, now).await?;
                tracing::warn!(
                    user_id = session.user_id,
                    session = %hex::encode(session.id),
                    used_secs_ago = now - used_at,
                    "a used refresh token was presented again: taken as stolen, the session is ended"
                );
                return Ok(Refreshed::Stolen(session));
            }
        };
        Ok(Refreshed::Ok {
            session,
            refresh: RefreshIssued {
                token: successor,
                expires_in: (expires_at - now).max(0) as u64,
            },
        })
    }

    /// Ends session `id` of `user`: its refresh tokens and access tokens are refused at
    /// once, on every instance. False if it was not live. Durable after the next flush.
    pub async fn end(&self, user: UserId, id: SessionId, now: i64) -> Result<bool, StoreError> {
        // An access token of the session lives `access_ttl` at most from now.
        self.store
            .end_session(user, id, now + self.access_ttl)
            .await
    }

    /// The user's live sessions, oldest first.
    pub async fn list(&self, user: &User, now: i64) -> Result<Vec<SessionRecord>, StoreError> {
        let mut sessions = self.store.user_sessions(user.id).await?;
        sessions.retain(|s| live(s, user, now));
        sessions.sort_by_key(|s| (s.created_at, s.id));
        Ok(sessions)
    }

    /// Deletes ended and expired sessions and expired refresh tokens.
    pub async fn prune(&self, now: i64) -> Result<usize, StoreError> {
        self.store.prune_sessions(now).await
    }

    fn successor(&self, token: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(b"smsauth refresh successor\0");
        mac.update(token.as_bytes());
        b64(&mac.finalize().into_bytes())
    }
}

/// Whether `session` still counts for `user`: not ended, not expired, and made in the
/// user's current session generation.
pub fn live(session: &SessionRecord, user: &User, now: i64) -> bool {
    !session.ended
        && session.expires_at >= now
        && session.user_id == user.id
        && session.session_gen == user.session_gen
        && !user.disabled
}

/// A session id as the API shows it (and as the `sid` claim carries it).
pub fn id_text(id: &SessionId) -> String {
    hex::encode(id)
}

pub fn parse_id(text: &str) -> Option<SessionId> {
    let mut id = [0u8; 16];
    hex::decode_to_slice(text, &mut id).ok()?;
    Some(id)
}

/// A User-Agent as sessions and the login activity keep it: its first 200 characters.
pub fn cut_user_agent(user_agent: &str) -> String {
    user_agent.chars().take(USER_AGENT_MAX_CHARS).collect()
}

/// A client address as logs and session lists show it: its /24 (IPv4) or /48 (IPv6).
pub fn mask_ip(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            format!("{a}.{b}.{c}.0/24")
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => mask_ip(IpAddr::V4(v4)),
            None => {
                let s = v6.segments();
                let net = std::net::Ipv6Addr::new(s[0], s[1], s[2], 0, 0, 0, 0, 0);
                format!("{net}/48")
            }
        },
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// 32 bytes in base64url without padding: 43 characters.
fn well_formed(token: &str) -> bool {
    token.len() == 43
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_masked_to_their_network() {
        assert_eq!(mask_ip("203.0.113.77".parse().unwrap()), "203.0.113.0/24");
        assert_eq!(
            mask_ip("2001:db8:1:2:3::9".parse().unwrap()),
            "2001:db8:1::/48"
        );
        assert_eq!(mask_ip("::ffff:10.1.2.3".parse().unwrap()), "10.1.2.0/24");
    }

    #[test]
    fn ids_parse_back_and_tokens_have_one_shape() {
        let id = [7u8; 16];
        assert_eq!(parse_id(&id_text(&id)), Some(id));
        assert_eq!(parse_id("zz"), None);
        assert!(well_formed(&b64(&[1u8; 32])));
        assert!(!well_formed("short"));
        assert!(!well_formed(&format!("{}=", &b64(&[1u8; 32])[..42])));
    }
}
