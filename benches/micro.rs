//! Micro-benchmarks of the hot paths, one at a time, on the real types with the default
//! configuration: `cargo bench --bench micro` (criterion; add a filter such as `jwt` to
//! run some). The whole-server figures are in `benches/load.rs`.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{Criterion, criterion_group, criterion_main};

use futures::executor::block_on;
use smsauth::codes::Codes;
use smsauth::config::{CaptchaConfig, CodeConfig, Config, PasswordConfig, TokenAlgorithm};
use smsauth::model::{LoginMethod, Method, Purpose};
use smsauth::password::Passwords;
use smsauth::phone::Phone;
use smsauth::store::{Engine, NewUser, PendingCodes, Sessions, SledStore, Users};
use smsauth::token::Tokens;

/// The server's allocator (see src/main.rs).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// A phone of its own for each call: codes are single use.
fn phone(n: u64) -> Phone {
    Phone::from_e164(format!("+86138{n:08}"))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn store(dir: &tempfile::TempDir) -> Arc<SledStore> {
    Arc::new(SledStore::open(dir.path(), 64).expect("open store"))
}

/// A phone with its blind index under `store`'s key, as a request makes it.
fn indexed(store: &SledStore, phone: Phone) -> smsauth::phone::IndexedPhone {
    smsauth::phone::IndexedPhone::new(phone, &store.vault())
}

/// Resend waits are not what these benchmarks measure.
struct NoWaits;

impl smsauth::store::ResendWaits for NoWaits {
    fn reserve_send<'a>(
        &'a self,
        _: &'a smsauth::store::PhoneIndex,
        _: i64,
        _: i64,
    ) -> smsauth::store::BoxFuture<'a, smsauth::store::Result<Result<(), u64>>> {
        smsauth::store::ready(Ok(Ok(())))
    }
    fn release_send<'a>(
        &'a self,
        _: &'a smsauth::store::PhoneIndex,
    ) -> smsauth::store::BoxFuture<'a, smsauth::store::Result<()>> {
        smsauth::store::ready(Ok(()))
    }
    fn prune_waits(
        &self,
        _: i64,
        _: i64,
    ) -> smsauth::store::BoxFuture<'_, smsauth::store::Result<()>> {
        smsauth::store::ready(Ok(()))
    }
}

fn codes(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir);
    let codes = Codes::new(
        CodeConfig::default(),
        None,
        vec![7; 32],
        store.clone(),
        Arc::new(NoWaits),
    );
    let next = AtomicU64::new(0);
    // Generate a code and store it (moka + sled write; the flush is the group commit's,
    // measured by the load benchmark).
    c.bench_function("code issue (generate + store)", |b| {
        b.iter(|| {
            let p = indexed(&store, phone(next.fetch_add(1, Ordering::Relaxed)));
            let code = codes.generate();
            block_on(codes.put(&p, Purpose::Login, &code)).unwrap();
        })
    });
    // Verify and consume: every iteration spends a code put there beforehand (not timed).
    let issued = next.load(Ordering::Relaxed);
    let fixed = "123456";
    let mut prepared = 0u64;
    c.bench_function("code verify + consume", |b| {
        b.iter_custom(|iters| {
            let first = issued + prepared;
            for i in 0..iters {
                block_on(codes.put(&indexed(&store, phone(first + i)), Purpose::Login, fixed))
                    .unwrap();
            }
            prepared += iters;
            let start = std::time::Instant::now();
            for i in 0..iters {
                let p = indexed(&store, phone(first + i));
                block_on(codes.consume(&p, Purpose::Login, fixed)).unwrap();
            }
            start.elapsed()
        })
    });
}

/// Session tokens signed with `algorithm` (ES256 is a new store's).
fn tokens_signing(store: &Arc<SledStore>, algorithm: TokenAlgorithm) -> Tokens {
    let mut cfg = Config::default();
    cfg.token.algorithm = algorithm;
    let keys = runtime()
        .block_on(smsauth::signing::SigningKeys::open(
            &cfg,
            store.clone(),
            Tokens::lifetime(cfg.token.access_ttl_secs),
        ))
        .unwrap();
    Tokens::new(keys, &cfg.token, store.clone())
}

