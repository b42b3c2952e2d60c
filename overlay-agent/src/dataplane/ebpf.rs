//! The eBPF datapath (`--backend=ebpf`): TC programs on the pod bridge (encap) and the uplink
//! (decap) on top of the kernel vxlan dataplane, which stays programmed underneath so that
//! anything the programs hand on (and the whole node, if they are detached) still works.
//!
//! Maps and TCX links are pinned under a versioned directory (default
//! [`DEFAULT_PIN_DIR`]): a restarted agent attaches its new programs first and only then
//! unpins the old links, and resyncs peers by mark-and-sweep, so traffic never stops.

use std::{
    collections::{BTreeMap, HashMap as StdHashMap},
    io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, lpm_trie::Key},
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::TcAttachOptions,
    },
};
use ipnetwork::Ipv4Network;
use overlay_common::{
    DatapathConfig, PeerInfo, PeerSource, PeerSubnet, VXLAN_OVERHEAD, config_flags, map_names,
    peer_flags, program_names, stat,
};
use tracing::{debug, info, warn};

use super::{Dataplane, DataplaneError, LocalLease};
use crate::{
    iface::Uplink,
    peer::{MacAddr6, Peer, PeerEvent},
};

/// The compiled programs, built by build.rs (aya-build) and embedded in the agent.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/overlay-ebpf"));

/// Default of `--bpf-pin-dir`. The version changes whenever the maps' layout does.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/overlay/v1";

const UPLINK_LINK_PIN: &str = "link_uplink_ingress";
const BRIDGE_LINK_PIN: &str = "link_bridge_ingress";
const VXLAN_LINK_PIN: &str = "link_vxlan_egress";

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

impl From<EbpfError> for DataplaneError {
    fn from(err: EbpfError) -> Self {
        DataplaneError::Ebpf {
            what: "eBPF datapath".into(),
            reason: err.to_string(),
        }
    }
}

fn map_err(what: impl Into<String>, map: &'static str) -> impl FnOnce(MapError) -> EbpfError {
    let what = what.into();
    move |source| EbpfError::Map {
        what,
        map,
        source: Box::new(source),
    }
}

/// Loads the embedded object with its maps pinned (created or reused) under `pin_dir`, and
/// loads both programs into the kernel (this runs the verifier). Nothing is attached.
pub fn load(pin_dir: &Path) -> Result<Ebpf, EbpfError> {
    std::fs::create_dir_all(pin_dir).map_err(|source| EbpfError::PinDir {
        path: pin_dir.to_owned(),
        source,
    })?;
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(pin_dir)
        .load(EBPF_OBJECT)
        .map_err(|source| EbpfError::Load {
            pin_dir: pin_dir.to_owned(),
            source: Box::new(source),
        })?;
    for name in [
        program_names::BRIDGE_EGRESS,
        program_names::VXLAN_EGRESS,
        program_names::UPLINK_INGRESS,
    ] {
        classifier(&mut ebpf, name)?
            .load()
            .map_err(|source| EbpfError::Program {
                what: "loading (verifier)".into(),
                program: name,
                source: Box::new(source),
            })?;
    }
    Ok(ebpf)
}

/// One of our programs, as a TC classifier.
pub fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, EbpfError> {
    let program = ebpf
        .program_mut(name)
        .ok_or(EbpfError::MissingProgram(name))?;
    program.try_into().map_err(|source| EbpfError::Program {
        what: "not a TC classifier".into(),
        program: name,
        source: Box::new(source),
    })
}

/// Sums the per-CPU counters of the STATS map.
fn sum_stats(stats: &PerCpuArray<MapData, u64>) -> Result<[u64; stat::COUNT as usize], EbpfError> {
    let mut totals = [0u64; stat::COUNT as usize];
    for (index, total) in totals.iter_mut().enumerate() {
        let values = stats
            .get(&(index as u32), 0)
            .map_err(map_err("reading counters", map_names::STATS))?;
        *total = values.iter().sum();
    }
    Ok(totals)
}

/// Counters by name (`overlay_common::stat::NAMES`), as `AgentStatus::datapath_counters`
/// holds them.
pub fn counters_by_name(
    stats: &[u64; stat::COUNT as usize],
) -> std::collections::BTreeMap<String, u64> {
    stat::NAMES
        .iter()
        .zip(stats)
        .map(|(name, value)| ((*name).to_owned(), *value))
        .collect()
}

