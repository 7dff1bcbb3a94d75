use super::*;
use crate::model::{Counter, LoginMethod, PendingCode, Purpose};
use crate::store::codec::encode_plain_user;
use crate::store::layout::{META_SCHEMA, META_USERS, SCHEMA_VERSION, method_key, parse_code_key};
use crate::store::{
    BoxFuture, CodeCheck, Counters, NewUser, PendingCodes, PhoneIndex, Sessions, Users,
};

/// The engine's calls are done when they return: their futures are ready.
fn done<T>(f: BoxFuture<'_, T>) -> T {
    futures::executor::block_on(f)
}

/// Every store of these tests has this phone key, so [`ix`] gives its indexes.
const TEST_PHONE_KEY: [u8; 32] = [9; 32];

fn ix(phone: &str) -> PhoneIndex {
    crate::privacy::PhoneKey::new(&TEST_PHONE_KEY).index(phone)
}

/// [`SledStore::open`] with the test phone key.
fn try_open(dir: &std::path::Path) -> Result<SledStore, StoreError> {
    let key = dir.join(crate::privacy::DEFAULT_KEY_FILE);
    if !key.exists() {
        crate::privacy::create_key_file(&key, &TEST_PHONE_KEY).unwrap();
    }
    SledStore::open(dir, 8)
}

fn open(dir: &std::path::Path) -> SledStore {
    try_open(dir).unwrap()
}

fn reopen(dir: &std::path::Path) -> SledStore {
    retry_while_locked(|| try_open(dir), |e| matches!(e, StoreError::Locked(_))).unwrap()
}

fn store() -> (tempfile::TempDir, SledStore) {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    (dir, s)
}

/// sled itself on a store just closed (see [`SledStore::reopen`]).
fn raw_reopen(dir: &std::path::Path) -> sled::Db {
    retry_while_locked(
        || sled::open(dir.join("db")),
        |e| e.to_string().contains("lock"),
    )
    .unwrap()
}

/// The two login methods of an account with a password.
fn sms_and_password(phone: &str) -> (LoginMethod, LoginMethod) {
    let sms = LoginMethod {
        method: Method::Sms,
        identification: phone.into(),
        access_code: None,
    };
    let password = LoginMethod {
        method: Method::Password,
        access_code: Some("$argon2id$x".into()),
        ..sms.clone()
    };
    (sms, password)
}

fn new_user(phone: &str) -> NewUser<'_> {
    NewUser {
        phone,
        other: None,
        index: ix(phone),
        nickname: "n".into(),
        created_at: 1,
        last_login_at: None,
        avatar_url: None,
    }
}

#[test]
fn ids_are_dense_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = open(dir.path());
        assert_eq!(
            done(s.create_user_if_absent(new_user("+861"), &[]))
                .unwrap()
                .0
                .id,
            1
        );
        s.db.flush().unwrap();
    }
    let s = reopen(dir.path());
    assert_eq!(
        done(s.create_user_if_absent(new_user("+862"), &[]))
            .unwrap()
            .0
            .id,
        2
    );
    assert_eq!(done(s.user_count()).unwrap(), 2);
}

/// What a kill -9 in the middle of a create leaves: a user record without its index
/// entry, and no clean-close marker. The next open removes it and counts anew.
#[test]
fn an_open_after_a_crash_removes_orphans_and_recounts() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = open(dir.path());
        done(s.create_user_if_absent(new_user("+861"), &[])).unwrap();
        let orphan = User {
            id: 2,
            phone: "+862".into(),
            nickname: "n".into(),
            created_at: 1,
            last_login_at: None,
            disabled: false,
            session_gen: 0,
            avatar_url: None,
        };
        s.users
            .insert(
                u64_key(2),
                crate::store::codec::encode_user(&orphan, &s.vault),
            )
            .unwrap();
    }
    {
        let raw = raw_reopen(dir.path());
        let meta = raw.open_tree("meta").unwrap();
        meta.remove(META_CLOSED_CLEANLY).unwrap();
        meta.insert(META_USERS, &u64_key(7)).unwrap();
        raw.flush().unwrap();
    }
    let s = reopen(dir.path());
    assert_eq!(done(s.user(2)).unwrap(), None, "the orphan is gone");
    assert_eq!(done(s.user_count()).unwrap(), 1, "counted, not the stale 7");
    assert_eq!(done(s.users()).unwrap().len(), 1);
    assert_eq!(
        done(s.create_user_if_absent(new_user("+863"), &[]))
            .unwrap()
            .0
            .id,
        2
    );
}

