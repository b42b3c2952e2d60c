//! The eBPF datapath (`--backend=ebpf`): TCX programs on the uplink, the kernel vxlan device
//! and every pod's host veth, on top of the kernel vxlan dataplane, which stays programmed
//! underneath so that anything the programs hand on (and the whole node, if they are
//! detached) still works. Flows that crossed the kernel path unchanged in both directions
//! (learned by the programs) then bypass the host stack: R1 (vxlan device ingress ->
//! `bpf_redirect_peer` into the pod), R2 (pod veth ingress -> BPF encap -> uplink), R3
//! (uplink: BPF decap -> `bpf_redirect_peer`), see ../shared/design/fastpath.md.
//! Pods are learned from netlink: veths whose master is the pod bridge, their peer's address
//! and MAC read in the pod's namespace.
//!
//! Maps and TCX links are pinned under a versioned directory (default
//! [`DEFAULT_PIN_DIR`]): a restarted agent attaches its new programs first and only then
//! unpins the old links, and resyncs peers by mark-and-sweep, so traffic never stops.

use std::{
    collections::{BTreeMap, HashMap as StdHashMap, HashSet},
    io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader, TestRun, TestRunOptions,
    maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, lpm_trie::Key},
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::TcAttachOptions,
    },
};
use futures_util::StreamExt;
use ipnetwork::Ipv4Network;
use overlay_common::{
    DatapathConfig, Endpoint, FlowKey, FlowState, PeerInfo, PeerSource, PeerSubnet, VXLAN_OVERHEAD,
    config_flags, map_names, peer_flags, program_names, stat,
};
use tracing::{debug, info, warn};

use super::{Dataplane, DataplaneError, LocalLease};
use crate::{
    cni::agent_socket::{PodNotice, PodNoticeReply, PodOp},
    os::iface::Uplink,
    os::netlink::{KernelChange, Link, Netlink},
    peer::{MacAddr6, Peer, PeerEvent},
};

/// The compiled programs, built by build.rs (aya-build) and embedded in the agent.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/overlay-ebpf"));

mod attach;
mod loader;
mod maps;
mod peers;

use loader::remove_older_versions;
pub use loader::{classifier, load, probe_decap_l4_udp, remove_pinned, remove_pinned_all_versions};
use maps::{Maps, absent_ok, map_err, sum_stats};
pub use maps::{counters_by_name, read_pinned_stats};

/// Default of `--bpf-pin-dir`. The version changes whenever the maps' layout does; a run
/// of this version removes what older versions left beside it (their links detach).
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/overlay/v2";

const UPLINK_LINK_PIN: &str = "link_uplink_ingress";
const VXLAN_INGRESS_LINK_PIN: &str = "link_vxlan_ingress";
const VXLAN_EGRESS_LINK_PIN: &str = "link_vxlan_egress";
/// Pod veth links are pinned as `link_pod_<ifname>_{ingress,egress}`.
const POD_LINK_PREFIX: &str = "link_pod_";
/// At most this many peers' underlay next hops are (re-)resolved per maintenance pass.
const NEXTHOPS_PER_PASS: usize = 50_000;
/// How often the next-hop table is scanned for due lookups when nothing asks for it sooner.
const NEXTHOP_SCAN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);
/// Next-hop lookups in flight at once.
const LOOKUPS_IN_FLIGHT: usize = 128;
/// Next hops are looked up again when an underlay route or the uplink changes (netlink
/// notifications); this slow recheck is the safety net. Every minute was 333 lookups a
/// second at 20,000 peers, about 2% of a core.
const NEXTHOP_RECHECK: std::time::Duration = std::time::Duration::from_secs(600);
/// A peer address with no underlay route yet is looked up again after this long, or at
/// once when a route appears.
const NEXTHOP_RETRY: std::time::Duration = std::time::Duration::from_secs(60);

/// The fast-path pieces (`--ebpf-fast-path`); learning and anti-spoofing always run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FastPath {
    /// R1: deliver what the kernel decapsulated straight into the pod.
    pub rx_after_decap: bool,
    /// R2: encapsulate at the pod veth and send out of the uplink.
    pub tx: bool,
    /// R3: decapsulate non-GSO VXLAN on the uplink and deliver it into the pod.
    pub rx_before_decap: bool,
}

impl FastPath {
    pub const ALL: Self = Self {
        rx_after_decap: true,
        tx: true,
        rx_before_decap: true,
    };
    pub const NONE: Self = Self {
        rx_after_decap: false,
        tx: false,
        rx_before_decap: false,
    };

