//! `/healthz` (200 while the process serves) and `/readyz` (503 until the node is ready:
//! lease held, datapath programmed, subnet.env written; then 200).
//!
//! axum, because it is already compiled into the agent through tonic (etcd-client): it costs
//! no new crates, and a hand-written HTTP parser would be more code to get wrong.

use std::net::SocketAddr;

use axum::{Router, extract::State, http::StatusCode, routing::get};
use tokio::{net::TcpListener, sync::watch};
use tracing::info;

#[derive(Debug, thiserror::Error)]
#[error("cannot listen for /healthz on {addr}: {source}; pick another --healthz-ip/--healthz-port")]
pub struct HealthError {
    addr: SocketAddr,
    #[source]
    source: std::io::Error,
}

fn router(ready: watch::Receiver<bool>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { (StatusCode::OK, "ok\n") }))
        .route(
            "/readyz",
            get(|State(ready): State<watch::Receiver<bool>>| async move {
                if *ready.borrow() {
                    (StatusCode::OK, "ready\n")
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not ready: waiting for config, lease or datapath\n",
                    )
                }
            }),
        )
        .with_state(ready)
}

/// Binds the endpoint now (so a busy port fails at start-up) and returns the task serving it
/// and the bound address.
pub async fn serve(
    addr: SocketAddr,
    ready: watch::Receiver<bool>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), HealthError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| HealthError { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| HealthError { addr, source })?;
    info!(addr = %local, "serving /healthz and /readyz");
    let task = tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, router(ready)).await {
            tracing::warn!(error = %err, "the health endpoint stopped");
        }
    });
    Ok((local, task))
}
