//! What the control plane tells the dataplane: remote nodes' leases, as typed values.

use std::{fmt, net::Ipv4Addr};

use ipnetwork::Ipv4Network;
pub use macaddr::MacAddr6;

/// How a lease says its node is reached. eBPF nodes publish `vxlan`: on the wire they are
/// flannel vxlan nodes, which is what lets the two kinds of node interoperate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LeaseBackend {
    Vxlan,
    HostGw,
}

impl LeaseBackend {
    /// The `BackendType` string in flannel's lease JSON.
    pub fn as_flannel_str(self) -> &'static str {
        match self {
            LeaseBackend::Vxlan => "vxlan",
            LeaseBackend::HostGw => "host-gw",
        }
    }
}

impl fmt::Display for LeaseBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_flannel_str())
    }
}

/// A remote node, as its lease describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// The pod subnet the node holds (e.g. 10.5.52.0/24).
    pub subnet: Ipv4Network,
    /// The node's underlay address (the lease's PublicIP).
    pub public_ip: Ipv4Addr,
    /// The node's VXLAN endpoint MAC (BackendData.VtepMAC); `None` for host-gw leases.
    pub vtep_mac: Option<MacAddr6>,
}

/// A change in the set of remote peers, in the order the dataplane must apply them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerEvent {
    /// A peer appeared or its lease changed (same subnet, new PublicIP or VtepMAC).
    Upsert(Peer),
    /// The lease of this subnet was deleted or expired.
    Remove(Ipv4Network),
    /// The complete current set (after start-up, compaction or reconnect): the dataplane
    /// upserts all of them and then removes whatever it holds that is not in the set.
    Snapshot(Vec<Peer>),
}
