//! The shell commands of docs/getting-started.md and of the README's walk-through, run as
//! they are written there, one after another in one bash, against a live smsauth on its
//! default configuration, so the documents cannot drift from the server.
//!
//! What the test changes, and only this: `127.0.0.1:8080` becomes the test server's
//! address (a loopback port of its own), and a line `CODE=...` gets the code the server's
//! `log` sender wrote for the last code request, as a reader copies it from the log.
//!
//! The conventions the documents follow:
//! - every ```` ```sh ```` block is run; ```` ```sh setup ```` blocks (installing, building,
//!   starting the server) are not;
//! - a comment right after a command that shows an answer, `# {...}` or `# [...]`
//!   (continued on `#  ` lines), `# HTTP/1.1 204 No Content`, or a status and a body
//!   (`# 401 {...}`), is checked: the status, every key shown, and every value shown
//!   except strings with digits or `...` in them (tokens, ids, times);
//! - every other command must exit 0, and every `curl` in it must get a 2xx answer.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use common::TestServer;
use serde_json::Value;

const DOC_ADDRESS: &str = "127.0.0.1:8080";

/// The ```` ```sh ```` blocks of `text` (not the `sh setup` ones), in order.
fn sh_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        match &mut current {
            None if line.trim_end() == "```sh" => current = Some(String::new()),
            None => {}
            Some(_) if line.starts_with("```") => blocks.push(current.take().unwrap()),
            Some(block) => {
                block.push_str(line);
                block.push('\n');
            }
        }
    }
    assert!(current.is_none(), "a ```sh block is not closed");
    blocks
}

/// The part of `text` from the heading `heading` to the next heading of its level.
fn section<'a>(text: &'a str, heading: &str) -> &'a str {
    let start = text
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("no heading {heading:?}"));
    let level = heading.split(' ').next().unwrap();
    let rest = &text[start + heading.len() + 2..];
    let end = rest.find(&format!("\n{level} ")).unwrap_or(rest.len());
    &rest[..end]
}

/// What the document shows a command answers.
#[derive(Debug)]
struct Shown {
    status: Option<u16>,
    body: Option<Value>,
}

/// One command of a block: its lines (continuations included) and the answer shown.
#[derive(Debug)]
struct Step {
    command: String,
    shown: Option<Shown>,
}

fn parse_shown(text: &str) -> Option<Shown> {
    if let Some(rest) = text.strip_prefix("HTTP/1.1 ") {
        let status = rest.get(..3)?.parse().ok()?;
        return Some(Shown {
            status: Some(status),
            body: None,
        });
    }
    let (status, json) = match text.split_once(' ') {
        Some((s, json)) if s.len() == 3 && s.bytes().all(|b| b.is_ascii_digit()) => {
            (Some(s.parse().unwrap()), json)
        }
        _ => (None, text),
    };
    if !json.starts_with('{') && !json.starts_with('[') {
        return None;
    }
    let body = serde_json::from_str(json)
        .unwrap_or_else(|e| panic!("the answer shown is not JSON ({e}): {json}"));
    Some(Shown {
        status,
        body: Some(body),
    })
}

fn steps(block: &str) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    let mut lines = block.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim();
        if trimmed.is_empty() {
            continue;
        }
        if let Some(comment) = trimmed.strip_prefix('#') {
            let comment = comment.trim();
            // An answer shown belongs to the command right above it.
            if let Some(shown) = parse_shown_with_continuation(comment, &mut lines) {
                let step = steps
                    .last_mut()
                    .unwrap_or_else(|| panic!("an answer shown before any command: {line}"));
                assert!(
                    step.shown.is_none(),
                    "two answers shown for {}",
                    step.command
                );
                step.shown = Some(shown);
            }
            continue;
        }
        let mut command = line.to_owned();
        while command.ends_with('\\') {
            command.push('\n');
            command.push_str(lines.next().expect("a continued line"));
        }
        steps.push(Step {
            command,
            shown: None,
        });
    }
    steps
}

