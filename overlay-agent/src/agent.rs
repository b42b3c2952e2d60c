//! The agent's run loop (`overlay-agent run`):
//! flags -> etcd -> a valid network config (waiting and saying what is wrong) -> uplink ->
//! dataplane for the backend -> lease -> datapath programmed -> subnet.env -> READY=1 ->
//! follow peers and keep the lease. SIGTERM/SIGINT stop the process and leave the lease
//! and the datapath in place, so a restart interrupts no traffic.

use std::{
    future::Future,
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use etcd_client::Client;
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use crate::{
    cli::flags::Flags,
    control::config::{BackendType, NetworkConfig},
    control::etcd::{self, EtcdError, EtcdOptions},
    control::lease::{HeldLease, LEASE_TTL, LeaseError, LeaseListing, Lessor, format_mac},
    control::store::{EtcdApi, KvStore, Store},
    control::subnet_file::{SubnetEnv, SubnetFileError},
    control::watch::{PeerRules, PeerWatcher},
    dataplane::{
        self, DataplaneCommand, DataplaneError, LeaseAttrs, LocalLease,
        ebpf::{
            EbpfDataplane, EbpfSettings, counters_by_name, read_pinned_stats,
            remove_pinned_all_versions,
        },
        host_gw::HostGwDataplane,
        vxlan::VxlanDataplane,
    },
    observe::health,
    observe::status::{AgentStatus, PeerStatus},
    os::bpffs,
    os::forward,
    os::iface,
    os::masq,
    os::notify,
    peer::PeerEvent,
};

/// How often a missing or invalid config (or an unreachable etcd) is re-checked.
pub const CONFIG_RECHECK: Duration = Duration::from_secs(2);
/// How often a failed lease acquisition (e.g. out of subnets) is retried.
pub const LEASE_RETRY: Duration = Duration::from_secs(5);
use overlay_common::VXLAN_OVERHEAD;

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error("choosing the uplink interface: {0}")]
    Iface(#[from] iface::IfaceError),
    #[error("setting up the {backend} dataplane: {source}")]
    Dataplane {
        backend: BackendType,
        #[source]
        source: DataplaneError,
    },
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error(transparent)]
    SubnetFile(#[from] SubnetFileError),
    #[error(transparent)]
    Health(#[from] health::HealthError),
    #[error("the dataplane task stopped unexpectedly")]
    DataplaneStopped,
}

/// Logs a recurring problem once per distinct message instead of on every retry.
#[derive(Default)]
pub struct ProblemLog {
    last: Option<String>,
}

impl ProblemLog {
    pub fn report(&mut self, message: String) {
        if self.last.as_deref() != Some(message.as_str()) {
            warn!("{message}");
            self.last = Some(message);
        }
    }

    pub fn resolved(&mut self, what: &str) {
        if self.last.take().is_some() {
            info!("{what}");
        }
    }
}

/// The pod MTU for subnet.env: the underlay MTU (Backend.MTU or the uplink's) minus the
/// VXLAN overhead, or unchanged for host-gw.
pub fn pod_mtu(config: &NetworkConfig, uplink_mtu: u32) -> u32 {
    let underlay = config.backend.mtu.unwrap_or(uplink_mtu);
    match config.backend.kind {
        BackendType::HostGw => underlay,
        BackendType::Vxlan | BackendType::Ebpf => underlay.saturating_sub(VXLAN_OVERHEAD),
    }
}

/// Connects to etcd, retrying (one log line per distinct problem) until it works or
/// `shutdown` fires (`None`).
pub async fn connect_etcd_retrying(
    opts: &EtcdOptions,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Option<Client>, EtcdError> {
    let mut problems = ProblemLog::default();
    loop {
        match etcd::connect(opts).await {
            Ok(client) => {
                problems.resolved("connected to etcd");
                return Ok(Some(client));
            }
            // Bad local files or flags do not get better by waiting.
            Err(
                err @ (EtcdError::TlsFile { .. }
                | EtcdError::HalfIdentity { .. }
                | EtcdError::HalfCredentials
                | EtcdError::PlainEndpointWithTls { .. }
                | EtcdError::NoEndpoints),
            ) => return Err(err),
            Err(err) => problems.report(format!("{err}; retrying every {CONFIG_RECHECK:?}")),
        }
        if wait_or_shutdown(CONFIG_RECHECK, shutdown).await {
            return Ok(None);
        }
    }
}

/// Sleeps `d`; true when shutdown was requested meanwhile.
async fn wait_or_shutdown(d: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    if *shutdown.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => *shutdown.borrow(),
        _ = shutdown.changed() => true,
    }
}

/// Reads `<prefix>/config` until it holds a valid config. Each distinct problem (absent,
/// invalid and why, etcd unreachable) is logged once, with how to fix it.
pub async fn wait_for_config<S: KvStore>(
    client: &mut S,
    opts: &EtcdOptions,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<NetworkConfig> {
    let key = opts.config_key();
    let mut problems = ProblemLog::default();
    loop {
        match client.get(&key).await {
            Ok((kv, _)) => match kv {
                None if client.api() == EtcdApi::V2 => problems.report(format!(
                    "no network config at {key} in etcd's v2 keyspace: write one with \
                     `overlay-agent --etcd-api=v2 --etcd-prefix={} config set '{}'` \
                     or `ETCDCTL_API=2 etcdctl set {key} '<json>'`; re-checking every {CONFIG_RECHECK:?}",
                    opts.prefix,
                    crate::control::config::EXAMPLE_CONFIG
                )),
                None => problems.report(format!(
                    "no network config at {key} in etcd (v3 API; etcdctl v2's `mk`/`set` write elsewhere): \
                     write one with `overlay-agent --etcd-prefix={} config set '{}'` \
                     or `ETCDCTL_API=3 etcdctl put {key} '<json>'`; re-checking every {CONFIG_RECHECK:?}",
                    opts.prefix,
                    crate::control::config::EXAMPLE_CONFIG
                )),
                Some(kv) => {
                    let text = String::from_utf8_lossy(&kv.value);
                    match NetworkConfig::parse_verbose(&text) {
                        Ok(parsed) => {
                            problems.resolved("the network config is valid now");
                            if parsed.backend_defaulted {
                                info!("the network config has no Backend: using vxlan (flanneld would use udp, which overlay-agent does not implement)");
                            }
                            let c = &parsed.config;
                            info!(
                                network = %c.network, subnet_len = c.subnet_len, subnet_min = %c.subnet_min,
                                subnet_max = %c.subnet_max, backend = %c.backend.kind, vni = c.backend.vni,
                                port = c.backend.port, "network config loaded from {key}"
                            );
                            return Some(parsed.config);
                        }
                        Err(err) => problems.report(format!(
                            "the network config at {key} is invalid: {err}; re-checking every {CONFIG_RECHECK:?}"
                        )),
                    }
                }
            },
            Err(err) => problems.report(format!(
                "cannot read {key} from etcd: {err}; re-checking every {CONFIG_RECHECK:?}"
            )),
        }
        // The warning above comes once per distinct problem; this line comes every time, so
        // that -v shows the agent is still looking (and tests can count the re-checks).
        debug!(key = ?key, "no usable network config yet; re-checking in {CONFIG_RECHECK:?}");
        if wait_or_shutdown(CONFIG_RECHECK, shutdown).await {
            return None;
        }
    }
}

/// A dataplane ready to run, with what it publishes in our lease.
pub struct NodeSetup<D> {
    pub dataplane: D,
    pub attrs: LeaseAttrs,
    /// PublicIP for the lease.
    pub public_ip: Ipv4Addr,
    /// FLANNEL_MTU.
    pub pod_mtu: u32,
}

/// Everything after the dataplane exists: lease, activation, subnet.env, READY=1, peers,
/// lease keeping. Generic over the dataplane (tests drive it with a recording one); the
/// dataplane runs on this task (its futures need not be `Send`).
pub async fn run_node<D: dataplane::Dataplane, S: KvStore>(
    flags: &Flags,
    client: S,
    config: NetworkConfig,
    setup: NodeSetup<D>,
    lease_ttl: Duration,
    status: watch::Sender<AgentStatus>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), AgentError> {
    let opts = flags.etcd_options();
    let (cmd_tx, cmd_rx) = mpsc::channel::<DataplaneCommand>(256);
    let (dp_ready_tx, dp_ready_rx) = watch::channel(false);
    let backend = config.backend.kind;
    let dataplane_task = dataplane::run_dataplane_every(
        setup.dataplane,
        cmd_rx,
        dp_ready_tx,
        Duration::from_secs(flags.maintain_interval),
    );
    // Not fatal when it cannot listen: the dataplane still learns pods from netlink.
    let cni_notices = flags.cni_socket_path().and_then(|path| {
        crate::cni::agent_socket::serve(&path, cmd_tx.clone())
            .inspect_err(|err| warn!(socket = %path.display(), error = %err, "cannot serve CNI plugin notices; new pods reach the fast path on the next netlink poll"))
            .ok()
    });
    let _stop_notices = AbortOnDrop(cni_notices);
    let control = ControlLoop {
        flags,
        opts: &opts,
        client,
        config,
        public_ip: setup.public_ip,
        pod_mtu: setup.pod_mtu,
        cmd_tx,
        status,
    }
    .run(setup.attrs, lease_ttl, dp_ready_rx, &mut shutdown);
    tokio::select! {
        result = control => result,
        () = dataplane_task => {
            error!(backend = %backend, "the dataplane task ended");
            Err(AgentError::DataplaneStopped)
        }
    }
}

/// Stops a spawned task when the owner returns.
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}

/// The control loop's inputs: this node, its config and where its work goes.
struct ControlLoop<'a, S: KvStore> {
    flags: &'a Flags,
    opts: &'a EtcdOptions,
    client: S,
    config: NetworkConfig,
    public_ip: Ipv4Addr,
    pod_mtu: u32,
    cmd_tx: mpsc::Sender<DataplaneCommand>,
    status: watch::Sender<AgentStatus>,
}