/// Marks the store as not closed cleanly and its stored count as stale, as a crash
/// leaves it.
fn as_after_a_crash(dir: &std::path::Path) {
    let raw = raw_reopen(dir);
    let meta = raw.open_tree("meta").unwrap();
    meta.remove(META_CLOSED_CLEANLY).unwrap();
    meta.insert(META_USERS, &u64_key(7)).unwrap();
    raw.flush().unwrap();
}

/// After a crash the count starts from the checkpoint, takes off the users deleted
/// since and adds the users made since, without counting the index.
#[test]
fn a_start_after_a_crash_counts_from_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = open(dir.path());
        for phone in ["+861", "+862", "+863"] {
            done(s.create_user_if_absent(new_user(phone), &[])).unwrap();
        }
        s.checkpoint().unwrap();
        let (made_since, _) = done(s.create_user_if_absent(new_user("+864"), &[])).unwrap();
        done(s.create_user_if_absent(new_user("+865"), &[])).unwrap();
        done(s.delete_user(1)).unwrap().unwrap();
        done(s.delete_user(made_since.id)).unwrap().unwrap();
        assert_eq!(done(s.user_count()).unwrap(), 3);
        // An index entry the checkpoint knows nothing of: counting the index would
        // count it, so the figure below shows where the count came from.
        s.phones.insert(b"+869", &u64_key(99)).unwrap();
    }
    as_after_a_crash(dir.path());
    let s = reopen(dir.path());
    assert_eq!(done(s.user_count()).unwrap(), 3, "+862, +863 and +865");
}

/// A deletion is listed before its commit point; one a crash cut short is not taken
/// off, and the next start's checkpoint starts a new list.
#[test]
fn a_deletion_cut_short_by_a_crash_is_not_taken_off() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = open(dir.path());
        done(s.create_user_if_absent(new_user("+861"), &[])).unwrap();
        done(s.create_user_if_absent(new_user("+862"), &[])).unwrap();
        s.checkpoint().unwrap();
        s.list_deletion(2).unwrap(); // what delete_user does first
    }
    as_after_a_crash(dir.path());
    {
        let s = reopen(dir.path());
        assert_eq!(done(s.user_count()).unwrap(), 2, "the user is still there");
        done(s.delete_user(2)).unwrap().unwrap();
    }
    as_after_a_crash(dir.path());
    let s = reopen(dir.path());
    assert_eq!(done(s.user_count()).unwrap(), 1);
}

/// A store of this schema is marked with it at open, and one from a newer release is
/// refused rather than changed: that is what keeps an older release (schema 2) off a
/// store whose deletions must be listed.
#[test]
fn schema_versions_move_forward_only() {
    let dir = tempfile::tempdir().unwrap();
    {
        let raw = sled::open(dir.path().join("db")).unwrap();
        let meta = raw.open_tree("meta").unwrap();
        meta.insert(META_SCHEMA, &2u32.to_be_bytes()).unwrap();
        raw.flush().unwrap();
    }
    drop(reopen(dir.path()));
    {
        let raw = raw_reopen(dir.path());
        let meta = raw.open_tree("meta").unwrap();
        let version = meta.get(META_SCHEMA).unwrap().unwrap();
        assert_eq!(&version[..], &SCHEMA_VERSION.to_be_bytes());
        meta.insert(META_SCHEMA, &(SCHEMA_VERSION + 1).to_be_bytes())
            .unwrap();
        raw.flush().unwrap();
    }
    let refused = retry_while_locked(
        || try_open(dir.path()),
        |e| matches!(e, StoreError::Locked(_)),
    );
    assert!(
        matches!(&refused, Err(StoreError::Corrupt(m)) if m.contains("use a newer release")),
        "a newer store opened: {:?}",
        refused.err()
    );
}

