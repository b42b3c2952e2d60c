//! Helpers for the control-plane tests: a real etcd process (plain, TLS or with auth) on
//! free loopback ports, TLS material made with `openssl`, a recording dataplane, polling.
//!
//! etcd itself is the shared fixture `overlay_tests::etcd::EtcdServer`.

#![allow(dead_code, clippy::unwrap_used)]

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use overlay_agent::{
    dataplane::{Dataplane, DataplaneError, LocalLease},
    peer::PeerEvent,
};
use tokio::sync::mpsc;

/// TLS material for one test: the shared fixture's CA, server (127.0.0.1) and client
/// certificates, plus a client certificate from another CA (which the server must refuse).
pub struct Tls(overlay_tests::tls::TestPki);

impl Tls {
    pub fn generate() -> Tls {
        Tls(overlay_tests::tls::TestPki::generate(&[]).with_rogue_client())
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.path(name)
    }
}

/// A real etcd (the shared fixture) on free loopback ports; killed on drop.
pub struct Etcd {
    server: overlay_tests::etcd::EtcdServer,
    pub endpoint: String,
}

impl Etcd {
    pub fn start() -> Etcd {
        Self::from(overlay_tests::etcd::EtcdServer::start())
    }

    /// etcd serving the v2 keys API too (`--enable-v2=true`), like the seeds' clusters.
    pub fn start_v2() -> Etcd {
        Self::from(overlay_tests::etcd::EtcdServer::start_with(
            overlay_tests::etcd::EtcdOptions {
                enable_v2: true,
                ..Default::default()
            },
        ))
    }

    /// etcd with server TLS and client-certificate authentication.
    pub fn start_tls(tls: &Tls) -> Etcd {
        Self::start_tls_with(tls, false)
    }

    /// etcd with mTLS, serving the v2 keys API too when `enable_v2`.
    pub fn start_tls_with(tls: &Tls, enable_v2: bool) -> Etcd {
        Self::from(overlay_tests::etcd::EtcdServer::start_with(
            overlay_tests::etcd::EtcdOptions {
                tls: Some(overlay_tests::etcd::EtcdTls {
                    ca: tls.path("ca.pem"),
                    cert: tls.path("server.pem"),
                    key: tls.path("server.key"),
                }),
                enable_v2,
            },
        ))
    }

    /// `ETCDCTL_API=2 etcdctl ARGS` (panics on failure; stdout).
    pub fn v2(&self, args: &[&str]) -> String {
        self.server.etcdctl_v2(args)
    }

    /// `ETCDCTL_API=2 etcdctl ARGS`, whatever its status.
    pub fn v2_output(&self, args: &[&str]) -> std::process::Output {
        self.server.etcdctl_v2_output(args)
    }

    /// `ETCDCTL_API=3 etcdctl ARGS` (panics on failure; stdout).
    pub fn v3(&self, args: &[&str]) -> String {
        self.server.etcdctl(args)
    }

    fn from(server: overlay_tests::etcd::EtcdServer) -> Etcd {
        let endpoint = server.endpoint().to_string();
        Etcd { server, endpoint }
    }

    pub fn log(&self) -> String {
        self.server.log()
    }

    /// Kills etcd and starts it again on the same port and data (blocks until healthy).
    pub fn restart(&mut self) {
        tokio::task::block_in_place(|| self.server.restart());
    }
}

/// Connects a plain client (retrying while etcd elects itself).
pub async fn client(endpoint: &str) -> etcd_client::Client {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut c) = etcd_client::Client::connect([endpoint], None).await
            && c.get("probe", None).await.is_ok()
        {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "etcd at {endpoint} not usable within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `cond` until true; panics with `what` after `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What a [`RecordingDataplane`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    Activated(LocalLease),
    Applied(PeerEvent),
}

/// Everything a [`RecordingDataplane`] was asked to do, in order.
pub type RecordLog = std::sync::Arc<std::sync::Mutex<Vec<Recorded>>>;

/// A dataplane that records what the control plane asks of it.
pub struct RecordingDataplane {
    pub tx: mpsc::UnboundedSender<Recorded>,
    pub log: RecordLog,
}

impl RecordingDataplane {
    pub fn new() -> (RecordingDataplane, mpsc::UnboundedReceiver<Recorded>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            RecordingDataplane {
                tx,
                log: RecordLog::default(),
            },
            rx,
        )
    }

    fn record(&self, r: Recorded) {
        self.log.lock().unwrap().push(r.clone());
        let _ = self.tx.send(r);
    }
}

impl Dataplane for RecordingDataplane {
    fn name(&self) -> &'static str {
        "recording"
    }
    async fn activate(&mut self, lease: &LocalLease) -> Result<(), DataplaneError> {
        self.record(Recorded::Activated(lease.clone()));
        Ok(())
    }
    async fn apply(&mut self, event: &PeerEvent) -> Result<(), DataplaneError> {
        self.record(Recorded::Applied(event.clone()));
        Ok(())
    }
    async fn maintain(&mut self) -> Result<(), DataplaneError> {
        Ok(())
    }
}

pub fn exists(path: &Path) -> bool {
    path.exists()
}

/// A three-member etcd cluster on loopback (for endpoint failover); members killed on drop.
pub struct EtcdCluster {
    pub endpoints: Vec<String>,
    members: Vec<Option<std::process::Child>>,
    args: Vec<Vec<String>>,
    dir: tempfile::TempDir,
}

impl EtcdCluster {
    pub fn start() -> EtcdCluster {
        let port = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .expect("bind")
                .local_addr()
                .expect("addr")
                .port()
        };
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (port(), port())).collect();
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect();
        let dir = tempfile::tempdir().expect("tempdir");
        let args: Vec<Vec<String>> = ports
            .iter()
            .enumerate()
            .map(|(i, (client, peer))| {
                vec![
                    format!("--name=m{i}"),
                    format!("--data-dir={}", dir.path().join(format!("m{i}")).display()),
                    format!("--listen-client-urls=http://127.0.0.1:{client}"),
                    format!("--advertise-client-urls=http://127.0.0.1:{client}"),
                    format!("--listen-peer-urls=http://127.0.0.1:{peer}"),
                    format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"),
                    format!("--initial-cluster={}", initial.join(",")),
                    "--initial-cluster-state=new".to_string(),
                    "--log-level=warn".to_string(),
                ]
            })
            .collect();
        let mut cluster = EtcdCluster {
            endpoints: ports
                .iter()
                .map(|(c, _)| format!("http://127.0.0.1:{c}"))
                .collect(),
            members: vec![None, None, None],
            args,
            dir,
        };
        for i in 0..3 {
            cluster.spawn(i);
        }
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("m{i}.log")))
            .expect("log");
        let child = Command::new("etcd")
            .args(&self.args[i])
            .env_remove("NOTIFY_SOCKET")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd member");
        self.members[i] = Some(child);
    }

    /// SIGKILLs member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again with its data.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..3 {
            self.kill(i);
        }
    }
}

/// Everything this test process logs through `tracing` (all tests of the binary share it:
/// look for lines naming your own keys).
#[derive(Clone, Default)]
pub struct CapturedLogs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl CapturedLogs {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs (once per process) a global subscriber that records the agent's log lines.
pub fn capture_logs() -> CapturedLogs {
    static LOGS: std::sync::OnceLock<CapturedLogs> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = CapturedLogs::default();
        let writer = logs.clone();
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "info,overlay_agent=debug",
            ))
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .init();
        logs
    })
    .clone()
}