/// The tasks that run beside the control loop while it holds a lease.
struct SideTasks {
    keeper: tokio::task::JoinHandle<()>,
    watcher: tokio::task::JoinHandle<()>,
    config_watcher: tokio::task::JoinHandle<()>,
    masq: Option<tokio::task::JoinHandle<()>>,
    forward: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for SideTasks {
    fn drop(&mut self) {
        self.keeper.abort();
        self.watcher.abort();
        self.config_watcher.abort();
        for task in [self.masq.take(), self.forward.take()]
            .into_iter()
            .flatten()
        {
            task.abort();
        }
    }
}

impl<S: KvStore> ControlLoop<'_, S> {
    /// Lease, datapath, rules, subnet.env and READY=1 in flanneld's order, then follows
    /// lease changes and peer events until shutdown.
    async fn run(
        self,
        attrs: LeaseAttrs,
        lease_ttl: Duration,
        dp_ready: watch::Receiver<bool>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), AgentError> {
        self.status.send_modify(|s| {
            s.node.public_ip = self.public_ip.to_string();
            s.node.vtep_mac = match &attrs {
                LeaseAttrs::Vxlan { vtep_mac, .. } => Some(format_mac(vtep_mac)),
                LeaseAttrs::HostGw => None,
            };
            s.etcd.connected = true;
            s.etcd.api = self.client.api().to_string();
        });
        let mut lessor = Lessor::new(
            self.client.clone(),
            self.opts.clone(),
            self.config.clone(),
            self.public_ip,
            attrs,
        )
        .with_ttl(lease_ttl);
        let Some(held) = self.acquire(&mut lessor, shutdown).await else {
            return Ok(());
        };
        info!(subnet = %held.subnet, public_ip = %self.public_ip, "holding subnet lease");
        let first_listing = lessor.take_listing();
        self.publish_lease(&held);
        if !self.wait_for_datapath(&held, dp_ready, shutdown).await? {
            return Ok(());
        }
        // flanneld installs its masquerade rules before it writes subnet.env.
        if self.flags.ip_masq
            && let Err(err) = masq::apply(self.config.network, held.subnet).await
        {
            warn!(error = %err, "installing the ip-masq rules failed; retrying every {:?}", self.flags.iptables_resync());
        }
        let masq = self.start_masq(held.subnet);
        let forward = start_forward_rules(self.flags, self.config.network).await;
        if let Err(err) = self.subnet_env(&held).write(&self.flags.subnet_file) {
            for task in [masq, forward].into_iter().flatten() {
                task.abort();
            }
            return Err(err.into());
        }
        info!(path = %self.flags.subnet_file.display(), "wrote the subnet file");
        notify::ready();
        self.status.send_modify(|s| s.ready = true);
        self.follow(lessor, held, first_listing, masq, forward, shutdown)
            .await
    }

