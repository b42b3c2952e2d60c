//! `overlay-agent migrate-etcd --from v2 --to v3`: copies `<prefix>/config` and the live
//! leases under `<prefix>/subnets/`, each with its remaining TTL, from one etcd keyspace to
//! the other, for the day the last flanneld <= v0.17 node is gone.
//!
//! Dry run by default (prints the plan). Idempotent: a key the target already holds with
//! the same data is left alone. A key the target holds with different data is a conflict:
//! then nothing at all is written, and the conflicts are listed.

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use crate::{
    control::config::NetworkConfig,
    control::etcd::{self, EtcdError, EtcdOptions},
    control::lease::decode_lease,
    control::store::{EtcdApi, KeyTtl, Kv, KvStore, Store, V2Client},
};

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("--from and --to are both {0}: nothing to migrate")]
    SameApi(EtcdApi),
    #[error("connecting to etcd's {api} keyspace: {source}")]
    Connect {
        api: EtcdApi,
        #[source]
        source: EtcdError,
    },
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error(
        "no network config at {key} in the {api} keyspace: nothing to migrate (is --etcd-prefix right?)"
    )]
    NoSourceConfig { key: String, api: EtcdApi },
    #[error(
        "the {to} keyspace already holds different data; nothing was written. Resolve each key \
         (delete it in {to} or make it equal) and run again:\n{}",
        conflicts.join("\n")
    )]
    Conflicts { to: EtcdApi, conflicts: Vec<String> },
}

async fn open(opts: &EtcdOptions, api: EtcdApi) -> Result<Store, MigrateError> {
    let connected = match api {
        EtcdApi::V3 => etcd::connect(opts).await.map(Store::V3),
        EtcdApi::V2 => V2Client::connect(opts).await.map(Store::V2),
    };
    connected.map_err(|source| MigrateError::Connect { api, source })
}

/// Same network config, written differently or not.
fn same_config(a: &[u8], b: &[u8]) -> bool {
    if a == b {
        return true;
    }
    let parse = |v: &[u8]| NetworkConfig::parse(&String::from_utf8_lossy(v)).ok();
    matches!((parse(a), parse(b)), (Some(x), Some(y)) if x == y)
}

/// Same lease (flannel's JSON, maybe with other spacing or key case).
fn same_lease(a: &[u8], b: &[u8]) -> bool {
    a == b || matches!((decode_lease(a), decode_lease(b)), (Ok(x), Ok(y)) if x == y)
}

fn describe_ttl(ttl: Option<Duration>) -> String {
    match ttl {
        None => "no TTL".to_string(),
        Some(t) => {
            let s = t.as_secs();
            format!("TTL {}h{:02}m{:02}s", s / 3600, (s % 3600) / 60, s % 60)
        }
    }
}

/// One key to write.
struct Copy {
    key: String,
    value: String,
    ttl: Option<Duration>,
}

/// What a migration will do: keys to copy, keys already there, conflicts, and the report
/// lines so far.
#[derive(Default)]
struct Plan {
    copies: Vec<Copy>,
    conflicts: Vec<String>,
    unchanged: usize,
    expired: usize,
    out: String,
}

impl Plan {
    /// One source key: copied when the target lacks it, counted when the target holds the
    /// same data (`same`), a conflict when it holds other data.
    fn add(
        &mut self,
        source: &Kv,
        existing: Option<&Kv>,
        ttl: Option<Duration>,
        same: fn(&[u8], &[u8]) -> bool,
        (from, to): (EtcdApi, EtcdApi),
    ) {
        let key = &source.key;
        match existing {
            None => self.copies.push(Copy {
                key: key.clone(),
                value: String::from_utf8_lossy(&source.value).into_owned(),
                ttl,
            }),
            Some(there) if same(&there.value, &source.value) => {
                self.unchanged += 1;
                let _ = writeln!(self.out, "same   {key} (already in {to})");
            }
            Some(there) => self.conflicts.push(format!(
                "  {key}: {from} has {} but {to} has {}",
                String::from_utf8_lossy(&source.value),
                String::from_utf8_lossy(&there.value)
            )),
        }
    }
}