/// A version 1 store kept an `sms` method record per user; opening it drops them
/// and the method is still there, implied.
#[test]
fn schema_1_stores_lose_their_sms_method_records() {
    let dir = tempfile::tempdir().unwrap();
    let user = User {
        id: 1,
        phone: "+861".into(),
        nickname: "n".into(),
        created_at: 1,
        last_login_at: None,
        disabled: false,
        session_gen: 0,
        avatar_url: None,
    };
    let (sms, password) = sms_and_password("+861");
    {
        let raw = sled::open(dir.path().join("db")).unwrap();
        let tree = |name: &str| raw.open_tree(name).unwrap();
        tree("meta")
            .insert(META_SCHEMA, &1u32.to_be_bytes())
            .unwrap();
        tree("userid_user")
            .insert(u64_key(1), encode_plain_user(&user))
            .unwrap();
        tree("phone_userid").insert("+861", &u64_key(1)).unwrap();
        let methods = tree("useridmethod_login");
        methods
            .insert(method_key(1, Method::Sms), encode(&sms))
            .unwrap();
        methods
            .insert(method_key(1, Method::Password), encode(&password))
            .unwrap();
        raw.flush().unwrap();
    }
    let s = reopen(dir.path());
    assert_eq!(s.methods.len(), 1, "only the password record is left");
    assert_eq!(done(s.login_methods(&user)).unwrap(), vec![sms, password]);
    assert_eq!(done(s.user_count()).unwrap(), 1);
}

/// A schema-4 store whose sealing a kill -9 cut short: user 1 sealed and indexed, its
/// plain index entry not yet removed; user 2 untouched. The next open finishes it, and
/// the copy that follows leaves no number in the clear in the files.
#[test]
fn a_sealing_cut_short_is_finished_by_the_next_open() {
    let dir = tempfile::tempdir().unwrap();
    let user = |id: u64, phone: &str| User {
        id,
        phone: phone.into(),
        nickname: "n".into(),
        created_at: 1,
        last_login_at: None,
        disabled: false,
        session_gen: 0,
        avatar_url: None,
    };
    let vault = PhoneVault::new(crate::privacy::PhoneKey::new(&TEST_PHONE_KEY));
    crate::privacy::create_key_file(&dir.path().join("phone.key"), &TEST_PHONE_KEY).unwrap();
    {
        let raw = sled::open(dir.path().join("db")).unwrap();
        let tree = |name: &str| raw.open_tree(name).unwrap();
        tree("meta")
            .insert(META_SCHEMA, &4u32.to_be_bytes())
            .unwrap();
        tree("meta")
            .insert(super::privacy::META_PLAIN_BYTES_LEFT, &[1u8][..])
            .unwrap();
        let users = tree("userid_user");
        users
            .insert(
                u64_key(1),
                crate::store::codec::encode_user(&user(1, "+8613900000001"), &vault),
            )
            .unwrap();
        users
            .insert(u64_key(2), encode_plain_user(&user(2, "+8613900000002")))
            .unwrap();
        let phones = tree("phone_userid");
        phones
            .insert(ix("+8613900000001").bytes(), &u64_key(1))
            .unwrap();
        phones.insert("+8613900000001", &u64_key(1)).unwrap();
        phones.insert("+8613900000002", &u64_key(2)).unwrap();
        tree("meta").insert(META_USERS, &u64_key(2)).unwrap();
        raw.flush().unwrap();
    }
    let s = reopen(dir.path());
    for (id, phone) in [(1, "+8613900000001"), (2, "+8613900000002")] {
        let found = done(s.user_by_phone(&ix(phone))).unwrap().unwrap();
        assert_eq!((found.id, found.phone.as_str()), (id, phone));
    }
    assert_eq!(s.phones.len(), 2, "no plain index entry left");
    assert_eq!(done(s.user_count()).unwrap(), 2);
    assert!(
        !s.meta
            .contains_key(super::privacy::META_PLAIN_BYTES_LEFT)
            .unwrap()
    );
    drop(s);
    let bytes = std::fs::read(dir.path().join("db/db")).unwrap();
    for plain in ["13900000001", "13900000002"] {
        assert!(
            !bytes.windows(plain.len()).any(|w| w == plain.as_bytes()),
            "{plain} is still in the file"
        );
    }
}