    /// Takes a lease (the previous run's subnet when it is still ours), retrying until
    /// shutdown; None on shutdown.
    async fn acquire(
        &self,
        lessor: &mut Lessor<S>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<HeldLease> {
        // The previous run's subnet, to keep pod addresses stable across restarts.
        let previous = match SubnetEnv::read(&self.flags.subnet_file) {
            Ok(prev) => prev.map(|p| p.subnet),
            Err(err) => {
                warn!(error = %err, "ignoring the previous subnet file");
                None
            }
        };
        let mut problems = ProblemLog::default();
        let mut attempt = 0u64;
        loop {
            attempt += 1;
            match lessor.acquire(previous).await {
                Ok(held) => {
                    problems.resolved("subnet lease acquired after earlier failures");
                    return Some(held);
                }
                Err(err) => problems.report(format!("{err}; retrying every {LEASE_RETRY:?}")),
            }
            // As in wait_for_config: the warning comes once per distinct problem, this line
            // on every failed attempt (for -v, and for tests that count attempts).
            debug!(attempt, prefix = ?self.opts.prefix, "no subnet lease yet; retrying in {LEASE_RETRY:?}");
            if wait_or_shutdown(LEASE_RETRY, shutdown).await {
                return None;
            }
        }
    }

    /// Asks the dataplane to program our lease and waits until it has (READY=1 only then);
    /// false on shutdown.
    async fn wait_for_datapath(
        &self,
        held: &HeldLease,
        mut dp_ready: watch::Receiver<bool>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<bool, AgentError> {
        self.activate(held).await?;
        // The dataplane retries failed activations itself; we only say that we wait.
        let mut waited = Duration::ZERO;
        while !*dp_ready.borrow_and_update() {
            tokio::select! {
                changed = dp_ready.changed() => if changed.is_err() { return Err(AgentError::DataplaneStopped) },
                _ = tokio::time::sleep(Duration::from_secs(10)) => {
                    waited += Duration::from_secs(10);
                    warn!(waited = ?waited, "still waiting for the datapath to be programmed for our lease");
                    self.activate(held).await?;
                }
                _ = shutdown.changed() => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Follows our lease (re-programs, rewrites subnet.env and the masquerade rules when it
    /// changes) and passes peer events on to the dataplane, keeping the status's peer list.
    async fn follow(
        &self,
        lessor: Lessor<S>,
        held: HeldLease,
        first_listing: Option<LeaseListing>,
        masq: Option<tokio::task::JoinHandle<()>>,
        forward: Option<tokio::task::JoinHandle<()>>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), AgentError> {
        let (held_tx, mut held_rx) = watch::channel(held.clone());
        let (own_tx, own_rx) = watch::channel(held.subnet);
        // The watcher's events pass through here on their way to the dataplane.
        let (peer_tx, mut peer_rx) = mpsc::channel::<DataplaneCommand>(256);
        let mut tasks = SideTasks {
            keeper: tokio::spawn(lessor.keep(held.clone(), self.flags.renew_margin(), held_tx)),
            watcher: tokio::spawn(
                PeerWatcher::new(
                    self.client.clone(),
                    self.opts.clone(),
                    PeerRules {
                        backend: self.config.backend.kind.lease_backend(),
                        network: self.config.network,
                        own_public_ip: self.public_ip,
                    },
                    own_rx,
                    peer_tx,
                )
                .with_status(self.status.clone())
                .with_first_listing(first_listing)
                .run(),
            ),
            config_watcher: tokio::spawn(crate::control::config_watch::watch_config(
                self.client.clone(),
                self.opts.clone(),
                self.config.clone(),
                self.flags.backend,
            )),
            masq,
            forward,
        };
        loop {
            tokio::select! {
                changed = held_rx.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    let held = held_rx.borrow_and_update().clone();
                    info!(subnet = %held.subnet, "our lease changed; reprogramming and rewriting the subnet file");
                    self.publish_lease(&held);
                    self.activate(&held).await?;
                    if let Some(task) = tasks.masq.take() {
                        task.abort();
                    }
                    tasks.masq = self.start_masq(held.subnet);
                    if let Err(err) = self.subnet_env(&held).write(&self.flags.subnet_file) {
                        error!(error = %err, "rewriting the subnet file failed");
                    }
                    own_tx.send_replace(held.subnet);
                }
                command = peer_rx.recv() => {
                    let Some(command) = command else { return Ok(()) };
                    if let DataplaneCommand::Peers(event) = &command {
                        self.status.send_modify(|s| record_peer_event(s, event));
                    }
                    if self.cmd_tx.send(command).await.is_err() {
                        return Err(AgentError::DataplaneStopped);
                    }
                }
                _ = shutdown.changed() => return Ok(()),
            }
        }
    }

    async fn activate(&self, held: &HeldLease) -> Result<(), AgentError> {
        let local = LocalLease {
            subnet: held.subnet,
            network: self.config.network,
            public_ip: self.public_ip,
        };
        self.cmd_tx
            .send(DataplaneCommand::Activate(local))
            .await
            .map_err(|_| AgentError::DataplaneStopped)
    }

    fn publish_lease(&self, held: &HeldLease) {
        let expires =
            std::time::SystemTime::now() + held.ttl.saturating_sub(held.renewed_at.elapsed());
        self.status.send_modify(|s| {
            s.node.subnet = held.subnet.to_string();
            s.node.lease_expires_unix = expires
                .duration_since(std::time::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs());
        });
    }

    fn subnet_env(&self, held: &HeldLease) -> SubnetEnv {
        SubnetEnv {
            network: self.config.network,
            subnet: held.subnet,
            mtu: self.pod_mtu,
            ipmasq: self.flags.ip_masq,
        }
    }

    fn start_masq(&self, subnet: ipnetwork::Ipv4Network) -> Option<tokio::task::JoinHandle<()>> {
        self.flags.ip_masq.then(|| {
            tokio::spawn(masq::keep_rules(
                self.config.network,
                subnet,
                self.flags.iptables_resync(),
            ))
        })
    }
}

/// `--iptables-forward-rules` (flanneld's default: on): installs the FORWARD accept rules
/// before subnet.env tells Docker to start, then keeps them with `--iptables-resync`.
async fn start_forward_rules(
    flags: &Flags,
    network: ipnetwork::Ipv4Network,
) -> Option<tokio::task::JoinHandle<()>> {
    if !flags.iptables_forward_rules {
        info!(
            "--iptables-forward-rules=false: not installing FORWARD accept rules; a FORWARD policy of DROP (Docker sets one) then drops pod traffic between nodes"
        );
        return None;
    }
    let iptables = forward::Iptables::default();
    let installed = match forward::install(&iptables, network).await {
        Ok(()) => true,
        Err(err) => {
            warn!(error = %err, "installing the FORWARD accept rules failed; retrying every {:?}", flags.iptables_resync());
            false
        }
    };
    Some(tokio::spawn(forward::keep_rules(
        iptables,
        network,
        flags.iptables_resync(),
        installed,
    )))
}

/// Keeps the status's peer list in step with what the dataplane is told.
fn record_peer_event(status: &mut AgentStatus, event: &PeerEvent) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let entry = |peer: &crate::peer::Peer, since: u64| PeerStatus {
        subnet: peer.subnet.to_string(),
        public_ip: peer.public_ip.to_string(),
        backend: if peer.vtep_mac.is_some() {
            "vxlan".into()
        } else {
            "host-gw".into()
        },
        vtep_mac: peer.vtep_mac.as_ref().map(format_mac),
        since_unix: since,
    };
    match event {
        PeerEvent::Upsert(peer) => {
            let since = status.peers.get(&peer.subnet).map_or(now, |p| p.since_unix);
            status.peers.insert(peer.subnet, entry(peer, since));
        }
        PeerEvent::Remove(subnet) => {
            status.peers.remove(subnet);
        }
        PeerEvent::Snapshot(peers) => {
            let old = std::mem::take(&mut status.peers);
            for peer in peers {
                let since = old.get(&peer.subnet).map_or(now, |p| p.since_unix);
                status.peers.insert(peer.subnet, entry(peer, since));
            }
        }
    }
    status.events_applied += 1;
}

/// Resolves when SIGTERM or SIGINT arrives.
pub async fn termination_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(err) => {
            warn!(error = %err, "cannot listen for SIGTERM; only SIGINT stops the agent");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT received"),
    }
}

/// Turns a future (a signal) into a shutdown watch.
pub fn shutdown_on<F: Future<Output = ()> + Send + 'static>(signal: F) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        signal.await;
        tx.send_replace(true);
        // Keep the sender alive so receivers see `true`, not a closed channel.
        std::future::pending::<()>().await;
    });
    rx
}

