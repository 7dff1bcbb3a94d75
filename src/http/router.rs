//! The route table: every (method, path) the API answers, in one list that the dispatcher,
//! the 405 answer (with `Allow`) and the API description all read.

use std::net::IpAddr;

use http::request::Parts;
use hyper::body::Incoming;

use super::body::Resp;
use super::handlers::{
    account, activity, captcha, codes, jwks, ops, page, password, session, wechat,
};
use crate::app::App;
use crate::error::ApiError;

/// One request as handlers see it.
pub struct Req {
    pub parts: Parts,
    pub body: Incoming,
    /// The client's address (the proxy's word for it only with `trust_proxy`).
    pub ip: IpAddr,
}

impl Req {
    pub async fn json<T: serde::de::DeserializeOwned>(self, app: &App) -> Result<T, ApiError> {
        super::body::json(
            &self.parts.headers,
            self.body,
            app.cfg.server.max_body_bytes,
        )
        .await
    }

    /// [`Req::json`] for a body that may be left out (then `T::default()`).
    pub async fn optional_json<T: serde::de::DeserializeOwned + Default>(
        self,
        app: &App,
    ) -> Result<T, ApiError> {
        super::body::optional_json(
            &self.parts.headers,
            self.body,
            app.cfg.server.max_body_bytes,
        )
        .await
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Page,
    Healthz,
    Readyz,
    Metrics,
    OpenApi,
    Jwks,
    Captcha,
    SendCode,
    SmsLogin,
    Verify,
    Logout,
    Refresh,
    AuthCheck,
    Register,
    PasswordLogin,
    PasswordReset,
    GetMe,
    PatchMe,
    ListSessions,
    EndSession,
    Activity,
    Export,
    DeleteAccount,
    WechatStart,
    WechatCallback,
    WechatExchange,
    WechatBind,
    LinkWechat,
    UnlinkWechat,
}

/// (method, path, endpoint): the whole HTTP API. A `{name}` segment of a path matches
/// any one non-empty segment (the handler reads it from the request's path).
pub const ROUTES: &[(&str, &str, Endpoint)] = &[
    ("GET", "/", Endpoint::Page),
    ("GET", "/healthz", Endpoint::Healthz),
    ("GET", "/readyz", Endpoint::Readyz),
    ("GET", "/metrics", Endpoint::Metrics),
    ("GET", "/api/v1/openapi.json", Endpoint::OpenApi),
    ("GET", "/.well-known/jwks.json", Endpoint::Jwks),
    ("POST", "/api/v1/captcha", Endpoint::Captcha),
    ("POST", "/api/v1/sms/code", Endpoint::SendCode),
    ("POST", "/api/v1/auth/sms-login", Endpoint::SmsLogin),
    ("POST", "/api/v1/auth/verify", Endpoint::Verify),
    ("POST", "/api/v1/auth/logout", Endpoint::Logout),
    ("POST", "/api/v1/auth/refresh", Endpoint::Refresh),
    ("GET", "/api/v1/auth/check", Endpoint::AuthCheck),
    ("POST", "/api/v1/auth/register", Endpoint::Register),
    ("POST", "/api/v1/auth/login", Endpoint::PasswordLogin),
    (
        "POST",
        "/api/v1/auth/password/reset",
        Endpoint::PasswordReset,
    ),
    ("GET", "/api/v1/me", Endpoint::GetMe),
    ("PATCH", "/api/v1/me", Endpoint::PatchMe),
    ("GET", "/api/v1/me/sessions", Endpoint::ListSessions),
    ("DELETE", "/api/v1/me/sessions/{id}", Endpoint::EndSession),
    ("GET", "/api/v1/me/activity", Endpoint::Activity),
    ("GET", "/api/v1/me/export", Endpoint::Export),
    ("POST", "/api/v1/me/delete", Endpoint::DeleteAccount),
    ("GET", "/api/v1/auth/wechat/start", Endpoint::WechatStart),
    (
        "GET",
        "/api/v1/auth/wechat/callback",
        Endpoint::WechatCallback,
    ),
    (
        "POST",
        "/api/v1/auth/wechat/exchange",
        Endpoint::WechatExchange,
    ),
    ("POST", "/api/v1/auth/wechat/bind", Endpoint::WechatBind),
    ("POST", "/api/v1/me/wechat", Endpoint::LinkWechat),
    ("DELETE", "/api/v1/me/wechat", Endpoint::UnlinkWechat),
];

/// The endpoint for a method and path: 404 for an unknown path, 405 for a known path
/// with another method.
pub fn resolve(method: &str, path: &str) -> Result<Endpoint, ApiError> {
    match ROUTES
        .iter()
        .find(|(m, p, _)| *m == method && matches(p, path))
    {
        Some((_, _, endpoint)) => Ok(*endpoint),
        None if ROUTES.iter().any(|(_, p, _)| matches(p, path)) => {
            Err(ApiError::MethodNotAllowed {
                allow: allowed(path),
            })
        }
        None => Err(ApiError::NotFound),
    }
}

/// Whether `path` is one of the paths `pattern` stands for.
fn matches(pattern: &str, path: &str) -> bool {
    if !pattern.contains('{') {
        return pattern == path;
    }
    let mut want = pattern.split('/');
    let mut got = path.split('/');
    loop {
        match (want.next(), got.next()) {
            (None, None) => return true,
            (Some(w), Some(g)) if w.starts_with('{') && w.ends_with('}') => {
                if g.is_empty() {
                    return false;
                }
            }
            (Some(w), Some(g)) if w == g => {}
            _ => return false,
        }
    }
}

/// The last segment of a request path: what a `{id}` at the end of its route stands for.
pub fn last_segment(req: &Req) -> &str {
    req.parts.uri.path().rsplit('/').next().unwrap_or("")
}

pub async fn dispatch(app: &App, endpoint: Endpoint, req: Req) -> Result<Resp, ApiError> {
    if endpoint.is_wechat() && app.wechat.is_none() {
        return Err(ApiError::NotFound); // WeChat login is off: as if the routes did not exist
    }
    endpoint.limit_address(app, req.ip).await?;
    match endpoint {
        Endpoint::Page => Ok(page::index(app.cfg.wechat.enabled, app.cfg.token.cookie)),
        Endpoint::Healthz => Ok(ops::healthz()),
        Endpoint::Readyz => ops::readyz(app).await,
        Endpoint::Metrics => ops::metrics(app).await,
        Endpoint::OpenApi => Ok(ops::openapi()),
        Endpoint::Jwks => jwks::jwks(app),
        Endpoint::Captcha => captcha::create(app).await,
        Endpoint::SendCode => codes::send_code(app, req).await,
        Endpoint::SmsLogin => session::sms_login(app, req).await,
        Endpoint::Verify => codes::verify(app, req).await,
        Endpoint::Logout => session::logout(app, req).await,
        Endpoint::Refresh => session::refresh(app, req).await,
        Endpoint::AuthCheck => session::check(app, req).await,
        Endpoint::Register => password::register(app, req).await,
        Endpoint::PasswordLogin => password::login(app, req).await,
        Endpoint::PasswordReset => password::reset(app, req).await,
        Endpoint::GetMe => account::get_me(app, req).await,
        Endpoint::PatchMe => account::patch_me(app, req).await,
        Endpoint::ListSessions => session::list(app, req).await,
        Endpoint::EndSession => session::end(app, req).await,
        Endpoint::Activity => activity::list(app, req).await,
        Endpoint::Export => activity::export(app, req).await,
        Endpoint::DeleteAccount => activity::delete(app, req).await,
        Endpoint::WechatStart => wechat::start(app, req).await,
        Endpoint::WechatCallback => wechat::callback(app, req).await,
        Endpoint::WechatExchange => wechat::exchange(app, req).await,
        Endpoint::WechatBind => wechat::bind(app, req).await,
        Endpoint::LinkWechat => wechat::link(app, req).await,
        Endpoint::UnlinkWechat => wechat::unlink(app, req).await,
    }
}

impl Endpoint {
    /// The path this endpoint serves, as a metrics label.
    pub fn path(self) -> &'static str {
        ROUTES
            .iter()
            .find(|(_, _, e)| *e == self)
            .map_or("unmatched", |(_, p, _)| p)
    }