/// A kill -9 between the two renames of the copy: the complete copy is put in place.
#[test]
fn a_copy_cut_short_between_its_renames_is_put_in_place() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = open(dir.path());
        done(s.create_user_if_absent(new_user("+8613900000003"), &[])).unwrap();
        s.flush_blocking().unwrap();
    }
    let _ = raw_reopen(dir.path()); // waits for the lock to go
    copy_tree_dir(&dir.path().join("db"), &dir.path().join("db.compacting"));
    std::fs::rename(dir.path().join("db"), dir.path().join("db.replaced")).unwrap();
    let s = reopen(dir.path());
    assert!(
        done(s.user_by_phone(&ix("+8613900000003")))
            .unwrap()
            .is_some()
    );
    assert!(!dir.path().join("db.replaced").exists());
    assert!(!dir.path().join("db.compacting").exists());
}

fn copy_tree_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.path().is_dir() {
            copy_tree_dir(&entry.path(), &to.join(entry.file_name()));
        } else {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

#[test]
fn concurrent_creates_make_one_user() {
    let (_dir, s) = store();
    let s = std::sync::Arc::new(s);
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let s = s.clone();
            std::thread::spawn(move || {
                done(s.create_user_if_absent(new_user("+86x"), &[])).unwrap()
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(results.iter().filter(|(_, created)| *created).count(), 1);
    assert!(results.iter().all(|(u, _)| u.id == results[0].0.id));
    assert_eq!(done(s.user_count()).unwrap(), 1);
}

#[test]
fn code_keys_round_trip_and_the_sweep_takes_only_expired_codes() {
    let (_dir, s) = store();
    let expired = PendingCode {
        hash: [1; 32],
        sent_at: 1,
        expires_at: 2,
        attempts: 0,
    };
    let live = PendingCode {
        expires_at: 100,
        ..expired.clone()
    };
    let count = |s: &SledStore| done(s.pending_code_count()).unwrap();
    let (one, zero) = (ix("+8613800000001"), ix("+8613800000000"));
    done(s.put_code(&one, Purpose::Login, expired.clone())).unwrap();
    done(s.put_code(&zero, Purpose::ResetPassword, expired.clone())).unwrap();
    assert_eq!(count(&s), 2);
    done(s.put_code(&zero, Purpose::ResetPassword, live.clone())).unwrap();
    assert_eq!(count(&s), 2, "replaced, not added");
    let mut seen = Vec::new();
    s.open_codes(50, 0, &mut |phone, at| seen.push((phone.to_owned(), at)))
        .unwrap();
    assert_eq!(seen, vec![(zero, 1)]);
    assert_eq!(count(&s), 1, "the expired one is swept");
    assert_eq!(
        parse_code_key(&s.codes.iter().keys().next().unwrap().unwrap()),
        Some((&zero.bytes()[..], Purpose::ResetPassword))
    );
    let check =
        |code: [u8; 32]| done(s.check_code(&zero, Purpose::ResetPassword, code, 3, 50)).unwrap();
    assert_eq!(check([2; 32]), CodeCheck::Wrong);
    assert_eq!(check([1; 32]), CodeCheck::Used);
    assert_eq!(check([1; 32]), CodeCheck::Invalid, "single use");
    assert_eq!(count(&s), 0);
    done(s.sweep_codes(50)).unwrap();
    assert_eq!(s.codes.len(), 0);
}

#[test]
fn counters_stop_at_the_limit_and_old_windows_go() {
    let (_dir, s) = store();
    let c = Counter::PhoneSendsPerDay;
    let p = ix("+861");
    assert_eq!(done(s.count_up(c, 5, &p, 2)).unwrap(), Ok(1));
    assert_eq!(done(s.count_up(c, 5, &p, 2)).unwrap(), Ok(2));
    assert_eq!(done(s.count_up(c, 5, &p, 2)).unwrap(), Err(2));
    done(s.count_down(c, 5, &p)).unwrap();
    assert_eq!(done(s.count(c, 5, &p)).unwrap(), 1);
    assert_eq!(
        done(s.count_up(c, 6, &p, 2)).unwrap(),
        Ok(1),
        "a new window starts at zero"
    );
    assert_eq!(
        done(s.count_up(Counter::PhoneFailuresPerHour, 5, &p, 0)).unwrap(),
        Ok(1),
        "0 = no limit"
    );
    assert_eq!(done(s.prune_counters(&|_| 6)).unwrap(), 2);
    assert_eq!(done(s.count(c, 5, &p)).unwrap(), 0);
    assert_eq!(done(s.count(c, 6, &p)).unwrap(), 1);
}

#[test]
fn delete_user_removes_record_index_methods_and_counts_it_out() {
    let (_dir, s) = store();
    let (sms, password) = sms_and_password("+861");
    let (a, _) =
        done(s.create_user_if_absent(new_user("+861"), &[sms.clone(), password.clone()])).unwrap();
    let (b, _) =
        done(s.create_user_if_absent(new_user("+862"), std::slice::from_ref(&sms))).unwrap();
    assert_eq!(
        done(s.login_methods(&a)).unwrap(),
        vec![sms.clone(), password]
    );
    assert_eq!(done(s.delete_user(a.id)).unwrap(), Some(a.clone()));
    assert_eq!(done(s.delete_user(a.id)).unwrap(), None);
    assert_eq!(done(s.user(a.id)).unwrap(), None);
    assert_eq!(done(s.user_by_phone(&ix("+861"))).unwrap(), None);
    assert!(!done(s.has_user(&ix("+861"))).unwrap() && done(s.has_user(&ix("+862"))).unwrap());
    assert_eq!(s.methods.scan_prefix(u64_key(a.id)).count(), 0);
    let sms_b = LoginMethod {
        identification: "+862".into(),
        ..sms
    };
    assert_eq!(done(s.login_methods(&b)).unwrap(), vec![sms_b]);
    assert_eq!(done(s.user_count()).unwrap(), 1);
    assert_eq!(done(s.users()).unwrap(), vec![b]);
    // The id is not given out again.
    let (c, _) = done(s.create_user_if_absent(new_user("+861"), &[])).unwrap();
    assert_eq!(c.id, 3);
}

/// While users are being created on other threads, every snapshot shows each user
/// with its phone index entry and login method and a users_total that counts them:
/// never half of a create.
#[test]
fn snapshots_never_see_half_a_change() {
    use std::collections::HashMap;
    type Pair = (Vec<u8>, Vec<u8>);
    let (_dir, s) = store();
    let s = std::sync::Arc::new(s);
    let writers: Vec<_> = (0..4)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                for i in 0..300 {
                    let phone = format!("+86{t}{i:05}");
                    let m = LoginMethod {
                        method: Method::Password,
                        identification: phone.clone(),
                        access_code: Some("$argon2id$x".into()),
                    };
                    done(s.create_user_if_absent(new_user(&phone), &[m])).unwrap();
                }
            })
        })
        .collect();
    let mut snapshots = 0;
    while snapshots < 3 || writers.iter().any(|w| !w.is_finished()) {
        let mut trees: HashMap<String, Vec<Pair>> = HashMap::new();
        s.snapshot(&mut |t, k, v| {
            trees
                .entry(t.to_owned())
                .or_default()
                .push((k.to_vec(), v.to_vec()));
            Ok(())
        })
        .unwrap();
        let count = |t: &str| trees.get(t).map_or(0, Vec::len) as u64;
        let total = trees
            .get("meta")
            .and_then(|m| m.iter().find(|(k, _)| k == META_USERS))
            .map_or(0, |(_, v)| read_u64(v).unwrap());
        assert_eq!(count("userid_user"), total);
        assert_eq!(count("phone_userid"), total);
        assert_eq!(count("useridmethod_login"), total);
        snapshots += 1;
    }
    for w in writers {
        w.join().unwrap();
    }
    assert_eq!(done(s.user_count()).unwrap(), 1200);
}