    fn config_flags(self) -> u32 {
        let mut flags = 0;
        if self.rx_after_decap {
            flags |= config_flags::FAST_RX_AFTER_DECAP;
        }
        if self.tx {
            flags |= config_flags::FAST_TX;
        }
        if self.rx_before_decap {
            flags |= config_flags::FAST_RX_BEFORE_DECAP;
        }
        flags
    }
}

impl std::fmt::Display for FastPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if *self == Self::ALL {
            return f.write_str("all");
        }
        let pieces: Vec<&str> = [
            (self.rx_after_decap, "rx-after-decap"),
            (self.tx, "tx"),
            (self.rx_before_decap, "rx-before-decap"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect();
        if pieces.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&pieces.join(","))
        }
    }
}

impl std::str::FromStr for FastPath {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim() {
            "all" => return Ok(Self::ALL),
            "none" => return Ok(Self::NONE),
            _ => {}
        }
        let mut pieces = Self::NONE;
        for piece in text.split(',').map(str::trim) {
            match piece {
                "rx-after-decap" => pieces.rx_after_decap = true,
                "tx" => pieces.tx = true,
                "rx-before-decap" => pieces.rx_before_decap = true,
                other => {
                    return Err(format!(
                        "unknown fast-path piece {other:?}: use all, none, or a comma-separated list of rx-after-decap, tx, rx-before-decap"
                    ));
                }
            }
        }
        Ok(pieces)
    }
}

/// Errors of the eBPF datapath, each naming what it was doing.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error(
        "cannot create the BPF pin directory {path}: {source} (is /sys/fs/bpf a bpf filesystem? `mount -t bpf bpf /sys/fs/bpf`)"
    )]
    PinDir { path: PathBuf, source: io::Error },
    #[error(
        "loading the eBPF object with maps pinned under {pin_dir} failed: {source} (a map pinned there by an incompatible version? remove the directory or use another --bpf-pin-dir)"
    )]
    Load {
        pin_dir: PathBuf,
        // Boxed: aya's errors are large and this enum travels through every Result here.
        source: Box<aya::EbpfError>,
    },
    #[error("the eBPF object has no program {0}: the build is inconsistent")]
    MissingProgram(&'static str),
    #[error("the eBPF object has no map {0}: the build is inconsistent")]
    MissingMap(&'static str),
    #[error("{what} (program {program}): {source}")]
    Program {
        what: String,
        program: &'static str,
        source: Box<ProgramError>,
    },
    #[error("{what} (map {map}): {source}")]
    Map {
        what: String,
        map: &'static str,
        source: Box<MapError>,
    },
    #[error("{what} ({path}): {source}")]
    Pin {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("interface {name}: {source}")]
    Interface { name: String, source: io::Error },
}

/// Settings of the eBPF datapath, from the command line and the chosen uplink.
#[derive(Clone, Debug)]
pub struct EbpfSettings {
    /// `--bpf-pin-dir`.
    pub pin_dir: PathBuf,
    /// `--bridge`; `None`: the interface holding an address inside our subnet.
    pub bridge: Option<String>,
    pub uplink: Uplink,
    pub vni: u32,
    /// VXLAN UDP port (Backend.Port, 8472 when 0).
    pub port: u16,
    /// Our VtepMAC (the lease's). `None`: read it from the kernel vxlan device, which is what
    /// it must be anyway (peers address inner frames to it, and the device drops others).
    pub vtep_mac: Option<MacAddr6>,
    /// The kernel vxlan device (`flannel.<VNI>`), created by the kernel dataplane.
    pub vxlan_device: String,
    /// `--ebpf-fast-path`.
    pub fast_path: FastPath,
}

/// [`EbpfDataplane::new`] failed: the kernel dataplane, untouched, and why.
#[derive(Debug)]
pub struct EbpfUnavailable<K> {
    pub kernel: K,
    pub error: EbpfError,
}

impl<K> std::fmt::Display for EbpfUnavailable<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the eBPF datapath is unavailable: {}", self.error)
    }
}

/// conntrack's setting that accepts TCP packets outside the window it tracked.
const CONNTRACK_TCP_LIBERAL: &str = "/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal";

