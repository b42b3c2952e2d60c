//! `--etcd-api=auto|v2|v3`: which of etcd's keyspaces holds the network.
//!
//! `auto` (the default) looks for `<prefix>/config` in both: v3 when the v3 keyspace holds
//! it, else v2 when the v2 keyspace holds it, else it waits and says which keys it looked
//! for. When both hold one the cluster is split (nodes of both eras write leases that the
//! others cannot see): v3 wins, with a warning.

use std::fmt;

use tokio::sync::watch;
use tracing::{info, warn};

use super::{Store, V2Client};
use crate::{
    agent::{CONFIG_RECHECK, ProblemLog},
    control::etcd::{self, EtcdError, EtcdOptions},
};

/// One of etcd's two keyspaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum EtcdApi {
    V2,
    V3,
}

impl EtcdApi {
    pub fn as_str(self) -> &'static str {
        match self {
            EtcdApi::V2 => "v2",
            EtcdApi::V3 => "v3",
        }
    }
}

impl fmt::Display for EtcdApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `--etcd-api` flag.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum EtcdApiChoice {
    #[default]
    Auto,
    V2,
    V3,
}

/// What one keyspace says about `<prefix>/config`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    Present,
    Absent,
    /// The keyspace cannot be read (not served, unreachable, refused): why.
    Unavailable(String),
}

/// `auto`'s decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Use(EtcdApi),
    /// Both hold a config: v3, and the operator must hear about it.
    SplitUseV3,
    /// Neither holds one (yet): what to tell the operator.
    Wait(String),
}

/// The rule of `auto`, on what the two probes found.
pub fn decide(opts: &EtcdOptions, v3: &Probe, v2: &Probe) -> Decision {
    match (v3, v2) {
        (Probe::Present, Probe::Present) => Decision::SplitUseV3,
        (Probe::Present, _) => Decision::Use(EtcdApi::V3),
        (_, Probe::Present) => Decision::Use(EtcdApi::V2),
        _ => {
            let key = opts.config_key();
            let state = |p: &Probe| match p {
                Probe::Present => "present".to_string(),
                Probe::Absent => "absent".to_string(),
                Probe::Unavailable(why) => format!("unreadable: {why}"),
            };
            Decision::Wait(format!(
                "no network config at {key} in either etcd keyspace (--etcd-api=auto looked for it in the v3 keyspace: {}; \
                 and in the v2 keyspace: {}): write one with `overlay-agent --etcd-prefix={} [--etcd-api=v2] config set '{}'` \
                 (or `ETCDCTL_API=3 etcdctl put {key} '<json>'` / `ETCDCTL_API=2 etcdctl mk {key} '<json>'`)",
                state(v3),
                state(v2),
                opts.prefix,
                crate::control::config::EXAMPLE_CONFIG,
            ))
        }
    }
}

async fn probe_v3(opts: &EtcdOptions) -> (Probe, Option<etcd_client::Client>) {
    match etcd::connect(opts).await {
        Ok(mut client) => match client.get(opts.config_key(), None).await {
            Ok(resp) if !resp.kvs().is_empty() => (Probe::Present, Some(client)),
            Ok(_) => (Probe::Absent, Some(client)),
            Err(err) => (Probe::Unavailable(etcd::describe(&err)), None),
        },
        Err(err) => (Probe::Unavailable(err.to_string()), None),
    }
}

async fn probe_v2(opts: &EtcdOptions) -> Result<(Probe, Option<V2Client>), EtcdError> {
    let client = V2Client::new(opts)?;
    Ok(match client.config_exists(&opts.config_key()).await {
        Ok(true) => (Probe::Present, Some(client)),
        Ok(false) => (Probe::Absent, Some(client)),
        Err(err) => (Probe::Unavailable(err.to_string()), None),
    })
}

/// Whether an error comes from our own flags or files (waiting does not help).
fn is_local(err: &EtcdError) -> bool {
    matches!(
        err,
        EtcdError::TlsFile { .. }
            | EtcdError::HalfIdentity { .. }
            | EtcdError::HalfCredentials
            | EtcdError::PlainEndpointWithTls { .. }
            | EtcdError::NoEndpoints
    )
}

