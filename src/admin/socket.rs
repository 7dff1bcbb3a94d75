//! The admin socket: `data_dir/admin.sock`, a Unix socket (mode 0600) on which a running
//! server performs admin actions for the command line, which cannot open the store while
//! the server holds it.
//!
//! It speaks HTTP/1.1, with hyper on both sides: the server half is the HTTP server we
//! already run, the framing (status, length, a binary body for snapshots) comes for free,
//! and an operator can poke it with `curl --unix-socket data/admin.sock http://admin/...`.
//!
//! | request | body | answer |
//! | --- | --- | --- |
//! | `POST /v1/op` | an [`Op`] as JSON | 200 [`Answer`] JSON; 400/404/500 `{"error","message"}` |
//! | `GET /v1/snapshot` | | 200 the store's records in the backup record format |
//! | `POST /v1/keys/rotate-token-key` | | 200 [`Rotated`] JSON; 500 `{"error","message"}` |
//! | `POST /v1/keys/rotate-phone-key` | `{"key": base64}` | 200 the rotation's state; 409/400 `{"error","message"}` |
//! | `GET /v1/keys/phone-key-rotation` | | 200 the rotation's state as this server has acted on it, or `null` |
//!
//! Access is the file's: only the server's user (and root) may connect. Answers never
//! carry a secret: no key, no password hash in `show`; a snapshot carries the store's
//! records (password and code hashes included, as any backup must) but not the key
//! files, which the command line reads from the data dir itself.

use std::convert::Infallible;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use super::{AdminError, Answer, Op};
use crate::app::App;

/// File name of the socket in the data dir.
pub const SOCKET_NAME: &str = "admin.sock";
const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// How long the command line waits for an answer (a snapshot of a big store included).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(300);

pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET_NAME)
}

/// A bound admin socket; its file is removed when this is dropped.
pub struct AdminListener {
    listener: UnixListener,
    path: PathBuf,
}

impl Drop for AdminListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds `data_dir/admin.sock`, replacing any file there. Call it only while holding the
/// store (sled's lock): then no other server can be using the path, and a socket found
/// there is a leftover of a process that died (kill -9).
///
/// The socket is made in a fresh 0700 directory, set to 0600, and only then renamed into
/// place, so there is no moment when another user could connect.
pub fn bind(data_dir: &Path) -> std::io::Result<AdminListener> {
    let path = socket_path(data_dir);
    let private = data_dir.join(format!(".admin-sock-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let result = (|| {
        let tmp = private.join(SOCKET_NAME);
        let listener = UnixListener::bind(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        match std::fs::remove_file(&path) {
            Ok(()) => tracing::info!(path = %path.display(), "replaced a stale admin socket"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::fs::rename(&tmp, &path)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&private);
    Ok(AdminListener {
        listener: result?,
        path,
    })
}

/// Serves admin requests until `stop` turns true, then lets those in flight finish (up to
/// the HTTP server's grace period) and removes the socket file.
pub async fn serve(app: Arc<App>, admin: AdminListener, mut stop: watch::Receiver<bool>) {
    let stopped = async move {
        // The guard of borrow() must not live across an await (it is not Send).
        while !*stop.borrow_and_update() {
            if stop.changed().await.is_err() {
                return; // the server dropped the sender: stop as well
            }
        }
    };
    let mut stopped = std::pin::pin!(stopped);
    let graceful = GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    loop {
        tokio::select! {
            accepted = admin.listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "admin socket accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let app = app.clone();
                let service = service_fn(move |req| handle(app.clone(), req));
                let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "admin connection ended with an error");
                    }
                });
            }
            _ = &mut stopped => break,
        }
    }
    drop(admin);
    let _ = tokio::time::timeout(crate::http::SHUTDOWN_GRACE, graceful.shutdown()).await;
}

type AdminResp = Response<Full<Bytes>>;

