//! The dataplane: exactly one task owns it and applies peer events through [`Dataplane`].
//! Nothing else touches BPF maps or netlink state.

pub mod changes;
pub mod host_gw;
pub mod vxlan;

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use ipnetwork::Ipv4Network;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn};

use crate::{
    cni::agent_socket::{PodNotice, PodNoticeReply},
    peer::{MacAddr6, Peer, PeerEvent},
};

pub mod ebpf;

/// What a dataplane needs to know about this node once its lease is held.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalLease {
    /// Our subnet (e.g. 10.5.52.0/24).
    pub subnet: Ipv4Network,
    /// The whole cluster network (e.g. 10.5.0.0/16).
    pub network: Ipv4Network,
    /// Our underlay address (PublicIP).
    pub public_ip: Ipv4Addr,
}

/// What the backend publishes in our lease (flannel's BackendType and BackendData).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseAttrs {
    Vxlan { vni: u32, vtep_mac: MacAddr6 },
    HostGw,
}

/// Errors of a dataplane operation. Each names what it was doing and on what.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("netlink: {what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: crate::os::netlink::NetlinkError,
    },
    #[error("eBPF datapath: {0}")]
    Ebpf(#[from] ebpf::EbpfError),
    #[error(
        "host-gw cannot use public IP {public_ip} because it is not an address of {uplink} ({owned}): \
         peers route our pods via that IP, so it must be this interface's own address (no NAT). \
         Drop --public-ip (or set it to {uplink}'s address), or use the vxlan backend"
    )]
    PublicIpNotOnUplink {
        public_ip: Ipv4Addr,
        uplink: String,
        owned: String,
    },
    #[error(
        "cannot route peer {subnet} via {public_ip}: that address is not on {uplink}'s subnet; \
         host-gw needs every node on one L2 network (use the vxlan backend otherwise)"
    )]
    PeerNotOnSegment {
        subnet: Ipv4Network,
        public_ip: Ipv4Addr,
        uplink: String,
    },
    #[error(
        "underlay MTU {mtu} (of {uplink}{from_config}) leaves no room for VXLAN's {overhead}-byte overhead and an IPv4 packet; use an MTU of at least {min} (1500 is usual)",
        overhead = overlay_common::VXLAN_OVERHEAD,
        min = crate::control::config::MIN_BACKEND_MTU,
        from_config = if *from_config { ", from Backend.MTU" } else { "" }
    )]
    UnderlayMtuTooSmall {
        mtu: u32,
        uplink: String,
        from_config: bool,
    },
    #[error("{device} vanished right after it was created; is something else deleting it?")]
    DeviceVanished { device: String },
    #[error(
        "--nexthop-objects needs kernel nexthop objects (Linux 5.3 or later, `ip nexthop`), \
         and this kernel refused to list them ({source}); run without --nexthop-objects \
         (peer routes are then flannel's own)"
    )]
    NexthopObjectsUnsupported {
        #[source]
        source: crate::os::netlink::NetlinkError,
    },
    #[error("peer {subnet} ({public_ip}) has no VtepMAC in its lease; is it a vxlan lease?")]
    NoVtepMac {
        subnet: Ipv4Network,
        public_ip: Ipv4Addr,
    },
    #[error("{what}: {} operations failed: {}", .errors.len(), .errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    Several {
        what: String,
        errors: Vec<DataplaneError>,
    },
}

/// A way of getting packets to remote peers: eBPF, kernel vxlan or host-gw.
///
/// Every method is idempotent: applying the same event twice leaves the same state.
#[allow(async_fn_in_trait)]
pub trait Dataplane {
    /// Short name for logs and status ("ebpf", "vxlan", "host-gw").
    fn name(&self) -> &'static str;
    /// Programs what depends on our own lease (device address, datapath config). Called once
    /// the lease is held and again if it changes.
    async fn activate(&mut self, lease: &LocalLease) -> Result<(), DataplaneError>;
    /// Applies one peer change.
    async fn apply(&mut self, event: &PeerEvent) -> Result<(), DataplaneError>;
    /// The full check: restores state someone deleted (device, routes), follows a bridge
    /// that appeared or was re-created. The run loop calls it every [`FULL_CHECK_INTERVAL`]
    /// as a safety net under the notifications.
    async fn maintain(&mut self) -> Result<(), DataplaneError>;
    /// Resolves when the kernel reported a change that may touch this dataplane's state (a
    /// deleted route, neighbour or device); the run loop then calls
    /// [`Dataplane::maintain_changes`]. Must be cancel-safe. Default: never.
    async fn kernel_changed(&mut self) {
        std::future::pending::<()>().await
    }
    /// The cheap check, every [`MAINTAIN_INTERVAL`] and after [`Dataplane::kernel_changed`]:
    /// repairs what the kernel reported changed. Its cost must not grow with the number of
    /// peers when nothing changed. Default: the full check.
    async fn maintain_changes(&mut self) -> Result<(), DataplaneError> {
        self.maintain().await
    }
    /// When work this dataplane deferred (vxlan: rewriting interim routes in flannel's
    /// form) may run; None: there is none. The run loop calls
    /// [`Dataplane::do_deferred_work`] from then on whenever no command came for
    /// [`DEFERRED_WORK_QUIET`]. Default: none.
    fn deferred_work_due(&self) -> Option<tokio::time::Instant> {
        None
    }
    /// One bounded piece of the deferred work (milliseconds, so a peer event waits little).
    async fn do_deferred_work(&mut self) -> Result<(), DataplaneError> {
        Ok(())
    }
    /// The kernel notifications this dataplane subscribed to, for a dataplane stacked on it
    /// (eBPF over vxlan) to share: one socket, each notification parsed once. Default: a
    /// subscription of its own.
    fn change_feed(&self) -> changes::ChangeFeed {
        changes::ChangeFeed::start()
    }
    /// A CNI plugin's notice that a pod was just added or is about to be deleted. Only a
    /// dataplane with per-pod state (eBPF endpoints) acts on it; the others learn nothing.
    async fn pod_notice(&mut self, notice: &PodNotice) -> Result<PodNoticeReply, DataplaneError> {
        let _ = notice;
        Ok(PodNoticeReply::not_applied(format!(
            "the {} datapath keeps no per-pod state",
            self.name()
        )))
    }
}

