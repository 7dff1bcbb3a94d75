//! The deployment story end to end: a real nginx running the repo's own example
//! (systemd/nginx-smsauth.conf, ports rewritten) in front of smsauth and of a stand-in
//! for the site's application. A visitor without a session is sent to the login page; after
//! a code login through nginx, the cookie lets them into /members/ and the application
//! learns who they are from X-Smsauth-User-Id.
//!
//! The same example in cluster mode: its commented-out upstream of two instances, made
//! live, in front of two smsauth instances on one PostgreSQL. A login through nginx is
//! spread over both, and when one stops, nginx passes everything to the other.
//!
//! Needs nginx (Debian's nginx-light). Skipped without it unless REQUIRE_NGINX_TESTS=1.
//! The cluster test also needs PostgreSQL's server binaries (see tests/common/postgres.rs):
//! skipped without them unless REQUIRE_POSTGRES_TESTS=1.

mod common;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::receiver::Receiver;
use common::{TestServer, free_port};
use serde_json::{Value, json};

const NGINX: &str = "/usr/sbin/nginx";

struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The repo's example with `upstream` for its `upstream smsauth { ... }` block, the
/// application stand-in at `app`, listening on 127.0.0.1:`port`.
fn site_from_example(upstream: &str, app: &Receiver, port: u16) -> String {
    let example = example();
    let site = example
        .replace(ACTIVE_UPSTREAM, upstream)
        .replace("http://127.0.0.1:3000", &format!("http://{}", app.addr))
        .replace("listen [::]:80;", "")
        .replace("listen 80;", &format!("listen 127.0.0.1:{port};"));
    assert!(
        site.contains(upstream) && site.contains(&format!("listen 127.0.0.1:{port};")),
        "the example changed shape: update this test"
    );
    site
}

/// systemd/nginx-smsauth.conf as it is in the repo.
fn example() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/nginx-smsauth.conf"
    ))
    .unwrap()
}

/// The example's live upstream: the one instance on the default port.
const ACTIVE_UPSTREAM: &str =
    "upstream smsauth {\n    server 127.0.0.1:8080;\n    keepalive 16;\n}\n";

/// Whether nginx is here; if not, says so (or fails under REQUIRE_NGINX_TESTS).
fn have_nginx() -> bool {
    if std::path::Path::new(NGINX).exists() {
        return true;
    }
    assert!(
        std::env::var_os("REQUIRE_NGINX_TESTS").is_none(),
        "nginx is required but missing"
    );
    eprintln!("skipped: {NGINX} is not installed");
    false
}

/// A running nginx with `site` as its only server block, and its base URL.
struct Site {
    _nginx: Nginx,
    base: String,
    dir: tempfile::TempDir,
}