/// Reads the counters from the pinned STATS map: works while the agent is down (`status`).
pub fn read_pinned_stats(pin_dir: &Path) -> Result<[u64; stat::COUNT as usize], EbpfError> {
    let path = pin_dir.join(map_names::STATS);
    let data = MapData::from_pin(&path).map_err(map_err(
        format!(
            "opening {} (is the eBPF datapath installed?)",
            path.display()
        ),
        map_names::STATS,
    ))?;
    let map = Map::from_map_data(data).map_err(map_err("opening", map_names::STATS))?;
    let stats = PerCpuArray::try_from(map).map_err(map_err("opening", map_names::STATS))?;
    sum_stats(&stats)
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
    pub mode: DatapathMode,
}

/// Where the programs sit, i.e. how much of the node's own stack pod traffic still crosses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DatapathMode {
    /// Encapsulation at TC egress of the kernel vxlan device (after the kernel routed the
    /// packet and ran netfilter) and decapsulated packets delivered into the stack through
    /// that device's receive path. Conntrack (kube-proxy Service replies, also with
    /// br_netfilter), iptables network policies, masquerade and rp_filter behave exactly as
    /// on a flannel node; the vxlan driver's transmit/receive and the outer packet's trip
    /// through the stack are what eBPF replaces. The safe default.
    #[default]
    KernelRouted,
    /// Encapsulation at TC ingress of the pod bridge and decapsulation straight to the pod
    /// (`bpf_redirect_neigh`): pod traffic skips the node's routing and netfilter (no FORWARD
    /// policies, no conntrack confirmation). Replies of flows the Service guard remembered take
    /// the kernel path, but the guard only sees Service traffic when no NAT happens before the
    /// bridge's TC hook, i.e. `net.bridge.bridge-nf-call-iptables=0`. Fastest; opt-in.
    Direct,
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

/// Removes the pinned links and maps under `pin_dir`: detaches the programs and turns the node
/// back into a plain kernel-vxlan (flannel) node. For `--backend=vxlan|host-gw` after an eBPF
/// run, or an explicit uninstall. Returns whether anything was there.
pub fn remove_pinned(pin_dir: &Path) -> Result<bool, EbpfError> {
    match std::fs::remove_dir_all(pin_dir) {
        Ok(()) => {
            info!(pin_dir = %pin_dir.display(), "eBPF datapath removed (links and maps unpinned)");
            Ok(true)
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(EbpfError::Pin {
            what: "removing the pinned eBPF datapath",
            path: pin_dir.to_owned(),
            source,
        }),
    }
}

/// Whether br_netfilter hands bridged IPv4 to iptables in this network namespace.
fn br_netfilter_calls_iptables() -> bool {
    std::fs::read_to_string("/proc/sys/net/bridge/bridge-nf-call-iptables")
        .is_ok_and(|value| value.trim() == "1")
}

/// The MAC address of interface `name`, if it exists.
fn link_mac(name: &str) -> Option<MacAddr6> {
    nix::ifaddrs::getifaddrs()
        .ok()?
        .filter(|a| a.interface_name == name)
        .find_map(|a| a.address?.as_link_addr()?.addr())
        .map(MacAddr6::from)
}

/// The bridge the programs are attached to.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Bridge {
    name: String,
    index: u32,
    /// Its address inside our subnet (the pods' gateway), if it has one.
    gateway: Option<Ipv4Addr>,
}

struct Maps {
    peers: LpmTrie<MapData, PeerSubnet, PeerInfo>,
    sources: HashMap<MapData, [u8; 4], PeerSource>,
    config: Array<MapData, DatapathConfig>,
    stats: PerCpuArray<MapData, u64>,
}

impl Maps {
    fn take(ebpf: &mut Ebpf) -> Result<Self, EbpfError> {
        fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, EbpfError> {
            ebpf.take_map(name).ok_or(EbpfError::MissingMap(name))
        }
        Ok(Self {
            peers: LpmTrie::try_from(take(ebpf, map_names::PEERS)?)
                .map_err(map_err("opening", map_names::PEERS))?,
            sources: HashMap::try_from(take(ebpf, map_names::PEER_SOURCES)?)
                .map_err(map_err("opening", map_names::PEER_SOURCES))?,
            config: Array::try_from(take(ebpf, map_names::CONFIG)?)
                .map_err(map_err("opening", map_names::CONFIG))?,
            stats: PerCpuArray::try_from(take(ebpf, map_names::STATS)?)
                .map_err(map_err("opening", map_names::STATS))?,
        })
    }
}

