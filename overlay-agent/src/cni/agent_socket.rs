//! The plugin -> agent notice: after a successful ADD and before the delegate's DEL, the
//! `flannel` plugin tells the running agent which pod addresses came or are going, over a
//! unix socket beside the subnet file (`/run/flannel/overlay-agent.sock`). The agent's
//! dataplane task applies it at once: on ADD it re-reads the pods from netlink (so the new
//! pod is on the fast path before its first packet), on DEL it drops the pod's endpoint and
//! ignores its veth until the veth is gone (so the 1 s netlink poll cannot put it back
//! while the delegate tears it down, and host-local can never hand the address to a new
//! pod while the old endpoint still points at the old veth).
//!
//! A notice is a hint: the agent trusts only the addresses and looks everything else up in
//! netlink itself, and the plugin never fails ADD or DEL over it (no agent, another
//! backend, a timeout: one stderr line, and the netlink poll catches up as before).
//!
//! Wire format: one JSON line each way.
//! `{"op":"ADD","containerId":"...","ips":["10.244.5.2"]}` ->
//! `{"applied":true,"endpoints":["10.244.5.2"],"message":"..."}`.

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, Write as _},
    net::Ipv4Addr,
    os::unix::{fs::FileTypeExt as _, fs::PermissionsExt as _, net::UnixStream},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _},
    sync::{mpsc, oneshot},
};
use tracing::{debug, info, warn};

use crate::dataplane::DataplaneCommand;

/// The socket's file name, in the subnet file's directory.
pub const SOCKET_NAME: &str = "overlay-agent.sock";
/// How long the plugin waits for the agent before carrying on without it.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the agent waits for a client's line, and for its dataplane task.
const SERVER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest accepted notice (a container ID and a few addresses fit many times over).
const MAX_NOTICE: u64 = 64 * 1024;

