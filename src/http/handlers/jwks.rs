//! GET /.well-known/jwks.json: the public keys that check our tokens, for a site's own
//! services (docs/integrate.md).

use http::Response;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use http_body_util::Full;

use crate::app::App;
use crate::error::ApiError;
use crate::http::body::Resp;

/// How long a client may keep the key set without asking again. A rotated-in key is used
/// at once, so a client that meets an unknown `kid` should fetch the set anew (PyJWT's
/// PyJWKClient and jose's createRemoteJWKSet do).
const MAX_AGE: &str = "max-age=300";

/// The signing key and the retired keys that still verify. 404 when tokens are HS256:
/// a shared secret is never published.
pub fn jwks(app: &App) -> Result<Resp, ApiError> {
    let body = app.tokens.jwks().ok_or(ApiError::NotFound)?;
    let mut resp = Response::new(Full::new(body));
    let headers = resp.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/jwk-set+json"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static(MAX_AGE));
    Ok(resp)
}
