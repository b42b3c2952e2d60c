//! Watching the other nodes' leases and turning them into [`PeerEvent`]s for the dataplane.
//!
//! List `<prefix>/subnets/`, send the result as one [`PeerEvent::Snapshot`], then watch from
//! the list's revision + 1. On compaction, a broken watch, or a change of our own subnet,
//! list again and send a new snapshot (the dataplane diffs it; no flood of removals).
//! Our own subnet and leases of another BackendType are ignored. Unlike flannel, a key or
//! value that cannot be parsed, or a lease that cannot be a peer (outside the cluster
//! network, carrying our own PublicIP, ...), is skipped with a warning naming the key and
//! never removes other peers.

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use ipnetwork::Ipv4Network;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::{
    control::etcd::{EtcdError, EtcdOptions},
    control::lease::{LeaseListing, ListedLease, decode_lease, list_leases, parse_subnet_key_name},
    control::store::{EventKind as EventType, KvStore, KvWatch, Store, WatchBatch},
    dataplane::DataplaneCommand,
    observe::status::AgentStatus,
    peer::{LeaseBackend, Peer, PeerEvent},
};

/// What a lease must be to become a peer of this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerRules {
    /// The lease type we speak; others are ignored.
    pub backend: LeaseBackend,
    /// The cluster `Network`: a subnet outside it is no pod subnet of this cluster.
    pub network: Ipv4Network,
    /// Our PublicIP: a lease carrying it is not another node (a stale or forged lease of
    /// ours would route our own pods' traffic back to us).
    pub own_public_ip: Ipv4Addr,
}

/// Follows the peers' leases and feeds the dataplane task.
pub struct PeerWatcher<S = Store> {
    client: S,
    opts: EtcdOptions,
    rules: PeerRules,
    own_subnet: watch::Receiver<Ipv4Network>,
    tx: mpsc::Sender<DataplaneCommand>,
    /// What the dataplane has been told, by subnet.
    peers: BTreeMap<Ipv4Network, Peer>,
    /// Where to report the etcd connection state, if anywhere.
    status: Option<watch::Sender<AgentStatus>>,
    /// A listing already read (the lease acquisition's), used instead of the first list.
    first_listing: Option<LeaseListing>,
}

/// Why the watch loop has to list again.
enum Relist {
    Stopped,
    Again,
}

impl<S: KvStore> PeerWatcher<S> {
    /// `rules`: what a peer lease must be; `own_subnet`: our lease's subnet, updated when
    /// the lease is re-acquired elsewhere.
    pub fn new(
        client: S,
        opts: EtcdOptions,
        rules: PeerRules,
        own_subnet: watch::Receiver<Ipv4Network>,
        tx: mpsc::Sender<DataplaneCommand>,
    ) -> PeerWatcher<S> {
        PeerWatcher {
            client,
            opts,
            rules,
            own_subnet,
            tx,
            peers: BTreeMap::new(),
            status: None,
            first_listing: None,
        }
    }

    /// Starts from `listing` instead of listing again (it must be this prefix's leases; the
    /// watch then starts at its revision, so nothing written after it is missed).
    pub fn with_first_listing(mut self, listing: Option<LeaseListing>) -> PeerWatcher<S> {
        self.first_listing = listing;
        self
    }

    /// Reports the connection state (`etcd.connected`, `etcd.reconnects`) in `status`.
    pub fn with_status(mut self, status: watch::Sender<AgentStatus>) -> PeerWatcher<S> {
        self.status = Some(status);
        self
    }

    fn report_connected(&self, connected: bool) {
        if let Some(status) = &self.status {
            status.send_if_modified(|s| {
                let was = s.etcd.connected;
                s.etcd.connected = connected;
                if was && !connected {
                    s.etcd.reconnects += 1;
                }
                was != connected
            });
        }
    }

