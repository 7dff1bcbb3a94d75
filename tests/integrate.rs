//! The examples of docs/integrate.md, run as they are written there against a live
//! smsauth, so the document cannot drift from the server.

mod common;

use std::process::Command;

use common::TestServer;

const DOC: &str = include_str!("../docs/integrate.md");
const REQUIRE: &str = "REQUIRE_INTEGRATION_EXAMPLES";

/// The first ```python block after `heading` in docs/integrate.md.
fn python_block(heading: &str) -> String {
    let from = DOC
        .find(heading)
        .unwrap_or_else(|| panic!("no {heading:?} in the doc"));
    let rest = &DOC[from..];
    let start = rest.find("```python\n").expect("a python block") + "```python\n".len();
    let len = rest[start..].find("```").expect("the block's end");
    rest[start..start + len].to_owned()
}

/// Whether python3 with PyJWT and its crypto extra is here; without them the test is
/// skipped with a message, unless REQUIRE_INTEGRATION_EXAMPLES is set (CI).
fn python_with_pyjwt() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import jwt, cryptography"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os(REQUIRE).is_none(),
            "{REQUIRE} is set, but python3 with PyJWT is missing: pip install \"PyJWT[crypto]\""
        );
        eprintln!(
            "skipped: python3 with PyJWT[crypto] is not installed (pip install \"PyJWT[crypto]\")"
        );
    }
    ok
}

#[tokio::test]
async fn the_pyjwt_example_checks_tokens_of_every_asymmetric_algorithm() {
    if !python_with_pyjwt() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("check_token.py");
    std::fs::write(
        &script,
        python_block("## Checking tokens in your own services"),
    )
    .unwrap();
    for alg in ["ES256", "EdDSA"] {
        let s = TestServer::start(&format!("[token]\nalgorithm = \"{alg}\"\n")).await;
        let login = s.sms_login("13812347001").await;
        let token = login["access_token"].as_str().unwrap().to_owned();
        let id = login["user"]["id"].to_string();
        let run = |token: String| {
            let script = script.clone();
            let base = s.url("");
            // Blocking: the server answers on its own process meanwhile.
            std::thread::spawn(move || {
                Command::new("python3")
                    .arg(&script)
                    .arg(token)
                    .env("AUTH_BASE_URL", base)
                    .output()
                    .unwrap()
            })
            .join()
            .unwrap()
        };
        let out = run(token.clone());
        assert!(
            out.status.success(),
            "{alg}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), id, "{alg}");
        // A flipped signature character is refused, with the reason.
        let mut forged = token.into_bytes();
        let last = forged.len() - 2;
        forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
        let out = run(String::from_utf8(forged).unwrap());
        assert_eq!(out.status.code(), Some(1), "{alg}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("refused"),
            "{alg}"
        );
    }
}
