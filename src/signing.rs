//! Token signing keys: one key signs, every key verifies only its own algorithm, and the
//! public halves of the asymmetric ones are published as a JWKS.
//!
//! The set is one server key, `signing`, kept by the storage engine like the others:
//! `data_dir/signing.key` (mode 0600) with sled, a row of `server_keys` with PostgreSQL,
//! so every instance of a cluster signs with the same key. It changes only by compare and
//! swap ([`Keys::replace_key`]): two instances rotating at once cannot lose a key, the
//! loser reads the winner's set and redoes its change on it.
//!
//! - A key record is (kid, algorithm, private key or HMAC secret, created, retired). The
//!   kid of an asymmetric key is its RFC 7638 thumbprint; of an HS256 key, random.
//! - A rotation retires the signing key (it stops signing, it still verifies) and adds a
//!   new one. Housekeeping drops a retired key once every token it may have signed has
//!   expired: the longest token lifetime after its retirement, plus one housekeeping
//!   period, the longest an instance that has not yet read the new set goes on signing
//!   with the old key.
//! - Stores from before key sets have one HS256 key, `token` (or `token.secret` in the
//!   configuration): the *legacy* key. It is not copied into the set; the set records only
//!   when it was retired and dropped. It signs while the algorithm stays HS256, and it is
//!   the only key that accepts a token without `kid` (those it signed before this
//!   release).

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair,
};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use bytes::Bytes;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::clock::now;
use crate::config::{Config, TokenAlgorithm};
use crate::store::{Keys, StoreError};

/// The server key holding the set.
const SET: &str = "signing";
/// The HS256 key of stores made before key sets.
const LEGACY: &str = "token";
/// First byte of the stored set; the rest is JSON.
const FORMAT: u8 = 1;
/// An unknown `kid` reads the set again from the store at most this often, so a flood of
/// made-up kids costs the store one read a second.
const RELOAD_AT_MOST_EVERY: Duration = Duration::from_secs(1);

/// A key's algorithm, as stored and as the JWT `alg` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Alg {
    ES256,
    EdDSA,
    HS256,
}

impl Alg {
    pub fn jwt(self) -> Algorithm {
        match self {
            Alg::ES256 => Algorithm::ES256,
            Alg::EdDSA => Algorithm::EdDSA,
            Alg::HS256 => Algorithm::HS256,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Alg::ES256 => "ES256",
            Alg::EdDSA => "EdDSA",
            Alg::HS256 => "HS256",
        }
    }

    fn configured(a: TokenAlgorithm) -> Option<Alg> {
        match a {
            TokenAlgorithm::Unset => None,
            TokenAlgorithm::ES256 => Some(Alg::ES256),
            TokenAlgorithm::EdDSA => Some(Alg::EdDSA),
            TokenAlgorithm::HS256 => Some(Alg::HS256),
        }
    }
}

/// The set as stored. No `Debug`: it holds private keys.
#[derive(Clone, Default, Serialize, Deserialize)]
struct StoredSet {
    keys: Vec<StoredKey>,
    /// When the legacy key stopped signing; None while it signs (or there is none).
    #[serde(default)]
    legacy_retired_at: Option<i64>,
    /// The legacy key verifies no more: every token it signed has expired.
    #[serde(default)]
    legacy_dropped: bool,
}

#[derive(Clone, Serialize, Deserialize)]
struct StoredKey {
    kid: String,
    alg: Alg,
    /// PKCS#8 DER (ES256, EdDSA) or the HMAC secret (HS256), base64url.
    material: String,
    created_at: i64,
    /// When it stopped signing; None for the one signing key.
    retired_at: Option<i64>,
}

/// Which key of a set signs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SignedBy {
    Record(usize),
    Legacy,
}

