//! Handlers, one file per endpoint family. Each reads like the API description: parse,
//! act, flush what must be durable, answer.

pub mod account;
pub mod activity;
pub mod captcha;
pub mod codes;
pub mod jwks;
pub mod ops;
pub mod page;
pub mod password;
pub mod session;
pub mod wechat;

use http::header::AUTHORIZATION;
use http::request::Parts;
use serde::Serialize;

use crate::app::App;
use crate::clock::rfc3339;
use crate::codes::CodeError;
use crate::error::ApiError;
use crate::http::cookie;
use crate::model::{LoginMethod, User};
use crate::phone::IndexedPhone;
use crate::token::Session;

/// Who sent a login request, for the session it starts.
pub struct Client {
    pub ip: std::net::IpAddr,
    pub user_agent: String,
}

impl Client {
    pub fn of(req: &crate::http::router::Req) -> Client {
        let user_agent = req
            .parts
            .headers
            .get(http::header::USER_AGENT)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default();
        Client {
            ip: req.ip,
            user_agent,
        }
    }

    /// Where the request came from, as the login activity records it.
    pub fn origin(&self) -> crate::activity::Origin<'_> {
        crate::activity::Origin {
            ip: self.ip,
            user_agent: &self.user_agent,
        }
    }
}

/// A user as the API shows it.
#[derive(Serialize)]
pub struct UserView {
    pub id: u64,
    pub phone: String,
    pub nickname: String,
    pub created_at: String,
    pub last_login_at: Option<String>,
    pub login_methods: Vec<&'static str>,
    /// WeChat's picture of the user, from the last WeChat login or link.
    pub avatar_url: Option<String>,
}

impl UserView {
    pub async fn load(app: &App, user: &User) -> Result<Self, ApiError> {
        let methods = app.store.users.login_methods(user).await?;
        Ok(Self::new(user, &methods))
    }

    /// `methods` in the store's order: sms first, then the stored ones in method order.
    pub fn new(user: &User, methods: &[LoginMethod]) -> Self {
        UserView {
            id: user.id,
            phone: user.phone.clone(),
            nickname: user.nickname.clone(),
            created_at: rfc3339(user.created_at),
            last_login_at: user.last_login_at.map(rfc3339),
            login_methods: methods.iter().map(|m| m.method.as_str()).collect(),
            avatar_url: user.avatar_url.clone(),
        }
    }
}

pub fn parse_phone(app: &App, input: &str) -> Result<IndexedPhone, ApiError> {
    let phone = app.phones.parse(input).ok_or(ApiError::InvalidPhone)?;
    Ok(IndexedPhone::new(phone, &app.store.phones))
}

/// Uses up `code` for phone+purpose, mapping the codes module's answer to the API's.
/// A phone locked for too many wrong codes this hour is refused whatever the code.
pub async fn consume_code(
    app: &App,
    phone: &IndexedPhone,
    purpose: crate::model::Purpose,
    code: &str,
) -> Result<(), ApiError> {
    if let Err(locked) = app.limits.check_lockout(phone).await {
        app.metrics.verification("locked");
        return Err(locked.into());
    }
    // A code of the wrong shape cannot be right; refuse it without spending an attempt.
    if code.len() != app.cfg.code.length as usize || !code.bytes().all(|b| b.is_ascii_digit()) {
        app.metrics.verification("invalid");
        return Err(ApiError::InvalidCode);
    }
    let result = app.codes.consume(phone, purpose, code).await;
    if let Err(CodeError::Wrong | CodeError::Dead { guessed: true, .. }) = result {
        // A guess at a live code: it counts toward the phone's hourly lockout, and must
        // stay counted across a crash, like the code's own attempt count.
        app.limits.record_failure(phone).await?;
        app.store.engine.flush().await?;
    }
    app.metrics.verification(match &result {
        Ok(()) => "ok",
        Err(CodeError::Wrong) => "wrong",
        Err(CodeError::Invalid) => "invalid",
        Err(CodeError::Dead { .. }) => "dead",
        Err(CodeError::Store(_)) => "error",
    });
    result.map_err(|e| match e {
        CodeError::Invalid | CodeError::Wrong => ApiError::InvalidCode,
        CodeError::Dead { retry_after, .. } => ApiError::TooManyAttempts {
            message: "too many wrong codes; request a new code".into(),
            retry_after: Some(retry_after),
            limit: "code_attempts",
        },
        CodeError::Store(e) => e.into(),
    })
}