/// A learned flow's data bypasses conntrack, so the packets it still sends through the
/// kernel (FIN, RST, re-validation) carry sequence numbers conntrack never saw: strict window
/// tracking marks them INVALID, and kube-proxy's `--ctstate INVALID -j DROP` then drops
/// them (a connection could not close). With liberal tracking conntrack follows the flow
/// (only out-of-window RSTs are still invalid). Set whenever conntrack is loaded in this
/// namespace; returns whether it changed something.
fn ensure_conntrack_liberal() -> bool {
    match std::fs::read_to_string(CONNTRACK_TCP_LIBERAL) {
        Ok(value) if value.trim() == "0" => match std::fs::write(CONNTRACK_TCP_LIBERAL, "1") {
            Ok(()) => {
                info!(
                    "set net.netfilter.nf_conntrack_tcp_be_liberal=1: fast-path flows bypass conntrack's window tracking, and their FIN/RST must not be dropped as INVALID"
                );
                true
            }
            Err(err) => {
                warn!(error = %err, "cannot set net.netfilter.nf_conntrack_tcp_be_liberal=1; with a rule that drops conntrack-INVALID packets (kube-proxy), fast-path TCP connections may not close cleanly");
                false
            }
        },
        // Not loaded (nothing tracks, nothing to do) or already liberal.
        _ => false,
    }
}

/// The MAC address of interface `name`, if it exists.
fn link_mac(name: &str) -> Option<MacAddr6> {
    nix::ifaddrs::getifaddrs()
        .ok()?
        .filter(|a| a.interface_name == name)
        .find_map(|a| a.address?.as_link_addr()?.addr())
        .map(MacAddr6::from)
}

/// The pod bridge: its veths are the pods.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Bridge {
    name: String,
    index: u32,
    /// Its address inside our subnet (the pods' gateway), if it has one.
    gateway: Option<Ipv4Addr>,
}

/// A pod veth the programs are attached to, and what its peer said about the pod.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PodVeth {
    name: String,
    /// The host veth's own MAC: with the index, what tells a re-created veth from the old
    /// one when the kernel reuses an index.
    mac: Option<MacAddr6>,
    /// The pod's eth0 MAC and its IPv4 addresses in our subnet.
    pod_mac: MacAddr6,
    pod_ips: Vec<Ipv4Addr>,
}

/// The eBPF datapath over the kernel vxlan dataplane `K` (which it programs first, always).
pub struct EbpfDataplane<K: Dataplane> {
    kernel: K,
    settings: EbpfSettings,
    ebpf: Ebpf,
    maps: Maps,
    netlink: Netlink,
    lease: Option<LocalLease>,
    bridge: Option<Bridge>,
    /// ifindex of the kernel vxlan device the programs are attached to.
    vxlan_ifindex: Option<u32>,
    /// Pod veths with programs attached, by host ifindex.
    pods: BTreeMap<u32, PodVeth>,
    /// Veths of pods a CNI DEL is tearing down (index -> name, MAC): left out of the pods
    /// until they are gone, so the netlink poll cannot put the endpoint back meanwhile.
    deleting: BTreeMap<u32, (String, Option<MacAddr6>)>,
    /// The desired peers (what the control plane last said), by subnet.
    peers: BTreeMap<Ipv4Network, Peer>,
    /// How many desired vxlan peers use each underlay address (PEER_SOURCES' lease_count).
    source_counts: StdHashMap<Ipv4Addr, u32>,
    /// Underlay next hop per peer address (None: no route yet), and when it was looked up.
    nexthops: StdHashMap<Ipv4Addr, (Option<Ipv4Addr>, std::time::Instant)>,
    /// When the next-hop table is next scanned for lookups that are due (a scan of 20,000
    /// peers every second was most of the idle CPU); a new peer or an underlay change
    /// brings it forward.
    nexthop_scan_at: std::time::Instant,
    /// Addresses (and the peer subnet) of peers added one by one whose next hop is not
    /// known yet: looked up on their own at the next pass.
    nexthop_pending: Vec<(Ipv4Addr, Ipv4Network)>,
    /// Route and link notifications, to look next hops up again when the underlay changes.
    underlay_changes: super::changes::Changes,
    /// Whether a snapshot has been applied since start (the first one also sweeps the maps
    /// of entries a previous run left).
    synced: bool,
    /// Whether R3 may decapsulate GSO VXLAN (the kernel accepts DECAP_L4_UDP).
    decap_l4_udp: bool,
    /// Mark-and-sweep generation written into map entries.
    generation: u32,
}

