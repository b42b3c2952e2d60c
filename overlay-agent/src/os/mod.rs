//! OS plumbing with no overlay logic: typed rtnetlink, uplink selection, iptables rules
//! (masquerade and FORWARD), sd_notify and the bpffs mount. The dataplanes and the agent
//! call these; they call nothing of ours.

pub mod bpffs;
pub mod forward;
pub mod iface;
pub mod masq;
pub mod netlink;
pub mod nexthop;
pub mod notify;
