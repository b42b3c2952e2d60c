//! Issue 8, "Bad packets": a deterministic fuzz of every program in the eBPF object through
//! BPF_PROG_TEST_RUN, and the anti-spoof filter on a real veth link.
//!
//! The fuzz feeds each program the same stream of distinct packets (random bytes, and valid
//! templates mutated: truncated headers, bad lengths, odd VXLAN flags, IP options, fragments,
//! wrong VNI/port, non-peer sources, huge and tiny sizes) and checks for every run:
//! - the test-run syscall succeeds, except for inputs the kernel refuses before running the
//!   program (measured in `test_run_input_limits`, and then required to be exactly those);
//! - the verdict is one of pass (TCX_NEXT), drop or redirect;
//! - a redirect happens only for a well-formed packet the program owns (an oracle written from
//!   the design, stricter than the programs: IPv4 header sanity as the kernel's ip_rcv checks
//!   it, VXLAN header as the kernel vxlan device accepts it), with the expected output bytes;
//! - a pass leaves the packet byte for byte untouched;
//! - every outcome is counted: per batch, the STATS deltas sum to the number of runs, by
//!   action (pass_* = passes, drop_* = drops, encap/decap = redirects, bytes included), and
//!   on a sample, exactly one reason counter moves per run.
//!
//! Seed: `OVERLAY_FUZZ_SEED` (default fixed, printed); count: `OVERLAY_FUZZ_PACKETS`
//! (default 1,000,000 run by each program; inputs test-run refuses are extra). Needs root and bpffs: fails loudly otherwise.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use aya::{
    Ebpf, TestRun, TestRunOptions,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, lpm_trie::Key},
    programs::{LinkOrder, Program, ProgramError, TcAttachType, tc::TcAttachOptions},
};
use overlay_agent::dataplane::ebpf::{classifier, load};
use overlay_common::{
    DatapathConfig, PeerInfo, PeerSource, config_flags, map_names, peer_flags, program_names, stat,
};
use overlay_tests::{netns::NetNs, wait_until};
use rand::{Rng, SeedableRng, rngs::StdRng};

const TC_ACT_UNSPEC: u32 = -1i32 as u32;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

const LOCAL_IP: [u8; 4] = [192, 168, 100, 1];
const PEER_IP: [u8; 4] = [192, 168, 100, 2];
/// A peer whose PeerInfo is not VALID (incomplete lease): never an encap target.
const INVALID_PEER_IP: [u8; 4] = [192, 168, 100, 3];
const STRANGER_IP: [u8; 4] = [192, 168, 100, 77];
const LOCAL_VTEP: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];
const PEER_VTEP: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x02];
const BRIDGE_MAC: [u8; 6] = [0x02, 0xaa, 0xaa, 0xaa, 0xaa, 0x01];
const POD_MAC: [u8; 6] = [0x02, 0xbb, 0xbb, 0xbb, 0xbb, 0x02];
const UPLINK_MAC: [u8; 6] = [0x02, 0x11, 0x11, 0x11, 0x11, 0x01];
const PEER_UPLINK_MAC: [u8; 6] = [0x02, 0x22, 0x22, 0x22, 0x22, 0x02];
const SUBNET: [u8; 4] = [10, 5, 1, 0];
const PEER_SUBNET: [u8; 4] = [10, 5, 2, 0];
const INVALID_PEER_SUBNET: [u8; 4] = [10, 5, 3, 0];
const PORT: u16 = 8472;
const VNI: u32 = 1;
const MAX_INNER: usize = 1450;

/// The programs this oracle knows. The object must hold exactly these: a new program (e.g.
/// an XDP filter) fails the test until it is added here, so "every program" stays true.
const PROGRAMS: [&str; 3] = [
    program_names::BRIDGE_EGRESS,
    program_names::VXLAN_EGRESS,
    program_names::UPLINK_INGRESS,
];

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the fuzz loads BPF programs and must run as root (CAP_BPF, CAP_NET_ADMIN)"
    );
    let mounts = std::fs::read_to_string("/proc/mounts").expect("read /proc/mounts");
    assert!(
        mounts.lines().any(|l| {
            let mut f = l.split_whitespace().skip(1);
            f.next() == Some("/sys/fs/bpf") && f.next() == Some("bpf")
        }),
        "/sys/fs/bpf is not a bpf filesystem: run `mount -t bpf bpf /sys/fs/bpf`"
    );
}

/// A unique pin directory under /sys/fs/bpf, removed (with the pinned maps) on drop.
struct PinDir(PathBuf);