impl<K: Dataplane> EbpfDataplane<K> {
    /// Loads the programs (maps pinned under `settings.pin_dir`), probes the kernel, and
    /// attaches the decap program to the uplink's TCX ingress. The vxlan device and the pod
    /// veths are attached once [`Dataplane::activate`] or [`Dataplane::maintain`] finds
    /// them. When the programs cannot be loaded or attached, the error hands `kernel` back:
    /// the caller runs it alone and says so loudly. Needs a tokio runtime (netlink).
    pub fn new(kernel: K, settings: EbpfSettings) -> Result<Self, EbpfUnavailable<K>> {
        match Self::try_new(&settings) {
            Ok((ebpf, maps, netlink, decap_l4_udp)) => {
                let mut dataplane =
                    Self::assemble(kernel, settings, ebpf, maps, netlink, decap_l4_udp);
                let uplink = dataplane.settings.uplink.name.clone();
                match dataplane.attach(
                    program_names::UPLINK_INGRESS,
                    &uplink,
                    TcAttachType::Ingress,
                    UPLINK_LINK_PIN,
                ) {
                    Ok(()) => {
                        info!(
                            uplink = %uplink,
                            pin_dir = %dataplane.settings.pin_dir.display(),
                            fast_path = %dataplane.settings.fast_path,
                            gso_decap = decap_l4_udp,
                            "eBPF datapath loaded, uplink program attached (GSO VXLAN decapsulated in BPF: {})",
                            if decap_l4_udp { "yes, the kernel has BPF_F_ADJ_ROOM_DECAP_L4_UDP" } else { "no, this kernel lacks BPF_F_ADJ_ROOM_DECAP_L4_UDP; the vxlan device decapsulates it" }
                        );
                        remove_older_versions(&dataplane.settings.pin_dir);
                        Ok(dataplane)
                    }
                    Err(error) => Err(EbpfUnavailable {
                        kernel: dataplane.kernel,
                        error,
                    }),
                }
            }
            Err(error) => Err(EbpfUnavailable { kernel, error }),
        }
    }

    fn try_new(settings: &EbpfSettings) -> Result<(Ebpf, Maps, Netlink, bool), EbpfError> {
        let mut ebpf = load(&settings.pin_dir)?;
        let maps = Maps::take(&mut ebpf)?;
        let decap_l4_udp = probe_decap_l4_udp(&mut ebpf)?;
        let netlink = Netlink::connect().map_err(|source| EbpfError::Interface {
            name: "(netlink)".into(),
            source: io::Error::other(source.to_string()),
        })?;
        Ok((ebpf, maps, netlink, decap_l4_udp))
    }

    fn assemble(
        kernel: K,
        settings: EbpfSettings,
        ebpf: Ebpf,
        maps: Maps,
        netlink: Netlink,
        decap_l4_udp: bool,
    ) -> Self {
        // Shared with the kernel dataplane's subscription: one socket, parsed once.
        let underlay_changes = kernel.change_feed().subscribe(peers::underlay_interest);
        let mut dataplane = Self {
            kernel,
            settings,
            ebpf,
            maps,
            netlink,
            lease: None,
            bridge: None,
            vxlan_ifindex: None,
            pods: BTreeMap::new(),
            deleting: BTreeMap::new(),
            peers: BTreeMap::new(),
            source_counts: StdHashMap::new(),
            nexthops: StdHashMap::new(),
            underlay_changes,
            nexthop_scan_at: std::time::Instant::now(),
            nexthop_pending: Vec::new(),
            synced: false,
            decap_l4_udp,
            generation: 0,
        };
        // Start from a generation above anything a previous run wrote.
        dataplane.generation = dataplane.max_generation_in_maps();
        dataplane
    }

    /// Whether the kernel accepts `BPF_F_ADJ_ROOM_DECAP_L4_UDP` (probed at load).
    pub fn gso_decap_supported(&self) -> bool {
        self.decap_l4_udp
    }

    /// Current counters (summed over CPUs), indexed by [`overlay_common::stat`].
    pub fn stats(&self) -> Result<[u64; stat::COUNT as usize], EbpfError> {
        sum_stats(&self.maps.stats)
    }

    /// The pods the fast path knows (IPv4 address -> host veth index).
    pub fn endpoints(&self) -> BTreeMap<Ipv4Addr, u32> {
        self.pods
            .iter()
            .flat_map(|(index, pod)| pod.pod_ips.iter().map(move |ip| (*ip, *index)))
            .collect()
    }

