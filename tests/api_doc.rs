//! docs/api.md is docs/openapi.json rendered as a reference page, so the two cannot drift
//! apart: the description stays the source (tests/openapi.rs keeps it true to the
//! router), this test renders it and compares. After a change to the description,
//! `UPDATE_DOCS=1 cargo test --test api_doc` writes the page anew.
//!
//! The renderer knows nothing of smsauth's routes: every operation of every path, under
//! its first tag, with its parameters, body fields, answers and error codes, then every
//! schema. A route added to the description appears on the page at the next update.

use std::fmt::Write as _;

use serde_json::Value;

const DESCRIPTION: &str = include_str!("../docs/openapi.json");
const PAGE: &str = "docs/api.md";
const METHODS: [&str; 8] = [
    "get", "put", "post", "patch", "delete", "options", "head", "trace",
];

fn doc() -> Value {
    serde_json::from_str(DESCRIPTION).expect("docs/openapi.json is JSON")
}

/// The name a `$ref` points at: `#/components/schemas/User` -> `User`.
fn ref_name(r: &str) -> &str {
    r.rsplit('/').next().unwrap_or(r)
}

/// Follows `$ref`s (to components of any kind) until a value without one.
fn resolve<'a>(doc: &'a Value, mut v: &'a Value) -> &'a Value {
    while let Some(r) = v.get("$ref").and_then(Value::as_str) {
        let path = r.strip_prefix("#/").expect("a local $ref");
        v = path.split('/').fold(doc, |at, part| {
            &at[part.replace("~1", "/").replace("~0", "~")]
        });
    }
    v
}

/// A heading's anchor as GitHub makes it: lower case, spaces to dashes, punctuation gone.
fn anchor(heading: &str) -> String {
    heading
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// Text for a table cell: on one line, pipes escaped.
fn cell(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

fn code(v: &Value) -> String {
    format!("`{}`", v.to_string().replace('|', "\\|"))
}

/// `text` ending in a full stop (descriptions of answers often end without one).
fn sentence(text: &str) -> String {
    let text = text.trim_end();
    if text.is_empty() || text.ends_with(['.', '!', '?', ')']) {
        text.to_owned()
    } else {
        format!("{text}.")
    }
}

/// A schema in a few words: `string`, `integer (int64)`, `array of [User](#user)`, ...
fn type_of(schema: &Value) -> String {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let name = ref_name(r);
        return format!("[{name}](#{})", anchor(name));
    }
    if let Some(c) = schema.get("const") {
        return format!("always {}", code(c));
    }
    if let Some(choices) = schema.get("oneOf").and_then(Value::as_array) {
        let ts: Vec<_> = choices.iter().map(type_of).collect();
        if ts.iter().any(|t| t == "object") {
            return "object".to_owned();
        }
        return ts.join(" or ");
    }
    let mut t = match &schema["type"] {
        Value::String(s) => s.clone(),
        Value::Array(ts) => ts
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(" or "),
        _ if schema.get("enum").is_some() => "string".to_owned(),
        _ => "any".to_owned(),
    };
    if t == "array" {
        t = format!("array of {}", type_of(&schema["items"]));
    }
    if let Some(f) = schema["format"].as_str() {
        t = format!("{t} ({f})");
    }
    if let Some(e) = schema["enum"].as_array() {
        let vs: Vec<_> = e.iter().map(code).collect();
        t = format!("{t}: {}", vs.join(", "));
    }
    t
}

/// What a field means: its description (or its schema's), then its bounds and default.
fn meaning(doc: &Value, field: &Value) -> String {
    let mut parts = Vec::new();
    let own = field["description"].as_str();
    let target = resolve(doc, field);
    if let Some(d) = own.or_else(|| target["description"].as_str()) {
        parts.push(d.to_owned());
    }
    for (key, word) in [
        ("minLength", "At least {} characters"),
        ("maxLength", "At most {} characters"),
        ("minimum", "At least {}"),
        ("maximum", "At most {}"),
        ("minItems", "At least {} items"),
        ("pattern", "Matches `{}`"),
    ] {
        if let Some(v) = field.get(key) {
            let v = v
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| v.to_string());
            parts.push(format!("{}.", word.replace("{}", &v)));
        }
    }
    if let Some(d) = field.get("default") {
        parts.push(format!("Default {}.", code(d)));
    }
    if let Some(e) = field["examples"].as_array().filter(|e| !e.is_empty()) {
        let es: Vec<_> = e.iter().map(code).collect();
        parts.push(format!("Example {}.", es.join(", ")));
    }
    cell(&parts.join(" "))
}

