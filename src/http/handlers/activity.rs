//! The account holder's own data: GET /me/activity (the login activity, a page at a
//! time), GET /me/export (every record held about the account, as one JSON document) and
//! POST /me/delete (the account erased, with a `delete_account` code).

use http::StatusCode;
use http::header::{CONTENT_DISPOSITION, HeaderValue, SET_COOKIE};
use serde::{Deserialize, Serialize};

use super::wechat::query_value;
use super::{UserView, authenticate, consume_code, parse_phone};
use crate::activity::{PAGE, id_text, parse_id};
use crate::app::App;
use crate::clock::{now, rfc3339};
use crate::error::ApiError;
use crate::http::body::{Resp, json_response, no_content};
use crate::http::cookie;
use crate::http::router::Req;
use crate::model::Purpose;
use crate::sessions;
use crate::store::{ActivityEntry, SessionRecord};

/// One entry of the login activity as the API shows it.
#[derive(Serialize)]
struct EntryView {
    /// What `?before=` takes to page back past this entry.
    id: String,
    at: String,
    event: &'static str,
    method: Option<&'static str>,
    ip: String,
    user_agent: String,
}

impl EntryView {
    fn new(e: ActivityEntry) -> EntryView {
        EntryView {
            id: id_text(&e),
            at: rfc3339(e.at),
            event: e.event.as_str(),
            method: e.method.map(|m| m.as_str()),
            ip: e.ip,
            user_agent: e.user_agent,
        }
    }
}

#[derive(Serialize)]
struct ActivityPage {
    activity: Vec<EntryView>,
    /// The `before` of the next (older) page; null on the last one.
    next_before: Option<String>,
}

/// GET /me/activity[?before=ID]: the 50 most recent entries (before entry ID), newest
/// first.
pub async fn list(app: &App, req: Req) -> Result<Resp, ApiError> {
    let (user, _) = authenticate(app, &req.parts).await?;
    let before = match query_value(&req.parts, "before") {
        Some(text) => Some(parse_id(&text).ok_or_else(|| {
            ApiError::InvalidRequest("`before` must be the id of an activity entry".into())
        })?),
        None => None,
    };
    let mut entries = app.activity.page(user.id, before, PAGE + 1).await?;
    let more = entries.len() > PAGE;
    entries.truncate(PAGE);
    let next_before = entries.last().filter(|_| more).map(id_text);
    Ok(json_response(
        StatusCode::OK,
        &ActivityPage {
            activity: entries.into_iter().map(EntryView::new).collect(),
            next_before,
        },
    ))
}

/// The account as an export shows it: [`UserView`] and its state.
#[derive(Serialize)]
struct Profile {
    #[serde(flatten)]
    view: UserView,
    disabled: bool,
}

/// A login method without its secret.
#[derive(Serialize)]
struct MethodView {
    method: &'static str,
    identification: String,
}

/// A stored session, ended and expired ones included.
#[derive(Serialize)]
struct SessionExport {
    id: String,
    method: &'static str,
    created_at: String,
    last_used_at: String,
    expires_at: String,
    ip: String,
    user_agent: String,
    ended: bool,
}

impl SessionExport {
    fn new(s: SessionRecord) -> SessionExport {
        SessionExport {
            id: sessions::id_text(&s.id),
            method: s.method.as_str(),
            created_at: rfc3339(s.created_at),
            last_used_at: rfc3339(s.last_used_at),
            expires_at: rfc3339(s.expires_at),
            ip: s.ip,
            user_agent: s.user_agent,
            ended: s.ended,
        }
    }
}

#[derive(Serialize)]
struct Export {
    exported_at: String,
    profile: Profile,
    login_methods: Vec<MethodView>,
    sessions: Vec<SessionExport>,
    activity: Vec<EntryView>,
}

/// GET /me/export: every record held about the account, as a file to save.
pub async fn export(app: &App, req: Req) -> Result<Resp, ApiError> {
    let (user, _) = authenticate(app, &req.parts).await?;
    let methods = app.store.users.login_methods(&user).await?;
    let (mut stored, activity) = tokio::try_join!(
        app.store.sessions.user_sessions(user.id),
        app.activity.all(user.id),
    )?;
    stored.sort_by_key(|s| (s.created_at, s.id));
    let export = Export {
        exported_at: rfc3339(now()),
        profile: Profile {
            view: UserView::new(&user, &methods),
            disabled: user.disabled,
        },
        // The password's hash is a secret: the method is named, its hash never shown.
        login_methods: methods
            .into_iter()
            .map(|m| MethodView {
                method: m.method.as_str(),
                identification: m.identification,
            })
            .collect(),
        sessions: stored.into_iter().map(SessionExport::new).collect(),
        activity: activity.into_iter().map(EntryView::new).collect(),
    };
    let mut resp = json_response(StatusCode::OK, &export);
    resp.headers_mut().insert(
        CONTENT_DISPOSITION,
        HeaderValue::from_static("attachment; filename=\"smsauth-export.json\""),
    );
    Ok(resp)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteRequest {
    code: String,
}

/// POST /me/delete {code}: with a `delete_account` code sent to the account's phone,
/// deletes the account and everything tied to it (login methods, sessions, activity)
/// at once: every token of it is refused from the answer on. The phone's abuse counters
/// stay. 204.
pub async fn delete(app: &App, req: Req) -> Result<Resp, ApiError> {
    let (user, _) = authenticate(app, &req.parts).await?;
    let body: DeleteRequest = req.json(app).await?;
    let phone = parse_phone(app, &user.phone)?;
    consume_code(app, &phone, Purpose::DeleteAccount, &body.code).await?;
    let deleted = app.store.users.delete_user(user.id).await?;
    app.store.engine.flush().await?;
    if deleted.is_none() {
        // Deleted meanwhile (a racing request, or an operator): nothing left to do.
        return Err(ApiError::Unauthorized("the account no longer exists"));
    }
    tracing::info!(user_id = user.id, phone = %phone.masked(), "account deleted by its holder");
    let mut resp = no_content();
    if app.cfg.token.cookie {
        let headers = resp.headers_mut();
        headers.append(SET_COOKIE, cookie::clear(&app.cfg.token));
        headers.append(SET_COOKIE, cookie::clear_refresh(&app.cfg.token));
    }
    Ok(resp)
}
