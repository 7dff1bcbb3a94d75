//! The Debian package's files under packaging/ are made from their sources (the command
//! line's definition, config.example.toml, systemd/smsauth.service), so `cargo deb` needs
//! no build step of its own. This test makes them again and compares; after a change to a
//! source, `UPDATE_DOCS=1 cargo test --test packaging` writes them anew.

mod common;

use std::path::Path;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn run(args: &[&str]) -> String {
    let out = common::run_cli(args, &[], root());
    assert_eq!(out.status.code(), Some(0), "smsauth {args:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// (file under packaging/, what it must hold)
fn expected() -> Vec<(&'static str, String)> {
    let example = std::fs::read_to_string(root().join("config.example.toml")).unwrap();
    let data_dir = "#data_dir = \"./data\"";
    assert!(example.contains(data_dir), "the example's data_dir line");
    let conffile = format!(
        "# Installed by the smsauth Debian package as /etc/smsauth/smsauth.toml: the\n\
         # example configuration with the data dir set to the unit's state directory.\n\
         {}",
        example.replace(data_dir, "data_dir = \"/var/lib/smsauth\"")
    );
    let unit = std::fs::read_to_string(root().join("systemd/smsauth.service")).unwrap();
    assert!(
        unit.contains("/usr/local/bin/smsauth serve"),
        "the unit's ExecStart"
    );
    let unit = unit
        .replace("/usr/local/bin/smsauth", "/usr/bin/smsauth")
        .replace("/usr/local/share/doc/smsauth", "/usr/share/doc/smsauth");
    vec![
        ("smsauth.1", run(&["man"])),
        ("completions/smsauth.bash", run(&["completions", "bash"])),
        ("completions/_smsauth", run(&["completions", "zsh"])),
        ("completions/smsauth.fish", run(&["completions", "fish"])),
        ("smsauth.toml", conffile),
        ("smsauth.service", unit),
    ]
}

#[test]
fn the_package_files_are_made_from_their_sources() {
    let update = std::env::var_os("UPDATE_DOCS").is_some();
    for (name, want) in expected() {
        let path = root().join("packaging").join(name);
        if update {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &want).unwrap();
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "packaging/{name} is stale; run UPDATE_DOCS=1 cargo test --test packaging"
        );
    }
}

/// Every file the package installs exists, and the conffile is one of them.
#[test]
fn the_package_lists_files_that_exist() {
    let manifest: toml::Table = std::fs::read_to_string(root().join("Cargo.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let deb = &manifest["package"]["metadata"]["deb"];
    let assets = deb["assets"].as_array().unwrap();
    for asset in assets {
        let source = asset[0].as_str().unwrap();
        if source.starts_with("target/") {
            continue; // the binary cargo deb builds
        }
        if let Some(dir) = source.strip_suffix("/*.md") {
            let docs = std::fs::read_dir(root().join(dir)).unwrap();
            assert!(
                docs.flatten()
                    .any(|e| e.path().extension().is_some_and(|x| x == "md")),
                "{source} matches nothing"
            );
            continue;
        }
        assert!(root().join(source).is_file(), "{source} is missing");
    }
    let conf = deb["conf-files"].as_array().unwrap();
    assert!(
        conf.iter()
            .any(|c| c.as_str() == Some("/etc/smsauth/smsauth.toml"))
    );
    assert!(
        assets
            .iter()
            .any(|a| a[1].as_str() == Some("etc/smsauth/smsauth.toml")),
        "the conffile is installed"
    );
}
