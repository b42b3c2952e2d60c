//! Typed netlink helpers (rtnetlink) used by the dataplanes. Owned by the kernel-backends work.

/// A failed netlink operation.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NetlinkError(pub String);
