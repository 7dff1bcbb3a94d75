//! A local stand-in for WeChat's OAuth hosts, open.weixin.qq.com (the authorize pages)
//! and api.weixin.qq.com (code exchange, user info), both on one ephemeral loopback port.
//! It checks every request the way WeChat does, so a test fails when the server under
//! test builds a URL WeChat would refuse; the authorize pages answer at once with the
//! redirect WeChat sends after the user has scanned and agreed.
//!
//! Dead code is allowed by `common/mod.rs`, which covers this module too.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use percent_encoding::percent_decode_str;
use rand::RngExt;
use serde_json::{Value, json};

/// WeChat refuses codes older than five minutes.
const CODE_LIFETIME_SECS: u64 = 300;
/// WeChat's limit on `state`.
const MAX_STATE_LEN: usize = 128;

/// A WeChat account that "scans" the QR code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WechatUser {
    pub openid: String,
    pub unionid: Option<String>,
    pub nickname: String,
    pub headimgurl: String,
}

impl WechatUser {
    /// A fresh user: random ids, so users of different tests never collide.
    pub fn new(tag: &str) -> Self {
        WechatUser {
            openid: format!("o_{tag}_{}", random_hex()),
            unionid: Some(format!("u_{tag}_{}", random_hex())),
            nickname: format!("微信{tag}"),
            headimgurl: format!("https://thirdwx.qlogo.cn/mmopen/{tag}/132"),
        }
    }
}

/// One recorded request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    /// Decoded, in the order sent.
    pub query: Vec<(String, String)>,
    pub headers: http::HeaderMap,
}

impl Seen {
    /// The first value of query parameter `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

struct Code {
    user: WechatUser,
    scope: String,
    issued: Instant,
    /// Seconds added by `age_codes`: a mock clock, so expiry tests need not wait.
    aged: u64,
    used: bool,
}

#[derive(Default)]
struct State {
    expect_redirect_uri: Option<String>,
    scanner: Option<WechatUser>,
    refuse_next: bool,
    codes: HashMap<String, Code>,
    /// access_token -> its user.
    tokens: HashMap<String, WechatUser>,
    /// (errcode, how many more access_token calls answer it).
    fail_token: Option<(i64, usize)>,
    hang_token: Duration,
    hang_userinfo: Duration,
    seen: Vec<Seen>,
    /// Why authorize requests were refused with 400.
    problems: Vec<String>,
    stopped: bool,
    /// The accept task and every connection task, aborted by `stop`.
    tasks: Vec<tokio::task::AbortHandle>,
}

struct Shared {
    app_id: String,
    app_secret: String,
    state: Mutex<State>,
}

/// The handle tests script the mock with; clones share one server.
#[derive(Clone)]
pub struct WechatMock {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl WechatMock {
    /// Starts on an ephemeral loopback port, for the app `app_id` with `app_secret`.
    pub async fn start(app_id: &str, app_secret: &str) -> WechatMock {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            app_id: app_id.to_owned(),
            app_secret: app_secret.to_owned(),
            state: Mutex::new(State::default()),
        });
        let sh = shared.clone();
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                // Spawned under the lock, so `stop` cannot miss a connection task.
                let mut s = sh.state.lock().unwrap();
                if s.stopped {
                    break;
                }
                let sh = sh.clone();
                let conn = tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| answer(sh.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
                s.tasks.push(conn.abort_handle());
            }
        });
        let accept = accept.abort_handle();
        shared.state.lock().unwrap().tasks.push(accept);
        WechatMock { addr, shared }
    }

    /// For both the open (authorize) and the api (token, userinfo) base URL.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Authorize requests must carry exactly this redirect_uri (WeChat checks it against
    /// the app's registered domain).
    pub fn expect_redirect_uri(&self, uri: &str) {
        self.state().expect_redirect_uri = Some(uri.to_owned());
    }

    /// Who scans at the following authorize requests, until changed.
    pub fn scanner(&self, user: &WechatUser) {
        self.state().scanner = Some(user.clone());
    }

    /// The next valid authorize request redirects back without a code (the user said no).
    pub fn refuse_next(&self) {
        self.state().refuse_next = true;
    }

    /// A code as if `user` had scanned on the website flow, for tests that call the
    /// callback directly.
    pub fn issue_code(&self, user: &WechatUser) -> String {
        self.state().issue(user.clone(), "snsapi_login")
    }

    /// Makes every code issued so far `secs` older.
    pub fn age_codes(&self, secs: u64) {
        for code in self.state().codes.values_mut() {
            code.aged += secs;
        }
    }

    /// The next `times` access_token calls answer `errcode`, before any other check and
    /// without using up the code (a WeChat hiccup the server may retry through).
    pub fn fail_token(&self, errcode: i64, times: usize) {
        self.state().fail_token = (times > 0).then_some((errcode, times));
    }

    /// Every access_token call waits `d` before it is handled (Duration::ZERO to stop).
    pub fn hang_token(&self, d: Duration) {
        self.state().hang_token = d;
    }

    /// Every userinfo call waits `d` before it is handled (Duration::ZERO to stop).
    pub fn hang_userinfo(&self, d: Duration) {
        self.state().hang_userinfo = d;
    }

    /// Every request so far, in order.
    pub fn requests(&self) -> Vec<Seen> {
        self.state().seen.clone()
    }

    /// How many requests came on `path`.
    pub fn count(&self, path: &str) -> usize {
        self.state().seen.iter().filter(|r| r.path == path).count()
    }

    /// Why authorize requests were refused with 400, in order ("path: problem").
    pub fn problems(&self) -> Vec<String> {
        self.state().problems.clone()
    }

    /// WeChat goes down: closes the listener and every open connection (kept-alive ones
    /// too), so every later request fails to connect or is cut off.
    pub fn stop(&self) {
        let tasks = {
            let mut s = self.state();
            s.stopped = true;
            std::mem::take(&mut s.tasks)
        };
        for task in tasks {
            task.abort();
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap()
    }
}

