//! What the agent knows about itself, in one serializable value: served as JSON (`/status`),
//! rendered as Prometheus text (`/metrics`) and as a table (`overlay-agent status`).

use std::{collections::BTreeMap, fmt::Write as _};

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A snapshot of the agent's state. The agent keeps the current one in a watch channel.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// `true` once lease, datapath and subnet.env are in place.
    pub ready: bool,
    pub node: NodeStatus,
    pub etcd: EtcdStatus,
    /// Remote peers, sorted by subnet.
    pub peers: PeerList,
    /// Peer events the dataplane has applied since start.
    pub events_applied: u64,
    /// What keeping the datapath costs the kernel: filled in when the status is served.
    #[serde(default)]
    pub dataplane_work: DataplaneWork,
    /// Datapath counters by name (`overlay_common::stat::NAMES`); empty without eBPF.
    pub datapath_counters: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Our subnet, e.g. "10.5.52.0/24" (empty before the lease is held).
    pub subnet: String,
    pub public_ip: String,
    /// The backend asked for: "ebpf", "vxlan" or "host-gw".
    pub backend: String,
    /// The datapath really forwarding traffic: equals `backend`, or "vxlan" after a fallback.
    pub active_datapath: String,
    /// Why the eBPF programs are not in use, when the node fell back to the kernel path.
    pub fallback_reason: Option<String>,
    /// eBPF: the fast-path pieces in use (`--ebpf-fast-path`).
    #[serde(default)]
    pub ebpf_fast_path: Option<String>,
    /// eBPF: whether GRO-merged VXLAN is decapsulated in BPF (the kernel has
    /// `BPF_F_ADJ_ROOM_DECAP_L4_UDP`) or by the vxlan device.
    #[serde(default)]
    pub gso_decap_in_bpf: Option<bool>,
    pub vtep_mac: Option<String>,
    /// When our lease expires (Unix seconds), if known.
    pub lease_expires_unix: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EtcdStatus {
    pub connected: bool,
    pub reconnects: u64,
    /// The keyspace in use: "v3" or "v2" (`--etcd-api`, or what `auto` found).
    #[serde(default)]
    pub api: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub subnet: String,
    pub public_ip: String,
    /// "vxlan" or "host-gw" (the lease's BackendType).
    pub backend: String,
    pub vtep_mac: Option<String>,
    /// When this node first saw the peer (Unix seconds).
    pub since_unix: u64,
}

/// The peers by subnet: one event costs O(log n) at 20,000 peers, where a sorted list cost a
/// re-sort. Serialized as the list of [`PeerStatus`] sorted by subnet.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerList(BTreeMap<Ipv4Network, PeerStatus>);

impl PeerList {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The peers in subnet order.
    pub fn iter(&self) -> impl Iterator<Item = &PeerStatus> {
        self.0.values()
    }

    pub fn get(&self, subnet: &Ipv4Network) -> Option<&PeerStatus> {
        self.0.get(subnet)
    }

    pub fn get_mut(&mut self, subnet: &Ipv4Network) -> Option<&mut PeerStatus> {
        self.0.get_mut(subnet)
    }

    pub fn insert(&mut self, subnet: Ipv4Network, peer: PeerStatus) {
        self.0.insert(subnet, peer);
    }

    pub fn remove(&mut self, subnet: &Ipv4Network) -> Option<PeerStatus> {
        self.0.remove(subnet)
    }
}

impl FromIterator<PeerStatus> for PeerList {
    /// Peers whose subnet does not parse are left out (they cannot come from the agent).
    fn from_iter<I: IntoIterator<Item = PeerStatus>>(peers: I) -> Self {
        PeerList(
            peers
                .into_iter()
                .filter_map(|peer| Some((peer.subnet.parse().ok()?, peer)))
                .collect(),
        )
    }
}

impl Serialize for PeerList {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.values())
    }
}

impl<'de> Deserialize<'de> for PeerList {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(Vec::<PeerStatus>::deserialize(deserializer)?
            .into_iter()
            .collect())
    }
}

/// Counters of the work the dataplane task did, process-wide.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataplaneWork {
    /// Netlink write requests sent (routes, neighbours, FDB entries, links, addresses).
    pub netlink_writes: u64,
    /// Peer snapshots (first sync and every re-list) applied to the datapath.
    pub snapshots_applied: u64,
    /// How long applying the last snapshot took, in microseconds.
    pub last_snapshot_micros: u64,
    /// Peer routes written through an interim nexthop object, still to be rewritten in
    /// flannel's form (vxlan and ebpf at 1,000 peers and more).
    #[serde(default)]
    pub interim_routes: u64,
}

