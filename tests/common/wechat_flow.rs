//! The browser's side of a WeChat login, for tests: a server configured against the
//! WeChat stand-in (`wechat`), and each step as a browser takes it (the start, WeChat's
//! authorize page, the callback with the state cookie) and as the page goes on (the
//! ticket exchange, binding a phone).

use serde_json::{Value, json};

use super::TestServer;
use super::wechat::{WechatMock, WechatUser};

pub const APP_ID: &str = "wx_test_app_0001";
pub const APP_SECRET: &str = "app-secret-5b1c9e77d2";
pub const REDIRECT_URI: &str = "https://login.example.com/api/v1/auth/wechat/callback";
pub const TIMEOUT_SECS: u64 = 2;

/// A server with WeChat login on, against a fresh mock of WeChat.
pub async fn start(extra: &str) -> (TestServer, WechatMock) {
    let mock = WechatMock::start(APP_ID, APP_SECRET).await;
    mock.expect_redirect_uri(REDIRECT_URI);
    let server = TestServer::start(&wechat_config(&mock, extra)).await;
    (server, mock)
}

/// `[wechat]` on, against `mock`.
pub fn wechat_section(mock: &WechatMock) -> String {
    format!(
        "[wechat]\nenabled = true\napp_id = \"{APP_ID}\"\napp_secret = \"{APP_SECRET}\"\n\
         redirect_uri = \"{REDIRECT_URI}\"\nopen_base_url = \"{base}\"\napi_base_url = \"{base}\"\n\
         timeout_secs = {TIMEOUT_SECS}\n",
        base = mock.base_url()
    )
}

/// [`wechat_section`], codes that may be sent again at once (these tests send several to
/// one phone), and `extra`.
pub fn wechat_config(mock: &WechatMock, extra: &str) -> String {
    format!(
        "{}[code]\nresend_interval_secs = 0\n{extra}",
        wechat_section(mock)
    )
}

/// A browser: follows no redirect by itself, keeps the state cookie by hand.
pub fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

pub fn location(resp: &reqwest::Response) -> String {
    assert_eq!(resp.status(), 302, "expected a redirect");
    resp.headers()["location"].to_str().unwrap().to_owned()
}

/// The state cookie a response sets: its value ("" when it clears it).
pub fn state_cookie(resp: &reqwest::Response) -> Option<String> {
    resp.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| v.strip_prefix("smsauth_wechat_state="))
        .map(|v| v.split(';').next().unwrap_or("").to_owned())
}

/// A login started in the browser: WeChat's authorize URL and the state cookie.
pub struct Started {
    pub authorize: String,
    pub cookie: String,
}

pub async fn start_login(s: &TestServer, next: &str) -> Started {
    let url = s.url(&format!(
        "/api/v1/auth/wechat/start?next={}",
        percent_encoding::utf8_percent_encode(next, percent_encoding::NON_ALPHANUMERIC)
    ));
    let resp = browser().get(url).send().await.unwrap();
    let authorize = location(&resp);
    let cookie = state_cookie(&resp).expect("the start sets the state cookie");
    let set = resp.headers()["set-cookie"].to_str().unwrap();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Lax"),
        "{set}"
    );
    Started { authorize, cookie }
}

/// A link started from a session (POST /me/wechat with `next`): WeChat's authorize URL
/// and the state cookie the answer sets.
pub async fn start_link(s: &TestServer, token: &str, next: Option<&str>) -> Started {
    let body = match next {
        Some(next) => json!({ "next": next }),
        None => json!({}),
    };
    let resp = s
        .client
        .post(s.url("/api/v1/me/wechat"))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let cookie = state_cookie(&resp).expect("the link sets the state cookie");
    let answer: Value = resp.json().await.unwrap();
    Started {
        authorize: answer["url"].as_str().expect("the url to go to").to_owned(),
        cookie,
    }
}

/// The browser at WeChat's authorize page: where WeChat sends it back (our callback).
pub async fn at_wechat(s: &TestServer, authorize: &str) -> String {
    let resp = browser().get(authorize).send().await.unwrap();
    let back = location(&resp);
    let path = back
        .strip_prefix("https://login.example.com")
        .expect("WeChat sends the browser to the configured redirect_uri");
    s.url(path)
}

/// The callback with `cookie` (None: a browser without it); where it sends the browser.
pub async fn callback(url: &str, cookie: Option<&str>) -> String {
    let mut req = browser().get(url);
    if let Some(c) = cookie {
        req = req.header("cookie", format!("smsauth_wechat_state={c}"));
    }
    let resp = req.send().await.unwrap();
    assert_eq!(
        state_cookie(&resp).as_deref(),
        Some(""),
        "the callback clears the state cookie"
    );
    location(&resp)
}

/// `user` scans in a browser that started at `next`: where the page is sent after.
pub async fn scan(s: &TestServer, mock: &WechatMock, user: &WechatUser, next: &str) -> String {
    mock.scanner(user);
    let started = start_login(s, next).await;
    let back = at_wechat(s, &started.authorize).await;
    callback(&back, Some(&started.cookie)).await
}

/// The value of `key` in a redirect's fragment.
pub fn fragment<'a>(location: &'a str, key: &str) -> Option<&'a str> {
    let (_, fragment) = location.split_once('#')?;
    fragment.strip_prefix(key)?.strip_prefix('=')
}

pub async fn ticket_for(s: &TestServer, mock: &WechatMock, user: &WechatUser) -> String {
    let back = scan(s, mock, user, "/").await;
    fragment(&back, "wechat_ticket")
        .unwrap_or_else(|| panic!("no ticket in {back}"))
        .to_owned()
}

pub async fn exchange(s: &TestServer, ticket: &str) -> (u16, Value) {
    s.post("/api/v1/auth/wechat/exchange", json!({ "ticket": ticket }))
        .await
}

pub async fn bind(s: &TestServer, bind_token: &str, phone: &str, code: &str) -> (u16, Value) {
    s.post(
        "/api/v1/auth/wechat/bind",
        json!({ "bind_token": bind_token, "phone": phone, "code": code }),
    )
    .await
}

/// A WeChat user not yet bound: scan, exchange, and the bind token it gets.
pub async fn bind_token_for(s: &TestServer, mock: &WechatMock, user: &WechatUser) -> String {
    let ticket = ticket_for(s, mock, user).await;
    let (status, body) = exchange(s, &ticket).await;
    assert_eq!(
        (status, &body["phone_required"]),
        (200, &json!(true)),
        "{body}"
    );
    body["bind_token"].as_str().unwrap().to_owned()
}

/// Binds `user` to `phone` with a fresh SMS code: the token answer.
pub async fn bind_phone(
    s: &TestServer,
    mock: &WechatMock,
    user: &WechatUser,
    phone: &str,
) -> Value {
    let token = bind_token_for(s, mock, user).await;
    let code = s.send_code(phone, "login").await;
    let (status, body) = bind(s, &token, phone, &code).await;
    assert_eq!(status, 200, "{body}");
    body
}
