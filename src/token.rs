//! Tokens: JWT (HS256, algorithm pinned on validation) for sessions and for the short-lived
//! single-use verification tickets of multi-step flows.
//!
//! A session ends three ways: its `exp`; logout, which records its `jti` as revoked (kept
//! in the store until the token would have expired, and in memory for the per-request
//! check); or a bump of the user's `session_gen`, which every token carries, so a reset
//! or an admin can end all of a user's sessions without listing them.

use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, decode, encode};
use rand::RngExt;
use serde::{Deserialize, Serialize};

use crate::clock::now;
use crate::config::TokenConfig;
use crate::model::{Purpose, User, UserId};
use crate::sharded::BoundedMap;
use crate::store::{Sessions, StoreError};

/// How long a verification ticket from /auth/verify may wait for the next step.
pub const VERIFICATION_TTL_SECS: u64 = 600;

const SESSION: &str = "session";
const VERIFICATION: &str = "verification";

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    /// User id (sessions) or E.164 phone (verification tickets).
    sub: String,
    iat: i64,
    exp: i64,
    jti: String,
    iss: String,
    /// Which kind of token this is, so a ticket never passes as a session or back.
    typ: String,
    /// The user's session generation when issued.
    #[serde(default, rename = "gen")]
    session_gen: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    purpose: Option<Purpose>,
}

/// A verified session token.
#[derive(Debug, Clone)]
pub struct Session {
    pub user_id: UserId,
    pub jti: String,
    pub exp: i64,
    pub session_gen: u32,
}

pub struct Issued {
    pub token: String,
    pub expires_in: u64,
}

pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    issuer: String,
    ttl_secs: u64,
    /// Session tokens already checked: a client sends the same one with every request,
    /// and checking it anew (base64, JSON, HMAC) was a fifth of the work of GET /me.
    /// Expiry is still checked on every use, revocation by the caller's store read.
    verified: CheckedTokens,
    store: Arc<dyn Sessions>,
}

/// Session tokens whose check is remembered, at most, unless
/// [`Tokens::remembering`] says otherwise (`memory.token_cache_entries`).
const VERIFIED_CAPACITY: usize = 16_384;
const VERIFIED_SHARDS: usize = 16;

/// Checked session tokens by their exact text. A full shard drops its expired sessions,
/// and if none are, empties; its tokens are checked anew on their next use (4 µs each).
/// This is on the path of every authenticated request, where a moka lookup took 1.4 µs
/// and a shard's map 0.3 µs. Only genuine tokens get in, so the keys cannot be chosen
/// to collide; the hashers are seeded per process all the same.
type CheckedTokens = BoundedMap<Box<str>, Session>;

