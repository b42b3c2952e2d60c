//! The BPF test harness shared by `ebpf_packets.rs` and `ebpf_fuzz.rs`: the test "world"
//! (addresses, MACs, ifindexes of the node, its peer and its pods), the programs loaded by the
//! agent's loader into a pin directory removed on drop, the maps set up as that world
//! (config, peers, peer sources, endpoints; flows are each file's own), one
//! BPF_PROG_TEST_RUN wrapper, and the frame builders both files use.
//!
//! Needs root (CAP_BPF, CAP_NET_ADMIN) and bpffs at /sys/fs/bpf: the shared fixtures'
//! [`PinDir`] fails loudly without root and mounts bpffs when it is missing.

#![allow(dead_code)]

use aya::{
    Ebpf, TestRun, TestRunOptions,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, lpm_trie::Key},
    programs::ProgramError,
};
use overlay_agent::dataplane::ebpf::{classifier, load};
use overlay_common::{
    DatapathConfig, Endpoint, FlowKey, FlowState, PeerInfo, PeerSource, config_flags, map_names,
    peer_flags, stat,
};
use overlay_tests::bpffs::PinDir;

pub const TC_ACT_UNSPEC: u32 = -1i32 as u32;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

pub const LOCAL_IP: [u8; 4] = [192, 168, 100, 1];
pub const PEER_IP: [u8; 4] = [192, 168, 100, 2];
/// A peer whose PeerInfo is not VALID (incomplete lease): never an encap target.
pub const INVALID_PEER_IP: [u8; 4] = [192, 168, 100, 3];
/// The peer's underlay next hop (a gateway), as the agent resolves it.
pub const NEXTHOP_IP: [u8; 4] = [192, 168, 100, 254];
pub const STRANGER_IP: [u8; 4] = [192, 168, 100, 77];
pub const LOCAL_VTEP: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];
pub const PEER_VTEP: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x02];
pub const BRIDGE_MAC: [u8; 6] = [0x02, 0xaa, 0xaa, 0xaa, 0xaa, 0x01];
pub const POD_MAC: [u8; 6] = [0x02, 0xbb, 0xbb, 0xbb, 0xbb, 0x02];
pub const OTHER_POD_MAC: [u8; 6] = [0x02, 0xbb, 0xbb, 0xbb, 0xbb, 0x04];
pub const UPLINK_MAC: [u8; 6] = [0x02, 0x11, 0x11, 0x11, 0x11, 0x01];
pub const PEER_UPLINK_MAC: [u8; 6] = [0x02, 0x22, 0x22, 0x22, 0x22, 0x02];
/// Our node's pod subnet (/24).
pub const SUBNET: [u8; 4] = [10, 5, 1, 0];
/// The valid peer's pod subnet (/24).
pub const PEER_SUBNET: [u8; 4] = [10, 5, 2, 0];
/// The incomplete peer's pod subnet (/24).
pub const INVALID_PEER_SUBNET: [u8; 4] = [10, 5, 3, 0];
pub const PORT: u16 = 8472;
pub const VNI: u32 = 1;
pub const MAX_INNER: u32 = 1450;

/// Our pod, behind the veth the program runs on (test-run's device: skb->dev is lo, ifindex
/// 1).
pub const POD_IP: [u8; 4] = [10, 5, 1, 2];
pub const HERE: u32 = 1;
/// A local pod behind another veth.
pub const OTHER_VETH_POD: [u8; 4] = [10, 5, 1, 4];
pub const OTHER_IFINDEX: u32 = 9;
/// An address in our subnet no endpoint has.
pub const UNKNOWN_POD: [u8; 4] = [10, 5, 1, 9];
/// A pod on the peer node (10.5.2.0/24).
pub const REMOTE_POD: [u8; 4] = [10, 5, 2, 3];

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const ALL_FAST: u32 =
    config_flags::FAST_RX_AFTER_DECAP | config_flags::FAST_TX | config_flags::FAST_RX_BEFORE_DECAP;

/// The local endpoints the ENDPOINTS map holds: (pod IP, host ifindex, pod MAC).
pub const ENDPOINTS: [([u8; 4], u32, [u8; 6]); 2] = [
    (POD_IP, HERE, POD_MAC),
    (OTHER_VETH_POD, OTHER_IFINDEX, OTHER_POD_MAC),
];

// struct __sk_buff (192 bytes) as test-run takes it in ctx_in / gives it back in ctx_out: it
// accepts mark and gso_segs/gso_size among few fields, and gives them back.
const SKB_LEN: usize = 192;
const SKB_MARK_OFF: usize = 8;
const SKB_GSO_SEGS_OFF: usize = 164;
const SKB_GSO_SIZE_OFF: usize = 176;