impl StoredSet {
    fn decode(raw: Option<&[u8]>) -> Result<StoredSet, StoreError> {
        let Some(raw) = raw else {
            return Ok(StoredSet::default());
        };
        match raw.split_first() {
            Some((&FORMAT, json)) => serde_json::from_slice(json)
                .map_err(|e| StoreError::Corrupt(format!("token signing key set: {e}"))),
            _ => Err(StoreError::Schema(
                "the token signing key set is of an unknown format (written by a newer smsauth?)"
                    .into(),
            )),
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = vec![FORMAT];
        serde_json::to_writer(&mut out, self).expect("a key set serializes");
        out
    }

    fn signer(&self, legacy: bool) -> Option<SignedBy> {
        if let Some(i) = self.keys.iter().position(|k| k.retired_at.is_none()) {
            return Some(SignedBy::Record(i));
        }
        (legacy && self.legacy_retired_at.is_none() && !self.legacy_dropped)
            .then_some(SignedBy::Legacy)
    }

    fn signer_alg(&self, legacy: bool) -> Option<Alg> {
        self.signer(legacy).map(|s| match s {
            SignedBy::Record(i) => self.keys[i].alg,
            SignedBy::Legacy => Alg::HS256,
        })
    }

    /// This set with its signing key retired at `at` and a new `alg` key signing.
    fn rotated(&self, alg: Alg, legacy: bool, at: i64) -> (StoredSet, String) {
        let mut set = self.clone();
        match set.signer(legacy) {
            Some(SignedBy::Record(i)) => set.keys[i].retired_at = Some(at),
            Some(SignedBy::Legacy) => set.legacy_retired_at = Some(at),
            None => {}
        }
        let key = generate(alg, at);
        let kid = key.kid.clone();
        set.keys.push(key);
        (set, kid)
    }

    /// This set without the keys retired more than `retention` seconds before `at`;
    /// None if there are none to drop.
    fn pruned(&self, at: i64, retention: i64) -> Option<(StoredSet, Vec<String>)> {
        let expired = |retired: Option<i64>| retired.is_some_and(|r| r + retention < at);
        let mut set = self.clone();
        let mut dropped = Vec::new();
        set.keys.retain(|k| {
            let keep = !expired(k.retired_at);
            if !keep {
                dropped.push(k.kid.clone());
            }
            keep
        });
        if !set.legacy_dropped && expired(set.legacy_retired_at) {
            set.legacy_dropped = true;
            dropped.push("(the HS256 key from before key sets)".into());
        }
        (!dropped.is_empty()).then_some((set, dropped))
    }
}

/// A new key of `alg`, from the OS CSPRNG (aws-lc-rs's for the key pairs).
fn generate(alg: Alg, at: i64) -> StoredKey {
    let rng = SystemRandom::new();
    let (kid, material) = match alg {
        Alg::ES256 => {
            let der = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                .expect("P-256 key generation");
            let public = public_jwk(Alg::ES256, der.as_ref()).expect("a key just made reads");
            (public.kid, der.as_ref().to_vec())
        }
        Alg::EdDSA => {
            let der = Ed25519KeyPair::generate_pkcs8(&rng).expect("Ed25519 key generation");
            let public = public_jwk(Alg::EdDSA, der.as_ref()).expect("a key just made reads");
            (public.kid, der.as_ref().to_vec())
        }
        Alg::HS256 => {
            let mut kid = [0u8; 12];
            rand::rng().fill(&mut kid);
            (B64.encode(kid), crate::keys::fresh())
        }
    };
    StoredKey {
        kid,
        alg,
        material: B64.encode(material),
        created_at: at,
        retired_at: None,
    }
}

/// The public half of a key pair as a JWK, its kid the RFC 7638 thumbprint.
struct PublicJwk {
    kid: String,
    jwk: serde_json::Value,
    decoding: DecodingKey,
}

fn public_jwk(alg: Alg, der: &[u8]) -> Result<PublicJwk, StoreError> {
    let bad = || StoreError::Corrupt(format!("a stored {} key does not load", alg.name()));
    // Thumbprint input: the required members only, in lexical order, no spaces.
    let (thumbprint_input, mut jwk, decoding) = match alg {
        Alg::ES256 => {
            let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der)
                .map_err(|_| bad())?;
            // Uncompressed point: 0x04, x, y (32 bytes each).
            let point = pair.public_key().as_ref();
            let (x, y) = (B64.encode(&point[1..33]), B64.encode(&point[33..65]));
            let decoding = DecodingKey::from_ec_components(&x, &y).map_err(|_| bad())?;
            (
                format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#),
                json!({ "kty": "EC", "crv": "P-256", "x": x, "y": y }),
                decoding,
            )
        }
        Alg::EdDSA => {
            let pair = Ed25519KeyPair::from_pkcs8(der).map_err(|_| bad())?;
            let x = B64.encode(pair.public_key().as_ref());
            let decoding = DecodingKey::from_ed_components(&x).map_err(|_| bad())?;
            (
                format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#),
                json!({ "kty": "OKP", "crv": "Ed25519", "x": x }),
                decoding,
            )
        }
        Alg::HS256 => unreachable!("an HMAC secret has no public half"),
    };
    let kid = B64.encode(Sha256::digest(thumbprint_input.as_bytes()));
    jwk["kid"] = kid.clone().into();
    jwk["alg"] = alg.name().into();
    jwk["use"] = "sig".into();
    Ok(PublicJwk { kid, jwk, decoding })
}

