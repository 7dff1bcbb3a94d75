//! docs/configuration.md is config.example.toml rendered as a reference, key by key, so
//! the two cannot drift apart: this test renders the example and compares. After a
//! change to the example, `UPDATE_DOCS=1 cargo test --test docs` writes the page anew.
//! (That the example lists every key the configuration code has is the configuration
//! module's own test.)

const EXAMPLE: &str = include_str!("../config.example.toml");
const PAGE: &str = "docs/configuration.md";

/// One key of the example: its section, name, default (as written) and the comment above.
struct Key {
    section: String,
    name: String,
    default: String,
    meaning: String,
}

fn keys(example: &str) -> (String, Vec<Key>) {
    let mut intro = Vec::new();
    let mut keys: Vec<Key> = Vec::new();
    let mut section: Option<String> = None;
    let mut comment: Vec<&str> = Vec::new();
    for line in example.lines() {
        let line = line.trim_end();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = Some(name.to_owned());
            comment.clear();
        } else if let Some((name, default)) = line
            .strip_prefix('#')
            .and_then(|l| l.split_once(" = "))
            .filter(|(name, _)| !name.is_empty() && !name.contains(' '))
        {
            // A key right below another shares its comment ("argon2id parameters: ...").
            let meaning = match keys.last() {
                Some(above) if comment.is_empty() && above.meaning.starts_with("As `") => {
                    above.meaning.clone()
                }
                Some(above) if comment.is_empty() => {
                    format!("As `{}.{}` above.", above.section, above.name)
                }
                _ => comment.join(" "),
            };
            keys.push(Key {
                section: section.clone().expect("a key inside a section"),
                name: name.to_owned(),
                default: default.to_owned(),
                meaning,
            });
            comment.clear();
        } else if let Some(text) = line.strip_prefix('#') {
            let text = text.strip_prefix(' ').unwrap_or(text);
            if section.is_none() {
                intro.push(text.to_owned());
            } else {
                comment.push(text);
            }
        }
    }
    (intro.join("\n"), keys)
}

fn env_name(section: &str, key: &str) -> String {
    format!("SMSAUTH_{}__{}", section.replace('.', "__"), key).to_uppercase()
}

fn render(example: &str) -> String {
    let (intro, keys) = keys(example);
    let mut out = String::from(
        "# Configuration\n\n\
         <!-- Rendered from config.example.toml by tests/docs.rs \
         (UPDATE_DOCS=1 cargo test --test docs); edit the example, not this page. -->\n\n\
         Every key, its default, the environment variable that sets it, and what it does.\n\
         `smsauth config check [--config FILE]` validates a configuration without starting\n\
         (exit 0, or 2 with the message a start would give) and prints the effective\n\
         configuration, defaults and environment included, every secret as `********`.\n\n",
    );
    out.push_str("```text\n");
    out.push_str(&intro);
    out.push_str("\n```\n");
    let mut section = "";
    for k in &keys {
        if k.section != section {
            section = &k.section;
            out.push_str(&format!(
                "\n## [{section}]\n\n| key | default | environment | meaning |\n| --- | --- | --- | --- |\n"
            ));
        }
        out.push_str(&format!(
            "| `{}.{}` | `{}` | `{}` | {} |\n",
            k.section,
            k.name,
            k.default.replace('|', "\\|"),
            env_name(&k.section, &k.name),
            k.meaning.replace('|', "\\|")
        ));
    }
    out
}

#[test]
fn the_configuration_page_is_the_example_rendered() {
    let rendered = render(EXAMPLE);
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(PAGE);
    if std::env::var_os("UPDATE_DOCS").is_some() {
        std::fs::write(&path, &rendered).unwrap();
    }
    let page = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        page == rendered,
        "{PAGE} is not config.example.toml rendered; run UPDATE_DOCS=1 cargo test --test docs"
    );
}

#[test]
fn every_key_of_the_example_is_on_the_page_with_its_environment_form() {
    let (_, keys) = keys(EXAMPLE);
    assert!(keys.len() > 60, "{} keys read from the example", keys.len());
    let rendered = render(EXAMPLE);
    for k in &keys {
        let full = format!("`{}.{}`", k.section, k.name);
        assert!(rendered.contains(&full), "{full} missing");
        assert!(
            !k.meaning.is_empty(),
            "{full} has no comment in the example"
        );
    }
    assert_eq!(
        env_name("storage.postgres", "url_file"),
        "SMSAUTH_STORAGE__POSTGRES__URL_FILE"
    );
}