    fn max_generation_in_maps(&self) -> u32 {
        let peers = self
            .maps
            .peers
            .iter()
            .filter_map(Result::ok)
            .map(|(_, v)| v.generation);
        let sources = self
            .maps
            .sources
            .iter()
            .filter_map(Result::ok)
            .map(|(_, v)| v.generation);
        peers.chain(sources).max().unwrap_or(0)
    }

    /// The bridge: `--bridge` if given, else the interface holding an address inside our
    /// subnet other than the subnet's network address (which the flannel device holds).
    fn find_bridge(&self, subnet: Ipv4Network) -> Result<Option<Bridge>, EbpfError> {
        let addrs = nix::ifaddrs::getifaddrs().map_err(|errno| EbpfError::Interface {
            name: "(all)".into(),
            source: io::Error::from(errno),
        })?;
        let mut found: Option<(String, Option<Ipv4Addr>)> = None;
        for addr in addrs {
            let ip = addr
                .address
                .as_ref()
                .and_then(|a| a.as_sockaddr_in())
                .map(|sin| sin.ip());
            let in_subnet = ip.filter(|ip| subnet.contains(*ip) && *ip != subnet.network());
            match &self.settings.bridge {
                // The named bridge, preferably with its address in our subnet.
                Some(name)
                    if *name == addr.interface_name && (found.is_none() || in_subnet.is_some()) =>
                {
                    found = Some((addr.interface_name.clone(), in_subnet));
                }
                None if in_subnet.is_some() && found.is_none() => {
                    found = Some((addr.interface_name.clone(), in_subnet));
                }
                _ => {}
            }
        }
        let Some((name, gateway)) = found else {
            return Ok(None);
        };
        let index =
            nix::net::if_::if_nametoindex(name.as_str()).map_err(|errno| EbpfError::Interface {
                name: name.clone(),
                source: io::Error::from(errno),
            })?;
        Ok(Some(Bridge {
            name,
            index,
            gateway,
        }))
    }

    /// Follows the bridge and the kernel vxlan device (appeared, re-created, gone), keeps the
    /// programs attached to the vxlan device and every pod veth, and rewrites CONFIG.
    async fn sync_devices(&mut self) -> Result<(), EbpfError> {
        let Some(lease) = self.lease.clone() else {
            return Ok(());
        };
        let bridge = self.find_bridge(lease.subnet)?;
        if bridge != self.bridge {
            match &bridge {
                Some(b) => {
                    info!(bridge = %b.name, ifindex = b.index, "pod bridge found: its veths are the pods")
                }
                None => info!("no pod bridge (yet): every pod's traffic takes the kernel path"),
            }
            self.bridge = bridge;
        }
        let vxlan_ifindex = nix::net::if_::if_nametoindex(self.settings.vxlan_device.as_str()).ok();
        if vxlan_ifindex != self.vxlan_ifindex {
            if let Some(index) = vxlan_ifindex {
                let name = self.settings.vxlan_device.clone();
                self.attach(
                    program_names::VXLAN_INGRESS,
                    &name,
                    TcAttachType::Ingress,
                    VXLAN_INGRESS_LINK_PIN,
                )?;
                self.attach(
                    program_names::VXLAN_EGRESS,
                    &name,
                    TcAttachType::Egress,
                    VXLAN_EGRESS_LINK_PIN,
                )?;
                info!(device = %name, ifindex = index, "eBPF programs attached to the vxlan device");
            }
            self.vxlan_ifindex = vxlan_ifindex;
        }
        if self.settings.fast_path != FastPath::NONE {
            ensure_conntrack_liberal();
        }
        self.sync_pods(&lease).await?;
        self.write_config(&lease)
    }

