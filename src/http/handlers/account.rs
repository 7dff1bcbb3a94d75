//! GET /me and PATCH /me.

use http::StatusCode;
use serde::Deserialize;

use super::{UserView, authenticate, nickname};
use crate::app::App;
use crate::error::ApiError;
use crate::http::body::{Resp, json_response};
use crate::http::router::Req;

pub async fn get_me(app: &App, req: Req) -> Result<Resp, ApiError> {
    let (user, _) = authenticate(app, &req.parts)?;
    Ok(json_response(StatusCode::OK, &UserView::load(app, &user)?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchMe {
    nickname: String,
}

pub async fn patch_me(app: &App, req: Req) -> Result<Resp, ApiError> {
    let (user, _) = authenticate(app, &req.parts)?;
    let body: PatchMe = req.json(app).await?;
    let nickname = nickname(&body.nickname)?;
    let user = app
        .store
        .update_user(user.id, &mut |u| u.nickname = nickname.clone())?
        .ok_or(ApiError::Unauthorized("the account no longer exists"))?;
    app.store.flush().await?;
    Ok(json_response(StatusCode::OK, &UserView::load(app, &user)?))
}
