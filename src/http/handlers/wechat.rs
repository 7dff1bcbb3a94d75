//! WeChat login: GET /auth/wechat/start and /auth/wechat/callback (browser navigations,
//! answered with redirects), POST /auth/wechat/exchange and /auth/wechat/bind (the page's
//! calls), and POST and DELETE /me/wechat (link and unlink from a session). The flow is
//! described in [`crate::wechat`].

use http::StatusCode;
use http::header::SET_COOKIE;
use percent_encoding::percent_decode_str;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use super::session::{default_nickname, sms_method, token_response};
use super::{Client, UserView, authenticate, consume_code, nickname, parse_phone};
use crate::app::App;
use crate::clock::now;
use crate::error::ApiError;
use crate::http::body::{Resp, json_response, no_content, redirect};
use crate::http::cookie;
use crate::http::router::Req;
use crate::model::{ActivityEvent, Method, Purpose};
use crate::store::{GrantKind, NewUser, WechatBind};
use crate::wechat::{
    BIND_TTL_SECS, LinkingSession, OauthState, STATE_TTL_SECS, TICKET_TTL_SECS, Wechat,
    WechatError, WechatProfile, mask_id,
};

/// The routes answer 404 when WeChat login is off.
fn enabled(app: &App) -> Result<&Wechat, ApiError> {
    app.wechat.as_ref().ok_or(ApiError::NotFound)
}

const TICKET_REFUSED: &str = "the ticket is wrong, used or expired; log in with WeChat again";
const BIND_REFUSED: &str = "the bind token is wrong, used or expired; log in with WeChat again";

