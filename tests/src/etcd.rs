//! A real etcd-server (Debian's etcd 3.4) for tests: its own data dir, killed on drop.

use std::{
    net::{Ipv4Addr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use tempfile::TempDir;

use crate::{kill_and_reap, netns::NetNs, try_wait_until};

/// Client TLS settings: etcd serves HTTPS with `cert`/`key` and requires client certificates
/// signed by `ca`.
#[derive(Clone, Debug)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// How to start etcd.
#[derive(Clone, Debug, Default)]
pub struct EtcdOptions {
    /// Serve clients over mTLS.
    pub tls: Option<EtcdTls>,
    /// Also serve the v2 keys API (`--enable-v2=true`), as the seeds' clusters do.
    pub enable_v2: bool,
}

/// The keys API flannel's keys are written through: v3, or the v2 keyspace (flanneld <= 0.17
/// and the seeds' clusters; etcd must run with [`EtcdOptions::enable_v2`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeysApi {
    V3,
    V2,
}

/// A running etcd-server.
pub struct EtcdServer {
    child: Child,
    endpoint: String,
    netns: Option<String>,
    /// Certificates etcdctl presents when the server uses TLS.
    tls: Option<EtcdTls>,
    /// Credentials etcdctl uses once auth is enabled.
    user: Option<String>,
    spec: Spec,
    dir: TempDir,
}

/// Everything needed to (re)start the same server.
#[derive(Clone, Debug)]
struct Spec {
    netns: Option<String>,
    ip: Ipv4Addr,
    client_port: u16,
    peer_port: u16,
    options: EtcdOptions,
}

fn spawn(spec: &Spec, dir: &Path) -> Child {
    let scheme = if spec.options.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let (ip, client_port, peer_port) = (spec.ip, spec.client_port, spec.peer_port);
    let endpoint = format!("{scheme}://{ip}:{client_port}");
    let mut listen = endpoint.clone();
    if spec.netns.is_some() && ip != Ipv4Addr::LOCALHOST {
        listen.push_str(&format!(",{scheme}://127.0.0.1:{client_port}"));
    }
    let peer = format!("http://{ip}:{peer_port}");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("etcd.log"))
        .expect("etcd log file");
    let mut command = in_netns(spec.netns.as_deref(), "etcd");
    command
        .arg("--name=test")
        .arg(format!("--data-dir={}", dir.join("data").display()))
        .arg(format!("--listen-client-urls={listen}"))
        .arg(format!("--advertise-client-urls={endpoint}"))
        .arg(format!("--listen-peer-urls={peer}"))
        .arg(format!("--initial-advertise-peer-urls={peer}"))
        .arg(format!("--initial-cluster=test={peer}"))
        .arg("--log-level=warn")
        // etcd speaks sd_notify itself: it must not answer a test's notify socket.
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup log"))
        .stderr(log);
    if spec.options.enable_v2 {
        command.arg("--enable-v2=true");
    }
    if let Some(tls) = &spec.options.tls {
        command
            .arg(format!("--cert-file={}", tls.cert.display()))
            .arg(format!("--key-file={}", tls.key.display()))
            .arg(format!("--trusted-ca-file={}", tls.ca.display()))
            .arg("--client-cert-auth");
    }
    command.spawn().unwrap_or_else(|err| {
        panic!("cannot start etcd (install Debian's etcd-server: `cargo xtask setup`): {err}")
    })
}

impl EtcdServer {
    /// Starts etcd on free ports of 127.0.0.1 in the current (root) namespace.
    pub fn start() -> EtcdServer {
        Self::start_with(EtcdOptions::default())
    }

    /// Starts etcd on free ports of 127.0.0.1 with `options`.
    pub fn start_with(options: EtcdOptions) -> EtcdServer {
        // Another process may grab a port between our probe and etcd's bind: retry.
        for _ in 0..5 {
            let client_port = free_port();
            let peer_port = free_port();
            if let Some(server) =
                Self::try_start(None, Ipv4Addr::LOCALHOST, client_port, peer_port, &options)
            {
                return server;
            }
        }
        panic!("etcd did not start on free loopback ports after 5 attempts");
    }