    /// What netlink says about the pods now: veths whose master is the bridge, with their
    /// peer's MAC and addresses in our subnet. A veth whose peer cannot be read is left out
    /// (its pod's traffic takes the kernel path).
    async fn discover_pods(&self, lease: &LocalLease) -> Result<BTreeMap<u32, PodVeth>, EbpfError> {
        let mut pods = BTreeMap::new();
        let Some(bridge) = &self.bridge else {
            return Ok(pods);
        };
        let netlink_err = |what: &str| {
            let what = what.to_owned();
            move |source: crate::os::netlink::NetlinkError| EbpfError::Interface {
                name: what,
                source: io::Error::other(source.to_string()),
            }
        };
        let links: Vec<Link> = self
            .netlink
            .links()
            .await
            .map_err(netlink_err("(listing links)"))?;
        for link in links {
            if link.master != Some(bridge.index) || link.kind.as_deref() != Some("veth") {
                continue;
            }
            let (Some(peer_index), Some(nsid)) = (link.peer_index, link.peer_netnsid) else {
                continue;
            };
            if self
                .deleting
                .get(&link.index)
                .is_some_and(|(name, mac)| *name == link.name && *mac == link.mac)
            {
                continue;
            }
            // Same veth as before (index and MAC unchanged): keep what its peer said.
            if let Some(known) = self
                .pods
                .get(&link.index)
                .filter(|p| p.mac == link.mac && p.name == link.name)
            {
                pods.insert(link.index, known.clone());
                continue;
            }
            let peer = match self.netlink.link_in_netns(nsid, peer_index).await {
                Ok(Some(peer)) => peer,
                Ok(None) => continue,
                Err(err) => {
                    debug!(veth = %link.name, error = %err, "cannot read the pod side of a veth");
                    continue;
                }
            };
            let Some(pod_mac) = peer.mac else { continue };
            let pod_ips: Vec<Ipv4Addr> = match Netlink::addresses_in_netns(nsid, peer_index).await {
                Ok(addresses) => addresses
                    .iter()
                    .map(|a| a.ip())
                    .filter(|ip| lease.subnet.contains(*ip) && *ip != lease.subnet.network())
                    .collect(),
                Err(err) => {
                    debug!(veth = %link.name, error = %err, "cannot read the pod's addresses");
                    continue;
                }
            };
            if pod_ips.is_empty() {
                // No address yet (IPAM still running): looked at again next pass.
                continue;
            }
            pods.insert(
                link.index,
                PodVeth {
                    name: link.name.clone(),
                    mac: link.mac,
                    pod_mac,
                    pod_ips,
                },
            );
        }
        Ok(pods)
    }

    /// Brings the pod veths' programs and the ENDPOINTS map in line with netlink. Endpoints
    /// that went away (or changed) are removed first, with their learned flows, so an IP a
    /// new pod receives is never delivered to by the old entry.
    async fn sync_pods(&mut self, lease: &LocalLease) -> Result<(), EbpfError> {
        // A deleted pod's veth that is gone (or whose index now names another link).
        self.deleting.retain(|index, (name, _)| {
            nix::net::if_::if_nametoindex(name.as_str()).is_ok_and(|now| now == *index)
        });
        let found = self.discover_pods(lease).await?;
        if found == self.pods {
            return Ok(());
        }
        let gateway_mac = self.bridge.as_ref().and_then(|b| link_mac(&b.name));
        // 1. Gone or changed veths: forget their endpoints and flows, unpin their links.
        let stale: Vec<(u32, PodVeth)> = self
            .pods
            .iter()
            .filter(|(index, pod)| found.get(index) != Some(pod))
            .map(|(index, pod)| (*index, pod.clone()))
            .collect();
        for (index, pod) in &stale {
            for ip in &pod.pod_ips {
                self.remove_endpoint(*ip)?;
            }
            if found.get(index).is_none_or(|new| new.name != pod.name) {
                self.unpin_link(&format!("{POD_LINK_PREFIX}{}_ingress", pod.name))?;
                self.unpin_link(&format!("{POD_LINK_PREFIX}{}_egress", pod.name))?;
            }
            self.pods.remove(index);
            info!(veth = %pod.name, ips = ?pod.pod_ips, "pod gone from the fast path");
        }
        // 2. New veths: attach first (learning starts), then publish the endpoint.
        for (index, pod) in found {
            if self.pods.contains_key(&index) {
                continue;
            }
            self.attach(
                program_names::POD_INGRESS,
                &pod.name,
                TcAttachType::Ingress,
                &format!("{POD_LINK_PREFIX}{}_ingress", pod.name),
            )?;
            self.attach(
                program_names::POD_EGRESS,
                &pod.name,
                TcAttachType::Egress,
                &format!("{POD_LINK_PREFIX}{}_egress", pod.name),
            )?;
            let Some(gateway_mac) = gateway_mac else {
                continue;
            };
            for ip in &pod.pod_ips {
                // Another veth claiming the same IP: the newest wins, its flows start over.
                self.remove_endpoint(*ip)?;
                let value = Endpoint {
                    host_ifindex: index,
                    pod_mac: pod.pod_mac.into_array(),
                    gateway_mac: gateway_mac.into_array(),
                    generation: self.generation,
                };
                self.maps
                    .endpoints
                    .insert(ip.octets(), value, 0)
                    .map_err(map_err(
                        format!("adding endpoint {ip}"),
                        map_names::ENDPOINTS,
                    ))?;
            }
            info!(veth = %pod.name, ifindex = index, ips = ?pod.pod_ips, pod_mac = %pod.pod_mac, "pod on the fast path");
            self.pods.insert(index, pod);
        }
        self.sweep_endpoints()
    }