impl PinDir {
    fn new() -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        Self(PathBuf::from(format!(
            "/sys/fs/bpf/ovl-fuzz-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        )))
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn config(flags: u32) -> DatapathConfig {
    DatapathConfig {
        local_ip: LOCAL_IP,
        subnet_addr: SUBNET,
        subnet_mask: [255, 255, 255, 0],
        gateway_ip: [10, 5, 1, 1],
        vni: VNI,
        uplink_ifindex: 1,
        bridge_ifindex: 1,
        vxlan_ifindex: 1,
        max_inner_len: MAX_INNER as u32,
        vtep_mac: LOCAL_VTEP,
        udp_port_be: PORT.to_be(),
        flags,
        enabled: 1,
    }
}

struct Harness {
    ebpf: Ebpf,
    config: Array<MapData, DatapathConfig>,
    stats: PerCpuArray<MapData, u64>,
    _peers: LpmTrie<MapData, [u8; 4], PeerInfo>,
    _sources: HashMap<MapData, [u8; 4], PeerSource>,
    // Last: the maps must be closed before the directory goes.
    _pin: PinDir,
}

impl Harness {
    /// Loads the object (every program through the verifier), configures node 10.5.1.0/24 with
    /// one valid peer 10.5.2.0/24 and one incomplete peer 10.5.3.0/24; only the valid peer's
    /// address may send VXLAN.
    fn new() -> Self {
        require_root();
        let pin = PinDir::new();
        let mut ebpf = load(&pin.0).expect("every program loads and passes the verifier");
        let names: Vec<String> = ebpf.programs().map(|(n, _)| n.to_string()).collect();
        let mut sorted_names = names.clone();
        sorted_names.sort();
        let mut known: Vec<String> = PROGRAMS.iter().map(|s| s.to_string()).collect();
        known.sort();
        assert_eq!(
            sorted_names, known,
            "the object's programs changed: teach this fuzz's oracle about the new ones"
        );
        for (name, program) in ebpf.programs() {
            assert!(
                matches!(program, Program::SchedClassifier(_)),
                "{name}: only TC classifiers are fuzzed so far (no XDP program in the object)"
            );
            assert!(program.fd().is_ok(), "{name} was not loaded (verifier)");
        }
        let mut config_map: Array<MapData, DatapathConfig> =
            Array::try_from(ebpf.take_map(map_names::CONFIG).expect("config map")).expect("array");
        config_map.set(0, config(0), 0).expect("write config");
        let mut peers: LpmTrie<MapData, [u8; 4], PeerInfo> =
            LpmTrie::try_from(ebpf.take_map(map_names::PEERS).expect("peers map")).expect("lpm");
        for (subnet, ip, flags) in [
            (PEER_SUBNET, PEER_IP, peer_flags::VALID),
            (INVALID_PEER_SUBNET, INVALID_PEER_IP, 0),
        ] {
            peers
                .insert(
                    &Key::new(24, subnet),
                    PeerInfo {
                        underlay_ip: ip,
                        vtep_mac: PEER_VTEP,
                        flags,
                        generation: 1,
                    },
                    0,
                )
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
        let stats = PerCpuArray::try_from(ebpf.take_map(map_names::STATS).expect("stats map"))
            .expect("percpu array");
        Self {
            ebpf,
            config: config_map,
            stats,
            _peers: peers,
            _sources: sources,
            _pin: pin,
        }
    }

    fn stats(&self) -> [u64; stat::COUNT as usize] {
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

    /// One BPF_PROG_TEST_RUN: the verdict and the packet as the program left it.
    fn run(
        &mut self,
        program: &'static str,
        packet: &[u8],
        gso_size: Option<u32>,
        out: &mut Vec<u8>,
    ) -> Result<u32, ProgramError> {
        let prog = classifier(&mut self.ebpf, program).expect("program");
        out.clear();
        out.resize(packet.len() + 256, 0);
        // struct __sk_buff (192 bytes); test-run accepts gso_segs/gso_size among few fields.
        let mut ctx = [0u8; 192];
        if let Some(gso) = gso_size {
            ctx[164..168].copy_from_slice(&2u32.to_ne_bytes());
            ctx[176..180].copy_from_slice(&gso.to_ne_bytes());
        }
        let result = prog.test_run(TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out[..]),
            ctx_in: gso_size.map(|_| &ctx[..]),
            ..TestRunOptions::default()
        })?;
        out.truncate(result.data_size_out as usize);
        Ok(result.return_value)
    }
}

// ---------------------------------------------------------------------------------------------
// Packet building

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn ipv4_header(src: [u8; 4], dst: [u8; 4], proto: u8, ttl: u8, payload_len: usize) -> Vec<u8> {
    let tot = (20 + payload_len) as u16;
    let mut h = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, ttl, proto, 0, 0];
    h[2..4].copy_from_slice(&tot.to_be_bytes());
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

fn eth(dst: [u8; 6], src: [u8; 6], proto: [u8; 2]) -> Vec<u8> {
    let mut e = dst.to_vec();
    e.extend_from_slice(&src);
    e.extend_from_slice(&proto);
    e
}

/// `pick!(rng, [(weight, value), ...])`: a weighted choice. A macro so that the values may
/// themselves draw from `rng` (the table is built before the choice borrows it).
macro_rules! pick {
    ($rng:expr, [$(($w:expr, $v:expr)),* $(,)?] $(,)?) => {{
        let table = [$(($w, $v)),*];
        pick_from($rng, &table)
    }};
}

fn pick_from<T: Copy>(rng: &mut StdRng, weighted: &[(u32, T)]) -> T {
    let total: u32 = weighted.iter().map(|(w, _)| w).sum();
    let mut x = rng.random_range(0..total);
    for (w, v) in weighted {
        if x < *w {
            return *v;
        }
        x -= w;
    }
    unreachable!()
}

fn random_ip(rng: &mut StdRng) -> [u8; 4] {
    rng.random()
}

/// An IPv4 packet (header + L4 + payload) with a consistent header.
fn ip_packet(rng: &mut StdRng, src: [u8; 4], dst: [u8; 4], max_payload: usize) -> Vec<u8> {
    let proto = pick!(rng, [(5, 17u8), (4, 6), (1, 1), (1, rng.random())]);
    let ttl = pick!(rng, [(8, 64u8), (1, 1), (1, 0), (1, 2), (1, rng.random())]);
    let payload_len = if rng.random_bool(0.8) {
        rng.random_range(0..=64.min(max_payload))
    } else {
        rng.random_range(0..=max_payload)
    };
    let l4_len = match proto {
        17 => 8,
        6 => 20,
        1 => 8,
        _ => 0,
    };
    let mut l4 = vec![0u8; l4_len + payload_len];
    rng.fill(&mut l4[..]);
    if proto == 17 {
        let len = l4.len() as u16;
        l4[4..6].copy_from_slice(&len.to_be_bytes());
        l4[6..8].copy_from_slice(&[0, 0]);
    }
    let mut p = ipv4_header(src, dst, proto, ttl, l4.len());
    p.extend_from_slice(&l4);
    p
}

/// A pod's frame as it reaches the bridge: to the gateway MAC, towards some address.
fn pod_frame(rng: &mut StdRng, max: usize) -> Vec<u8> {
    let dst_mac = pick!(
        rng,
        [
            (18, BRIDGE_MAC),
            (1, [0xff; 6]),
            (1, [0x01, 0, 0x5e, 0, 0, 1]),
        ],
    );
    let dst = pick!(
        rng,
        [
            (6, [10, 5, 2, 3]),
            (1, [10, 5, 2, 255]),
            (1, [10, 5, 3, 4]),
            (1, [10, 5, 1, 9]),
            (1, [10, 96, 0, 10]),
            (1, random_ip(rng)),
        ],
    );
    let src = pick!(rng, [(9, [10, 5, 1, 2]), (1, random_ip(rng))]);
    let mut f = eth(dst_mac, POD_MAC, [0x08, 0x00]);
    f.extend(ip_packet(rng, src, dst, max - 34));
    f
}

/// What the kernel hands flannel.1 after routing (inner Ethernet from the permanent neighbour).
fn routed_frame(rng: &mut StdRng, max: usize) -> Vec<u8> {
    let dst = pick!(
        rng,
        [
            (6, [10, 5, 2, 3]),
            (1, [10, 5, 3, 4]),
            (1, [10, 5, 1, 9]),
            (1, random_ip(rng)),
        ],
    );
    let mut f = eth(PEER_VTEP, LOCAL_VTEP, [0x08, 0x00]);
    f.extend(ip_packet(rng, [10, 5, 1, 2], dst, max - 34));
    f
}

/// VXLAN as a flannel node sends it, from a peer or not, for us or not.
fn vxlan_frame(rng: &mut StdRng, max: usize) -> Vec<u8> {
    let inner_dst = pick!(
        rng,
        [
            (8, [10, 5, 1, 2]),
            (1, [10, 5, 1, 1]),
            (1, [10, 5, 1, 0]),
            (1, [10, 5, 1, 255]),
            (1, [10, 5, 7, 2]),
            (1, random_ip(rng)),
        ],
    );
    let mut inner = eth(
        LOCAL_VTEP,
        PEER_VTEP,
        pick!(
            rng,
            [(18, [0x08, 0x00]), (1, [0x08, 0x06]), (1, rng.random())],
        ),
    );
    inner.extend(ip_packet(rng, [10, 5, 2, 3], inner_dst, max - 34 - 16 - 34));
    let src = pick!(
        rng,
        [
            (6, PEER_IP),
            (2, STRANGER_IP),
            (1, INVALID_PEER_IP),
            (1, random_ip(rng)),
        ],
    );
    let dst = pick!(rng, [(9, LOCAL_IP), (1, random_ip(rng))]);
    let dport = pick!(rng, [(9, PORT), (1, 4789), (1, rng.random())]);
    let flags = pick!(rng, [(9, 0x08u8), (1, rng.random()), (1, 0x88), (1, 0)]);
    let vni = pick!(rng, [(9, VNI), (1, 2), (1, rng.random_range(0..1 << 24))]);
    let mut udp = rng.random_range(32768u16..61000).to_be_bytes().to_vec();
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&((8 + 8 + inner.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(&[flags, 0, 0, 0]);
    udp.extend_from_slice(&(vni << 8).to_be_bytes());
    if rng.random_bool(0.05) {
        // Reserved fields set (GBP-style group policy, or garbage).
        let i = pick!(rng, [(3, 9usize), (1, 10), (1, 11), (1, 15)]);
        udp[i] = rng.random_range(1..=255);
    }
    udp.extend(inner);
    let mut f = eth(UPLINK_MAC, PEER_UPLINK_MAC, [0x08, 0x00]);
    f.extend(ipv4_header(src, dst, 17, 64, udp.len()));
    f.extend(udp);
    f
}

/// Not IPv4 at all, or wrapped in something we do not parse.
fn other_l2(rng: &mut StdRng, max: usize) -> Vec<u8> {
    let kind = rng.random_range(0..4);
    let mut f = match kind {
        0 => eth([0xff; 6], PEER_UPLINK_MAC, [0x08, 0x06]),
        1 => eth(UPLINK_MAC, PEER_UPLINK_MAC, [0x86, 0xdd]),
        2 => {
            // 802.1Q-tagged VXLAN from a peer.
            let mut f = eth(UPLINK_MAC, PEER_UPLINK_MAC, [0x81, 0x00]);
            f.extend_from_slice(&[0, 5, 0x08, 0x00]);
            f.extend(vxlan_frame(rng, max - 4).split_off(14));
            return f;
        }
        _ => eth(UPLINK_MAC, PEER_UPLINK_MAC, rng.random()),
    };
    let len = rng.random_range(0..=max.min(200) - 14);
    let mut body = vec![0u8; len];
    rng.fill(&mut body[..]);
    f.extend(body);
    f
}

fn random_bytes(rng: &mut StdRng, max: usize) -> Vec<u8> {
    let len = pick!(
        rng,
        [
            (6, rng.random_range(0..=128)),
            (2, rng.random_range(0..=max)),
            (1, rng.random_range(max - 16..=max + 16)),
        ],
    );
    let mut p = vec![0u8; len];
    rng.fill(&mut p[..]);
    if p.len() >= 14 && rng.random_bool(0.7) {
        p[12..14].copy_from_slice(&[0x08, 0x00]);
        if p.len() >= 15 && rng.random_bool(0.5) {
            p[14] = 0x45;
        }
    }
    p
}

/// Offsets where headers start in a VXLAN frame (and where truncation is most interesting).
const BOUNDARIES: [usize; 9] = [0, 12, 14, 34, 42, 50, 64, 84, 92];

/// Recomputes the IPv4 header checksum at `off` if the header is there and parseable.
fn fix_ip_checksum(p: &mut [u8], off: usize) {
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

/// Offset of the inner IPv4 header when the outer header has no options.
const INNER_IP: usize = 64;

fn mutate(rng: &mut StdRng, p: &mut Vec<u8>, max: usize) {
    let n = pick!(
        rng,
        [(3, 0usize), (4, 1), (2, 2), (1, rng.random_range(3..8))],
    );
    for _ in 0..n {
        // An IP header to mutate: outer (14) or inner (64).
        let ip = if rng.random_bool(0.6) { 14 } else { INNER_IP };
        match rng.random_range(0..12) {
            0 => {
                // Truncate, mostly around a header boundary.
                let len = if rng.random_bool(0.7) {
                    let b = BOUNDARIES[rng.random_range(0..BOUNDARIES.len())] as i64;
                    (b + rng.random_range(-3..=3)).max(0) as usize
                } else {
                    rng.random_range(0..=p.len())
                };
                p.truncate(len);
            }
            1 | 2 => {
                // Random bytes in the headers.
                if !p.is_empty() {
                    let off = rng.random_range(0..p.len().min(100));
                    p[off] = rng.random();
                }
            }
            3 => {
                if !p.is_empty() {
                    let off = rng.random_range(0..p.len());
                    p[off] ^= 1 << rng.random_range(0..8);
                }
            }
            4 => {
                // Bad total length.
                if p.len() >= ip + 4 {
                    let v: u16 = pick!(
                        rng,
                        [
                            (1, 0),
                            (1, 19),
                            (1, (p.len() - ip) as u16 + 1),
                            (1, (p.len() - ip) as u16 - 1),
                            (1, 0xffff),
                            (1, rng.random()),
                        ],
                    );
                    p[ip + 2..ip + 4].copy_from_slice(&v.to_be_bytes());
                }
            }
            5 => {
                // Odd header length / version.
                if p.len() > ip {
                    p[ip] = pick!(
                        rng,
                        [
                            (3, 0x40 | rng.random_range(0..16)),
                            (1, 0x65),
                            (1, rng.random()),
                        ],
                    );
                }
            }
            6 => {
                // Fragments: MF, an offset, or DF only (not a fragment).
                if p.len() >= ip + 8 {
                    let v: u16 = pick!(
                        rng,
                        [
                            (2, 0x2000),
                            (2, rng.random_range(1..0x2000)),
                            (1, 0x4000),
                            (1, rng.random()),
                        ],
                    );
                    p[ip + 6..ip + 8].copy_from_slice(&v.to_be_bytes());
                }
            }
            7 => {
                // IP options: insert 4..40 bytes after the fixed header, ihl and length fixed.
                if p.len() >= ip + 20 && p[ip] == 0x45 {
                    let words = rng.random_range(1..=10usize);
                    let mut opts = vec![1u8; words * 4]; // NOPs
                    if rng.random_bool(0.5) {
                        rng.fill(&mut opts[..]);
                    }
                    p.splice(ip + 20..ip + 20, opts);
                    p[ip] = 0x45 + words as u8;
                    let tot =
                        u16::from_be_bytes([p[ip + 2], p[ip + 3]]).wrapping_add((words * 4) as u16);
                    p[ip + 2..ip + 4].copy_from_slice(&tot.to_be_bytes());
                }
            }
            8 => {
                // VXLAN header fields: flags, reserved bits, VNI, the byte after the VNI.
                if p.len() >= 50 {
                    let off = pick!(rng, [(3, 42usize), (1, 43), (1, 45), (2, 48), (1, 49)]);
                    p[off] = rng.random();
                }
            }
            9 => {
                // Ports and UDP length.
                if p.len() >= 42 {
                    let off = pick!(rng, [(2, 36usize), (1, 38), (1, 34)]);
                    let v: u16 = pick!(
                        rng,
                        [(1, PORT), (1, 4789), (1, PORT + 1), (2, rng.random())],
                    );
                    p[off..off + 2].copy_from_slice(&v.to_be_bytes());
                }
            }
            10 => {
                // Trailing bytes beyond the IP datagram (Ethernet padding or garbage).
                let extra = rng.random_range(1..=64usize);
                let start = p.len().min(max);
                p.resize((start + extra).min(max).max(start), 0);
                if rng.random_bool(0.5) {
                    rng.fill(&mut p[start..]);
                }
            }
            _ => {
                // Addresses: source/destination swapped for strangers or random ones.
                if p.len() >= ip + 20 {
                    let off = ip + if rng.random_bool(0.5) { 12 } else { 16 };
                    let a = pick!(
                        rng,
                        [
                            (1, PEER_IP),
                            (1, STRANGER_IP),
                            (1, LOCAL_IP),
                            (1, [10, 5, 1, 2]),
                            (1, [10, 5, 2, 3]),
                            (1, random_ip(rng)),
                        ],
                    );
                    p[off..off + 4].copy_from_slice(&a);
                }
            }
        }
    }
    // Mostly keep the checksums right, so mutated packets look valid to a checksum filter.
    if rng.random_bool(0.7) {
        fix_ip_checksum(p, 14);
        fix_ip_checksum(p, INNER_IP);
    }
}

/// Grows a frame towards `max` bytes, keeping every length field consistent.
fn huge(p: &mut Vec<u8>, target: usize) {
    if p.len() >= target || p.len() < 34 {
        return;
    }
    let extra = target - p.len();
    p.resize(target, 0x5a);
    for (ip, udp) in [(14usize, Some(34usize)), (INNER_IP, None)] {
        if p.len() >= ip + 20 && p[ip] == 0x45 {
            let tot = u16::from_be_bytes([p[ip + 2], p[ip + 3]]).wrapping_add(extra as u16);
            p[ip + 2..ip + 4].copy_from_slice(&tot.to_be_bytes());
            fix_ip_checksum(p, ip);
            if let Some(u) = udp
                && p[ip + 9] == 17
            {
                let l = u16::from_be_bytes([p[u + 4], p[u + 5]]).wrapping_add(extra as u16);
                p[u + 4..u + 6].copy_from_slice(&l.to_be_bytes());
            }
        }
    }
}

struct Case {
    packet: Vec<u8>,
    gso: Option<u32>,
}

fn generate(rng: &mut StdRng, max: usize) -> Case {
    let mut p = match rng.random_range(0..20) {
        0..=4 => pod_frame(rng, max),
        5..=7 => routed_frame(rng, max),
        8..=15 => vxlan_frame(rng, max),
        16 => other_l2(rng, max),
        _ => random_bytes(rng, max),
    };
    if rng.random_bool(0.03) {
        let target = pick!(
            rng,
            [
                (2, MAX_INNER + 14),
                (2, MAX_INNER + 15),
                (1, MAX_INNER + 64),
                (1, MAX_INNER + 65),
                (2, rng.random_range(1500..=max)),
                (1, max),
            ],
        );
        huge(&mut p, target);
    }
    mutate(rng, &mut p, max + 16);
    let gso = rng.random_bool(0.02).then(|| rng.random_range(1..=1500));
    Case { packet: p, gso }
}

// ---------------------------------------------------------------------------------------------
// The oracle: when may a program redirect a packet?

fn be16(p: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([p[off], p[off + 1]])
}

fn ip4(p: &[u8], off: usize) -> [u8; 4] {
    p[off..off + 4].try_into().expect("4 bytes")
}

/// A sane IPv4 header at `off` (what ip_rcv checks): returns (header length, total length).
fn sane_ipv4(p: &[u8], off: usize) -> Result<(usize, usize), String> {
    let which = if off == 14 { "outer/only" } else { "inner" };
    sane_ipv4_inner(p, off).map_err(|e| format!("{which} {e}"))
}

fn sane_ipv4_inner(p: &[u8], off: usize) -> Result<(usize, usize), &'static str> {
    if p.len() < off + 20 {
        return Err("IPv4 header truncated");
    }
    if p[off] >> 4 != 4 {
        return Err("IP version is not 4");
    }
    let ihl = usize::from(p[off] & 0x0f) * 4;
    if ihl < 20 {
        return Err("IPv4 ihl < 5");
    }
    if p.len() < off + ihl {
        return Err("IPv4 options beyond the packet");
    }
    let tot = usize::from(be16(p, off + 2));
    if tot < ihl {
        return Err("IPv4 total length shorter than its header");
    }
    if off + tot > p.len() {
        return Err("IPv4 total length beyond the packet");
    }
    if checksum(&p[off..off + ihl]) != 0 {
        return Err("IPv4 header checksum wrong");
    }
    Ok((ihl, tot))
}

fn is_fragment(p: &[u8], off: usize) -> bool {
    be16(p, off + 6) & 0x3fff != 0
}

fn in_subnet(a: [u8; 4], net: [u8; 4]) -> bool {
    a[..3] == net[..3]
}

fn is_local_pod(a: [u8; 4]) -> bool {
    in_subnet(a, SUBNET) && a[3] != 0 && a[3] != 1 && a[3] != 255
}

/// Whether an encap program may redirect this packet; `Err` says why not.
fn encap_allowed(program: &str, p: &[u8], gso: Option<u32>) -> Result<(), String> {
    let bridge = program == program_names::BRIDGE_EGRESS;
    if p.len() < 14 || p[12..14] != [0x08, 0x00] {
        return Err("not IPv4".into());
    }
    if bridge && p[0] & 1 != 0 {
        return Err("multicast/broadcast destination MAC".into());
    }
    sane_ipv4(p, 14)?;
    if is_fragment(p, 14) {
        return Err("fragment".into());
    }
    let dst = ip4(p, 30);
    if bridge && in_subnet(dst, SUBNET) {
        return Err("destination in our own subnet".into());
    }
    if !in_subnet(dst, PEER_SUBNET) {
        return Err("destination not in a valid peer's subnet".into());
    }
    if bridge && p[22] <= 1 {
        return Err("TTL would expire".into());
    }
    if p.len() - 14 > MAX_INNER && gso.unwrap_or(0) == 0 {
        return Err("larger than the underlay MTU".into());
    }
    Ok(())
}

/// Whether the decap program may redirect this packet; `Err` says why not.
fn decap_allowed(p: &[u8], gso: Option<u32>) -> Result<(), String> {
    if p.len() < 14 || p[12..14] != [0x08, 0x00] {
        return Err("not IPv4".into());
    }
    let (ihl, tot) = sane_ipv4(p, 14)?;
    if ihl != 20 {
        return Err("outer IP options".into());
    }
    if p[23] != 17 {
        return Err("outer protocol not UDP".into());
    }
    if ip4(p, 30) != LOCAL_IP {
        return Err("outer destination not us".into());
    }
    if is_fragment(p, 14) {
        return Err("outer fragment".into());
    }
    if ip4(p, 26) != PEER_IP {
        return Err("outer source holds no lease".into());
    }
    if tot < 20 + 8 + 8 + 14 + 20 {
        return Err("outer datagram too short for VXLAN + inner IPv4".into());
    }
    if be16(p, 36) != PORT {
        return Err("not our UDP port".into());
    }
    let udp_len = usize::from(be16(p, 38));
    if udp_len != tot - 20 {
        return Err("UDP length disagrees with the IP total length".into());
    }
    // As the kernel vxlan device (no GBP/GPE/RCO) accepts it: exactly the I flag, reserved
    // bits zero, our VNI.
    if p[42] != 0x08 {
        return Err("VXLAN flags other than exactly I".into());
    }
    if p[43..46] != [0, 0, 0] || p[49] != 0 {
        return Err("VXLAN reserved bits set".into());
    }
    if p[46..49] != (VNI << 8).to_be_bytes()[..3] {
        return Err("not our VNI".into());
    }
    if p[62..64] != [0x08, 0x00] {
        return Err("inner not IPv4".into());
    }
    // The kernel device hands the stack only frames to its own MAC for routing (ip_rcv drops
    // PACKET_OTHERHOST, ip_forward anything but PACKET_HOST).
    if p[50..56] != LOCAL_VTEP {
        return Err("inner destination MAC is not our VtepMAC".into());
    }
    let (_, inner_tot) = sane_ipv4(&p[..14 + tot], INNER_IP)?;
    if INNER_IP + inner_tot > 14 + tot {
        return Err("inner datagram beyond the outer one".into());
    }
    if !is_local_pod(ip4(p, INNER_IP + 16)) {
        return Err("inner destination not a local pod".into());
    }
    if is_fragment(p, INNER_IP) {
        return Err("inner fragment".into());
    }
    if p[INNER_IP + 8] <= 1 {
        return Err("inner TTL would expire".into());
    }
    if gso.unwrap_or(0) != 0 {
        return Err("GSO packet".into());
    }
    Ok(())
}

/// Whether the decap program may drop this packet as spoofed: VXLAN to our port, address and
/// VNI (the first fragment, or with IP options, included) from a source that holds no lease.
fn is_spoof_candidate(p: &[u8]) -> bool {
    if p.len() < 34 || p[12..14] != [0x08, 0x00] || p[14] >> 4 != 4 {
        return false;
    }
    let ihl = usize::from(p[14] & 0x0f) * 4;
    let udp = 14 + ihl;
    ihl >= 20
        && p[23] == 17
        && ip4(p, 30) == LOCAL_IP
        && ip4(p, 26) != PEER_IP
        && be16(p, 20) & 0x1fff == 0
        && p.len() >= udp + 16
        && be16(p, udp + 2) == PORT
        && p[udp + 8] & 0x08 != 0
        && p[udp + 12..udp + 15] == (VNI << 8).to_be_bytes()[..3]
}

/// VXLAN from a source without a lease that the kernel's vxlan device would accept (once
/// reassembled, for a first fragment) if the program handed it on: passing it is a hole in
/// the anti-spoof filter. `Some(how)` describes the packet.
fn spoof_the_kernel_would_take(p: &[u8]) -> Option<&'static str> {
    if !is_spoof_candidate(p) || sane_ipv4(p, 14).is_err() {
        return None;
    }
    let frag = be16(p, 20);
    let ihl = usize::from(p[14] & 0x0f) * 4;
    Some(if frag & 0x2000 != 0 {
        "first fragment"
    } else if ihl > 20 {
        "IP options"
    } else {
        "plain"
    })
}

/// Checks a redirect's output bytes.
fn check_redirect_output(program: &str, p: &[u8], out: &[u8], direct: bool) -> Result<(), String> {
    if program == program_names::UPLINK_INGRESS {
        if !direct {
            if out != &p[50..] {
                return Err("decap output is not the inner frame".into());
            }
        } else {
            if out.len() != p.len() - 50 || out[..14] != p[..14] {
                return Err("direct decap: outer Ethernet not kept".into());
            }
            let mut expect = p[64..].to_vec();
            expect[8] -= 1;
            expect[10..12].copy_from_slice(&[0, 0]);
            let ihl = usize::from(expect[0] & 0x0f) * 4;
            let c = checksum(&expect[..ihl]);
            expect[10..12].copy_from_slice(&c.to_be_bytes());
            if out[14..] != expect[..] {
                return Err("direct decap: inner packet not routed (TTL-1, checksum)".into());
            }
        }
        return Ok(());
    }
    if out.len() != p.len() + 50 || out[..14] != p[..14] {
        return Err("encap: length or outer Ethernet wrong".into());
    }
    if checksum(&out[14..34]) != 0
        || out[14] != 0x45
        || usize::from(be16(out, 16)) != p.len() - 14 + 50
        || out[20..24] != [0, 0, 64, 17]
        || ip4(out, 26) != LOCAL_IP
        || ip4(out, 30) != PEER_IP
    {
        return Err(format!("encap: outer IPv4 wrong: {:02x?}", &out[14..34]));
    }
    if be16(out, 36) != PORT
        || usize::from(be16(out, 38)) != p.len() - 14 + 30
        || out[42..50] != [0x08, 0, 0, 0, 0, 0, 1, 0]
        || out[50..56] != PEER_VTEP
        || out[56..62] != LOCAL_VTEP
        || out[62..64] != [0x08, 0x00]
    {
        return Err(format!(
            "encap: UDP/VXLAN/inner Ethernet wrong: {:02x?}",
            &out[34..64]
        ));
    }
    let inner = &out[64..];
    if program == program_names::BRIDGE_EGRESS {
        if inner[8] != p[22] - 1 || checksum(&inner[..usize::from(inner[0] & 0x0f) * 4]) != 0 {
            return Err("bridge encap: inner TTL/checksum not routed".into());
        }
        if inner[..8] != p[14..22] || inner[9] != p[23] || inner[12..] != p[26..] {
            return Err("bridge encap: inner packet changed beyond TTL/checksum".into());
        }
    } else if out[64..] != p[14..] {
        return Err("vxlan-device encap: inner packet changed".into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Bookkeeping

fn hex(p: &[u8]) -> String {
    p.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Default)]
struct Findings {
    /// (program, problem) -> (count, first packet as hex, gso)
    items: BTreeMap<(String, String), (u64, String, Option<u32>)>,
}

impl Findings {
    fn add(&mut self, program: &str, problem: impl Into<String>, p: &[u8], gso: Option<u32>) {
        let e = self
            .items
            .entry((program.to_string(), problem.into()))
            .or_insert((0, hex(p), gso));
        e.0 += 1;
    }
}

fn is_pass_reason(i: usize) -> bool {
    stat::NAMES[i].starts_with("pass_")
}

fn is_drop_reason(i: usize) -> bool {
    stat::NAMES[i].starts_with("drop_")
}

/// Whether test-run refuses this input before the program runs (EINVAL), as measured by
/// `test_run_input_limits` on this kernel: shorter than an Ethernet header, an IPv4 frame
/// without room for the IPv4 header (IPv6 alike), or more than a page minus skb head/tail room.
fn refused_by_test_run(p: &[u8], max: usize) -> bool {
    p.len() < 14
        || p.len() > max
        || (p[12..14] == [0x08, 0x00] && p.len() < 14 + 20)
        || (p[12..14] == [0x86, 0xdd] && p.len() < 14 + 40)
}

/// The largest packet test-run accepts for a TC program (found by bisection).
fn max_test_run_len(h: &mut Harness) -> usize {
    let mut out = Vec::new();
    let (mut ok, mut bad) = (14usize, 65536usize);
    while bad - ok > 1 {
        let mid = (ok + bad) / 2;
        let mut p = vec![0u8; mid];
        p[12..14].copy_from_slice(&[0x88, 0xb5]); // local experimental ethertype
        if h.run(program_names::UPLINK_INGRESS, &p, None, &mut out)
            .is_ok()
        {
            ok = mid;
        } else {
            bad = mid;
        }
    }
    ok
}

// ---------------------------------------------------------------------------------------------
// Tests

/// What test-run refuses before running a program: pins down `refused_by_test_run`, so the
/// fuzz can demand success for everything else.
#[test]
fn test_run_input_limits() {
    let mut h = Harness::new();
    let max = max_test_run_len(&mut h);
    println!("test-run accepts TC packets of up to {max} bytes");
    assert!(
        max >= 1500,
        "test-run limit {max} is below an MTU-sized frame"
    );
    let mut out = Vec::new();
    for program in PROGRAMS {
        for ethertype in [[0x08, 0x00], [0x86, 0xdd], [0x08, 0x06], [0x81, 0x00]] {
            for len in (0..=80).chain([max - 1, max, max + 1, max + 100]) {
                let mut p = vec![0x45u8; len];
                if len >= 14 {
                    p[12..14].copy_from_slice(&ethertype);
                }
                let before = h.stats();
                let result = h.run(program, &p, None, &mut out);
                let moved: u64 = h.stats().iter().zip(before).map(|(a, b)| a - b).sum();
                match result {
                    Ok(_) => assert!(
                        !refused_by_test_run(&p, max),
                        "{program}: test-run accepted a {len}-byte {ethertype:02x?} frame the predicate calls refused"
                    ),
                    Err(e) => {
                        assert!(
                            refused_by_test_run(&p, max),
                            "{program}: test-run failed on a {len}-byte {ethertype:02x?} frame: {e:?}"
                        );
                        assert_eq!(moved, 0, "a refused input must not have run the program");
                    }
                }
            }
        }
    }
}

#[derive(Default, Clone)]
struct Tally {
    runs: u64,
    refused: u64,
    by_verdict: BTreeMap<&'static str, u64>,
    nanos: u128,
}

#[test]
fn fuzz_every_program_with_a_million_bad_packets() {
    let seed: u64 = std::env::var("OVERLAY_FUZZ_SEED")
        .map(|s| s.parse().expect("OVERLAY_FUZZ_SEED must be a u64"))
        .unwrap_or(20_261_122);
    let packets: usize = std::env::var("OVERLAY_FUZZ_PACKETS")
        .map(|s| s.parse().expect("OVERLAY_FUZZ_PACKETS must be a count"))
        .unwrap_or(1_000_000);
    println!(
        "fuzz seed {seed} (OVERLAY_FUZZ_SEED={seed} reproduces), {packets} packets per program"
    );
    let mut h = Harness::new();
    let max = max_test_run_len(&mut h);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut findings = Findings::default();
    let mut tallies: BTreeMap<&'static str, Tally> = BTreeMap::new();
    let mut totals: BTreeMap<&'static str, [u64; stat::COUNT as usize]> = BTreeMap::new();
    let mut out = Vec::new();
    let started = Instant::now();
    const BATCH: usize = 4096;
    const SAMPLE_EVERY: usize = 31;
    let mut done = 0usize;
    let mut batch_no = 0u64;
    while done < packets {
        let n = BATCH.min(packets - done + 16);
        let cases: Vec<Case> = (0..n).map(|_| generate(&mut rng, max)).collect();
        // Mostly the default delivery, sometimes direct mode, sometimes unconfigured.
        let (cfg, mode) = match batch_no % 8 {
            3 | 6 => (config(config_flags::DECAP_DIRECT), "direct"),
            7 => (DatapathConfig::default(), "unconfigured"),
            _ => (config(0), "default"),
        };
        h.config.set(0, cfg, 0).expect("config");
        for program in PROGRAMS {
            let tally = tallies.entry(program).or_default();
            let before = h.stats();
            let (mut runs, mut passes, mut drops, mut redirects) = (0u64, 0u64, 0u64, 0u64);
            let mut redirect_bytes = 0u64;
            for (i, case) in cases.iter().enumerate() {
                let p = &case.packet;
                let sample = i % SAMPLE_EVERY == 0;
                let sample_before = sample.then(|| h.stats());
                let t = Instant::now();
                let result = h.run(program, p, case.gso, &mut out);
                tally.nanos += t.elapsed().as_nanos();
                let ret = match result {
                    Ok(ret) => ret,
                    Err(e) => {
                        if !refused_by_test_run(p, max) {
                            findings.add(program, format!("test-run failed: {e:?}"), p, case.gso);
                        }
                        tally.refused += 1;
                        continue;
                    }
                };
                runs += 1;
                let verdict = match ret {
                    TC_ACT_UNSPEC => {
                        passes += 1;
                        if out != *p {
                            findings.add(program, "pass changed the packet", p, case.gso);
                        }
                        if program == program_names::UPLINK_INGRESS
                            && mode != "unconfigured"
                            && let Some(how) = spoof_the_kernel_would_take(p)
                        {
                            findings.add(
                                program,
                                format!("spoofed VXLAN ({how}) passed to the kernel vxlan device"),
                                p,
                                case.gso,
                            );
                        }
                        "pass"
                    }
                    TC_ACT_SHOT => {
                        drops += 1;
                        if program != program_names::UPLINK_INGRESS {
                            findings.add(program, "encap dropped a packet", p, case.gso);
                        } else if mode == "unconfigured" {
                            findings.add(program, "drop while unconfigured", p, case.gso);
                        }
                        "drop"
                    }
                    TC_ACT_REDIRECT => {
                        redirects += 1;
                        let allowed = if mode == "unconfigured" {
                            Err("datapath unconfigured".to_string())
                        } else if program == program_names::UPLINK_INGRESS {
                            decap_allowed(p, case.gso)
                        } else {
                            encap_allowed(program, p, case.gso)
                        };
                        match allowed {
                            Err(why) => findings.add(
                                program,
                                format!("redirected although: {why}"),
                                p,
                                case.gso,
                            ),
                            Ok(()) => {
                                if let Err(why) =
                                    check_redirect_output(program, p, &out, mode == "direct")
                                {
                                    findings.add(program, why, p, case.gso);
                                }
                            }
                        }
                        redirect_bytes += if program == program_names::UPLINK_INGRESS {
                            (out.len() - 14) as u64
                        } else {
                            (p.len() - 14) as u64
                        };
                        "redirect"
                    }
                    other => {
                        findings.add(program, format!("unexpected verdict {other}"), p, case.gso);
                        "other"
                    }
                };
                *tally.by_verdict.entry(verdict).or_default() += 1;
                if let Some(sb) = sample_before {
                    let after = h.stats();
                    let moved: Vec<usize> = (0..stat::COUNT as usize)
                        .filter(|&i| stat::is_reason(i as u32) && after[i] != sb[i])
                        .collect();
                    let ok = moved.len() == 1 && after[moved[0]] - sb[moved[0]] == 1 && {
                        let r = moved[0];
                        match verdict {
                            "pass" => is_pass_reason(r),
                            "drop" => is_drop_reason(r),
                            "redirect" => {
                                r == stat::ENCAP_PACKETS as usize
                                    || r == stat::DECAP_PACKETS as usize
                            }
                            _ => false,
                        }
                    };
                    if !ok {
                        findings.add(
                            program,
                            format!("{verdict} counted as {moved:?}"),
                            p,
                            case.gso,
                        );
                    }
                    // Test-run can set gso_size but not gso_type, so adjust_room refuses to
                    // encapsulate those synthetic GSO skbs; any other helper error is a bug.
                    if moved == [stat::PASS_HELPER_ERROR as usize] && case.gso.is_none() {
                        findings.add(program, "helper error on a plain packet", p, case.gso);
                    }
                    if verdict == "drop"
                        && moved == [stat::DROP_UNKNOWN_SOURCE as usize]
                        && !is_spoof_candidate(p)
                    {
                        findings.add(program, "drop_unknown_source of a non-spoof", p, case.gso);
                    }
                }
            }
            let after = h.stats();
            let delta: Vec<u64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
            let reason_sum: u64 = (0..stat::COUNT as usize)
                .filter(|&i| stat::is_reason(i as u32))
                .map(|i| delta[i])
                .sum();
            let pass_sum: u64 = (0..delta.len())
                .filter(|&i| is_pass_reason(i))
                .map(|i| delta[i])
                .sum();
            let drop_sum: u64 = (0..delta.len())
                .filter(|&i| is_drop_reason(i))
                .map(|i| delta[i])
                .sum();
            let (pkts, bytes) = if program == program_names::UPLINK_INGRESS {
                (stat::DECAP_PACKETS, stat::DECAP_BYTES)
            } else {
                (stat::ENCAP_PACKETS, stat::ENCAP_BYTES)
            };
            let other_pkts = if pkts == stat::DECAP_PACKETS {
                delta[stat::ENCAP_PACKETS as usize] + delta[stat::ENCAP_BYTES as usize]
            } else {
                delta[stat::DECAP_PACKETS as usize] + delta[stat::DECAP_BYTES as usize]
            };
            assert_eq!(
                (
                    reason_sum,
                    pass_sum,
                    drop_sum,
                    delta[pkts as usize],
                    delta[bytes as usize],
                    other_pkts
                ),
                (runs, passes, drops, redirects, redirect_bytes, 0),
                "{program} batch {batch_no} ({mode}): counters (sum, pass, drop, redirect, bytes, other direction) vs runs; delta {delta:?}"
            );
            tally.runs += runs;
            let total = totals.entry(program).or_insert([0; stat::COUNT as usize]);
            for (t, d) in total.iter_mut().zip(&delta) {
                *t += d;
            }
        }
        // Count only packets the programs actually ran on (refusals are extra), so that every
        // program really sees `packets` distinct inputs.
        done += cases
            .iter()
            .filter(|c| !refused_by_test_run(&c.packet, max))
            .count();
        batch_no += 1;
    }
    let elapsed = started.elapsed();
    println!(
        "{packets} packets x {} programs in {elapsed:.1?}",
        PROGRAMS.len()
    );
    for (program, tally) in &tallies {
        println!(
            "{program}: {} runs ({} refused by test-run), verdicts {:?}, {:.2} us/run in test-run",
            tally.runs,
            tally.refused,
            tally.by_verdict,
            tally.nanos as f64 / 1000.0 / (tally.runs + tally.refused).max(1) as f64
        );
        let counts: Vec<String> = totals[program]
            .iter()
            .enumerate()
            .filter(|(_, v)| **v != 0)
            .map(|(i, v)| format!("{}={v}", stat::NAMES[i]))
            .collect();
        println!("  counters: {}", counts.join(" "));
    }
    for ((program, problem), (count, packet, gso)) in &findings.items {
        println!("FINDING {program}: {problem} (x{count}); first packet (gso {gso:?}): {packet}");
    }
    assert!(
        findings.items.is_empty(),
        "{} kinds of misbehaviour found (see FINDING lines; reproduce with OVERLAY_FUZZ_SEED={seed})",
        findings.items.len()
    );
    let runs: Vec<u64> = tallies.values().map(|t| t.runs).collect();
    assert!(
        runs.iter().all(|r| *r == runs[0] && *r >= packets as u64),
        "every program ran the same {packets}+ packets: {runs:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// The anti-spoof filter on a real link

/// `Udp: InDatagrams` of the namespace (the kernel vxlan socket counts what it receives).
fn udp_in_datagrams(ns: &NetNs) -> u64 {
    let snmp = ns.stdout(&["cat", "/proc/net/snmp"]);
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let names: Vec<&str> = udp.next().expect("Udp header").split_whitespace().collect();
    let values: Vec<&str> = udp.next().expect("Udp values").split_whitespace().collect();
    let i = names
        .iter()
        .position(|n| *n == "InDatagrams")
        .expect("InDatagrams");
    values[i].parse().expect("InDatagrams value")
}

/// VXLAN payload (what the sender's UDP socket sends to port 8472): I flag, VNI 1, then remote
/// pod 10.5.2.3:5000 -> our pod 10.5.1.2:7777 carrying `data`, addressed to `vtep_mac`.
fn vxlan_payload(vtep_mac: [u8; 6], data: &[u8]) -> Vec<u8> {
    let mut p = vec![0x08, 0, 0, 0];
    p.extend_from_slice(&(VNI << 8).to_be_bytes());
    p.extend(eth(vtep_mac, PEER_VTEP, [0x08, 0x00]));
    p.extend(ipv4_header(
        [10, 5, 2, 3],
        [10, 5, 1, 2],
        17,
        64,
        8 + data.len(),
    ));
    p.extend_from_slice(&5000u16.to_be_bytes());
    p.extend_from_slice(&7777u16.to_be_bytes());
    p.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(data);
    p
}

/// How the sender's kernel puts the VXLAN datagram on the wire.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Shape {
    Plain,
    /// With IPv4 options (NOPs): outer header length 24.
    IpOptions,
    /// Larger than the link MTU without DF: the sender's kernel fragments it.
    Fragmented,
}

fn set_ip_option(socket: &UdpSocket, name: libc::c_int, value: &[u8]) {
    use std::os::fd::AsRawFd;
    // SAFETY: setsockopt on a valid socket with a buffer of the given length.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            name,
            value.as_ptr().cast(),
            value.len() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "setsockopt {name}: {}",
        std::io::Error::last_os_error()
    );
}

fn send_vxlan(ns: &NetNs, from: [u8; 4], payload: &[u8], shape: Shape) {
    ns.enter(|| {
        let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::from(from), 0))
            .unwrap_or_else(|e| panic!("bind {from:?} in the sender namespace: {e}"));
        match shape {
            Shape::Plain => {}
            Shape::IpOptions => set_ip_option(&socket, libc::IP_OPTIONS, &[1, 1, 1, 0]),
            Shape::Fragmented => set_ip_option(
                &socket,
                libc::IP_MTU_DISCOVER,
                &libc::IP_PMTUDISC_DONT.to_ne_bytes(),
            ),
        }
        socket
            .send_to(payload, SocketAddrV4::new(Ipv4Addr::from(LOCAL_IP), PORT))
            .expect("send VXLAN");
    });
}

/// The pod datagram for a shape: big enough to be fragmented on the 1500-byte underlay (the
/// inner packet still fits the pod's 1500-byte link).
fn data_for(shape: Shape, who: &str) -> Vec<u8> {
    let mut data = format!("{who} {shape:?}").into_bytes();
    if shape == Shape::Fragmented {
        data.resize(1440, b'.');
    }
    data
}

/// Waits for the next datagram on the pod's socket.
fn receive(socket: &UdpSocket) -> Option<Vec<u8>> {
    let mut buf = [0u8; 2048];
    match socket.recv(&mut buf) {
        Ok(n) => Some(buf[..n].to_vec()),
        Err(e)
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::TimedOut =>
        {
            None
        }
        Err(e) => panic!("pod socket: {e}"),
    }
}

/// VXLAN from an underlay address that holds no lease is dropped by the uplink program and
/// never reaches the kernel vxlan socket or the pod, while the same packet from a peer is
/// decapsulated and delivered. Sender and receiver are namespaces joined by a veth; the
/// receiver is a flannel node (flannel.1, cni0, a pod) with the decap program on its uplink.
#[test]
fn vxlan_from_a_source_without_lease_is_dropped_on_a_real_link() {
    let mut h = Harness::new();
    let sender = NetNs::new("fzs");
    let node = NetNs::new("fzn");
    let pod = NetNs::new("fzp");

    node.run(&[
        "ip",
        "link",
        "add",
        "eth0",
        "type",
        "veth",
        "peer",
        "name",
        "up0",
        "netns",
        sender.name(),
    ]);
    sender.run(&["ip", "addr", "add", "192.168.100.2/24", "dev", "up0"]);
    sender.run(&["ip", "addr", "add", "192.168.100.77/24", "dev", "up0"]);
    sender.run(&["ip", "link", "set", "up0", "up"]);
    node.run(&["ip", "addr", "add", "192.168.100.1/24", "dev", "eth0"]);
    node.run(&["ip", "link", "set", "eth0", "up"]);
    let vtep = "02:00:00:00:01:01";
    node.run(&[
        "ip",
        "link",
        "add",
        "flannel.1",
        "address",
        vtep,
        "type",
        "vxlan",
        "id",
        "1",
        "local",
        "192.168.100.1",
        "dev",
        "eth0",
        "dstport",
        "8472",
        "nolearning",
    ]);
    node.run(&["ip", "link", "set", "flannel.1", "mtu", "1450", "up"]);
    node.run(&["ip", "addr", "add", "10.5.1.0/32", "dev", "flannel.1"]);
    node.run(&[
        "ip",
        "route",
        "add",
        "10.5.2.0/24",
        "via",
        "10.5.2.0",
        "dev",
        "flannel.1",
        "onlink",
    ]);
    node.run(&["ip", "link", "add", "cni0", "type", "bridge"]);
    node.run(&["ip", "addr", "add", "10.5.1.1/24", "dev", "cni0"]);
    node.run(&["ip", "link", "set", "cni0", "up"]);
    node.run(&[
        "ip",
        "link",
        "add",
        "vpod",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        pod.name(),
    ]);
    node.run(&["ip", "link", "set", "vpod", "master", "cni0", "up"]);
    node.sysctl("net.ipv4.ip_forward", "1");
    for conf in ["all", "default", "flannel.1"] {
        // Slash form: the device name has a dot.
        node.sysctl(&format!("net/ipv4/conf/{conf}/rp_filter"), "0");
    }
    pod.run(&["ip", "addr", "add", "10.5.1.2/24", "dev", "eth0"]);
    pod.run(&["ip", "link", "set", "eth0", "up"]);
    pod.run(&["ip", "route", "add", "default", "via", "10.5.1.1"]);
    let socket = pod.enter(|| UdpSocket::bind("10.5.1.2:7777").expect("pod socket"));
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");

    // Control, no program attached: the kernel vxlan device accepts VXLAN from anyone, in
    // every shape, so the stranger's packets reach the pod (they are right; only the filter
    // can stop them).
    let in_before = udp_in_datagrams(&node);
    for shape in [Shape::Plain, Shape::IpOptions, Shape::Fragmented] {
        let data = data_for(shape, "control");
        send_vxlan(
            &sender,
            STRANGER_IP,
            &vxlan_payload(LOCAL_VTEP, &data),
            shape,
        );
        let mut got = None;
        wait_until(
            Duration::from_secs(20),
            &format!("control datagram ({shape:?}) reaches the pod"),
            || {
                got = receive(&socket);
                got.is_some()
            },
        );
        assert_eq!(got, Some(data), "control ({shape:?})");
    }
    assert!(
        udp_in_datagrams(&node) >= in_before + 3,
        "the kernel vxlan socket counts what it decapsulates (else the check below is vacuous)"
    );

    // The decap program on the node's uplink, configured with the real interfaces.
    let mut cfg = config(0);
    cfg.uplink_ifindex = node.ifindex("eth0");
    cfg.vxlan_ifindex = node.ifindex("flannel.1");
    cfg.bridge_ifindex = node.ifindex("cni0");
    h.config.set(0, cfg, 0).expect("config");
    let ebpf = &mut h.ebpf;
    node.enter(move || {
        classifier(ebpf, program_names::UPLINK_INGRESS)
            .expect("program")
            .attach_with_options(
                "eth0",
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::first()),
            )
            .expect("attach the decap program to the node's uplink (TCX ingress)");
    });

    for shape in [Shape::Plain, Shape::IpOptions, Shape::Fragmented] {
        let before = h.stats();
        let in_before = udp_in_datagrams(&node);
        let stranger = data_for(shape, "stranger");
        send_vxlan(
            &sender,
            STRANGER_IP,
            &vxlan_payload(LOCAL_VTEP, &stranger),
            shape,
        );
        wait_until(
            Duration::from_secs(20),
            &format!("drop_unknown_source counts the stranger's packet ({shape:?})"),
            || {
                h.stats()[stat::DROP_UNKNOWN_SOURCE as usize]
                    > before[stat::DROP_UNKNOWN_SOURCE as usize]
            },
        );
        // The same packet from the peer's address: accepted (decapsulated by the program, or
        // for options/fragments by the kernel device). Had the stranger's got through, the pod
        // would read it first: it went the same path before.
        let peer = data_for(shape, "peer");
        send_vxlan(&sender, PEER_IP, &vxlan_payload(LOCAL_VTEP, &peer), shape);
        let mut got = None;
        wait_until(
            Duration::from_secs(20),
            &format!("the peer's datagram ({shape:?}) reaches the pod"),
            || {
                got = receive(&socket);
                got.is_some()
            },
        );
        assert!(
            got.as_deref() == Some(&peer[..]),
            "{shape:?}: expected the peer's datagram, got {:?}",
            got.map(|g| String::from_utf8_lossy(&g[..g.len().min(20)]).into_owned())
        );
        let after = h.stats();
        let moved: Vec<(&str, u64)> = after
            .iter()
            .zip(before)
            .enumerate()
            .filter(|(_, (a, b))| **a != *b)
            .map(|(i, (a, b))| (stat::NAMES[i], a - b))
            .collect();
        assert_eq!(
            after[stat::DROP_UNKNOWN_SOURCE as usize] - before[stat::DROP_UNKNOWN_SOURCE as usize],
            1,
            "{shape:?}: counters moved: {moved:?}"
        );
        if shape == Shape::Plain {
            assert_eq!(
                after[stat::DECAP_PACKETS as usize] - before[stat::DECAP_PACKETS as usize],
                1,
                "the peer's packet is decapsulated by the program; counters moved: {moved:?}"
            );
            assert_eq!(
                udp_in_datagrams(&node),
                in_before,
                "nothing reached the node's kernel vxlan socket (stranger dropped, peer decapsulated in BPF)"
            );
        }
    }
    assert!(receive(&socket).is_none(), "no further datagram at the pod");
}
