//! The HTTP server: hyper's HTTP/1.1 connection loop with timeouts, per-request logging,
//! the client address, and graceful shutdown.

pub mod body;
pub mod cookie;
mod handlers;
pub mod router;

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, Request};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::app::App;
use crate::metrics::{LimitLabels, RequestLabels, RouteLabels};
use body::{Resp, error_response};
use router::{Endpoint, Req};

/// How long requests in flight may take to finish once shutdown starts.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// HTTP/1.1 connection settings: keep-alive, a 10 s limit for a request's headers (a
/// timer is required for it), 64 KiB read buffers. Public so the load benchmark's ceiling
/// is served exactly the same way.
pub fn connection_builder() -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .max_buf_size(64 * 1024)
        .keep_alive(true);
    builder
}

/// Serves until `shutdown` resolves, then stops accepting and lets requests in flight
/// finish (up to [`SHUTDOWN_GRACE`]).
pub async fn serve(app: Arc<App>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    let graceful = GracefulShutdown::new();
    let builder = connection_builder();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let app = app.clone();
                let service = service_fn(move |req| handle(app.clone(), peer, req));
                let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still in flight after {SHUTDOWN_GRACE:?}; closing them");
    }
}

async fn handle(
    app: Arc<App>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Resp, Infallible> {
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let ip = client_ip(app.cfg.server.trust_proxy, peer, &parts.headers);
    let method = method_label(&parts.method);
    // A shared handle on the request's path bytes (no copy), for the log line.
    let uri = parts.uri.clone();
    let resolved = router::resolve(parts.method.as_str(), parts.uri.path());
    let route = resolved.as_ref().map_or("unmatched", |e| e.path());
    let probe = resolved
        .as_ref()
        .is_ok_and(|e| matches!(e, Endpoint::Healthz | Endpoint::Readyz | Endpoint::Metrics));
    let result = match resolved {
        Ok(endpoint) => router::dispatch(&app, endpoint, Req { parts, body, ip }).await,
        Err(e) => Err(e),
    };
    let response = result.unwrap_or_else(|err| {
        if let Some(limit) = err.limit() {
            app.metrics
                .rate_limited
                .get_or_create(&LimitLabels { limit })
                .inc();
        }
        error_response(&err)
    });
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    app.metrics
        .requests
        .get_or_create(&RequestLabels {
            route,
            method,
            status,
        })
        .inc();
    app.metrics
        .latency
        .get_or_create(&RouteLabels { route })
        .observe(elapsed.as_secs_f64());
    let latency_ms = elapsed.as_micros() as f64 / 1000.0;
    let path = first_chars(uri.path(), 128);
    if !app.cfg.log.requests {
        // The operator's proxy logs every request already.
    } else if probe && status == 200 {
        // A probe or a scrape every few seconds that went well tells an operator nothing;
        // at info level it would bury the lines that do (and cost as much as the answer).
        tracing::debug!(method, path = %path, status, latency_ms, ip = %ip, "request");
    } else {
        tracing::info!(method, path = %path, status, latency_ms, ip = %ip, "request");
    }
    Ok(response)
}

/// At most `n` characters of `s`, so one request cannot write a huge log line.
fn first_chars(s: &str, n: usize) -> &str {
    s.char_indices().nth(n).map_or(s, |(end, _)| &s[..end])
}

/// Methods as a bounded set of label values: a client cannot mint new metric series.
fn method_label(method: &http::Method) -> &'static str {
    match *method {
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::PATCH => "PATCH",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::HEAD => "HEAD",
        http::Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// The socket peer; behind a trusted proxy, the address it passes: X-Real-IP, else the
/// right-most X-Forwarded-For entry (the one our proxy added; those left of it are the
/// client's own claims).
fn client_ip(trust_proxy: bool, peer: SocketAddr, headers: &HeaderMap) -> IpAddr {
    if trust_proxy {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        if let Some(ip) = header("x-real-ip").and_then(|v| v.trim().parse().ok()) {
            return ip;
        }
        if let Some(ip) = header("x-forwarded-for")
            .and_then(|v| v.rsplit(',').next())
            .and_then(|v| v.trim().parse().ok())
        {
            return ip;
        }
    }
    peer.ip()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_paths_are_cut_at_a_character_boundary() {
        assert_eq!(first_chars("/api/v1/me", 128), "/api/v1/me");
        assert_eq!(first_chars("/abcdef", 3), "/ab");
        assert_eq!(first_chars("/é€x", 3), "/é€");
    }

    #[test]
    fn proxy_headers_only_when_trusted() {
        let peer: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "1.1.1.1, 2.2.2.2".parse().unwrap());
        assert_eq!(client_ip(false, peer, &h), peer.ip());
        assert_eq!(
            client_ip(true, peer, &h),
            "2.2.2.2".parse::<IpAddr>().unwrap()
        );
        h.insert("x-real-ip", "3.3.3.3".parse().unwrap());
        assert_eq!(
            client_ip(true, peer, &h),
            "3.3.3.3".parse::<IpAddr>().unwrap()
        );
        h.insert("x-real-ip", "garbage".parse().unwrap());
        assert_eq!(
            client_ip(true, peer, &h),
            "2.2.2.2".parse::<IpAddr>().unwrap()
        );
    }
}