    /// A CNI DEL is about to release `ips`: their endpoints and flows go now, and the veths
    /// holding them (looked up afresh, so one the poll has not seen yet counts too) are
    /// ignored until they are gone. Returns the veths set aside.
    async fn forget_pods_holding(&mut self, ips: &[Ipv4Addr]) -> Result<Vec<String>, EbpfError> {
        let Some(lease) = self.lease.clone() else {
            return Ok(Vec::new());
        };
        let holders: Vec<(u32, PodVeth)> = self
            .discover_pods(&lease)
            .await?
            .into_iter()
            .filter(|(_, pod)| pod.pod_ips.iter().any(|ip| ips.contains(ip)))
            .collect();
        let mut names = Vec::new();
        for (index, pod) in holders {
            for ip in &pod.pod_ips {
                self.remove_endpoint(*ip)?;
            }
            self.unpin_link(&format!("{POD_LINK_PREFIX}{}_ingress", pod.name))?;
            self.unpin_link(&format!("{POD_LINK_PREFIX}{}_egress", pod.name))?;
            self.pods.remove(&index);
            info!(veth = %pod.name, ips = ?pod.pod_ips, "pod off the fast path (CNI DEL)");
            self.deleting.insert(index, (pod.name.clone(), pod.mac));
            names.push(pod.name);
        }
        for ip in ips {
            self.remove_endpoint(*ip)?;
        }
        Ok(names)
    }

    /// Deletes an endpoint and every flow learned for it.
    fn remove_endpoint(&mut self, ip: Ipv4Addr) -> Result<(), EbpfError> {
        match absent_ok(self.maps.endpoints.remove(&ip.octets())) {
            Ok(()) => {}
            Err(source) => {
                return Err(EbpfError::Map {
                    what: format!("removing endpoint {ip}"),
                    map: map_names::ENDPOINTS,
                    source: Box::new(source),
                });
            }
        }
        let flows: Vec<FlowKey> = self
            .maps
            .flows
            .keys()
            .filter_map(Result::ok)
            .filter(|key| key.pod_ip == ip.octets())
            .collect();
        for key in flows {
            absent_ok(self.maps.flows.remove(&key))
                .map_err(map_err("forgetting a learned flow", map_names::FLOWS))?;
        }
        Ok(())
    }

    /// Endpoints in the map that no known pod has (a previous run's, a pod deleted while the
    /// agent was down).
    fn sweep_endpoints(&mut self) -> Result<(), EbpfError> {
        let known = self.endpoints();
        let stale: Vec<[u8; 4]> = self
            .maps
            .endpoints
            .iter()
            .filter_map(Result::ok)
            .filter(|(ip, ep)| known.get(&Ipv4Addr::from(*ip)) != Some(&ep.host_ifindex))
            .map(|(ip, _)| ip)
            .collect();
        for ip in stale {
            debug!(ip = %Ipv4Addr::from(ip), "sweeping stale endpoint");
            self.remove_endpoint(Ipv4Addr::from(ip))?;
        }
        Ok(())
    }

