//! The API description (docs/openapi.json) kept true: the router's routes and the
//! document's operations are the same set, every error code the server has is in it with
//! the status it really comes with, the server serves the file itself, and real answers
//! have the properties the document promises for their operation and status.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::TestServer;
use serde_json::{Value, json};
use smsauth::error::ApiError;
use smsauth::http::router::ROUTES;

const DOC_TEXT: &str = include_str!("../docs/openapi.json");
const HTTP_METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

fn doc() -> Value {
    serde_json::from_str(DOC_TEXT).expect("docs/openapi.json is JSON")
}

/// (METHOD, path) of every operation in the document.
fn documented_operations(doc: &Value) -> BTreeSet<(String, String)> {
    let paths = doc["paths"].as_object().expect("paths is an object");
    let mut ops = BTreeSet::new();
    for (path, item) in paths {
        for key in item.as_object().expect("a path item is an object").keys() {
            if HTTP_METHODS.contains(&key.as_str()) {
                ops.insert((key.to_uppercase(), path.clone()));
            }
        }
    }
    ops
}

fn routed_operations() -> BTreeSet<(String, String)> {
    ROUTES
        .iter()
        .map(|(m, p, _)| (m.to_string(), p.to_string()))
        .collect()
}

#[test]
fn every_route_is_documented_and_every_operation_is_routed() {
    let documented = documented_operations(&doc());
    let routed = routed_operations();
    let undocumented: Vec<_> = routed.difference(&documented).collect();
    let unrouted: Vec<_> = documented.difference(&routed).collect();
    assert!(
        undocumented.is_empty(),
        "routes missing from docs/openapi.json: {undocumented:?}"
    );
    assert!(
        unrouted.is_empty(),
        "operations in docs/openapi.json the router does not know: {unrouted:?}"
    );
    assert_eq!(routed.len(), ROUTES.len(), "ROUTES has a duplicate");
}

/// One value of every ApiError variant.
fn every_error() -> Vec<ApiError> {
    let all = vec![
        ApiError::InvalidRequest(String::new()),
        ApiError::InvalidPhone,
        ApiError::InvalidCode,
        ApiError::TooManyAttempts {
            message: String::new(),
            retry_after: Some(1),
            limit: "test",
        },
        ApiError::rate_limited("test", 1),
        ApiError::Unauthorized(""),
        ApiError::InvalidRefreshToken,
        ApiError::InvalidCredentials,
        ApiError::PhoneTaken,
        ApiError::WeakPassword(String::new()),
        ApiError::CaptchaRequired,
        ApiError::CaptchaInvalid,
        ApiError::SmsFailed,
        ApiError::WechatCodeInvalid,
        ApiError::WechatFailed,
        ApiError::WechatTaken,
        ApiError::WechatAlreadyBound,
        ApiError::Forbidden(""),
        ApiError::NotFound,
        // Default: whatever type `allow` has (it may become an owned String).
        ApiError::MethodNotAllowed {
            allow: Default::default(),
        },
        ApiError::PayloadTooLarge { limit: 1 },
        ApiError::UnsupportedMediaType,
        ApiError::Unavailable(String::new()),
        ApiError::Internal(String::new()),
    ];
    // A new variant stops this from compiling: add it to the list above.
    for e in &all {
        match e {
            ApiError::InvalidRequest(_)
            | ApiError::InvalidPhone
            | ApiError::InvalidCode
            | ApiError::TooManyAttempts { .. }
            | ApiError::RateLimited { .. }
            | ApiError::Unauthorized(_)
            | ApiError::InvalidRefreshToken
            | ApiError::InvalidCredentials
            | ApiError::PhoneTaken
            | ApiError::WeakPassword(_)
            | ApiError::CaptchaRequired
            | ApiError::CaptchaInvalid
            | ApiError::SmsFailed
            | ApiError::WechatCodeInvalid
            | ApiError::WechatFailed
            | ApiError::WechatTaken
            | ApiError::WechatAlreadyBound
            | ApiError::Forbidden(_)
            | ApiError::NotFound
            | ApiError::MethodNotAllowed { .. }
            | ApiError::PayloadTooLarge { .. }
            | ApiError::UnsupportedMediaType
            | ApiError::Unavailable(_)
            | ApiError::Internal(_) => {}
        }
    }
    all
}