/// GET /auth/wechat/start?next=PATH: 302 to WeChat, with the state in a cookie.
pub async fn start(app: &App, req: Req) -> Result<Resp, ApiError> {
    let wechat = enabled(app)?;
    let next = safe_next(query_value(&req.parts, "next").as_deref());
    let oauth = OauthState { next, link: None };
    let (state, url) = wechat.start(&oauth, now()).await?;
    app.store.engine.flush().await?;
    let mut resp = redirect(&url);
    set_state_cookie(app, &mut resp, &state);
    Ok(resp)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LinkRequest {
    next: Option<String>,
}

#[derive(Serialize)]
struct LinkStarted {
    url: String,
}

/// POST /me/wechat {next?}: the URL that links WeChat to the session's account, with
/// the state in a cookie, as /start does.
pub async fn link(app: &App, req: Req) -> Result<Resp, ApiError> {
    let wechat = enabled(app)?;
    let (user, session) = authenticate(app, &req.parts).await?;
    let body: LinkRequest = req.json(app).await?;
    let oauth = OauthState {
        next: safe_next(body.next.as_deref()),
        link: Some(LinkingSession {
            user_id: user.id,
            session_gen: user.session_gen,
            jti: session.jti,
            sid_key: session.sid_key.map(String::from),
        }),
    };
    let (state, url) = wechat.start(&oauth, now()).await?;
    app.store.engine.flush().await?;
    let mut resp = json_response(StatusCode::OK, &LinkStarted { url });
    set_state_cookie(app, &mut resp, &state);
    Ok(resp)
}

/// DELETE /me/wechat: unbinds WeChat from the session's account (SMS always remains).
pub async fn unlink(app: &App, req: Req) -> Result<Resp, ApiError> {
    enabled(app)?;
    let (user, _) = authenticate(app, &req.parts).await?;
    app.store.users.unlink_wechat(user.id).await?;
    app.store.engine.flush().await?;
    tracing::info!(user_id = user.id, "wechat unlinked");
    Ok(no_content())
}

/// GET /auth/wechat/callback?code=CODE&state=STATE, where WeChat sends the browser back.
/// Every answer is a redirect to a page of this site, with the outcome in the fragment
/// (which never reaches a server log): `wechat_ticket`, `wechat_linked` or `wechat_error`.
pub async fn callback(app: &App, req: Req) -> Result<Resp, ApiError> {
    let wechat = enabled(app)?;
    let client = Client::of(&req);
    let state = query_value(&req.parts, "state").unwrap_or_default();
    let cookie = cookie::read(&req.parts.headers, cookie::WECHAT_STATE).unwrap_or_default();
    // The state must be the one this browser was given: a callback forged into another
    // browser (login CSRF) carries no cookie, or another one.
    let ours = !state.is_empty() && bool::from(state.as_bytes().ct_eq(cookie.as_bytes()));
    let oauth = match ours {
        true => wechat.take_state(&state, now()).await?,
        false => None,
    };
    app.store.engine.flush().await?; // the state is used up
    let Some(oauth) = oauth else {
        tracing::info!("wechat callback refused: state invalid");
        return Ok(back(app, "/", "wechat_error", "wechat_state_invalid"));
    };
    let next = oauth.next.as_str();
    let Some(code) = query_value(&req.parts, "code").filter(|c| !c.is_empty()) else {
        return Ok(back(app, next, "wechat_error", "wechat_denied"));
    };
    let profile = match wechat.user_for_code(&code).await {
        Ok(profile) => profile,
        Err(e) => {
            let err = wechat_error(e);
            return Ok(back(app, next, "wechat_error", err.code()));
        }
    };
    if let Some(session) = &oauth.link {
        let outcome = link_profile(app, &client, session, &profile).await;
        return Ok(match outcome {
            Ok(()) => back(app, next, "wechat_linked", "1"),
            Err(e) => back(app, next, "wechat_error", e.code()),
        });
    }
    let ticket = wechat
        .grant(GrantKind::WechatTicket, &profile, now(), TICKET_TTL_SECS)
        .await?;
    app.store.engine.flush().await?;
    Ok(back(app, next, "wechat_ticket", &ticket))
}

/// Links the WeChat user to the account that asked, if its session is still current.
async fn link_profile(
    app: &App,
    client: &Client,
    session: &LinkingSession,
    profile: &WechatProfile,
) -> Result<(), ApiError> {
    let user_id = session.user_id;
    let user = app
        .store
        .sessions
        .session_user(user_id, &session.jti, session.sid_key.as_deref())
        .await?;
    if !user.is_some_and(|u| !u.disabled && u.session_gen == session.session_gen) {
        return Err(ApiError::Unauthorized("the session that asked has ended"));
    }
    let outcome = app
        .store
        .users
        .link_wechat(user_id, &profile.id, profile.avatar_url.as_deref())
        .await?;
    if let WechatBind::Bound { .. } = outcome {
        let bound = ActivityEvent::WechatBind;
        app.activity
            .record(user_id, bound, Some(Method::Wechat), client.origin(), now())
            .await?;
    }
    app.store.engine.flush().await?;
    match outcome {
        WechatBind::Bound { .. } => {
            tracing::info!(user_id, wechat = %mask_id(&profile.id), "wechat linked");
            Ok(())
        }
        other => Err(refusal(other)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExchangeRequest {
    ticket: String,
}

#[derive(Serialize)]
struct PhoneRequired {
    phone_required: bool,
    bind_token: String,
    expires_in: i64,
    profile: ProfileView,
}

#[derive(Serialize)]
struct ProfileView {
    nickname: String,
    avatar_url: Option<String>,
}

/// POST /auth/wechat/exchange {ticket}: a login if the WeChat user is bound to an
/// account, else a bind token to bind a phone with.
pub async fn exchange(app: &App, req: Req) -> Result<Resp, ApiError> {
    let wechat = enabled(app)?;
    let client = Client::of(&req);
    let body: ExchangeRequest = req.json(app).await?;
    let now = now();
    let profile = wechat
        .redeem(GrantKind::WechatTicket, &body.ticket, now)
        .await?
        .ok_or_else(|| ApiError::InvalidRequest(TICKET_REFUSED.into()))?;
    let users = &app.store.users;
    let bound = users
        .log_in_wechat(&profile.id, now, profile.avatar_url.as_deref())
        .await?;
    if let Some(user) = bound {
        app.store.engine.flush().await?;
        if user.disabled {
            return Err(ApiError::Unauthorized("this account is disabled"));
        }
        tracing::info!(user_id = user.id, wechat = %mask_id(&profile.id), "wechat login");
        app.metrics.login("wechat");
        let view = UserView::load(app, &user).await?;
        let login = (&client, Method::Wechat);
        return token_response(app, login, &user, view, false, StatusCode::OK).await;
    }
    let bind_token = wechat
        .grant(GrantKind::WechatBind, &profile, now, BIND_TTL_SECS)
        .await?;
    app.store.engine.flush().await?;
    Ok(json_response(
        StatusCode::OK,
        &PhoneRequired {
            phone_required: true,
            bind_token,
            expires_in: BIND_TTL_SECS,
            profile: ProfileView {
                nickname: profile.nickname,
                avatar_url: profile.avatar_url,
            },
        },
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BindRequest {
    bind_token: String,
    phone: String,
    code: String,
}

/// POST /auth/wechat/bind {bind_token, phone, code}: binds the WeChat user to the
/// phone's account (made, with both methods, if the phone has none) and logs in.
pub async fn bind(app: &App, req: Req) -> Result<Resp, ApiError> {
    let wechat = enabled(app)?;
    let client = Client::of(&req);
    let body: BindRequest = req.json(app).await?;
    let phone = parse_phone(app, &body.phone)?;
    // The code first: a mistyped code leaves the bind token for the next try.
    consume_code(app, &phone, Purpose::Login, &body.code).await?;
    let now = now();
    let taken = wechat
        .redeem(GrantKind::WechatBind, &body.bind_token, now)
        .await?;
    app.store.engine.flush().await?; // the code (and the token) are used up
    let profile = taken.ok_or_else(|| ApiError::InvalidRequest(BIND_REFUSED.into()))?;
    let new = NewUser {
        phone: phone.as_str(),
        index: phone.index,
        other: phone.other,
        // WeChat's nickname if it makes a valid one, else the usual masked number.
        nickname: nickname(&profile.nickname)
            .unwrap_or_else(|_| default_nickname(&phone, &app.cfg.phone.country_code)),
        created_at: now,
        last_login_at: Some(now),
        avatar_url: profile.avatar_url.clone(),
    };
    let outcome = app
        .store
        .users
        .bind_wechat_to_phone(new, &profile.id)
        .await?;
    app.store.engine.flush().await?;
    let WechatBind::Bound { user, created } = outcome else {
        return Err(refusal(outcome));
    };
    // Durable with the login's entry, in token_response's flush.
    app.activity
        .record(
            user.id,
            ActivityEvent::WechatBind,
            Some(Method::Wechat),
            client.origin(),
            now,
        )
        .await?;
    tracing::info!(user_id = user.id, phone = %phone.masked(), wechat = %mask_id(&profile.id), created, "wechat bound");
    app.metrics.login("wechat");
    if created {
        app.metrics.registration("wechat");
    }
    let view = if created {
        let wechat_method = crate::model::LoginMethod {
            method: Method::Wechat,
            identification: profile.id.clone(),
            access_code: None,
        };
        UserView::new(&user, &[sms_method(&phone), wechat_method])
    } else {
        UserView::load(app, &user).await?
    };
    token_response(
        app,
        (&client, Method::Wechat),
        &user,
        view,
        created,
        StatusCode::OK,
    )
    .await
}

/// The API error of a bind that did not happen.
fn refusal(outcome: WechatBind) -> ApiError {
    match outcome {
        WechatBind::Taken => ApiError::WechatTaken,
        WechatBind::AlreadyBound => ApiError::WechatAlreadyBound,
        WechatBind::Disabled => ApiError::Unauthorized("this account is disabled"),
        WechatBind::NoUser | WechatBind::Bound { .. } => {
            ApiError::Unauthorized("the account no longer exists")
        }
    }
}

/// WeChat's failure as the API's, logged once here; configuration errors name the key.
fn wechat_error(e: WechatError) -> ApiError {
    match e {
        WechatError::CodeInvalid(errcode) => {
            tracing::info!(errcode, "wechat refused the authorization code");
            ApiError::WechatCodeInvalid
        }
        WechatError::Config(why) => {
            tracing::error!(problem = why, "wechat login is misconfigured");
            ApiError::WechatFailed
        }
        WechatError::Failed(why) => {
            tracing::warn!(problem = %why, "wechat login failed");
            ApiError::WechatFailed
        }
    }
}

/// 302 to `next` with `key=value` in the fragment, the state cookie cleared.
fn back(app: &App, next: &str, key: &str, value: &str) -> Resp {
    let mut resp = redirect(&format!("{next}#{key}={value}"));
    set_state_cookie(app, &mut resp, "");
    resp
}

fn set_state_cookie(app: &App, resp: &mut Resp, state: &str) {
    // As long as the state lives; an empty state clears the cookie.
    let max_age = if state.is_empty() {
        0
    } else {
        STATE_TTL_SECS as u64
    };
    let value = cookie::wechat_state(&app.cfg.token, state, max_age);
    resp.headers_mut().append(SET_COOKIE, value);
}

/// `next` if it is a path on this site, else `/`: it must start with one `/` (not `//`
/// or `/\`, which browsers take for another host), be printable ASCII without `\`,
/// and at most 512 bytes. Its own fragment is dropped: ours follows.
pub fn safe_next(next: Option<&str>) -> String {
    let Some(next) = next else {
        return "/".into();
    };
    let next = next.split('#').next().unwrap_or("");
    let printable = next.bytes().all(|b| b.is_ascii_graphic() && b != b'\\');
    if next.starts_with('/') && !next.starts_with("//") && printable && next.len() <= 512 {
        next.to_owned()
    } else {
        "/".into()
    }
}

/// One value of the query string, percent-decoded (`+` is a space), if present.
pub(super) fn query_value(parts: &http::request::Parts, name: &str) -> Option<String> {
    let query = parts.uri.query()?;
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| {
            let v = v.replace('+', " ");
            percent_decode_str(&v).decode_utf8_lossy().into_owned()
        })
    })
}

#[cfg(test)]
mod tests {
    use super::safe_next;

    #[test]
    fn next_is_a_path_on_this_site_or_the_root() {
        for ok in ["/", "/app", "/a/b?x=1&y=%20"] {
            assert_eq!(safe_next(Some(ok)), ok);
        }
        assert_eq!(safe_next(Some("/app#old")), "/app");
        for bad in [
            "//evil.example",
            "/\\evil.example",
            "https://evil.example/",
            "evil.example",
            "/a b",
            "/a\\b",
            "/\u{7f}",
            "/é",
            "",
            "javascript:alert(1)",
        ] {
            assert_eq!(safe_next(Some(bad)), "/", "{bad:?}");
        }
        assert_eq!(safe_next(Some(&format!("/{}", "a".repeat(600)))), "/");
        assert_eq!(safe_next(None), "/");
    }
}