/// The socket beside `subnet_file`: plugin and agent both derive it from the subnet file's
/// path, which they already agree on, so neither needs more configuration.
pub fn default_socket_path(subnet_file: &Path) -> PathBuf {
    match subnet_file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(SOCKET_NAME),
        _ => PathBuf::from(SOCKET_NAME),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum PodOp {
    /// The delegate's ADD succeeded: the pod's veth and addresses exist.
    Add,
    /// The delegate's DEL is about to run: the addresses are about to be released.
    Del,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodNotice {
    pub op: PodOp,
    pub container_id: String,
    /// The pod's IPv4 addresses, from the ADD result (or, for DEL, the runtime's
    /// prevResult); the agent adds those it remembers from the ADD.
    #[serde(default)]
    pub ips: Vec<Ipv4Addr>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodNoticeReply {
    /// Whether the datapath changed anything for it (false on backends without per-pod
    /// state).
    pub applied: bool,
    /// After an ADD: which of the pod's addresses the fast path now knows.
    #[serde(default)]
    pub endpoints: Vec<Ipv4Addr>,
    pub message: String,
}

impl PodNoticeReply {
    pub fn not_applied(message: impl Into<String>) -> Self {
        Self {
            applied: false,
            endpoints: Vec::new(),
            message: message.into(),
        }
    }
}

/// Why the plugin could not deliver a notice (never fatal to the plugin).
#[derive(Debug, thiserror::Error)]
pub enum NoticeError {
    #[error("no agent listening at {path} ({source})")]
    Unreachable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the agent at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent at {path} sent an unreadable reply {reply:?}: {source}")]
    BadReply {
        path: PathBuf,
        reply: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Plugin side: delivers `notice` and returns the agent's reply.
pub fn send(path: &Path, notice: &PodNotice) -> Result<PodNoticeReply, NoticeError> {
    let io = |source| NoticeError::Io {
        path: path.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(path).map_err(|source| NoticeError::Unreachable {
        path: path.to_owned(),
        source,
    })?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT)).map_err(io)?;
    let mut line = serde_json::to_vec(notice).map_err(|e| io(e.into()))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply).map_err(io)?;
    serde_json::from_str(&reply).map_err(|source| NoticeError::BadReply {
        path: path.to_owned(),
        reply,
        source,
    })
}

/// Agent side: serves notices at `path` until the returned task is aborted, handing each
/// to the dataplane task through `dataplane`. A stale socket file of an earlier run is
/// replaced; the socket is root-only (0600), as the plugin runs as root.
pub fn serve(
    path: &Path,
    dataplane: mpsc::Sender<DataplaneCommand>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && meta.file_type().is_socket()
    {
        std::fs::remove_file(path)?;
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    info!(socket = %path.display(), "listening for CNI plugin notices");
    // Addresses by container, from ADD notices: a DEL whose runtime passes no prevResult
    // (spec 0.3.x) still names the addresses to drop.
    let known: Arc<Mutex<HashMap<String, Vec<Ipv4Addr>>>> = Arc::default();
    Ok(tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(err) => {
                    warn!(error = %err, "accepting a CNI plugin connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let dataplane = dataplane.clone();
            let known = known.clone();
            tokio::spawn(async move {
                if let Err(err) = handle(stream, dataplane, known).await {
                    debug!(error = %err, "a CNI plugin notice was not answered");
                }
            });
        }
    }))
}

async fn handle(
    stream: tokio::net::UnixStream,
    dataplane: mpsc::Sender<DataplaneCommand>,
    known: Arc<Mutex<HashMap<String, Vec<Ipv4Addr>>>>,
) -> std::io::Result<()> {
    use tokio::io::AsyncReadExt as _;
    let (reader, mut writer) = stream.into_split();
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(reader.take(MAX_NOTICE));
    tokio::time::timeout(SERVER_TIMEOUT, reader.read_line(&mut line))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no notice in time"))??;
    let reply = match serde_json::from_str::<PodNotice>(&line) {
        Ok(mut notice) => {
            remember(&known, &mut notice);
            apply(notice, &dataplane).await
        }
        Err(err) => PodNoticeReply::not_applied(format!("unreadable notice: {err}")),
    };
    let mut out = serde_json::to_vec(&reply).map_err(std::io::Error::other)?;
    out.push(b'\n');
    writer.write_all(&out).await
}

/// Keeps ADD addresses by container and completes a DEL's addresses with them.
fn remember(known: &Mutex<HashMap<String, Vec<Ipv4Addr>>>, notice: &mut PodNotice) {
    let Ok(mut known) = known.lock() else { return };
    match notice.op {
        PodOp::Add => {
            known.insert(notice.container_id.clone(), notice.ips.clone());
        }
        PodOp::Del => {
            for ip in known.remove(&notice.container_id).unwrap_or_default() {
                if !notice.ips.contains(&ip) {
                    notice.ips.push(ip);
                }
            }
        }
    }
}

async fn apply(notice: PodNotice, dataplane: &mpsc::Sender<DataplaneCommand>) -> PodNoticeReply {
    let (reply_tx, reply_rx) = oneshot::channel();
    let (op, container) = (notice.op, notice.container_id.clone());
    if dataplane
        .send(DataplaneCommand::Pod(notice, reply_tx))
        .await
        .is_err()
    {
        return PodNoticeReply::not_applied("the agent's dataplane task has stopped");
    }
    match tokio::time::timeout(SERVER_TIMEOUT, reply_rx).await {
        Ok(Ok(reply)) => {
            debug!(?op, container = %container, applied = reply.applied, message = %reply.message, "CNI notice applied");
            reply
        }
        Ok(Err(_)) => PodNoticeReply::not_applied("the dataplane task dropped the notice"),
        Err(_) => PodNoticeReply::not_applied(format!(
            "the dataplane task did not answer within {SERVER_TIMEOUT:?}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_sits_beside_the_subnet_file() {
        assert_eq!(
            default_socket_path(Path::new("/run/flannel/subnet.env")),
            PathBuf::from("/run/flannel/overlay-agent.sock")
        );
        assert_eq!(
            default_socket_path(Path::new("subnet.env")),
            PathBuf::from("overlay-agent.sock")
        );
    }

    #[test]
    fn del_is_completed_with_the_addresses_of_the_add() {
        let known = Mutex::new(HashMap::new());
        let ip = |s: &str| s.parse::<Ipv4Addr>().expect("ip");
        let mut add = PodNotice {
            op: PodOp::Add,
            container_id: "c1".into(),
            ips: vec![ip("10.244.5.2")],
        };
        remember(&known, &mut add);
        let mut del = PodNotice {
            op: PodOp::Del,
            container_id: "c1".into(),
            ips: vec![],
        };
        remember(&known, &mut del);
        assert_eq!(del.ips, vec![ip("10.244.5.2")]);
        let mut again = PodNotice {
            ips: vec![],
            ..del.clone()
        };
        remember(&known, &mut again);
        assert!(again.ips.is_empty(), "forgotten after the DEL");
    }

    /// The round trip over a real socket, with a stand-in for the dataplane task's reply.
    #[tokio::test]
    async fn notices_reach_the_dataplane_task_and_the_reply_comes_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(SOCKET_NAME);
        let (tx, mut rx) = mpsc::channel(4);
        let server = serve(&path, tx).expect("serve");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dataplane = tokio::spawn(async move {
            let Some(DataplaneCommand::Pod(notice, reply)) = rx.recv().await else {
                panic!("expected a pod notice");
            };
            let _ = reply.send(PodNoticeReply {
                applied: true,
                endpoints: notice.ips.clone(),
                message: format!("{:?} {}", notice.op, notice.container_id),
            });
        });
        let notice = PodNotice {
            op: PodOp::Add,
            container_id: "abc".into(),
            ips: vec!["10.244.5.2".parse().expect("ip")],
        };
        let client_path = path.clone();
        let reply = tokio::task::spawn_blocking(move || send(&client_path, &notice))
            .await
            .expect("join")
            .expect("reply");
        assert!(reply.applied);
        assert_eq!(reply.message, "Add abc");
        dataplane.await.expect("dataplane");
        server.abort();
        // No agent: a clear error naming the socket, not a hang.
        drop(server);
        let gone = dir.path().join("none.sock");
        let err = send(
            &gone,
            &PodNotice {
                op: PodOp::Del,
                container_id: "x".into(),
                ips: vec![],
            },
        )
        .expect_err("nobody listens");
        assert!(err.to_string().contains("none.sock"), "{err}");
    }
}