/// Proof that the caller holds the phone: a fresh code, or the ticket /auth/verify gave
/// for one. Exactly one of the two; it is used up here.
pub async fn redeem_proof(
    app: &App,
    phone: &IndexedPhone,
    purpose: crate::model::Purpose,
    code: Option<&str>,
    verification_token: Option<&str>,
) -> Result<(), ApiError> {
    match (code, verification_token) {
        (Some(code), None) => consume_code(app, phone, purpose, code).await,
        (None, Some(ticket)) => {
            match app
                .tokens
                .redeem_verification(ticket, phone.as_str(), purpose)
                .await?
            {
                true => Ok(()),
                false => Err(ApiError::InvalidCode),
            }
        }
        _ => Err(ApiError::InvalidRequest(
            "give either `code` or `verification_token`, not both".into(),
        )),
    }
}

pub const NICKNAME_MAX_CHARS: usize = 32;

/// A nickname as given, trimmed: 1 to 32 characters, no control characters.
pub fn nickname(input: &str) -> Result<String, ApiError> {
    let nickname = input.trim();
    let chars = nickname.chars().count();
    if chars == 0 || chars > NICKNAME_MAX_CHARS || nickname.chars().any(char::is_control) {
        return Err(ApiError::InvalidRequest(format!(
            "nickname must be 1 to {NICKNAME_MAX_CHARS} characters, without control characters"
        )));
    }
    Ok(nickname.to_owned())
}

const SESSION_REFUSED: &str = "the session token is missing, invalid, expired or ended";

/// The user behind the request's session, if it is valid and current: not logged out,
/// not ended by a session-generation bump, user not disabled (asked of the store on every
/// request, so what another instance ended is refused here at once). The session is the
/// `Authorization: Bearer` token, or (with `token.cookie`) the session cookie; a change of
/// state authenticated by the cookie must come from our own origin.
pub async fn authenticate(app: &App, head: &Parts) -> Result<(User, Session), ApiError> {
    let session = session_token(app, head).await?;
    let user = app
        .store
        .sessions
        .session_user(session.user_id, &session.jti, session.sid_key.as_deref())
        .await?;
    Ok((current(user, &session)?, session))
}

/// [`authenticate`], with the user's login methods read in the same store call: what
/// GET /me shows.
pub async fn authenticate_with_methods(
    app: &App,
    head: &Parts,
) -> Result<(User, Vec<LoginMethod>), ApiError> {
    let session = session_token(app, head).await?;
    let account = app
        .store
        .sessions
        .session_account(session.user_id, &session.jti, session.sid_key.as_deref())
        .await?;
    let (user, methods) = account.ok_or(ApiError::Unauthorized(SESSION_REFUSED))?;
    Ok((current(Some(user), &session)?, methods))
}

/// The session's user if it may still use it: enabled, and the session of its current
/// generation.
fn current(user: Option<User>, session: &Session) -> Result<User, ApiError> {
    user.filter(|u| !u.disabled && u.session_gen == session.session_gen)
        .ok_or(ApiError::Unauthorized(SESSION_REFUSED))
}

/// The request's session token, checked (signature, expiry, issuer): the bearer token,
/// or with `token.cookie` the session cookie.
async fn session_token(app: &App, head: &Parts) -> Result<Session, ApiError> {
    let bearer = head
        .headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        // The scheme name is case-insensitive (RFC 9110).
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    let token = match bearer {
        Some(token) => token,
        None if app.cfg.token.cookie => {
            let token = cookie::read(&head.headers, &app.cfg.token.cookie_name)
                .ok_or(ApiError::Unauthorized(SESSION_REFUSED))?;
            if cookie::changes_state(&head.method) && !cookie::same_origin(&head.headers) {
                return Err(ApiError::Forbidden(
                    "a change authenticated by the session cookie must come from this site's own pages",
                ));
            }
            token
        }
        None => return Err(ApiError::Unauthorized(SESSION_REFUSED)),
    };
    app.tokens
        .verify_session(token)
        .await
        .ok_or(ApiError::Unauthorized(SESSION_REFUSED))
}