    /// Starts etcd inside `netns`, listening on `ip:2379` (and its loopback). The namespace
    /// must outlive the server.
    pub fn start_in(netns: &NetNs, ip: Ipv4Addr) -> EtcdServer {
        Self::start_in_with(netns, ip, &EtcdOptions::default())
    }

    /// Like [`EtcdServer::start_in`] with `options` (e.g. mTLS).
    pub fn start_in_with(netns: &NetNs, ip: Ipv4Addr, options: &EtcdOptions) -> EtcdServer {
        Self::try_start(Some(netns), ip, 2379, 2380, options)
            .unwrap_or_else(|| panic!("etcd did not start in namespace {}", netns.name()))
    }

    fn try_start(
        netns: Option<&NetNs>,
        ip: Ipv4Addr,
        client_port: u16,
        peer_port: u16,
        options: &EtcdOptions,
    ) -> Option<EtcdServer> {
        let dir = tempfile::Builder::new()
            .prefix("overlay-etcd-")
            .tempdir()
            .expect("temp dir for etcd");
        let scheme = if options.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let spec = Spec {
            netns: netns.map(|ns| ns.name().to_owned()),
            ip,
            client_port,
            peer_port,
            options: options.clone(),
        };
        let child = spawn(&spec, dir.path());
        let mut server = EtcdServer {
            child,
            endpoint: format!("{scheme}://{ip}:{client_port}"),
            netns: spec.netns.clone(),
            tls: options.tls.clone(),
            user: None,
            spec,
            dir,
        };
        if server.wait_healthy() {
            return Some(server);
        }
        eprintln!(
            "etcd failed to start on {}:\n{}",
            server.endpoint,
            server.log()
        );
        None
    }

