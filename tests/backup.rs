//! `smsauth backup` and `smsauth restore`: a round trip of 10,000 users made through the
//! store API, taken while the server runs and after it stopped; sessions issued before
//! the backup work on the restored data dir; damaged files are refused without leaving
//! anything behind.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use common::{TestServer, admin, ok_stdout};
use futures::executor::block_on;
use serde_json::json;
use smsauth::model::{LoginMethod, Method, PendingCode, Purpose};
use smsauth::store::{NewUser, PendingCodes, Sessions, SledStore, Snapshots, UserChange, Users};

const USERS: u64 = 10_000;

fn phone(i: u64) -> String {
    format!("+86139{:08}", i)
}

/// Fills a data dir through the store API: USERS users (every tenth with a password
/// method too), revocations and pending codes.
fn fill(data: &Path) {
    let store = SledStore::open(data, 64).unwrap();
    let far = smsauth::clock::now() + 86_400;
    for i in 0..USERS {
        let p = phone(i);
        let mut methods = vec![LoginMethod {
            method: Method::Sms,
            identification: p.clone(),
            access_code: None,
        }];
        if i % 10 == 0 {
            methods.push(LoginMethod {
                method: Method::Password,
                identification: p.clone(),
                access_code: Some(format!("$argon2id$v=19$m=19456,t=2,p=1$salt{i}$hash")),
            });
        }
        let (user, created) = block_on(store.create_user_if_absent(
            NewUser {
                phone: &p,
                other: None,
                index: store.vault().index(&p),
                nickname: format!("user {i}"),
                created_at: 1_700_000_000 + i as i64,
                last_login_at: (i % 3 == 0).then_some(1_800_000_000),
                avatar_url: None,
            },
            &methods,
        ))
        .unwrap();
        assert!(created);
        if i % 100 == 0 {
            block_on(store.update_user(user.id, UserChange::Disabled(true))).unwrap();
            for _ in 0..7 {
                block_on(store.update_user(user.id, UserChange::EndSessions)).unwrap();
            }
        }
    }
    for i in 0..500 {
        assert!(block_on(store.revoke(&format!("jti-{i}"), far)).unwrap());
    }
    for i in 0..20 {
        let code = PendingCode {
            hash: [i as u8; 32],
            sent_at: far - 86_400,
            expires_at: far,
            attempts: i % 3,
        };
        let index = store.vault().index(&phone(i as u64));
        block_on(store.put_code(&index, Purpose::ALL[i as usize % 3], code)).unwrap();
    }
    store.flush_blocking().unwrap();
}

/// Everything a store holds, in a comparable form.
#[derive(Debug, PartialEq)]
struct Contents {
    users: Vec<smsauth::model::User>,
    by_phone: Vec<Option<u64>>,
    methods: Vec<Vec<LoginMethod>>,
    /// The records of revocations and pending codes, as a snapshot gives them.
    revocations_and_codes: Vec<(String, Vec<u8>, Vec<u8>)>,
    count: u64,
}

fn contents(data: &Path) -> Contents {
    let store = SledStore::open(data, 64).unwrap();
    let users = block_on(store.users()).unwrap();
    let by_phone = users
        .iter()
        .map(|u| {
            block_on(store.user_by_phone(&store.vault().index(&u.phone)))
                .unwrap()
                .map(|x| x.id)
        })
        .collect();
    let methods = users
        .iter()
        .map(|u| block_on(store.login_methods(u)).unwrap())
        .collect();
    let mut revocations_and_codes = Vec::new();
    store
        .snapshot(&mut |tree, k, v| {
            if tree == "jti_exp" || tree == "phonepurpose_code" {
                revocations_and_codes.push((tree.to_owned(), k.to_vec(), v.to_vec()));
            }
            Ok(())
        })
        .unwrap();
    Contents {
        by_phone,
        methods,
        revocations_and_codes,
        count: block_on(store.user_count()).unwrap(),
        users,
    }
}

