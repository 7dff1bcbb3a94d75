//! The session cookie for browsers: set on login answers, cleared on logout, read where
//! a bearer token is accepted. A cookie rides along with requests other sites make, so a
//! state-changing request authenticated by it must prove it comes from our own origin.

use http::header::{COOKIE, HOST, HeaderValue, ORIGIN};
use http::{HeaderMap, Method};

use crate::config::TokenConfig;

/// The value of cookie `name`, if the request carries it.
pub fn read<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

fn attributes(cfg: &TokenConfig, max_age: u64) -> String {
    let mut attrs = format!("; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Lax");
    if !cfg.cookie_domain.is_empty() {
        attrs.push_str("; Domain=");
        attrs.push_str(&cfg.cookie_domain);
    }
    if cfg.cookie_secure {
        attrs.push_str("; Secure");
    }
    attrs
}

/// `Set-Cookie` for a new session.
pub fn set(cfg: &TokenConfig, token: &str, max_age: u64) -> HeaderValue {
    let value = format!("{}={token}{}", cfg.cookie_name, attributes(cfg, max_age));
    // Names and domains are checked at start-up; a JWT is base64url and dots.
    HeaderValue::from_str(&value).expect("a valid Set-Cookie value")
}

/// `Set-Cookie` that removes the session cookie.
pub fn clear(cfg: &TokenConfig) -> HeaderValue {
    HeaderValue::from_str(&format!("{}={}", cfg.cookie_name, attributes(cfg, 0)))
        .expect("a valid Set-Cookie value")
}

/// Only the refresh endpoint reads the refresh cookie.
const REFRESH_PATH: &str = "/api/v1/auth/refresh";

/// The refresh cookie's name: the session cookie's, then `_refresh`.
pub fn refresh_name(cfg: &TokenConfig) -> String {
    format!("{}_refresh", cfg.cookie_name)
}

/// The refresh cookie: HttpOnly, SameSite=Strict, sent to the refresh endpoint only.
fn refresh_cookie(cfg: &TokenConfig, value: &str, max_age: u64) -> HeaderValue {
    let mut cookie = format!(
        "{}={value}; Path={REFRESH_PATH}; Max-Age={max_age}; HttpOnly; SameSite=Strict",
        refresh_name(cfg)
    );
    if !cfg.cookie_domain.is_empty() {
        cookie.push_str("; Domain=");
        cookie.push_str(&cfg.cookie_domain);
    }
    if cfg.cookie_secure {
        cookie.push_str("; Secure");
    }
    // A refresh token is base64url; names and domains are checked at start-up.
    HeaderValue::from_str(&cookie).expect("a valid Set-Cookie value")
}

/// `Set-Cookie` for a new refresh token.
pub fn set_refresh(cfg: &TokenConfig, token: &str, max_age: u64) -> HeaderValue {
    refresh_cookie(cfg, token, max_age)
}

/// `Set-Cookie` that removes the refresh cookie.
pub fn clear_refresh(cfg: &TokenConfig) -> HeaderValue {
    refresh_cookie(cfg, "", 0)
}

/// The cookie that binds a WeChat login's `state` to the browser that started it.
pub const WECHAT_STATE: &str = "smsauth_wechat_state";
/// Only the callback reads it.
const WECHAT_STATE_PATH: &str = "/api/v1/auth/wechat/callback";

/// `Set-Cookie` for a WeChat state, valid `max_age` seconds (0 removes it). Lax, so the
/// top-level navigation back from WeChat carries it.
pub fn wechat_state(cfg: &TokenConfig, state: &str, max_age: u64) -> HeaderValue {
    let mut value = format!(
        "{WECHAT_STATE}={state}; Path={WECHAT_STATE_PATH}; Max-Age={max_age}; HttpOnly; SameSite=Lax"
    );
    if cfg.cookie_secure {
        value.push_str("; Secure");
    }
    // A state is hex digits (or empty, to clear).
    HeaderValue::from_str(&value).expect("a valid Set-Cookie value")
}

pub fn changes_state(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Whether the browser says the request comes from a page of our own origin: by
/// `Sec-Fetch-Site` (every current browser sends it), else by `Origin` against `Host`.
/// A request with neither is not trusted: browsers send one of them on every POST.
pub fn same_origin(headers: &HeaderMap) -> bool {
    let header = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    if let Some(site) = header("sec-fetch-site") {
        return site == "same-origin" || site == "none";
    }
    match (header(ORIGIN.as_str()), header(HOST.as_str())) {
        (Some(origin), Some(host)) => origin
            .split_once("://")
            .is_some_and(|(_, authority)| authority.eq_ignore_ascii_case(host)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn reads_the_named_cookie_among_others() {
        let h = headers(&[
            ("cookie", "a=1; smsauth_session=tok.en; b=2"),
            ("cookie", "c=3"),
        ]);
        assert_eq!(read(&h, "smsauth_session"), Some("tok.en"));
        assert_eq!(read(&h, "c"), Some("3"));
        assert_eq!(read(&h, "smsauth"), None);
    }

    #[test]
    fn set_and_clear_carry_the_attributes() {
        let cfg = TokenConfig {
            cookie_domain: "example.com".into(),
            ..Default::default()
        };
        let set = set(&cfg, "abc", 60);
        assert_eq!(
            set,
            "smsauth_session=abc; Path=/; Max-Age=60; HttpOnly; SameSite=Lax; Domain=example.com; Secure"
        );
        let insecure = TokenConfig {
            cookie_secure: false,
            ..Default::default()
        };
        assert_eq!(
            clear(&insecure),
            "smsauth_session=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax"
        );
    }

    #[test]
    fn the_refresh_cookie_is_strict_and_scoped_to_its_endpoint() {
        let cfg = TokenConfig::default();
        assert_eq!(
            set_refresh(&cfg, "abc", 60),
            "smsauth_session_refresh=abc; Path=/api/v1/auth/refresh; Max-Age=60; HttpOnly; SameSite=Strict; Secure"
        );
        assert_eq!(
            clear_refresh(&cfg),
            "smsauth_session_refresh=; Path=/api/v1/auth/refresh; Max-Age=0; HttpOnly; SameSite=Strict; Secure"
        );
    }

    #[test]
    fn same_origin_rules() {
        assert!(same_origin(&headers(&[("sec-fetch-site", "same-origin")])));
        assert!(!same_origin(&headers(&[
            ("sec-fetch-site", "cross-site"),
            ("origin", "https://a.example"),
            ("host", "a.example")
        ])));
        assert!(!same_origin(&headers(&[("sec-fetch-site", "same-site")])));
        assert!(same_origin(&headers(&[
            ("origin", "https://a.example:8443"),
            ("host", "A.example:8443")
        ])));
        assert!(!same_origin(&headers(&[
            ("origin", "https://evil.example"),
            ("host", "a.example")
        ])));
        assert!(!same_origin(&headers(&[
            ("origin", "null"),
            ("host", "a.example")
        ])));
        assert!(!same_origin(&headers(&[("host", "a.example")])));
    }
}