impl State {
    fn issue(&mut self, user: WechatUser, scope: &str) -> String {
        let code = random_hex();
        let (scope, issued) = (scope.to_owned(), Instant::now());
        let new = Code {
            user,
            scope,
            issued,
            aged: 0,
            used: false,
        };
        self.codes.insert(code.clone(), new);
        code
    }
}

async fn answer(
    shared: Arc<Shared>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let seen = Seen {
        path: req.uri().path().to_owned(),
        query: parse_query(req.uri().query().unwrap_or("")),
        headers: req.headers().clone(),
    };
    let (hang_token, hang_userinfo) = {
        let mut s = shared.state.lock().unwrap();
        s.seen.push(seen.clone());
        (s.hang_token, s.hang_userinfo)
    };
    if req.method() != http::Method::GET {
        return Ok(respond(404, "text/plain", "not found".into()));
    }
    Ok(match seen.path.as_str() {
        "/connect/qrconnect" => shared.authorize(&seen, &["snsapi_login"]),
        "/connect/oauth2/authorize" => shared.authorize(&seen, &["snsapi_userinfo", "snsapi_base"]),
        "/sns/oauth2/access_token" => {
            tokio::time::sleep(hang_token).await;
            // WeChat really labels its JSON text/plain, and answers 200 even for errors.
            respond(200, "text/plain", shared.access_token(&seen).to_string())
        }
        "/sns/userinfo" => {
            tokio::time::sleep(hang_userinfo).await;
            respond(200, "text/plain", shared.userinfo(&seen).to_string())
        }
        _ => respond(404, "text/plain", "not found".into()),
    })
}

impl Shared {
    /// Both authorize pages; `scopes` are the ones that page accepts.
    fn authorize(&self, seen: &Seen, scopes: &[&str]) -> Response<Full<Bytes>> {
        let mut s = self.state.lock().unwrap();
        let mut resp = match self.redirect(&mut s, seen, scopes) {
            Ok(location) => {
                let mut resp = respond(302, "text/html; charset=utf-8", String::new());
                resp.headers_mut()
                    .insert("location", location.parse().expect("Location header"));
                resp
            }
            Err(problem) => {
                s.problems.push(format!("{}: {problem}", seen.path));
                let page = format!(
                    "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>参数错误</title>\
                     </head><body><h4>参数错误</h4><p>{problem}</p></body></html>"
                );
                respond(400, "text/html; charset=utf-8", page)
            }
        };
        resp.headers_mut()
            .insert("cache-control", "no-store".parse().unwrap());
        resp
    }