/// `overlay-agent run`.
pub async fn run(flags: Flags) -> Result<(), AgentError> {
    let mut shutdown = shutdown_on(termination_signal());
    let (status_tx, status_rx) = watch::channel(AgentStatus::default());
    let _health = if flags.healthz_port != 0 {
        Some(
            health::serve(
                SocketAddr::new(flags.healthz_ip, flags.healthz_port),
                status_rx,
            )
            .await?,
        )
    } else {
        None
    };

    let opts = flags.etcd_options();
    let Some(mut client) =
        crate::control::store::select::connect_store_retrying(&opts, flags.etcd_api, &mut shutdown)
            .await?
    else {
        return Ok(());
    };
    status_tx.send_modify(|s| s.etcd.api = client.api().to_string());
    let Some(mut config) = wait_for_config(&mut client, &opts, &mut shutdown).await else {
        return Ok(());
    };
    if let Some(kind) = flags.backend
        && kind != config.backend.kind
    {
        info!(config = %config.backend.kind, flag = %kind, "--backend overrides the config's Backend.Type");
    }
    config = config.with_backend_override(flags.backend);
    status_tx.send_modify(|s| s.node.backend = config.backend.kind.to_string());

    let uplink = iface::select_uplink(&flags.iface_options()).await?;
    info!(
        uplink = %uplink.name, address = %uplink.address, public_ip = %uplink.public_ip,
        mtu = uplink.mtu, "selected the uplink"
    );
    let mtu = pod_mtu(&config, uplink.mtu);
    let result = start_backend(&flags, client, config, &uplink, mtu, status_tx, shutdown).await;
    if result.is_ok() {
        info!("stopping; the lease, the datapath and subnet.env stay in place for the next start");
        notify::stopping();
    }
    result
}

