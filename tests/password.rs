//! Password accounts over HTTP: register (with a code or a verify ticket), password
//! login, reset, and the rules around them.

mod common;

use std::time::{Duration, Instant};

use common::{TestServer, e164};
use serde_json::{Value, json};

const PW: &str = "correct horse battery";
const NO_RESEND_WAIT: &str = "[code]\nresend_interval_secs = 0\n";

async fn register(s: &TestServer, phone: &str, password: &str) -> (u16, Value) {
    let code = s.send_code(phone, "register").await;
    s.post(
        "/api/v1/auth/register",
        json!({ "phone": phone, "code": code, "password": password }),
    )
    .await
}

async fn login(s: &TestServer, phone: &str, password: &str) -> (u16, Value) {
    s.post(
        "/api/v1/auth/login",
        json!({ "phone": phone, "password": password }),
    )
    .await
}

#[tokio::test]
async fn register_then_log_in_by_password() {
    let s = TestServer::start(NO_RESEND_WAIT).await;
    let (status, body) = register(&s, "13812346001", PW).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["created"], true);
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["user"]["nickname"], "138****6001");
    assert_eq!(body["user"]["login_methods"], json!(["sms", "password"]));
    let (status, me) = s.get("/api/v1/me", body["access_token"].as_str()).await;
    assert_eq!((status, &me), (200, &body["user"]));

    let (status, logged_in) = login(&s, "+86 138 1234 6001", PW).await;
    assert_eq!(status, 200, "{logged_in}");
    assert_eq!(logged_in["created"], false);
    assert_eq!(logged_in["user"]["id"], body["user"]["id"]);
    assert!(
        logged_in["user"]["last_login_at"].as_str().unwrap()
            >= body["user"]["last_login_at"].as_str().unwrap()
    );
    assert_eq!(
        s.get("/api/v1/me", logged_in["access_token"].as_str())
            .await
            .0,
        200
    );
    // The account can also log in by code: the phone is proven either way.
    assert_eq!(
        s.sms_login("13812346001").await["user"]["id"],
        body["user"]["id"]
    );
}

#[tokio::test]
async fn multi_step_registration_with_a_single_use_ticket() {
    let s = TestServer::start(NO_RESEND_WAIT).await;
    let code = s.send_code("13812346002", "register").await;
    let (status, verified) = s
        .post(
            "/api/v1/auth/verify",
            json!({ "phone": "13812346002", "code": code, "purpose": "register" }),
        )
        .await;
    assert_eq!(status, 200);
    let ticket = verified["verification_token"].as_str().unwrap();

    // A ticket is bound to its phone.
    let (status, body) = s
        .post(
            "/api/v1/auth/register",
            json!({ "phone": "13812346003", "verification_token": ticket, "password": PW }),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_code"))
    );

    let (status, body) = s
        .post(
            "/api/v1/auth/register",
            json!({ "phone": "13812346002", "verification_token": ticket, "password": PW, "nickname": "小红" }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["user"]["nickname"], "小红");
    // Single use.
    let (status, body) = s
        .post(
            "/api/v1/auth/register",
            json!({ "phone": "13812346002", "verification_token": ticket, "password": PW }),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_code"))
    );
    // A login-purpose ticket does not register.
    let code = s.send_code("13812346004", "login").await;
    let (_, verified) = s
        .post(
            "/api/v1/auth/verify",
            json!({ "phone": "13812346004", "code": code, "purpose": "login" }),
        )
        .await;
    let (status, _) = s
        .post(
            "/api/v1/auth/register",
            json!({ "phone": "13812346004", "verification_token": verified["verification_token"], "password": PW }),
        )
        .await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn register_refuses_bad_input_without_using_up_the_code() {
    let s = TestServer::start("").await;
    let code = s.send_code("13812346005", "register").await;
    let register = |body: Value| s.post("/api/v1/auth/register", body);
    for (password, why) in [
        ("short", "8 to 128"),
        ("        ", "whitespace"),
        ("\t\t\t\t\t\t\t\t\t", "whitespace"),
    ] {
        let (status, body) =
            register(json!({ "phone": "13812346005", "code": code, "password": password })).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("weak_password")),
            "{password:?}"
        );
        assert!(body["message"].as_str().unwrap().contains(why), "{body}");
    }
    let long = "x".repeat(129);
    let (status, body) =
        register(json!({ "phone": "13812346005", "code": code, "password": long })).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("weak_password"))
    );
    for bad in [
        json!({ "phone": "13812346005", "password": PW }),
        json!({ "phone": "13812346005", "code": code, "verification_token": "x", "password": PW }),
        json!({ "phone": "13812346005", "code": code }),
        json!({ "phone": "13812346005", "code": code, "password": PW, "nickname": "" }),
    ] {
        let (status, body) = register(bad.clone()).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("invalid_request")),
            "{bad}"
        );
    }
    // A login code is not a register code.
    let login_code = s.send_code("13812346006", "login").await;
    let (status, body) =
        register(json!({ "phone": "13812346006", "code": login_code, "password": PW })).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_code"))
    );
    // Any Unicode counts, by characters: eight CJK characters are a fine password.
    let (status, body) =
        register(json!({ "phone": "13812346005", "code": code, "password": "我的密码很安全吗" }))
            .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(login(&s, "13812346005", "我的密码很安全吗").await.0, 200);
}

