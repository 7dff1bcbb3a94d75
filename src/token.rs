//! Tokens: JWT for sessions and for the short-lived single-use verification tickets of
//! multi-step flows, signed and checked with the keys of [`crate::signing`] (ES256, EdDSA
//! or HS256; each key checks its own algorithm only, found by the token's `kid`).
//!
//! An access token ends four ways: its `exp`; its `jti` recorded as revoked (kept in the
//! store until the token would have expired, and in memory for the per-request check);
//! the end of its login session (`sid`, see [`crate::sessions`]), recorded the same way
//! under the session's revocation key; or a bump of the user's `session_gen`, which every
//! token carries, so a reset or an admin can end all of a user's sessions without listing
//! them.

use std::sync::Arc;

use bytes::Bytes;
use jsonwebtoken::{decode, decode_header, encode};
use rand::RngExt;
use serde::{Deserialize, Serialize};

use crate::clock::now;
use crate::config::TokenConfig;
use crate::model::{Purpose, User, UserId};
use crate::sharded::BoundedMap;
use crate::signing::{Alg, SigningKeys};
use crate::store::{SessionId, Sessions, StoreError, session_revocation_key};

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
    /// The login session (hex of its 128-bit id). Tokens issued before sessions had none;
    /// they stay valid until they expire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sid: Option<String>,
}

/// A verified session token.
#[derive(Debug, Clone)]
pub struct Session {
    pub user_id: UserId,
    pub jti: String,
    pub exp: i64,
    pub session_gen: u32,
    /// The login session it belongs to (None: a token from before sessions).
    pub sid: Option<SessionId>,
    /// Its [`session_revocation_key`], made once when the token is first checked.
    pub sid_key: Option<Box<str>>,
}

pub struct Issued {
    pub token: String,
    pub expires_in: u64,
}

