//! GET /me and PATCH /me.

use http::StatusCode;
use serde::Deserialize;

use super::{UserView, authenticate, authenticate_with_methods, nickname};
use crate::app::App;
use crate::error::ApiError;
use crate::http::body::{Resp, json_response};
use crate::http::router::Req;
use crate::store::UserChange;

pub async fn get_me(app: &App, req: Req) -> Result<Resp, ApiError> {
    let (user, methods) = authenticate_with_methods(app, &req.parts).await?;
    Ok(json_response(
        StatusCode::OK,
        &UserView::new(&user, &methods),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchMe {
    nickname: String,
}

pub async fn patch_me(app: &App, req: Req) -> Result<Resp, ApiError> {
    let (user, _) = authenticate(app, &req.parts).await?;
    let body: PatchMe = req.json(app).await?;
    let nickname = nickname(&body.nickname)?;
    let user = app
        .store
        .users
        .update_user(user.id, UserChange::Nickname(nickname))
        .await?
        .ok_or(ApiError::Unauthorized("the account no longer exists"))?;
    app.store.engine.flush().await?;
    Ok(json_response(
        StatusCode::OK,
        &UserView::load(app, &user).await?,
    ))
}
