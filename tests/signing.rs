//! Token signing over real HTTP: every algorithm end to end (bearer and cookie), the JWKS,
//! the algorithm-confusion attack, rotation with old tokens still valid and then dropped,
//! the upgrade of an HS256 store from before key sets, and rotation across a cluster.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use common::{TestServer, admin, ok_stdout};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::Value;

fn header(token: &str) -> Value {
    serde_json::from_slice(&B64.decode(token.split('.').next().unwrap()).unwrap()).unwrap()
}

fn claims(token: &str) -> Value {
    serde_json::from_slice(&B64.decode(token.split('.').nth(1).unwrap()).unwrap()).unwrap()
}

fn token(login: &Value) -> String {
    login["access_token"].as_str().unwrap().to_owned()
}

/// The JWKS answer: (status, Cache-Control, body).
async fn jwks(s: &TestServer) -> (u16, String, Value) {
    let resp = reqwest::get(s.url("/.well-known/jwks.json")).await.unwrap();
    let status = resp.status().as_u16();
    let cache = resp
        .headers()
        .get("cache-control")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, cache, resp.json().await.unwrap())
}

fn kids(set: &Value) -> Vec<String> {
    set["keys"]
        .as_array()
        .map(|keys| {
            keys.iter()
                .map(|k| k["kid"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

async fn me(s: &TestServer, token: &str) -> u16 {
    s.get("/api/v1/me", Some(token)).await.0
}

/// Waits for `cond` to hold, checking every 100 ms, for at most `limit`.
async fn until<F: std::future::Future<Output = bool>>(
    limit: Duration,
    what: &str,
    mut cond: impl FnMut() -> F,
) {
    let start = Instant::now();
    while !cond().await {
        assert!(start.elapsed() < limit, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn every_algorithm_works_end_to_end_with_bearer_and_cookie() {
    for (setting, alg) in [
        ("", "ES256"),
        ("ES256", "ES256"),
        ("EdDSA", "EdDSA"),
        ("HS256", "HS256"),
    ] {
        let algorithm = if setting.is_empty() {
            String::new() // a new store without the setting: ES256
        } else {
            format!("algorithm = \"{setting}\"\n")
        };
        let s = TestServer::start(&format!("[token]\n{algorithm}cookie = true\n")).await;
        let t = token(&s.sms_login("13812346001").await);
        let h = header(&t);
        assert_eq!(h["alg"], alg, "{setting:?}");
        let kid = h["kid"]
            .as_str()
            .expect("every token carries kid")
            .to_owned();

        assert_eq!(me(&s, &t).await, 200, "{alg}: /me by bearer");
        assert_eq!(s.get("/api/v1/auth/check", Some(&t)).await.0, 204, "{alg}");
        let cookie = format!("smsauth_session={t}");
        for (path, ok) in [("/api/v1/auth/check", 204), ("/api/v1/me", 200)] {
            let (status, body) = s
                .send(
                    reqwest::Client::new()
                        .get(s.url(path))
                        .header("cookie", &cookie),
                )
                .await;
            assert_eq!(status, ok, "{alg}: {path} by cookie: {body}");
        }

        let (status, cache, set) = jwks(&s).await;
        if alg == "HS256" {
            assert_eq!(status, 404, "a shared secret is never published");
            assert_eq!(set["error"], "not_found");
            continue;
        }
        assert_eq!(status, 200);
        assert_eq!(cache, "max-age=300");
        assert_eq!(kids(&set), std::slice::from_ref(&kid));
        let jwk = &set["keys"][0];
        assert_eq!(jwk["alg"], alg);
        assert!(jwk.get("d").is_none(), "no private part: {jwk}");
        // Checked from the outside, with the published key only.
        let parsed: jsonwebtoken::jwk::Jwk = serde_json::from_value(jwk.clone()).unwrap();
        let mut v = Validation::new(h["alg"].as_str().unwrap().parse().unwrap());
        v.set_issuer(&["smsauth"]);
        let data = jsonwebtoken::decode::<Value>(&t, &DecodingKey::from_jwk(&parsed).unwrap(), &v)
            .unwrap();
        assert_eq!(data.claims["typ"], "session");
    }
}

#[tokio::test]
async fn the_algorithm_confusion_attack_is_refused() {
    let s = TestServer::start("[token]\nalgorithm = \"ES256\"\n").await;
    let victim = s.sms_login("13812346011").await;
    let t = token(&s.sms_login("13812346012").await);
    let (_, _, set) = jwks(&s).await;
    let jwk = &set["keys"][0];
    let kid = jwk["kid"].as_str().unwrap();
    let mut point = vec![4u8];
    point.extend(B64.decode(jwk["x"].as_str().unwrap()).unwrap());
    point.extend(B64.decode(jwk["y"].as_str().unwrap()).unwrap());
    // The victim's id, HS256, keyed with every form of the public key an attacker has.
    let mut forged_claims = claims(&t);
    forged_claims["sub"] = victim["user"]["id"].to_string().into();
    let (jwk_text, set_text) = (jwk.to_string(), set.to_string());
    let public_forms: [&[u8]; 4] = [
        jwk_text.as_bytes(),
        set_text.as_bytes(),
        &point,
        jwk["x"].as_str().unwrap().as_bytes(),
    ];
    for secret in public_forms {
        for with_kid in [Some(kid), None] {
            let mut h = Header::new(Algorithm::HS256);
            h.kid = with_kid.map(str::to_owned);
            let forged =
                jsonwebtoken::encode(&h, &forged_claims, &EncodingKey::from_secret(secret))
                    .unwrap();
            assert_eq!(me(&s, &forged).await, 401, "kid {with_kid:?}");
        }
    }
    // The genuine one still passes, and a kid that names no key fails.
    assert_eq!(me(&s, &t).await, 200);
    let mut h = header(&t);
    h["kid"] = "not-a-key".into();
    let parts: Vec<&str> = t.split('.').collect();
    let renamed = format!("{}.{}.{}", B64.encode(h.to_string()), parts[1], parts[2]);
    assert_eq!(me(&s, &renamed).await, 401);
}

#[tokio::test]
async fn rotation_keeps_old_tokens_valid_until_they_expire_then_drops_the_key() {
    let s = TestServer::start(
        "[server]\nhousekeeping_secs = 1\n[token]\nalgorithm = \"EdDSA\"\nttl_secs = 4\n",
    )
    .await;
    let old = token(&s.sms_login("13812346021").await);
    let old_kid = header(&old)["kid"].as_str().unwrap().to_owned();

    let out = ok_stdout(&admin(s.dir().path(), &["keys", "rotate-token-key"]));
    // With sled the running server rotates (through its admin socket) and signs with the
    // new key at once; on PostgreSQL the command does, and the server reads it within a
    // housekeeping period.
    until(Duration::from_secs(10), "the new key published", || async {
        kids(&jwks(&s).await.2).len() == 2
    })
    .await;
    let new = token(&s.sms_login("13812346022").await);
    let new_kid = header(&new)["kid"].as_str().unwrap().to_owned();
    assert_ne!(old_kid, new_kid);
    assert_eq!(
        header(&new)["alg"],
        "EdDSA",
        "a rotation keeps the algorithm"
    );
    assert!(out.contains(&new_kid), "{out}");
    assert_eq!(kids(&jwks(&s).await.2), [new_kid.clone(), old_kid.clone()]);
    assert_eq!(me(&s, &old).await, 200, "the old key still verifies");
    assert_eq!(me(&s, &new).await, 200);

    // ttl 4 s + one housekeeping period after the rotation, the old key is gone.
    until(Duration::from_secs(20), "the old key dropped", || async {
        kids(&jwks(&s).await.2) == [new_kid.clone()]
    })
    .await;
    assert_eq!(me(&s, &old).await, 401);
}

/// A store made before key sets has an HS256 `token` key and no setting: it stays HS256,
/// and tokens it signed then (no `kid`) still work, also after a move to ES256.
#[tokio::test]
async fn an_hs256_store_from_before_stays_hs256_and_moves_to_es256_keeping_old_tokens() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let secret = [7u8; 32];
    seed_legacy_token_key(&dir, &secret);

    let s = TestServer::start_in(dir.clone(), "").await;
    let login = s.sms_login("13812346031").await;
    let now_token = token(&login);
    assert_eq!(
        header(&now_token)["alg"],
        "HS256",
        "an HS256 store stays HS256"
    );
    assert_eq!(jwks(&s).await.0, 404);
    // A token as the previous release made it: HS256, no kid, the same claims.
    let before = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims(&now_token),
        &EncodingKey::from_secret(&secret),
    )
    .unwrap();
    assert!(header(&before).get("kid").is_none());
    assert_eq!(me(&s, &before).await, 200, "an old token still works");
    drop(s);

    // The operator moves to ES256: new tokens are ES256, old ones still verify.
    let s = TestServer::start_in(dir.clone(), "[token]\nalgorithm = \"ES256\"\n").await;
    let es = token(&s.sms_login("13812346033").await);
    assert_eq!(header(&es)["alg"], "ES256");
    assert_eq!(me(&s, &es).await, 200);
    assert_eq!(me(&s, &before).await, 200, "within the transition window");
    assert_eq!(me(&s, &now_token).await, 200);
    let (status, _, set) = jwks(&s).await;
    assert_eq!(status, 200);
    assert_eq!(
        kids(&set),
        [header(&es)["kid"].as_str().unwrap()],
        "never the HS256 key"
    );
    drop(s);

    // And that stays so once the setting is removed again: the store now signs ES256.
    let s = TestServer::start_in(dir, "").await;
    assert_eq!(
        header(&token(&s.sms_login("13812346032").await))["alg"],
        "ES256"
    );
}

/// The `token` key as the previous release left it: a file in the data dir with sled,
/// a row of server_keys with PostgreSQL.
fn seed_legacy_token_key(dir: &tempfile::TempDir, secret: &[u8]) {
    if common::engine() == "postgres" {
        ok_stdout(&admin(dir.path(), &["migrate"]));
        let url = common::postgres_url(dir.path());
        common::shared_postgres().psql_url(
            &url,
            &format!(
                "INSERT INTO server_keys (name, key) VALUES ('token', '\\x{}')",
                hex::encode(secret)
            ),
        );
    } else {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(data.join("token.key"))
            .unwrap();
        f.write_all(hex::encode(secret).as_bytes()).unwrap();
    }
}

#[tokio::test]
async fn a_rotation_reaches_every_instance_of_a_cluster() {
    let Some(cluster) = common::cluster::Cluster::new(
        "[server]\nhousekeeping_secs = 1\n[token]\nttl_secs = 5\n[code]\nresend_interval_secs = 0\n",
    ) else {
        return;
    };
    let (a, b) = cluster.pair().await;
    let old = token(&a.sms_login("13812346041").await);
    let old_kid = header(&old)["kid"].as_str().unwrap().to_owned();
    assert_eq!(header(&old)["alg"], "ES256");
    assert_eq!(me(&b, &old).await, 200, "one key for the cluster");

    // Rotated from the command line, on the database itself.
    let out = ok_stdout(&admin(a.dir().path(), &["keys", "rotate-token-key"]));
    assert!(out.contains("within server.housekeeping_secs"), "{out}");
    for s in [&a, &b] {
        until(Duration::from_secs(10), "both keys published", || async {
            kids(&jwks(s).await.2).len() == 2
        })
        .await;
    }
    let new = token(&b.sms_login("13812346042").await);
    let new_kid = header(&new)["kid"].as_str().unwrap().to_owned();
    assert_ne!(new_kid, old_kid, "B signs with the new key");
    assert_eq!(me(&a, &new).await, 200);
    assert_eq!(
        me(&b, &old).await,
        200,
        "the old key still verifies everywhere"
    );
    assert_eq!(me(&a, &old).await, 200);

    for s in [&a, &b] {
        until(Duration::from_secs(30), "the old key dropped", || async {
            kids(&jwks(s).await.2) == [new_kid.clone()]
        })
        .await;
    }
}