/// What every backend needs to go on once its dataplane exists: `run` hands it to
/// [`run_node`]. One place for the hand-over the four backend set-ups used to copy.
struct Launch<'a> {
    flags: &'a Flags,
    client: Store,
    config: NetworkConfig,
    public_ip: Ipv4Addr,
    status: watch::Sender<AgentStatus>,
    shutdown: watch::Receiver<bool>,
}

impl Launch<'_> {
    async fn run<D: dataplane::Dataplane>(
        self,
        dataplane: D,
        attrs: LeaseAttrs,
        pod_mtu: u32,
    ) -> Result<(), AgentError> {
        let setup = NodeSetup {
            dataplane,
            attrs,
            public_ip: self.public_ip,
            pod_mtu,
        };
        run_node(
            self.flags,
            self.client,
            self.config,
            setup,
            LEASE_TTL,
            self.status,
            self.shutdown,
        )
        .await
    }
}

/// The dataplane factory: builds the configured backend and runs the node with it.
///
/// - `host-gw`: [`HostGwDataplane`] on the uplink;
/// - `vxlan`: [`VxlanDataplane`] (`flannel.<VNI>` exactly as flanneld programs it);
/// - `ebpf`: the same kernel device with [`EbpfDataplane`] on top; when the programs cannot
///   be loaded or attached, the node runs the kernel device alone (a plain flannel vxlan
///   node, wire-compatible) and says why in the log and the status.
async fn start_backend(
    flags: &Flags,
    client: Store,
    config: NetworkConfig,
    uplink: &iface::Uplink,
    pod_mtu: u32,
    status: watch::Sender<AgentStatus>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), AgentError> {
    let kind = config.backend.kind;
    let setup_err = |source| AgentError::Dataplane {
        backend: kind,
        source,
    };
    let backend = config.backend.clone();
    let launch = Launch {
        flags,
        client,
        config,
        public_ip: uplink.public_ip,
        status,
        shutdown,
    };
    match kind {
        BackendType::HostGw => {
            remove_stale_ebpf(&flags.bpf_pin_dir);
            if flags.nexthop_objects {
                warn!(
                    "--nexthop-objects applies to the vxlan and ebpf backends; host-gw writes flannel's routes"
                );
            }
            let (dataplane, attrs) = HostGwDataplane::new(uplink.clone())
                .await
                .map_err(setup_err)?;
            launch
                .status
                .send_modify(|s| s.node.active_datapath = "host-gw".into());
            launch.run(dataplane, attrs, pod_mtu).await
        }
        BackendType::Vxlan => {
            remove_stale_ebpf(&flags.bpf_pin_dir);
            let (dataplane, attrs) = vxlan_dataplane(uplink, &backend, flags)
                .await
                .map_err(setup_err)?;
            launch
                .status
                .send_modify(|s| s.node.active_datapath = "vxlan".into());
            let pod_mtu = dataplane.mtu();
            launch.run(dataplane, attrs, pod_mtu).await
        }
        BackendType::Ebpf => {
            let (kernel, attrs) = vxlan_dataplane(uplink, &backend, flags)
                .await
                .map_err(setup_err)?;
            start_ebpf(launch, kernel, attrs, uplink).await
        }
    }
}

