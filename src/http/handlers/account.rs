//! GET /me and PATCH /me.

use http::StatusCode;
use serde::Deserialize;

use super::{UserView, authenticate};
use crate::app::App;
use crate::error::ApiError;
use crate::http::body::{Resp, json_response};
use crate::http::router::Req;

pub async fn get_me(app: &App, req: Req) -> Result<Resp, ApiError> {
    let (user, _) = authenticate(app, &req.parts.headers)?;
    Ok(json_response(StatusCode::OK, &UserView::load(app, &user)?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchMe {
    nickname: String,
}

const NICKNAME_MAX_CHARS: usize = 32;

pub async fn patch_me(app: &App, req: Req) -> Result<Resp, ApiError> {
    let (user, _) = authenticate(app, &req.parts.headers)?;
    let body: PatchMe = req.json(app).await?;
    let nickname = body.nickname.trim();
    let chars = nickname.chars().count();
    if chars == 0 || chars > NICKNAME_MAX_CHARS || nickname.chars().any(|c| c.is_control()) {
        return Err(ApiError::InvalidRequest(format!(
            "nickname must be 1 to {NICKNAME_MAX_CHARS} characters, without control characters"
        )));
    }
    let user = app
        .store
        .update_user(user.id, &mut |u| u.nickname = nickname.to_owned())?
        .ok_or(ApiError::Unauthorized("the account no longer exists"))?;
    app.store.flush().await?;
    Ok(json_response(StatusCode::OK, &UserView::load(app, &user)?))
}