/// code -> status, as the server answers them.
fn error_statuses() -> BTreeMap<&'static str, u16> {
    every_error()
        .iter()
        .map(|e| (e.code(), e.status().as_u16()))
        .collect()
}

/// Follows a local `$ref` (`#/components/...`).
fn resolve<'a>(doc: &'a Value, mut v: &'a Value) -> &'a Value {
    while let Some(r) = v.get("$ref").and_then(Value::as_str) {
        let pointer = r.strip_prefix('#').expect("only local $refs");
        v = doc
            .pointer(pointer)
            .unwrap_or_else(|| panic!("$ref {r} points at nothing"));
    }
    v
}

fn all_refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("$ref", Value::String(r)) => out.push(r),
                    _ => all_refs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| all_refs(v, out)),
        _ => {}
    }
}

/// Every operation: (METHOD, path, operation object).
fn operations(doc: &Value) -> Vec<(String, &str, &Value)> {
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if HTTP_METHODS.contains(&method.as_str()) {
                ops.push((method.to_uppercase(), path.as_str(), op));
            }
        }
    }
    ops
}

#[test]
fn the_document_is_openapi_3_1_and_its_references_resolve() {
    let doc = doc();
    let version = doc["openapi"].as_str().expect("an openapi version string");
    assert!(version.starts_with("3.1."), "openapi is {version}");
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
    assert!(doc["info"]["title"].is_string());
    let mut refs = Vec::new();
    all_refs(&doc, &mut refs);
    assert!(!refs.is_empty());
    for r in refs {
        let target = r.strip_prefix('#').expect("only local $refs");
        assert!(doc.pointer(target).is_some(), "$ref {r} points at nothing");
    }
    let mut ids = BTreeSet::new();
    for (method, path, op) in operations(&doc) {
        let id = op["operationId"].as_str();
        assert!(
            id.is_some_and(|id| ids.insert(id)),
            "{method} {path}: operationId missing or repeated"
        );
        let responses = op["responses"].as_object();
        assert!(
            responses.is_some_and(|r| !r.is_empty()),
            "{method} {path}: no responses"
        );
    }
    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(schemes["bearer"]["scheme"], "bearer");
    assert_eq!(schemes["cookie"]["in"], "cookie");
    assert_eq!(
        schemes["cookie"]["name"],
        smsauth::config::TokenConfig::default().cookie_name
    );
}

#[test]
fn every_error_code_is_in_the_error_schema_with_its_status() {
    let doc = doc();
    let statuses = error_statuses();
    let enumerated: BTreeSet<&str> = doc["components"]["schemas"]["ErrorCode"]["enum"]
        .as_array()
        .expect("an ErrorCode enum")
        .iter()
        .map(|v| v.as_str().expect("codes are strings"))
        .collect();
    let known: BTreeSet<&str> = statuses.keys().copied().collect();
    assert_eq!(
        enumerated, known,
        "the ErrorCode enum must list exactly the codes of ApiError::code()"
    );
    let error = resolve(&doc, &doc["components"]["schemas"]["Error"]);
    assert_eq!(
        error["properties"]["error"]["$ref"],
        "#/components/schemas/ErrorCode"
    );

    // Each error answer of each operation refers to the Error schema and names, in
    // backquotes, the codes it can carry; each named code comes with that status.
    let mut named_anywhere = BTreeSet::new();
    for (method, path, op) in operations(&doc) {
        for (status, resp) in op["responses"].as_object().unwrap() {
            let status: u16 = status.parse().expect("numeric statuses");
            if status < 400 {
                continue;
            }
            let resp = resolve(&doc, resp);
            assert_eq!(
                resp["content"]["application/json"]["schema"]["$ref"], "#/components/schemas/Error",
                "{method} {path} {status}"
            );
            let description = resp["description"].as_str().unwrap_or("");
            let named: Vec<&str> = known
                .iter()
                .copied()
                .filter(|c| description.contains(&format!("`{c}`")))
                .collect();
            assert!(
                !named.is_empty(),
                "{method} {path} {status}: the description names no error code"
            );
            for code in named {
                assert_eq!(
                    statuses[code], status,
                    "{method} {path}: `{code}` is documented under {status}"
                );
                named_anywhere.insert(code);
            }
            if status == 429 {
                assert!(
                    resolve(&doc, &resp["headers"]["Retry-After"]).is_object(),
                    "{method} {path}: 429 without Retry-After"
                );
            }
        }
    }
    // Codes no operation answers with a status: those of the router itself, and those
    // that only travel in the WeChat callback's redirect fragment, which names them.
    let callback = doc["paths"]["/api/v1/auth/wechat/callback"]["get"]["description"]
        .as_str()
        .unwrap_or("");
    let in_fragment = ["wechat_code_invalid", "wechat_failed"];
    for code in in_fragment {
        assert!(
            callback.contains(&format!("`{code}`")),
            "the callback does not name {code}"
        );
    }
    let missing: Vec<_> = known
        .difference(&named_anywhere)
        .filter(|c| !["not_found", "method_not_allowed"].contains(c) && !in_fragment.contains(c))
        .collect();
    assert!(
        missing.is_empty(),
        "codes no operation documents: {missing:?}"
    );
}