/// The kernel vxlan dataplane (alone, or under eBPF), its routes in the layout the flags
/// ask for.
async fn vxlan_dataplane(
    uplink: &iface::Uplink,
    backend: &crate::control::config::BackendConfig,
    flags: &Flags,
) -> Result<(VxlanDataplane, LeaseAttrs), dataplane::DataplaneError> {
    let (mut dataplane, attrs) = VxlanDataplane::new(uplink.clone(), backend).await?;
    if flags.nexthop_objects {
        dataplane.use_nexthop_objects().await?;
    }
    Ok((dataplane, attrs))
}

/// The eBPF datapath over `kernel`; when it cannot load here, `kernel` alone (a plain
/// flannel vxlan node), said loudly and shown in /status.
async fn start_ebpf(
    launch: Launch<'_>,
    kernel: VxlanDataplane,
    attrs: LeaseAttrs,
    uplink: &iface::Uplink,
) -> Result<(), AgentError> {
    let flags = launch.flags;
    let pod_mtu = kernel.mtu();
    let vtep_mac = match &attrs {
        LeaseAttrs::Vxlan { vtep_mac, .. } => Some(*vtep_mac),
        LeaseAttrs::HostGw => None,
    };
    let settings = EbpfSettings {
        pin_dir: flags.bpf_pin_dir.clone(),
        bridge: flags.bridge.clone(),
        uplink: uplink.clone(),
        vni: launch.config.backend.vni,
        port: launch.config.backend.port,
        vtep_mac,
        vxlan_device: kernel.device_name().to_string(),
        fast_path: flags.ebpf_fast_path,
    };
    // Without a bpf filesystem nothing can be pinned: mount one (as Cilium's agent does)
    // and fall back only when that fails.
    let started = match bpffs::ensure_pin_root(&flags.bpf_pin_dir) {
        Ok(_) => EbpfDataplane::new(kernel, settings)
            .map_err(|unavailable| (unavailable.to_string(), unavailable.kernel)),
        Err(err) => Err((format!("the eBPF datapath is unavailable: {err}"), kernel)),
    };
    match started {
        Ok(dataplane) => {
            let gso_decap = dataplane.gso_decap_supported();
            launch.status.send_modify(|s| {
                s.node.active_datapath = "ebpf".into();
                s.node.ebpf_fast_path = Some(flags.ebpf_fast_path.to_string());
                s.node.gso_decap_in_bpf = Some(gso_decap);
            });
            let stats = tokio::spawn(copy_datapath_counters(
                flags.bpf_pin_dir.clone(),
                launch.status.clone(),
            ));
            let result = launch.run(dataplane, attrs, pod_mtu).await;
            stats.abort();
            result
        }
        Err((reason, kernel)) => {
            warn!(reason = %reason, "the eBPF datapath cannot run here; this node forwards through the kernel vxlan device alone (a plain flannel vxlan node)");
            remove_ebpf_left_by_earlier_run(&flags.bpf_pin_dir);
            launch.status.send_modify(|s| {
                s.node.active_datapath = "vxlan".into();
                s.node.fallback_reason = Some(reason);
            });
            launch.run(kernel, attrs, pod_mtu).await
        }
    }
}

