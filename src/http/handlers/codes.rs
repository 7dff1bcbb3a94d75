//! POST /sms/code and POST /auth/verify.

use http::StatusCode;
use serde::Deserialize;

use super::{consume_code, parse_phone};
use crate::app::App;
use crate::error::ApiError;
use crate::http::body::{Resp, json_response};
use crate::http::router::Req;
use crate::metrics::SendLabels;
use crate::model::Purpose;
use crate::sms::{Outcome, Outgoing, SmsError};

#[derive(Deserialize)]
struct SendCodeRequest {
    phone: String,
    #[serde(default = "login")]
    purpose: Purpose,
    captcha_id: Option<String>,
    captcha_answer: Option<String>,
}

fn login() -> Purpose {
    Purpose::Login
}

/// Sends a new code, in seed 004's order: the captcha first, before anything that tells
/// whether the phone has an account; then the per-phone wait and the daily quotas. The
/// code is durable before the SMS leaves, so a code a user receives survives a crash; a
/// failed send gives the wait and the quota back.
pub async fn send_code(app: &App, req: Req) -> Result<Resp, ApiError> {
    let body: SendCodeRequest = req.json(app).await?;
    let phone = parse_phone(app, &body.phone)?;
    let purpose = body.purpose;
    if app.captchas.required() {
        let (Some(id), Some(answer)) = (&body.captcha_id, &body.captcha_answer) else {
            return Err(ApiError::CaptchaRequired);
        };
        if !app.captchas.check(id, answer).await? {
            return Err(ApiError::CaptchaInvalid);
        }
    }
    let has_account = app.store.users.phone_has_user(&phone).await?;
    if purpose == Purpose::Register && has_account {
        return Err(ApiError::PhoneTaken);
    }
    app.codes
        .reserve_send(&phone)
        .await?
        .map_err(|wait| ApiError::rate_limited("resend_interval", wait))?;
    let quota = match app.limits.take_send_quota(&phone).await {
        Ok(quota) => quota,
        Err(limited) => {
            app.codes.release_send(&phone).await?;
            return Err(limited.into());
        }
    };
    if matches!(purpose, Purpose::ResetPassword | Purpose::DeleteAccount) && !has_account {
        // Answer exactly as if a code went out (wait, quota and time taken included),
        // so this endpoint does not tell who has an account; there is nothing to reset
        // or delete.
        app.store.engine.flush().await?;
        app.sms.imitate().await;
        return Ok(code_sent(app));
    }
    if let Err(e) = deliver(app, &phone, purpose).await {
        app.codes.release_send(&phone).await?;
        app.limits.give_back(quota).await?;
        return Err(e);
    }
    Ok(code_sent(app))
}

/// Makes, stores (durably) and sends a code. On failure nothing is kept.
async fn deliver(
    app: &App,
    phone: &crate::phone::IndexedPhone,
    purpose: Purpose,
) -> Result<(), ApiError> {
    let code = app.codes.generate();
    app.codes.put(phone, purpose, &code).await?;
    app.store.engine.flush().await?;
    let outgoing = Outgoing {
        phone,
        code: &code,
        purpose,
        expires_in: app.codes.ttl_secs(),
    };
    // Sms::send writes the log line for every outcome.
    let sent = app.sms.send(&outgoing).await;
    let result = sent.as_ref().map_or_else(|e| e.outcome(), |()| Outcome::Ok);
    app.metrics
        .sms_sends
        .get_or_create(&SendLabels {
            provider: app.sms.provider(),
            result: result.as_str(),
        })
        .inc();
    let Err(e) = sent else {
        return Ok(());
    };
    app.codes.discard(phone, purpose).await?;
    Err(match e {
        SmsError::InvalidPhone(_) => ApiError::InvalidPhone,
        SmsError::RateLimited(_) => {
            ApiError::rate_limited("provider", app.codes.resend_interval_secs().max(60))
        }
        SmsError::Transport(_) | SmsError::Refused(_) => ApiError::SmsFailed,
    })
}

fn code_sent(app: &App) -> Resp {
    json_response(
        StatusCode::OK,
        &serde_json::json!({
            "expires_in": app.codes.ttl_secs(),
            "resend_after": app.codes.resend_interval_secs(),
        }),
    )
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
    app.store.engine.flush().await?;
    let ticket = app.tokens.issue_verification(phone.as_str(), body.purpose);
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({ "verification_token": ticket.token, "expires_in": ticket.expires_in }),
    ))
}