impl DataplaneWork {
    /// The counters as they are now.
    pub fn now() -> Self {
        let (snapshots_applied, last_snapshot_micros) = crate::dataplane::snapshot_stats();
        DataplaneWork {
            netlink_writes: crate::os::netlink::writes_total(),
            snapshots_applied,
            last_snapshot_micros,
            interim_routes: crate::dataplane::interim_routes(),
        }
    }
}

impl AgentStatus {
    pub fn fell_back(&self) -> bool {
        self.node.fallback_reason.is_some()
    }
}

/// Prometheus text exposition format (version 0.0.4).
pub fn render_prometheus(status: &AgentStatus) -> String {
    render_prometheus_with(status, &status.dataplane_work)
}

/// [`render_prometheus`] with the work counters given apart: the health server renders from
/// the borrowed status instead of cloning 20,000 peer entries per scrape.
// Long on purpose: one short block per metric, in the order /metrics shows them.
pub fn render_prometheus_with(status: &AgentStatus, work: &DataplaneWork) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, u64)]| {
        let _ = writeln!(out, "# HELP overlay_{name} {help}");
        let _ = writeln!(out, "# TYPE overlay_{name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "overlay_{name}{labels} {value}");
        }
    };
    let node = &status.node;
    metric(
        "ready",
        "gauge",
        "1 once lease, datapath and subnet.env are in place.",
        &[(String::new(), status.ready as u64)],
    );
    metric(
        "lease_info",
        "gauge",
        "This node's lease (always 1; the labels carry the data).",
        &[(
            labels(&[("subnet", &node.subnet), ("public_ip", &node.public_ip)]),
            1,
        )],
    );
    if let Some(expiry) = node.lease_expires_unix {
        metric(
            "lease_expiry_timestamp_seconds",
            "gauge",
            "When this node's lease expires unless renewed.",
            &[(String::new(), expiry)],
        );
    }
    metric(
        "backend_info",
        "gauge",
        "Configured backend and the datapath really in use (always 1).",
        &[(
            labels(&[
                ("backend", &node.backend),
                ("active_datapath", &node.active_datapath),
            ]),
            1,
        )],
    );
    if let Some(pieces) = &node.ebpf_fast_path {
        let gso = node
            .gso_decap_in_bpf
            .map_or("unknown", |b| if b { "true" } else { "false" });
        metric(
            "ebpf_fast_path_info",
            "gauge",
            "eBPF fast-path pieces in use and whether GSO VXLAN is decapsulated in BPF (always 1).",
            &[(labels(&[("pieces", pieces), ("gso_decap_in_bpf", gso)]), 1)],
        );
    }
    metric(
        "kernel_fallback",
        "gauge",
        "1 when the eBPF programs could not be used and the kernel path forwards instead.",
        &[(String::new(), status.fell_back() as u64)],
    );
    let mut by_backend: BTreeMap<&str, u64> = BTreeMap::new();
    for peer in status.peers.iter() {
        *by_backend.entry(peer.backend.as_str()).or_default() += 1;
    }
    let peers: Vec<(String, u64)> = by_backend
        .iter()
        .map(|(backend, count)| (labels(&[("backend", backend)]), *count))
        .collect();
    metric(
        "peers",
        "gauge",
        "Remote peers in the datapath, by lease backend type.",
        &peers,
    );
    metric(
        "etcd_connected",
        "gauge",
        "1 while the etcd connection (watch) is up.",
        &[(String::new(), status.etcd.connected as u64)],
    );
    metric(
        "etcd_reconnects_total",
        "counter",
        "etcd reconnections since start.",
        &[(String::new(), status.etcd.reconnects)],
    );
    metric(
        "peer_events_applied_total",
        "counter",
        "Peer events applied to the datapath since start.",
        &[(String::new(), status.events_applied)],
    );
    metric(
        "netlink_writes_total",
        "counter",
        "Netlink write requests sent (routes, neighbours, FDB entries, links, addresses).",
        &[(String::new(), work.netlink_writes)],
    );
    metric(
        "peer_snapshots_applied_total",
        "counter",
        "Peer snapshots (first sync and re-lists) applied to the datapath.",
        &[(String::new(), work.snapshots_applied)],
    );
    metric(
        "interim_routes",
        "gauge",
        "Peer routes written through an interim nexthop object for a quick sync, still to be rewritten in flannel's form.",
        &[(String::new(), work.interim_routes)],
    );
    metric(
        "peer_snapshot_last_apply_microseconds",
        "gauge",
        "How long applying the last peer snapshot to the datapath took.",
        &[(String::new(), work.last_snapshot_micros)],
    );
    let counters: Vec<(String, u64)> = status
        .datapath_counters
        .iter()
        .map(|(name, value)| (labels(&[("counter", name)]), *value))
        .collect();
    metric(
        "datapath_packets_total",
        "counter",
        "eBPF datapath counters: fast_* took a fast path, kernel_* went to the kernel and why, drop_* were dropped; *_bytes count bytes.",
        &counters,
    );
    out
}