#[tokio::test]
async fn a_registered_phone_is_taken() {
    let s = TestServer::start("").await;
    assert_eq!(register(&s, "13812346007", PW).await.0, 201);
    let (status, body) = s
        .post(
            "/api/v1/sms/code",
            json!({ "phone": "13812346007", "purpose": "register" }),
        )
        .await;
    assert_eq!((status, body["error"].as_str()), (409, Some("phone_taken")));
    // An account made by code login is taken too.
    s.sms_login("13812346008").await;
    let (status, _) = s
        .post(
            "/api/v1/sms/code",
            json!({ "phone": "+8613812346008", "purpose": "register" }),
        )
        .await;
    assert_eq!(status, 409);
}

#[tokio::test]
async fn racing_registrations_make_exactly_one_account() {
    let s = TestServer::start(NO_RESEND_WAIT).await;
    for i in 0..4 {
        let phone = format!("1381235{i:04}");
        // Two proofs for one phone: a ticket from an earlier verify, and a fresh code.
        let code = s.send_code(&phone, "register").await;
        let (_, verified) = s
            .post(
                "/api/v1/auth/verify",
                json!({ "phone": phone, "code": code, "purpose": "register" }),
            )
            .await;
        let code = s.send_code(&phone, "register").await;
        let (a, b) = tokio::join!(
            s.post("/api/v1/auth/register", json!({ "phone": phone, "verification_token": verified["verification_token"], "password": PW })),
            s.post("/api/v1/auth/register", json!({ "phone": phone, "code": code, "password": "another password" })),
        );
        let mut statuses = [a.0, b.0];
        statuses.sort();
        assert_eq!(statuses, [201, 409], "{a:?} {b:?}");
        let loser = if a.0 == 409 { a.1 } else { b.1 };
        assert_eq!(loser["error"], "phone_taken");
    }
}

#[tokio::test]
async fn failed_logins_all_look_the_same() {
    let s = TestServer::start("").await;
    assert_eq!(register(&s, "13812346009", PW).await.0, 201);
    s.sms_login("13812346010").await; // an account with no password
    let unknown = login(&s, "13812346011", PW).await;
    let wrong = login(&s, "13812346009", "not the password").await;
    let no_password = login(&s, "13812346010", PW).await;
    assert_eq!(unknown.0, 401);
    assert_eq!(unknown.1["error"], "invalid_credentials");
    assert_eq!(unknown, wrong);
    assert_eq!(unknown, no_password);
    // Bad input is still bad input.
    let (status, body) = s
        .post(
            "/api/v1/auth/login",
            json!({ "phone": "12", "password": PW }),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_phone"))
    );
    let (status, _) = s
        .post("/api/v1/auth/login", json!({ "phone": "13812346009" }))
        .await;
    assert_eq!(status, 400);
}

/// The three kinds of failed login take the same time within noise: each costs one
/// argon2 verification (a dummy hash stands in where there is none). Without that, an
/// unknown phone would answer about a hundred times faster than a wrong password.
#[tokio::test]
async fn failed_logins_take_the_same_time() {
    let s = TestServer::start("").await;
    assert_eq!(register(&s, "13812346012", PW).await.0, 201);
    s.sms_login("13812346013").await;
    let cases = [
        ("13812346014", PW),
        ("13812346012", "not the password"),
        ("13812346013", PW),
    ];
    let mut samples: [Vec<Duration>; 3] = Default::default();
    for round in 0..12 {
        for (i, (phone, password)) in cases.iter().enumerate() {
            let started = Instant::now();
            let (status, _) = login(&s, phone, password).await;
            let took = started.elapsed();
            assert_eq!(status, 401);
            if round >= 2 {
                samples[i].push(took); // the first rounds warm caches up
            }
        }
    }
    // The fastest of each: noise (other tests, other processes) only ever adds time, so
    // the minimum is the steadiest estimate of what each case costs.
    let fastest: Vec<Duration> = samples.iter().map(|v| *v.iter().min().unwrap()).collect();
    let (min, max) = (fastest.iter().min().unwrap(), fastest.iter().max().unwrap());
    assert!(
        max.as_secs_f64() < min.as_secs_f64() * 2.5,
        "fastest answers differ: unknown, wrong, no password = {fastest:?} (all: {samples:?})"
    );
}