/// Connects to the keyspace `choice` names; for `auto`, probes both once. `Ok(Err(why))`
/// when `auto` found no config yet.
pub async fn connect_store(
    opts: &EtcdOptions,
    choice: EtcdApiChoice,
) -> Result<Result<Store, String>, EtcdError> {
    match choice {
        EtcdApiChoice::V3 => Ok(Ok(Store::V3(etcd::connect(opts).await?))),
        EtcdApiChoice::V2 => Ok(Ok(Store::V2(V2Client::connect(opts).await?))),
        EtcdApiChoice::Auto => {
            // Local mistakes (TLS files, half credentials) fail now, naming the flag.
            etcd::connect_options(opts)?;
            let ((v3, v3_client), v2) = tokio::join!(probe_v3(opts), probe_v2(opts));
            let (v2, v2_client) = v2?;
            match decide(opts, &v3, &v2) {
                Decision::Use(EtcdApi::V3) => {
                    info!(key = %opts.config_key(), "etcd API v3 chosen: the v3 keyspace holds the network config");
                    Ok(Ok(Store::V3(v3_client.expect("present means connected"))))
                }
                Decision::SplitUseV3 => {
                    warn!(key = %opts.config_key(),
                        "etcd API v3 chosen, but the cluster is split: both the v3 and the v2 keyspace hold a network config. \
                         Nodes on the other keyspace (flanneld <= v0.17 uses v2) cannot see our lease nor we theirs; \
                         move them all to one (`overlay-agent migrate-etcd --from v2 --to v3`) or pin --etcd-api");
                    Ok(Ok(Store::V3(v3_client.expect("present means connected"))))
                }
                Decision::Use(EtcdApi::V2) => {
                    info!(key = %opts.config_key(), "etcd API v2 chosen: only the v2 keyspace holds the network config (as flanneld <= v0.17 writes it)");
                    Ok(Ok(Store::V2(v2_client.expect("present means connected"))))
                }
                Decision::Wait(why) => Ok(Err(why)),
            }
        }
    }
}

/// [`connect_store`] until it works or `shutdown` fires (`None`); each distinct problem is
/// logged once.
pub async fn connect_store_retrying(
    opts: &EtcdOptions,
    choice: EtcdApiChoice,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Option<Store>, EtcdError> {
    let mut problems = ProblemLog::default();
    loop {
        match connect_store(opts, choice).await {
            Ok(Ok(store)) => {
                problems.resolved("connected to etcd");
                if choice != EtcdApiChoice::Auto {
                    info!(api = %super::KvStore::api(&store), "etcd API chosen by --etcd-api");
                }
                return Ok(Some(store));
            }
            Ok(Err(why)) => problems.report(format!("{why}; re-checking every {CONFIG_RECHECK:?}")),
            Err(err) if is_local(&err) => return Err(err),
            Err(err) => problems.report(format!("{err}; retrying every {CONFIG_RECHECK:?}")),
        }
        if *shutdown.borrow() {
            return Ok(None);
        }
        tokio::select! {
            _ = tokio::time::sleep(CONFIG_RECHECK) => {}
            _ = shutdown.changed() => return Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_prefers_v3_then_v2_and_says_what_it_looked_for() {
        let opts = EtcdOptions {
            prefix: "/coreos.com/network".into(),
            ..Default::default()
        };
        let un = Probe::Unavailable("v2 not served".into());
        assert_eq!(
            decide(&opts, &Probe::Present, &Probe::Absent),
            Decision::Use(EtcdApi::V3)
        );
        assert_eq!(
            decide(&opts, &Probe::Present, &un),
            Decision::Use(EtcdApi::V3)
        );
        assert_eq!(
            decide(&opts, &Probe::Absent, &Probe::Present),
            Decision::Use(EtcdApi::V2)
        );
        assert_eq!(
            decide(&opts, &Probe::Present, &Probe::Present),
            Decision::SplitUseV3
        );
        let Decision::Wait(why) = decide(&opts, &Probe::Absent, &un) else {
            panic!("nothing to use")
        };
        assert!(
            why.contains("no network config at /coreos.com/network/config")
                && why.contains("v3 keyspace: absent")
                && why.contains("v2 keyspace: unreadable: v2 not served"),
            "{why}"
        );
    }
}