/// Where the harness dir `dir`'s phone key is: the sled data dir's own, or the file the
/// harness gives a PostgreSQL store.
fn phone_key_path(dir: &Path) -> std::path::PathBuf {
    if common::engine() == "postgres" {
        common::phone_key_file(dir)
    } else {
        dir.join("data").join(smsauth::privacy::DEFAULT_KEY_FILE)
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn ten_thousand_users_round_trip_and_old_sessions_still_work() {
    if common::engine() == "postgres" {
        eprintln!(
            "skipped under TEST_STORAGE_ENGINE=postgres: it fills the data dir and compares \
             the restored one through SledStore and sled's trees"
        );
        return;
    }
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let started = Instant::now();
    fill(&dir.path().join("data"));
    eprintln!("filled {USERS} users in {:?}", started.elapsed());

    let mut s = TestServer::start_in(dir.clone(), "").await;
    let kept = s.sms_login("13812350001").await;
    let kept_token = kept["access_token"].as_str().unwrap().to_owned();
    let ended = s.sms_login("13812350002").await;
    let ended_token = ended["access_token"].as_str().unwrap().to_owned();
    let (status, _) = s
        .post_auth("/api/v1/auth/logout", &ended_token, json!({}))
        .await;
    assert_eq!(status, 204);

    // While the server runs: through the admin socket.
    let live = dir.path().join("live.bak");
    let started = Instant::now();
    let out = ok_stdout(&admin(
        dir.path(),
        &["backup", "--include-keys", live.to_str().unwrap()],
    ));
    eprintln!("backup via the admin socket: {:?}", started.elapsed());
    assert!(out.contains("the phone key too"), "{out}");
    assert!(out.contains("from the running server"), "{out}");
    assert_eq!(mode(&live), 0o600, "a backup holds the keys");
    assert!(s.wait_log(|l| l["message"] == "admin snapshot").is_some());

    assert!(s.terminate().success());
    let original = contents(&s.data_dir());
    assert_eq!(original.count, USERS + 2);
    let in_tree =
        |c: &Contents, t: &str| c.revocations_and_codes.iter().filter(|r| r.0 == t).count();
    // The filled 500, and the logout's two: its token id and its session's revocation key.
    assert_eq!(in_tree(&original, "jti_exp"), 502);
    assert_eq!(in_tree(&original, "phonepurpose_code"), 20);

    // Stopped: from the store directly.
    let offline = dir.path().join("offline.bak");
    let started = Instant::now();
    let out = ok_stdout(&admin(dir.path(), &["backup", offline.to_str().unwrap()]));
    eprintln!("backup directly: {:?}", started.elapsed());
    assert!(out.contains("from the store"), "{out}");
    assert!(out.contains("not the phone key"), "{out}");

    let phone_key = std::fs::read(dir.path().join("data/phone.key")).unwrap();
    for (name, file) in [("live", &live), ("offline", &offline)] {
        let target = Arc::new(tempfile::tempdir().unwrap());
        if name == "offline" {
            // Without the key in the backup: the operator puts it into the new data dir.
            std::fs::create_dir(target.path().join("data")).unwrap();
            std::fs::write(target.path().join("data/phone.key"), &phone_key).unwrap();
        }
        let started = Instant::now();
        let out = ok_stdout(&admin(target.path(), &["restore", file.to_str().unwrap()]));
        eprintln!("restore of the {name} backup: {:?}", started.elapsed());
        assert!(out.contains(&format!("({} users)", USERS + 2)), "{out}");
        let data = target.path().join("data");
        assert_eq!(mode(&data.join("signing.key")), 0o600);
        assert_eq!(mode(&data.join("code.key")), 0o600);
        assert_eq!(
            std::fs::read(data.join("signing.key")).unwrap(),
            std::fs::read(dir.path().join("data/signing.key")).unwrap()
        );
        let key_of = |p: &Path| smsauth::privacy::read_key_file(p).unwrap();
        assert_eq!(
            key_of(&data.join("phone.key")),
            key_of(&dir.path().join("data/phone.key")),
            "{name}"
        );
        let restored = contents(&data);
        // Field by field first, for a readable failure.
        assert_eq!(restored.count, original.count, "{name}");
        assert_eq!(restored.users.len(), original.users.len(), "{name}");
        assert_eq!(
            restored.revocations_and_codes, original.revocations_and_codes,
            "{name}"
        );
        assert!(restored == original, "{name}: restored store differs");
        assert!(restored.by_phone.iter().all(Option::is_some));

        let r = TestServer::start_in(target.clone(), "").await;
        let (status, me) = r.get("/api/v1/me", Some(&kept_token)).await;
        assert_eq!((status, &me), (200, &kept["user"]), "{name}");
        assert_eq!(r.get("/api/v1/me", Some(&ended_token)).await.0, 401);
        // Ids go on after the restored ones.
        let next = r.sms_login("13812350003").await;
        assert_eq!(next["user"]["id"], USERS + 3);
    }
}

#[tokio::test]
async fn restore_refuses_damaged_files_and_non_empty_data_dirs_leaving_nothing() {
    let mut s = TestServer::start("").await;
    let dir = s.dir();
    s.sms_login("13812351001").await;
    let file = dir.path().join("good.bak");
    ok_stdout(&admin(dir.path(), &["backup", file.to_str().unwrap()]));
    assert!(s.terminate().success());
    let good = std::fs::read(&file).unwrap();

    let target = tempfile::tempdir().unwrap();
    let data = target.path().join("data");
    let mut flipped = good.clone();
    let middle = good.len() / 2;
    flipped[middle] ^= 1;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated by half", good[..middle].to_vec()),
        ("missing its last byte", good[..good.len() - 1].to_vec()),
        ("one byte changed", flipped),
        ("with bytes appended", [&good[..], b"x"].concat()),
        ("not a backup", b"hello, world\n".to_vec()),
        ("empty", Vec::new()),
    ];
    for (what, bytes) in cases {
        let bad = target.path().join("bad.bak");
        std::fs::write(&bad, &bytes).unwrap();
        let out = admin(target.path(), &["restore", bad.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {err}");
        assert!(
            err.contains("damaged or incomplete") || err.contains("not an smsauth backup"),
            "{what}: {err}"
        );
        let left: Vec<_> = std::fs::read_dir(&data)
            .map(|d| d.map(|e| e.unwrap().file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{what}: left behind {left:?}");
    }

    // Into a data dir in use: refused, nothing changed.
    let before = std::fs::read_dir(dir.path().join("data")).unwrap().count();
    let out = admin(dir.path(), &["restore", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not empty"), "{err}");
    assert_eq!(
        std::fs::read_dir(dir.path().join("data")).unwrap().count(),
        before
    );

    // Without the phone key it was sealed with: refused, naming the key, nothing written.
    let target_key = phone_key_path(target.path());
    if common::engine() == "sled" {
        let out = admin(target.path(), &["restore", file.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains("sealed with phone key") && err.contains("--include-keys"),
            "{err}"
        );
        assert!(!data.join("db").exists(), "no store left behind");
        std::fs::create_dir_all(&data).unwrap();
        let stranger = smsauth::privacy::PhoneKey::generate();
        smsauth::privacy::create_key_file(&target_key, &stranger).unwrap();
    } // (a PostgreSQL store is always given a key: the harness made the target's its own)
    // Another key: refused too.
    let out = admin(target.path(), &["restore", file.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("restore with the key the backup was taken with"),
        "{err}"
    );
    if common::engine() == "sled" {
        assert!(!data.join("db").exists(), "no store left behind");
    }

    // The good file, with its key, restores into the dir the refusals targeted.
    std::fs::copy(phone_key_path(dir.path()), &target_key).unwrap();
    let out = ok_stdout(&admin(target.path(), &["restore", file.to_str().unwrap()]));
    assert!(out.contains("(1 users)"), "{out}");
}
