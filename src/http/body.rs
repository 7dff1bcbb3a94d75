//! Request bodies in, JSON answers out. Every failure here is a 4xx with a message that
//! says what to fix; nothing a client sends can make this panic.

use std::time::Duration;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use http::{HeaderMap, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

pub type Resp = Response<Full<Bytes>>;

/// A body that trickles in slower than this is abandoned.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads a JSON body of at most `limit` bytes into `T`.
pub async fn json<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Incoming,
    limit: usize,
) -> Result<T, ApiError> {
    if !is_json(headers) {
        return Err(ApiError::UnsupportedMediaType);
    }
    let bytes = read_limited(headers, body, limit).await?;
    parse(&bytes)
}

/// [`json`] for a body that may be left out: a missing or empty body is `T::default()`.
pub async fn optional_json<T: DeserializeOwned + Default>(
    headers: &HeaderMap,
    body: Incoming,
    limit: usize,
) -> Result<T, ApiError> {
    let bytes = read_limited(headers, body, limit).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    if !is_json(headers) {
        return Err(ApiError::UnsupportedMediaType);
    }
    parse(&bytes)
}

async fn read_limited(
    headers: &HeaderMap,
    body: Incoming,
    limit: usize,
) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let collected = tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, limit).collect())
        .await
        .map_err(|_| ApiError::InvalidRequest("the request body did not arrive in time".into()))?
        .map_err(|e| {
            if e.downcast_ref::<LengthLimitError>().is_some() {
                ApiError::PayloadTooLarge { limit }
            } else {
                ApiError::InvalidRequest("the request body could not be read".into())
            }
        })?;
    Ok(collected.to_bytes())
}

fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        let mut msg = format!("invalid JSON body: {e}");
        if msg.len() > 200 {
            let cut = (0..=200)
                .rev()
                .find(|&i| msg.is_char_boundary(i))
                .unwrap_or(0);
            msg.truncate(cut);
            msg.push('…');
        }
        ApiError::InvalidRequest(msg)
    })
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let media = value.split(';').next().unwrap_or("").trim();
    media.eq_ignore_ascii_case("application/json")
}

pub fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Resp {
    let body = serde_json::to_vec(value).expect("response types serialize");
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    // Answers carry tokens and personal data: never cache them.
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// 302 to `location`: a URL we built (WeChat's authorize page) or a checked path.
pub fn redirect(location: &str) -> Resp {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::FOUND;
    let headers = resp.headers_mut();
    // Every part is ASCII: percent-encoded, or checked to be printable.
    if let Ok(location) = HeaderValue::from_str(location) {
        headers.insert(http::header::LOCATION, location);
    }
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

pub fn no_content() -> Resp {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::NO_CONTENT;
    resp
}

pub fn error_response(err: &ApiError) -> Resp {
    let mut resp = json_response(err.status(), &err.body());
    if let Some(secs) = err.retry_after() {
        resp.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    if let ApiError::MethodNotAllowed { allow } = err
        && let Ok(allow) = HeaderValue::from_str(allow)
    {
        resp.headers_mut().insert(http::header::ALLOW, allow);
    }
    resp
}
