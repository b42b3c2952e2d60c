//! Watches `<prefix>/config` while the agent runs. Like flanneld, the agent applies the
//! network config only at start-up; unlike flanneld, it says so when someone changes it: an
//! invalid config gets a warning saying what is wrong (and that nothing changed), a valid but
//! different one a warning that a restart applies it.

use std::time::Duration;

use tracing::{debug, info, warn};

use crate::{
    control::config::{BackendType, NetworkConfig},
    control::etcd::EtcdOptions,
    control::store::{EventKind, KvStore, KvWatch, WatchBatch},
};

/// What a change of the config key means for a running agent.
#[derive(Debug, PartialEq, Eq)]
pub enum ConfigChange {
    /// Same config as the running one (e.g. rewritten with other formatting).
    Unchanged,
    /// Valid, different: applied at the next start.
    NeedsRestart,
    /// Invalid: ignored, with the parser's message.
    Invalid(String),
    /// The key was deleted.
    Deleted,
}

/// Classifies a new value (`None`: deleted) against the running config. `backend_override`
/// is `--backend`, which the running config already carries: the new value gets it too, so
/// that like is compared with like (a restart would apply the same override).
pub fn classify(
    running: &NetworkConfig,
    backend_override: Option<BackendType>,
    new_value: Option<&[u8]>,
) -> ConfigChange {
    let Some(bytes) = new_value else {
        return ConfigChange::Deleted;
    };
    let text = String::from_utf8_lossy(bytes);
    match NetworkConfig::parse(&text).map(|c| c.with_backend_override(backend_override)) {
        Ok(config) if &config == running => ConfigChange::Unchanged,
        Ok(_) => ConfigChange::NeedsRestart,
        Err(err) => ConfigChange::Invalid(err.to_string()),
    }
}

fn report(key: &str, change: &ConfigChange) {
    match change {
        ConfigChange::Unchanged => debug!(%key, "network config rewritten without changes"),
        ConfigChange::NeedsRestart => warn!(
            %key,
            "the network config changed; this agent keeps the config it started with until it is restarted (as flanneld does)"
        ),
        ConfigChange::Invalid(reason) => warn!(
            %key,
            %reason,
            "the network config was changed to an invalid one; ignored, this agent keeps running with the config it started with"
        ),
        ConfigChange::Deleted => warn!(
            %key,
            "the network config was deleted; this agent keeps running with the config it started with, but agents starting now will wait for one"
        ),
    }
}

/// Runs until aborted; reconnects (re-reading the key first, so nothing is missed) on error.
/// `running` is the config in use, after `backend_override` (`--backend`).
pub async fn watch_config<S: KvStore>(
    client: S,
    opts: EtcdOptions,
    running: NetworkConfig,
    backend_override: Option<BackendType>,
) {
    let key = opts.config_key();
    let mut client = client;
    let mut last = None;
    loop {
        if let Err(err) = watch_once(&mut client, &key, &running, backend_override, &mut last).await
        {
            debug!(%key, error = %err, "config watch interrupted; retrying in 1 s");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Why one watch of the config ended (watched again after a pause).
#[derive(Debug, thiserror::Error)]
enum ConfigWatchError {
    #[error("reading the config: {0}")]
    Read(#[source] crate::control::etcd::EtcdError),
    #[error("watching the config: {0}")]
    Watch(#[source] crate::control::etcd::EtcdError),
    #[error("the config watch fell behind: {0}")]
    Outdated(String),
}

async fn watch_once<S: KvStore>(
    client: &mut S,
    key: &str,
    running: &NetworkConfig,
    backend_override: Option<BackendType>,
    last: &mut Option<ConfigChange>,
) -> Result<(), ConfigWatchError> {
    let (current, revision) = client.get(key).await.map_err(ConfigWatchError::Read)?;
    let change = classify(
        running,
        backend_override,
        current.as_ref().map(|kv| kv.value.as_slice()),
    );
    // Report what happened while we were not watching, once.
    if last.as_ref() != Some(&change) {
        if last.is_some() || change != ConfigChange::Unchanged {
            report(key, &change);
        }
        *last = Some(change);
    }
    let mut stream = client
        .watch(key, false, revision + 1)
        .await
        .map_err(ConfigWatchError::Watch)?;
    info!(%key, "watching the network config for changes");
    loop {
        let events = match stream.next().await.map_err(ConfigWatchError::Watch)? {
            WatchBatch::Events(events) => events,
            WatchBatch::Outdated(why) => return Err(ConfigWatchError::Outdated(why)),
        };
        for event in &events {
            let value = match event.kind {
                EventKind::Put => Some(event.kv.value.as_slice()),
                EventKind::Delete => None,
            };
            let change = classify(running, backend_override, value);
            report(key, &change);
            *last = Some(change);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_config_changes() {
        let running =
            NetworkConfig::parse(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#)
                .expect("valid");
        let same = br#"{"network": "10.5.0.0/16", "backend": {"type": "vxlan"}}"#;
        assert_eq!(
            classify(&running, None, Some(same)),
            ConfigChange::Unchanged
        );
        let other = br#"{"Network":"10.6.0.0/16","Backend":{"Type":"vxlan"}}"#;
        assert_eq!(
            classify(&running, None, Some(other)),
            ConfigChange::NeedsRestart
        );
        assert!(matches!(
            classify(&running, None, Some(b"{not json")),
            ConfigChange::Invalid(_)
        ));
        assert_eq!(classify(&running, None, None), ConfigChange::Deleted);
    }

    #[test]
    fn a_backend_override_is_applied_to_the_new_value_too() {
        let stored = br#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#;
        let running = NetworkConfig::parse(&String::from_utf8_lossy(stored))
            .expect("valid")
            .with_backend_override(Some(BackendType::Ebpf));
        assert_eq!(
            classify(&running, Some(BackendType::Ebpf), Some(stored)),
            ConfigChange::Unchanged
        );
        // The override covers only the type: another VNI still needs a restart.
        let vni = br#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","VNI":7}}"#;
        assert_eq!(
            classify(&running, Some(BackendType::Ebpf), Some(vni)),
            ConfigChange::NeedsRestart
        );
    }
}