impl Tokens {
    pub fn new(secret: &[u8], cfg: &TokenConfig, store: Arc<dyn Sessions>) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[cfg.issuer.as_str()]);
        validation.set_required_spec_claims(&["exp", "iat", "iss", "sub", "jti"]);
        validation.leeway = 0;
        Tokens {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            issuer: cfg.issuer.clone(),
            ttl_secs: cfg.ttl_secs,
            verified: BoundedMap::new(VERIFIED_CAPACITY, VERIFIED_SHARDS),
            store,
        }
    }

    /// Remembers the checks of `entries` session tokens at most.
    pub fn remembering(mut self, entries: usize) -> Self {
        self.verified = BoundedMap::new(entries, VERIFIED_SHARDS);
        self
    }

    pub fn ttl_secs(&self) -> u64 {
        self.ttl_secs
    }

    pub fn issue_session(&self, user: &User) -> Issued {
        self.issue(
            user.id.to_string(),
            SESSION,
            user.session_gen,
            None,
            self.ttl_secs,
        )
    }

    /// The session behind `token`, if it is genuine and current. Whether it was logged out,
    /// and whether its user still exists, is enabled and has the same `session_gen`, is
    /// the caller's check ([`Sessions::session_user`], which reads the user anyway).
    pub fn verify_session(&self, token: &str) -> Option<Session> {
        let session = match self.verified.get(token) {
            // As jsonwebtoken decides with leeway 0: valid through the second of `exp`.
            Some(s) if s.exp >= now() => s,
            Some(_) => return None,
            None => {
                let claims = self.decode(token, SESSION)?;
                let session = Session {
                    user_id: claims.sub.parse().ok()?,
                    jti: claims.jti,
                    exp: claims.exp,
                    session_gen: claims.session_gen,
                };
                let now = now();
                self.verified
                    .insert(token.into(), session.clone(), |s| s.exp < now);
                session
            }
        };
        Some(session)
    }

    pub fn issue_verification(&self, phone: &str, purpose: Purpose) -> Issued {
        self.issue(
            phone.to_owned(),
            VERIFICATION,
            0,
            Some(purpose),
            VERIFICATION_TTL_SECS,
        )
    }

    /// Uses up a verification ticket for `phone` and `purpose`; false if it is not one.
    /// Single use: of concurrent redemptions exactly one succeeds (the store's revoke is
    /// first-wins). Durable after the next store flush.
    pub async fn redeem_verification(
        &self,
        token: &str,
        phone: &str,
        purpose: Purpose,
    ) -> Result<bool, StoreError> {
        let Some(claims) = self.decode(token, VERIFICATION) else {
            return Ok(false);
        };
        if claims.purpose != Some(purpose) || claims.sub != phone {
            return Ok(false);
        }
        self.revoke(&claims.jti, claims.exp).await
    }

    /// Ends one token. True if this call ended it. Durable after the next store flush.
    pub async fn revoke(&self, jti: &str, exp: i64) -> Result<bool, StoreError> {
        self.store.revoke(jti, exp).await
    }

    /// Forgets revocations of tokens past their expiry.
    pub async fn prune(&self) -> Result<usize, StoreError> {
        self.store.prune_revocations(now()).await
    }

    fn issue(
        &self,
        sub: String,
        typ: &str,
        session_gen: u32,
        purpose: Option<Purpose>,
        ttl: u64,
    ) -> Issued {
        let iat = now();
        let mut jti = [0u8; 16];
        rand::rng().fill(&mut jti);
        let claims = Claims {
            sub,
            iat,
            exp: iat + ttl as i64,
            jti: hex::encode(jti),
            iss: self.issuer.clone(),
            typ: typ.to_owned(),
            session_gen,
            purpose,
        };
        let token = encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing with an HMAC key cannot fail");
        Issued {
            token,
            expires_in: ttl,
        }
    }

    fn decode(&self, token: &str, typ: &str) -> Option<Claims> {
        if token.len() > 4096 {
            return None;
        }
        let claims = decode::<Claims>(token, &self.decoding, &self.validation)
            .ok()?
            .claims;
        (claims.typ == typ).then_some(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;
    use base64::Engine;

    fn b64(data: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
    }

    fn tokens() -> (tempfile::TempDir, Tokens) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SledStore::open(dir.path(), 8).unwrap());
        let t = Tokens::new(&[9; 32], &TokenConfig::default(), store);
        (dir, t)
    }

    fn user() -> User {
        User {
            id: 42,
            phone: "+8613812345678".into(),
            nickname: "n".into(),
            created_at: 0,
            last_login_at: None,
            disabled: false,
            session_gen: 3,
            avatar_url: None,
        }
    }

    #[tokio::test]
    async fn session_round_trip_and_revocation() {
        let (_d, t) = tokens();
        let issued = t.issue_session(&user());
        let s = t.verify_session(&issued.token).unwrap();
        assert_eq!((s.user_id, s.session_gen), (42, 3));
        assert!(!t.store.is_revoked(&s.jti).await.unwrap());
        assert!(t.revoke(&s.jti, s.exp).await.unwrap());
        assert!(!t.revoke(&s.jti, s.exp).await.unwrap(), "first wins");
        assert!(t.store.is_revoked(&s.jti).await.unwrap());
    }

    #[test]
    fn alg_none_and_other_issuers_are_refused() {
        let (_d, t) = tokens();
        let now = now();
        let payload = format!(
            r#"{{"sub":"42","iat":{now},"exp":{},"jti":"x","iss":"smsauth","typ":"session","gen":3}}"#,
            now + 100
        );
        let none = format!(
            "{}.{}.",
            b64(br#"{"alg":"none","typ":"JWT"}"#),
            b64(payload.as_bytes())
        );
        assert!(t.verify_session(&none).is_none());
        let hs512 = encode(
            &Header::new(Algorithm::HS512),
            &serde_json::from_str::<serde_json::Value>(&payload).unwrap(),
            &EncodingKey::from_secret(&[9; 32]),
        )
        .unwrap();
        assert!(t.verify_session(&hs512).is_none());
        let other_issuer = TokenConfig {
            issuer: "someone-else".into(),
            ..Default::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let other = Tokens::new(
            &[9; 32],
            &other_issuer,
            Arc::new(SledStore::open(dir.path(), 8).unwrap()),
        );
        assert!(
            t.verify_session(&other.issue_session(&user()).token)
                .is_none()
        );
    }

    #[test]
    fn remembered_checks_stay_under_their_bound() {
        let (_d, t) = tokens();
        for id in 0..(2 * VERIFIED_CAPACITY as u64) {
            let token = t.issue_session(&User { id, ..user() }).token;
            assert_eq!(t.verify_session(&token).unwrap().user_id, id);
            assert!(
                t.verified.get(token.as_str()).is_some(),
                "the check just made is kept"
            );
            assert!(t.verified.entries() <= VERIFIED_CAPACITY);
        }
    }

    #[tokio::test]
    async fn tickets_and_sessions_do_not_mix_and_tickets_are_single_use() {
        let (_d, t) = tokens();
        let phone = "+8613812345678";
        let ticket = t.issue_verification(phone, Purpose::Register);
        let session = t.issue_session(&user()).token;
        assert!(t.verify_session(&ticket.token).is_none());
        assert!(
            !t.redeem_verification(&session, phone, Purpose::Register)
                .await
                .unwrap()
        );
        assert!(
            !t.redeem_verification(&ticket.token, phone, Purpose::ResetPassword)
                .await
                .unwrap()
        );
        assert!(
            !t.redeem_verification(&ticket.token, "+8613900000000", Purpose::Register)
                .await
                .unwrap()
        );
        assert!(
            t.redeem_verification(&ticket.token, phone, Purpose::Register)
                .await
                .unwrap()
        );
        assert!(
            !t.redeem_verification(&ticket.token, phone, Purpose::Register)
                .await
                .unwrap()
        );
    }
}
