//! POST /auth/sms-login and POST /auth/logout.

use http::StatusCode;
use http::header::{CACHE_CONTROL, HeaderValue, SET_COOKIE};
use serde::{Deserialize, Serialize};

use super::{UserView, authenticate, consume_code, parse_phone};
use crate::app::App;
use crate::clock::now;
use crate::error::ApiError;
use crate::http::body::{Resp, json_response, no_content};
use crate::http::cookie;
use crate::http::router::Req;
use crate::model::{LoginMethod, Method, Purpose, User};
use crate::phone::{Phone, mask};
use crate::store::NewUser;

/// The answer to every successful login or registration.
#[derive(Serialize)]
pub struct TokenResponse {
    pub access_token: String,
    pub token_type: &'static str,
    pub expires_in: u64,
    pub user: UserView,
    pub created: bool,
}

/// The answer to a login: a new session for `user`, shown as `view`.
pub fn token_response(
    app: &App,
    user: &User,
    view: UserView,
    created: bool,
    status: StatusCode,
) -> Resp {
    let issued = app.tokens.issue_session(user);
    let body = TokenResponse {
        access_token: issued.token,
        token_type: "Bearer",
        expires_in: issued.expires_in,
        user: view,
        created,
    };
    let mut resp = json_response(status, &body);
    if app.cfg.token.cookie {
        let cookie = cookie::set(&app.cfg.token, &body.access_token, body.expires_in);
        resp.headers_mut().insert(SET_COOKIE, cookie);
    }
    resp
}

/// The nickname a new account starts with: its national number with the middle masked.
pub fn default_nickname(phone: &Phone, country_code: &str) -> String {
    let national = phone
        .as_str()
        .strip_prefix('+')
        .and_then(|p| p.strip_prefix(country_code));
    mask(national.unwrap_or(phone.as_str()))
}

pub fn sms_method(phone: &Phone) -> LoginMethod {
    LoginMethod {
        method: Method::Sms,
        identification: phone.as_str().to_owned(),
        access_code: None,
    }
}

#[derive(Deserialize)]
struct SmsLoginRequest {
    phone: String,
    code: String,
}

/// Logs in with a `login` code, creating the account first if the phone has none.
pub async fn sms_login(app: &App, req: Req) -> Result<Resp, ApiError> {
    let body: SmsLoginRequest = req.json(app).await?;
    let phone = parse_phone(app, &body.phone)?;
    consume_code(app, &phone, Purpose::Login, &body.code).await?;
    let now = now();
    let new = NewUser {
        phone: phone.as_str(),
        nickname: default_nickname(&phone, &app.cfg.phone.country_code),
        created_at: now,
        last_login_at: Some(now),
        avatar_url: None,
    };
    let (user, created) = app
        .store
        .users
        .log_in_or_create(new, &[sms_method(&phone)])
        .await?;
    app.store.engine.flush().await?; // the code is used up either way
    if user.disabled {
        return Err(ApiError::Unauthorized("this account is disabled"));
    }
    tracing::info!(user_id = user.id, phone = %phone.masked(), created, "sms login");
    app.metrics.login("sms");
    if created {
        app.metrics.registration("sms");
    }
    // A new account has the methods it was made with: no need to read them back.
    let view = if created {
        UserView::new(&user, &[sms_method(&phone)])
    } else {
        UserView::load(app, &user).await?
    };
    Ok(token_response(app, &user, view, created, StatusCode::OK))
}

/// Ends the presented session; the token is refused from then on, restarts included.
pub async fn logout(app: &App, req: Req) -> Result<Resp, ApiError> {
    let (_, session) = authenticate(app, &req.parts).await?;
    app.tokens.revoke(&session.jti, session.exp).await?;
    app.store.engine.flush().await?;
    let mut resp = no_content();
    if app.cfg.token.cookie {
        resp.headers_mut()
            .insert(SET_COOKIE, cookie::clear(&app.cfg.token));
    }
    Ok(resp)
}

/// GET /auth/check, for nginx `auth_request`: 204 with who it is for a valid session
/// (bearer or cookie), 401 otherwise. nginx passes the user on to the guarded site.
pub async fn check(app: &App, req: Req) -> Result<Resp, ApiError> {
    let (user, _) = authenticate(app, &req.parts).await?;
    let mut resp = no_content();
    let headers = resp.headers_mut();
    headers.insert("x-smsauth-user-id", HeaderValue::from(user.id));
    // E.164 is ASCII: always a valid header value.
    if let Ok(phone) = HeaderValue::from_str(&user.phone) {
        headers.insert("x-smsauth-phone", phone);
    }
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}
