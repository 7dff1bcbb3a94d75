//! Logins' answers, POST /auth/sms-login, /auth/refresh and /auth/logout, GET /auth/check,
//! and the session list of /me/sessions.

use http::StatusCode;
use http::header::{CACHE_CONTROL, HeaderValue, SET_COOKIE};
use serde::{Deserialize, Serialize};

use super::{Client, UserView, authenticate, consume_code, parse_phone};
use crate::app::App;
use crate::clock::{now, rfc3339};
use crate::error::ApiError;
use crate::http::body::{Resp, json_response, no_content};
use crate::http::cookie;
use crate::http::router::{Req, last_segment};
use crate::model::{ActivityEvent, LoginMethod, Method, Purpose, User};
use crate::phone::{Phone, mask};
use crate::sessions::{RefreshIssued, Refreshed, id_text, live, parse_id};
use crate::store::{NewUser, SessionId, UserChange};

/// The answer to every successful login, registration or refresh.
#[derive(Serialize)]
pub struct TokenResponse {
    pub access_token: String,
    pub token_type: &'static str,
    pub expires_in: u64,
    /// Opaque; POST /auth/refresh trades it for a new answer like this one.
    pub refresh_token: String,
    pub refresh_expires_in: u64,
    pub user: UserView,
    pub created: bool,
}

/// The answer to a login: a new session for `user` (who logged in how, from where),
/// shown as `view`. The session is durable before the answer goes out.
pub async fn token_response(
    app: &App,
    (client, method): (&Client, Method),
    user: &User,
    view: UserView,
    created: bool,
    status: StatusCode,
) -> Result<Resp, ApiError> {
    let now = now();
    // The login's entry of the activity rides the same flush; on PostgreSQL its statement
    // goes out beside the session's.
    let (started, recorded) = tokio::join!(
        app.sessions
            .start(user, method, client.ip, &client.user_agent, now),
        app.activity.record(
            user.id,
            ActivityEvent::Login,
            Some(method),
            client.origin(),
            now
        ),
    );
    let (sid, refresh) = started?;
    recorded?;
    app.store.engine.flush().await?;
    Ok(session_answer(
        app, user, &sid, refresh, view, created, status,
    ))
}