fn tokens_and_users(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir);
    for n in 0..10_000u64 {
        let p = phone(n);
        block_on(store.create_user_if_absent(
            NewUser {
                phone: p.as_str(),
                other: None,
                index: store.vault().index(p.as_str()),
                nickname: "bench".into(),
                created_at: 1,
                last_login_at: None,
                avatar_url: None,
            },
            &[LoginMethod {
                method: Method::Sms,
                identification: p.as_str().into(),
                access_code: None,
            }],
        ))
        .unwrap();
    }
    let tokens = tokens_signing(&store, TokenAlgorithm::ES256);
    let user = block_on(store.user_by_phone(&indexed(&store, phone(42)).index))
        .unwrap()
        .unwrap();
    c.bench_function("jwt sign (session)", |b| {
        b.iter(|| black_box(tokens.issue_session(black_box(&user), &[1; 16])))
    });
    // The HS256 of stores from before signing key sets, for comparison.
    let hs_dir = tempfile::tempdir().unwrap();
    let hs256 = tokens_signing(&self::store(&hs_dir), TokenAlgorithm::HS256);
    c.bench_function("jwt sign (session, HS256)", |b| {
        b.iter(|| black_box(hs256.issue_session(black_box(&user), &[1; 16])))
    });
    c.bench_function("jwt verify, first use (HS256)", |b| {
        b.iter_batched(
            || hs256.issue_session(&user, &[1; 16]).token,
            |token| black_box(block_on(hs256.verify_session(&token)).unwrap()),
            criterion::BatchSize::SmallInput,
        )
    });
    // A few thousand revocations, so the check looks into a map of a realistic size.
    for n in 0..5_000u64 {
        block_on(tokens.revoke(&format!("{n:032x}"), smsauth::clock::now() + 3600)).unwrap();
    }
    // A token's first check (base64, JSON, HMAC) and a later one (remembered: expiry
    // only); then what every authenticated request asks the store.
    c.bench_function("jwt verify, first use", |b| {
        b.iter_batched(
            || tokens.issue_session(&user, &[1; 16]).token,
            |token| black_box(block_on(tokens.verify_session(&token)).unwrap()),
            criterion::BatchSize::SmallInput,
        )
    });
    let token = tokens.issue_session(&user, &[1; 16]).token;
    c.bench_function("jwt verify, seen before", |b| {
        b.iter(|| black_box(block_on(tokens.verify_session(black_box(&token))).unwrap()))
    });
    let session = block_on(tokens.verify_session(&token)).unwrap();
    c.bench_function("session user (revocation check + user read)", |b| {
        b.iter(|| {
            black_box(
                block_on(store.session_user(
                    session.user_id,
                    &session.jti,
                    session.sid_key.as_deref(),
                ))
                .unwrap()
                .unwrap(),
            )
        })
    });
    let mut n = 0u64;
    c.bench_function("user lookup by phone (10k users)", |b| {
        b.iter(|| {
            n = (n + 7919) % 10_000;
            black_box(
                block_on(store.user_by_phone(&indexed(&store, phone(n)).index))
                    .unwrap()
                    .unwrap(),
            )
        })
    });
}

/// What every durable answer waits for: one small write made durable, alone (no other
/// writer to share the flush with).
fn flush(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir);
    let rec = smsauth::model::PendingCode {
        hash: [3; 32],
        sent_at: 1,
        expires_at: 2,
        attempts: 0,
    };
    let mut group = c.benchmark_group("store");
    group.sample_size(20);
    group.bench_function("one write + flush", |b| {
        b.iter(|| {
            block_on(store.put_code(
                &store.vault().index("+8613800000000"),
                Purpose::Login,
                rec.clone(),
            ))
            .unwrap();
            rt.block_on(store.flush()).unwrap();
        })
    });
    group.finish();
}

fn captcha(c: &mut Criterion) {
    let length = CaptchaConfig::default().length;
    c.bench_function("captcha generation (PNG)", |b| {
        b.iter(|| black_box(smsauth::captcha::render(length).unwrap()))
    });
}

fn argon2(c: &mut Criterion) {
    let rt = runtime();
    let passwords = Passwords::new(&PasswordConfig::default()).unwrap();
    let mut group = c.benchmark_group("argon2id");
    group.sample_size(10);
    group.bench_function("hash at the configured parameters", |b| {
        b.iter(|| {
            black_box(
                rt.block_on(passwords.hash("correct horse battery"))
                    .unwrap(),
            )
        })
    });
    group.finish();
}

criterion_group!(benches, codes, tokens_and_users, flush, captcha, argon2);
criterion_main!(benches);
