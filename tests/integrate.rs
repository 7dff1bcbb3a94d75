//! The examples of docs/integrate.md, run as they are written there against a live
//! smsauth, so the document cannot drift from the server.

mod common;

use std::process::Command;

use common::TestServer;

const DOC: &str = include_str!("../docs/integrate.md");
const REQUIRE: &str = "REQUIRE_INTEGRATION_EXAMPLES";

/// The first ```python block after `heading` in docs/integrate.md.
fn python_block(heading: &str) -> String {
    block(heading, "python")
}

/// The first ```LANG block after `heading` in docs/integrate.md.
fn block(heading: &str, lang: &str) -> String {
    let from = DOC
        .find(heading)
        .unwrap_or_else(|| panic!("no {heading:?} in the doc"));
    let rest = &DOC[from..];
    let fence = format!("```{lang}\n");
    let start = rest
        .find(&fence)
        .unwrap_or_else(|| panic!("a {lang} block"))
        + fence.len();
    let len = rest[start..].find("```").expect("the block's end");
    rest[start..start + len].to_owned()
}

/// A directory with `jose` installed from the npm registry (kept between runs under the
/// temp dir), or None, with a message, where node or npm is missing and
/// REQUIRE_INTEGRATION_EXAMPLES is unset.
fn node_with_jose() -> Option<std::path::PathBuf> {
    let have = |cmd: &str| {
        Command::new(cmd)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !have("node") || !have("npm") {
        assert!(
            std::env::var_os(REQUIRE).is_none(),
            "{REQUIRE} is set, but node or npm is missing (apt-get install nodejs npm)"
        );
        eprintln!("skipped: node and npm are not installed (apt-get install nodejs npm)");
        return None;
    }
    let dir = std::env::temp_dir().join("smsauth-integrate-jose");
    if !dir.join("node_modules/jose/package.json").exists() {
        std::fs::create_dir_all(&dir).unwrap();
        let out = Command::new("npm")
            .args(["install", "--silent", "--no-audit", "--no-fund", "--prefix"])
            .arg(&dir)
            .arg("jose")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "npm install jose: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Some(dir)
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
        let run = |token: String| run_example("python3", &script, s.url(""), token);
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

/// Runs `program script token` against `base`, off the async runtime.
fn run_example(
    program: &str,
    script: &std::path::Path,
    base: String,
    token: String,
) -> std::process::Output {
    let (program, script) = (program.to_owned(), script.to_owned());
    std::thread::spawn(move || {
        Command::new(program)
            .arg(&script)
            .arg(token)
            .env("AUTH_BASE_URL", base)
            .output()
            .unwrap()
    })
    .join()
    .unwrap()
}

#[tokio::test]
async fn the_jose_example_checks_tokens_of_every_asymmetric_algorithm() {
    let Some(dir) = node_with_jose() else {
        return;
    };
    // Beside node_modules, so that `import "jose"` finds it.
    let script = dir.join("check_token.mjs");
    std::fs::write(&script, block("### Node (jose)", "javascript")).unwrap();
    for alg in ["ES256", "EdDSA"] {
        let s = TestServer::start(&format!("[token]\nalgorithm = \"{alg}\"\n")).await;
        let login = s.sms_login("13812347001").await;
        let token = login["access_token"].as_str().unwrap().to_owned();
        let out = run_example("node", &script, s.url(""), token.clone());
        assert!(
            out.status.success(),
            "{alg}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            login["user"]["id"].to_string(),
            "{alg}"
        );
        let mut forged = token.into_bytes();
        let last = forged.len() - 2;
        forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
        let out = run_example(
            "node",
            &script,
            s.url(""),
            String::from_utf8(forged).unwrap(),
        );
        assert_eq!(out.status.code(), Some(1), "{alg}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("refused"),
            "{alg}"
        );
    }
}
