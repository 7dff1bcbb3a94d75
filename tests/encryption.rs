//! Phone numbers at rest: after registrations, logins, password changes, failed logins,
//! pending codes and a backup, no byte the service leaves behind (the data dir's files,
//! the backup file, a `pg_dump` of the database, the log) holds any of the phones in any
//! form; a store of the previous release is sealed at its first start and works on; and
//! a start without the key its store is sealed with is refused.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{TestServer, admin, ok_stdout, run_cli};
use serde_json::{Value, json};

/// Every way a phone may be written: E.164, without the plus, national, with separators.
fn forms(national: &str) -> Vec<String> {
    let (a, b, c) = (&national[..3], &national[3..7], &national[7..]);
    vec![
        format!("+86{national}"),
        format!("86{national}"),
        national.to_owned(),
        format!("{a} {b} {c}"),
        format!("{a}-{b}-{c}"),
    ]
}

/// The forms of `phones` found in `bytes`.
fn found_in(bytes: &[u8], phones: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    for phone in phones {
        for form in forms(phone) {
            if bytes.windows(form.len()).any(|w| w == form.as_bytes()) {
                found.push(form);
            }
        }
    }
    found
}

/// Every file under `dir`, with its bytes.
fn files_under(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push((path.clone(), std::fs::read(&path).unwrap()));
            }
        }
    }
    out
}

/// Asserts no form of `phones` is in any file under `dir` (if there is one); and that
/// `needle` is, if given, so the search is known to see what the store wrote.
fn assert_dir_clean(dir: &Path, phones: &[&str], needle: Option<&str>) {
    let files = if dir.exists() {
        files_under(dir)
    } else {
        Vec::new()
    };
    for (path, bytes) in &files {
        let found = found_in(bytes, phones);
        assert!(found.is_empty(), "{}: holds {found:?}", path.display());
    }
    let Some(needle) = needle else { return };
    assert!(
        files
            .iter()
            .any(|(_, b)| b.windows(needle.len()).any(|w| w == needle.as_bytes())),
        "the nickname {needle:?} is in none of the files: the search sees nothing"
    );
}

const CODE_CONFIG: &str = "[code]\nresend_interval_secs = 0\n";
const PASSWORD: &str = "correct horse battery staple";
const NEW_PASSWORD: &str = "another long passphrase";
/// A nickname the test sets, to find in the stored bytes (proof the search reads them).
const NEEDLE: &str = "needle-nickname-7d1f";

