//! POST /sms/code and POST /auth/verify.

use http::StatusCode;
use serde::Deserialize;

use super::{consume_code, parse_phone};
use crate::app::App;
use crate::error::ApiError;
use crate::http::body::{Resp, json_response};
use crate::http::router::Req;
use crate::model::Purpose;
use crate::sms::{Outgoing, SmsError};

#[derive(Deserialize)]
struct SendCodeRequest {
    phone: String,
    #[serde(default = "login")]
    purpose: Purpose,
}

fn login() -> Purpose {
    Purpose::Login
}

/// Sends a new code. The code is durable before the SMS leaves, so a code a user
/// receives survives a crash; a failed send gives the resend interval back.
pub async fn send_code(app: &App, req: Req) -> Result<Resp, ApiError> {
    let body: SendCodeRequest = req.json(app).await?;
    let phone = parse_phone(app, &body.phone)?;
    let purpose = body.purpose;
    app.codes
        .reserve_send(&phone)
        .await
        .map_err(ApiError::rate_limited)?;
    let code = app.codes.generate();
    let stored = async {
        app.codes.put(&phone, purpose, &code).await?;
        app.store.flush().await
    };
    if let Err(e) = stored.await {
        app.codes.release_send(&phone).await;
        return Err(e.into());
    }
    let outgoing = Outgoing {
        phone: &phone,
        code: &code,
        purpose,
        expires_in: app.codes.ttl_secs(),
    };
    // Sms::send writes the log line for every outcome.
    if let Err(e) = app.sms.send(&outgoing).await {
        app.codes.discard(&phone, purpose).await?;
        app.codes.release_send(&phone).await;
        return Err(match e {
            SmsError::InvalidPhone(_) => ApiError::InvalidPhone,
            SmsError::RateLimited(_) => {
                ApiError::rate_limited(app.codes.resend_interval_secs().max(60))
            }
            SmsError::Transport(_) | SmsError::Refused(_) => ApiError::SmsFailed,
        });
    }
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({
            "expires_in": app.codes.ttl_secs(),
            "resend_after": app.codes.resend_interval_secs(),
        }),
    ))
}

#[derive(Deserialize)]
struct VerifyRequest {
    phone: String,
    code: String,
    purpose: Purpose,
}

/// Uses up a code and gives a short-lived single-use ticket for the next step of a
/// multi-step flow (seed 003: verify first, then set a password).
pub async fn verify(app: &App, req: Req) -> Result<Resp, ApiError> {
    let body: VerifyRequest = req.json(app).await?;
    let phone = parse_phone(app, &body.phone)?;
    consume_code(app, &phone, body.purpose, &body.code).await?;
    app.store.flush().await?;
    let ticket = app.tokens.issue_verification(phone.as_str(), body.purpose);
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({ "verification_token": ticket.token, "expires_in": ticket.expires_in }),
    ))
}
