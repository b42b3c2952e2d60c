//! The agent's HTTP endpoint (`--healthz-ip`/`--healthz-port`): `/healthz` (200 while the
//! process serves), `/readyz` (503 until the node is ready: lease held, datapath
//! programmed, subnet.env written; then 200), `/status` (the agent's state as JSON, read by
//! `overlay-agent status`) and `/metrics` (Prometheus text).
//!
//! axum, because it is already compiled into the agent through tonic (etcd-client): it costs
//! no new crates, and a hand-written HTTP server would be more code to get wrong.

use std::net::SocketAddr;

use axum::{Router, extract::State, http::StatusCode, routing::get};
use tokio::{net::TcpListener, sync::watch};
use tracing::info;

use crate::observe::status::{AgentStatus, DataplaneWork, render_prometheus_with};

#[derive(Debug, thiserror::Error)]
#[error("cannot listen for /healthz on {addr}: {source}; pick another --healthz-ip/--healthz-port")]
pub struct HealthError {
    addr: SocketAddr,
    #[source]
    source: std::io::Error,
}

type Shared = State<watch::Receiver<AgentStatus>>;

/// The status with the process-wide work counters as they are at this moment.
fn current(status: &watch::Receiver<AgentStatus>) -> AgentStatus {
    let mut now = status.borrow().clone();
    now.dataplane_work = DataplaneWork::now();
    now
}

fn router(status: watch::Receiver<AgentStatus>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { (StatusCode::OK, "ok\n") }))
        .route(
            "/readyz",
            get(|State(status): Shared| async move {
                if status.borrow().ready {
                    (StatusCode::OK, "ready\n")
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not ready: waiting for config, lease or datapath\n",
                    )
                }
            }),
        )
        .route(
            "/status",
            get(|State(status): Shared| async move {
                let json = serde_json::to_string(&current(&status))
                    .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
                ([("content-type", "application/json")], json)
            }),
        )
        .route(
            "/metrics",
            get(|State(status): Shared| async move {
                (
                    [("content-type", "text/plain; version=0.0.4")],
                    render_prometheus_with(&status.borrow(), &DataplaneWork::now()),
                )
            }),
        )
        .with_state(status)
}

/// Binds the endpoint now (so a busy port fails at start-up) and returns the bound address
/// and the task serving it.
pub async fn serve(
    addr: SocketAddr,
    status: watch::Receiver<AgentStatus>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), HealthError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| HealthError { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| HealthError { addr, source })?;
    info!(addr = %local, "serving /healthz, /readyz, /status and /metrics");
    let task = tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, router(status)).await {
            tracing::warn!(error = %err, "the health endpoint stopped");
        }
    });
    Ok((local, task))
}

/// Why `overlay-agent status` could not read a running agent.
#[derive(Debug, thiserror::Error)]
pub enum FetchStatusError {
    #[error("no answer from {addr} within 5 s; is the agent running with --healthz-port?")]
    Timeout { addr: SocketAddr },
    #[error(
        "cannot connect to {addr}: {source}; is the agent running with --healthz-port (and --healthz-ip) set to this address?"
    )]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to {addr}: {source}")]
    Io {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr} sent no HTTP response; is another program listening there?")]
    NotHttp { addr: SocketAddr },
    #[error("{addr} answered {status_line}")]
    Status {
        addr: SocketAddr,
        status_line: String,
    },
    #[error("{addr} sent an unreadable status: {source}")]
    Json {
        addr: SocketAddr,
        #[source]
        source: serde_json::Error,
    },
}

/// Fetches a running agent's `/status` (for `overlay-agent status`). A plain HTTP/1.1 GET
/// on loopback: not worth an HTTP client crate.
pub async fn fetch_status(addr: SocketAddr) -> Result<AgentStatus, FetchStatusError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let io = |source| FetchStatusError::Io { addr, source };
    let mut stream = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .map_err(|_| FetchStatusError::Timeout { addr })?
    .map_err(|source| FetchStatusError::Connect { addr, source })?;
    stream
        .write_all(b"GET /status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .map_err(io)?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.map_err(io)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or(FetchStatusError::NotHttp { addr })?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(FetchStatusError::Status {
            addr,
            status_line: head.lines().next().unwrap_or_default().to_owned(),
        });
    }
    serde_json::from_str(body).map_err(|source| FetchStatusError::Json { addr, source })
}
