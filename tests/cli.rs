//! The command line and configuration loading, as an operator meets them.

mod common;

use common::run_cli;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn help_and_version() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_cli(&["--help"], &[], dir.path());
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("serve") && text.contains("--config"),
        "{text}"
    );
    let out = run_cli(&["--version"], &[], dir.path());
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("smsauth {}", env!("CARGO_PKG_VERSION"))
    );
}

/// Each bad configuration stops start-up with status 2 and names what is wrong.
#[test]
fn bad_configuration_exits_2_and_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    // (config file, environment, what the message must name)
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        ("[server]\nlisten = \"localhost\"\n", &[], "server.listen"),
        ("[server]\nlisten_on = \"127.0.0.1:1\"\n", &[], "listen_on"),
        ("[code]\nttl_secs = -5\n", &[], "code.ttl_secs"),
        ("[code]\nlength = 3\n", &[], "code.length"),
        ("[phone]\npattern = \"[\"\n", &[], "phone.pattern"),
        (
            "[sms]\nprovider = \"carrier-pigeon\"\n",
            &[],
            "sms.provider",
        ),
        ("[sms]\nprovider = \"webhook\"\n", &[], "sms.webhook.url"),
        (
            "[sms]\nprovider = \"webhook\"\nfixed_code = \"123456\"\n[sms.webhook]\nurl = \"http://127.0.0.1:9/\"\nsecret = \"s\"\n",
            &[],
            "sms.fixed_code",
        ),
        ("[token]\nsecret = \"short\"\n", &[], "token.secret"),
        ("not toml at all = = =\n", &[], "smsauth.toml"),
        (
            "",
            &[("SMSAUTH_SERVER__LISTEN", "nowhere")],
            "server.listen",
        ),
        (
            "",
            &[("SMSAUTH_CODE__MAX_ATTEMPTS", "many")],
            "code.max_attempts",
        ),
        ("", &[("SMSAUTH_CODE__NO_SUCH_KEY", "1")], "no_such_key"),
        ("", &[("SMSAUTH_LISTEN", "127.0.0.1:1")], "SMSAUTH_LISTEN"),
    ];
    for (toml, env, named) in cases {
        let path = dir.path().join("smsauth.toml");
        std::fs::write(&path, toml).unwrap();
        let out = run_cli(
            &["serve", "--config", path.to_str().unwrap()],
            env,
            dir.path(),
        );
        assert_eq!(
            out.status.code(),
            Some(2),
            "{toml} {env:?}: {}",
            stderr(&out)
        );
        assert!(
            stderr(&out).contains(named),
            "{toml} {env:?}: expected {named} in {}",
            stderr(&out)
        );
        let checked = run_cli(
            &["config", "check", "--config", path.to_str().unwrap()],
            env,
            dir.path(),
        );
        assert_eq!(
            checked.status.code(),
            Some(2),
            "config check: {toml} {env:?}"
        );
        assert_eq!(
            stderr(&checked),
            stderr(&out),
            "config check says what a start says"
        );
    }
    let out = run_cli(&["--config", "/nonexistent/smsauth.toml"], &[], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("/nonexistent/smsauth.toml"),
        "{}",
        stderr(&out)
    );
}

/// The man page and the completions come from the command line's own definition, so
/// every subcommand is in them; no configuration is read for them.
#[test]
fn man_page_and_completions_cover_every_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    // A configuration that would stop any other command: these do not read it.
    let broken = [("SMSAUTH_SERVER__LISTEN", "nowhere")];
    let man = run_cli(&["man"], &broken, dir.path());
    assert_eq!(man.status.code(), Some(0), "{}", stderr(&man));
    let man = String::from_utf8(man.stdout).unwrap();
    assert!(man.contains(".TH smsauth 1"), "{man}");
    for sub in [
        "serve", "user", "keys", "backup", "restore", "migrate", "config",
    ] {
        assert!(man.contains(sub), "{sub} not in the man page");
    }
    for (shell, marker) in [
        ("bash", "_smsauth()"),
        ("zsh", "#compdef smsauth"),
        ("fish", "complete -c smsauth"),
    ] {
        let out = run_cli(&["completions", shell], &broken, dir.path());
        assert_eq!(out.status.code(), Some(0), "{shell}: {}", stderr(&out));
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains(marker), "{shell}: {text}");
        assert!(
            text.contains("rotate-token-key"),
            "{shell} completes nested subcommands"
        );
    }
    let out = run_cli(&["completions", "tcsh"], &[], dir.path());
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

/// `config check` prints what a start would use, every secret masked, and starts nothing.
#[test]
fn config_check_prints_the_effective_configuration_with_secrets_masked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("smsauth.toml");
    let token_secret = "token-secret-that-is-long-enough-0123456789";
    let hook_secret = "webhook-signing-secret-42";
    std::fs::write(
        &path,
        format!(
            "[token]\nsecret = \"{token_secret}\"\n[sms]\nprovider = \"webhook\"\n\
             [sms.webhook]\nurl = \"http://127.0.0.1:9/send\"\nsecret = \"{hook_secret}\"\n"
        ),
    )
    .unwrap();
    let out = run_cli(
        &["config", "check", "--config", path.to_str().unwrap()],
        &[("SMSAUTH_CODE__TTL_SECS", "240")],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    for secret in [token_secret, hook_secret] {
        assert!(!text.contains(secret), "a secret was printed: {text}");
    }
    let shown: toml::Table = text.parse().expect("the output is TOML");
    assert_eq!(shown["token"]["secret"].as_str(), Some("********"));
    assert_eq!(shown["sms"]["webhook"]["secret"].as_str(), Some("********"));
    assert_eq!(
        shown["sms"]["webhook"]["url"].as_str(),
        Some("http://127.0.0.1:9/send")
    );
    assert_eq!(
        shown["code"]["ttl_secs"].as_integer(),
        Some(240),
        "the env counts"
    );
    assert_eq!(
        shown["wechat"]["app_secret"].as_str(),
        Some(""),
        "unset stays empty"
    );
    assert!(
        !dir.path().join("data").exists(),
        "nothing was started or made"
    );
}

/// Plain `smsauth` serves on the embedded defaults, with its data in ./data.
#[tokio::test]
async fn plain_smsauth_serves_with_data_in_the_working_dir() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(common::BIN)
        .current_dir(dir.path())
        .env("SMSAUTH_SERVER__LISTEN", "127.0.0.1:0")
        .env("SMSAUTH_LOG__FORMAT", "json")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::BufRead;
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["message"], "listening");
    assert_eq!(first["sms_provider"], "log");
    let url = format!("http://{}/healthz", first["addr"].as_str().unwrap());
    assert_eq!(reqwest::get(&url).await.unwrap().status(), 200);
    assert!(dir.path().join("data/signing.key").exists());
    // A second server on the same data dir is refused with a clear message.
    let out = run_cli(
        &[],
        &[("SMSAUTH_SERVER__LISTEN", "127.0.0.1:0")],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("in use by another smsauth process"),
        "{}",
        stderr(&out)
    );
    child.kill().unwrap();
    child.wait().unwrap();
}