/// Runs the migration; returns the report to print.
pub async fn run(
    opts: &EtcdOptions,
    from: EtcdApi,
    to: EtcdApi,
    apply: bool,
) -> Result<String, MigrateError> {
    if from == to {
        return Err(MigrateError::SameApi(from));
    }
    let mut stores = Stores {
        source: open(opts, from).await?,
        target: open(opts, to).await?,
        from,
        to,
    };
    let mut plan = Plan::default();
    stores.plan_config(opts, &mut plan).await?;
    stores.plan_leases(opts, &mut plan).await?;
    if !plan.conflicts.is_empty() {
        return Err(MigrateError::Conflicts {
            to,
            conflicts: plan.conflicts,
        });
    }
    let written = stores.write_copies(apply, &mut plan).await?;
    let Plan {
        copies,
        unchanged,
        expired,
        mut out,
        ..
    } = plan;
    if expired > 0 {
        let _ = writeln!(out, "{expired} expired lease(s) in {from} not copied");
    }
    if apply {
        let _ = writeln!(
            out,
            "migrated {from} -> {to}: {written} key(s) written, {unchanged} already there"
        );
    } else {
        let _ = writeln!(
            out,
            "dry run {from} -> {to}: {} key(s) to write, {unchanged} already there; nothing written (run again with --apply)",
            copies.len()
        );
    }
    Ok(out)
}

/// The keyspace copied from and the one copied to.
struct Stores {
    source: Store,
    target: Store,
    from: EtcdApi,
    to: EtcdApi,
}

impl Stores {
    /// The network config: copied when the target has none, a conflict when it has another.
    async fn plan_config(
        &mut self,
        opts: &EtcdOptions,
        plan: &mut Plan,
    ) -> Result<(), MigrateError> {
        let key = opts.config_key();
        let (config, _) = self.source.get(&key).await?;
        let config = config.ok_or_else(|| MigrateError::NoSourceConfig {
            key: key.clone(),
            api: self.from,
        })?;
        let existing = self.target.get(&key).await?.0;
        plan.add(
            &config,
            existing.as_ref(),
            None,
            same_config,
            (self.from, self.to),
        );
        Ok(())
    }

    /// The live leases with their remaining TTLs (expired ones are counted, not copied).
    async fn plan_leases(
        &mut self,
        opts: &EtcdOptions,
        plan: &mut Plan,
    ) -> Result<(), MigrateError> {
        let prefix = opts.subnets_prefix();
        let (leases, _) = self.source.list(&prefix).await?;
        let (existing, _) = self.target.list(&prefix).await?;
        let existing: BTreeMap<String, Kv> = existing
            .into_iter()
            .map(|kv| (kv.key.clone(), kv))
            .collect();
        for lease in leases {
            let ttl = match self.source.time_to_live(&lease).await? {
                KeyTtl::Expired => {
                    plan.expired += 1;
                    continue;
                }
                KeyTtl::Never => None,
                KeyTtl::Remaining(left) => Some(left),
            };
            plan.add(
                &lease,
                existing.get(&lease.key),
                ttl,
                same_lease,
                (self.from, self.to),
            );
        }
        Ok(())
    }

    /// Writes the planned copies (with `apply`; else only reports them); returns how many were
    /// written. A key that appeared in the target meanwhile is left as it is.
    async fn write_copies(&mut self, apply: bool, plan: &mut Plan) -> Result<usize, MigrateError> {
        let (target, to) = (&mut self.target, self.to);
        let mut written = 0usize;
        for copy in &plan.copies {
            let verb = if apply { "copied" } else { "copy  " };
            if apply {
                let created = match copy.ttl {
                    Some(ttl) => target.create(&copy.key, &copy.value, ttl).await?.is_some(),
                    None => {
                        target.put(&copy.key, &copy.value).await?;
                        true
                    }
                };
                if !created {
                    // Written by someone else since we looked: theirs stays.
                    let _ = writeln!(
                        plan.out,
                        "skip   {} (appeared in {to} meanwhile; left as it is)",
                        copy.key
                    );
                    continue;
                }
                written += 1;
            }
            let _ = writeln!(
                plan.out,
                "{verb} {} ({}) = {}",
                copy.key,
                describe_ttl(copy.ttl),
                copy.value
            );
        }
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_data_is_recognised_through_formatting() {
        assert!(same_config(
            br#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#,
            br#"{ "network": "10.5.0.0/16", "backend": { "type": "vxlan" } }"#
        ));
        assert!(!same_config(
            br#"{"Network":"10.5.0.0/16"}"#,
            br#"{"Network":"10.6.0.0/16"}"#
        ));
        assert!(same_lease(
            br#"{"PublicIP":"10.0.0.1","BackendType":"vxlan","BackendData":{"VtepMAC":"c6:d2:32:6f:8f:44"}}"#,
            br#"{"PublicIP":"10.0.0.1","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VtepMAC":"c6:d2:32:6f:8f:44"}}"#
        ));
        assert!(!same_lease(
            br#"{"PublicIP":"10.0.0.1","BackendType":"host-gw"}"#,
            br#"{"PublicIP":"10.0.0.2","BackendType":"host-gw"}"#
        ));
    }
}
