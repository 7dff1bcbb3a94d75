//! GET /metrics: Prometheus text with the series an operator watches.

mod common;

use common::TestServer;
use serde_json::json;

fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|v| v.strip_prefix(' '))
                .map(|v| v.parse().unwrap())
        })
        .unwrap_or_else(|| panic!("{series} not in\n{text}"))
}

#[tokio::test]
async fn metrics_count_what_happened() {
    let s = TestServer::start("").await;
    s.sms_login("13812349001").await;
    let (status, _) = s
        .post("/api/v1/sms/code", json!({ "phone": "13812349001" }))
        .await;
    assert_eq!(status, 429);
    let (status, _) = s
        .post(
            "/api/v1/auth/sms-login",
            json!({ "phone": "13812349002", "code": "123456" }),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(s.get("/no/such/path", None).await.0, 404);

    let resp = s.client.get(s.url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = resp.text().await.unwrap();
    let v = |series: &str| value(&text, series);
    assert_eq!(
        v(r#"smsauth_http_requests_total{route="/api/v1/sms/code",method="POST",status="200"}"#),
        1.0
    );
    assert_eq!(
        v(r#"smsauth_http_requests_total{route="/api/v1/sms/code",method="POST",status="429"}"#),
        1.0
    );
    assert_eq!(
        v(
            r#"smsauth_http_requests_total{route="/api/v1/auth/sms-login",method="POST",status="200"}"#
        ),
        1.0
    );
    assert_eq!(
        v(r#"smsauth_http_requests_total{route="unmatched",method="GET",status="404"}"#),
        1.0
    );
    assert_eq!(
        v(r#"smsauth_http_request_duration_seconds_count{route="/api/v1/auth/sms-login"}"#),
        2.0
    );
    let inf_bucket = text
        .lines()
        .find(|l| {
            l.starts_with("smsauth_http_request_duration_seconds_bucket{")
                && l.contains(r#"route="/api/v1/auth/sms-login""#)
                && l.contains(r#"le="+Inf""#)
        })
        .expect("a +Inf bucket for sms-login");
    assert!(inf_bucket.ends_with(" 2"), "{inf_bucket}");
    assert_eq!(
        v(r#"smsauth_sms_sends_total{provider="log",result="ok"}"#),
        1.0
    );
    assert_eq!(v(r#"smsauth_code_verifications_total{result="ok"}"#), 1.0);
    assert_eq!(
        v(r#"smsauth_code_verifications_total{result="invalid"}"#),
        1.0
    );
    assert_eq!(v(r#"smsauth_logins_total{method="sms"}"#), 1.0);
    assert_eq!(v(r#"smsauth_registrations_total{method="sms"}"#), 1.0);
    assert_eq!(
        v(r#"smsauth_rate_limited_total{limit="resend_interval"}"#),
        1.0
    );
    assert_eq!(v("smsauth_users"), 1.0);
    assert!(v("smsauth_store_size_bytes") > 0.0);
    assert_eq!(
        v(r#"smsauth_limiter_tracked_addresses{limiter="send"}"#),
        1.0
    );
    // The process's own memory, read as the scrape is answered: at least the binary.
    let rss = v("smsauth_process_resident_memory_bytes");
    assert!(rss > 4e6 && rss < 4e9, "RSS {rss}");
    // The sled engine times each group commit; the login above waited for one at least.
    // (PostgreSQL commits each statement and has statement timings instead.)
    if common::engine() == "sled" {
        assert!(v("smsauth_store_flush_duration_seconds_count") >= 1.0);
        assert!(v("smsauth_store_flush_duration_seconds_sum") > 0.0);
    }
    // Nothing personal in the metrics.
    assert!(!text.contains("13812349001"));
}

/// Every API request gets its log line; a probe or scrape that went well does not (at
/// the default info level), so the lines that matter are not buried under them.
#[tokio::test]
async fn requests_are_logged_but_healthy_probes_are_not() {
    let s = TestServer::start("").await;
    assert_eq!(s.get_text("/healthz").await.0, 200);
    assert_eq!(s.get_text("/metrics").await.0, 200);
    assert_eq!(s.get("/api/v1/me", None).await.0, 401);
    let is_request =
        |l: &serde_json::Value, path: &str| l["message"] == "request" && l["path"] == path;
    let me = s.wait_for_log(|l| is_request(l, "/api/v1/me"));
    assert_eq!(
        (me["status"].as_u64(), me["method"].as_str()),
        (Some(401), Some("GET"))
    );
    // The probes were answered before /me was asked, so their lines would be out by now.
    let lines = s.log_lines();
    for probe in ["/healthz", "/metrics"] {
        assert!(
            !lines.iter().any(|l| is_request(l, probe)),
            "{probe} was logged"
        );
    }
}

async fn pending(s: &TestServer) -> f64 {
    value(&s.get_text("/metrics").await.1, "smsauth_pending_codes")
}

/// The pending-code gauge follows the store: a send adds one, a login uses it up, and a
/// restart (the codes are not reloaded into memory) still counts the one left.
#[tokio::test]
async fn pending_codes_are_counted_across_a_restart() {
    let s = TestServer::start("").await;
    let code = s.send_code("13812349101", "login").await;
    s.send_code("13812349102", "login").await;
    assert_eq!(pending(&s).await, 2.0);
    let login = json!({ "phone": "13812349101", "code": code });
    assert_eq!(s.post("/api/v1/auth/sms-login", login).await.0, 200);
    assert_eq!(pending(&s).await, 1.0);
    let s = s.restart().await;
    assert_eq!(pending(&s).await, 1.0);
}

/// docs/grafana/smsauth.json queries only series that /metrics serves, with the labels it
/// groups them by: a renamed metric or label breaks this test, not an operator's panels.
#[tokio::test]
async fn every_series_the_dashboard_queries_is_served() {
    let s = TestServer::start("").await;
    // Enough traffic that every family has a series: a send, a login, a refused resend.
    s.sms_login("13812349101").await;
    let (status, _) = s
        .post("/api/v1/sms/code", json!({ "phone": "13812349101" }))
        .await;
    assert_eq!(status, 429);
    let text = s.get_text("/metrics").await.1;

    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../docs/grafana/smsauth.json")).unwrap();
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["targets"].as_array())
        .flatten()
        .map(|t| t["expr"].as_str().unwrap().to_owned())
        .collect();
    assert!(exprs.len() >= 15, "the dashboard has its panels");
    let metric = regex::Regex::new(r"smsauth_[a-z_]+").unwrap();
    let grouped = regex::Regex::new(r"by \(([a-z_, ]+)\) \((?:rate\()?(smsauth_[a-z_]+)").unwrap();
    // Series of the other engine are not served here.
    let other_engine = if common::engine() == "sled" {
        "smsauth_postgres_"
    } else {
        "smsauth_store_flush_"
    };
    let mut checked = 0;
    for expr in &exprs {
        for name in metric.find_iter(expr).map(|m| m.as_str()) {
            if name.starts_with(other_engine) {
                continue;
            }
            assert!(
                text.lines().any(|l| l.starts_with(name)
                    && matches!(l.as_bytes().get(name.len()), Some(b' ' | b'{'))),
                "{name} (in {expr}) is not on /metrics:\n{text}"
            );
            checked += 1;
        }
        for group in grouped.captures_iter(expr) {
            let name = &group[2];
            if name.starts_with(other_engine) {
                continue;
            }
            for label in group[1].split(',').map(str::trim) {
                if label == "le" || label == "instance" {
                    continue; // the histogram's own, and Prometheus's
                }
                assert!(
                    text.lines()
                        .any(|l| l.starts_with(name) && l.contains(&format!("{label}=\""))),
                    "{name} has no label {label} (in {expr})"
                );
            }
        }
    }
    assert!(checked >= 15, "{checked} series checked");
}
