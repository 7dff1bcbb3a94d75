//! `smsauth user ...` as an operator uses it: through the admin socket while the server
//! runs, on the store directly once it has stopped, and what happens after kill -9.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::sync::Arc;

use common::{TestServer, admin, ok_stdout};
use serde_json::json;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn token(login: &serde_json::Value) -> String {
    login["access_token"].as_str().unwrap().to_owned()
}

/// Data rows of `user list` (the header is the first line).
fn rows(list: &str) -> Vec<Vec<String>> {
    let mut lines = list.lines();
    assert_eq!(
        lines.next(),
        Some("id\tphone\tnickname\tcreated\tlast_login\tdisabled")
    );
    lines
        .map(|l| l.split('\t').map(str::to_owned).collect())
        .collect()
}

/// The server logged that it ran this admin action itself (the socket path was taken).
/// Not on PostgreSQL: a database every instance shares is locked by none, and commands
/// act on it directly.
fn served(s: &TestServer, op: &str) {
    if common::engine() == "postgres" {
        return;
    }
    assert!(
        s.wait_log(|l| l["message"] == "admin action" && l["op"] == op)
            .is_some(),
        "the server did not run {op}"
    );
}

#[tokio::test]
async fn every_user_command_works_while_the_server_runs() {
    // Several codes go to one phone here.
    let s = TestServer::start("[code]\nresend_interval_secs = 0\n").await;
    let dir = s.dir();
    let a = token(&s.sms_login("13812345001").await);
    let b = token(&s.sms_login("13812345002").await);

    let sock = s.data_dir().join("admin.sock");
    let meta = std::fs::metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    // Masked by default: the numbers are decrypted for the operator only when asked.
    let list = rows(&ok_stdout(&admin(dir.path(), &["user", "list"])));
    served(&s, "list");
    assert_eq!(list.len(), 2);
    assert_eq!(list[0][..2], ["1", "+86138****5001"]);
    assert_eq!(list[0][5], "no");
    assert_eq!(list[1][1], "+86138****5002");
    let list = rows(&ok_stdout(&admin(dir.path(), &["user", "list", "--full"])));
    assert_eq!(list[0][..2], ["1", "+8613812345001"]);
    assert_eq!(list[1][1], "+8613812345002");

    // Any phone form the API accepts.
    let show = ok_stdout(&admin(dir.path(), &["user", "show", "+86 138-1234-5001"]));
    assert!(show.contains("phone:         +8613812345001"), "{show}");
    assert!(
        show.contains("login methods: sms (+8613812345001)"),
        "{show}"
    );

    ok_stdout(&admin(dir.path(), &["user", "disable", "13812345001"]));
    served(&s, "disable");
    assert_eq!(s.get("/api/v1/me", Some(&a)).await.0, 401);
    let code = s.send_code("13812345001", "login").await;
    let (status, _) = s
        .post(
            "/api/v1/auth/sms-login",
            json!({ "phone": "13812345001", "code": code }),
        )
        .await;
    assert_eq!(status, 401, "a disabled account cannot log in");
    assert_eq!(
        rows(&ok_stdout(&admin(dir.path(), &["user", "list"])))[0][5],
        "yes"
    );

    ok_stdout(&admin(dir.path(), &["user", "enable", "+8613812345001"]));
    assert_eq!(s.get("/api/v1/me", Some(&a)).await.0, 200);

    ok_stdout(&admin(dir.path(), &["user", "logout", "13812345001"]));
    assert_eq!(s.get("/api/v1/me", Some(&a)).await.0, 401);
    let fresh = token(&s.sms_login("13812345001").await);
    assert_eq!(s.get("/api/v1/me", Some(&fresh)).await.0, 200);

    // Used just before, so the server has the user in memory: the delete must end that.
    assert_eq!(s.get("/api/v1/me", Some(&b)).await.0, 200);
    let out = ok_stdout(&admin(dir.path(), &["user", "delete", "13812345002"]));
    assert_eq!(out, "user 2 (+8613812345002) deleted\n");
    assert_eq!(s.get("/api/v1/me", Some(&b)).await.0, 401);
    let out = admin(dir.path(), &["user", "show", "13812345002"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no such user: +8613812345002"),
        "{}",
        stderr(&out)
    );
    let out = admin(dir.path(), &["user", "disable", "not-a-phone"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("not a valid phone"),
        "{}",
        stderr(&out)
    );

    // Stopped: the socket is gone, the same commands work on the store directly.
    let mut s = s;
    assert!(s.terminate().success());
    assert!(!sock.exists(), "admin.sock must be removed at shutdown");
    let list = rows(&ok_stdout(&admin(dir.path(), &["user", "list"])));
    assert_eq!(list.len(), 1);
    if common::engine() == "postgres" {
        // What can be seen without opening the store: the user is gone for the command
        // run directly too, and the next start counts it out.
        let out = admin(dir.path(), &["user", "show", "13812345002"]);
        assert_eq!(out.status.code(), Some(1));
        assert!(
            stderr(&out).contains("no such user: +8613812345002"),
            "{}",
            stderr(&out)
        );
        let s = TestServer::start_in(dir.clone(), "").await;
        let (_, metrics) = s.get_text("/metrics").await;
        assert!(
            metrics.lines().any(|l| l == "smsauth_users 1"),
            "delete counts the user out: {metrics}"
        );
        eprintln!(
            "skipped under TEST_STORAGE_ENGINE=postgres: the check that user 2's login \
             method records are gone reads sled's trees"
        );
        return;
    }
    let store = smsauth::store::SledStore::open(&s.data_dir(), 8).unwrap();
    use futures::executor::block_on;
    use smsauth::store::{Snapshots, Users};
    assert_eq!(
        block_on(store.user_count()).unwrap(),
        1,
        "delete counts the user out"
    );
    assert!(
        block_on(store.user_by_phone(&store.vault().index("+8613812345002")))
            .unwrap()
            .is_none()
    );
    let mut left_of_user_2 = 0;
    store
        .snapshot(&mut |tree, key, _| {
            if tree == "useridmethod_login" && key.starts_with(&2u64.to_be_bytes()) {
                left_of_user_2 += 1;
            }
            Ok(())
        })
        .unwrap();
    assert_eq!(left_of_user_2, 0, "its login methods are gone");
}

#[tokio::test]
async fn commands_on_a_stopped_server_take_effect_at_its_next_start() {
    // A phone logs in again at the end; a shared store (PostgreSQL) keeps its resend wait
    // across the restarts.
    const CONFIG: &str = "[code]\nresend_interval_secs = 0\n";
    let mut s = TestServer::start(CONFIG).await;
    let dir = s.dir();
    let a = token(&s.sms_login("13812346001").await);
    let b = token(&s.sms_login("13812346002").await);
    assert!(s.terminate().success());

    ok_stdout(&admin(dir.path(), &["user", "disable", "13812346001"]));
    ok_stdout(&admin(dir.path(), &["user", "logout", "13812346002"]));
    let s = TestServer::start_in(dir.clone(), CONFIG).await;
    assert_eq!(s.get("/api/v1/me", Some(&a)).await.0, 401);
    assert_eq!(s.get("/api/v1/me", Some(&b)).await.0, 401);
    let mut s = s;
    assert!(s.terminate().success());

    ok_stdout(&admin(dir.path(), &["user", "enable", "13812346001"]));
    let out = ok_stdout(&admin(dir.path(), &["user", "delete", "13812346002"]));
    assert!(out.contains("deleted"), "{out}");
    let out = admin(dir.path(), &["user", "logout", "13812346002"]);
    assert_eq!(out.status.code(), Some(1));
    let s = TestServer::start_in(dir.clone(), CONFIG).await;
    assert_eq!(s.get("/api/v1/me", Some(&a)).await.0, 200);
    // A new login of the deleted phone is a new user with a new id.
    let again = s.sms_login("13812346002").await;
    assert_eq!(again["created"], true);
    assert_eq!(again["user"]["id"], 3);
}

/// The commands take the data dir from --config like serve, and never create one.
#[test]
fn commands_honour_config_and_refuse_a_missing_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("elsewhere");
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!("[storage]\ndata_dir = {:?}\n", data.to_str().unwrap()),
    )
    .unwrap();
    let out = common::run_cli(
        &[
            "user",
            "list",
            "--full",
            "--config",
            config.to_str().unwrap(),
        ],
        &[],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no smsauth data in"),
        "{}",
        stderr(&out)
    );
    assert!(!data.exists(), "a command must not create a data dir");

    // Make a store there, then the same command lists it.
    {
        use smsauth::store::{NewUser, SledStore, Users};
        let store = SledStore::open(&data, 8).unwrap();
        futures::executor::block_on(store.create_user_if_absent(
            NewUser {
                phone: "+8613812347001",
                other: None,
                index: store.vault().index("+8613812347001"),
                nickname: "x".into(),
                created_at: 0,
                last_login_at: None,
                avatar_url: None,
            },
            &[],
        ))
        .unwrap();
        store.flush_blocking().unwrap();
    }
    let out = common::run_cli(
        &[
            "user",
            "list",
            "--full",
            "--config",
            config.to_str().unwrap(),
        ],
        &[],
        dir.path(),
    );
    let list = rows(&ok_stdout(&out));
    assert_eq!(
        list,
        vec![vec![
            "1",
            "+8613812347001",
            "x",
            "1970-01-01T00:00:00Z",
            "never",
            "no"
        ]]
    );
}

