//! The dataplane: exactly one task owns it and applies peer events through [`Dataplane`].
//! Nothing else touches BPF maps or netlink state.

pub mod host_gw;
pub mod vxlan;

use std::{net::Ipv4Addr, time::Duration};

use ipnetwork::Ipv4Network;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn};

use crate::{
    cni::agent_socket::{PodNotice, PodNoticeReply},
    peer::{MacAddr6, PeerEvent},
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
        source: crate::netlink::NetlinkError,
    },
    #[error("eBPF: {what}: {reason}")]
    Ebpf { what: String, reason: String },
    #[error("{0}")]
    Config(String),
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
    /// Periodic check: restores state someone deleted (device, routes), follows a bridge that
    /// appeared or was re-created.
    async fn maintain(&mut self) -> Result<(), DataplaneError>;
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

/// Commands for the dataplane task.
#[derive(Debug)]
pub enum DataplaneCommand {
    Activate(LocalLease),
    Peers(PeerEvent),
    /// From the CNI plugin (via `cni::agent_socket`); the reply goes back to the plugin.
    Pod(PodNotice, oneshot::Sender<PodNoticeReply>),
}

/// How often [`Dataplane::maintain`] runs.
pub const MAINTAIN_INTERVAL: Duration = Duration::from_secs(1);

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
pub async fn run_dataplane_every<D: Dataplane>(
    mut dataplane: D,
    mut commands: mpsc::Receiver<DataplaneCommand>,
    ready: watch::Sender<bool>,
    maintain_every: Duration,
) {
    let mut maintain = tokio::time::interval(maintain_every);
    maintain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_snapshot: Option<PeerEvent> = None;
    let mut needs_resync = false;
    loop {
        tokio::select! {
            command = commands.recv() => {
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
                        if let Err(err) = dataplane.apply(&event).await {
                            warn!(dataplane = dataplane.name(), error = %err, "applying a peer change failed; will resync");
                            needs_resync = true;
                        }
                        if matches!(event, PeerEvent::Snapshot(_)) {
                            last_snapshot = Some(event);
                        } else if let Some(PeerEvent::Snapshot(peers)) = last_snapshot.as_mut() {
                            // Keep the cached snapshot current so a resync reapplies the latest state.
                            match &event {
                                PeerEvent::Upsert(peer) => {
                                    peers.retain(|p| p.subnet != peer.subnet);
                                    peers.push(peer.clone());
                                }
                                PeerEvent::Remove(subnet) => peers.retain(|p| p.subnet != *subnet),
                                PeerEvent::Snapshot(_) => {}
                            }
                        }
                    }
                }
            }
            _ = maintain.tick() => {
                if let Err(err) = dataplane.maintain().await {
                    warn!(dataplane = dataplane.name(), error = %err, "datapath maintenance failed; retrying");
                }
                if needs_resync {
                    if let Some(snapshot) = &last_snapshot {
                        match dataplane.apply(snapshot).await {
                            Ok(()) => needs_resync = false,
                            Err(err) => warn!(dataplane = dataplane.name(), error = %err, "resync failed; retrying"),
                        }
                    }
                }
            }
        }
    }
}