/// The subnets a dataplane holds that a snapshot no longer lists: the "sweep" half of
/// mark-and-sweep, shared by the backends.
pub fn stale_subnets<'a>(
    held: impl IntoIterator<Item = &'a Ipv4Network>,
    snapshot: &[crate::peer::Peer],
) -> Vec<Ipv4Network> {
    let wanted: std::collections::HashSet<Ipv4Network> =
        snapshot.iter().map(|peer| peer.subnet).collect();
    held.into_iter()
        .filter(|subnet| !wanted.contains(subnet))
        .copied()
        .collect()
}

static SNAPSHOTS_APPLIED: AtomicU64 = AtomicU64::new(0);
static LAST_SNAPSHOT_MICROS: AtomicU64 = AtomicU64::new(0);

static INTERIM_ROUTES: AtomicU64 = AtomicU64::new(0);

/// How many peer routes go through an interim nexthop object now (see the vxlan backend).
pub(crate) fn record_interim_routes(count: usize) {
    INTERIM_ROUTES.store(count as u64, Ordering::Relaxed);
}

/// Peer routes still to be rewritten in flannel's form.
pub fn interim_routes() -> u64 {
    INTERIM_ROUTES.load(Ordering::Relaxed)
}

fn record_snapshot(took: Duration) {
    SNAPSHOTS_APPLIED.fetch_add(1, Ordering::Relaxed);
    LAST_SNAPSHOT_MICROS.store(took.as_micros() as u64, Ordering::Relaxed);
}

/// Peer snapshots applied so far, and how long the last one took (microseconds).
pub fn snapshot_stats() -> (u64, u64) {
    (
        SNAPSHOTS_APPLIED.load(Ordering::Relaxed),
        LAST_SNAPSHOT_MICROS.load(Ordering::Relaxed),
    )
}

/// Wraps a netlink failure with what was being done (shared by the backends).
pub(crate) fn netlink_error(
    what: impl Into<String>,
) -> impl FnOnce(crate::os::netlink::NetlinkError) -> DataplaneError {
    let what = what.into();
    move |source| DataplaneError::Netlink { what, source }
}

/// Joins the errors of an operation that kept going after a failure (teardown, resync).
pub(crate) fn combine_errors(
    what: &str,
    errors: Vec<DataplaneError>,
) -> Result<(), DataplaneError> {
    match errors.len() {
        0 => Ok(()),
        1 => Err(errors.into_iter().next().expect("one error")),
        _ => Err(DataplaneError::Several {
            what: what.to_owned(),
            errors,
        }),
    }
}

/// Commands for the dataplane task.
#[derive(Debug)]
pub enum DataplaneCommand {
    Activate(LocalLease),
    Peers(PeerEvent),
    /// From the CNI plugin (via `cni::agent_socket`); the reply goes back to the plugin.
    Pod(PodNotice, oneshot::Sender<PodNoticeReply>),
}

/// How often [`Dataplane::maintain_changes`] runs.
pub const MAINTAIN_INTERVAL: Duration = Duration::from_secs(1);
/// How often the full [`Dataplane::maintain`] runs: a safety net under the notifications
/// (a lost one is reported as an overrun and triggers a full check at once). Its dumps cost
/// ~0.2 s of CPU at 10,000 peers: every 30 s that was 0.6% of a core at idle.
pub const FULL_CHECK_INTERVAL: Duration = Duration::from_secs(300);
/// How long no command must have come before deferred work runs: a burst of lease changes
/// is applied first, each without waiting behind it.
pub const DEFERRED_WORK_QUIET: Duration = Duration::from_millis(20);