/// `comment` and the `#  ` lines after it, as an answer shown, if it is one.
fn parse_shown_with_continuation<'a>(
    comment: &str,
    lines: &mut std::iter::Peekable<impl Iterator<Item = &'a str>>,
) -> Option<Shown> {
    let starts_answer = comment.starts_with('{')
        || comment.starts_with('[')
        || comment.starts_with("HTTP/1.1 ")
        || comment.split_once(' ').is_some_and(|(s, rest)| {
            s.len() == 3 && s.parse::<u16>().is_ok() && rest.starts_with('{')
        });
    if !starts_answer {
        return None;
    }
    let mut text = comment.to_owned();
    while let Some(next) = lines.peek() {
        match next.trim_start().strip_prefix("#  ") {
            Some(more) => {
                text.push_str(more.trim());
                lines.next();
            }
            None => break,
        }
    }
    parse_shown(&text)
}

/// Whether `actual` has what `shown` shows (see the module comment).
fn check_value(shown: &Value, actual: &Value, at: &str) -> Result<(), String> {
    match (shown, actual) {
        (Value::Object(s), Value::Object(a)) => {
            for (k, v) in s {
                let got = a.get(k).ok_or(format!("{at}.{k} missing"))?;
                check_value(v, got, &format!("{at}.{k}"))?;
            }
            Ok(())
        }
        (Value::Array(s), Value::Array(a)) => match (s.first(), a.first()) {
            (None, _) => Ok(()),
            (Some(_), None) => Err(format!("{at} is empty")),
            (Some(s), Some(a)) => check_value(s, a, &format!("{at}[0]")),
        },
        (Value::String(s), Value::String(a)) => {
            if s.contains("...") || s.bytes().any(|b| b.is_ascii_digit()) || s == a {
                Ok(())
            } else {
                Err(format!("{at}: {a:?}, the doc shows {s:?}"))
            }
        }
        (s, a) if s == a => Ok(()),
        (s, a) => Err(format!("{at}: {a}, the doc shows {s}")),
    }
}

/// One bash for a whole document: variables set by one command are there for the next.
struct Shell {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    dir: tempfile::TempDir,
}

impl Shell {
    fn start() -> Shell {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new("bash")
            .arg("--noprofile")
            .arg("--norc")
            .current_dir(dir.path())
            .env_remove("CODE")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("bash");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut shell = Shell {
            child,
            stdin,
            stdout,
            dir,
        };
        // Each curl also writes its answer's status to stderr, for the test to read.
        shell.send(
            "set -o pipefail\n\
             curl() { command curl --max-time 10 -w '%{stderr}HTTP_STATUS %{http_code}\\n' \"$@\"; }\n\
             echo __done__ 0\n",
        );
        shell
    }

    fn send(&mut self, script: &str) -> i32 {
        self.stdin.write_all(script.as_bytes()).unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.stdout.read_line(&mut line).unwrap();
            assert!(n > 0, "bash exited");
            if let Some(rc) = line.trim().strip_prefix("__done__ ") {
                return rc.parse().unwrap();
            }
        }
    }

    /// Runs one command; its exit status, stdout, and the statuses its curls got.
    fn run(&mut self, command: &str) -> (i32, String, String, Vec<u16>) {
        let out = self.dir.path().join("out");
        let err = self.dir.path().join("err");
        let rc = self.send(&format!(
            "{{ {command}\n}} >{} 2>{}; echo __done__ $?\n",
            out.display(),
            err.display()
        ));
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        let (stdout, stderr) = (read(&out), read(&err));
        let statuses = stderr
            .lines()
            .filter_map(|l| l.strip_prefix("HTTP_STATUS "))
            .map(|s| s.trim().parse().unwrap())
            .collect();
        (rc, stdout, stderr, statuses)
    }
}