#[test]
fn revoke_is_first_wins() {
    let (_dir, s) = store();
    assert!(done(s.revoke("a", 10)).unwrap());
    assert!(!done(s.revoke("a", 10)).unwrap());
    assert!(done(s.is_revoked("a")).unwrap());
    assert_eq!(done(s.prune_revocations(11)).unwrap(), 1);
    assert!(!done(s.is_revoked("a")).unwrap());
    assert_eq!(s.revoked.len(), 0);
}

#[test]
fn a_wechat_binding_is_one_account_each_way_and_leaves_with_the_account() {
    use crate::store::WechatBind;
    let (_dir, s) = store();
    let bound = |b: WechatBind| match b {
        WechatBind::Bound { user, created } => (user, created),
        other => panic!("not bound: {other:?}"),
    };
    let mut new = new_user("+8613800000001");
    new.avatar_url = Some("https://a/1".into());
    let (a, created) = bound(done(s.bind_wechat_to_phone(new, "wx-a")).unwrap());
    assert!(created);
    assert_eq!(a.avatar_url.as_deref(), Some("https://a/1"));
    assert_eq!(
        done(s.user_by_wechat("wx-a")).unwrap().map(|u| u.id),
        Some(a.id)
    );
    let methods: Vec<_> = done(s.login_methods(&a))
        .unwrap()
        .into_iter()
        .map(|m| m.method)
        .collect();
    assert_eq!(methods, [Method::Sms, Method::Wechat]);
    // The id is taken for every other account; the account holds one id.
    let (b, _) = done(s.create_user_if_absent(new_user("+8613800000002"), &[])).unwrap();
    assert_eq!(
        done(s.link_wechat(b.id, "wx-a", None)).unwrap(),
        WechatBind::Taken
    );
    assert_eq!(
        done(s.bind_wechat_to_phone(new_user("+8613800000002"), "wx-a")).unwrap(),
        WechatBind::Taken
    );
    assert_eq!(
        done(s.link_wechat(a.id, "wx-b", None)).unwrap(),
        WechatBind::AlreadyBound
    );
    // Unlinked: gone both ways, avatar too; the id binds elsewhere.
    let a = done(s.unlink_wechat(a.id)).unwrap().unwrap();
    assert_eq!(a.avatar_url, None);
    assert_eq!(done(s.user_by_wechat("wx-a")).unwrap(), None);
    bound(done(s.link_wechat(b.id, "wx-a", None)).unwrap());
    // A deleted account's binding goes with it.
    done(s.delete_user(b.id)).unwrap();
    assert_eq!(done(s.user_by_wechat("wx-a")).unwrap(), None);
    assert!(s.wechats.get("wx-a").unwrap().is_none());
}