/// The field table of an object schema (its `$ref` followed), or None for other schemas.
fn fields(doc: &Value, schema: &Value) -> Option<String> {
    let schema = resolve(doc, schema);
    let props = schema["properties"].as_object()?;
    let required: Vec<&str> = schema["required"]
        .as_array()
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let mut out =
        String::from("| field | type | required | meaning |\n| --- | --- | --- | --- |\n");
    // Required fields first; each group in the description's (alphabetical) order.
    let mut props: Vec<_> = props.iter().collect();
    props.sort_by_key(|(name, _)| !required.contains(&name.as_str()));
    for (name, field) in props {
        let req = if required.contains(&name.as_str()) {
            "yes"
        } else {
            "no"
        };
        let _ = writeln!(
            out,
            "| `{name}` | {} | {req} | {} |",
            cell(&type_of(field)),
            meaning(doc, field)
        );
    }
    Some(out)
}

/// The schema of a body (request or response): its JSON media type's, or the first one's.
fn body_schema(body: &Value) -> Option<(&str, &Value)> {
    let content = body["content"].as_object()?;
    content
        .iter()
        .find(|(media, _)| media.as_str() == "application/json")
        .or_else(|| content.iter().next())
        .map(|(media, m)| (media.as_str(), m))
}

fn render_operation(doc: &Value, out: &mut String, method: &str, path: &str, op: &Value) {
    let _ = writeln!(out, "### `{} {path}`\n", method.to_uppercase());
    if let Some(s) = op["summary"].as_str() {
        let _ = writeln!(out, "**{s}.**");
    }
    if let Some(d) = op["description"].as_str() {
        let _ = writeln!(out, "{d}");
    }
    out.push('\n');
    if let Some(sec) = op["security"].as_array().filter(|s| !s.is_empty()) {
        let names: Vec<String> = sec
            .iter()
            .filter_map(Value::as_object)
            .flat_map(|o| o.keys())
            .map(|k| format!("[{k}](#authentication)"))
            .collect();
        let _ = writeln!(out, "Authentication: {}.\n", names.join(" or "));
    }
    if let Some(params) = op["parameters"].as_array().filter(|p| !p.is_empty()) {
        out.push_str(
            "| parameter | in | type | required | meaning |\n| --- | --- | --- | --- | --- |\n",
        );
        for p in params {
            let p = resolve(doc, p);
            let _ = writeln!(
                out,
                "| `{}` | {} | {} | {} | {} |",
                p["name"].as_str().unwrap_or("?"),
                p["in"].as_str().unwrap_or("?"),
                cell(&type_of(&p["schema"])),
                if p["required"].as_bool() == Some(true) {
                    "yes"
                } else {
                    "no"
                },
                meaning(doc, p)
            );
        }
        out.push('\n');
    }
    if let Some(body) = op.get("requestBody").map(|b| resolve(doc, b)) {
        let required = if body["required"].as_bool() == Some(true) {
            "required"
        } else {
            "optional"
        };
        if let Some((media, m)) = body_schema(body) {
            let schema = &m["schema"];
            let _ = writeln!(
                out,
                "Request body ({required}, `{media}`): {}.\n",
                type_of(schema)
            );
            if let Some(d) = resolve(doc, schema)["description"].as_str() {
                let _ = writeln!(out, "{d}\n");
            }
            if let Some(table) = fields(doc, schema) {
                out.push_str(&table);
                out.push('\n');
            }
        }
    }
    out.push_str("| status | answer |\n| --- | --- |\n");
    for (status, resp) in op["responses"].as_object().into_iter().flatten() {
        let resp = resolve(doc, resp);
        let mut text = sentence(resp["description"].as_str().unwrap_or(""));
        if let Some((media, m)) = body_schema(resp) {
            let t = type_of(&m["schema"]);
            if !t.contains("(#error)") {
                let _ = write!(text, " Body: {t} (`{media}`).");
            }
        }
        let headers: Vec<String> = resp["headers"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(name, h)| {
                let h = resolve(doc, h);
                match h["description"].as_str() {
                    Some(d) => format!("`{name}`: {}", d.trim_end_matches('.')),
                    None => format!("`{name}`"),
                }
            })
            .collect();
        if !headers.is_empty() {
            let _ = write!(text, " Headers: {}.", headers.join("; "));
        }
        let _ = writeln!(out, "| {status} | {} |", cell(&text));
    }
    out.push('\n');
    for (status, resp) in op["responses"].as_object().into_iter().flatten() {
        let resp = resolve(doc, resp);
        if let Some((_, m)) = body_schema(resp)
            && let Some(example) = m.get("example")
        {
            let _ = writeln!(
                out,
                "Example {status} answer:\n\n```json\n{}\n```\n",
                serde_json::to_string_pretty(example).unwrap()
            );
        }
    }
}