/// Checks a JSON value against a schema of the document: objects have every `required`
/// property and (with `additionalProperties: false`) no other; simple types and `const`
/// match. A small check, not a JSON Schema validator.
fn check_value(doc: &Value, schema: &Value, value: &Value, at: &str) {
    let schema = resolve(doc, schema);
    if let Some(c) = schema.get("const") {
        assert_eq!(value, c, "{at}: not the documented constant");
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
        assert!(allowed.contains(value), "{at}: {value} is not in the enum");
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    if !types.is_empty() {
        let actual = match value {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        };
        assert!(
            types.contains(&actual) || (actual == "integer" && types.contains(&"number")),
            "{at}: a {actual}, documented as {types:?}"
        );
    }
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        let object = value
            .as_object()
            .unwrap_or_else(|| panic!("{at}: not an object: {value}"));
        let required: Vec<&str> = schema["required"]
            .as_array()
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        for name in &required {
            assert!(
                object.contains_key(*name),
                "{at}: required `{name}` is missing in {value}"
            );
        }
        if schema["additionalProperties"] == false {
            for name in object.keys() {
                assert!(props.contains_key(name), "{at}: `{name}` is not documented");
            }
        }
        for (name, v) in object {
            if let Some(s) = props.get(name) {
                check_value(doc, s, v, &format!("{at}.{name}"));
            }
        }
    }
    if let (Some(items), Some(values)) = (schema.get("items"), value.as_array()) {
        for (i, v) in values.iter().enumerate() {
            check_value(doc, items, v, &format!("{at}[{i}]"));
        }
    }
}

/// Checks a real answer against what the document says for `method path` and its
/// status: the status is documented, the required headers are there, the media type is
/// the documented one and a JSON body has the documented properties. Returns the body.
async fn check_answer(doc: &Value, method: &str, path: &str, resp: reqwest::Response) -> Value {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    let op = &doc["paths"][path][method.to_lowercase()];
    assert!(op.is_object(), "{method} {path} is not documented");
    let documented = resolve(doc, &op["responses"][status.to_string()]);
    assert!(
        documented.is_object(),
        "{method} {path}: status {status} is not documented ({text})"
    );
    let at = format!("{method} {path} {status}");
    if let Some(hs) = documented.get("headers").and_then(Value::as_object) {
        for (name, h) in hs {
            if resolve(doc, h)["required"] == true {
                assert!(
                    headers.contains_key(name.as_str()),
                    "{at}: header {name} is missing"
                );
            }
        }
    }
    let Some(content) = documented.get("content").and_then(Value::as_object) else {
        assert!(
            text.is_empty(),
            "{at}: a body where none is documented: {text}"
        );
        return Value::Null;
    };
    let content_type = headers["content-type"].to_str().unwrap();
    // The documented media type, with or without the parameters the answer carries.
    let bare = content_type.split(';').next().unwrap().trim();
    let media = content
        .get(content_type)
        .or_else(|| content.get(bare))
        .unwrap_or_else(|| panic!("{at}: Content-Type {content_type} is not documented"));
    if bare != "application/json" {
        return Value::String(text);
    }
    let body: Value = serde_json::from_str(&text).expect("a JSON body");
    check_value(doc, &media["schema"], &body, &at);
    body
}