#[test]
fn an_index_entry_no_method_record_confirms_is_ignored() {
    use crate::store::WechatBind;
    let (_dir, s) = store();
    let (a, _) = done(s.create_user_if_absent(new_user("+8613800000003"), &[])).unwrap();
    // What a crash between a bind's two writes leaves: the entry, not the record.
    s.wechats.insert("wx-stale", &u64_key(a.id)).unwrap();
    assert_eq!(done(s.user_by_wechat("wx-stale")).unwrap(), None);
    let (b, _) = done(s.create_user_if_absent(new_user("+8613800000004"), &[])).unwrap();
    assert!(matches!(
        done(s.link_wechat(b.id, "wx-stale", None)).unwrap(),
        WechatBind::Bound { .. }
    ));
    assert_eq!(
        done(s.user_by_wechat("wx-stale")).unwrap().map(|u| u.id),
        Some(b.id)
    );
}

#[test]
fn a_store_of_schema_3_with_format_1_users_opens_and_binds() {
    let dir = tempfile::tempdir().unwrap();
    {
        // The previous release's records: schema 3, a user record of format 1.
        #[derive(serde::Serialize)]
        struct UserV1<'a>(u64, &'a str, &'a str, i64, Option<i64>, bool, u32);
        let s = open(dir.path());
        s.meta.insert(META_SCHEMA, &3u32.to_be_bytes()).unwrap();
        s.users
            .insert(
                u64_key(1),
                encode(&UserV1(1, "+8613800000005", "old", 1, None, false, 0)),
            )
            .unwrap();
        s.phones.insert("+8613800000005", &u64_key(1)).unwrap();
        s.meta.insert(META_USERS, &u64_key(1)).unwrap();
        s.flush_blocking().unwrap();
    }
    let s = reopen(dir.path());
    let version = s.meta.get(META_SCHEMA).unwrap().unwrap();
    assert_eq!(&version[..], &SCHEMA_VERSION.to_be_bytes());
    let old = done(s.user_by_phone(&ix("+8613800000005")))
        .unwrap()
        .unwrap();
    assert_eq!(
        (old.nickname.as_str(), old.avatar_url.as_deref()),
        ("old", None)
    );
    let linked = done(s.link_wechat(old.id, "wx-old", Some("https://a/2"))).unwrap();
    assert!(
        matches!(linked, crate::store::WechatBind::Bound { .. }),
        "{linked:?}"
    );
    let now = done(s.user(old.id)).unwrap().unwrap();
    assert_eq!(now.avatar_url.as_deref(), Some("https://a/2"));
}

