//! Endpoints for probes and operators.

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;

use crate::app::App;
use crate::error::ApiError;
use crate::http::body::{Resp, json_response};

#[derive(serde::Serialize)]
struct Health {
    status: &'static str,
}

/// GET /healthz: the process serves. It does not ask the store: an instance whose
/// database is down is alive, and must not be restarted for it.
pub fn healthz() -> Resp {
    json_response(StatusCode::OK, &Health { status: "ok" })
}

/// GET /readyz: the store answers now (one read that goes to the engine); 503
/// `unavailable` while it does not.
pub async fn readyz(app: &App) -> Result<Resp, ApiError> {
    app.store.engine.ready().await?;
    Ok(json_response(StatusCode::OK, &Health { status: "ok" }))
}

/// GET /metrics: Prometheus text format. State gauges are read now, counters are live.
pub async fn metrics(app: &App) -> Result<Resp, ApiError> {
    let m = &app.metrics;
    m.observe();
    app.store.engine.observe();
    m.users.set(app.store.users.user_count().await? as i64);
    m.store_bytes
        .set(app.store.engine.size_on_disk().await? as i64);
    m.pending_codes.set(app.codes.pending_count().await? as i64);
    for (limiter, tracked) in app.limits.tracked_addresses().await? {
        m.tracked_addresses
            .get_or_create(&crate::metrics::LimiterLabels { limiter })
            .set(tracked as i64);
    }
    let mut resp = Response::new(Full::new(Bytes::from(m.render())));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

/// The OpenAPI 3.1 description of the whole HTTP API (docs/openapi.json), embedded.
pub const OPENAPI: &str = include_str!("../../../docs/openapi.json");

/// GET /api/v1/openapi.json: the API description, as kept in the repository.
pub fn openapi() -> Resp {
    let mut resp = Response::new(Full::new(Bytes::from_static(OPENAPI.as_bytes())));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    // It changes with the binary: revalidate, never serve a stale copy.
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}