/// The one task that owns the dataplane. Applies commands in order; a failed operation is
/// logged and retried by the next maintenance pass (the control plane's next snapshot
/// repairs peer state), never fatal: a bad event must not take the node down.
/// `ready` turns true after the first successful activation.
pub async fn run_dataplane<D: Dataplane>(
    dataplane: D,
    commands: mpsc::Receiver<DataplaneCommand>,
    ready: watch::Sender<bool>,
) {
    run_dataplane_every(dataplane, commands, ready, MAINTAIN_INTERVAL).await
}

/// [`run_dataplane`] with maintenance every `maintain_every` (`--maintain-interval`).
// Long on purpose: the one select loop of the dataplane task; each arm is a few lines.
pub async fn run_dataplane_every<D: Dataplane>(
    mut dataplane: D,
    mut commands: mpsc::Receiver<DataplaneCommand>,
    ready: watch::Sender<bool>,
    maintain_every: Duration,
) {
    let mut maintain = tokio::time::interval(maintain_every);
    maintain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_full_check = tokio::time::Instant::now();
    // The desired peers as the control plane last said (snapshot plus the events since), so
    // a resync reapplies the latest state; by subnet, so each event costs O(log n).
    let mut desired: Option<BTreeMap<Ipv4Network, Peer>> = None;
    let mut needs_resync = false;
    let mut last_command = tokio::time::Instant::now();
    loop {
        let deferred_at = dataplane
            .deferred_work_due()
            .map(|due| due.max(last_command + DEFERRED_WORK_QUIET));
        tokio::select! {
            // In this order: commands first, deferred work only when nothing else is ready.
            biased;
            command = commands.recv() => {
                last_command = tokio::time::Instant::now();
                let Some(command) = command else {
                    info!(dataplane = dataplane.name(), "dataplane task stopping; datapath state stays in place");
                    return;
                };
                match command {
                    DataplaneCommand::Activate(lease) => match dataplane.activate(&lease).await {
                        Ok(()) => {
                            info!(dataplane = dataplane.name(), subnet = %lease.subnet, "datapath programmed for our lease");
                            ready.send_replace(true);
                        }
                        Err(err) => error!(dataplane = dataplane.name(), error = %err, "programming the datapath for our lease failed"),
                    },
                    DataplaneCommand::Pod(notice, reply) => {
                        let answer = dataplane.pod_notice(&notice).await.unwrap_or_else(|err| {
                            warn!(dataplane = dataplane.name(), error = %err, "applying a CNI notice failed; the next maintenance pass catches up");
                            PodNoticeReply::not_applied(format!("failed: {err}"))
                        });
                        // The plugin may have given up waiting: nothing to do then.
                        let _ = reply.send(answer);
                    }
                    DataplaneCommand::Peers(event) => {
                        let started = std::time::Instant::now();
                        if let Err(err) = dataplane.apply(&event).await {
                            warn!(dataplane = dataplane.name(), error = %err, "applying a peer change failed; will resync");
                            needs_resync = true;
                        }
                        match event {
                            PeerEvent::Snapshot(peers) => {
                                record_snapshot(started.elapsed());
                                desired = Some(peers.into_iter().map(|p| (p.subnet, p)).collect());
                            }
                            PeerEvent::Upsert(peer) => {
                                if let Some(desired) = desired.as_mut() {
                                    desired.insert(peer.subnet, peer);
                                }
                            }
                            PeerEvent::Remove(subnet) => {
                                if let Some(desired) = desired.as_mut() {
                                    desired.remove(&subnet);
                                }
                            }
                        }
                    }
                }
            }
            _ = dataplane.kernel_changed() => {
                if let Err(err) = dataplane.maintain_changes().await {
                    warn!(dataplane = dataplane.name(), error = %err, "repairing datapath state the kernel reported changed failed; retrying");
                }
            }
            _ = maintain.tick() => {
                let result = if last_full_check.elapsed() >= FULL_CHECK_INTERVAL {
                    last_full_check = tokio::time::Instant::now();
                    dataplane.maintain().await
                } else {
                    dataplane.maintain_changes().await
                };
                if let Err(err) = result {
                    warn!(dataplane = dataplane.name(), error = %err, "datapath maintenance failed; retrying");
                }
                if needs_resync && let Some(peers) = &desired {
                    let snapshot = PeerEvent::Snapshot(peers.values().cloned().collect());
                    match dataplane.apply(&snapshot).await {
                        Ok(()) => needs_resync = false,
                        Err(err) => warn!(dataplane = dataplane.name(), error = %err, "resync failed; retrying"),
                    }
                }
            }
            _ = tokio::time::sleep_until(deferred_at.unwrap_or(last_command)), if deferred_at.is_some() => {
                if let Err(err) = dataplane.do_deferred_work().await {
                    warn!(dataplane = dataplane.name(), error = %err, "deferred datapath work failed; retrying");
                }
            }
        }
    }
}
