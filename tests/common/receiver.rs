//! A local HTTP server standing in for a remote one (the webhook receiver, a provider's
//! gateway). It records every request and answers with whatever the test scripted.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// One recorded request.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path_and_query: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

/// How to answer one request.
#[derive(Debug, Clone)]
pub enum Answer {
    Status(u16, String),
    /// Wait this long, then answer 200 (a slow or hung gateway).
    Delay(Duration),
}

/// Answers a request by looking at it: a fake gateway that checks each request the way
/// the real one would.
pub type Responder = Arc<dyn Fn(&Received) -> Answer + Send + Sync>;

#[derive(Default)]
struct Script {
    answers: VecDeque<Answer>,
    received: Vec<Received>,
    responder: Option<Responder>,
}

#[derive(Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
    script: Arc<Mutex<Script>>,
    arrived: Arc<tokio::sync::Notify>,
}

impl Receiver {
    /// Starts on an ephemeral loopback port. Unscripted requests get 200 `{}`.
    pub async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let script = Arc::new(Mutex::new(Script::default()));
        let arrived = Arc::new(tokio::sync::Notify::new());
        let (s, n) = (script.clone(), arrived.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    break;
                };
                let (s, n) = (s.clone(), n.clone());
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |req| answer(s.clone(), n.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Receiver {
            addr,
            script,
            arrived,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Queues answers for the next requests, in order.
    pub fn script(&self, answers: impl IntoIterator<Item = Answer>) {
        self.script.lock().unwrap().answers.extend(answers);
    }

    /// Answers every request the script does not cover with `f`.
    pub fn respond_with(&self, f: impl Fn(&Received) -> Answer + Send + Sync + 'static) {
        self.script.lock().unwrap().responder = Some(Arc::new(f));
    }

    pub fn received(&self) -> Vec<Received> {
        self.script.lock().unwrap().received.clone()
    }

    /// Waits until at least `n` requests have arrived.
    pub async fn wait_for(&self, n: usize) -> Vec<Received> {
        loop {
            let notified = self.arrived.notified();
            let got = self.received();
            if got.len() >= n {
                return got;
            }
            tokio::time::timeout(Duration::from_secs(20), notified)
                .await
                .expect("requests did not arrive");
        }
    }
}

async fn answer(
    script: Arc<Mutex<Script>>,
    arrived: Arc<tokio::sync::Notify>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let received = Received {
        method: parts.method.to_string(),
        path_and_query: parts
            .uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        headers: parts.headers,
        body,
    };
    let (next, responder) = {
        let mut s = script.lock().unwrap();
        s.received.push(received.clone());
        (s.answers.pop_front(), s.responder.clone())
    };
    // Outside the lock: a responder may take its time or look at the script.
    let next = next.or_else(|| responder.map(|f| f(&received)));
    arrived.notify_waiters();
    let (status, text) = match next {
        None => (200, "{}".to_owned()),
        Some(Answer::Status(code, text)) => (code, text),
        Some(Answer::Delay(d)) => {
            tokio::time::sleep(d).await;
            (200, "{}".to_owned())
        }
    };
    let mut resp = Response::new(Full::new(Bytes::from(text)));
    *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
    resp.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    Ok(resp)
}