/// The kid of the legacy key: derived from it, so every instance names it alike without
/// storing anything. It tells no more about the secret than any token's HMAC does.
fn legacy_kid(secret: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(b"smsauth legacy HS256 key id\0");
    h.update(secret);
    B64.encode(&h.finalize()[..12])
}

/// One key that verifies, pinned to its algorithm.
pub struct VerifyKey {
    pub alg: Algorithm,
    pub decoding: DecodingKey,
    /// Accepts this key's algorithm only.
    pub validation: Validation,
}

/// The key that signs.
pub struct SignKey {
    pub alg: Alg,
    pub kid: String,
    pub header: Header,
    pub encoding: EncodingKey,
}

/// The keys in use, built from one stored set; replaced whole when the set changes.
pub struct KeyRing {
    pub signer: SignKey,
    by_kid: HashMap<String, Arc<VerifyKey>>,
    /// The legacy key, for tokens without `kid`.
    kidless: Option<Arc<VerifyKey>>,
    /// `{"keys": [...]}`, the signing key first; None with no asymmetric key.
    jwks: Option<Bytes>,
    /// The stored set this was built from.
    stored: Option<Vec<u8>>,
}

impl KeyRing {
    /// The key for a token's `kid`: a kid-less token only ever checks with the legacy key.
    pub fn verifier(&self, kid: Option<&str>) -> Option<&Arc<VerifyKey>> {
        match kid {
            Some(kid) => self.by_kid.get(kid),
            None => self.kidless.as_ref(),
        }
    }

    pub fn jwks(&self) -> Option<Bytes> {
        self.jwks.clone()
    }

    fn build(
        raw: Option<Vec<u8>>,
        set: &StoredSet,
        legacy: Option<&[u8]>,
        base: &Validation,
    ) -> Result<KeyRing, StoreError> {
        let pinned = |alg: Algorithm, decoding: DecodingKey| {
            let mut validation = base.clone();
            validation.algorithms = vec![alg];
            Arc::new(VerifyKey {
                alg,
                decoding,
                validation,
            })
        };
        let mut by_kid = HashMap::new();
        let mut public = Vec::new();
        let mut signer = None;
        let signed_by = set.signer(legacy.is_some()).ok_or_else(|| {
            StoreError::Corrupt("the token signing key set has no signing key".into())
        })?;
        for (i, k) in set.keys.iter().enumerate() {
            let material = B64
                .decode(&k.material)
                .map_err(|_| StoreError::Corrupt(format!("token key {} is not base64", k.kid)))?;
            let (decoding, encoding) = match k.alg {
                Alg::HS256 => (
                    DecodingKey::from_secret(&material),
                    EncodingKey::from_secret(&material),
                ),
                Alg::ES256 | Alg::EdDSA => {
                    let p = public_jwk(k.alg, &material)?;
                    public.push((signed_by == SignedBy::Record(i), p.jwk));
                    let encoding = if k.alg == Alg::ES256 {
                        EncodingKey::from_ec_der(&material)
                    } else {
                        EncodingKey::from_ed_der(&material)
                    };
                    (p.decoding, encoding)
                }
            };
            by_kid.insert(k.kid.clone(), pinned(k.alg.jwt(), decoding));
            if signed_by == SignedBy::Record(i) {
                signer = Some(SignKey {
                    alg: k.alg,
                    kid: k.kid.clone(),
                    header: header(k.alg, &k.kid),
                    encoding,
                });
            }
        }
        let mut kidless = None;
        if let Some(secret) = legacy.filter(|_| !set.legacy_dropped) {
            let kid = legacy_kid(secret);
            let key = pinned(Algorithm::HS256, DecodingKey::from_secret(secret));
            by_kid.insert(kid.clone(), key.clone());
            kidless = Some(key);
            if signed_by == SignedBy::Legacy {
                signer = Some(SignKey {
                    alg: Alg::HS256,
                    header: header(Alg::HS256, &kid),
                    kid,
                    encoding: EncodingKey::from_secret(secret),
                });
            }
        }
        // The signing key first: what a client that takes the first key would want.
        public.sort_by_key(|(signs, _)| !signs);
        let jwks = (!public.is_empty()).then(|| {
            let keys: Vec<_> = public.into_iter().map(|(_, jwk)| jwk).collect();
            Bytes::from(serde_json::to_vec(&json!({ "keys": keys })).expect("JSON"))
        });
        Ok(KeyRing {
            signer: signer.expect("the signing key is one of the keys built"),
            by_kid,
            kidless,
            jwks,
            stored: raw,
        })
    }
}