#[test]
fn a_grant_is_taken_once_and_pruned_when_expired() {
    use crate::store::{GrantKind, Grants};
    let (_dir, s) = store();
    done(s.put_grant(GrantKind::WechatTicket, [1; 32], b"live", 100)).unwrap();
    done(s.put_grant(GrantKind::WechatTicket, [2; 32], b"old", 10)).unwrap();
    // Kinds are apart: a ticket is no bind token.
    assert_eq!(
        done(s.take_grant(GrantKind::WechatBind, [1; 32])).unwrap(),
        None
    );
    assert_eq!(
        done(s.take_grant(GrantKind::WechatTicket, [1; 32])).unwrap(),
        Some((b"live".to_vec(), 100))
    );
    assert_eq!(
        done(s.take_grant(GrantKind::WechatTicket, [1; 32])).unwrap(),
        None
    );
    assert_eq!(done(s.prune_grants(50)).unwrap(), 1);
    assert_eq!(
        done(s.take_grant(GrantKind::WechatTicket, [2; 32])).unwrap(),
        None
    );
}

fn entry(user: UserId, at: i64, seq: u32) -> crate::store::ActivityEntry {
    crate::store::ActivityEntry {
        user_id: user,
        at,
        seq,
        event: crate::model::ActivityEvent::Login,
        method: Some(Method::Sms),
        ip: "203.0.113.0/24".into(),
        user_agent: "ua".into(),
    }
}