    fn is_wechat(self) -> bool {
        matches!(
            self,
            Endpoint::WechatStart
                | Endpoint::WechatCallback
                | Endpoint::WechatExchange
                | Endpoint::WechatBind
                | Endpoint::LinkWechat
                | Endpoint::UnlinkWechat
        )
    }

    /// The per-address limit each endpoint counts against, checked before any work.
    /// A WeChat start stores a state, as a captcha stores its answer, and counts as one.
    async fn limit_address(self, app: &App, ip: IpAddr) -> Result<(), ApiError> {
        match self {
            Endpoint::Captcha | Endpoint::WechatStart | Endpoint::LinkWechat => {
                app.limits.address_captcha(ip).await?
            }
            Endpoint::SendCode => app.limits.address_send(ip).await?,
            Endpoint::SmsLogin
            | Endpoint::Refresh
            | Endpoint::Verify
            | Endpoint::Register
            | Endpoint::PasswordLogin
            | Endpoint::PasswordReset
            | Endpoint::DeleteAccount
            | Endpoint::WechatCallback
            | Endpoint::WechatExchange
            | Endpoint::WechatBind => app.limits.address_check(ip).await?,
            Endpoint::Page
            | Endpoint::Healthz
            | Endpoint::Readyz
            | Endpoint::Metrics
            | Endpoint::OpenApi
            | Endpoint::Jwks
            | Endpoint::Logout
            | Endpoint::AuthCheck
            | Endpoint::GetMe
            | Endpoint::PatchMe
            | Endpoint::ListSessions
            | Endpoint::EndSession
            | Endpoint::Activity
            | Endpoint::Export
            | Endpoint::UnlinkWechat => {}
        }
        Ok(())
    }
}

/// The `Allow` header for a known path: its methods, comma separated, in table order.
fn allowed(path: &str) -> String {
    let methods: Vec<&str> = ROUTES
        .iter()
        .filter(|(_, p, _)| matches(p, path))
        .map(|(m, _, _)| *m)
        .collect();
    methods.join(", ")
}