fn labels(pairs: &[(&str, &str)]) -> String {
    let body: Vec<String> = pairs
        .iter()
        .map(|(key, value)| {
            let escaped = value
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{key}=\"{escaped}\"")
        })
        .collect();
    format!("{{{}}}", body.join(","))
}

/// A readable summary for `overlay-agent status`.
pub fn render_table(status: &AgentStatus) -> String {
    let node = &status.node;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "node      subnet {}  public-ip {}  ready {}",
        dash(&node.subnet),
        dash(&node.public_ip),
        status.ready
    );
    let _ = writeln!(
        out,
        "backend   {} (datapath in use: {}){}",
        dash(&node.backend),
        dash(&node.active_datapath),
        node.fallback_reason
            .as_ref()
            .map(|r| format!("  FELL BACK: {r}"))
            .unwrap_or_default()
    );
    if let Some(mac) = &node.vtep_mac {
        let _ = writeln!(out, "vtep-mac  {mac}");
    }
    if let Some(pieces) = &node.ebpf_fast_path {
        let gso = match node.gso_decap_in_bpf {
            Some(true) => "in BPF",
            Some(false) => "by the vxlan device (kernel lacks BPF_F_ADJ_ROOM_DECAP_L4_UDP)",
            None => "unknown",
        };
        let _ = writeln!(out, "fast-path {pieces}  (GSO VXLAN decapsulated {gso})");
    }
    let _ = writeln!(
        out,
        "etcd      api {}  connected {}  reconnects {}",
        dash(&status.etcd.api),
        status.etcd.connected,
        status.etcd.reconnects
    );
    let _ = writeln!(out, "\n{} peer(s):", status.peers.len());
    let _ = writeln!(
        out,
        "  {:<18} {:<16} {:<8} {:<18} SINCE(unix)",
        "SUBNET", "PUBLIC-IP", "BACKEND", "VTEP-MAC"
    );
    for peer in status.peers.iter() {
        let _ = writeln!(
            out,
            "  {:<18} {:<16} {:<8} {:<18} {}",
            peer.subnet,
            peer.public_ip,
            peer.backend,
            peer.vtep_mac.as_deref().unwrap_or("-"),
            peer.since_unix
        );
    }
    if !status.datapath_counters.is_empty() {
        let _ = writeln!(out, "\ndatapath counters:");
        for (name, value) in &status.datapath_counters {
            let _ = writeln!(out, "  {name:<22} {value}");
        }
    }
    out
}

fn dash(value: &str) -> &str {
    if value.is_empty() { "-" } else { value }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> AgentStatus {
        AgentStatus {
            ready: true,
            node: NodeStatus {
                subnet: "10.5.52.0/24".into(),
                public_ip: "192.168.100.1".into(),
                backend: "ebpf".into(),
                active_datapath: "ebpf".into(),
                ..NodeStatus::default()
            },
            peers: [
                PeerStatus {
                    subnet: "10.5.7.0/24".into(),
                    backend: "vxlan".into(),
                    ..PeerStatus::default()
                },
                PeerStatus {
                    subnet: "10.5.9.0/24".into(),
                    backend: "vxlan".into(),
                    ..PeerStatus::default()
                },
            ]
            .into_iter()
            .collect(),
            datapath_counters: [("encap_packets".to_owned(), 42)].into_iter().collect(),
            ..AgentStatus::default()
        }
    }

    #[test]
    fn prometheus_text_has_help_type_and_samples() {
        let text = render_prometheus(&sample());
        assert!(
            text.contains("# TYPE overlay_peers gauge\noverlay_peers{backend=\"vxlan\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("overlay_datapath_packets_total{counter=\"encap_packets\"} 42\n"),
            "{text}"
        );
        assert!(text.contains("overlay_kernel_fallback 0\n"), "{text}");
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').expect("name value");
            value
                .parse::<u64>()
                .unwrap_or_else(|_| panic!("bad sample line {line:?}"));
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(labels(&[("a", "x\"y\\z")]), "{a=\"x\\\"y\\\\z\"}");
    }
}
