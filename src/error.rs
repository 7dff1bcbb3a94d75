//! The API's errors. Each variant is one `error` code of the JSON API; `status()` and
//! `code()` are the only place where an error becomes HTTP. Internal detail (storage, I/O)
//! is logged once here and never sent to a client.

use http::StatusCode;

/// What a 503 tells a client to wait: a database restart takes seconds.
const UNAVAILABLE_RETRY_SECS: u64 = 2;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed JSON, a wrong type, a missing or bad field.
    #[error("{0}")]
    InvalidRequest(String),
    #[error("the phone number is not valid")]
    InvalidPhone,
    /// Wrong, expired, used or for another purpose: one answer, so nothing leaks.
    #[error("the code is wrong or has expired")]
    InvalidCode,
    #[error("{message}")]
    TooManyAttempts {
        message: String,
        retry_after: Option<u64>,
        /// What refused, for metrics (not sent to the client).
        limit: &'static str,
    },
    #[error("{message}")]
    RateLimited {
        message: String,
        retry_after: u64,
        /// What refused, for metrics (not sent to the client).
        limit: &'static str,
    },
    #[error("{0}")]
    Unauthorized(&'static str),
    /// Unknown, expired, used up (past the reuse window) or of an ended session: one
    /// answer, so nothing leaks.
    #[error("the refresh token is invalid, expired or ended; log in again")]
    InvalidRefreshToken,
    /// Unknown phone, wrong password, or no password: one answer, so nothing leaks.
    #[error("the phone number or password is wrong")]
    InvalidCredentials,
    #[error("this phone number already has an account")]
    PhoneTaken,
    #[error("{0}")]
    WeakPassword(String),
    #[error("solve the captcha first: captcha_id and captcha_answer are required")]
    CaptchaRequired,
    /// Wrong, expired or already used.
    #[error("the captcha answer is wrong or the captcha has expired; get a new one")]
    CaptchaInvalid,
    #[error("the SMS could not be sent; try again later")]
    SmsFailed,
    /// WeChat refused its authorization code: unknown, used or expired.
    #[error("WeChat refused the login; scan again")]
    WechatCodeInvalid,
    /// WeChat unreachable, too slow or busy, or refusing our app's configuration.
    #[error("WeChat could not be reached; try again later")]
    WechatFailed,
    #[error("this WeChat account is already bound to another account")]
    WechatTaken,
    #[error("this account is already bound to another WeChat account; unbind it first")]
    WechatAlreadyBound,
    /// A cookie-authenticated change from another origin (CSRF).
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("no such resource")]
    NotFound,
    #[error("this method is not allowed here")]
    MethodNotAllowed { allow: String },
    #[error("the request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("the request body must be JSON (Content-Type: application/json)")]
    UnsupportedMediaType,
    /// The store cannot be reached now (its database is down or overloaded). Detail for
    /// the log only.
    #[error("the service is temporarily unavailable; retry shortly")]
    Unavailable(String),
    /// Detail for the log only.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest(_)
            | ApiError::InvalidPhone
            | ApiError::InvalidCode
            | ApiError::WeakPassword(_)
            | ApiError::CaptchaRequired
            | ApiError::CaptchaInvalid
            | ApiError::WechatCodeInvalid => StatusCode::BAD_REQUEST,
            ApiError::InvalidCredentials => StatusCode::UNAUTHORIZED,
            ApiError::PhoneTaken | ApiError::WechatTaken | ApiError::WechatAlreadyBound => {
                StatusCode::CONFLICT
            }
            ApiError::TooManyAttempts { .. } | ApiError::RateLimited { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::Unauthorized(_) | ApiError::InvalidRefreshToken => StatusCode::UNAUTHORIZED,
            ApiError::SmsFailed | ApiError::WechatFailed => StatusCode::BAD_GATEWAY,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest(_) => "invalid_request",
            ApiError::InvalidPhone => "invalid_phone",
            ApiError::InvalidCode => "invalid_code",
            ApiError::TooManyAttempts { .. } => "too_many_attempts",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::InvalidRefreshToken => "invalid_refresh_token",
            ApiError::InvalidCredentials => "invalid_credentials",
            ApiError::PhoneTaken => "phone_taken",
            ApiError::WeakPassword(_) => "weak_password",
            ApiError::CaptchaRequired => "captcha_required",
            ApiError::CaptchaInvalid => "captcha_invalid",
            ApiError::SmsFailed => "sms_failed",
            ApiError::WechatCodeInvalid => "wechat_code_invalid",
            ApiError::WechatFailed => "wechat_failed",
            ApiError::WechatTaken => "wechat_taken",
            ApiError::WechatAlreadyBound => "wechat_already_bound",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound => "not_found",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }

    /// Seconds a client should wait, for 429 and 503 answers.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::RateLimited { retry_after, .. } => Some(*retry_after),
            ApiError::TooManyAttempts { retry_after, .. } => *retry_after,
            ApiError::Unavailable(_) => Some(UNAVAILABLE_RETRY_SECS),
            _ => None,
        }
    }

    pub fn rate_limited(limit: &'static str, retry_after: u64) -> Self {
        ApiError::RateLimited {
            message: format!("too many requests; retry in {retry_after} s"),
            retry_after,
            limit,
        }
    }

    /// Which limit refused, for 429 answers.
    pub fn limit(&self) -> Option<&'static str> {
        match self {
            ApiError::RateLimited { limit, .. } | ApiError::TooManyAttempts { limit, .. } => {
                Some(limit)
            }
            _ => None,
        }
    }

    /// The JSON body: `{"error", "message"}`, plus `retry_after` on 429s.
    pub fn body(&self) -> serde_json::Value {
        match self {
            ApiError::Internal(detail) => tracing::error!(detail = %detail, "internal error"),
            ApiError::Unavailable(detail) => tracing::warn!(detail = %detail, "store unavailable"),
            _ => {}
        }
        let mut body = serde_json::json!({ "error": self.code(), "message": self.to_string() });
        if let Some(secs) = self.retry_after() {
            body["retry_after"] = secs.into();
        }
        body
    }
}

impl From<crate::password::PasswordError> for ApiError {
    fn from(e: crate::password::PasswordError) -> Self {
        match e {
            crate::password::PasswordError::Busy => ApiError::RateLimited {
                message: "the server is busy checking passwords; retry in a moment".into(),
                retry_after: 1,
                limit: "password_queue",
            },
            crate::password::PasswordError::Internal(detail) => ApiError::Internal(detail),
        }
    }
}

impl From<crate::limits::Limited> for ApiError {
    fn from(e: crate::limits::Limited) -> Self {
        use crate::limits::Limited;
        match e {
            Limited::Address { retry_after }
            | Limited::PhoneDaily { retry_after }
            | Limited::Global { retry_after } => ApiError::RateLimited {
                message: format!("{e}; retry in {retry_after} s"),
                retry_after,
                limit: e.kind(),
            },
            Limited::LockedOut { retry_after } => ApiError::TooManyAttempts {
                message: format!("{e}; this phone is locked for {retry_after} s"),
                retry_after: Some(retry_after),
                limit: e.kind(),
            },
            Limited::Store(e) => e.into(),
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        match e {
            crate::store::StoreError::Unavailable(detail) => ApiError::Unavailable(detail),
            other => ApiError::Internal(format!("store: {other}")),
        }
    }
}
