//! Helpers for the control-plane tests (control_plane.rs, etcd_v2.rs, ready_notify.rs): a
//! real etcd process (plain, TLS or with auth) on free loopback ports, TLS material made with
//! `openssl`, the seeds' flags and lease values, a recording dataplane, async polling.
//!
//! etcd itself is the shared fixture `overlay_tests::etcd::EtcdServer`; what is here needs the
//! agent's own types (flags, options, dataplane events) or tokio.

#![allow(dead_code, clippy::unwrap_used)]

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use overlay_agent::{
    cli::flags::{Cli, Flags},
    control::etcd::EtcdOptions,
    dataplane::{Dataplane, DataplaneCommand, DataplaneError, LocalLease},
    peer::{MacAddr6, PeerEvent},
};
use tokio::sync::mpsc;

/// The config the seeds' getting-started guide writes (there with etcdctl v2 `mk`).
pub const SEEDS_CONFIG: &str =
    r#"{ "Network": "172.30.0.0/16", "SubnetLen": 24, "Backend": { "Type": "vxlan" } }"#;
pub const SEEDS_PREFIX: &str = "/kube-centos/network";
/// How long a test waits for what the control plane does.
pub const LONG: Duration = Duration::from_secs(20);

/// A VtepMAC that differs in its `last` byte.
pub fn mac(last: u8) -> MacAddr6 {
    MacAddr6::new(0xc6, 0xd2, 0x32, 0x6f, 0x8f, last)
}

/// The seeds' systemd unit flags (no --etcd-api), with `subnet_file`.
pub fn seed_flags(endpoint: &str, prefix: &str, subnet_file: &Path) -> Flags {
    Cli::try_parse_args([
        "overlay-agent".to_string(),
        format!("-etcd-endpoints={endpoint}"),
        format!("-etcd-prefix={prefix}"),
        format!("--subnet-file={}", subnet_file.display()),
        // These agents run in the test's own network namespace (the host's): they must
        // leave no FORWARD rules behind. forward_rules.rs covers the rules, in namespaces.
        "--iptables-forward-rules=false".to_string(),
    ])
    .unwrap()
    .flags
}

pub fn opts(endpoint: &str, prefix: &str) -> EtcdOptions {
    EtcdOptions {
        endpoints: vec![endpoint.to_string()],
        prefix: prefix.to_string(),
        ..Default::default()
    }
}

/// Client options for an mTLS etcd: the CA and the client certificate of `tls`.
pub fn mtls_opts(endpoint: &str, prefix: &str, tls: &Tls) -> EtcdOptions {
    EtcdOptions {
        cafile: Some(tls.path("ca.pem")),
        certfile: Some(tls.path("client.pem")),
        keyfile: Some(tls.path("client.key")),
        ..opts(endpoint, prefix)
    }
}

/// A vxlan lease value as flanneld >= 0.8 writes it (PublicIPv6, VNI).
pub fn vxlan_lease(ip: &str, mac: &str) -> String {
    format!(
        r#"{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
    )
}

/// The next peer event the control plane sends the dataplane (within [`LONG`]).
pub async fn next_event(rx: &mut mpsc::Receiver<DataplaneCommand>) -> PeerEvent {
    match tokio::time::timeout(LONG, rx.recv())
        .await
        .expect("a peer event in time")
        .expect("channel open")
    {
        DataplaneCommand::Peers(ev) => ev,
        other => panic!("unexpected command {other:?}"),
    }
}

/// The agent binary cargo built for these tests.
pub fn agent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_overlay-agent"))
}

/// Runs the agent binary with `args` to completion: (success, stdout, stderr). RUST_LOG and
/// FLANNELD_ETCD_API are cleared so that the caller's environment does not leak in.
pub fn run_cli(args: &[&str]) -> (bool, String, String) {
    run_cli_env(args, &[])
}

/// [`run_cli`] with the variables `envs` set.
pub fn run_cli_env(args: &[&str], envs: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(agent_bin())
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("FLANNELD_ETCD_API")
        .envs(envs.iter().copied())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Starts the agent binary with `args` (environment cleared as for [`run_cli`]), its log
/// (stderr) going to the file `log`; killed when the guard drops.
pub fn spawn_agent(args: &[&str], log: &Path) -> KillOnDrop {
    let child = Command::new(agent_bin())
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("FLANNELD_ETCD_API")
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    KillOnDrop(child)
}

/// A child process (an agent run as a command), SIGKILLed and reaped on drop.
pub struct KillOnDrop(pub std::process::Child);

impl KillOnDrop {
    /// Waits (blocking this thread) up to `timeout` for the process to exit; its status, or
    /// None when it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

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

/// Prints the process's captured log when the test fails (or always with
/// OVERLAY_TEST_LOGS=1), so a CI failure says what the agent did: the in-process agent has
/// no log file of its own.
pub struct LogsOnFailure(pub CapturedLogs);

impl LogsOnFailure {
    pub fn install() -> LogsOnFailure {
        LogsOnFailure(capture_logs())
    }
}

impl Drop for LogsOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("OVERLAY_TEST_LOGS").is_some() {
            eprintln!("--- agent log (this test binary) ---\n{}", self.0.text());
        }
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