/// How often the eBPF datapath's counters are copied into the status.
pub const STATS_INTERVAL: Duration = Duration::from_secs(5);

/// Copies the pinned eBPF counters into the status every [`STATS_INTERVAL`].
async fn copy_datapath_counters(pin_dir: std::path::PathBuf, status: watch::Sender<AgentStatus>) {
    let mut ticker = tokio::time::interval(STATS_INTERVAL);
    let mut warned = false;
    loop {
        ticker.tick().await;
        match read_pinned_stats(&pin_dir) {
            Ok(values) => status.send_modify(|s| s.datapath_counters = counters_by_name(&values)),
            Err(err) if !warned => {
                warn!(error = %err, "cannot read the eBPF counters for the status");
                warned = true;
            }
            Err(_) => {}
        }
    }
}

/// A node switched from `ebpf` to `vxlan`/`host-gw` must not keep running the old programs:
/// unpinning their links detaches them (the kernel path underneath stays).
fn remove_stale_ebpf(pin_dir: &std::path::Path) {
    match remove_pinned_all_versions(pin_dir) {
        Ok(true) => {
            info!(pin_dir = %pin_dir.display(), "removed the eBPF datapath of an earlier --backend=ebpf run")
        }
        Ok(false) => {}
        Err(err) => warn!(error = %err, "cannot remove the eBPF datapath of an earlier run"),
    }
}

