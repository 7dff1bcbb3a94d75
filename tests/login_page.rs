//! The login page at GET /: its headers and CSP over plain HTTP, then the page itself in
//! a real headless Chromium (driven over WebDriver) against the real server: code login,
//! an error in words, /me, logout, the password tab, the captcha, both languages, a
//! phone-sized screen, and WeChat login against a stand-in for WeChat's hosts.
//! Screenshots go to target/screenshots/.

mod common;

use base64::Engine;
use common::TestServer;
use common::webdriver::{Browser, browser_available, target_dir};
use common::wechat::{WechatMock, WechatUser};
use serde_json::json;
use sha2::{Digest, Sha256};

const INVALID_CODE_EN: &str = "The code is wrong or has expired.";

fn sha256_source(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    format!(
        "'sha256-{}'",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

/// The text between `open` and the next `close` in `html`.
fn between<'a>(html: &'a str, open: &str, close: &str) -> &'a str {
    let start = html.find(open).unwrap_or_else(|| panic!("no {open}")) + open.len();
    let len = html[start..]
        .find(close)
        .unwrap_or_else(|| panic!("no {close}"));
    &html[start..start + len]
}

#[tokio::test]
async fn page_is_served_with_a_strict_policy() {
    let s = TestServer::start("").await;
    let resp = s.client.get(s.url("/")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let h = resp.headers().clone();
    let header = |name: &str| {
        h.get(name)
            .unwrap_or_else(|| panic!("no {name} header"))
            .to_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(header("content-type"), "text/html; charset=utf-8");
    assert_eq!(header("x-content-type-options"), "nosniff");
    assert_eq!(header("referrer-policy"), "no-referrer");
    assert_eq!(header("cache-control"), "no-cache");
    let html = resp.text().await.unwrap();
    let csp = header("content-security-policy");
    let directives: Vec<&str> = csp.split(';').map(str::trim).collect();
    // The inline script and style run because, and only because, their hashes are listed.
    let script = between(&html, "<script>", "</script>");
    let style = between(&html, "<style>", "</style>");
    let script_src = format!("script-src {}", sha256_source(script));
    let style_src = format!("style-src {}", sha256_source(style));
    for d in [
        "default-src 'none'",
        &script_src,
        &style_src,
        "img-src data:",
        "connect-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    ] {
        assert!(directives.contains(&d), "CSP lacks {d:?}: {csp}");
    }
    assert!(!csp.contains("unsafe"), "{csp}");
    assert_eq!(html.matches("<script").count(), 1, "one inline script only");
    // What phones need to offer the code from the SMS.
    let code_input = between(&html, "<input id=\"code\"", ">");
    assert!(code_input.contains("autocomplete=\"one-time-code\""));
    assert!(code_input.contains("inputmode=\"numeric\""));
    assert!(html.contains("name=\"viewport\""));

    // Only GET: the page has no form that posts to it.
    let (status, body) = s.post("/", json!({})).await;
    assert_eq!(status, 405, "{body}");
}

/// The documented flow in the browser: a code by SMS (read from the server's log), a
/// wrong code shown in words, the right one, the account from /me, logout.
#[tokio::test]
async fn code_login_in_a_real_browser() {
    if !browser_available("code_login_in_a_real_browser") {
        return;
    }
    let s = TestServer::start("").await;
    let b = Browser::start(1200, 900).await;
    let shots = target_dir().join("screenshots");
    b.goto(&s.url("/")).await;
    b.wait_displayed("#login-form", true).await;
    assert_eq!(b.text("#title").await, "Log in");
    assert!(!b.displayed("#captcha-row").await, "captcha is off");

    b.type_into("#phone", "138 1234 5678").await;
    b.click("#send-code").await;
    b.wait_text("#message", "code sent", |t| t.starts_with("Code sent."))
        .await;
    // The countdown of seed 004, from the server's resend_after (60 s by default).
    let countdown = b
        .wait_text("#send-code", "a countdown", |t| t.starts_with("Resend in"))
        .await;
    let secs: u32 = countdown
        .trim_start_matches("Resend in ")
        .trim_end_matches(" s")
        .parse()
        .unwrap_or_else(|_| panic!("countdown text {countdown:?}"));
    assert!((55..=60).contains(&secs), "{countdown}");
    let disabled = b
        .execute(
            "return document.getElementById('send-code').disabled",
            json!([]),
        )
        .await;
    assert_eq!(disabled, true, "no second send during the countdown");
    let code = s.take_code("+8613812345678");
    b.screenshot(&shots.join("login-form.png")).await;

    // A wrong code: the invalid_code error in words.
    let wrong: String = code
        .chars()
        .map(|c| if c == '9' { '0' } else { (c as u8 + 1) as char })
        .collect();
    b.type_into("#code", &wrong).await;
    b.click("#submit").await;
    b.wait_text("#message", "the invalid_code message", |t| {
        t == INVALID_CODE_EN
    })
    .await;
    assert!(b.displayed("#login-form").await);
    b.screenshot(&shots.join("login-error.png")).await;

    b.type_into("#code", &code).await;
    b.click("#submit").await;
    b.wait_displayed("#account-view", true).await;
    assert!(!b.displayed("#login-view").await);
    assert_eq!(b.text("#acct-phone").await, "+8613812345678");
    assert_eq!(b.text("#acct-nickname").await, "138****5678");
    assert_eq!(b.text("#acct-methods").await, "SMS code");
    assert_eq!(
        b.text("#welcome").await,
        "Your account is ready. Welcome, 138****5678."
    );
    assert_eq!(b.text("#title").await, "Your account");
    assert_eq!(b.text("#message").await, "", "the old error is gone");
    // The page shows what /me says for its token.
    let token = b
        .execute("return sessionStorage.getItem('smsauth.token')", json!([]))
        .await;
    let token = token
        .as_str()
        .expect("the token is kept for the tab")
        .to_owned();
    let (status, me) = s.get("/api/v1/me", Some(&token)).await;
    assert_eq!(status, 200);
    assert_eq!(b.text("#acct-id").await, me["id"].to_string());
    b.screenshot(&shots.join("login-page.png")).await;
    if std::env::var("UPDATE_LOGIN_PAGE_PICTURE").as_deref() == Ok("1") {
        let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
        std::fs::create_dir_all(&docs).unwrap();
        std::fs::copy(shots.join("login-form.png"), docs.join("login-page.png")).unwrap();
    }

    // A reload keeps the session (sessionStorage lives as long as the tab).
    b.goto(&s.url("/")).await;
    b.wait_text("#acct-phone", "the phone again", |t| t == "+8613812345678")
        .await;

    b.click("#logout").await;
    b.wait_displayed("#login-form", true).await;
    assert!(!b.displayed("#account-view").await);
    assert_eq!(b.text("#message").await, "You are logged out.");
    let left = b
        .execute("return sessionStorage.getItem('smsauth.token')", json!([]))
        .await;
    assert!(left.is_null(), "token forgotten: {left}");
    // The logout reached the server: that token is refused now.
    let (status, _) = s.get("/api/v1/me", Some(&token)).await;
    assert_eq!(status, 401);
    b.quit().await;
}

/// The password tab: register with a code and a nickname, log out, log in by password,
/// reset the password with a code, log in with the new one. The old one is refused in
/// words. Also the page in Chinese, switched by hand and remembered across a reload.
#[tokio::test]
async fn password_tab_and_chinese_in_a_real_browser() {
    if !browser_available("password_tab_and_chinese_in_a_real_browser") {
        return;
    }
    let s = TestServer::start("[code]\nresend_interval_secs = 0\n").await;
    let b = Browser::start(1200, 900).await;
    b.goto(&s.url("/")).await;
    b.wait_displayed("#login-form", true).await;

    b.click("#tab-password").await;
    b.wait_displayed("#password-modes", true).await;
    // Password login needs no code.
    assert!(!b.displayed("#code").await);
    assert!(b.displayed("#password").await);
    b.click("#mode-register").await;
    b.wait_displayed("#nickname", true).await;
    assert_eq!(b.text("#submit").await, "Create account");
    b.type_into("#phone", "13912345678").await;
    b.click("#send-code").await;
    b.wait_text("#message", "code sent", |t| t.starts_with("Code sent."))
        .await;
    let code = s.take_code("+8613912345678");
    b.type_into("#code", &code).await;
    b.type_into("#password", "short").await;
    b.type_into("#nickname", "小红").await;
    b.click("#submit").await;
    b.wait_text("#message", "the weak_password message", |t| {
        t.starts_with("The password must be 8 to 128 characters")
    })
    .await;
    b.type_into("#password", "correct horse battery").await;
    b.click("#submit").await;
    b.wait_text("#acct-nickname", "the nickname", |t| t == "小红")
        .await;
    assert_eq!(b.text("#acct-phone").await, "+8613912345678");
    assert_eq!(b.text("#acct-methods").await, "SMS code, Password");
    b.click("#logout").await;
    b.wait_displayed("#login-form", true).await;

    // The page remembers the last password mode; log in by password.
    b.click("#tab-sms").await;
    b.click("#tab-password").await;
    b.click("#mode-pwlogin").await;
    b.type_into("#phone", "13912345678").await;
    b.type_into("#password", "correct horse battery").await;
    b.click("#submit").await;
    b.wait_text("#welcome", "the welcome", |t| t == "Welcome, 小红.")
        .await;
    b.click("#logout").await;
    b.wait_displayed("#login-form", true).await;

    // Reset, in Chinese.
    b.click("#lang-switch").await;
    b.wait_text("#title", "the Chinese title", |t| t == "登录")
        .await;
    assert_eq!(b.text("#lang-switch").await, "English");
    b.goto(&s.url("/")).await;
    b.wait_text("#title", "Chinese after a reload", |t| t == "登录")
        .await;
    let lang = b
        .execute("return document.documentElement.lang", json!([]))
        .await;
    assert_eq!(lang, "zh-CN");
    b.click("#tab-password").await;
    b.click("#mode-reset").await;
    b.wait_text("#submit", "the reset button", |t| t == "设置新密码")
        .await;
    b.type_into("#phone", "13912345678").await;
    b.click("#send-code").await;
    b.wait_text("#message", "code sent", |t| t.starts_with("验证码已发送"))
        .await;
    let code = s.take_code("+8613912345678");
    b.type_into("#code", &code).await;
    b.type_into("#password", "a brand new secret").await;
    b.screenshot(&target_dir().join("screenshots/reset-zh.png"))
        .await;
    b.click("#submit").await;
    b.wait_text("#message", "the reset message", |t| {
        t == "密码已修改，请用新密码登录。"
    })
    .await;
    // The page went to password login; the old password is refused, in words.
    assert!(!b.displayed("#code").await);
    b.type_into("#password", "correct horse battery").await;
    b.click("#submit").await;
    b.wait_text("#message", "invalid_credentials in Chinese", |t| {
        t == "手机号或密码错误。"
    })
    .await;
    b.type_into("#password", "a brand new secret").await;
    b.click("#submit").await;
    b.wait_text("#acct-nickname", "the account", |t| t == "小红")
        .await;
    assert_eq!(b.text("#acct-methods").await, "短信验证码、密码");
    b.quit().await;
}

/// With `captcha.required`, the page shows the captcha when the server asks for it and
/// says so; a wrong answer is refused in words and the picture is replaced.
#[tokio::test]
async fn captcha_in_a_real_browser() {
    if !browser_available("captcha_in_a_real_browser") {
        return;
    }
    let s = TestServer::start("[captcha]\nrequired = true\n").await;
    let b = Browser::start(1200, 900).await;
    b.goto(&s.url("/")).await;
    b.wait_displayed("#login-form", true).await;
    assert!(!b.displayed("#captcha-row").await);
    b.type_into("#phone", "13812345678").await;
    b.click("#send-code").await;
    b.wait_text("#message", "the captcha_required message", |t| {
        t == "Type the characters shown in the picture first."
    })
    .await;
    b.wait_displayed("#captcha-row", true).await;
    let src = "return document.getElementById('captcha-image').src";
    let first = wait_for_image(&b, src, None).await;
    b.screenshot(&target_dir().join("screenshots/captcha.png"))
        .await;
    // Nothing was sent.
    assert!(
        !s.log_lines()
            .iter()
            .any(|l| l["message"] == "verification code (log sender)")
    );

    b.type_into("#captcha-answer", "wrong").await;
    b.click("#send-code").await;
    b.wait_text("#message", "the captcha_invalid message", |t| {
        t.starts_with("The characters did not match the picture")
    })
    .await;
    // A captcha is single use: the page fetched a new one.
    wait_for_image(&b, src, Some(&first)).await;
    b.quit().await;
}

/// Waits until the captcha image is a data: PNG other than `not`; returns its src.
async fn wait_for_image(b: &Browser, script: &str, not: Option<&str>) -> String {
    let deadline = std::time::Instant::now() + common::webdriver::WAIT;
    loop {
        let src = b.execute(script, json!([])).await;
        let src = src.as_str().unwrap_or_default();
        if src.starts_with("data:image/png;base64,") && Some(src) != not {
            return src.to_owned();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no new captcha image; src {src:.60}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// On a phone-sized screen the page fits the width (no sideways scrolling), every
/// control is a large tap target, and it still logs in.
#[tokio::test]
async fn phone_sized_screen_in_a_real_browser() {
    if !browser_available("phone_sized_screen_in_a_real_browser") {
        return;
    }
    let s = TestServer::start("").await;
    let b = Browser::start(390, 844).await;
    let shots = target_dir().join("screenshots");
    b.set_window_size(390, 844).await;
    b.goto(&s.url("/")).await;
    b.wait_displayed("#login-form", true).await;
    let width = b.execute("return window.innerWidth", json!([])).await;
    assert!(
        width.as_u64().unwrap() <= 400,
        "a phone-sized viewport: {width}"
    );
    b.type_into("#phone", "13812345679").await;
    b.click("#send-code").await;
    b.wait_text("#send-code", "a countdown", |t| t.starts_with("Resend in"))
        .await;
    let layout = b
        .execute(
            "const small = [...document.querySelectorAll('button, input')]
               .filter((e) => e.offsetParent !== null)
               .map((e) => [e.id, e.getBoundingClientRect().height])
               .filter(([, h]) => h < 44);
             return { fits: document.documentElement.scrollWidth <= window.innerWidth,
                      small: small };",
            json!([]),
        )
        .await;
    assert_eq!(layout["fits"], true, "no sideways scrolling: {layout}");
    assert_eq!(
        layout["small"],
        json!([]),
        "tap targets under 44 px: {layout}"
    );
    b.screenshot(&shots.join("login-form-phone.png")).await;

    let code = s.take_code("+8613812345679");
    b.type_into("#code", &code).await;
    b.click("#submit").await;
    b.wait_text("#acct-phone", "the account", |t| t == "+8613812345679")
        .await;
    let fits = b
        .execute(
            "return document.documentElement.scrollWidth <= window.innerWidth",
            json!([]),
        )
        .await;
    assert_eq!(fits, true, "the account view fits too");
    b.screenshot(&shots.join("login-page-phone.png")).await;
    b.quit().await;
}

/// WeChat must be told the server's callback URL before the server starts, but the
/// harness starts servers on an ephemeral port (SMSAUTH_SERVER__LISTEN=127.0.0.1:0, and
/// variables override the file). So the callback URL names this relay, on a port known
/// in advance, which redirects every request to the same path and query on `target`
/// once that is set. Cookies do not depend on the port: the browser's state cookie for
/// 127.0.0.1 reaches the real callback. Returns the relay's base URL.
async fn start_relay(target: std::sync::Arc<std::sync::OnceLock<String>>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let base = target.get().expect("the relay's target is set");
                        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
                        let resp = hyper::Response::builder()
                            .status(302)
                            .header("location", format!("{base}{path}"))
                            .body(http_body_util::Full::new(bytes::Bytes::new()))
                            .unwrap();
                        async move { Ok::<_, std::convert::Infallible>(resp) }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

/// A server with WeChat login on, against a fresh WeChat stand-in that checks the
/// callback URL it is sent.
async fn wechat_server() -> (TestServer, WechatMock) {
    let mock = WechatMock::start("wxtest", "secret").await;
    let target = std::sync::Arc::new(std::sync::OnceLock::new());
    let relay = start_relay(target.clone()).await;
    let callback = format!("{relay}/api/v1/auth/wechat/callback");
    mock.expect_redirect_uri(&callback);
    let wechat = mock.base_url();
    let s = TestServer::start(&format!(
        "[wechat]\nenabled = true\napp_id = \"wxtest\"\napp_secret = \"secret\"\n\
         redirect_uri = \"{callback}\"\nopen_base_url = \"{wechat}\"\n\
         api_base_url = \"{wechat}\"\nidentity = \"unionid\"\n"
    ))
    .await;
    target.set(s.base.clone()).unwrap();
    (s, mock)
}

async fn location_hash(b: &Browser) -> String {
    let hash = b.execute("return location.hash", json!([])).await;
    hash.as_str().unwrap_or_default().to_owned()
}

async fn tab_token(b: &Browser) -> String {
    let token = b
        .execute("return sessionStorage.getItem('smsauth.token')", json!([]))
        .await;
    token.as_str().expect("a token for the tab").to_owned()
}

/// What /me lists as the account's login methods.
async fn methods(s: &TestServer, token: &str) -> Vec<String> {
    let (status, me) = s.get("/api/v1/me", Some(token)).await;
    assert_eq!(status, 200, "{me}");
    me["login_methods"]
        .as_array()
        .expect("login_methods")
        .iter()
        .map(|m| m.as_str().unwrap().to_owned())
        .collect()
}

/// With WeChat on, the page carries the meta that turns the button on, and may show
/// avatars from WeChat's image hosts; the script and style (and their hashes) are the
/// same as without.
#[tokio::test]
async fn wechat_page_variant_over_http() {
    let (s, _mock) = wechat_server().await;
    let resp = s.client.get(s.url("/")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let csp = resp.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    let html = resp.text().await.unwrap();
    assert!(html.contains("<meta name=\"smsauth-wechat\" content=\"on\">"));
    let script = between(&html, "<script>", "</script>");
    let style = between(&html, "<style>", "</style>");
    let directives: Vec<&str> = csp.split(';').map(str::trim).collect();
    for d in [
        format!("script-src {}", sha256_source(script)),
        format!("style-src {}", sha256_source(style)),
        "img-src data: https://thirdwx.qlogo.cn https://wx.qlogo.cn".to_owned(),
        "connect-src 'self'".to_owned(),
    ] {
        assert!(directives.contains(&d.as_str()), "CSP lacks {d:?}: {csp}");
    }
}

/// WeChat login in the browser: a refusal and bad fragments in words; a first scan asks
/// for a phone (bound with an SMS code, which makes the account); after logout a scan
/// logs straight in to it. Then unlink and link again from the account view.
#[tokio::test]
async fn wechat_login_in_a_real_browser() {
    if !browser_available("wechat_login_in_a_real_browser") {
        return;
    }
    let (s, mock) = wechat_server().await;
    let user = WechatUser::new("page");
    mock.scanner(&user);
    let b = Browser::start(1200, 900).await;
    let shots = target_dir().join("screenshots");

    // What the callback can send back, in words, and gone from the address at once.
    // (Each on a new query: a change of fragment alone would not load the page again.)
    for (i, (fragment, text)) in [
        (
            "wechat_error=wechat_state_invalid",
            "The WeChat login expired or was started in another browser. Try again.",
        ),
        (
            "wechat_error=no_such_code",
            "The WeChat login did not succeed. Try again.",
        ),
        (
            "wechat_ticket=not-a-ticket",
            "The WeChat login expired. Log in with WeChat again.",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        b.goto(&s.url(&format!("/?try={i}#{fragment}"))).await;
        b.wait_text("#message", fragment, |t| t == text).await;
        assert!(b.displayed("#login-form").await);
        assert_eq!(
            location_hash(&b).await,
            "",
            "{fragment} left in the address"
        );
    }

    // The user says no at WeChat.
    assert_eq!(b.text("#wechat-login").await, "Log in with WeChat");
    b.screenshot(&shots.join("wechat-login-form.png")).await;
    mock.refuse_next();
    b.click("#wechat-login").await;
    b.wait_text("#message", "the wechat_denied message", |t| {
        t == "The WeChat login was cancelled."
    })
    .await;
    assert_eq!(location_hash(&b).await, "");

    // A scan: start, WeChat, the callback, back to the page with a ticket. No account
    // has this WeChat user yet, so the page asks for a phone.
    b.click("#wechat-login").await;
    b.wait_displayed("#wechat-bind", true).await;
    assert_eq!(b.text("#title").await, "Bind your phone");
    assert_eq!(b.text("#bind-nickname").await, user.nickname);
    assert_eq!(b.text("#submit").await, "Bind and log in");
    assert!(!b.displayed("#tabs").await);
    assert!(!b.displayed("#wechat-login").await);
    assert!(!b.displayed("#password").await);
    assert_eq!(
        location_hash(&b).await,
        "",
        "the used ticket is out of the address"
    );
    // WeChat's image host is out of reach here: a picture that does not load is hidden.
    assert!(!b.displayed("#bind-avatar").await);
    b.type_into("#phone", "13700001111").await;
    b.click("#send-code").await;
    b.wait_text("#message", "code sent", |t| t.starts_with("Code sent."))
        .await;
    b.wait_text("#send-code", "a countdown", |t| t.starts_with("Resend in"))
        .await;
    let code = s.take_code("+8613700001111");
    b.type_into("#code", &code).await;
    b.screenshot(&shots.join("wechat-bind.png")).await;
    b.click("#submit").await;
    b.wait_text("#acct-phone", "the bound phone", |t| t == "+8613700001111")
        .await;
    assert_eq!(
        b.text("#welcome").await,
        format!("Your account is ready. Welcome, {}.", user.nickname)
    );
    assert_eq!(b.text("#acct-nickname").await, user.nickname);
    assert_eq!(b.text("#acct-methods").await, "SMS code, WeChat");
    assert_eq!(b.text("#acct-wechat").await, "Linked");
    assert!(b.displayed("#wechat-unlink").await);
    assert!(!b.displayed("#wechat-link").await);
    assert!(!b.displayed("#acct-avatar").await);
    let token = tab_token(&b).await;
    assert!(methods(&s, &token).await.contains(&"wechat".to_owned()));
    let id = b.text("#acct-id").await;
    b.screenshot(&shots.join("wechat-account.png")).await;

    // Logged out, a scan again: straight into the same account, no bind form.
    b.click("#logout").await;
    b.wait_displayed("#login-form", true).await;
    b.click("#wechat-login").await;
    let welcome = format!("Welcome, {}.", user.nickname);
    b.wait_text("#welcome", "welcome back", |t| t == welcome)
        .await;
    assert_eq!(b.text("#acct-id").await, id);
    assert_eq!(b.text("#acct-phone").await, "+8613700001111");
    assert!(!b.displayed("#wechat-bind").await);
    assert_eq!(location_hash(&b).await, "");

    // Unlink from the account view.
    b.click("#wechat-unlink").await;
    b.wait_text("#acct-wechat", "not linked", |t| t == "Not linked")
        .await;
    assert_eq!(
        b.text("#message").await,
        "WeChat is no longer linked to your account."
    );
    assert_eq!(b.text("#acct-methods").await, "SMS code");
    assert!(b.displayed("#wechat-link").await);
    let token = tab_token(&b).await;
    assert!(!methods(&s, &token).await.contains(&"wechat".to_owned()));

    // Link again from the session: a round trip to WeChat, back with #wechat_linked=1.
    b.click("#wechat-link").await;
    b.wait_text("#message", "the linked message", |t| {
        t == "WeChat is linked to your account. You can log in with it now."
    })
    .await;
    assert_eq!(b.text("#acct-wechat").await, "Linked");
    assert_eq!(location_hash(&b).await, "");
    assert!(
        methods(&s, &tab_token(&b).await)
            .await
            .contains(&"wechat".to_owned())
    );

    // The same controls in Chinese.
    b.click("#lang-switch").await;
    b.wait_text("#wechat-unlink", "the Chinese unlink button", |t| {
        t == "解除绑定"
    })
    .await;
    assert_eq!(b.text("#acct-wechat").await, "已绑定");
    assert_eq!(b.text("#acct-methods").await, "短信验证码、微信");
    b.click("#logout").await;
    b.wait_text("#wechat-login", "the Chinese WeChat button", |t| {
        t == "微信登录"
    })
    .await;
    b.quit().await;
}

/// With WeChat off (the default) the page has no WeChat button, and no meta or avatar
/// hosts that would allow one.
#[tokio::test]
async fn no_wechat_button_when_wechat_is_off() {
    let s = TestServer::start("").await;
    let resp = s.client.get(s.url("/")).send().await.unwrap();
    let csp = resp.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    let html = resp.text().await.unwrap();
    assert!(!html.contains("<meta name=\"smsauth-wechat\""));
    assert!(!csp.contains("qlogo"), "{csp}");
    if !browser_available("no_wechat_button_when_wechat_is_off") {
        return;
    }
    let b = Browser::start(1200, 900).await;
    b.goto(&s.url("/")).await;
    b.wait_displayed("#login-form", true).await;
    assert!(!b.displayed("#wechat-login").await);
    // A fragment as if from WeChat changes nothing but a message; there is still no button.
    b.goto(&s.url("/?again#wechat_error=wechat_denied")).await;
    b.wait_text("#message", "the wechat_denied message", |t| {
        t == "The WeChat login was cancelled."
    })
    .await;
    assert!(!b.displayed("#wechat-login").await);
    b.quit().await;
}

/// The page logged in by code in `b`; the tab's access token.
async fn page_login(b: &Browser, s: &TestServer, phone: &str) -> String {
    b.goto(&s.url("/")).await;
    b.wait_displayed("#login-form", true).await;
    b.type_into("#phone", phone).await;
    b.click("#send-code").await;
    b.wait_text("#message", "code sent", |t| !t.is_empty())
        .await;
    let code = s.take_code(&common::e164(phone));
    b.type_into("#code", &code).await;
    b.click("#submit").await;
    b.wait_displayed("#account-view", true).await;
    tab_value(b, "smsauth.token").await
}

async fn tab_value(b: &Browser, key: &str) -> String {
    let v = b
        .execute("return sessionStorage.getItem(arguments[0])", json!([key]))
        .await;
    v.as_str().unwrap_or("").to_owned()
}

/// The account view lists the sessions: this device marked, the others each with a
/// button that logs it out, and "log out everywhere else"; in both languages. The page
/// refreshes its tokens before the access token expires.
#[tokio::test]
async fn sessions_and_refresh_in_a_real_browser() {
    if !browser_available("sessions_and_refresh_in_a_real_browser") {
        return;
    }
    let s =
        TestServer::start("[code]\nresend_interval_secs = 0\n[token]\naccess_ttl_secs = 6\n").await;
    let b = Browser::start(1200, 900).await;
    let phone = "13812347101";
    let other = s.sms_login(phone).await;
    let third = s.sms_login(phone).await;
    let token = page_login(&b, &s, phone).await;
    b.wait_text("#sessions", "three sessions", |t| {
        t.matches("Log out this device").count() == 2
    })
    .await;
    assert!(b.text("#sessions").await.contains("This device"));
    assert!(b.displayed("#logout-others").await);

    // Log out one other device by its button: its tokens are refused.
    let other_sid = {
        let part = other["access_token"]
            .as_str()
            .unwrap()
            .split('.')
            .nth(1)
            .unwrap();
        let claims: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(part)
                .unwrap(),
        )
        .unwrap();
        claims["sid"].as_str().unwrap().to_owned()
    };
    b.click(&format!("li[data-session='{other_sid}'] button"))
        .await;
    b.wait_text("#message", "ended", |t| t == "That device is logged out.")
        .await;
    let (status, _) = s.get("/api/v1/me", other["access_token"].as_str()).await;
    assert_eq!(status, 401);

    // In Chinese, then everywhere else.
    b.click("#lang-switch").await;
    b.wait_text("#logout-others", "Chinese", |t| t == "退出其他所有设备")
        .await;
    b.wait_text("#sessions", "Chinese list", |t| {
        t.contains("本设备") && t.contains("退出此设备")
    })
    .await;
    b.click("#logout-others").await;
    b.wait_text("#message", "others ended", |t| {
        t == "其他设备均已退出登录。"
    })
    .await;
    assert!(!b.displayed("#logout-others").await, "one session left");
    let (status, _) = s.get("/api/v1/me", third["access_token"].as_str()).await;
    assert_eq!(status, 401);

    // Before the 6 s access token runs out, the page trades its refresh token.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let refreshed = loop {
        let now = tab_value(&b, "smsauth.token").await;
        if now != token && !now.is_empty() {
            break now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the page never refreshed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    let (status, _) = s.get("/api/v1/me", Some(&refreshed)).await;
    assert_eq!(status, 200);
    assert!(b.displayed("#account-view").await);
    b.quit().await;
}

/// With the site's cookies on, a new browser session (sessionStorage gone, the access
/// cookie expired) comes back logged in through the refresh cookie; without cookies it
/// does not (sessionStorage is the tab's only).
#[tokio::test]
async fn the_refresh_cookie_outlives_the_tab_in_a_real_browser() {
    if !browser_available("the_refresh_cookie_outlives_the_tab_in_a_real_browser") {
        return;
    }
    let s = TestServer::start(
        "[code]\nresend_interval_secs = 0\n[token]\ncookie = true\ncookie_secure = false\naccess_ttl_secs = 1\n",
    )
    .await;
    let b = Browser::start(1200, 900).await;
    let phone = "13812347102";
    page_login(&b, &s, phone).await;
    // What a browser restart leaves: the cookies, not the tab's storage.
    b.execute("sessionStorage.clear(); return null", json!([]))
        .await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        b.goto(&s.url("/")).await;
        b.wait_displayed("#account-view", true).await;
        let by_cookie = s.log_lines().iter().any(|l| {
            l["path"] == "/api/v1/auth/refresh" && l["status"] == 200 && l["message"] == "request"
        });
        if by_cookie {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no refresh by the cookie"
        );
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    assert_eq!(b.text("#acct-phone").await, common::e164(phone));

    // Without cookies the same page starts logged out.
    let plain = TestServer::start("[code]\nresend_interval_secs = 0\n").await;
    page_login(&b, &plain, "13812347103").await;
    b.execute("sessionStorage.clear(); return null", json!([]))
        .await;
    b.goto(&plain.url("/")).await;
    b.wait_displayed("#login-form", true).await;
    b.quit().await;
}

/// The account view's own data: the activity list (in both languages), "Download my
/// data", and "Delete my account" with its code step and its confirmation, after which
/// the account is gone and the page is back at the login form.
#[tokio::test]
async fn activity_export_and_delete_in_a_real_browser() {
    if !browser_available("activity_export_and_delete_in_a_real_browser") {
        return;
    }
    let s = TestServer::start("[code]\nresend_interval_secs = 0\n").await;
    let b = Browser::start(1200, 1400).await;
    let shots = target_dir().join("screenshots");
    let phone = "13812347201";
    let earlier = s.sms_login(phone).await;
    let (status, _) = s
        .post_auth(
            "/api/v1/auth/logout",
            earlier["access_token"].as_str().unwrap(),
            json!({}),
        )
        .await;
    assert_eq!(status, 204);
    let token = page_login(&b, &s, phone).await;
    b.wait_text("#activity", "three entries", |t| {
        t.matches("Logged in with SMS code").count() == 2 && t.contains("Logged out")
    })
    .await;
    assert!(b.text("#activity").await.contains("127.0.0.0/24"));
    assert!(!b.displayed("#activity-more").await, "one page only");

    b.click("#export").await;
    b.wait_text("#message", "exported", |t| {
        t == "Your data is downloaded (smsauth-export.json)."
    })
    .await;

    b.click("#lang-switch").await;
    b.wait_text("#activity", "Chinese activity", |t| {
        t.contains("通过短信验证码登录") && t.contains("退出登录")
    })
    .await;
    assert_eq!(b.text("#delete-start").await, "注销账户");
    assert_eq!(b.text("#export").await, "下载我的数据");
    b.click("#lang-switch").await;

    // The code step, then the confirmation: without the box ticked nothing is deleted.
    assert!(!b.displayed("#delete-panel").await);
    b.click("#delete-start").await;
    b.wait_displayed("#delete-panel", true).await;
    assert!(b.text("#delete-lead").await.contains("+8613812347201"));
    b.click("#delete-send").await;
    b.wait_text("#message", "code sent", |t| t.starts_with("Code sent."))
        .await;
    let code = s.take_code(&common::e164(phone));
    b.type_into("#delete-code", &code).await;
    b.click("#delete-account").await;
    b.wait_text("#message", "asks for the box", |t| {
        t == "Tick the box to confirm that you want your account deleted."
    })
    .await;
    assert_eq!(
        s.get("/api/v1/me", Some(&token)).await.0,
        200,
        "not deleted yet"
    );
    b.screenshot(&shots.join("delete-account.png")).await;
    b.click("#delete-confirm").await;
    b.click("#delete-account").await;
    b.wait_text("#message", "deleted", |t| t == "Your account is deleted.")
        .await;
    b.wait_displayed("#login-form", true).await;
    assert_eq!(s.get("/api/v1/me", Some(&token)).await.0, 401);
    assert_eq!(
        tab_value(&b, "smsauth.token").await,
        "",
        "the tab forgot its token"
    );
    let again = s.sms_login(phone).await;
    assert_eq!(again["created"], true, "the phone is new again");
    b.quit().await;
}
