//! Endpoints for probes and operators.

use http::StatusCode;

use crate::app::App;
use crate::error::ApiError;
use crate::http::body::{Resp, json_response};

/// GET /healthz: the process answers and its store is readable.
pub async fn healthz(app: &App) -> Result<Resp, ApiError> {
    app.store.user_count()?;
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({ "status": "ok" }),
    ))
}