/// `CLOCK_MONOTONIC` in nanoseconds: what `bpf_ktime_get_ns` returns.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Node 10.5.1.0/24 (VNI 1, port 8472, all on ifindex 1) with the given fast-path flags.
pub fn config(flags: u32) -> DatapathConfig {
    DatapathConfig {
        local_ip: LOCAL_IP,
        subnet_addr: SUBNET,
        subnet_mask: [255, 255, 255, 0],
        gateway_ip: [10, 5, 1, 1],
        vni: VNI,
        uplink_ifindex: 1,
        bridge_ifindex: 1,
        vxlan_ifindex: 1,
        max_inner_len: MAX_INNER,
        vtep_mac: LOCAL_VTEP,
        udp_port_be: PORT.to_be(),
        flags,
        enabled: 1,
    }
}

pub fn flow_key(
    pod: [u8; 4],
    remote: [u8; 4],
    pod_port: u16,
    remote_port: u16,
    proto: u8,
) -> FlowKey {
    FlowKey {
        pod_ip: pod,
        remote_ip: remote,
        pod_port_be: pod_port.to_be(),
        remote_port_be: remote_port.to_be(),
        protocol: proto,
        _pad: [0; 3],
    }
}

pub fn peer(underlay: [u8; 4], flags: u16, nexthop: [u8; 4]) -> PeerInfo {
    PeerInfo {
        underlay_ip: underlay,
        vtep_mac: PEER_VTEP,
        flags,
        generation: 1,
        nexthop_ip: nexthop,
    }
}

/// The loaded programs and their maps.
pub struct Harness {
    pub ebpf: Ebpf,
    pub config: Array<MapData, DatapathConfig>,
    pub peers: LpmTrie<MapData, [u8; 4], PeerInfo>,
    pub sources: HashMap<MapData, [u8; 4], PeerSource>,
    pub endpoints: HashMap<MapData, [u8; 4], Endpoint>,
    pub flows: HashMap<MapData, FlowKey, FlowState>,
    pub stats: PerCpuArray<MapData, u64>,
    // Last: the maps must be closed before the directory goes (drop order is field order).
    pub _pin: PinDir,
}

impl Harness {
    /// Loads the object (every program through the verifier) and configures node
    /// 10.5.1.0/24 (all fast paths on) with one valid peer 10.5.2.0/24 (next hop
    /// [`NEXTHOP_IP`]) and one incomplete lease 10.5.3.0/24 (next hop `invalid_peer_nexthop`);
    /// only the valid peer's address may send VXLAN. Endpoints: [`ENDPOINTS`]. No flows.
    pub fn load(invalid_peer_nexthop: [u8; 4]) -> Self {
        let pin = PinDir::new();
        let mut ebpf = load(pin.path()).expect("every program loads and passes the verifier");
        let mut config_map: Array<MapData, DatapathConfig> =
            Array::try_from(ebpf.take_map(map_names::CONFIG).expect("config map")).expect("array");
        config_map
            .set(0, config(ALL_FAST), 0)
            .expect("write config");
        let mut peers: LpmTrie<MapData, [u8; 4], PeerInfo> =
            LpmTrie::try_from(ebpf.take_map(map_names::PEERS).expect("peers map")).expect("lpm");
        for (subnet, ip, flags, nexthop) in [
            (PEER_SUBNET, PEER_IP, peer_flags::VALID, NEXTHOP_IP),
            (
                INVALID_PEER_SUBNET,
                INVALID_PEER_IP,
                0,
                invalid_peer_nexthop,
            ),
        ] {
            peers
                .insert(&Key::new(24, subnet), peer(ip, flags, nexthop), 0)
                .expect("insert peer");
        }
        let mut sources: HashMap<MapData, [u8; 4], PeerSource> =
            HashMap::try_from(ebpf.take_map(map_names::PEER_SOURCES).expect("sources map"))
                .expect("hash");
        sources
            .insert(
                PEER_IP,
                PeerSource {
                    lease_count: 1,
                    generation: 1,
                },
                0,
            )
            .expect("insert source");
        let mut endpoints: HashMap<MapData, [u8; 4], Endpoint> =
            HashMap::try_from(ebpf.take_map(map_names::ENDPOINTS).expect("endpoints map"))
                .expect("hash");
        for (ip, host_ifindex, pod_mac) in ENDPOINTS {
            endpoints
                .insert(
                    ip,
                    Endpoint {
                        host_ifindex,
                        pod_mac,
                        gateway_mac: BRIDGE_MAC,
                        generation: 1,
                    },
                    0,
                )
                .expect("insert endpoint");
        }
        let flows = HashMap::try_from(ebpf.take_map(map_names::FLOWS).expect("flows map"))
            .expect("lru hash");
        let stats = PerCpuArray::try_from(ebpf.take_map(map_names::STATS).expect("stats map"))
            .expect("percpu array");
        Self {
            ebpf,
            config: config_map,
            peers,
            sources,
            endpoints,
            flows,
            stats,
            _pin: pin,
        }
    }

    pub fn set_config(&mut self, cfg: DatapathConfig) {
        self.config.set(0, cfg, 0).expect("write config");
    }

