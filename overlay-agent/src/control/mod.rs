//! The control plane: the cluster's network config in etcd (read once, then watched), this
//! node's subnet lease (acquired, renewed, re-acquired), the peer leases (listed and
//! watched, turned into [`crate::peer::PeerEvent`]s) and subnet.env. It speaks to etcd
//! through [`store`] (v3 or v2) and never touches netlink or BPF maps.

pub mod config;
pub mod config_watch;
pub mod etcd;
pub mod lease;
pub mod store;
pub mod subnet_file;
pub mod watch;