    /// Runs until the dataplane channel closes.
    pub async fn run(mut self) {
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.list_and_watch().await {
                Ok(Relist::Stopped) => return,
                Ok(Relist::Again) => backoff = Duration::from_millis(200),
                Err(err) => {
                    self.report_connected(false);
                    warn!(error = %err, "following peer leases failed; listing again in {backoff:?}");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = self.tx.closed() => return,
                    }
                    // Capped at 1 s: leases changed while etcd was away must be applied within ~2 s of
                    // its return (issue 8), and one list per second is cheap for etcd.
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    // Probe the endpoints again: the one we used may be the one that died.
                    if self.opts.endpoints.len() > 1
                        && let Ok(client) = self.client.reconnect(&self.opts).await
                    {
                        self.client = client;
                    }
                }
            }
        }
    }

    async fn send(&self, event: PeerEvent) -> bool {
        self.tx.send(DataplaneCommand::Peers(event)).await.is_ok()
    }

    /// One cycle: list, send a snapshot, watch until something forces a re-list.
    async fn list_and_watch(&mut self) -> Result<Relist, WatchError> {
        let own = *self.own_subnet.borrow_and_update();
        let (leases, revision) = match self.first_listing.take() {
            Some(listing) => (listing.leases, listing.revision),
            None => list_leases(&mut self.client, &self.opts)
                .await
                .map_err(WatchError::List)?,
        };
        // One at a time: a lease overlapping one accepted before it is skipped.
        let mut peers = BTreeMap::new();
        for listed in &leases {
            if let Some(peer) = self.peer_from_listing(listed, own, &peers) {
                peers.insert(peer.subnet, peer);
            }
        }
        self.peers = peers;
        info!(peers = self.peers.len(), revision, api = %self.client.api(), "peer leases listed");
        self.report_connected(true);
        if !self
            .send(PeerEvent::Snapshot(self.peers.values().cloned().collect()))
            .await
        {
            return Ok(Relist::Stopped);
        }

        let prefix = self.opts.subnets_prefix();
        let mut stream = self
            .client
            .watch(&prefix, true, revision + 1)
            .await
            .map_err(|source| WatchError::Watch {
                prefix: prefix.clone(),
                source,
            })?;
        loop {
            tokio::select! {
                msg = stream.next() => {
                    let events = match msg {
                        Ok(WatchBatch::Events(events)) => events,
                        Ok(WatchBatch::Outdated(why)) => {
                            warn!(reason = %why, "peer watch fell behind; listing again");
                            return Ok(Relist::Again);
                        }
                        Err(source) => return Err(WatchError::Broke { prefix, source }),
                    };
                    for ev in events {
                        let Some(event) = self.apply_event(&ev.kv.key, ev.kind, &ev.kv.value, own) else {
                            continue;
                        };
                        if !self.send(event).await {
                            return Ok(Relist::Stopped);
                        }
                    }
                }
                changed = self.own_subnet.changed() => {
                    if changed.is_err() {
                        return Ok(Relist::Stopped);
                    }
                    info!(subnet = %*self.own_subnet.borrow(), "our own subnet changed; listing peers again");
                    return Ok(Relist::Again);
                }
                _ = self.tx.closed() => return Ok(Relist::Stopped),
            }
        }
    }

    fn peer_from_listing(
        &self,
        listed: &ListedLease,
        own: Ipv4Network,
        accepted: &BTreeMap<Ipv4Network, Peer>,
    ) -> Option<Peer> {
        let Some(subnet) = listed.subnet else {
            warn!(key = %listed.key, "skipping a key under subnets/ whose name is not a subnet (expected e.g. 10.5.52.0-24)");
            return None;
        };
        if subnet == own {
            return None;
        }
        let value = match &listed.value {
            Ok(v) => v,
            Err(err) => {
                warn!(key = %listed.key, error = %err, "skipping a lease whose value cannot be parsed");
                return None;
            }
        };
        match value.to_peer(subnet, self.rules.backend) {
            Ok(Some(peer)) => match check_peer(&peer, &self.rules, own, accepted) {
                Ok(()) => Some(peer),
                Err(problem) => {
                    warn!(key = %listed.key, "skipping an unusable lease: {problem}");
                    None
                }
            },
            Ok(None) => {
                debug!(key = %listed.key, backend = %value.backend_type, "ignoring a lease of another backend type");
                None
            }
            Err(err) => {
                warn!(key = %listed.key, error = %err, "skipping an unusable lease");
                None
            }
        }
    }

    /// Updates the cache for one watch event and returns what the dataplane must hear.
    fn apply_event(
        &mut self,
        key: &str,
        kind: EventType,
        value: &[u8],
        own: Ipv4Network,
    ) -> Option<PeerEvent> {
        let name = key.strip_prefix(&self.opts.subnets_prefix()).unwrap_or(key);
        let Some(subnet) = parse_subnet_key_name(name) else {
            warn!(
                key,
                "skipping a key under subnets/ whose name is not a subnet (expected e.g. 10.5.52.0-24)"
            );
            return None;
        };
        if subnet == own {
            // Our own key: the lease keeper (lease.rs) notices foreign writes and answers them.
            if kind == EventType::Put {
                debug!(key, "a write on our own lease key");
            }
            return None;
        }
        match kind {
            EventType::Delete => {
                let removed = self.peers.remove(&subnet)?;
                info!(subnet = %subnet, public_ip = %removed.public_ip, "peer lease removed");
                Some(PeerEvent::Remove(subnet))
            }
            EventType::Put => {
                let value = match decode_lease(value) {
                    Ok(v) => v,
                    Err(err) => {
                        warn!(key, error = %err, "skipping a lease whose value cannot be parsed; keeping what we knew of it");
                        return None;
                    }
                };
                match value.to_peer(subnet, self.rules.backend) {
                    Ok(Some(peer)) => {
                        if let Err(problem) = check_peer(&peer, &self.rules, own, &self.peers) {
                            warn!(
                                key,
                                "skipping an unusable lease: {problem}; keeping what we knew of it"
                            );
                            return None;
                        }
                        if self.peers.get(&subnet) == Some(&peer) {
                            return None;
                        }
                        info!(subnet = %subnet, public_ip = %peer.public_ip, "peer lease added or changed");
                        self.peers.insert(subnet, peer.clone());
                        Some(PeerEvent::Upsert(peer))
                    }
                    Ok(None) => {
                        // It switched to a backend we do not speak: we can no longer reach it.
                        debug!(key, backend = %value.backend_type, "ignoring a lease of another backend type");
                        self.peers
                            .remove(&subnet)
                            .map(|_| PeerEvent::Remove(subnet))
                    }
                    Err(err) => {
                        warn!(key, error = %err, "skipping an unusable lease; keeping what we knew of it");
                        None
                    }
                }
            }
        }
    }
}