pub struct Tokens {
    keys: SigningKeys,
    issuer: String,
    ttl_secs: u64,
    /// Session tokens already checked: a client sends the same one with every request,
    /// and checking it anew (base64, JSON, HMAC) was a fifth of the work of GET /me; an
    /// ES256 signature check costs ten times an HMAC.
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
    pub fn new(keys: SigningKeys, cfg: &TokenConfig, store: Arc<dyn Sessions>) -> Self {
        Tokens {
            keys,
            issuer: cfg.issuer.clone(),
            ttl_secs: cfg.access_ttl_secs,
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

    /// How long a retired key must go on verifying: the lifetime of the sessions it
    /// signed. A verification ticket (10 minutes) signed just before a rotation can be
    /// refused sooner when sessions are shorter than that; its flow then starts over
    /// with a new code.
    pub fn lifetime(ttl_secs: u64) -> u64 {
        ttl_secs
    }

    /// The JWKS document (`{"keys": [...]}`); None when no key is asymmetric (HS256).
    pub fn jwks(&self) -> Option<Bytes> {
        self.keys.ring().jwks()
    }

    /// The algorithm and kid of the signing key.
    pub fn signing_key(&self) -> (Alg, String) {
        let ring = self.keys.ring();
        (ring.signer.alg, ring.signer.kid.clone())
    }

    /// Seconds a retired signing key goes on verifying.
    pub fn key_retention_secs(&self) -> i64 {
        self.keys.retention_secs()
    }

    /// A new signing key from now on; the old one verifies until its tokens expire.
    pub async fn rotate_key(&self) -> Result<(Alg, String), StoreError> {
        self.keys.rotate().await
    }

    /// Housekeeping of the signing keys (see [`SigningKeys::refresh`]).
    pub async fn refresh_keys(&self) -> Result<(), StoreError> {
        self.keys.refresh().await
    }

    /// An access token of login session `sid` for `user`.
    pub fn issue_session(&self, user: &User, sid: &SessionId) -> Issued {
        self.issue(
            user.id.to_string(),
            SESSION,
            user.session_gen,
            None,
            Some(hex::encode(sid)),
            self.ttl_secs,
        )
    }

    /// The session behind `token`, if it is genuine and current. Whether it was logged out,
    /// and whether its user still exists, is enabled and has the same `session_gen`, is
    /// the caller's check ([`Sessions::session_user`], which reads the user anyway).
    pub async fn verify_session(&self, token: &str) -> Option<Session> {
        let session = match self.verified.get(token) {
            // As jsonwebtoken decides with leeway 0: valid through the second of `exp`.
            Some(s) if s.exp >= now() => s,
            Some(_) => return None,
            None => {
                let claims = self.decode(token, SESSION).await?;
                let sid = match claims.sid.as_deref() {
                    None => None,
                    Some(text) => Some(crate::sessions::parse_id(text)?),
                };
                let session = Session {
                    user_id: claims.sub.parse().ok()?,
                    jti: claims.jti,
                    exp: claims.exp,
                    session_gen: claims.session_gen,
                    sid,
                    sid_key: sid.map(|id| session_revocation_key(&id).into()),
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
            None,
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
        let Some(claims) = self.decode(token, VERIFICATION).await else {
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
        sid: Option<String>,
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
            sid,
        };
        let ring = self.keys.ring();
        let token = encode(&ring.signer.header, &claims, &ring.signer.encoding)
            .expect("signing with a key that loaded cannot fail");
        Issued {
            token,
            expires_in: ttl,
        }
    }

    /// The claims of a genuine token of kind `typ`. The key is the one the header's `kid`
    /// names (a token without one: the legacy HS256 key only), and it accepts only its own
    /// algorithm: an HS256 token "signed" with an ES256 key's public bytes names the ES256
    /// key and is refused before any HMAC is computed.
    async fn decode(&self, token: &str, typ: &str) -> Option<Claims> {
        if token.len() > 4096 {
            return None;
        }
        let header = decode_header(token).ok()?;
        let kid = header.kid.as_deref();
        let mut ring = self.keys.ring();
        if kid.is_some() && ring.verifier(kid).is_none() {
            ring = self.keys.reload_for_unknown_kid().await;
        }
        let key = ring.verifier(kid)?;
        if header.alg != key.alg {
            return None;
        }
        let claims = decode::<Claims>(token, &key.decoding, &key.validation)
            .ok()?
            .claims;
        (claims.typ == typ).then_some(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, TokenAlgorithm};
    use crate::signing::SigningKeys;
    use crate::store::SledStore;
    use base64::Engine;
    use jsonwebtoken::{Algorithm, EncodingKey, Header};

    fn b64(data: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
    }

    const SECRET: &str = "9999999999999999999999999999999999999999";
    const SID: SessionId = [5; 16];

    /// Tokens on a new store of their own, HS256 with [`SECRET`] or as `algorithm` says.
    async fn tokens_with(
        algorithm: TokenAlgorithm,
        token: TokenConfig,
    ) -> (tempfile::TempDir, Tokens) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SledStore::open(dir.path(), 8).unwrap());
        let mut cfg = Config {
            token,
            ..Default::default()
        };
        cfg.token.algorithm = algorithm;
        if algorithm == TokenAlgorithm::HS256 {
            cfg.token.secret = crate::config::Secret::new(SECRET);
        }
        let keys = SigningKeys::open(
            &cfg,
            store.clone(),
            Tokens::lifetime(cfg.token.access_ttl_secs),
        )
        .await
        .unwrap();
        (dir, Tokens::new(keys, &cfg.token, store))
    }

    async fn tokens() -> (tempfile::TempDir, Tokens) {
        tokens_with(TokenAlgorithm::HS256, TokenConfig::default()).await
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
        let (_d, t) = tokens().await;
        let issued = t.issue_session(&user(), &SID);
        let s = t.verify_session(&issued.token).await.unwrap();
        assert_eq!((s.user_id, s.session_gen), (42, 3));
        assert!(!t.store.is_revoked(&s.jti).await.unwrap());
        assert!(t.revoke(&s.jti, s.exp).await.unwrap());
        assert!(!t.revoke(&s.jti, s.exp).await.unwrap(), "first wins");
        assert!(t.store.is_revoked(&s.jti).await.unwrap());
    }

    #[tokio::test]
    async fn alg_none_and_other_issuers_are_refused() {
        let (_d, t) = tokens().await;
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
        assert!(t.verify_session(&none).await.is_none());
        let hs512 = encode(
            &Header::new(Algorithm::HS512),
            &serde_json::from_str::<serde_json::Value>(&payload).unwrap(),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert!(t.verify_session(&hs512).await.is_none());
        let other_issuer = TokenConfig {
            issuer: "someone-else".into(),
            ..Default::default()
        };
        let (_o, other) = tokens_with(TokenAlgorithm::HS256, other_issuer).await;
        assert!(
            t.verify_session(&other.issue_session(&user(), &SID).token)
                .await
                .is_none()
        );
    }

    #[tokio::test]
    async fn remembered_checks_stay_under_their_bound() {
        let (_d, t) = tokens().await;
        for id in 0..(2 * VERIFIED_CAPACITY as u64) {
            let token = t.issue_session(&User { id, ..user() }, &SID).token;
            assert_eq!(t.verify_session(&token).await.unwrap().user_id, id);
            assert!(
                t.verified.get(token.as_str()).is_some(),
                "the check just made is kept"
            );
            assert!(t.verified.entries() <= VERIFIED_CAPACITY);
        }
    }

    #[tokio::test]
    async fn tickets_and_sessions_do_not_mix_and_tickets_are_single_use() {
        let (_d, t) = tokens().await;
        let phone = "+8613812345678";
        let ticket = t.issue_verification(phone, Purpose::Register);
        let session = t.issue_session(&user(), &SID).token;
        assert!(t.verify_session(&ticket.token).await.is_none());
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

    /// The header and claims of a token, and the bytes its signature covers.
    fn split(token: &str) -> (serde_json::Value, serde_json::Value) {
        let mut it = token.split('.');
        let part = |p: &str| {
            serde_json::from_slice(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(p)
                    .unwrap(),
            )
            .unwrap()
        };
        (part(it.next().unwrap()), part(it.next().unwrap()))
    }

    #[tokio::test]
    async fn every_algorithm_signs_with_a_kid_and_verifies_pinned() {
        for (alg, name) in [
            (TokenAlgorithm::ES256, "ES256"),
            (TokenAlgorithm::EdDSA, "EdDSA"),
            (TokenAlgorithm::HS256, "HS256"),
        ] {
            let (_d, t) = tokens_with(alg, TokenConfig::default()).await;
            let token = t.issue_session(&user(), &SID).token;
            let (header, claims) = split(&token);
            assert_eq!(header["alg"], name);
            assert_eq!(header["kid"].as_str(), Some(t.signing_key().1.as_str()));
            assert_eq!(t.verify_session(&token).await.unwrap().user_id, 42);
            // The same claims under the same kid, signed the HS256 way with the bytes a
            // verifier could get hold of: the secret itself for HS256 (which is then
            // simply genuine), the published key for the others (the confusion attack).
            if alg != TokenAlgorithm::HS256 {
                let jwks: serde_json::Value = serde_json::from_slice(&t.jwks().unwrap()).unwrap();
                let jwk = jwks["keys"][0].to_string();
                let mut h = Header::new(Algorithm::HS256);
                h.kid = header["kid"].as_str().map(str::to_owned);
                for secret in [
                    jwk.as_bytes(),
                    jwks["keys"][0]["x"].as_str().unwrap().as_bytes(),
                ] {
                    let forged =
                        jsonwebtoken::encode(&h, &claims, &EncodingKey::from_secret(secret))
                            .unwrap();
                    assert!(t.verify_session(&forged).await.is_none(), "{name}");
                    let kidless = jsonwebtoken::encode(
                        &Header::new(Algorithm::HS256),
                        &claims,
                        &EncodingKey::from_secret(secret),
                    )
                    .unwrap();
                    assert!(t.verify_session(&kidless).await.is_none(), "{name}");
                }
            }
        }
    }

    #[tokio::test]
    async fn unknown_and_missing_kids_are_refused_for_asymmetric_keys() {
        let (_d, t) = tokens_with(TokenAlgorithm::ES256, TokenConfig::default()).await;
        let token = t.issue_session(&user(), &SID).token;
        let (header, claims) = split(&token);
        let sig = token.rsplit('.').next().unwrap();
        let b64 = |v: &serde_json::Value| b64(v.to_string().as_bytes());
        let mut other_kid = header.clone();
        other_kid["kid"] = "nope".into();
        let mut no_kid = header.clone();
        no_kid.as_object_mut().unwrap().remove("kid");
        for h in [other_kid, no_kid] {
            let t2 = format!("{}.{}.{sig}", b64(&h), b64(&claims));
            assert!(t.verify_session(&t2).await.is_none(), "{h}");
        }
        assert!(t.verify_session(&token).await.is_some());
    }

    #[tokio::test]
    async fn rotation_keeps_old_tokens_valid() {
        let (_d, t) = tokens_with(TokenAlgorithm::EdDSA, TokenConfig::default()).await;
        let old = t.issue_session(&user(), &SID).token;
        let (_, old_kid) = t.signing_key();
        let (alg, new_kid) = t.rotate_key().await.unwrap();
        assert_eq!(alg, Alg::EdDSA);
        assert_ne!(old_kid, new_kid);
        let new = t.issue_session(&user(), &SID).token;
        assert_eq!(split(&new).0["kid"].as_str(), Some(new_kid.as_str()));
        t.verified.remove(old.as_str());
        assert!(t.verify_session(&old).await.is_some());
        assert!(t.verify_session(&new).await.is_some());
        let jwks: serde_json::Value = serde_json::from_slice(&t.jwks().unwrap()).unwrap();
        let kids: Vec<_> = jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap())
            .collect();
        assert_eq!(
            kids,
            [new_kid.as_str(), old_kid.as_str()],
            "the signing key first"
        );
    }

    /// Our ES256 and EdDSA tokens as another implementation sees them: jwt-simple (pure
    /// Rust, none of the crypto we sign with) checks them with the keys of our JWKS only,
    /// and refuses one whose signature was touched.
    #[tokio::test]
    async fn an_independent_jwt_crate_verifies_our_asymmetric_tokens() {
        use jwt_simple::prelude::{
            ECDSAP256PublicKeyLike, ES256PublicKey, Ed25519PublicKey, EdDSAPublicKeyLike, HashSet,
            JWTClaims, VerificationOptions,
        };

        #[derive(serde::Deserialize, serde::Serialize)]
        struct Ours {
            typ: String,
            sid: Option<String>,
            #[serde(rename = "gen")]
            session_gen: u32,
        }

        for alg in [TokenAlgorithm::ES256, TokenAlgorithm::EdDSA] {
            let (_d, t) = tokens_with(alg, TokenConfig::default()).await;
            let token = t.issue_session(&user(), &SID).token;
            let jwks: serde_json::Value = serde_json::from_slice(&t.jwks().unwrap()).unwrap();
            let jwk = &jwks["keys"][0];
            let part = |k: &str| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(jwk[k].as_str().unwrap())
                    .unwrap()
            };
            let options = VerificationOptions {
                allowed_issuers: Some(HashSet::from_iter(["smsauth".to_owned()])),
                ..Default::default()
            };
            let kid = jwk["kid"].as_str().unwrap().to_owned();
            let check = |token: &str| -> Result<JWTClaims<Ours>, jwt_simple::Error> {
                match alg {
                    TokenAlgorithm::ES256 => {
                        let mut point = vec![4u8];
                        point.extend(part("x"));
                        point.extend(part("y"));
                        ES256PublicKey::from_bytes(&point)
                            .unwrap()
                            .with_key_id(&kid)
                            .verify_token::<Ours>(token, Some(options.clone()))
                    }
                    _ => Ed25519PublicKey::from_bytes(&part("x"))
                        .unwrap()
                        .with_key_id(&kid)
                        .verify_token::<Ours>(token, Some(options.clone())),
                }
            };
            let claims = check(&token).unwrap_or_else(|e| panic!("{alg:?}: {e}"));
            assert_eq!(claims.subject.as_deref(), Some("42"));
            assert_eq!(claims.issuer.as_deref(), Some("smsauth"));
            assert_eq!(claims.custom.typ, "session");
            assert_eq!(claims.custom.session_gen, 3);
            assert_eq!(
                claims.custom.sid.as_deref(),
                Some(hex::encode(SID).as_str())
            );
            let mut forged = token.into_bytes();
            let last = forged.len() - 2;
            forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
            assert!(
                check(std::str::from_utf8(&forged).unwrap()).is_err(),
                "{alg:?}"
            );
        }
    }

    /// A token from before login sessions, without `sid`, stays valid until it expires.
    #[tokio::test]
    async fn tokens_without_a_session_id_still_verify() {
        let (_d, t) = tokens().await;
        let u = user();
        let old = t.issue(u.id.to_string(), SESSION, u.session_gen, None, None, 60);
        let s = t.verify_session(&old.token).await.unwrap();
        assert_eq!((s.user_id, s.sid, s.sid_key), (42, None, None));
        let new = t
            .verify_session(&t.issue_session(&u, &SID).token)
            .await
            .unwrap();
        assert_eq!(new.sid, Some(SID));
        assert_eq!(
            new.sid_key.as_deref(),
            Some(session_revocation_key(&SID).as_str())
        );
    }
}
