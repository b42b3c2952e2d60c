//! overlay-agent: a flannel-compatible pod overlay network agent whose datapath runs in eBPF.
//!
//! Control plane (etcd config, leases, peer watch) and dataplane (eBPF, kernel vxlan,
//! host-gw) are kept apart: the control plane produces [`peer::PeerEvent`]s, and one task owns
//! the dataplane and applies them through [`dataplane::Dataplane`].

pub mod agent;
pub mod bpffs;
pub mod cli;
pub mod cni;
pub mod compat_flags;
pub mod config;
pub mod config_watch;
pub mod dataplane;
pub mod docker_opts;
pub mod etcd;
pub mod flags;
pub mod forward;
pub mod health;
pub mod iface;
pub mod lease;
pub mod masq;
pub mod migrate;
pub mod netlink;
pub mod notify;
pub mod peer;
pub mod report;
pub mod status;
pub mod store;
pub mod subnet_file;
pub mod watch;