    /// Checks the authorize parameters as WeChat does: the redirect back, or what is
    /// wrong with the request.
    fn redirect(&self, s: &mut State, seen: &Seen, scopes: &[&str]) -> Result<String, String> {
        let p = |name| seen.param(name).unwrap_or("");
        if p("appid") != self.app_id {
            return Err(format!("appid {:?} is not this app's", p("appid")));
        }
        if p("response_type") != "code" {
            return Err(format!(
                "response_type {:?} is not \"code\"",
                p("response_type")
            ));
        }
        let scope = p("scope");
        if !scopes.contains(&scope) {
            return Err(format!("scope {scope:?} is not one of {scopes:?}"));
        }
        let redirect_uri = p("redirect_uri");
        if redirect_uri.is_empty() {
            return Err("redirect_uri is missing".to_owned());
        }
        if let Some(expected) = &s.expect_redirect_uri
            && redirect_uri != expected
        {
            return Err(format!("redirect_uri {redirect_uri:?} is not {expected:?}"));
        }
        let state = p("state");
        if state.is_empty() || state.len() > MAX_STATE_LEN {
            return Err(format!(
                "state must be 1 to {MAX_STATE_LEN} bytes, not {}",
                state.len()
            ));
        }
        if !state
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(format!(
                "state {state:?} has characters outside [A-Za-z0-9_-]"
            ));
        }
        let sep = if redirect_uri.contains('?') { '&' } else { '?' };
        // A refusing user needs no scanner: no code is issued for anyone.
        if std::mem::take(&mut s.refuse_next) {
            return Ok(format!("{redirect_uri}{sep}state={state}"));
        }
        let user = s.scanner.clone().ok_or("no scanner")?;
        let code = s.issue(user, scope);
        Ok(format!("{redirect_uri}{sep}code={code}&state={state}"))
    }

    fn access_token(&self, seen: &Seen) -> Value {
        let mut s = self.state.lock().unwrap();
        if let Some((errcode, left)) = s.fail_token {
            s.fail_token = (left > 1).then_some((errcode, left - 1));
            return wechat_error(errcode);
        }
        let p = |name| seen.param(name).unwrap_or("");
        if p("appid") != self.app_id {
            return wechat_error(40013);
        }
        if p("secret") != self.app_secret {
            return wechat_error(40125);
        }
        if p("grant_type") != "authorization_code" {
            return wechat_error(40002);
        }
        let Some(code) = s.codes.get_mut(p("code")) else {
            return wechat_error(40029);
        };
        if code.used {
            return wechat_error(40163);
        }
        if code.issued.elapsed().as_secs() + code.aged > CODE_LIFETIME_SECS {
            return wechat_error(42003);
        }
        code.used = true;
        let (user, scope) = (code.user.clone(), code.scope.clone());
        let access_token = format!("{}{}", random_hex(), random_hex());
        s.tokens.insert(access_token.clone(), user.clone());
        let mut answer = json!({
            "access_token": access_token,
            "expires_in": 7200,
            "refresh_token": format!("{}{}", random_hex(), random_hex()),
            "openid": user.openid,
            "scope": scope,
        });
        if let Some(unionid) = user.unionid {
            answer["unionid"] = json!(unionid);
        }
        answer
    }

    fn userinfo(&self, seen: &Seen) -> Value {
        let s = self.state.lock().unwrap();
        let Some(user) = s.tokens.get(seen.param("access_token").unwrap_or("")) else {
            return wechat_error(40001);
        };
        if seen.param("openid") != Some(user.openid.as_str()) {
            return wechat_error(40003);
        }
        let mut answer = json!({
            "openid": user.openid,
            "nickname": user.nickname,
            "sex": 0,
            "province": "",
            "city": "",
            "country": "",
            "headimgurl": user.headimgurl,
            "privilege": [],
        });
        if let Some(unionid) = &user.unionid {
            answer["unionid"] = json!(unionid);
        }
        answer
    }
}

/// WeChat's error body, with the errmsg it sends for that errcode.
fn wechat_error(errcode: i64) -> Value {
    let errmsg = match errcode {
        -1 => "system error",
        40001 => "invalid credential, access_token is invalid or not latest",
        40002 => "invalid grant_type",
        40003 => "invalid openid",
        40013 => "invalid appid",
        40029 => "invalid code",
        40125 => "invalid appsecret",
        40163 => "code been used",
        42003 => "code expired",
        45011 => "api minute-quota reach limit  mustslower  retry next minute",
        _ => "mock error",
    };
    json!({ "errcode": errcode, "errmsg": errmsg })
}

fn respond(status: u16, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
    resp.headers_mut()
        .insert("content-type", content_type.parse().unwrap());
    resp
}

/// `a=1&b=x+y%21` -> [("a", "1"), ("b", "x y!")]: '+' is a space in query strings, and
/// is replaced before decoding so that `%2B` stays a plus.
fn parse_query(query: &str) -> Vec<(String, String)> {
    let decode = |s: &str| {
        percent_decode_str(&s.replace('+', " "))
            .decode_utf8_lossy()
            .into_owned()
    };
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// 32 random hex digits: the shape of WeChat's codes.
fn random_hex() -> String {
    format!("{:032x}", rand::rng().random::<u128>())
}
