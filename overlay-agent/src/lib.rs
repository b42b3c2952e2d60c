//! overlay-agent: a flannel-compatible pod overlay network agent whose datapath runs in eBPF.
//!
//! Control plane (etcd config, leases, peer watch) and dataplane (eBPF, kernel vxlan,
//! host-gw) are kept apart: the control plane produces [`peer::PeerEvent`]s, and one task owns
//! the dataplane and applies them through [`dataplane::Dataplane`].

pub mod agent;
pub mod cli;
pub mod cni;
pub mod control;
pub mod dataplane;
pub mod observe;
pub mod os;
pub mod peer;
