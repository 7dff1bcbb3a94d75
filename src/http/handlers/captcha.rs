//! POST /captcha: a new image captcha.

use http::StatusCode;

use crate::app::App;
use crate::error::ApiError;
use crate::http::body::{Resp, json_response};

pub async fn create(app: &App) -> Result<Resp, ApiError> {
    let challenge = app
        .captchas
        .create()
        .await?
        .ok_or_else(|| ApiError::Internal("captcha rendering failed".into()))?;
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({
            "captcha_id": challenge.id,
            "image": challenge.image,
            "expires_in": challenge.expires_in,
        }),
    ))
}