async fn handle(app: Arc<App>, req: Request<Incoming>) -> Result<AdminResp, Infallible> {
    let (parts, body) = req.into_parts();
    let resp = match (&parts.method, parts.uri.path()) {
        (&Method::POST, "/v1/op") => op(&app, body).await,
        (&Method::GET, "/v1/snapshot") => snapshot(&app).await,
        (&Method::POST, "/v1/keys/rotate-token-key") => rotate_token_key(&app).await,
        (&Method::POST, "/v1/keys/rotate-phone-key") => rotate_phone_key(&app, body).await,
        // A step of this server's own: the state it answers is the one it has acted on,
        // so "done" here means this server has let the old key go.
        (&Method::GET, "/v1/keys/phone-key-rotation") => match app.rotation.tick().await {
            Ok(state) => json(StatusCode::OK, &state),
            Err(e) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                &e.to_string(),
            ),
        },
        _ => error(StatusCode::NOT_FOUND, "not_found", "no such admin request"),
    };
    Ok(resp)
}

async fn op(app: &App, body: Incoming) -> AdminResp {
    let bytes = match Limited::new(body, MAX_REQUEST_BYTES).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "unreadable body",
            );
        }
    };
    let op: Op = match serde_json::from_slice(&bytes) {
        Ok(op) => op,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request", &e.to_string()),
    };
    let masked = op.phone().map(crate::phone::mask).unwrap_or_default();
    match super::execute(&app.store, &app.phones, &op).await {
        Ok(answer) => {
            tracing::info!(op = op.name(), phone = %masked, "admin action");
            json(StatusCode::OK, &answer)
        }
        Err(e) => {
            let status = match e {
                AdminError::InvalidPhone(_) => StatusCode::BAD_REQUEST,
                AdminError::NoSuchUser(_) => StatusCode::NOT_FOUND,
                AdminError::Store(_) => {
                    tracing::error!(op = op.name(), error = %e, "admin action failed");
                    StatusCode::INTERNAL_SERVER_ERROR
                }
            };
            error(status, e.code(), &e.to_string())
        }
    }
}

/// What a rotation of the token signing key made.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rotated {
    pub algorithm: String,
    pub kid: String,
    /// Seconds the previous key goes on verifying.
    pub retired_key_verifies_secs: i64,
}

async fn rotate_token_key(app: &App) -> AdminResp {
    match app.tokens.rotate_key().await {
        Ok((alg, kid)) => json(
            StatusCode::OK,
            &Rotated {
                algorithm: alg.name().to_owned(),
                kid,
                retired_key_verifies_secs: app.tokens.key_retention_secs(),
            },
        ),
        Err(e) => {
            tracing::error!(error = %e, "rotating the token signing key failed");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                &e.to_string(),
            )
        }
    }
}

/// The body of `POST /v1/keys/rotate-phone-key`: the new key itself (base64), read by
/// the command line, which runs as root and may read files the service may not.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct RotatePhoneKey {
    pub key: String,
}

async fn rotate_phone_key(app: &App, body: Incoming) -> AdminResp {
    let asked: RotatePhoneKey = match Limited::new(body, MAX_REQUEST_BYTES).collect().await {
        Ok(b) => match serde_json::from_slice(&b.to_bytes()) {
            Ok(asked) => asked,
            Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request", &e.to_string()),
        },
        Err(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "unreadable body",
            );
        }
    };
    use crate::rotation::BeginError;
    let key = match crate::privacy::parse_key(asked.key.as_bytes()) {
        Ok(key) => key,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                &format!("{e:#}"),
            );
        }
    };
    match app.rotation.begin_with(&key).await {
        Ok(state) => {
            tracing::info!(to = %state.to, "admin action: phone key rotation");
            // Moved on now rather than at the next poll.
            match app.rotation.tick().await {
                Ok(Some(now)) => json(StatusCode::OK, &now),
                _ => json(StatusCode::OK, &state),
            }
        }
        Err(e @ (BeginError::Key(_) | BeginError::Same)) => {
            error(StatusCode::BAD_REQUEST, "invalid_request", &e.to_string())
        }
        Err(e @ BeginError::Busy(_)) => error(StatusCode::CONFLICT, "conflict", &e.to_string()),
        Err(BeginError::Store(e)) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            &e.to_string(),
        ),
    }
}