/// (method, path, operation) of every operation, in path order then method order.
fn operations(doc: &Value) -> Vec<(&'static str, &str, &Value)> {
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in METHODS {
            if let Some(op) = item.get(method) {
                ops.push((method, path.as_str(), op));
            }
        }
    }
    ops
}

fn first_tag(op: &Value) -> &str {
    op["tags"][0].as_str().unwrap_or("other")
}

fn render(doc: &Value) -> String {
    let info = &doc["info"];
    let mut out = String::from(
        "# HTTP API\n\n\
         <!-- Rendered from docs/openapi.json by tests/api_doc.rs \
         (UPDATE_DOCS=1 cargo test --test api_doc); edit the description, not this page. -->\n\n",
    );
    if let Some(s) = info["summary"].as_str() {
        let _ = writeln!(out, "{s}\n");
    }
    if let Some(d) = info["description"].as_str() {
        let _ = writeln!(out, "{d}\n");
    }
    let _ = writeln!(
        out,
        "The description this page is made from, OpenAPI {}, is \
         [docs/openapi.json](openapi.json); a running server serves it at \
         `GET /api/v1/openapi.json`, for client generators and API tools.\n",
        doc["openapi"].as_str().unwrap_or("3")
    );

    // Tags in the document's order, then any an operation names that the list lacks.
    let mut tags: Vec<(String, String)> = doc["tags"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            (
                t["name"].as_str().unwrap_or("other").to_owned(),
                t["description"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    let ops = operations(doc);
    for (_, _, op) in &ops {
        let tag = first_tag(op);
        if !tags.iter().any(|(name, _)| name == tag) {
            tags.push((tag.to_owned(), String::new()));
        }
    }

    out.push_str("## Routes\n\n| route | what it does |\n| --- | --- |\n");
    for (tag, _) in &tags {
        for (method, path, op) in ops.iter().filter(|(_, _, op)| first_tag(op) == tag) {
            let heading = format!("{} {path}", method.to_uppercase());
            let _ = writeln!(
                out,
                "| [`{heading}`](#{}) | {} |",
                anchor(&heading),
                cell(op["summary"].as_str().unwrap_or(""))
            );
        }
    }
    out.push('\n');

    out.push_str("## Authentication\n\n");
    for (name, scheme) in doc["components"]["securitySchemes"]
        .as_object()
        .into_iter()
        .flatten()
    {
        let _ = writeln!(
            out,
            "- **{name}**: {}",
            scheme["description"].as_str().unwrap_or("")
        );
    }
    out.push('\n');

    out.push_str("## Errors\n\n");
    if let Some(error) = doc["components"]["schemas"].get("Error") {
        if let Some(d) = error["description"].as_str() {
            let _ = writeln!(out, "{d}\n");
        }
        if let Some(table) = fields(doc, error) {
            out.push_str(&table);
            out.push('\n');
        }
    }
    if let Some(codes) = doc["components"]["schemas"].get("ErrorCode") {
        // Where each code comes from: the operations whose answers name it.
        out.push_str("| `error` | status | answered by |\n| --- | --- | --- |\n");
        for c in codes["enum"].as_array().into_iter().flatten() {
            let c = c.as_str().unwrap_or("?");
            let needle = format!("`{c}`");
            let mut statuses = Vec::new();
            let mut by = Vec::new();
            for (method, path, op) in &ops {
                for (status, resp) in op["responses"].as_object().into_iter().flatten() {
                    let d = resolve(doc, resp)["description"].as_str().unwrap_or("");
                    if d.contains(&needle) {
                        if !statuses.contains(status) {
                            statuses.push(status.clone());
                        }
                        let heading = format!("{} {path}", method.to_uppercase());
                        let link = format!("[`{heading}`](#{})", anchor(&heading));
                        if !by.contains(&link) {
                            by.push(link);
                        }
                    }
                }
            }
            let by = if by.len() == ops.len() {
                "every route".to_owned()
            } else if by.is_empty() {
                "see the note above".to_owned()
            } else {
                by.join(", ")
            };
            let _ = writeln!(out, "| `{c}` | {} | {by} |", statuses.join(", "));
        }
        out.push('\n');
    }

    for (tag, description) in &tags {
        let mut chars = tag.chars();
        let title: String = chars
            .next()
            .map(|first| first.to_uppercase().chain(chars).collect())
            .unwrap_or_default();
        let _ = writeln!(out, "## {title}\n");
        if !description.is_empty() {
            let _ = writeln!(out, "{description}\n");
        }
        for (method, path, op) in ops.iter().filter(|(_, _, op)| first_tag(op) == tag) {
            render_operation(doc, &mut out, method, path, op);
        }
    }

    out.push_str("## Schemas\n\n");
    for (name, schema) in doc["components"]["schemas"]
        .as_object()
        .into_iter()
        .flatten()
    {
        let _ = writeln!(out, "### {name}\n");
        if let Some(d) = schema["description"].as_str() {
            let _ = writeln!(out, "{d}\n");
        }
        match fields(doc, schema) {
            Some(table) => {
                out.push_str(&table);
                out.push('\n');
            }
            None => {
                let _ = writeln!(out, "{}.\n", type_of(schema));
            }
        }
    }
    out.trim_end().to_owned() + "\n"
}

#[test]
fn the_api_page_is_the_description_rendered() {
    let rendered = render(&doc());
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(PAGE);
    if std::env::var_os("UPDATE_DOCS").is_some() {
        std::fs::write(&path, &rendered).unwrap();
    }
    let page = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        page == rendered,
        "{PAGE} is not docs/openapi.json rendered; run UPDATE_DOCS=1 cargo test --test api_doc"
    );
}

/// Every operation, every status it answers and every field of every request body is
/// on the page, whatever routes the description has.
#[test]
fn every_route_status_and_body_field_is_on_the_page() {
    let doc = doc();
    let page = render(&doc);
    let ops = operations(&doc);
    assert!(ops.len() >= 20, "{} operations read", ops.len());
    for (method, path, op) in ops {
        let heading = format!("### `{} {path}`", method.to_uppercase());
        let at = page
            .find(&heading)
            .unwrap_or_else(|| panic!("{heading} missing"));
        let section = &page[at..];
        let section = &section[..section[4..].find("\n### ").map_or(section.len(), |e| e + 4)];
        for status in op["responses"].as_object().unwrap().keys() {
            assert!(
                section.contains(&format!("\n| {status} | ")),
                "{heading}: status {status} missing"
            );
        }
        if let Some(body) = op.get("requestBody") {
            let (_, m) = body_schema(resolve(&doc, body)).expect("a body schema");
            let schema = resolve(&doc, &m["schema"]);
            for field in schema["properties"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, _)| k)
            {
                assert!(
                    section.contains(&format!("| `{field}` |")),
                    "{heading}: body field {field} missing"
                );
            }
        }
    }
    for code in doc["components"]["schemas"]["ErrorCode"]["enum"]
        .as_array()
        .unwrap()
    {
        assert!(page.contains(&format!("| `{}` |", code.as_str().unwrap())));
    }
}

#[test]
fn anchors_are_as_github_makes_them() {
    assert_eq!(
        anchor("DELETE /api/v1/me/sessions/{id}"),
        "delete-apiv1mesessionsid"
    );
    assert_eq!(
        anchor("GET /.well-known/jwks.json"),
        "get-well-knownjwksjson"
    );
}
