//! Password accounts: POST /auth/register, POST /auth/login, POST /auth/password/reset.
//! Seeds 002 to 004's flows: register with a code (or the ticket of an earlier verify
//! step) and a password, log in by password, reset it with a code.

use http::StatusCode;
use serde::Deserialize;

use super::session::{default_nickname, sms_method, token_response};
use super::{Client, UserView, nickname, parse_phone, redeem_proof};
use crate::app::App;
use crate::clock::now;
use crate::error::ApiError;
use crate::http::body::{Resp, no_content};
use crate::http::router::Req;
use crate::model::{ActivityEvent, LoginMethod, Method, Purpose};
use crate::password::check_rules;
use crate::phone::Phone;
use crate::store::{NewUser, UserChange};

fn password_method(phone: &Phone, phc: String) -> LoginMethod {
    LoginMethod {
        method: Method::Password,
        identification: phone.as_str().to_owned(),
        access_code: Some(phc),
    }
}

#[derive(Deserialize)]
struct RegisterRequest {
    phone: String,
    code: Option<String>,
    verification_token: Option<String>,
    password: String,
    nickname: Option<String>,
}

/// Creates a password account for a phone proven by a `register` code or ticket.
/// 409 phone_taken if the phone has an account, also when registrations race: the
/// store's create is atomic, so exactly one of them gets 201.
pub async fn register(app: &App, req: Req) -> Result<Resp, ApiError> {
    let client = Client::of(&req);
    let body: RegisterRequest = req.json(app).await?;
    let phone = parse_phone(app, &body.phone)?;
    // Check what is cheap first, so a rejected password does not use up the code.
    check_rules(&body.password).map_err(ApiError::WeakPassword)?;
    let nickname = match &body.nickname {
        Some(n) => nickname(n)?,
        None => default_nickname(&phone, &app.cfg.phone.country_code),
    };
    // The proof comes before anything that depends on the account, so only the phone's
    // holder learns whether it is taken.
    redeem_proof(
        app,
        &phone,
        Purpose::Register,
        body.code.as_deref(),
        body.verification_token.as_deref(),
    )
    .await?;
    let phc = app.passwords.hash(&body.password).await?;
    let now = now();
    let new = NewUser {
        phone: phone.as_str(),
        index: phone.index,
        other: phone.other,
        nickname,
        created_at: now,
        last_login_at: Some(now),
        avatar_url: None,
    };
    let methods = [sms_method(&phone), password_method(&phone, phc)];
    let (user, created) = app.store.users.create_user_if_absent(new, &methods).await?;
    app.store.engine.flush().await?; // the proof is used up either way
    if !created {
        return Err(ApiError::PhoneTaken);
    }
    tracing::info!(user_id = user.id, phone = %phone.masked(), "registered with a password");
    app.metrics.registration("password");
    let view = UserView::new(&user, &methods);
    let login = (&client, Method::Password);
    token_response(app, login, &user, view, true, StatusCode::CREATED).await
}

#[derive(Deserialize)]
struct LoginRequest {
    phone: String,
    password: String,
}

/// Unknown phone, wrong password and an account without a password get the same 401
/// invalid_credentials in the same time: each costs one argon2 verification.
pub async fn login(app: &App, req: Req) -> Result<Resp, ApiError> {
    let client = Client::of(&req);
    let body: LoginRequest = req.json(app).await?;
    let phone = parse_phone(app, &body.phone)?;
    let user = app.store.users.find_by_phone(&phone).await?;
    let stored = match &user {
        Some(u) => app
            .store
            .users
            .login_methods(u)
            .await?
            .into_iter()
            .find(|m| m.method == Method::Password)
            .and_then(|m| m.access_code),
        None => None,
    };
    let checked = app
        .passwords
        .check(&body.password, stored.as_deref())
        .await?;
    let user = match user {
        Some(user) if checked.matches => user,
        Some(user) => {
            // Made durable by the next flush of anything: a refusal promises nothing.
            let failed = ActivityEvent::LoginFailed;
            let method = Some(Method::Password);
            app.activity
                .record(user.id, failed, method, client.origin(), now())
                .await?;
            return Err(ApiError::InvalidCredentials);
        }
        None => return Err(ApiError::InvalidCredentials),
    };
    if user.disabled {
        return Err(ApiError::Unauthorized("this account is disabled"));
    }
    if checked.needs_rehash {
        let phc = app.passwords.hash(&body.password).await?;
        app.store
            .users
            .put_login_method(user.id, &password_method(&phone, phc))
            .await?;
    }
    let now = now();
    let user = app
        .store
        .users
        .update_user(user.id, UserChange::LoggedIn { at: now })
        .await?
        .ok_or_else(|| ApiError::Internal("user vanished during login".into()))?;
    app.store.engine.flush().await?;
    tracing::info!(user_id = user.id, phone = %phone.masked(), "password login");
    app.metrics.login("password");
    let view = UserView::load(app, &user).await?;
    token_response(
        app,
        (&client, Method::Password),
        &user,
        view,
        false,
        StatusCode::OK,
    )
    .await
}

#[derive(Deserialize)]
struct ResetRequest {
    phone: String,
    code: Option<String>,
    verification_token: Option<String>,
    new_password: String,
}

/// Sets or replaces the password of a phone proven by a `reset_password` code or ticket,
/// and ends every session the user had (restarts included: the session generation is
/// stored with the new password, in one transaction).
pub async fn reset(app: &App, req: Req) -> Result<Resp, ApiError> {
    let client = Client::of(&req);
    let body: ResetRequest = req.json(app).await?;
    let phone = parse_phone(app, &body.phone)?;
    check_rules(&body.new_password).map_err(ApiError::WeakPassword)?;
    redeem_proof(
        app,
        &phone,
        Purpose::ResetPassword,
        body.code.as_deref(),
        body.verification_token.as_deref(),
    )
    .await?;
    // Codes are never sent for phones without an account, so this only fails if the
    // account was deleted meanwhile; answer as for any unusable code.
    let user = app
        .store
        .users
        .find_by_phone(&phone)
        .await?
        .ok_or(ApiError::InvalidCode)?;
    let phc = app.passwords.hash(&body.new_password).await?;
    app.store
        .users
        .put_login_method_ending_sessions(user.id, &password_method(&phone, phc))
        .await?
        .ok_or(ApiError::InvalidCode)?;
    let changed = ActivityEvent::PasswordChange;
    app.activity
        .record(user.id, changed, None, client.origin(), now())
        .await?;
    app.store.engine.flush().await?;
    tracing::info!(user_id = user.id, phone = %phone.masked(), "password reset; sessions ended");
    Ok(no_content())
}