impl Drop for Shell {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is_code_line(l: &Value) -> bool {
    l["message"] == "verification code (log sender)"
}

/// Runs the blocks of `doc` (named `name` in messages) against a new server; returns
/// how many commands ran.
async fn run_document(name: &str, blocks: &[String]) -> usize {
    let server = TestServer::start("").await;
    let address = server.base.trim_start_matches("http://").to_owned();
    let mut shell = Shell::start();
    let mut codes_used = 0;
    let mut ran = 0;
    for block in blocks {
        for step in steps(block) {
            let mut command = step.command.replace(DOC_ADDRESS, &address);
            if command.starts_with("CODE=") {
                let line = server.nth_line(codes_used, is_code_line);
                codes_used += 1;
                command = format!("CODE={}", line["code"].as_str().expect("code"));
            }
            let (rc, stdout, stderr, statuses) = shell.run(&command);
            let what = format!("{name}: `{}`", step.command);
            assert_eq!(
                rc, 0,
                "{what} exited {rc}; stdout: {stdout}; stderr: {stderr}"
            );
            ran += 1;
            let shown_status = step.shown.as_ref().and_then(|s| s.status);
            for status in &statuses {
                match shown_status {
                    Some(want) => assert_eq!(*status, want, "{what}: {stdout}"),
                    None => assert!(
                        (200..300).contains(status),
                        "{what} answered {status}: {stdout}"
                    ),
                }
            }
            let Some(shown) = step.shown else { continue };
            assert!(
                !statuses.is_empty(),
                "{what}: an answer is shown, but no curl ran"
            );
            if let Some(body) = &shown.body {
                let actual: Value = serde_json::from_str(stdout.trim())
                    .unwrap_or_else(|e| panic!("{what} answered no JSON ({e}): {stdout}"));
                if let Err(e) = check_value(body, &actual, "answer") {
                    panic!("{what}: {e}\nanswer: {actual}");
                }
            }
        }
    }
    ran
}

#[tokio::test]
async fn the_getting_started_commands_work_as_shown() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/getting-started.md"),
    )
    .unwrap();
    let blocks = sh_blocks(&text);
    assert!(blocks.len() >= 5, "{} sh blocks", blocks.len());
    assert!(text.contains(DOC_ADDRESS));
    let ran = run_document("docs/getting-started.md", &blocks).await;
    assert!(ran >= 20, "only {ran} commands ran");
}

#[tokio::test]
async fn the_readme_walk_through_works_as_shown() {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let blocks = sh_blocks(section(&text, "## A five-minute walk-through"));
    assert!(!blocks.is_empty(), "no sh block in the walk-through");
    let ran = run_document("README.md", &blocks).await;
    assert!(ran >= 8, "only {ran} commands ran");
}

#[test]
fn answers_shown_are_read_and_checked() {
    let block = "curl -s -X POST x \\\n  -d '{}'\n# {\"a\":1,\"t\":\"eyJ...\",\n#  \"b\":[\"sms\"]}\n\
                 TOKEN=$(field a < x)\ncurl -s -i y\n# HTTP/1.1 204 No Content\n\
                 curl -s z\n# 401 {\"error\":\"unauthorized\"}\n# an ordinary comment\n";
    let s = steps(block);
    assert_eq!(s.len(), 4, "{s:?}");
    assert_eq!(s[0].command, "curl -s -X POST x \\\n  -d '{}'");
    let body = s[0].shown.as_ref().unwrap().body.clone().unwrap();
    assert!(s[1].shown.is_none());
    assert_eq!(s[2].shown.as_ref().unwrap().status, Some(204));
    assert_eq!(s[3].shown.as_ref().unwrap().status, Some(401));
    let actual = serde_json::json!({"a": 1, "t": "eyJhbGc", "b": ["sms", "password"], "c": 0});
    check_value(&body, &actual, "answer").unwrap();
    let wrong = serde_json::json!({"a": 2, "t": "x", "b": ["sms"]});
    assert!(check_value(&body, &wrong, "answer").is_err());
    let missing = serde_json::json!({"a": 1, "t": "x"});
    assert!(check_value(&body, &missing, "answer").is_err());
}