async fn snapshot(app: &Arc<App>) -> AdminResp {
    match app.store.rotations.rotation().await {
        Ok(Some(state)) if state.running() => {
            return error(StatusCode::CONFLICT, "conflict", super::command::ROTATING);
        }
        Ok(_) => {}
        Err(e) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                &e.to_string(),
            );
        }
    }
    let store = app.store.clone();
    let taken =
        tokio::task::spawn_blocking(move || super::backup::snapshot_records(&*store.snapshots))
            .await;
    match taken {
        Ok(Ok(records)) => {
            tracing::info!(bytes = records.len(), "admin snapshot");
            Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .body(Full::new(Bytes::from(records)))
                .expect("valid response")
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "admin snapshot failed");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                &e.to_string(),
            )
        }
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            &e.to_string(),
        ),
    }
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> AdminResp {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(
            serde_json::to_vec(value).expect("answer serializes"),
        )))
        .expect("valid response")
}

fn error(status: StatusCode, code: &str, message: &str) -> AdminResp {
    json(
        status,
        &serde_json::json!({ "error": code, "message": message }),
    )
}

/// Why the command line got no answer from the server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket (no server, or one without the socket).
    #[error("cannot connect to {path}: {source}")]
    Unreachable {
        path: String,
        source: std::io::Error,
    },
    /// The server answered with an error.
    #[error("{message}")]
    Refused {
        status: u16,
        code: String,
        message: String,
    },
    #[error("admin socket: {0}")]
    Protocol(String),
}

/// Runs `op` on the server behind `socket`.
pub async fn request_op(socket: &Path, op: &Op) -> Result<Answer, ClientError> {
    let body = serde_json::to_vec(op).expect("op serializes");
    let bytes = request(socket, Method::POST, "/v1/op", body).await?;
    serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))
}

/// Has the server behind `socket` rotate its token signing key.
pub async fn request_rotate_token_key(socket: &Path) -> Result<Rotated, ClientError> {
    let bytes = request(
        socket,
        Method::POST,
        "/v1/keys/rotate-token-key",
        Vec::new(),
    )
    .await?;
    serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))
}

/// Has the server behind `socket` start a rotation of the phone key to `key`.
pub async fn request_rotate_phone_key(
    socket: &Path,
    key: &[u8; crate::privacy::KEY_BYTES],
) -> Result<crate::rotation::RotationState, ClientError> {
    use base64::Engine as _;
    let body = serde_json::to_vec(&RotatePhoneKey {
        key: base64::engine::general_purpose::STANDARD.encode(key),
    })
    .expect("serializes");
    let bytes = request(socket, Method::POST, "/v1/keys/rotate-phone-key", body).await?;
    serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))
}

/// The phone key rotation of the server behind `socket`, as it stands.
pub async fn request_phone_key_rotation(
    socket: &Path,
) -> Result<Option<crate::rotation::RotationState>, ClientError> {
    let bytes = request(
        socket,
        Method::GET,
        "/v1/keys/phone-key-rotation",
        Vec::new(),
    )
    .await?;
    serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))
}

/// Asks the server behind `socket` for a snapshot of its store (bare backup records).
pub async fn request_snapshot(socket: &Path) -> Result<Bytes, ClientError> {
    request(socket, Method::GET, "/v1/snapshot", Vec::new()).await
}

async fn request(
    socket: &Path,
    method: Method,
    path: &str,
    body: Vec<u8>,
) -> Result<Bytes, ClientError> {
    let protocol = |e: &dyn std::fmt::Display| ClientError::Protocol(e.to_string());
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| ClientError::Unreachable {
            path: socket.display().to_string(),
            source,
        })?;
    let exchange = async {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| protocol(&e))?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "smsauth-admin")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| protocol(&e))?;
        let resp = sender.send_request(req).await.map_err(|e| protocol(&e))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| protocol(&e))?
            .to_bytes();
        if status.is_success() {
            return Ok(bytes);
        }
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        Err(ClientError::Refused {
            status: status.as_u16(),
            code: v["error"].as_str().unwrap_or("unknown").to_owned(),
            message: v["message"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| format!("the server answered {status}")),
        })
    };
    tokio::time::timeout(CLIENT_TIMEOUT, exchange)
        .await
        .map_err(|_| ClientError::Protocol("no answer in time".into()))?
}