#[tokio::test]
async fn no_stored_byte_and_no_backup_holds_a_phone_number() {
    let mut s = TestServer::start(CODE_CONFIG).await;
    let (code_user, password_user, pending, guessed) =
        ("13812340001", "13812340002", "13812340003", "13812340004");
    let phones = [code_user, password_user, pending, guessed];

    // A code login (registers), with a nickname to find later.
    let login = s.sms_login(code_user).await;
    let token = login["access_token"].as_str().unwrap();
    let (status, _) = s
        .send(
            s.client
                .patch(s.url("/api/v1/me"))
                .bearer_auth(token)
                .json(&json!({ "nickname": NEEDLE })),
        )
        .await;
    assert_eq!(status, 200);
    // A password account, a failed password login, and a reset.
    let code = s.send_code(password_user, "register").await;
    let (status, body) = s
        .post(
            "/api/v1/auth/register",
            json!({ "phone": password_user, "code": code, "password": PASSWORD }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, _) = s
        .post(
            "/api/v1/auth/login",
            json!({ "phone": password_user, "password": "not the password" }),
        )
        .await;
    assert_eq!(status, 401);
    let code = s.send_code(password_user, "reset_password").await;
    let (status, body) = s
        .post(
            "/api/v1/auth/password/reset",
            json!({ "phone": password_user, "code": code, "new_password": NEW_PASSWORD }),
        )
        .await;
    assert_eq!(status, 204, "{body}");
    // A code left pending, and a wrong guess at another (the failure counter).
    s.send_code(pending, "login").await;
    s.send_code(guessed, "login").await;
    let (status, _) = s
        .post(
            "/api/v1/auth/sms-login",
            json!({ "phone": guessed, "code": "000000" }),
        )
        .await;
    assert_eq!(status, 400);
    // The accounts work, by phone, after all that.
    let (status, body) = s
        .post(
            "/api/v1/auth/login",
            json!({ "phone": password_user, "password": NEW_PASSWORD }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["user"]["phone"], "+8613812340002", "read back opened");

    let dir = s.dir();
    let backup = dir.path().join("smsauth.backup");
    ok_stdout(&admin(dir.path(), &["backup", backup.to_str().unwrap()]));
    assert!(s.terminate().success());

    // With sled the store is the data dir; with PostgreSQL the dir holds no data, and the
    // database is searched below.
    let needle = (common::engine() == "sled").then_some(NEEDLE);
    assert_dir_clean(&s.data_dir(), &phones, needle);
    let bytes = std::fs::read(&backup).unwrap();
    assert_eq!(
        found_in(&bytes, &phones),
        Vec::<String>::new(),
        "the backup"
    );
    assert!(bytes.windows(NEEDLE.len()).any(|w| w == NEEDLE.as_bytes()));
    if common::engine() == "postgres" {
        let dump = common::shared_postgres().dump(&common::postgres_url(dir.path()));
        assert_eq!(found_in(&dump, &phones), Vec::<String>::new(), "pg_dump");
        assert!(dump.windows(NEEDLE.len()).any(|w| w == NEEDLE.as_bytes()));
        // The key is never in the database, nor in the data dir.
        let key = smsauth::privacy::read_key_file(&common::phone_key_file(dir.path())).unwrap();
        assert!(!dump.windows(32).any(|w| w == key));
    }
    for line in s.log_lines() {
        let text = line.to_string();
        assert!(
            found_in(text.as_bytes(), &phones).is_empty(),
            "a log line holds a phone: {text}"
        );
    }
}

/// The previous release's sled data dir (tests/fixtures/schema4-sled, made by its binary:
/// a code-login user 13800000001, a password user 13800000002 with `correct horse
/// battery`, a user 13800000004 who guessed wrong once, and a login code 246810 pending
/// for 13800000003 that lives for a century).
const FIXTURE_PHONES: [&str; 4] = ["13800000001", "13800000002", "13800000003", "13800000004"];
const FIXTURE_CODE: &str = "246810";
const FIXTURE_PASSWORD: &str = "correct horse battery";

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// What every upgraded store must still do: the accounts by phone, the password, and the
/// code sent before the upgrade.
async fn check_upgraded(s: &TestServer) {
    let (status, body) = s
        .post(
            "/api/v1/auth/login",
            json!({ "phone": "13800000002", "password": FIXTURE_PASSWORD }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (&body["user"]["id"], &body["user"]["phone"]),
        (&json!(2), &json!("+8613800000002"))
    );
    let (status, body) = s
        .post(
            "/api/v1/auth/sms-login",
            json!({ "phone": "13800000003", "code": FIXTURE_CODE }),
        )
        .await;
    assert_eq!(status, 200, "the code sent before the upgrade: {body}");
    assert_eq!(body["created"], true);
    let again = s.sms_login("13800000001").await;
    assert_eq!(
        (&again["user"]["id"], &again["created"]),
        (&json!(1), &json!(false)),
        "the same account, found by its phone"
    );
    let methods: &Value = &again["user"]["login_methods"];
    assert_eq!(methods, &json!(["sms"]));
}

#[tokio::test]
async fn a_sled_store_of_the_previous_release_is_sealed_at_its_first_start() {
    if common::engine() == "postgres" {
        eprintln!("skipped under TEST_STORAGE_ENGINE=postgres: it upgrades a sled data dir");
        return;
    }
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schema4-sled");
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let data = dir.path().join("data");
    copy_dir(&fixture, &data);
    assert!(
        !found_in(&std::fs::read(data.join("db/db")).unwrap(), &FIXTURE_PHONES).is_empty(),
        "the fixture holds the numbers in the clear"
    );
    let mut s = TestServer::start_in(dir.clone(), CODE_CONFIG).await;
    assert!(
        s.log_lines()
            .iter()
            .any(|l| l["message"] == "store migrated to schema 5: phone numbers sealed"),
        "{:?}",
        s.log_lines()
    );
    check_upgraded(&s).await;
    assert!(s.terminate().success());
    for (path, bytes) in files_under(&data) {
        let found = found_in(&bytes, &FIXTURE_PHONES);
        assert!(found.is_empty(), "{}: holds {found:?}", path.display());
    }
    // And a start after that finds everything as it was left.
    let s = TestServer::start_in(dir, CODE_CONFIG).await;
    let again = s.sms_login("13800000004").await;
    assert_eq!(again["user"]["id"], 3);
}

/// A PostgreSQL of the test's own, for the upgrade tests, which run once, in the sled
/// pass: None (with a message) under TEST_STORAGE_ENGINE=postgres, or where there is none.
fn own_postgres() -> Option<common::postgres::Postgres> {
    if common::engine() == "postgres" {
        eprintln!(
            "skipped under TEST_STORAGE_ENGINE=postgres: it starts a PostgreSQL of its own, also under sled"
        );
        return None;
    }
    common::postgres::Postgres::start()
}

/// A server's configuration on the database `url`, with the phone key in `key`.
fn postgres_config(key: &Path, url: &str) -> String {
    format!(
        "{CODE_CONFIG}[privacy]\nphone_key_file = \"{}\"\n[storage]\nengine = \"postgres\"\n[storage.postgres]\nurl = \"{url}\"\n",
        key.display()
    )
}

#[tokio::test]
async fn a_postgres_database_of_the_previous_release_is_sealed_at_its_first_start() {
    let Some(pg) = own_postgres() else {
        return;
    };
    let url = pg.new_database();
    let fixture = include_str!("fixtures/schema3-postgres.sql");
    pg.psql_url(&url, fixture);
    assert!(!found_in(&pg.dump(&url), &FIXTURE_PHONES).is_empty());
    let dir = Arc::new(tempfile::tempdir().unwrap());
    // Under TEST_STORAGE_ENGINE=postgres the harness gives the dir this database.
    std::fs::write(dir.path().join("postgres.url"), &url).unwrap();
    let key = common::phone_key_file(dir.path());
    let config = postgres_config(&key, &url);
    let mut s = TestServer::start_in(dir.clone(), &config).await;
    assert!(
        s.log_lines()
            .iter()
            .any(|l| l["message"] == "PostgreSQL store migrated to schema 4: phone numbers sealed"),
        "{:?}",
        s.log_lines()
    );
    check_upgraded(&s).await;
    assert!(s.terminate().success());
    let dump = pg.dump(&url);
    assert_eq!(found_in(&dump, &FIXTURE_PHONES), Vec::<String>::new());
    assert_eq!(pg.psql_url(&url, "SELECT version FROM smsauth_schema"), "6");
    // Another key on the same database: refused, exit 2, before serving.
    let other = dir.path().join("other.key");
    smsauth::privacy::create_key_file(&other, &smsauth::privacy::PhoneKey::generate()).unwrap();
    let out = serve_once(
        dir.path(),
        &config.replace(&key.display().to_string(), &other.display().to_string()),
    );
    assert_eq!(out.0, Some(2), "{}", out.1);
    assert!(
        out.1.contains("not the key this database is sealed with"),
        "{}",
        out.1
    );
}

/// The stores of the releases before sled keyed by the blind index's bytes: schema 5
/// (43-character indexes, both engines, made from the fixtures above by that release's
/// binary, 7b0567d, with `smsauth migrate`) and schema 6 (22 characters, made from the
/// schema-5 fixture by a2b7750's binary the same way): the same accounts and code.
#[tokio::test]
async fn a_sled_store_keyed_by_indexes_as_text_is_rekeyed_at_its_first_start() {
    if common::engine() == "postgres" {
        eprintln!("skipped under TEST_STORAGE_ENGINE=postgres: it upgrades a sled data dir");
        return;
    }
    for fixture in ["schema5-sled", "schema6-sled"] {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(fixture);
        let dir = Arc::new(tempfile::tempdir().unwrap());
        copy_dir(&fixture, &dir.path().join("data"));
        let s = TestServer::start_in(dir.clone(), CODE_CONFIG).await;
        assert!(
            s.log_lines().iter().any(|l| l["message"]
                == "store migrated to schema 7: records keyed by the phone index's bytes"
                && l["records"].as_u64() >= Some(4)),
            "{}: {:?}",
            fixture.display(),
            s.log_lines()
        );
        check_upgraded(&s).await;
        let s = s.restart().await;
        let again = s.sms_login("13800000004").await;
        assert_eq!(
            again["user"]["id"], 3,
            "the wrong guess's user, found again"
        );
    }
}

#[tokio::test]
async fn a_postgres_database_with_long_phone_indexes_is_rekeyed_at_its_first_start() {
    let Some(pg) = own_postgres() else {
        return;
    };
    let url = pg.new_database();
    pg.psql_url(&url, include_str!("fixtures/schema5-postgres.sql"));
    let long = "SELECT DISTINCT length(phone_index) FROM users";
    assert_eq!(pg.psql_url(&url, long), "43");
    let dir = Arc::new(tempfile::tempdir().unwrap());
    std::fs::write(dir.path().join("postgres.url"), &url).unwrap();
    let key = dir.path().join("phone.key");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schema5-postgres.key"),
        &key,
    )
    .unwrap();
    let config = postgres_config(&key, &url);
    let s = TestServer::start_in(dir.clone(), &config).await;
    check_upgraded(&s).await;
    assert_eq!(pg.psql_url(&url, long), "22");
    assert_eq!(
        pg.psql_url(
            &url,
            "SELECT count(*) FROM pending_codes WHERE length(phone_index) <> 22"
        ),
        "0"
    );
    assert_eq!(pg.psql_url(&url, "SELECT version FROM smsauth_schema"), "6");
}

/// Starts `smsauth serve` on `config` (written into `dir`) where the start must fail:
/// its exit status and stderr.
fn serve_once(dir: &Path, config: &str) -> (Option<i32>, String) {
    let path = dir.join("refused.toml");
    std::fs::write(&path, config).unwrap();
    let mut env: Vec<(&str, String)> = vec![("SMSAUTH_SERVER__LISTEN", "127.0.0.1:0".into())];
    if !config.contains("[storage]") {
        env.push((
            "SMSAUTH_STORAGE__DATA_DIR",
            dir.join("data").display().to_string(),
        ));
    }
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = run_cli(&["serve", "--config", path.to_str().unwrap()], &env, dir);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_start_without_the_key_its_store_is_sealed_with_is_refused() {
    if common::engine() == "postgres" {
        eprintln!("skipped under TEST_STORAGE_ENGINE=postgres: it is about a sled data dir's key");
        return;
    }
    let mut s = TestServer::start("").await;
    s.sms_login("13812340011").await;
    assert!(s.terminate().success());
    let dir = s.dir();
    let data = s.data_dir();
    let key = data.join("phone.key");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "made private");
    let kept = std::fs::read(&key).unwrap();

    // Gone: refused, naming the file, rather than a new key and every phone unknown.
    std::fs::remove_file(&key).unwrap();
    let (code, err) = serve_once(dir.path(), "");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("phone.key is missing"), "{err}");
    assert!(!key.exists(), "no new key made");
    // Another key: refused.
    smsauth::privacy::create_key_file(&key, &smsauth::privacy::PhoneKey::generate()).unwrap();
    let (code, err) = serve_once(dir.path(), "");
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("is not the key this store is sealed with"),
        "{err}"
    );
    // A named file that does not exist: refused.
    let (code, err) = serve_once(
        dir.path(),
        "[privacy]\nphone_key_file = \"/nonexistent/phone.key\"\n",
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("does not exist"), "{err}");
    // The key moved out of the data dir, named by the configuration: served.
    let outside = dir.path().join("kept-apart.key");
    std::fs::write(&outside, &kept).unwrap();
    std::fs::remove_file(&key).unwrap();
    let s = TestServer::start_in(
        dir.clone(),
        &format!("[privacy]\nphone_key_file = \"{}\"\n", outside.display()),
    )
    .await;
    let again = s.sms_login("13812340011").await;
    assert_eq!(again["created"], false, "the same account");

    // PostgreSQL without a key file: refused by the configuration, exit 2.
    let (code, err) = serve_once(
        dir.path(),
        "[storage]\nengine = \"postgres\"\n[storage.postgres]\nurl = \"postgres://u@127.0.0.1:1/x\"\n",
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("privacy.phone_key_file"), "{err}");
}