    fn wait_healthy(&mut self) -> bool {
        let healthy = try_wait_until(Duration::from_secs(30), || {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true; // exited: stop waiting, reported by the caller
            }
            self.etcdctl_output(&["endpoint", "health"])
                .status
                .success()
        });
        healthy && self.is_running()
    }

    /// The client URL, e.g. `http://127.0.0.1:41234`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }

    /// A scratch directory that lives as long as the server.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Makes etcdctl authenticate as `user:password` from now on (after enabling auth).
    pub fn set_etcdctl_user(&mut self, user_password: &str) {
        self.user = Some(user_password.to_owned());
    }

    /// Runs `etcdctl` (v3 API) against this server; returns the output whatever its status.
    pub fn etcdctl_output(&self, args: &[&str]) -> Output {
        let mut command = in_netns(self.netns.as_deref(), "etcdctl");
        command
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint))
            .arg("--command-timeout=10s");
        if let Some(tls) = &self.tls {
            command
                .arg(format!("--cacert={}", tls.ca.display()))
                .arg(format!("--cert={}", tls.cert.display()))
                .arg(format!("--key={}", tls.key.display()));
        }
        if let Some(user) = &self.user {
            command.arg(format!("--user={user}"));
        }
        command.args(args);
        command
            .output()
            .unwrap_or_else(|err| panic!("cannot run etcdctl (Debian's etcd-client): {err}"))
    }

    /// Runs `ETCDCTL_API=2 etcdctl` (the v2 keys API: `mk`, `set --ttl`, `get`, `rm`, `ls`)
    /// against this server; returns the output whatever its status.
    pub fn etcdctl_v2_output(&self, args: &[&str]) -> Output {
        let mut command = in_netns(self.netns.as_deref(), "etcdctl");
        command
            .env("ETCDCTL_API", "2")
            .arg(format!("--endpoints={}", self.endpoint))
            .arg("--timeout=10s");
        if let Some(tls) = &self.tls {
            command
                .arg(format!("--ca-file={}", tls.ca.display()))
                .arg(format!("--cert-file={}", tls.cert.display()))
                .arg(format!("--key-file={}", tls.key.display()));
        }
        command.args(args);
        command
            .output()
            .unwrap_or_else(|err| panic!("cannot run etcdctl (Debian's etcd-client): {err}"))
    }

    /// Runs `ETCDCTL_API=2 etcdctl`; panics with its output on failure; returns stdout.
    pub fn etcdctl_v2(&self, args: &[&str]) -> String {
        stdout_of_success("ETCDCTL_API=2 etcdctl", args, self.etcdctl_v2_output(args))
    }

    /// Runs `etcdctl`; panics with its output on failure; returns stdout.
    pub fn etcdctl(&self, args: &[&str]) -> String {
        stdout_of_success("etcdctl", args, self.etcdctl_output(args))
    }

    pub fn put(&self, key: &str, value: &str) {
        // `--` so values starting with '-' are not taken for flags.
        self.etcdctl(&["put", "--", key, value]);
    }

    pub fn get(&self, key: &str) -> Option<String> {
        let out = self.etcdctl(&["get", "--print-value-only", "--", key]);
        let value = out.strip_suffix('\n').unwrap_or(&out);
        (!out.is_empty()).then(|| value.to_owned())
    }

    pub fn delete(&self, key: &str) {
        self.etcdctl(&["del", "--", key]);
    }

    /// Writes the network config at `<prefix>/config` through `api`; v2 with `etcdctl mk`, as the
    /// seeds' getting-started guide does.
    pub fn put_config_in(&self, api: KeysApi, prefix: &str, json: &str) {
        let key = format!("{prefix}/config");
        match api {
            KeysApi::V3 => self.put(&key, json),
            KeysApi::V2 => {
                self.etcdctl_v2(&["mk", &key, json]);
            }
        }
    }

    /// Writes a subnet lease through `api`; v2 as flanneld 0.7 does, with `set --ttl` and its
    /// 24 h lease time.
    pub fn put_lease_in(&self, api: KeysApi, key: &str, json: &str) {
        match api {
            KeysApi::V3 => self.put(key, json),
            KeysApi::V2 => {
                self.etcdctl_v2(&["set", "--ttl", "86400", key, json]);
            }
        }
    }

    /// Keys under `prefix`, sorted.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        self.etcdctl(&["get", "--prefix", "--keys-only", "--", prefix])
            .lines()
            .filter(|line| !line.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// Stops the server (SIGKILL) without removing its data: [`EtcdServer::restart`] brings it
    /// back with the same data and address.
    pub fn stop(&mut self) {
        kill_and_reap(&mut self.child);
    }

    /// Starts the server again after [`EtcdServer::stop`], same data, same address.
    pub fn restart(&mut self) {
        kill_and_reap(&mut self.child);
        self.child = spawn(&self.spec, self.dir.path());
        assert!(
            self.wait_healthy(),
            "etcd did not come back:\n{}",
            self.log()
        );
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

/// A three-member etcd cluster on loopback (for endpoint failover); members killed on drop.
pub struct EtcdCluster {
    pub endpoints: Vec<String>,
    members: Vec<Option<Child>>,
    args: Vec<Vec<String>>,
    dir: tempfile::TempDir,
}

impl EtcdCluster {
    pub fn start() -> EtcdCluster {
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
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
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|err| {
                panic!(
                    "cannot start etcd (install Debian's etcd-server: `cargo xtask setup`): {err}"
                )
            });
        self.members[i] = Some(child);
    }

    /// SIGKILLs member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].take() {
            kill_and_reap(&mut child);
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

/// `program` in the namespace named `netns` (`ip netns exec`), or here.
fn in_netns(netns: Option<&str>, program: &str) -> Command {
    match netns {
        Some(ns) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", ns, program]);
            command
        }
        None => Command::new(program),
    }
}

/// The stdout of `output`; panics with all of it when the command failed.
fn stdout_of_success(what: &str, args: &[&str], output: Output) -> String {
    if !output.status.success() {
        panic!(
            "{what} {args:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free loopback port")
}
