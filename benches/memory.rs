//! `cargo bench --bench memory`: the bytes one entry of each in-memory cache and map
//! costs, which config.example.toml writes next to its `[memory]` key. Each structure is
//! filled through the store's or the token module's own API with ENTRIES entries, once
//! bounded far above that and once at a bound of SMALL; the difference in live heap bytes
//! (as the server's allocator, jemalloc, hands them out: size classes included), divided
//! by the difference in entries, is the cost of one entry.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};

use futures::executor::block_on;
use smsauth::config::{Config, MemoryConfig, TokenConfig};
use smsauth::model::{LoginMethod, Method, PendingCode, Purpose};
use smsauth::store::{AddressLimit, NewUser, SledStore, Store};
use smsauth::token::Tokens;

/// jemalloc, counting the bytes it has handed out and not had back.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { tikv_jemallocator::Jemalloc.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(
                unsafe { tikv_jemallocator::usable_size(p) } as isize,
                Ordering::Relaxed,
            );
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        LIVE.fetch_sub(
            unsafe { tikv_jemallocator::usable_size(p) } as isize,
            Ordering::Relaxed,
        );
        unsafe { tikv_jemallocator::Jemalloc.dealloc(p, layout) }
    }
    unsafe fn realloc(&self, p: *mut u8, layout: Layout, size: usize) -> *mut u8 {
        let before = unsafe { tikv_jemallocator::usable_size(p) } as isize;
        let q = unsafe { tikv_jemallocator::Jemalloc.realloc(p, layout, size) };
        if !q.is_null() {
            let after = unsafe { tikv_jemallocator::usable_size(q) } as isize;
            LIVE.fetch_add(after - before, Ordering::Relaxed);
        }
        q
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const ENTRIES: usize = 50_000;
const SMALL: usize = 1_000;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

fn phone(n: usize) -> String {
    format!("+86139{n:08}")
}

fn memory(entries: usize) -> MemoryConfig {
    MemoryConfig {
        code_cache_entries: entries as u64,
        user_cache_entries: entries,
        token_cache_entries: entries,
        resend_wait_entries: entries,
        captcha_entries: entries as u64,
    }
}

/// Live bytes that `fill` leaves behind with every cache bounded at `bound` entries.
/// `setup` runs first and is not counted.
fn cost<S>(
    bound: usize,
    setup: impl Fn(&Store) -> S,
    fill: impl Fn(&Store, &S, &MemoryConfig) -> Kept,
) -> isize {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cfg = Config {
        memory: memory(bound),
        ..Config::default()
    };
    cfg.limits.max_tracked_ips = bound;
    let sled = SledStore::open_sized(dir.path(), 8, &cfg.memory).expect("open store");
    let store = Store::embedded(Arc::new(sled), &cfg).expect("store");
    let state = setup(&store);
    let before = live();
    let kept = fill(&store, &state, &cfg.memory);
    let after = live();
    drop(kept);
    after - before
}

/// What a fill made that must outlive the count (a cache of its own).
type Kept = Option<Box<dyn std::any::Any>>;

/// Bytes per entry: the fill at ENTRIES against the same fill bounded at SMALL.
fn per_entry<S>(
    name: &str,
    key: &str,
    setup: impl Fn(&Store) -> S,
    fill: impl Fn(&Store, &S, &MemoryConfig) -> Kept,
) {
    // Bounded well above what is put in, so that none is dropped on the big side.
    let big = cost(4 * ENTRIES, &setup, &fill);
    let little = cost(SMALL, &setup, &fill);
    let bytes = (big - little) as f64 / (ENTRIES - SMALL) as f64;
    println!("| {name} | {key} | {bytes:.0} |");
}

/// A new store's signing keys (ES256), the same on every call for one store.
fn keys(store: &Store) -> smsauth::signing::SigningKeys {
    let cfg = Config::default();
    block_on(smsauth::signing::SigningKeys::open(
        &cfg,
        store.keys.clone(),
        Tokens::lifetime(cfg.token.access_ttl_secs),
    ))
    .expect("signing keys")
}

fn create_users(store: &Store, n: usize) -> Vec<u64> {
    (0..n)
        .map(|i| {
            let p = phone(i);
            let methods = [LoginMethod {
                method: Method::Sms,
                identification: p.clone(),
                access_code: None,
            }];
            let new = NewUser {
                phone: &p,
                other: None,
                index: store.phones.index(&p),
                nickname: "bench".into(),
                created_at: 1,
                last_login_at: None,
                avatar_url: None,
            };
            block_on(store.users.create_user_if_absent(new, &methods))
                .expect("create user")
                .0
                .id
        })
        .collect()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let now = smsauth::clock::now();
    println!("Bytes per entry, {ENTRIES} entries against {SMALL} (cargo bench --bench memory)\n");
    println!("| structure | bound | bytes per entry |\n| --- | --- | ---: |");
    per_entry(
        "pending codes (sled)",
        "memory.code_cache_entries",
        |_| (),
        |store, _, _| {
            for i in 0..ENTRIES {
                let code = PendingCode {
                    hash: [7; 32],
                    sent_at: now,
                    expires_at: now + 300,
                    attempts: 0,
                };
                block_on(store.codes.put_code(
                    &store.phones.index(&phone(i)),
                    Purpose::Login,
                    code,
                ))
                .expect("put");
            }
            None
        },
    );
    per_entry(
        "users (sled)",
        "memory.user_cache_entries",
        |store| create_users(store, ENTRIES),
        |store, ids, _| {
            for &id in ids {
                block_on(store.users.user(id)).expect("read").expect("user");
            }
            None
        },
    );
    per_entry(
        "session token checks",
        "memory.token_cache_entries",
        |store| {
            let ids = create_users(store, ENTRIES);
            let tokens = Tokens::new(keys(store), &TokenConfig::default(), store.sessions.clone());
            ids.iter()
                .map(|&id| {
                    let user = block_on(store.users.user(id)).unwrap().unwrap();
                    tokens.issue_session(&user, &[1; 16]).token
                })
                .collect::<Vec<String>>()
        },
        |store, issued, memory| {
            let tokens = Tokens::new(keys(store), &TokenConfig::default(), store.sessions.clone())
                .remembering(memory.token_cache_entries);
            for token in issued {
                block_on(tokens.verify_session(token)).expect("genuine");
            }
            Some(Box::new(tokens))
        },
    );
    per_entry(
        "resend waits (sled)",
        "memory.resend_wait_entries",
        |_| (),
        |store, _, _| {
            for i in 0..ENTRIES {
                block_on(
                    store
                        .waits
                        .reserve_send(&store.phones.index(&phone(i)), now, 60),
                )
                .expect("reserve")
                .expect("a first send");
            }
            None
        },
    );
    per_entry(
        "captcha answers (sled)",
        "memory.captcha_entries",
        |_| (),
        |store, _, _| {
            for i in 0..ENTRIES {
                let id = format!("{i:032x}");
                block_on(store.captchas.put_captcha(&id, "a7k2q", now + 120)).expect("put");
            }
            None
        },
    );
    per_entry(
        "client addresses, per limiter (sled)",
        "limits.max_tracked_ips",
        |_| (),
        |store, _, _| {
            for i in 0..ENTRIES as u32 {
                let ip = std::net::IpAddr::from((0x0a00_0000 + i).to_be_bytes());
                let _ = block_on(store.addresses.check_address(AddressLimit::Check, ip));
            }
            None
        },
    );
}
