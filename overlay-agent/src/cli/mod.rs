//! The operator surface: flanneld's flags (and every flag of v0.7-v0.26 it must accept),
//! the subcommands (`config`, `leases`, `lease release`, `status`, `migrate-etcd`),
//! docker-opts and how errors are printed.

pub mod commands;
pub mod compat_flags;
pub mod docker_opts;
pub mod flags;
pub mod migrate;
pub mod report;