/// A new access token of session `sid`, with its refresh token, as JSON (and cookies with
/// `token.cookie`).
fn session_answer(
    app: &App,
    user: &User,
    sid: &SessionId,
    refresh: RefreshIssued,
    view: UserView,
    created: bool,
    status: StatusCode,
) -> Resp {
    let issued = app.tokens.issue_session(user, sid);
    let body = TokenResponse {
        access_token: issued.token,
        token_type: "Bearer",
        expires_in: issued.expires_in,
        refresh_token: refresh.token,
        refresh_expires_in: refresh.expires_in,
        user: view,
        created,
    };
    let mut resp = json_response(status, &body);
    if app.cfg.token.cookie {
        let cfg = &app.cfg.token;
        let headers = resp.headers_mut();
        headers.append(
            SET_COOKIE,
            cookie::set(cfg, &body.access_token, body.expires_in),
        );
        headers.append(
            SET_COOKIE,
            cookie::set_refresh(cfg, &body.refresh_token, body.refresh_expires_in),
        );
    }
    resp
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RefreshRequest {
    refresh_token: Option<String>,
}

/// Trades a refresh token (the body's, or with `token.cookie` the refresh cookie) for a
/// new access token and a new refresh token; the old one is used up (see
/// [`crate::sessions`]). 401 invalid_refresh_token for anything else.
pub async fn refresh(app: &App, req: Req) -> Result<Resp, ApiError> {
    let cookie_token = match app.cfg.token.cookie {
        true => cookie::read(&req.parts.headers, &cookie::refresh_name(&app.cfg.token))
            .map(str::to_owned),
        false => None,
    };
    let same_origin = cookie::same_origin(&req.parts.headers);
    let body: RefreshRequest = req.optional_json(app).await?;
    let token = match (body.refresh_token, cookie_token) {
        (Some(token), _) => token,
        (None, Some(token)) => {
            // The cookie rides along with requests other sites make.
            if !same_origin {
                return Err(ApiError::Forbidden(
                    "a refresh by the refresh cookie must come from this site's own pages",
                ));
            }
            token
        }
        (None, None) => return Err(ApiError::InvalidRefreshToken),
    };
    let now = now();
    let refreshed = app.sessions.refresh(&token, now).await?;
    app.store.engine.flush().await?;
    let (session, refresh) = match refreshed {
        Refreshed::Ok { session, refresh } => (session, refresh),
        // A stolen copy has been logged, and its session ended, by `refresh`.
        Refreshed::Invalid | Refreshed::Stolen(_) => return Err(ApiError::InvalidRefreshToken),
    };
    let user = app.store.users.user(session.user_id).await?;
    let Some(user) = user.filter(|u| live(&session, u, now)) else {
        return Err(ApiError::InvalidRefreshToken);
    };
    let view = UserView::load(app, &user).await?;
    Ok(session_answer(
        app,
        &user,
        &session.id,
        refresh,
        view,
        false,
        StatusCode::OK,
    ))
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
    let client = Client::of(&req);
    let body: SmsLoginRequest = req.json(app).await?;
    let phone = parse_phone(app, &body.phone)?;
    consume_code(app, &phone, Purpose::Login, &body.code).await?;
    let now = now();
    let new = NewUser {
        phone: phone.as_str(),
        index: phone.index,
        other: phone.other,
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
    if user.disabled {
        app.store.engine.flush().await?; // the code is used up either way
        return Err(ApiError::Unauthorized("this account is disabled"));
    }
    // The code, the user and the session become durable together, in the one flush of
    // token_response: a second flush here cost a third of the logins' rate.
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
    token_response(
        app,
        (&client, Method::Sms),
        &user,
        view,
        created,
        StatusCode::OK,
    )
    .await
}

/// Which sessions a logout ends.
#[derive(Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Scope {
    /// This session only.
    #[default]
    Local,
    /// Every other session of the user.
    Others,
    /// Every session of the user, this one included.
    Global,
}

impl Scope {
    fn as_str(self) -> &'static str {
        match self {
            Scope::Local => "local",
            Scope::Others => "others",
            Scope::Global => "global",
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LogoutRequest {
    #[serde(default)]
    scope: Scope,
}

/// Ends the presented session (`local`, the default), the user's other sessions
/// (`others`) or all of them (`global`); what is ended is refused from then on, on every
/// instance, restarts included.
pub async fn logout(app: &App, req: Req) -> Result<Resp, ApiError> {
    let client = Client::of(&req);
    let (user, session) = authenticate(app, &req.parts).await?;
    let body: LogoutRequest = req.optional_json(app).await?;
    let now = now();
    match body.scope {
        Scope::Local => {
            app.tokens.revoke(&session.jti, session.exp).await?;
            if let Some(sid) = session.sid {
                app.sessions.end(user.id, sid, now).await?;
            }
        }
        Scope::Others => {
            end_all_but(app, &user, session.sid.as_ref(), now).await?;
        }
        Scope::Global => {
            // One bump ends every session, those of tokens from before sessions too.
            app.store
                .users
                .update_user(user.id, UserChange::EndSessions)
                .await?;
        }
    }
    app.activity
        .record(user.id, ActivityEvent::Logout, None, client.origin(), now)
        .await?;
    app.store.engine.flush().await?;
    tracing::info!(user_id = user.id, scope = body.scope.as_str(), "logout");
    let mut resp = no_content();
    if app.cfg.token.cookie && body.scope != Scope::Others {
        let headers = resp.headers_mut();
        headers.append(SET_COOKIE, cookie::clear(&app.cfg.token));
        headers.append(SET_COOKIE, cookie::clear_refresh(&app.cfg.token));
    }
    Ok(resp)
}

/// Ends every live session of `user` but `keep`. Durable after the next flush.
async fn end_all_but(
    app: &App,
    user: &User,
    keep: Option<&SessionId>,
    now: i64,
) -> Result<(), ApiError> {
    for s in app.sessions.list(user, now).await? {
        if Some(&s.id) != keep {
            app.sessions.end(user.id, s.id, now).await?;
        }
    }
    Ok(())
}

/// One session as GET /me/sessions shows it.
#[derive(Serialize)]
struct SessionView {
    id: String,
    created_at: String,
    last_used_at: String,
    method: &'static str,
    ip: String,
    user_agent: String,
    /// The session of the token this list was asked with.
    current: bool,
}

/// GET /me/sessions: the user's live sessions, oldest first.
pub async fn list(app: &App, req: Req) -> Result<Resp, ApiError> {
    let (user, session) = authenticate(app, &req.parts).await?;
    let sessions = app.sessions.list(&user, now()).await?;
    let views: Vec<SessionView> = sessions
        .into_iter()
        .map(|s| SessionView {
            id: id_text(&s.id),
            created_at: rfc3339(s.created_at),
            last_used_at: rfc3339(s.last_used_at),
            method: s.method.as_str(),
            current: session.sid == Some(s.id),
            ip: s.ip,
            user_agent: s.user_agent,
        })
        .collect();
    Ok(json_response(StatusCode::OK, &views))
}

/// DELETE /me/sessions/{id}: ends one of the user's sessions (204); its tokens are
/// refused at once, on every instance. 404 for one that is not the user's or not live.
pub async fn end(app: &App, req: Req) -> Result<Resp, ApiError> {
    let (user, _) = authenticate(app, &req.parts).await?;
    let id = parse_id(last_segment(&req)).ok_or(ApiError::NotFound)?;
    if !end_live(app, &user, id).await? {
        return Err(ApiError::NotFound);
    }
    app.store.engine.flush().await?;
    tracing::info!(user_id = user.id, session = %id_text(&id), "session ended by its user");
    Ok(no_content())
}

/// Ends session `id` of `user` if it is live for them now.
async fn end_live(app: &App, user: &User, id: SessionId) -> Result<bool, ApiError> {
    let now = now();
    let owned = app
        .sessions
        .list(user, now)
        .await?
        .iter()
        .any(|s| s.id == id);
    Ok(owned && app.sessions.end(user.id, id, now).await?)
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
