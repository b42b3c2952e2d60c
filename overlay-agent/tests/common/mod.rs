//! Helpers for the control-plane tests: a real etcd process (plain, TLS or with auth) on
//! free loopback ports, TLS material made with `openssl`, a recording dataplane, polling.
//!
//! The shared fixture `overlay_tests::etcd::EtcdServer` covers plain etcd; TLS and
//! auth need flags it does not take, so this helper stays for those.

#![allow(dead_code, clippy::unwrap_used)]

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use overlay_agent::{
    dataplane::{Dataplane, DataplaneError, LocalLease},
    peer::PeerEvent,
};
use tokio::sync::mpsc;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind an ephemeral port")
        .local_addr()
        .expect("local addr")
        .port()
}

/// Paths of TLS material for one test.
pub struct Tls {
    pub dir: tempfile::TempDir,
}

impl Tls {
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn ca(&self, name: &str) {
        self.openssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            &format!("{name}.key"),
        ]);
        self.openssl(&[
            "req",
            "-x509",
            "-new",
            "-key",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
    }

    fn leaf(&self, name: &str, ca: &str, ext: &str) {
        self.openssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            &format!("{name}.key"),
        ]);
        self.openssl(&[
            "req",
            "-new",
            "-key",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={name}"),
        ]);
        std::fs::write(self.path(&format!("{name}.ext")), ext).expect("write ext");
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
        ]);
    }

    /// A CA, a server certificate for 127.0.0.1, a client certificate, and a client
    /// certificate from another CA (which the server must refuse).
    pub fn generate() -> Tls {
        let tls = Tls {
            dir: tempfile::tempdir().expect("tempdir"),
        };
        tls.ca("ca");
        tls.ca("rogue-ca");
        tls.leaf(
            "server",
            "ca",
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
        );
        tls.leaf(
            "client",
            "ca",
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n",
        );
        tls.leaf(
            "rogue-client",
            "rogue-ca",
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n",
        );
        tls
    }
}

/// A real etcd on free loopback ports with a temp data dir; killed on drop.
pub struct Etcd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pub endpoint: String,
    peer_port: u16,
    client_port: u16,
    tls_args: Vec<String>,
}

impl Etcd {
    pub fn start() -> Etcd {
        Self::start_with(None)
    }

    /// etcd with server TLS and client-certificate authentication.
    pub fn start_tls(tls: &Tls) -> Etcd {
        Self::start_with(Some(tls))
    }

    fn start_with(tls: Option<&Tls>) -> Etcd {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let client_port = free_port();
        let peer_port = free_port();
        let tls_args = match tls {
            None => vec![],
            Some(t) => vec![
                format!("--cert-file={}", t.path("server.pem").display()),
                format!("--key-file={}", t.path("server.key").display()),
                format!("--trusted-ca-file={}", t.path("ca.pem").display()),
                "--client-cert-auth".to_string(),
            ],
        };
        let mut etcd = Etcd {
            child: None,
            dir: tempfile::tempdir().expect("tempdir"),
            endpoint: format!("{scheme}://127.0.0.1:{client_port}"),
            peer_port,
            client_port,
            tls_args,
        };
        etcd.spawn();
        etcd
    }

    fn spawn(&mut self) {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::File::create(self.dir.path().join("etcd.log")).expect("log file");
        let child = Command::new("etcd")
            .arg("--name=test")
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={}", self.endpoint))
            .arg(format!("--advertise-client-urls={}", self.endpoint))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=test={peer}"))
            .args(&self.tls_args)
            // etcd speaks sd_notify itself; keep it off a test's notify socket.
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd (is it installed?)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.client_port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "etcd did not listen within 30 s: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills etcd and starts it again on the same ports and data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
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

/// A dataplane that records what the control plane asks of it.
pub struct RecordingDataplane {
    pub tx: mpsc::UnboundedSender<Recorded>,
}

impl RecordingDataplane {
    pub fn new() -> (RecordingDataplane, mpsc::UnboundedReceiver<Recorded>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (RecordingDataplane { tx }, rx)
    }
}

impl Dataplane for RecordingDataplane {
    fn name(&self) -> &'static str {
        "recording"
    }
    async fn activate(&mut self, lease: &LocalLease) -> Result<(), DataplaneError> {
        let _ = self.tx.send(Recorded::Activated(lease.clone()));
        Ok(())
    }
    async fn apply(&mut self, event: &PeerEvent) -> Result<(), DataplaneError> {
        let _ = self.tx.send(Recorded::Applied(event.clone()));
        Ok(())
    }
    async fn maintain(&mut self) -> Result<(), DataplaneError> {
        Ok(())
    }
}

pub fn exists(path: &Path) -> bool {
    path.exists()
}
