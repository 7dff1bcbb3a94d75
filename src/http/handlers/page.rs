//! GET /: the login page, embedded in the binary (no CDN, no build step). Its script and
//! style are inline, allowed by their SHA-256 in a strict Content-Security-Policy, so the
//! page runs nothing and loads nothing it does not carry.

use std::sync::LazyLock;

use base64::Engine;
use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;
use sha2::{Digest, Sha256};

use crate::http::body::Resp;

const TEMPLATE: &str = include_str!("../../web/index.html");
const CSS: &str = include_str!("../../web/app.css");
const JS: &str = include_str!("../../web/app.js");
/// The whole text of the template's `<style>` and `<script>` elements.
const CSS_SLOT: &str = "/*APP_CSS*/";
const JS_SLOT: &str = "/*APP_JS*/";

struct Page {
    html: Bytes,
    csp: HeaderValue,
}

static PAGE: LazyLock<Page> = LazyLock::new(|| {
    let html = TEMPLATE.replacen(CSS_SLOT, CSS, 1).replacen(JS_SLOT, JS, 1);
    let csp = format!(
        "default-src 'none'; script-src '{}'; style-src '{}'; img-src data:; \
         connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        sha256_source(JS),
        sha256_source(CSS),
    );
    Page {
        html: Bytes::from(html),
        csp: HeaderValue::from_str(&csp).expect("the CSP is ASCII"),
    }
});

/// A CSP hash source: `sha256-<base64 of the digest>` of an inline element's text.
fn sha256_source(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    format!(
        "sha256-{}",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

pub fn index() -> Resp {
    let mut resp = Response::new(Full::new(PAGE.html.clone()));
    *resp.status_mut() = StatusCode::OK;
    let headers = resp.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert("content-security-policy", PAGE.csp.clone());
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    headers.insert("x-frame-options", HeaderValue::from_static("DENY"));
    // The page changes with the binary: revalidate, never serve a stale copy.
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_whole_elements_and_filled_once() {
        assert_eq!(TEMPLATE.matches(CSS_SLOT).count(), 1);
        assert_eq!(TEMPLATE.matches(JS_SLOT).count(), 1);
        assert!(TEMPLATE.contains(&format!("<style>{CSS_SLOT}</style>")));
        assert!(TEMPLATE.contains(&format!("<script>{JS_SLOT}</script>")));
        let html = std::str::from_utf8(&PAGE.html).unwrap();
        assert!(!html.contains(CSS_SLOT) && !html.contains(JS_SLOT));
        // Exactly one inline script and style: the ones the CSP hashes.
        assert_eq!(html.matches("<script").count(), 1);
        assert_eq!(html.matches("<style").count(), 1);
    }

    #[test]
    fn embedded_text_cannot_close_its_element_early() {
        assert!(!JS.to_ascii_lowercase().contains("</script"));
        assert!(!CSS.to_ascii_lowercase().contains("</style"));
    }

    #[test]
    fn no_inline_handlers_or_style_attributes() {
        // The CSP would block them: the page must not depend on them.
        let lower = TEMPLATE.to_ascii_lowercase();
        assert!(!lower.contains(" style="));
        assert!(!lower.contains(" onclick=") && !lower.contains(" onsubmit="));
    }

    #[test]
    fn csp_hashes_what_is_served() {
        let csp = PAGE.csp.to_str().unwrap();
        assert!(csp.contains(&format!("script-src '{}'", sha256_source(JS))));
        assert!(csp.contains(&format!("style-src '{}'", sha256_source(CSS))));
        assert!(csp.starts_with("default-src 'none';"));
    }
}