#[tokio::test]
async fn reset_replaces_the_password_and_ends_every_session_across_kill9() {
    let s = TestServer::start(NO_RESEND_WAIT).await;
    let (_, registered) = register(&s, "13812346015", PW).await;
    let (_, logged_in) = login(&s, "13812346015", PW).await;
    let by_code = s.sms_login("13812346015").await;
    let old_tokens =
        [&registered, &logged_in, &by_code].map(|b| b["access_token"].as_str().unwrap().to_owned());

    let code = s.send_code("13812346015", "reset_password").await;
    let (status, body) = s
        .post(
            "/api/v1/auth/password/reset",
            json!({ "phone": "13812346015", "code": code, "new_password": "a brand new secret" }),
        )
        .await;
    assert_eq!(status, 204, "{body}");
    for t in &old_tokens {
        assert_eq!(s.get("/api/v1/me", Some(t)).await.0, 401);
    }
    assert_eq!(login(&s, "13812346015", PW).await.0, 401);
    let (status, fresh) = login(&s, "13812346015", "a brand new secret").await;
    assert_eq!(status, 200);

    let s = s.kill9_and_restart().await;
    for t in &old_tokens {
        assert_eq!(
            s.get("/api/v1/me", Some(t)).await.0,
            401,
            "an ended session came back after kill -9"
        );
    }
    assert_eq!(
        s.get("/api/v1/me", fresh["access_token"].as_str()).await.0,
        200
    );
    assert_eq!(login(&s, "13812346015", "a brand new secret").await.0, 200);
}

#[tokio::test]
async fn reset_gives_a_code_only_account_a_password() {
    let s = TestServer::start(NO_RESEND_WAIT).await;
    let first = s.sms_login("13812346016").await;
    assert_eq!(first["user"]["login_methods"], json!(["sms"]));
    let code = s.send_code("13812346016", "reset_password").await;
    // The two-step form: verify, then reset with the ticket.
    let (_, verified) = s
        .post(
            "/api/v1/auth/verify",
            json!({ "phone": "13812346016", "code": code, "purpose": "reset_password" }),
        )
        .await;
    let reset = json!({ "phone": "13812346016", "verification_token": verified["verification_token"], "new_password": PW });
    assert_eq!(
        s.post("/api/v1/auth/password/reset", reset.clone()).await.0,
        204
    );
    assert_eq!(
        s.post("/api/v1/auth/password/reset", reset).await.0,
        400,
        "the ticket is single use"
    );
    let (status, body) = login(&s, "13812346016", PW).await;
    assert_eq!(status, 200);
    assert_eq!(body["user"]["login_methods"], json!(["sms", "password"]));
    assert_eq!(
        s.get("/api/v1/me", first["access_token"].as_str()).await.0,
        401
    );
    // Weak new passwords are refused before the code is used.
    let code = s.send_code("13812346016", "reset_password").await;
    let (status, body) = s
        .post(
            "/api/v1/auth/password/reset",
            json!({ "phone": "13812346016", "code": code, "new_password": "short" }),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("weak_password"))
    );
    let (status, _) = s
        .post(
            "/api/v1/auth/password/reset",
            json!({ "phone": "13812346016", "code": code, "new_password": "long enough now" }),
        )
        .await;
    assert_eq!(status, 204);
}

