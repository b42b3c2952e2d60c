//! The cluster network config (`<prefix>/config` in etcd), parsed and validated once into
//! typed values. Parsing and validation: owned by the control-plane work.

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

/// Which dataplane this node runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendType {
    /// eBPF fast path over the kernel vxlan device (publishes `vxlan` leases).
    Ebpf,
    /// The kernel vxlan device alone, as flanneld programs it.
    Vxlan,
    /// Plain routes via each peer's PublicIP (flat L2 underlays).
    HostGw,
}

/// `Backend` of the network config, with flannel's defaults resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendConfig {
    pub kind: BackendType,
    /// VXLAN network identifier (default 1).
    pub vni: u32,
    /// VXLAN UDP port (flannel's 0 is resolved to 8472).
    pub port: u16,
    /// `Backend.MTU` if set: the underlay MTU to assume instead of the uplink's.
    pub mtu: Option<u32>,
    pub gbp: bool,
    pub learning: bool,
    pub direct_routing: bool,
}

/// The validated network config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkConfig {
    pub network: Ipv4Network,
    pub subnet_len: u8,
    /// First and last subnet that may be leased (network addresses).
    pub subnet_min: Ipv4Addr,
    pub subnet_max: Ipv4Addr,
    pub backend: BackendConfig,
}