impl Site {
    async fn start(site: String, port: u16, client: &reqwest::Client) -> Site {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        std::fs::write(dir.path().join("site.conf"), site).unwrap();
        std::fs::write(
            dir.path().join("nginx.conf"),
            format!(
                "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{}}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  include {d}/site.conf;\n}}\n"
            ),
        )
        .unwrap();
        let nginx = Nginx(
            Command::new(NGINX)
                .args(["-c", &format!("{d}/nginx.conf"), "-p", &d.to_string()])
                .stdout(Stdio::null())
                .spawn()
                .expect("start nginx"),
        );
        let base = format!("http://127.0.0.1:{port}");
        let site = Site {
            _nginx: nginx,
            base,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while client
            .get(format!("{}/healthz", site.base))
            .send()
            .await
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "nginx did not start: {}",
                site.error_log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        site
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

#[tokio::test]
async fn nginx_auth_request_guards_a_site_with_the_session_cookie() {
    if !have_nginx() {
        return;
    }
    let s = TestServer::start("[server]\ntrust_proxy = true\n[token]\ncookie = true\n").await;
    let app = Receiver::start().await;
    let smsauth_addr = s.base.trim_start_matches("http://").to_owned();
    let port = free_port();
    let upstream = ACTIVE_UPSTREAM.replace("127.0.0.1:8080", &smsauth_addr);
    let client = client();
    let site = Site::start(site_from_example(&upstream, &app, port), port, &client).await;
    let base = &site.base;

    // No session: sent to the login page, and the application never sees the request.
    let resp = client
        .get(format!("{base}/members/report?q=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 302);
    let location = resp.headers()["location"].to_str().unwrap();
    assert!(
        location.ends_with("/?next=/members/report?q=1"),
        "{location}"
    );
    assert!(app.received().is_empty());
    // Metrics stay private; the login page comes through nginx.
    assert_eq!(
        client
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .status(),
        403
    );
    let page = client.get(format!("{base}/")).send().await.unwrap();
    assert_eq!(page.status(), 200);

    // A code login through nginx; smsauth sees the visitor's address, not nginx's.
    let (status, _) = send(
        &client,
        &format!("{base}/api/v1/sms/code"),
        json!({ "phone": "13812349501" }),
    )
    .await;
    assert_eq!(status, 200);
    let code = s.take_code("+8613812349501");
    let (user, cookie) = sms_login(
        &client,
        &format!("{base}/api/v1/auth/sms-login"),
        "13812349501",
        &code,
    )
    .await;

    // With the cookie: through to the application, which is told who it is.
    let resp = client
        .get(format!("{base}/members/report?q=1"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = app.wait_for(1).await;
    assert_eq!(seen[0].path_and_query, "/members/report?q=1");
    assert_eq!(
        seen[0].headers["x-smsauth-user-id"],
        user["user"]["id"].to_string().as_str()
    );
    assert_eq!(seen[0].headers["x-smsauth-phone"], "+8613812349501");

    // A forged user id from the visitor is overwritten, not passed on.
    let resp = client
        .get(format!("{base}/members/x"))
        .header("cookie", &cookie)
        .header("x-smsauth-user-id", "999")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        app.wait_for(2).await[1].headers["x-smsauth-user-id"],
        user["user"]["id"].to_string().as_str()
    );

    // After logout (from the site's own page) the cookie opens nothing.
    let resp = client
        .post(format!("{base}/api/v1/auth/logout"))
        .header("cookie", &cookie)
        .header("sec-fetch-site", "same-origin")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let resp = client
        .get(format!("{base}/members/report"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 302);
    assert_eq!(app.received().len(), 2);
}

/// The example's commented-out cluster upstream (`#upstream smsauth {` to `#}`), made
/// live: comment marks off, its two instances (127.0.0.1:8080 and :8081) replaced by `a`
/// and `b`.
fn cluster_upstream(a: &TestServer, b: &TestServer) -> String {
    let example = example();
    let start = example
        .find("#upstream smsauth {\n")
        .expect("the example shows no cluster upstream: update this test");
    let len = example[start..]
        .find("#}\n")
        .expect("end of the cluster upstream")
        + 3;
    let mut upstream = String::new();
    for line in example[start..start + len].lines() {
        upstream.push_str(line.strip_prefix('#').expect("a commented-out line"));
        upstream.push('\n');
    }
    let addr = |s: &TestServer| s.base.trim_start_matches("http://").to_owned();
    let live = upstream
        .replace("127.0.0.1:8080", &addr(a))
        .replace("127.0.0.1:8081", &addr(b));
    assert!(
        live.contains(&addr(a)) && live.contains(&addr(b)) && live != upstream,
        "the cluster upstream changed shape: update this test\n{upstream}"
    );
    live
}

/// One instance's `smsauth_http_requests_total`, read from it directly (not through
/// nginx), by its labels (`route="...",method="...",status="..."`); its own /metrics
/// requests left out.
async fn requests(s: &TestServer) -> BTreeMap<String, u64> {
    let (status, text) = s.get_text("/metrics").await;
    assert_eq!(status, 200);
    text.lines()
        .filter_map(|l| l.strip_prefix("smsauth_http_requests_total{"))
        .filter_map(|l| l.split_once("} "))
        .filter(|(labels, _)| !labels.starts_with("route=\"/metrics\""))
        .map(|(labels, n)| (labels.to_owned(), n.parse().expect("a count")))
        .collect()
}

/// What `after` counts beyond `before`, zeros left out.
fn delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, n)| (k.clone(), n - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect()
}

fn labels(route: &str, method: &str, status: u16) -> String {
    format!("route=\"{route}\",method=\"{method}\",status=\"{status}\"")
}

/// Adds `b`'s counts to `a`'s.
fn sum(a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    let mut total = a.clone();
    for (k, n) in b {
        *total.entry(k.clone()).or_default() += n;
    }
    total
}

/// The code sent to `phone` (E.164) just now, from the log of whichever instance sent it,
/// and which one that was (0 or 1). Fails if both logged one.
async fn code_from_either(servers: [&TestServer; 2], phone: &str) -> (usize, String) {
    let masked = common::mask(phone);
    let logged = |s: &TestServer| {
        s.log_lines().iter().any(|l| {
            l["message"] == "verification code (log sender)" && l["phone"] == masked.as_str()
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match (logged(servers[0]), logged(servers[1])) {
            (true, true) => panic!("both instances sent a code to {masked}"),
            (true, false) => return (0, servers[0].take_code(phone)),
            (false, true) => return (1, servers[1].take_code(phone)),
            (false, false) => {
                assert!(Instant::now() < deadline, "neither instance logged a code");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A code login through nginx: send-code, the code from whichever instance sent it,
/// sms-login. Returns the sender (0 or 1), the token response and the session cookie.
async fn login_through(
    client: &reqwest::Client,
    site: &Site,
    servers: [&TestServer; 2],
    phone: &str,
) -> (usize, Value, String) {
    let (status, body) = send(
        client,
        &site.url("/api/v1/sms/code"),
        json!({ "phone": phone }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (sender, code) = code_from_either(servers, &common::e164(phone)).await;
    let (user, cookie) = sms_login(client, &site.url("/api/v1/auth/sms-login"), phone, &code).await;
    (sender, user, cookie)
}

/// A code login at `url`: the answer's body and its session cookie (`name=value`).
async fn sms_login(
    client: &reqwest::Client,
    url: &str,
    phone: &str,
    code: &str,
) -> (serde_json::Value, String) {
    let resp = client
        .post(url)
        .json(&json!({ "phone": phone, "code": code }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let cookie = resp.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    (resp.json().await.unwrap(), cookie)
}

/// One visit of a logged-in user through nginx: GET /api/v1/me with the bearer token,
/// GET /api/v1/auth/check with the cookie, and a page under /members/ (its auth_request
/// subrequest to /api/v1/auth/check, then the application). Three requests to smsauth;
/// every answer must be the right one for `login`.
async fn visit(client: &reqwest::Client, site: &Site, app: &Receiver, login: &Value, cookie: &str) {
    let user = &login["user"];
    let token = login["access_token"].as_str().expect("access_token");
    let resp = client
        .get(site.url("/api/v1/me"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(&resp.json::<Value>().await.unwrap(), user);

    let resp = client
        .get(site.url("/api/v1/auth/check"))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(
        resp.headers()["x-smsauth-user-id"],
        user["id"].to_string().as_str()
    );

    let seen = app.received().len();
    let resp = client
        .get(site.url("/members/page"))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let got = app.wait_for(seen + 1).await;
    assert_eq!(got[seen].path_and_query, "/members/page");
    assert_eq!(
        got[seen].headers["x-smsauth-user-id"],
        user["id"].to_string().as_str()
    );
    assert_eq!(
        got[seen].headers["x-smsauth-phone"],
        user["phone"].as_str().expect("phone")
    );
}

#[tokio::test]
async fn nginx_spreads_a_cluster_login_over_two_instances_and_fails_over() {
    if !have_nginx() {
        return;
    }
    // None only where PostgreSQL is missing and REQUIRE_POSTGRES_TESTS is unset.
    let Some(c) = Cluster::new("[server]\ntrust_proxy = true\n[token]\ncookie = true\n") else {
        eprintln!("skipped: no PostgreSQL to run a cluster on");
        return;
    };
    let (mut a, b) = c.pair().await;
    let app = Receiver::start().await;
    let port = free_port();
    let client = client();
    let upstream = cluster_upstream(&a, &b);
    let site = Site::start(site_from_example(&upstream, &app, port), port, &client).await;

    // Counted from here: nginx's start-up probes are behind us.
    let (a0, b0) = (requests(&a).await, requests(&b).await);
    let page = client.get(site.url("/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    // The code comes from one instance, the login may be done by the other; either way
    // the session works on both.
    let (_, login, cookie) = login_through(&client, &site, [&a, &b], "13812349601").await;
    assert_eq!(login["user"]["phone"], "+8613812349601");
    // Round-robin: each visit is three requests, so /me and /auth/check go to one
    // instance in a visit and to the other in the next. Visits until each instance has
    // answered both (two, with nginx's strict alternation).
    let (me, check) = (
        labels("/api/v1/me", "GET", 200),
        labels("/api/v1/auth/check", "GET", 204),
    );
    let mut visits = 0;
    let (da, db) = loop {
        visit(&client, &site, &app, &login, &cookie).await;
        visits += 1;
        let (da, db) = (
            delta(&a0, &requests(&a).await),
            delta(&b0, &requests(&b).await),
        );
        if [&da, &db]
            .iter()
            .all(|d| d.contains_key(&me) && d.contains_key(&check))
        {
            break (da, db);
        }
        assert!(
            visits < 10,
            "after {visits} visits, some route was never answered by one instance:\nA {da:?}\nB {db:?}"
        );
    };
    // Every request nginx was given reached exactly one instance, once, and was answered
    // as it should be: no errors, no retries.
    let expected: BTreeMap<String, u64> = [
        (labels("/", "GET", 200), 1),
        (labels("/api/v1/sms/code", "POST", 200), 1),
        (labels("/api/v1/auth/sms-login", "POST", 200), 1),
        (me.clone(), visits),
        (check.clone(), 2 * visits),
    ]
    .into_iter()
    .collect();
    assert_eq!(sum(&da, &db), expected, "A {da:?}\nB {db:?}");
    let routes = |d: &BTreeMap<String, u64>| d.values().sum::<u64>();
    eprintln!(
        "{} requests through nginx: {} on A, {} on B",
        routes(&expected),
        routes(&da),
        routes(&db)
    );

    // A stops (a rolling restart's first step). nginx's connections to it are refused, and
    // it passes those requests, POSTs included, to B: nothing fails.
    let status = a.terminate();
    assert!(status.success(), "smsauth exited with {status}");
    // Let nginx see A's idle keep-alive connections close before it would reuse one.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let b1 = requests(&b).await;
    let (sender, login2, cookie2) = login_through(&client, &site, [&a, &b], "13812349602").await;
    assert_eq!(sender, 1, "the code came from the stopped instance");
    for _ in 0..2 {
        visit(&client, &site, &app, &login2, &cookie2).await;
        // The first session too, made while both served.
        visit(&client, &site, &app, &login, &cookie).await;
    }
    let expected: BTreeMap<String, u64> = [
        (labels("/api/v1/sms/code", "POST", 200), 1),
        (labels("/api/v1/auth/sms-login", "POST", 200), 1),
        (me, 4),
        (check, 8),
    ]
    .into_iter()
    .collect();
    assert_eq!(delta(&b1, &requests(&b).await), expected);
    assert!(
        site.error_log().contains("Connection refused"),
        "nginx never tried the stopped instance: {}",
        site.error_log()
    );
}

async fn send(
    client: &reqwest::Client,
    url: &str,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    let resp = client.post(url).json(&body).send().await.unwrap();
    (
        resp.status().as_u16(),
        resp.json().await.unwrap_or_default(),
    )
}