    /// Every STATS counter, summed over the CPUs.
    pub fn stats(&self) -> [u64; stat::COUNT as usize] {
        let mut out = [0u64; stat::COUNT as usize];
        for (i, v) in out.iter_mut().enumerate() {
            *v = self
                .stats
                .get(&(i as u32), 0)
                .expect("read stat")
                .iter()
                .sum();
        }
        out
    }

    /// One BPF_PROG_TEST_RUN of `program` on `packet` with skb->mark = `mark` (and a GSO
    /// packet of two segments of `gso_size`, if given): the verdict and the mark afterwards;
    /// the packet as the program left it is in `out`.
    pub fn test_run(
        &mut self,
        program: &'static str,
        packet: &[u8],
        mark: u32,
        gso_size: Option<u32>,
        out: &mut Vec<u8>,
    ) -> Result<(u32, u32), ProgramError> {
        let prog = classifier(&mut self.ebpf, program).expect("program");
        out.clear();
        out.resize(packet.len() + 256, 0);
        let mut skb_in = [0u8; SKB_LEN];
        skb_in[SKB_MARK_OFF..SKB_MARK_OFF + 4].copy_from_slice(&mark.to_ne_bytes());
        if let Some(gso) = gso_size {
            skb_in[SKB_GSO_SEGS_OFF..SKB_GSO_SEGS_OFF + 4].copy_from_slice(&2u32.to_ne_bytes());
            skb_in[SKB_GSO_SIZE_OFF..SKB_GSO_SIZE_OFF + 4].copy_from_slice(&gso.to_ne_bytes());
        }
        let mut skb_out = [0u8; SKB_LEN];
        let result = prog.test_run(TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out[..]),
            ctx_in: Some(&skb_in),
            ctx_out: Some(&mut skb_out),
            ..TestRunOptions::default()
        })?;
        out.truncate(result.data_size_out as usize);
        let mark = u32::from_ne_bytes(
            skb_out[SKB_MARK_OFF..SKB_MARK_OFF + 4]
                .try_into()
                .expect("4 bytes"),
        );
        Ok((result.return_value, mark))
    }
}

// ---------------------------------------------------------------------------------------------
// Packet building

/// The Internet checksum (RFC 1071) of `bytes`.
pub fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Recomputes the checksum of the IPv4 header at `off` (from scratch, not incrementally), if
/// the header is there and parseable.
pub fn fix_ip_checksum(p: &mut [u8], off: usize) {
    if p.len() < off + 20 || p[off] >> 4 != 4 {
        return;
    }
    let ihl = usize::from(p[off] & 0x0f) * 4;
    if ihl < 20 || p.len() < off + ihl {
        return;
    }
    p[off + 10..off + 12].copy_from_slice(&[0, 0]);
    let c = checksum(&p[off..off + ihl]);
    p[off + 10..off + 12].copy_from_slice(&c.to_be_bytes());
}

/// An Ethernet header of `ethertype`.
pub fn eth_typed(dst: [u8; 6], src: [u8; 6], ethertype: [u8; 2]) -> Vec<u8> {
    let mut e = dst.to_vec();
    e.extend_from_slice(&src);
    e.extend_from_slice(&ethertype);
    e
}

/// An Ethernet header of an IPv4 frame.
pub fn eth(dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    eth_typed(dst, src, [0x08, 0x00])
}

/// An option-less IPv4 header with DF (checksum computed) for `payload_len` bytes.
pub fn ipv4_header(
    tos: u8,
    id: u16,
    ttl: u8,
    proto: u8,
    src: [u8; 4],
    dst: [u8; 4],
    payload_len: usize,
) -> Vec<u8> {
    let mut h = vec![0x45, tos, 0, 0, 0, 0, 0x40, 0x00, ttl, proto, 0, 0];
    h[2..4].copy_from_slice(&((20 + payload_len) as u16).to_be_bytes());
    h[4..6].copy_from_slice(&id.to_be_bytes());
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    fix_ip_checksum(&mut h, 0);
    h
}

/// A UDP header (checksum 0) followed by `data`.
pub fn udp(sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
    let mut u = sport.to_be_bytes().to_vec();
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(data);
    u
}

/// The UDP checksum over the IPv4 pseudo header.
pub fn udp_checksum(src: [u8; 4], dst: [u8; 4], segment: &[u8]) -> u16 {
    let mut pseudo = src.to_vec();
    pseudo.extend_from_slice(&dst);
    pseudo.extend_from_slice(&[0, IPPROTO_UDP]);
    pseudo.extend_from_slice(&(segment.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(segment);
    match checksum(&pseudo) {
        0 => 0xffff,
        c => c,
    }
}

/// The frame delivered into a pod for an inner IPv4 packet: pod MAC <- bridge MAC, TTL - 1,
/// checksum recomputed from scratch.
pub fn delivered(inner_ip: &[u8], pod_mac: [u8; 6]) -> Vec<u8> {
    let mut f = eth(pod_mac, BRIDGE_MAC);
    f.extend_from_slice(inner_ip);
    f[14 + 8] -= 1;
    fix_ip_checksum(&mut f, 14);
    f
}