fn header(alg: Alg, kid: &str) -> Header {
    let mut h = Header::new(alg.jwt());
    h.kid = Some(kid.to_owned());
    h
}

/// The signing keys of a running service (or of an admin command), kept in step with the
/// store.
pub struct SigningKeys {
    store: Arc<dyn Keys>,
    /// The legacy HS256 key, if the store or the configuration has one.
    legacy: Option<Vec<u8>>,
    /// How long a retired key goes on verifying, in seconds.
    retention: i64,
    base: Validation,
    ring: RwLock<Arc<KeyRing>>,
    /// When an unknown kid last made us read the set again.
    last_reload: tokio::sync::Mutex<Option<Instant>>,
}

impl SigningKeys {
    /// Reads the set, and makes the first key, or a key of a newly configured algorithm
    /// (retiring the one that signed), if the store has none of `token.algorithm`.
    /// `token_lifetime` is the longest lifetime of any token signed.
    pub async fn open(
        cfg: &Config,
        store: Arc<dyn Keys>,
        token_lifetime: u64,
    ) -> Result<SigningKeys, StoreError> {
        let legacy = if cfg.token.secret.is_empty() {
            store.key(LEGACY).await?
        } else {
            Some(cfg.token.secret.expose().as_bytes().to_vec())
        };
        let mut base = Validation::new(Algorithm::HS256);
        base.set_issuer(&[cfg.token.issuer.as_str()]);
        base.set_required_spec_claims(&["exp", "iat", "iss", "sub", "jti"]);
        base.leeway = 0;
        let retention = (token_lifetime + cfg.server.housekeeping_secs) as i64;
        loop {
            let raw = store.key(SET).await?;
            let set = StoredSet::decode(raw.as_deref())?;
            let current = set.signer_alg(legacy.is_some());
            let want = Alg::configured(cfg.token.algorithm)
                .or(current)
                .unwrap_or(Alg::ES256);
            if current != Some(want) {
                let (new, kid) = set.rotated(want, legacy.is_some(), now());
                if write(&*store, raw.as_deref(), &new).await? {
                    match current {
                        // The operator changed token.algorithm: worth a line.
                        Some(was) => tracing::info!(
                            kid,
                            algorithm = want.name(),
                            was = was.name(),
                            "a new token signing key signs from now on"
                        ),
                        None => tracing::debug!(
                            kid,
                            algorithm = want.name(),
                            "made a token signing key"
                        ),
                    }
                }
                continue; // read what is stored now, ours or a racing instance's
            }
            let ring = KeyRing::build(raw, &set, legacy.as_deref(), &base)?;
            return Ok(SigningKeys {
                store,
                legacy,
                retention,
                base,
                ring: RwLock::new(Arc::new(ring)),
                last_reload: tokio::sync::Mutex::new(None),
            });
        }
    }