/// Why following the peer leases stopped (the watcher lists again after a backoff).
#[derive(Debug, thiserror::Error)]
enum WatchError {
    #[error("listing the peer leases: {0}")]
    List(#[source] EtcdError),
    #[error("watching {prefix}: {source}")]
    Watch {
        prefix: String,
        #[source]
        source: EtcdError,
    },
    #[error("the watch on {prefix} broke: {source}")]
    Broke {
        prefix: String,
        #[source]
        source: EtcdError,
    },
}

/// Why a peer lease cannot be programmed: its PublicIP is not a unicast address (the FDB
/// and routes would send our pods' traffic to a broadcast or multicast group, or nowhere) or
/// is our own; its subnet lies outside the cluster network (a route for e.g. 8.8.8.0/24 on
/// every node would hijack that traffic) or overlaps ours or another peer's (two routes would
/// claim the same pods).
fn check_peer(
    peer: &Peer,
    rules: &PeerRules,
    own: Ipv4Network,
    peers: &BTreeMap<Ipv4Network, Peer>,
) -> Result<(), String> {
    let ip = peer.public_ip;
    if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || ip.is_loopback() {
        return Err(format!(
            "PublicIP {ip} is not a unicast IPv4 address (the node's underlay address is expected)"
        ));
    }
    if ip == rules.own_public_ip {
        return Err(format!(
            "PublicIP {ip} is this node's own address, so the lease is not another node's (a stale lease of ours, or a node misconfigured with our --public-ip); delete it with `overlay-agent lease release {}` if no node uses it",
            peer.subnet
        ));
    }
    if !rules.network.contains(peer.subnet.network())
        || peer.subnet.prefix() < rules.network.prefix()
    {
        return Err(format!(
            "subnet {} is outside the cluster network {}",
            peer.subnet, rules.network
        ));
    }
    if peer.subnet.overlaps(own) {
        return Err(format!(
            "subnet {} overlaps our own subnet {own}",
            peer.subnet
        ));
    }
    if let Some(other) = overlapping(peers, peer.subnet) {
        return Err(format!(
            "subnet {} overlaps the subnet {other} of another peer",
            peer.subnet
        ));
    }
    Ok(())
}

/// Another held subnet that overlaps `subnet`: one containing it (one lookup per shorter
/// prefix) or one inside it (a range of the map, which is ordered by network address). A
/// linear scan cost O(n) per lease and made listing 20,000 leases quadratic. Subnets are
/// normalized (no host bits), as lease keys are.
fn overlapping(peers: &BTreeMap<Ipv4Network, Peer>, subnet: Ipv4Network) -> Option<Ipv4Network> {
    let outer = (0..=subnet.prefix()).find_map(|prefix| {
        let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
        let candidate =
            Ipv4Network::new(Ipv4Addr::from(u32::from(subnet.network()) & mask), prefix).ok()?;
        (candidate != subnet && peers.contains_key(&candidate)).then_some(candidate)
    });
    outer.or_else(|| {
        let first = Ipv4Network::new(subnet.network(), 0).ok()?;
        let last = Ipv4Network::new(subnet.broadcast(), 32).ok()?;
        peers
            .range(first..=last)
            .map(|(other, _)| *other)
            .find(|other| *other != subnet && subnet.contains(other.network()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_lookup_agrees_with_a_linear_scan() {
        // Random subnets of 10.0.0.0/8 with prefixes 8..=32, against the obvious scan.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut held = BTreeMap::new();
        for _ in 0..3000 {
            let prefix = 8 + (next() % 25) as u8;
            let addr = Ipv4Addr::from(0x0a00_0000 | (next() as u32 & 0x00ff_ffff));
            let net = Ipv4Network::new(addr, prefix).expect("net");
            let subnet = Ipv4Network::new(net.network(), prefix).expect("normalized");
            let linear = held
                .keys()
                .copied()
                .find(|other: &Ipv4Network| *other != subnet && other.overlaps(subnet));
            let fast = overlapping(&held, subnet);
            assert_eq!(
                fast.is_some(),
                linear.is_some(),
                "{subnet}: {fast:?} vs {linear:?}"
            );
            if let Some(other) = fast {
                assert!(
                    other.overlaps(subnet) && other != subnet,
                    "{subnet} vs {other}"
                );
            }
            if fast.is_none() && next() % 2 == 0 {
                held.insert(subnet, peer(&subnet.to_string(), "192.168.1.1"));
            }
        }
        assert!(
            held.len() > 100,
            "the test must hold many subnets ({})",
            held.len()
        );
    }

    fn peer(subnet: &str, ip: &str) -> Peer {
        Peer {
            subnet: subnet.parse().expect("net"),
            public_ip: ip.parse().expect("ip"),
            vtep_mac: None,
        }
    }

    #[test]
    fn check_peer_rejects_non_unicast_ips_and_overlaps() {
        let own: Ipv4Network = "10.5.1.0/24".parse().expect("net");
        let rules = PeerRules {
            backend: LeaseBackend::Vxlan,
            network: "10.5.0.0/16".parse().expect("net"),
            own_public_ip: "192.168.1.1".parse().expect("ip"),
        };
        let mut peers = BTreeMap::new();
        let good = peer("10.5.2.0/24", "192.168.1.2");
        assert_eq!(check_peer(&good, &rules, own, &peers), Ok(()));
        peers.insert(good.subnet, good.clone());
        // The same subnet again (a changed lease) is not an overlap.
        assert_eq!(
            check_peer(&peer("10.5.2.0/24", "192.168.1.9"), &rules, own, &peers),
            Ok(())
        );
        for ip in ["0.0.0.0", "224.0.0.1", "255.255.255.255", "127.0.0.1"] {
            let err = check_peer(&peer("10.5.3.0/24", ip), &rules, own, &peers).expect_err(ip);
            assert!(err.contains(ip) && err.contains("unicast"), "{err}");
        }
        let err = check_peer(
            &peer("10.5.0.0/16", "192.168.1.3"),
            &rules,
            own,
            &BTreeMap::new(),
        )
        .expect_err("overlaps ours");
        assert!(err.contains("overlaps our own subnet 10.5.1.0/24"), "{err}");
        let err = check_peer(
            &peer("10.5.2.0/23", "192.168.1.3"),
            &rules,
            "10.5.9.0/24".parse().expect("net"),
            &peers,
        )
        .expect_err("overlaps a peer");
        assert!(err.contains("overlaps the subnet 10.5.2.0/24"), "{err}");
        let err = check_peer(&peer("8.8.8.0/24", "192.168.1.8"), &rules, own, &peers)
            .expect_err("outside the network");
        assert!(
            err.contains("outside the cluster network 10.5.0.0/16"),
            "{err}"
        );
        // A subnet holding the whole network (or more) is not inside it either.
        let wide = PeerRules {
            network: "10.5.0.0/24".parse().expect("net"),
            ..rules
        };
        let err = check_peer(
            &peer("10.5.0.0/16", "192.168.1.8"),
            &wide,
            "10.5.9.0/28".parse().expect("net"),
            &BTreeMap::new(),
        )
        .expect_err("wider than the network");
        assert!(err.contains("outside the cluster network"), "{err}");
        let err = check_peer(&peer("10.5.7.0/24", "192.168.1.1"), &rules, own, &peers)
            .expect_err("our own PublicIP");
        assert!(err.contains("this node's own address"), "{err}");
    }
}
