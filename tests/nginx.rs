//! The deployment story end to end: a real nginx running the repo's own example
//! (systemd/nginx-smsauth.conf, ports rewritten) in front of smsauth and of a stand-in
//! for the site's application. A visitor without a session is sent to the login page; after
//! a code login through nginx, the cookie lets them into /members/ and the application
//! learns who they are from X-Smsauth-User-Id.
//!
//! Needs nginx (Debian's nginx-light). Skipped without it unless REQUIRE_NGINX_TESTS=1.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::TestServer;
use common::receiver::Receiver;
use serde_json::json;

const NGINX: &str = "/usr/sbin/nginx";

struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn nginx_auth_request_guards_a_site_with_the_session_cookie() {
    if !std::path::Path::new(NGINX).exists() {
        assert!(
            std::env::var_os("REQUIRE_NGINX_TESTS").is_none(),
            "nginx is required but missing"
        );
        eprintln!("skipped: {NGINX} is not installed");
        return;
    }
    let s = TestServer::start("[server]\ntrust_proxy = true\n[token]\ncookie = true\n").await;
    let app = Receiver::start().await;
    let smsauth_addr = s.base.trim_start_matches("http://").to_owned();
    let port = free_port();

    let dir = tempfile::tempdir().unwrap();
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/nginx-smsauth.conf"
    ))
    .unwrap();
    let site = example
        .replace("server 127.0.0.1:8080;", &format!("server {smsauth_addr};"))
        .replace("http://127.0.0.1:3000", &format!("http://{}", app.addr))
        .replace("listen [::]:80;", "")
        .replace("listen 80;", &format!("listen 127.0.0.1:{port};"));
    assert_ne!(site, example, "the example changed shape: update this test");
    let d = dir.path().display();
    std::fs::write(dir.path().join("site.conf"), site).unwrap();
    std::fs::write(
        dir.path().join("nginx.conf"),
        format!(
            "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{}}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  include {d}/site.conf;\n}}\n"
        ),
    )
    .unwrap();
    let _nginx = Nginx(
        Command::new(NGINX)
            .args(["-c", &format!("{d}/nginx.conf"), "-p", &d.to_string()])
            .stdout(Stdio::null())
            .spawn()
            .expect("start nginx"),
    );
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.get(format!("{base}/healthz")).send().await.is_err() {
        assert!(
            Instant::now() < deadline,
            "nginx did not start: {}",
            std::fs::read_to_string(format!("{d}/error.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

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
    let resp = client
        .post(format!("{base}/api/v1/auth/sms-login"))
        .json(&json!({ "phone": "13812349501", "code": code }))
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
    let user: serde_json::Value = resp.json().await.unwrap();

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