#[test]
fn activity_pages_newest_first_prunes_by_age_and_goes_with_its_user() {
    use crate::store::{Activity, SessionRecord};
    let (_dir, s) = store();
    let (a, _) = done(s.create_user_if_absent(new_user("+861"), &[])).unwrap();
    let (b, _) = done(s.create_user_if_absent(new_user("+862"), &[])).unwrap();
    for (at, seq) in [(100, 7), (100, 8), (200, 1), (300, 0)] {
        done(s.record_activity(&entry(a.id, at, seq))).unwrap();
    }
    done(s.record_activity(&entry(b.id, 250, 0))).unwrap();
    let times = |page: Vec<crate::store::ActivityEntry>| -> Vec<(i64, u32)> {
        page.into_iter().map(|e| (e.at, e.seq)).collect()
    };
    assert_eq!(
        times(done(s.activity_page(a.id, None, 3)).unwrap()),
        [(300, 0), (200, 1), (100, 8)]
    );
    assert_eq!(
        times(done(s.activity_page(a.id, Some((100, 8)), 3)).unwrap()),
        [(100, 7)]
    );
    assert_eq!(
        done(s.activity_page(a.id, None, 9)).unwrap()[0],
        entry(a.id, 300, 0)
    );

    assert_eq!(done(s.prune_activity(200)).unwrap(), 2, "the two at 100");
    assert_eq!(
        times(done(s.activity_page(a.id, None, 9)).unwrap()),
        [(300, 0), (200, 1)]
    );

    let session = SessionRecord {
        id: [1; 16],
        user_id: a.id,
        session_gen: 0,
        method: Method::Sms,
        created_at: 1,
        last_used_at: 1,
        expires_at: i64::MAX,
        ip: String::new(),
        user_agent: String::new(),
        ended: false,
    };
    done(s.create_session(&session, [9; 32])).unwrap();
    done(s.create_session(
        &SessionRecord {
            id: [2; 16],
            user_id: b.id,
            ..session.clone()
        },
        [8; 32],
    ))
    .unwrap();
    done(s.delete_user(a.id)).unwrap().unwrap();
    assert!(done(s.activity_page(a.id, None, 9)).unwrap().is_empty());
    assert!(done(s.user_sessions(a.id)).unwrap().is_empty());
    assert_eq!(
        s.refresh.len(),
        1,
        "the deleted user's refresh token is gone"
    );
    // The other user keeps everything.
    assert_eq!(done(s.activity_page(b.id, None, 9)).unwrap().len(), 1);
    assert_eq!(done(s.user_sessions(b.id)).unwrap().len(), 1);
}

#[test]
fn a_move_to_a_new_phone_key_cut_short_is_finished_by_the_next_pass() {
    let (_dir, s) = store();
    for phone in ["+8613800000001", "+8613800000002", "+8613800000003"] {
        done(s.create_user_if_absent(new_user(phone), &[])).unwrap();
    }
    let old = s.vault.current();
    let new = crate::privacy::PhoneKey::new(&[7; 32]);
    let new_index = new.index("+8613800000001");
    s.vault.set_arcs(std::sync::Arc::new(new), Some(old));
    // Cut short after its first step for user 1: the new index entry is written, the
    // record still sealed with the old key and the old entry still there.
    s.phones.insert(new_index.bytes(), &u64_key(1)[..]).unwrap();
    assert_eq!(s.first_unmoved_now().unwrap(), Some(1));
    // The pass, in two batches (the second past the last user).
    assert_eq!(s.move_users_now(0, 2).unwrap(), (Some(3), 2));
    assert_eq!(s.move_users_now(3, 2).unwrap(), (Some(4), 1));
    assert_eq!(s.move_users_now(4, 2).unwrap(), (None, 0));
    assert_eq!(s.first_unmoved_now().unwrap(), None);
    // Each user under its new index only, and found with the new key alone.
    s.vault.set_arcs(
        std::sync::Arc::new(crate::privacy::PhoneKey::new(&[7; 32])),
        None,
    );
    assert_eq!(s.phones.len(), 3, "an entry under the old index stayed");
    for (id, phone) in [
        (1, "+8613800000001"),
        (2, "+8613800000002"),
        (3, "+8613800000003"),
    ] {
        let index = s.vault.index(phone);
        assert_eq!(done(s.user_by_phone(&index)).unwrap().unwrap().id, id);
    }
    // A second pass changes nothing.
    assert_eq!(s.move_users_now(0, 10).unwrap(), (Some(4), 0));
}
