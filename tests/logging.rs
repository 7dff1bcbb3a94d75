//! The log as an operator receives it: written by a thread of its own in batches, every
//! line out on a clean stop, lines dropped (and counted, and reported) rather than waited
//! for when the reader stalls, and the request line off with `log.requests = false`.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{BIN, TestServer, free_port, storage_env};
use futures::future::join_all;
use serde_json::Value;

fn request_lines(s: &TestServer) -> usize {
    s.log_lines()
        .iter()
        .filter(|l| l["message"] == "request")
        .count()
}

#[tokio::test]
async fn a_clean_stop_writes_every_line() {
    let mut s = TestServer::start("").await;
    let n = 400;
    for chunk in 0..(n / 40) {
        let paths: Vec<String> = (0..40)
            .map(|i| format!("/api/v1/nothing/{chunk}/{i}"))
            .collect();
        for (status, _) in join_all(paths.iter().map(|p| s.get(p, None))).await {
            assert_eq!(status, 404);
        }
    }
    assert!(s.terminate().success());
    // The last line a clean stop logs comes after every request line.
    s.wait_for_log(|l| l["message"] == "stopped");
    assert_eq!(request_lines(&s), n);
}

#[tokio::test]
async fn the_request_line_can_be_turned_off() {
    let s = TestServer::start("[log]\nrequests = false\n").await;
    s.sms_login("13800139001").await;
    let (status, _) = s.get("/api/v1/me", None).await;
    assert_eq!(status, 401);
    // Lines of what happened still come: the code the log sender wrote, the login.
    s.wait_for_log(|l| l["message"] == "sms login");
    assert_eq!(request_lines(&s), 0);
}

#[tokio::test]
async fn a_stalled_log_reader_costs_counted_lines_never_a_request() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("smsauth.toml");
    std::fs::write(&config, "").unwrap();
    // stdout is a pipe nobody reads yet: once the pipe (64 KiB) and the server's own
    // buffer (1 MiB) are full, the log cannot take another line.
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .env("SMSAUTH_SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .envs(storage_env(dir.path()))
        .env("SMSAUTH_LOG__FORMAT", "json")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.get(format!("{base}/healthz")).send().await.is_err() {
        assert!(Instant::now() < deadline, "the server did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // About 12,000 request lines of ~170 bytes: twice what the pipe and the buffer hold.
    let sent = 12_000;
    let per_connection = sent / 16;
    let connections = (0..16).map(|_| {
        let (client, url) = (client.clone(), format!("{base}/api/v1/me"));
        async move {
            for _ in 0..per_connection {
                let status = client.get(&url).send().await.unwrap().status();
                assert_eq!(status, 401);
            }
        }
    });
    join_all(connections).await;
    let metrics = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let dropped: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("smsauth_log_lines_dropped_total "))
        .expect("the metric is served")
        .parse()
        .unwrap();
    assert!(dropped > 0, "a stalled reader dropped nothing?");

    // The reader catches up: the lines that fitted, then one line that says how many
    // did not.
    let stdout = child.stdout.take().unwrap();
    let notice = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stdout).lines();
        let mut requests = 0u64;
        loop {
            let line = lines.next().expect("the notice comes").unwrap();
            let value: Value = serde_json::from_str(&line).unwrap();
            if value["message"] == "request" {
                requests += 1;
            }
            if value["dropped"].is_u64() {
                return (value, requests);
            }
        }
    });
    let (notice, written) = notice.await.unwrap();
    assert_eq!(notice["level"], "WARN");
    assert_eq!(notice["dropped"].as_u64(), Some(dropped), "{notice}");
    assert_eq!(
        written + dropped,
        sent as u64,
        "every request line written or counted"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}
