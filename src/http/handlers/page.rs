//! GET /: the login page, embedded in the binary (no CDN, no build step). Its script and
//! style are inline, allowed by their SHA-256 in a strict Content-Security-Policy, so the
//! page runs nothing and loads nothing it does not carry. With WeChat login on, a
//! second variant says so to the script in a `<meta>` and lets WeChat's avatar hosts
//! serve images; the script and style, and so their hashes, are the same in both.

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

/// Tells the script to offer WeChat login; inserted at the end of `<head>`.
const WECHAT_META: &str = "<meta name=\"smsauth-wechat\" content=\"on\">\n";
/// Tells the script that the site keeps sessions in cookies (`token.cookie`), so a
/// refresh by the refresh cookie can bring a session back after a browser restart.
const COOKIE_META: &str = "<meta name=\"smsauth-cookie\" content=\"on\">\n";
/// Where WeChat serves avatars (`headimgurl`): images only, over HTTPS.
const WECHAT_IMG_HOSTS: &str = "https://thirdwx.qlogo.cn https://wx.qlogo.cn";

struct Page {
    html: Bytes,
    csp: HeaderValue,
}

static PLAIN: LazyLock<Page> = LazyLock::new(|| build(false, false));
static WECHAT: LazyLock<Page> = LazyLock::new(|| build(true, false));
static PLAIN_COOKIE: LazyLock<Page> = LazyLock::new(|| build(false, true));
static WECHAT_COOKIE: LazyLock<Page> = LazyLock::new(|| build(true, true));

fn build(wechat: bool, cookie: bool) -> Page {
    let mut template = TEMPLATE.to_owned();
    if wechat {
        template = template.replacen("</head>", &format!("{WECHAT_META}</head>"), 1);
    }
    if cookie {
        template = template.replacen("</head>", &format!("{COOKIE_META}</head>"), 1);
    }
    let html = template.replacen(CSS_SLOT, CSS, 1).replacen(JS_SLOT, JS, 1);
    let img_src = match wechat {
        true => format!("data: {WECHAT_IMG_HOSTS}"),
        false => "data:".to_owned(),
    };
    let csp = format!(
        "default-src 'none'; script-src '{}'; style-src '{}'; img-src {img_src}; \
         connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        sha256_source(JS),
        sha256_source(CSS),
    );
    Page {
        html: Bytes::from(html),
        csp: HeaderValue::from_str(&csp).expect("the CSP is ASCII"),
    }
}

/// A CSP hash source: `sha256-<base64 of the digest>` of an inline element's text.
fn sha256_source(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    format!(
        "sha256-{}",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

/// The page; `wechat_enabled` picks the variant that offers WeChat login, `cookie` the
/// one that knows the site keeps sessions in cookies.
pub fn index(wechat_enabled: bool, cookie: bool) -> Resp {
    let page: &Page = match (wechat_enabled, cookie) {
        (false, false) => &PLAIN,
        (true, false) => &WECHAT,
        (false, true) => &PLAIN_COOKIE,
        (true, true) => &WECHAT_COOKIE,
    };
    let mut resp = Response::new(Full::new(page.html.clone()));
    *resp.status_mut() = StatusCode::OK;
    let headers = resp.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert("content-security-policy", page.csp.clone());
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
        for page in [&*PLAIN, &*WECHAT] {
            let html = std::str::from_utf8(&page.html).unwrap();
            assert!(!html.contains(CSS_SLOT) && !html.contains(JS_SLOT));
            // Exactly one inline script and style: the ones the CSP hashes.
            assert_eq!(html.matches("<script").count(), 1);
            assert_eq!(html.matches("<style").count(), 1);
        }
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
        for page in [&*PLAIN, &*WECHAT] {
            let csp = page.csp.to_str().unwrap();
            assert!(csp.contains(&format!("script-src '{}'", sha256_source(JS))));
            assert!(csp.contains(&format!("style-src '{}'", sha256_source(CSS))));
            assert!(csp.starts_with("default-src 'none';"));
        }
    }

    #[test]
    fn only_the_wechat_variant_offers_wechat() {
        assert_eq!(TEMPLATE.matches("</head>").count(), 1);
        let plain = std::str::from_utf8(&PLAIN.html).unwrap();
        let wechat = std::str::from_utf8(&WECHAT.html).unwrap();
        assert!(!plain.contains("<meta name=\"smsauth-wechat\""));
        assert!(wechat.contains(&format!("{WECHAT_META}</head>")));
        // The meta is all that differs.
        assert_eq!(wechat.replacen(WECHAT_META, "", 1), plain);
        let plain_csp = PLAIN.csp.to_str().unwrap();
        assert!(plain_csp.contains("img-src data:;") && !plain_csp.contains("qlogo"));
        let wechat_csp = WECHAT.csp.to_str().unwrap();
        assert!(wechat_csp.contains(&format!("img-src data: {WECHAT_IMG_HOSTS};")));
    }
}