    /// The keys in use now.
    pub fn ring(&self) -> Arc<KeyRing> {
        self.ring
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// How long a retired key goes on verifying, in seconds.
    pub fn retention_secs(&self) -> i64 {
        self.retention
    }

    /// Retires the signing key and makes a new one of the same algorithm, which signs from
    /// now on here (other instances: from their next housekeeping pass, or their first
    /// token of the new key). Returns the new key's algorithm and kid.
    pub async fn rotate(&self) -> Result<(Alg, String), StoreError> {
        loop {
            let raw = self.store.key(SET).await?;
            let set = StoredSet::decode(raw.as_deref())?;
            let alg = set.signer_alg(self.legacy.is_some()).unwrap_or(Alg::ES256);
            let (new, kid) = set.rotated(alg, self.legacy.is_some(), now());
            if write(&*self.store, raw.as_deref(), &new).await? {
                tracing::info!(kid, algorithm = alg.name(), "rotated the token signing key");
                self.install(Some(new.encode()), &new)?;
                return Ok((alg, kid));
            }
        }
    }

    /// Housekeeping: drops the retired keys whose tokens have all expired, and takes up
    /// what another instance changed.
    pub async fn refresh(&self) -> Result<(), StoreError> {
        loop {
            let raw = self.store.key(SET).await?;
            let set = StoredSet::decode(raw.as_deref())?;
            if let Some((pruned, dropped)) = set.pruned(now(), self.retention) {
                if write(&*self.store, raw.as_deref(), &pruned).await? {
                    tracing::info!(kids = ?dropped, "dropped retired token signing keys");
                }
                continue;
            }
            return self.install(raw, &set);
        }
    }

    /// After a token named a kid we do not know: reads the set again (at most once per
    /// [`RELOAD_AT_MOST_EVERY`]), as another instance may have rotated a key in.
    pub async fn reload_for_unknown_kid(&self) -> Arc<KeyRing> {
        let mut last = self.last_reload.lock().await;
        if last.is_some_and(|at| at.elapsed() < RELOAD_AT_MOST_EVERY) {
            return self.ring();
        }
        *last = Some(Instant::now());
        let reloaded = async {
            let raw = self.store.key(SET).await?;
            let set = StoredSet::decode(raw.as_deref())?;
            self.install(raw, &set)
        };
        if let Err(e) = reloaded.await {
            tracing::warn!(error = %e, "reading the token signing keys failed");
        }
        self.ring()
    }

    fn install(&self, raw: Option<Vec<u8>>, set: &StoredSet) -> Result<(), StoreError> {
        if self.ring().stored == raw {
            return Ok(());
        }
        let ring = KeyRing::build(raw, set, self.legacy.as_deref(), &self.base)?;
        *self.ring.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(ring);
        Ok(())
    }
}

/// Stores `new` in place of `current` (None: nothing stored yet); false if another
/// writer changed it first.
async fn write(
    store: &dyn Keys,
    current: Option<&[u8]>,
    new: &StoredSet,
) -> Result<bool, StoreError> {
    let bytes = new.encode();
    match current {
        None => Ok(store.key_or_insert(SET, bytes.clone()).await? == bytes),
        Some(current) => store.replace_key(SET, current, bytes).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thumbprints_follow_rfc_7638() {
        // RFC 7638 has an RSA example only; RFC 8037 appendix A.3 gives an Ed25519 one.
        let x = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo";
        let input = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#);
        assert_eq!(
            B64.encode(Sha256::digest(input.as_bytes())),
            "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
        );
    }

    #[test]
    fn every_algorithm_makes_a_key_that_loads_and_publishes_only_public_parts() {
        for alg in [Alg::ES256, Alg::EdDSA, Alg::HS256] {
            let set = StoredSet::default().rotated(alg, false, 100).0;
            let base = Validation::new(Algorithm::HS256);
            let ring = KeyRing::build(Some(set.encode()), &set, None, &base).unwrap();
            assert_eq!(ring.signer.alg, alg);
            assert_eq!(
                ring.signer.header.kid.as_deref(),
                Some(set.keys[0].kid.as_str())
            );
            assert!(
                ring.verifier(None).is_none(),
                "no kid-less tokens without a legacy key"
            );
            match alg {
                Alg::HS256 => assert!(ring.jwks().is_none()),
                _ => {
                    let jwks: serde_json::Value =
                        serde_json::from_slice(&ring.jwks().unwrap()).unwrap();
                    let jwk = &jwks["keys"][0];
                    assert_eq!(jwk["kid"], set.keys[0].kid.as_str());
                    assert_eq!(jwk["alg"], alg.name());
                    assert!(jwk.get("d").is_none(), "never the private part");
                    let text = jwks.to_string();
                    assert!(!text.contains('='), "base64url without padding: {text}");
                }
            }
        }
    }

    #[test]
    fn rotation_retires_the_signer_and_pruning_waits_for_the_retention() {
        let set = StoredSet::default().rotated(Alg::ES256, true, 100).0;
        assert_eq!(
            set.legacy_retired_at,
            Some(100),
            "the legacy key stops signing"
        );
        let (set, kid) = set.rotated(Alg::ES256, true, 200);
        assert_eq!(set.keys.len(), 2);
        assert_eq!(set.keys[0].retired_at, Some(200));
        assert_eq!(set.signer(true), Some(SignedBy::Record(1)));
        assert_eq!(set.keys[1].kid, kid);
        assert!(set.pruned(100 + 50, 50).is_none(), "within the retention");
        let (pruned, dropped) = set.pruned(100 + 51, 50).unwrap();
        assert_eq!(dropped.len(), 1, "the legacy key only");
        assert!(pruned.legacy_dropped);
        assert_eq!(pruned.keys.len(), 2);
        assert!(pruned.pruned(200 + 50, 50).is_none());
        let (pruned, dropped) = pruned.pruned(200 + 51, 50).unwrap();
        assert_eq!(dropped, [set.keys[0].kid.clone()]);
        assert_eq!(pruned.keys.len(), 1);
        assert_eq!(pruned.keys[0].kid, kid);
    }

    #[test]
    fn an_unknown_format_is_refused_not_overwritten() {
        assert!(matches!(
            StoredSet::decode(Some(&[9, b'{', b'}'])),
            Err(StoreError::Schema(_))
        ));
    }
}