#[tokio::test]
async fn the_server_serves_the_document_as_kept_in_the_repository() {
    let s = TestServer::start("").await;
    let resp = s
        .client
        .get(s.url("/api/v1/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    assert_eq!(resp.text().await.unwrap(), DOC_TEXT);
    // Not counted against any limit, and other methods get 405 like every route.
    let resp = s
        .client
        .post(s.url("/api/v1/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    assert_eq!(resp.headers()["allow"], "GET");
}

#[tokio::test]
async fn real_answers_have_the_documented_shape() {
    let doc = doc();
    let s = TestServer::start("[token]\ncookie = true\n").await;
    let post = |path: &str, body: Value| s.client.post(s.url(path)).json(&body).send();
    let phone = "13812349001";

    let resp = s.client.get(s.url("/healthz")).send().await.unwrap();
    check_answer(&doc, "GET", "/healthz", resp).await;
    let resp = s.client.get(s.url("/metrics")).send().await.unwrap();
    check_answer(&doc, "GET", "/metrics", resp).await;
    let resp = s.client.get(s.url("/")).send().await.unwrap();
    check_answer(&doc, "GET", "/", resp).await;

    let resp = post("/api/v1/captcha", json!({})).await.unwrap();
    check_answer(&doc, "POST", "/api/v1/captcha", resp).await;

    let resp = post("/api/v1/sms/code", json!({ "phone": phone }))
        .await
        .unwrap();
    check_answer(&doc, "POST", "/api/v1/sms/code", resp).await;
    let code = s.take_code(&common::e164(phone));

    // A second code at once: 429 with retry_after and Retry-After.
    let resp = post("/api/v1/sms/code", json!({ "phone": phone }))
        .await
        .unwrap();
    let body = check_answer(&doc, "POST", "/api/v1/sms/code", resp).await;
    assert_eq!(body["error"], "rate_limited");
    assert!(body["retry_after"].is_u64());

    let resp = post(
        "/api/v1/auth/sms-login",
        json!({ "phone": phone, "code": "000" }),
    )
    .await
    .unwrap();
    let body = check_answer(&doc, "POST", "/api/v1/auth/sms-login", resp).await;
    assert_eq!(body["error"], "invalid_code");

    let resp = post(
        "/api/v1/auth/sms-login",
        json!({ "phone": phone, "code": code }),
    )
    .await
    .unwrap();
    let login = check_answer(&doc, "POST", "/api/v1/auth/sms-login", resp).await;
    let token = login["access_token"].as_str().unwrap().to_owned();
    assert!(login["user"]["last_login_at"].is_string());

    let resp = s
        .client
        .get(s.url("/api/v1/me"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    check_answer(&doc, "GET", "/api/v1/me", resp).await;
    let resp = s.client.get(s.url("/api/v1/me")).send().await.unwrap();
    let body = check_answer(&doc, "GET", "/api/v1/me", resp).await;
    assert_eq!(body["error"], "unauthorized");

    let resp = s
        .client
        .patch(s.url("/api/v1/me"))
        .bearer_auth(&token)
        .json(&json!({ "nickname": "Ada" }))
        .send()
        .await
        .unwrap();
    check_answer(&doc, "PATCH", "/api/v1/me", resp).await;
    // The session cookie from another site: 403.
    let resp = s
        .client
        .patch(s.url("/api/v1/me"))
        .header("cookie", format!("smsauth_session={token}"))
        .header("sec-fetch-site", "cross-site")
        .json(&json!({ "nickname": "Eve" }))
        .send()
        .await
        .unwrap();
    let body = check_answer(&doc, "PATCH", "/api/v1/me", resp).await;
    assert_eq!(body["error"], "forbidden");
    let resp = s
        .client
        .patch(s.url("/api/v1/me"))
        .bearer_auth(&token)
        .body("nickname=Ada")
        .send()
        .await
        .unwrap();
    let body = check_answer(&doc, "PATCH", "/api/v1/me", resp).await;
    assert_eq!(body["error"], "unsupported_media_type");

    let resp = s
        .client
        .get(s.url("/api/v1/auth/check"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    check_answer(&doc, "GET", "/api/v1/auth/check", resp).await;

    // Refresh, the session list, and ending a session.
    let resp = post(
        "/api/v1/auth/refresh",
        json!({ "refresh_token": login["refresh_token"] }),
    )
    .await
    .unwrap();
    let refreshed = check_answer(&doc, "POST", "/api/v1/auth/refresh", resp).await;
    assert!(refreshed["refresh_token"].is_string());
    let resp = post("/api/v1/auth/refresh", json!({ "refresh_token": "nope" }))
        .await
        .unwrap();
    let body = check_answer(&doc, "POST", "/api/v1/auth/refresh", resp).await;
    assert_eq!(body["error"], "invalid_refresh_token");
    let resp = s
        .client
        .get(s.url("/api/v1/me/sessions"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let list = check_answer(&doc, "GET", "/api/v1/me/sessions", resp).await;
    assert_eq!(list[0]["current"], true);
    let resp = s
        .client
        .delete(s.url("/api/v1/me/sessions/00000000000000000000000000000000"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let body = check_answer(&doc, "DELETE", "/api/v1/me/sessions/{id}", resp).await;
    assert_eq!(body["error"], "not_found");

    // Register with a password, in two steps: verify, then the ticket.
    let other = "13812349002";
    let resp = post(
        "/api/v1/sms/code",
        json!({ "phone": other, "purpose": "register" }),
    )
    .await
    .unwrap();
    check_answer(&doc, "POST", "/api/v1/sms/code", resp).await;
    let code = s.take_code(&common::e164(other));
    let resp = post(
        "/api/v1/auth/verify",
        json!({ "phone": other, "code": code, "purpose": "register" }),
    )
    .await
    .unwrap();
    let ticket = check_answer(&doc, "POST", "/api/v1/auth/verify", resp).await;
    let resp = post(
        "/api/v1/auth/register",
        json!({ "phone": other, "verification_token": ticket["verification_token"], "password": "correct horse" }),
    )
    .await
    .unwrap();
    let registered = check_answer(&doc, "POST", "/api/v1/auth/register", resp).await;
    assert_eq!(registered["created"], true);
    let resp = post(
        "/api/v1/auth/login",
        json!({ "phone": other, "password": "wrong horse" }),
    )
    .await
    .unwrap();
    let body = check_answer(&doc, "POST", "/api/v1/auth/login", resp).await;
    assert_eq!(body["error"], "invalid_credentials");
    let resp = post(
        "/api/v1/auth/login",
        json!({ "phone": other, "password": "correct horse" }),
    )
    .await
    .unwrap();
    let body = check_answer(&doc, "POST", "/api/v1/auth/login", resp).await;
    assert_eq!(body["user"]["login_methods"], json!(["sms", "password"]));

    // The account holder's own data: the activity, the export, a refused erase.
    let resp = s
        .client
        .get(s.url("/api/v1/me/activity"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let page = check_answer(&doc, "GET", "/api/v1/me/activity", resp).await;
    assert_eq!(page["activity"][0]["event"], "login");
    let resp = s
        .client
        .get(s.url("/api/v1/me/activity?before=x"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let body = check_answer(&doc, "GET", "/api/v1/me/activity", resp).await;
    assert_eq!(body["error"], "invalid_request");
    let resp = s
        .client
        .get(s.url("/api/v1/me/export"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let export = check_answer(&doc, "GET", "/api/v1/me/export", resp).await;
    assert_eq!(export["profile"]["phone"], common::e164(phone));
    let resp = s
        .client
        .post(s.url("/api/v1/me/delete"))
        .bearer_auth(&token)
        .json(&json!({ "code": "000000" }))
        .send()
        .await
        .unwrap();
    let body = check_answer(&doc, "POST", "/api/v1/me/delete", resp).await;
    assert_eq!(body["error"], "invalid_code");

    let resp = s
        .client
        .post(s.url("/api/v1/auth/logout"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    check_answer(&doc, "POST", "/api/v1/auth/logout", resp).await;
}
