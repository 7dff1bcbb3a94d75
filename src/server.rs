//! Start-up and shutdown of `smsauth serve`, split in two steps so a caller (the binary,
//! a benchmark) can learn the bound address before serving.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::admin::socket::{self as admin_socket, AdminListener};
use crate::app::App;
use crate::config::Config;

/// A server with its store open and its port bound, not yet serving.
pub struct Server {
    app: Arc<App>,
    listener: TcpListener,
    /// `data_dir/admin.sock`, for `smsauth user|backup` while we hold the store; None if
    /// it could not be bound (the server still serves; the commands then say so).
    admin: Option<AdminListener>,
}

impl Server {
    /// Opens the data dir and binds `server.listen`.
    pub async fn bind(cfg: Config) -> anyhow::Result<Server> {
        for warning in &cfg.warnings {
            tracing::warn!("{warning}");
        }
        let addr = cfg.listen_addr();
        let app = App::open(cfg).await?;
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        // After App::open: we hold the store's lock, so any socket file there is stale.
        let admin = match admin_socket::bind(&app.cfg.storage.data_dir) {
            Ok(a) => Some(a),
            Err(e) => {
                tracing::warn!(error = %e, "no admin socket; admin commands need the server stopped");
                None
            }
        };
        Ok(Server {
            app,
            listener,
            admin,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    /// Serves until `shutdown` resolves; then lets requests in flight finish and flushes
    /// the store.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Server {
            app,
            listener,
            admin,
        } = self;
        tracing::info!(
            addr = %listener.local_addr()?,
            version = env!("CARGO_PKG_VERSION"),
            sms_provider = app.sms.provider(),
            data_dir = %app.cfg.storage.data_dir.display(),
            "listening"
        );
        let keeper = {
            let app = app.clone();
            tokio::spawn(async move {
                let every = Duration::from_secs(app.cfg.server.housekeeping_secs);
                let mut tick = tokio::time::interval(every);
                loop {
                    tick.tick().await;
                    app.housekeeping().await;
                }
            })
        };
        let (stop_admin, stopping) = tokio::sync::watch::channel(false);
        let rotation = tokio::spawn(app.rotation.clone().run(stopping.clone()));
        let admin = admin.map(|a| tokio::spawn(admin_socket::serve(app.clone(), a, stopping)));
        let shutdown = async {
            shutdown.await;
            let _ = stop_admin.send(true);
        };
        crate::http::serve(app.clone(), listener, shutdown).await;
        if let Some(admin) = admin {
            let _ = admin.await; // it removes the socket file
        }
        let _ = rotation.await; // it takes this instance off the list
        keeper.abort();
        app.limits
            .close()
            .await
            .context("storing the daily budget")?;
        app.store.engine.flush().await.context("final flush")?;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Resolves on SIGTERM (systemd stop) or SIGINT (Ctrl-C).
pub async fn termination() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
    }
}