/// The eBPF datapath over the kernel vxlan dataplane `K` (which it programs first, always).
pub struct EbpfDataplane<K: Dataplane> {
    kernel: K,
    settings: EbpfSettings,
    ebpf: Ebpf,
    maps: Maps,
    lease: Option<LocalLease>,
    bridge: Option<Bridge>,
    /// ifindex of the kernel vxlan device the egress program is attached to.
    vxlan_ifindex: Option<u32>,
    /// The desired peers (what the control plane last said), by subnet.
    peers: BTreeMap<Ipv4Network, Peer>,
    /// Mark-and-sweep generation written into map entries.
    generation: u32,
}

impl<K: Dataplane> EbpfDataplane<K> {
    /// Loads the programs (maps pinned under `settings.pin_dir`) and attaches the decap program
    /// to the uplink's TCX ingress. The bridge is attached once [`Dataplane::activate`] or
    /// [`Dataplane::maintain`] finds it. When the programs cannot be loaded or attached, the
    /// error hands `kernel` back: the caller runs it alone and says so loudly.
    pub fn new(kernel: K, settings: EbpfSettings) -> Result<Self, EbpfUnavailable<K>> {
        match Self::try_new(&settings) {
            Ok((ebpf, maps)) => {
                let mut dataplane = Self::assemble(kernel, settings, ebpf, maps);
                let uplink = dataplane.settings.uplink.name.clone();
                match dataplane.attach(
                    program_names::UPLINK_INGRESS,
                    &uplink,
                    TcAttachType::Ingress,
                    UPLINK_LINK_PIN,
                ) {
                    Ok(()) => {
                        info!(uplink = %uplink, pin_dir = %dataplane.settings.pin_dir.display(), "eBPF decap program attached to the uplink");
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

    fn try_new(settings: &EbpfSettings) -> Result<(Ebpf, Maps), EbpfError> {
        let mut ebpf = load(&settings.pin_dir)?;
        let maps = Maps::take(&mut ebpf)?;
        Ok((ebpf, maps))
    }

    fn assemble(kernel: K, settings: EbpfSettings, ebpf: Ebpf, maps: Maps) -> Self {
        let mut dataplane = Self {
            kernel,
            settings,
            ebpf,
            maps,
            lease: None,
            bridge: None,
            vxlan_ifindex: None,
            peers: BTreeMap::new(),
            generation: 0,
        };
        // Start from a generation above anything a previous run wrote.
        dataplane.generation = dataplane.max_generation_in_maps();
        dataplane
    }

    /// The kernel dataplane underneath.
    pub fn kernel(&self) -> &K {
        &self.kernel
    }

    /// Current counters (summed over CPUs), indexed by [`overlay_common::stat`].
    pub fn stats(&self) -> Result<[u64; stat::COUNT as usize], EbpfError> {
        sum_stats(&self.maps.stats)
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

    /// Attaches `program` to `ifname`'s TCX hook and pins the link as `pin_name`. A link
    /// pinned there before (a previous agent, or a re-created interface) is unpinned only
    /// after the new one is attached, so no packet misses the datapath.
    fn attach(
        &mut self,
        program: &'static str,
        ifname: &str,
        attach_type: TcAttachType,
        pin_name: &'static str,
    ) -> Result<(), EbpfError> {
        let pin_path = self.settings.pin_dir.join(pin_name);
        let prog = classifier(&mut self.ebpf, program)?;
        let prog_err = |what: String| {
            move |source| EbpfError::Program {
                what,
                program,
                source: Box::new(source),
            }
        };
        let link_id = prog
            .attach_with_options(
                ifname,
                attach_type,
                TcAttachOptions::TcxOrder(LinkOrder::first()),
            )
            .map_err(prog_err(format!(
                "attaching to TCX {attach_type:?} of {ifname}"
            )))?;
        let link = prog
            .take_link(link_id)
            .map_err(prog_err("taking the link".into()))?;
        let link = FdLink::try_from(link).map_err(|source| EbpfError::Pin {
            what: "the TCX link is not an fd link",
            path: pin_path.clone(),
            source: io::Error::other(source.to_string()),
        })?;
        match PinnedLink::from_pin(&pin_path) {
            Ok(old) => {
                // Dropping the unpinned old link detaches it (we hold no other reference).
                drop(old.unpin().map_err(|source| EbpfError::Pin {
                    what: "unpinning the previous link",
                    path: pin_path.clone(),
                    source,
                })?);
                debug!(path = %pin_path.display(), "previous link replaced");
            }
            Err(_) => debug!(path = %pin_path.display(), "no previous link pinned"),
        }
        // The pin keeps the link attached after we drop our handle (and across restarts).
        drop(link.pin(&pin_path).map_err(|source| EbpfError::Pin {
            what: "pinning the link",
            path: pin_path.clone(),
            source: io::Error::other(source.to_string()),
        })?);
        Ok(())
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

    /// Unpins (= detaches) a link of the other mode left by a previous run.
    fn detach_pinned(&self, pin_name: &'static str) -> Result<(), EbpfError> {
        let path = self.settings.pin_dir.join(pin_name);
        match std::fs::remove_file(&path) {
            Ok(()) => {
                info!(
                    link = pin_name,
                    "detached a program of the other datapath mode"
                );
                Ok(())
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(EbpfError::Pin {
                what: "unpinning a link of the other mode",
                path,
                source,
            }),
        }
    }

    /// Follows the bridge and the kernel vxlan device (appeared, re-created, gone), keeps the
    /// mode's program attached to them, and rewrites CONFIG.
    fn sync_bridge_and_config(&mut self) -> Result<(), EbpfError> {
        let Some(lease) = self.lease.clone() else {
            return Ok(());
        };
        let bridge = self.find_bridge(lease.subnet)?;
        let direct = self.settings.mode == DatapathMode::Direct;
        if bridge != self.bridge {
            match &bridge {
                Some(b) if direct && self.bridge.as_ref().map(|old| old.index) != Some(b.index) => {
                    let name = b.name.clone();
                    self.attach(
                        program_names::BRIDGE_EGRESS,
                        &name,
                        TcAttachType::Ingress,
                        BRIDGE_LINK_PIN,
                    )?;
                    info!(bridge = %b.name, ifindex = b.index, "eBPF encap program attached to the bridge");
                }
                Some(b) => debug!(bridge = %b.name, "bridge found"),
                None if direct => info!("bridge gone; eBPF encap waits for it to reappear"),
                None => {}
            }
            self.bridge = bridge;
        }
        let vxlan_ifindex = nix::net::if_::if_nametoindex(self.settings.vxlan_device.as_str()).ok();
        if vxlan_ifindex != self.vxlan_ifindex {
            if let (Some(index), false) = (vxlan_ifindex, direct) {
                let name = self.settings.vxlan_device.clone();
                self.attach(
                    program_names::VXLAN_EGRESS,
                    &name,
                    TcAttachType::Egress,
                    VXLAN_LINK_PIN,
                )?;
                info!(device = %name, ifindex = index, "eBPF encap program attached to the vxlan device");
            }
            self.vxlan_ifindex = vxlan_ifindex;
        }
        if direct {
            self.detach_pinned(VXLAN_LINK_PIN)?;
        } else {
            self.detach_pinned(BRIDGE_LINK_PIN)?;
        }
        self.write_config(&lease)
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
            // 0 until the kernel dataplane has created it: decap then leaves VXLAN to the kernel.
            vxlan_ifindex: self.vxlan_ifindex.unwrap_or(0),
            max_inner_len: uplink.mtu.saturating_sub(VXLAN_OVERHEAD),
            vtep_mac: vtep_mac.map_or([0; 6], MacAddr6::into_array),
            udp_port_be: self.settings.port.to_be(),
            flags: match self.settings.mode {
                DatapathMode::KernelRouted => 0,
                DatapathMode::Direct => config_flags::DECAP_DIRECT,
            },
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

    fn peer_key(subnet: Ipv4Network) -> Key<PeerSubnet> {
        Key::new(u32::from(subnet.prefix()), subnet.network().octets())
    }

    /// Writes one peer (its source first, so its VXLAN is accepted before we send to it).
    fn write_peer(&mut self, peer: &Peer) -> Result<(), EbpfError> {
        let Some(mac) = peer.vtep_mac else {
            return Ok(());
        };
        self.write_source(peer.public_ip)?;
        let value = PeerInfo {
            underlay_ip: peer.public_ip.octets(),
            vtep_mac: mac.into_array(),
            flags: peer_flags::VALID,
            generation: self.generation,
        };
        self.maps
            .peers
            .insert(&Self::peer_key(peer.subnet), value, 0)
            .map_err(map_err(
                format!("adding peer {}", peer.subnet),
                map_names::PEERS,
            ))?;
        debug!(subnet = %peer.subnet, public_ip = %peer.public_ip, "peer written");
        Ok(())
    }

    /// How many desired peers use `ip` as their underlay address.
    fn source_count(&self, ip: Ipv4Addr) -> u32 {
        self.peers
            .values()
            .filter(|p| p.public_ip == ip && p.vtep_mac.is_some())
            .count() as u32
    }

    /// Writes (count > 0) or deletes (count == 0) the PEER_SOURCES entry of `ip`.
    fn write_source(&mut self, ip: Ipv4Addr) -> Result<(), EbpfError> {
        let count = self.source_count(ip);
        if count == 0 {
            match self.maps.sources.remove(&ip.octets()) {
                Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
                Err(source) => Err(EbpfError::Map {
                    what: format!("removing peer source {ip}"),
                    map: map_names::PEER_SOURCES,
                    source: Box::new(source),
                }),
            }
        } else {
            let value = PeerSource {
                lease_count: count,
                generation: self.generation,
            };
            self.maps
                .sources
                .insert(ip.octets(), value, 0)
                .map_err(map_err(
                    format!("adding peer source {ip}"),
                    map_names::PEER_SOURCES,
                ))
        }
    }

    fn remove_peer_entry(&mut self, subnet: Ipv4Network) -> Result<(), EbpfError> {
        match self.maps.peers.remove(&Self::peer_key(subnet)) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(EbpfError::Map {
                what: format!("removing peer {subnet}"),
                map: map_names::PEERS,
                source: Box::new(source),
            }),
        }
    }

    fn upsert(&mut self, peer: &Peer) -> Result<(), EbpfError> {
        let previous = self.peers.insert(peer.subnet, peer.clone());
        if peer.vtep_mac.is_none() {
            // Not a vxlan lease: the kernel dataplane handles it.
            self.remove_peer_entry(peer.subnet)?;
        } else {
            self.write_peer(peer)?;
        }
        if let Some(previous) = previous.filter(|p| p.public_ip != peer.public_ip) {
            self.write_source(previous.public_ip)?;
        }
        Ok(())
    }

    fn remove(&mut self, subnet: Ipv4Network) -> Result<(), EbpfError> {
        let previous = self.peers.remove(&subnet);
        // Stop sending first, then stop accepting.
        self.remove_peer_entry(subnet)?;
        if let Some(previous) = previous {
            self.write_source(previous.public_ip)?;
        }
        Ok(())
    }

    /// Mark and sweep: upsert the desired set with a new generation, then delete whatever the
    /// maps hold that is not in it (entries from before a restart included). Never clears.
    fn snapshot(&mut self, peers: &[Peer]) -> Result<(), EbpfError> {
        self.generation = self.generation.wrapping_add(1);
        self.peers = peers.iter().map(|p| (p.subnet, p.clone())).collect();
        for peer in peers {
            self.write_peer(peer)?;
        }
        let stale_peers: Vec<Key<PeerSubnet>> = self
            .maps
            .peers
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| v.generation != self.generation)
            .map(|(k, _)| k)
            .collect();
        for key in stale_peers {
            let subnet = Ipv4Network::new(Ipv4Addr::from(key.data()), key.prefix_len() as u8);
            debug!(?subnet, "sweeping stale peer");
            match self.maps.peers.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(source) => {
                    return Err(EbpfError::Map {
                        what: "sweeping a stale peer".into(),
                        map: map_names::PEERS,
                        source: Box::new(source),
                    });
                }
            }
        }
        let desired: StdHashMap<[u8; 4], ()> = self
            .peers
            .values()
            .filter(|p| p.vtep_mac.is_some())
            .map(|p| (p.public_ip.octets(), ()))
            .collect();
        let stale_sources: Vec<[u8; 4]> = self
            .maps
            .sources
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !desired.contains_key(k))
            .collect();
        for key in stale_sources {
            debug!(source = %Ipv4Addr::from(key), "sweeping stale peer source");
            match self.maps.sources.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(source) => {
                    return Err(EbpfError::Map {
                        what: "sweeping a stale peer source".into(),
                        map: map_names::PEER_SOURCES,
                        source: Box::new(source),
                    });
                }
            }
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
        self.sync_bridge_and_config()?;
        if self.settings.mode == DatapathMode::Direct && br_netfilter_calls_iptables() {
            warn!(
                "direct eBPF mode with net.bridge.bridge-nf-call-iptables=1: DNAT (kube-proxy Services) happens before the bridge program, whose fast path then skips conntrack, and Service replies break; use the default (kernel-routed) mode or set the sysctl to 0"
            );
        }
        if self.bridge.is_none() && self.settings.mode == DatapathMode::Direct {
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
        self.sync_bridge_and_config()?;
        Ok(())
    }
}