#[tokio::test]
async fn a_stale_admin_socket_after_kill9_does_not_stop_the_next_start() {
    let mut s = TestServer::start("").await;
    let dir = s.dir();
    s.sms_login("13812348001").await;
    s.kill9();
    let sock = s.data_dir().join("admin.sock");
    assert!(sock.exists(), "kill -9 leaves the socket file behind");
    // With nobody holding the store, the command works directly.
    assert_eq!(
        rows(&ok_stdout(&admin(dir.path(), &["user", "list"]))).len(),
        1
    );

    let s = TestServer::start_in(dir.clone(), "").await;
    assert!(
        s.wait_log(|l| l["message"] == "replaced a stale admin socket")
            .is_some()
    );
    ok_stdout(&admin(dir.path(), &["user", "show", "13812348001"]));
    served(&s, "show");
}

/// The store is held (a server runs) but its socket is gone: the command says what to do.
#[tokio::test]
async fn with_the_store_held_and_no_socket_the_commands_refuse_politely() {
    if common::engine() == "postgres" {
        eprintln!(
            "skipped under TEST_STORAGE_ENGINE=postgres: a held store is sled's lock on its \
             data dir (one process per dir), and a PostgreSQL database is shared"
        );
        return;
    }
    let s = TestServer::start("").await;
    let dir: Arc<tempfile::TempDir> = s.dir();
    std::fs::remove_file(s.data_dir().join("admin.sock")).unwrap();
    for args in [
        &["user", "list"][..],
        &["user", "disable", "13812349001"],
        &["backup", "b.bak"],
    ] {
        let out = admin(dir.path(), args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = stderr(&out);
        assert!(
            err.contains("is in use by another process") && err.contains("Stop the server"),
            "{args:?}: {err}"
        );
    }
    assert!(!dir.path().join("b.bak").exists());
    // The server is unharmed.
    assert_eq!(s.get("/healthz", None).await.0, 200);
}