#[tokio::test]
async fn reset_codes_for_unknown_phones_answer_alike_and_send_nothing() {
    // On sled the login's resend wait ends with the process (its code was used up); on
    // PostgreSQL, a store instances share, it outlives it, so a short one is let pass.
    let shared_store = common::engine() == "postgres";
    let interval = if shared_store {
        "[code]\nresend_interval_secs = 2\n"
    } else {
        ""
    };
    let s = TestServer::start(interval).await;
    s.sms_login("13812346017").await;
    // Start even: no wait left for either phone.
    let s = if shared_store {
        tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
        s
    } else {
        s.restart().await
    };
    let known = s
        .post(
            "/api/v1/sms/code",
            json!({ "phone": "13812346017", "purpose": "reset_password" }),
        )
        .await;
    let unknown = s
        .post(
            "/api/v1/sms/code",
            json!({ "phone": "13812346018", "purpose": "reset_password" }),
        )
        .await;
    assert_eq!(known, unknown);
    assert_eq!(known.0, 200);
    // Both now wait out the resend interval alike.
    let known_again = s
        .post(
            "/api/v1/sms/code",
            json!({ "phone": "13812346017", "purpose": "reset_password" }),
        )
        .await;
    let unknown_again = s
        .post(
            "/api/v1/sms/code",
            json!({ "phone": "13812346018", "purpose": "reset_password" }),
        )
        .await;
    assert_eq!(known_again.0, 429);
    // Alike but for the clock: the two answers may fall on either side of a second, so
    // their `retry_after` (and the message that says it) may differ by one.
    let wait = |answer: &(u16, serde_json::Value)| answer.1["retry_after"].as_u64().unwrap();
    assert_eq!(
        (known_again.0, &known_again.1["error"]),
        (unknown_again.0, &unknown_again.1["error"])
    );
    assert!(
        wait(&known_again).abs_diff(wait(&unknown_again)) <= 1,
        "{known_again:?} {unknown_again:?}"
    );
    // A code went to the known phone; none to the unknown one.
    s.take_code(&e164("13812346017"));
    let masked = common::mask(&e164("13812346018"));
    assert!(
        !s.log_lines()
            .iter()
            .any(|l| l["message"] == "verification code (log sender)"
                && l["phone"] == masked.as_str())
    );
}

#[tokio::test]
async fn changed_hash_parameters_rehash_at_the_next_login() {
    let cheap = "[password]\nmemory_kib = 1024\niterations = 1\n";
    let s = TestServer::start(cheap).await;
    assert_eq!(register(&s, "13812346019", PW).await.0, 201);
    let dir = s.dir();
    drop(s);
    // The stored password hash (PHC string).
    let phc = |data: &std::path::Path| {
        if common::engine() == "postgres" {
            return stored_phc_in_postgres(data.parent().unwrap());
        }
        let store = smsauth::store::SledStore::open(data, 8).unwrap();
        use futures::executor::block_on;
        use smsauth::store::Users;
        let user = block_on(store.user_by_phone(&store.vault().index("+8613812346019")))
            .unwrap()
            .unwrap();
        let methods = block_on(store.login_methods(&user)).unwrap();
        methods.into_iter().find_map(|m| m.access_code).unwrap()
    };
    let data = dir.path().join("data");
    assert!(phc(&data).contains("m=1024,t=1,p=1"));
    let s = TestServer::start_in(
        dir.clone(),
        "[password]\nmemory_kib = 2048\niterations = 2\n",
    )
    .await;
    assert_eq!(
        login(&s, "13812346019", PW).await.0,
        200,
        "old hashes still verify"
    );
    drop(s);
    assert!(
        phc(&data).contains("m=2048,t=2,p=1"),
        "not rehashed: {}",
        phc(&data)
    );
}

/// The one Argon2 PHC string anywhere in the PostgreSQL database of the harness dir
/// `dir`, found in the tables' text, whatever their columns.
fn stored_phc_in_postgres(dir: &std::path::Path) -> String {
    let mut found = Vec::new();
    for (table, rows) in common::postgres_tables(dir) {
        let mut rest = rows.as_str();
        while let Some(at) = rest.find("$argon2id$") {
            let phc = &rest[at..];
            // A PHC string is base64, `$`, `=` and `,`; the row text quotes and delimits it.
            let end = phc
                .find(|c: char| c == '"' || c == '\'' || c == ')' || c == '}' || c.is_whitespace())
                .unwrap_or(phc.len());
            found.push((table.clone(), phc[..end].to_owned()));
            rest = &phc[end..];
        }
    }
    assert_eq!(
        found.len(),
        1,
        "expected one stored password hash: {found:?}"
    );
    found.pop().unwrap().1
}

#[tokio::test]
async fn a_password_flood_past_the_queue_gets_429_not_a_pile_up() {
    let s =
        TestServer::start("[password]\nmax_concurrent_hashes = 1\nmax_queued_hashes = 1\n").await;
    let attempts = (0..8).map(|_| login(&s, "13812346020", PW));
    let results = futures::future::join_all(attempts).await;
    assert!(
        results
            .iter()
            .all(|(status, _)| *status == 401 || *status == 429),
        "{results:?}"
    );
    let refused: Vec<_> = results
        .iter()
        .filter(|(status, _)| *status == 429)
        .collect();
    assert!(
        !refused.is_empty(),
        "8 concurrent checks fit in 1 slot + 1 queued: {results:?}"
    );
    assert!(
        refused
            .iter()
            .all(|(_, body)| body["error"] == "rate_limited" && body["retry_after"] == 1)
    );
    assert_eq!(s.get("/healthz", None).await.0, 200);
}