/// After a failed eBPF start, an earlier run's pinned programs would stay attached and keep
/// working from maps nobody updates (dropping VXLAN from nodes that join later as "unknown
/// source"): unpinning them detaches them and leaves a plain flannel vxlan node.
fn remove_ebpf_left_by_earlier_run(pin_dir: &std::path::Path) {
    match remove_pinned_all_versions(pin_dir) {
        Ok(true) => warn!(
            pin_dir = %pin_dir.display(),
            "falling back: detached and unpinned the eBPF programs and maps an earlier run left under the pin directory, so they no longer act on traffic with stale peers"
        ),
        Ok(false) => {}
        Err(err) => error!(
            error = %err,
            "falling back, but the eBPF programs of an earlier run may still be attached and drop VXLAN from new peers; remove the pin directory by hand"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::{MacAddr6, Peer};

    fn config(json: &str) -> NetworkConfig {
        NetworkConfig::parse(json).expect("valid test config")
    }

    #[test]
    fn pod_mtu_subtracts_vxlan_overhead_except_for_host_gw() {
        let vxlan = config(r#"{"Network":"10.5.0.0/16"}"#);
        assert_eq!(pod_mtu(&vxlan, 1500), 1450);
        let mut ebpf = vxlan.clone();
        ebpf.backend.kind = BackendType::Ebpf;
        assert_eq!(pod_mtu(&ebpf, 9000), 8950);
        let jumbo = config(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","MTU":9000}}"#);
        assert_eq!(
            pod_mtu(&jumbo, 1500),
            8950,
            "Backend.MTU wins over the uplink's"
        );
        let host_gw = config(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}"#);
        assert_eq!(pod_mtu(&host_gw, 1500), 1500);
    }

    #[test]
    fn status_peer_list_follows_events_and_keeps_first_seen_times() {
        let peer = |n: u8, mac: u8| Peer {
            subnet: format!("10.5.{n}.0/24").parse().expect("net"),
            public_ip: Ipv4Addr::new(192, 168, 1, n),
            vtep_mac: Some(MacAddr6::new(0xc6, 0, 0, 0, 0, mac)),
        };
        let mut status = AgentStatus::default();
        record_peer_event(
            &mut status,
            &PeerEvent::Snapshot(vec![peer(3, 3), peer(2, 2)]),
        );
        let first = |status: &AgentStatus| status.peers.iter().next().expect("a peer").clone();
        assert_eq!(status.peers.len(), 2);
        assert_eq!(first(&status).subnet, "10.5.2.0/24", "sorted by subnet");
        status
            .peers
            .get_mut(&"10.5.2.0/24".parse().expect("net"))
            .expect("peer 2")
            .since_unix = 1;
        record_peer_event(&mut status, &PeerEvent::Upsert(peer(2, 9)));
        assert_eq!(
            first(&status).vtep_mac.as_deref(),
            Some("c6:00:00:00:00:09")
        );
        assert_eq!(
            first(&status).since_unix,
            1,
            "a changed peer keeps its first-seen time"
        );
        record_peer_event(
            &mut status,
            &PeerEvent::Remove("10.5.3.0/24".parse().expect("net")),
        );
        assert_eq!(status.peers.len(), 1);
        record_peer_event(
            &mut status,
            &PeerEvent::Snapshot(vec![peer(2, 9), peer(4, 4)]),
        );
        assert_eq!(
            first(&status).since_unix,
            1,
            "a snapshot keeps known peers' times"
        );
        assert_eq!(status.peers.len(), 2);
        assert_eq!(status.events_applied, 4);
    }

    #[test]
    fn problem_log_reports_each_distinct_problem_once() {
        // What reaches the log, not the struct's state: the point is fewer log lines.
        #[derive(Clone, Default)]
        struct Lines(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Lines {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().expect("lock").extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .without_time()
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let mut log = ProblemLog::default();
            log.report("etcd down".into());
            log.report("etcd down".into());
            log.report("etcd down".into());
            log.report("no config".into());
            log.report("no config".into());
            log.resolved("fine");
            log.resolved("fine again");
            log.report("etcd down".into());
        });
        let text = String::from_utf8(lines.0.lock().expect("lock").clone()).expect("utf-8");
        let logged: Vec<&str> = text
            .lines()
            .map(|l| l.rsplit(": ").next().unwrap_or(l))
            .collect();
        assert_eq!(
            logged,
            ["etcd down", "no config", "fine", "etcd down"],
            "{text}"
        );
    }
}
