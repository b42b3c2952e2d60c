//! Choosing the uplink and public IP as flanneld does (`--iface`, `--iface-regex`,
//! `--iface-can-reach`, `--public-ip`, else the default-route interface).
//! Implementation: owned by the kernel-backends work (it uses crate::netlink).

use std::net::Ipv4Addr;

/// The operator's choice, straight from the flags.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IfaceOptions {
    /// `--iface`, repeatable: interface names or IPv4 addresses; the first match wins.
    pub iface: Vec<String>,
    /// `--iface-regex`, repeatable: matched against addresses, then names.
    pub iface_regex: Vec<String>,
    /// `--iface-can-reach`: use the interface of the route to this address.
    pub iface_can_reach: Option<Ipv4Addr>,
    /// `--public-ip`: the address to advertise (default: the interface's own).
    pub public_ip: Option<Ipv4Addr>,
}

/// The chosen underlay interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uplink {
    pub name: String,
    pub index: u32,
    /// The interface's own IPv4 address (the vxlan device's `local`).
    pub address: Ipv4Addr,
    /// The address advertised in the lease (`--public-ip`, else `address`).
    pub public_ip: Ipv4Addr,
    pub mtu: u32,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct IfaceError(pub String);

/// Picks the uplink. Implemented by the kernel-backends work.
pub async fn select_uplink(_options: &IfaceOptions) -> Result<Uplink, IfaceError> {
    Err(IfaceError(
        "interface selection is not implemented yet".into(),
    ))
}