    fn write_config(&mut self, lease: &LocalLease) -> Result<(), EbpfError> {
        let vtep_mac = self
            .settings
            .vtep_mac
            .or_else(|| link_mac(&self.settings.vxlan_device));
        if vtep_mac.is_none() && self.maps.config.get(&0, 0).is_ok_and(|c| c.enabled != 0) {
            warn!(device = %self.settings.vxlan_device, "no VtepMAC (the vxlan device is missing): eBPF datapath passes everything to the kernel until it is back");
        }
        let uplink = &self.settings.uplink;
        let default_gateway = Ipv4Addr::from(u32::from(lease.subnet.network()) + 1);
        let mut flags = self.settings.fast_path.config_flags();
        if self.decap_l4_udp {
            flags |= config_flags::HAVE_DECAP_L4_UDP;
        }
        let config = DatapathConfig {
            local_ip: lease.public_ip.octets(),
            subnet_addr: lease.subnet.network().octets(),
            subnet_mask: lease.subnet.mask().octets(),
            gateway_ip: self
                .bridge
                .as_ref()
                .and_then(|b| b.gateway)
                .unwrap_or(default_gateway)
                .octets(),
            vni: self.settings.vni,
            uplink_ifindex: uplink.index,
            bridge_ifindex: self.bridge.as_ref().map_or(0, |b| b.index),
            vxlan_ifindex: self.vxlan_ifindex.unwrap_or(0),
            max_inner_len: uplink.mtu.saturating_sub(VXLAN_OVERHEAD),
            vtep_mac: vtep_mac.map_or([0; 6], MacAddr6::into_array),
            udp_port_be: self.settings.port.to_be(),
            flags,
            // Without our VtepMAC we cannot build frames peers accept: stay out of the way.
            enabled: u32::from(vtep_mac.is_some()),
        };
        let current = self.maps.config.get(&0, 0).ok();
        if current != Some(config) {
            self.maps
                .config
                .set(0, config, 0)
                .map_err(map_err("writing the datapath config", map_names::CONFIG))?;
            debug!(?config, "datapath config written");
        }
        Ok(())
    }
}

impl<K: Dataplane> Dataplane for EbpfDataplane<K> {
    fn name(&self) -> &'static str {
        "ebpf"
    }

    async fn activate(&mut self, lease: &LocalLease) -> Result<(), DataplaneError> {
        self.kernel.activate(lease).await?;
        self.lease = Some(lease.clone());
        self.sync_devices().await?;
        if self.bridge.is_none() {
            warn!(subnet = %lease.subnet, "no bridge holds an address in our subnet yet; pod traffic takes the kernel path until one appears (or pass --bridge)");
        }
        Ok(())
    }

    async fn apply(&mut self, event: &PeerEvent) -> Result<(), DataplaneError> {
        self.kernel.apply(event).await?;
        match event {
            PeerEvent::Upsert(peer) => self.upsert(peer)?,
            PeerEvent::Remove(subnet) => self.remove(*subnet)?,
            PeerEvent::Snapshot(peers) => self.snapshot(peers)?,
        }
        Ok(())
    }

    async fn maintain(&mut self) -> Result<(), DataplaneError> {
        self.kernel.maintain().await?;
        self.sync_devices().await?;
        self.resolve_nexthops().await?;
        Ok(())
    }

    async fn kernel_changed(&mut self) {
        self.kernel.kernel_changed().await
    }

    fn deferred_work_due(&self) -> Option<tokio::time::Instant> {
        self.kernel.deferred_work_due()
    }

    async fn do_deferred_work(&mut self) -> Result<(), DataplaneError> {
        self.kernel.do_deferred_work().await
    }

    async fn maintain_changes(&mut self) -> Result<(), DataplaneError> {
        self.kernel.maintain_changes().await?;
        // Pods come and go without notifications we could see here (their addresses live
        // in their namespaces), and this costs the same at any number of peers.
        self.sync_devices().await?;
        self.resolve_nexthops().await?;
        Ok(())
    }

    async fn pod_notice(&mut self, notice: &PodNotice) -> Result<PodNoticeReply, DataplaneError> {
        if self.lease.is_none() {
            return Ok(PodNoticeReply::not_applied(
                "no lease yet: pods are picked up once the datapath is programmed",
            ));
        }
        match notice.op {
            PodOp::Add => {
                // The whole pass, not just the pods: the first ADD may have made the bridge.
                self.sync_devices().await?;
                let known = self.endpoints();
                let endpoints: Vec<Ipv4Addr> = notice
                    .ips
                    .iter()
                    .filter(|ip| known.contains_key(ip))
                    .copied()
                    .collect();
                let message = if endpoints.len() == notice.ips.len() {
                    format!("on the fast path: {endpoints:?}")
                } else {
                    format!(
                        "on the fast path: {endpoints:?} of {:?} (the rest is not behind the pod bridge {:?} in our subnet)",
                        notice.ips,
                        self.bridge.as_ref().map(|b| b.name.as_str())
                    )
                };
                Ok(PodNoticeReply {
                    applied: true,
                    endpoints,
                    message,
                })
            }
            PodOp::Del => {
                let veths = self.forget_pods_holding(&notice.ips).await?;
                Ok(PodNoticeReply {
                    applied: true,
                    endpoints: Vec::new(),
                    message: format!(
                        "endpoints {:?} removed; veths {veths:?} ignored until they are gone",
                        notice.ips
                    ),
                })
            }
        }
    }
}
