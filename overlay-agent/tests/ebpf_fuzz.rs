//! Issue 8, "Bad packets": a deterministic fuzz of every attachable program in the eBPF object
//! through BPF_PROG_TEST_RUN, and the anti-spoof filter (with R3 delivery) on a real veth link.
//!
//! The fuzz feeds each of the five fast-path programs (uplink decap, vxlan device deliver and
//! learn, pod veth encap and learn) the same stream of distinct packets (random bytes, and
//! valid templates of every kind the programs see, mutated: truncated headers, bad lengths,
//! odd VXLAN flags, IP options, fragments, wrong VNI/port, non-peer sources, other MACs,
//! TCP control flags, ports of learned/stale/foreign flows, ECN marks, huge and tiny sizes),
//! with maps set so that every fast path is reachable (endpoints, peers, learned fresh flows,
//! stale flows, flows learned through another veth), and checks for every run:
//! - the test-run syscall succeeds, except for inputs the kernel refuses before running the
//!   program (measured in `test_run_input_limits`, and then required to be exactly those);
//! - the verdict is one of pass (TCX_NEXT), drop or redirect;
//! - a redirect happens only for a well-formed packet of a learned flow the program owns (an
//!   oracle written from the design, stricter than the programs: IPv4 header sanity as the
//!   kernel's ip_rcv checks it, VXLAN header as the kernel vxlan device accepts it, the
//!   flow's direction fresh (through the right veth), no TCP SYN/FIN/RST, TTL, MTU, GSO,
//!   ECN), with the expected output bytes and the mark cleared on delivery;
//! - a pristine eligible template is redirected (the fast paths are really reached);
//! - a pass leaves the packet and the mark untouched; only the uplink drops, and only spoofed
//!   VXLAN; the learners learn exactly the learnable packets;
//! - every outcome is counted: per batch, the STATS deltas sum to the number of runs, by
//!   action (kernel_* = passes, drop_* = drops, the program's fast_* = redirects, bytes
//!   included), and on a sample, exactly one reason counter moves per run.
//!
//! Seed: `OVERLAY_FUZZ_SEED` (default fixed, printed); count: `OVERLAY_FUZZ_PACKETS`
//! (default 1,000,000 run by each program; inputs test-run refuses are extra). Needs root:
//! fails loudly otherwise (bpffs is mounted when missing).

mod bpf;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    time::{Duration, Instant},
};

use aya::{
    maps::lpm_trie::Key,
    programs::{LinkOrder, Program, ProgramError, TcAttachType, tc::TcAttachOptions},
};
use bpf::*;
use overlay_agent::dataplane::ebpf::classifier;
use overlay_common::{
    DatapathConfig, Endpoint, FLOW_FRESH_NS, FlowKey, FlowState, config_flags, peer_flags,
    program_names, stat,
};
use overlay_tests::{
    flanneld,
    netns::NetNs,
    topology::{Cluster, ClusterOptions, UnderlayKind},
    wait_until,
};
use rand::{Rng, SeedableRng, rngs::StdRng};

/// The mark every run starts with: delivery must clear it, anything else keep it.
const MARK: u32 = 0x0000_4000;

/// The attachable programs this oracle knows.
const FUZZED: [&str; 5] = [
    program_names::UPLINK_INGRESS,
    program_names::VXLAN_INGRESS,
    program_names::VXLAN_EGRESS,
    program_names::POD_INGRESS,
    program_names::POD_EGRESS,
];

/// The object must hold exactly these: a new program (e.g. an XDP filter) fails the test
/// until it is added here, so "every program" stays true. The probe is run by the loader once
/// on a fixed frame (packets_tests cover it), never attached: not fuzzed.
const OBJECT_PROGRAMS: [&str; 6] = [
    program_names::UPLINK_INGRESS,
    program_names::VXLAN_INGRESS,
    program_names::VXLAN_EGRESS,
    program_names::POD_INGRESS,
    program_names::POD_EGRESS,
    program_names::PROBE_DECAP_L4_UDP,
];

/// A learned flow of the fuzz's tables: ports (pod side, remote side), protocol, and how it
/// was learned.
#[derive(Clone, Copy)]
struct FixedFlow {
    pod: [u8; 4],
    pod_port: u16,
    remote_port: u16,
    proto: u8,
    /// Seconds ago each direction was seen (None: never).
    egress_age: Option<u64>,
    ingress_age: Option<u64>,
    ingress_ifindex: u32,
}

const FLOWS: [FixedFlow; 8] = [
    // Fresh both ways through this veth: the fast paths' flows.
    FixedFlow {
        pod: POD_IP,
        pod_port: 40000,
        remote_port: 5000,
        proto: IPPROTO_UDP,
        egress_age: Some(0),
        ingress_age: Some(0),
        ingress_ifindex: HERE,
    },
    FixedFlow {
        pod: POD_IP,
        pod_port: 40001,
        remote_port: 80,
        proto: IPPROTO_TCP,
        egress_age: Some(0),
        ingress_age: Some(0),
        ingress_ifindex: HERE,
    },
    // Stale in one direction / learned in one only.
    FixedFlow {
        pod: POD_IP,
        pod_port: 40002,
        remote_port: 5002,
        proto: IPPROTO_UDP,
        egress_age: Some(30),
        ingress_age: Some(0),
        ingress_ifindex: HERE,
    },
    FixedFlow {
        pod: POD_IP,
        pod_port: 40003,
        remote_port: 443,
        proto: IPPROTO_TCP,
        egress_age: Some(0),
        ingress_age: Some(30),
        ingress_ifindex: HERE,
    },
    FixedFlow {
        pod: POD_IP,
        pod_port: 40004,
        remote_port: 5004,
        proto: IPPROTO_UDP,
        egress_age: None,
        ingress_age: Some(0),
        ingress_ifindex: HERE,
    },
    // Learned through another veth than the endpoint's.
    FixedFlow {
        pod: POD_IP,
        pod_port: 40005,
        remote_port: 5005,
        proto: IPPROTO_UDP,
        egress_age: Some(0),
        ingress_age: Some(0),
        ingress_ifindex: OTHER_IFINDEX,
    },
    // The other veth's pod, learned through its veth.
    FixedFlow {
        pod: OTHER_VETH_POD,
        pod_port: 40000,
        remote_port: 5000,
        proto: IPPROTO_UDP,
        egress_age: Some(0),
        ingress_age: Some(0),
        ingress_ifindex: OTHER_IFINDEX,
    },
    // An unknown local address with a fresh flow (no endpoint: never fast).
    FixedFlow {
        pod: UNKNOWN_POD,
        pod_port: 40000,
        remote_port: 5000,
        proto: IPPROTO_UDP,
        egress_age: Some(0),
        ingress_age: Some(0),
        ingress_ifindex: HERE,
    },
];

/// The local endpoints the fuzz's ENDPOINTS map holds: (host ifindex, pod MAC).
fn endpoint_of(ip: [u8; 4]) -> Option<(u32, [u8; 6])> {
    match ip {
        POD_IP => Some((HERE, POD_MAC)),
        OTHER_VETH_POD => Some((OTHER_IFINDEX, OTHER_POD_MAC)),
        _ => None,
    }
}

/// A direction of a learned flow.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Direction {
    /// The pod's packets, seen leaving through flannel.1 (R2 takes it).
    Egress,
    /// Packets to the pod, seen delivered through its veth (R1 and R3 take it).
    Ingress,
}

/// What the oracle knows of a flow direction's freshness (read from the map, so that what the
/// learners changed counts too).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Learned {
    /// Fresh (with a margin); the flow's ingress ifindex.
    Fresh(u32),
    /// Missing, never seen or clearly stale.
    No,
    /// Within a second of going stale: either answer is right.
    Unsure,
}

impl Harness {
    /// Loads the object (every program through the verifier), configures node 10.5.1.0/24
    /// (all fast paths on) with one valid peer 10.5.2.0/24 and one incomplete peer
    /// 10.5.3.0/24; only the valid peer's address may send VXLAN. Endpoints: our pod 10.5.1.2
    /// behind this veth, 10.5.1.4 behind another; flows: [`FLOWS`].
    fn new() -> Self {
        let mut h = Self::load(NEXTHOP_IP);
        let mut names: Vec<String> = h.ebpf.programs().map(|(n, _)| n.to_string()).collect();
        names.sort();
        let mut known: Vec<String> = OBJECT_PROGRAMS.iter().map(|s| s.to_string()).collect();
        known.sort();
        assert_eq!(
            names, known,
            "the object's programs changed: teach this fuzz's oracle about the new ones"
        );
        for (name, program) in h.ebpf.programs() {
            assert!(
                matches!(program, Program::SchedClassifier(_)),
                "{name}: only TC classifiers are fuzzed so far (no XDP program in the object)"
            );
            assert!(program.fd().is_ok(), "{name} was not loaded (verifier)");
        }
        h.reset_flows();
        h
    }

    /// (Re)writes [`FLOWS`] with timestamps relative to now (what the learners changed is
    /// undone).
    fn reset_flows(&mut self) {
        let now = now_ns();
        let at = |age: Option<u64>| age.map_or(0, |s| now - s * 1_000_000_000);
        for f in FLOWS {
            self.flows
                .insert(
                    flow_key(f.pod, REMOTE_POD, f.pod_port, f.remote_port, f.proto),
                    FlowState {
                        egress_seen_ns: at(f.egress_age),
                        ingress_seen_ns: at(f.ingress_age),
                        ingress_ifindex: f.ingress_ifindex,
                        _pad: 0,
                    },
                    0,
                )
                .expect("write flow");
        }
    }

    /// Writes the peer's next hop (0: not resolved yet).
    fn set_nexthop(&mut self, nexthop: [u8; 4]) {
        self.peers
            .insert(
                &Key::new(24, PEER_SUBNET),
                peer(PEER_IP, peer_flags::VALID, nexthop),
                0,
            )
            .expect("peer");
    }

    /// Whether one direction of a flow is learned (each direction takes its fast path on its
    /// own: egress for R2, ingress for delivery).
    fn learned(&self, key: &FlowKey, direction: Direction) -> Learned {
        let Ok(state) = self.flows.get(key, 0) else {
            return Learned::No;
        };
        let seen = match direction {
            Direction::Egress => state.egress_seen_ns,
            Direction::Ingress => state.ingress_seen_ns,
        };
        let now = now_ns();
        let margin = 1_000_000_000;
        if seen == 0 || seen > now || now - seen > FLOW_FRESH_NS + margin {
            Learned::No
        } else if now - seen + margin < FLOW_FRESH_NS {
            Learned::Fresh(state.ingress_ifindex)
        } else {
            Learned::Unsure
        }
    }

    /// One BPF_PROG_TEST_RUN with skb->mark = [`MARK`]: the verdict, the packet as the program
    /// left it (in `out`) and the mark afterwards.
    fn run(
        &mut self,
        program: &'static str,
        packet: &[u8],
        gso_size: Option<u32>,
        out: &mut Vec<u8>,
    ) -> Result<(u32, u32), ProgramError> {
        self.test_run(program, packet, MARK, gso_size, out)
    }
}

// ---------------------------------------------------------------------------------------------
// Packet building

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

/// Protocol and ports (pod side, remote side) of a packet between a local and a remote pod:
/// mostly a flow of [`FLOWS`] (the first two, the fast ones, most of all).
fn flow_ports(rng: &mut StdRng) -> (u8, u16, u16) {
    if rng.random_bool(0.85) {
        let i = pick!(
            rng,
            [
                (8, 0usize),
                (8, 1),
                (1, 2),
                (1, 3),
                (1, 4),
                (1, 5),
                (1, 6),
                (1, 7)
            ],
        );
        let f = FLOWS[i];
        (f.proto, f.pod_port, f.remote_port)
    } else {
        let proto = pick!(
            rng,
            [
                (5, IPPROTO_UDP),
                (4, IPPROTO_TCP),
                (1, 1),
                (1, rng.random())
            ]
        );
        (proto, rng.random(), rng.random())
    }
}

/// An IPv4 packet (header + L4 + payload) with a consistent header.
fn ip_packet(
    rng: &mut StdRng,
    src: [u8; 4],
    dst: [u8; 4],
    (proto, sport, dport): (u8, u16, u16),
    max_payload: usize,
) -> Vec<u8> {
    let ttl = pick!(rng, [(8, 64u8), (1, 1), (1, 0), (1, 2), (1, rng.random())]);
    let tos = pick!(rng, [(6, 0u8), (1, 1), (1, 2), (1, 3), (1, rng.random())]);
    let payload_len = if rng.random_bool(0.8) {
        rng.random_range(0..=64.min(max_payload))
    } else {
        rng.random_range(0..=max_payload)
    };
    let l4_len = match proto {
        IPPROTO_UDP => 8,
        IPPROTO_TCP => 20,
        1 => 8,
        _ => 0,
    };
    let mut l4 = vec![0u8; l4_len + payload_len];
    rng.fill(&mut l4[..]);
    if proto == IPPROTO_UDP || proto == IPPROTO_TCP {
        l4[0..2].copy_from_slice(&sport.to_be_bytes());
        l4[2..4].copy_from_slice(&dport.to_be_bytes());
    }
    if proto == IPPROTO_UDP {
        let len = l4.len() as u16;
        l4[4..6].copy_from_slice(&len.to_be_bytes());
        l4[6..8].copy_from_slice(&[0, 0]);
    }
    if proto == IPPROTO_TCP {
        l4[12] = pick!(rng, [(9, 0x50u8), (1, rng.random())]);
        l4[13] = pick!(
            rng,
            [
                (8, 0x10u8),
                (2, 0x18),
                (1, 0x02),
                (1, 0x12),
                (1, 0x11),
                (1, 0x04),
                (1, 0x14),
                (1, rng.random()),
            ],
        );
    }
    let mut p = ipv4_header(0, 0x1234, ttl, proto, src, dst, l4.len());
    p[1] = tos;
    fix_ip_checksum(&mut p, 0);
    p.extend_from_slice(&l4);
    p
}

/// A remote destination as a local pod addresses it.
fn remote_dst(rng: &mut StdRng) -> [u8; 4] {
    pick!(
        rng,
        [
            (12, REMOTE_POD),
            (1, [10, 5, 2, 255]),
            (1, [10, 5, 3, 4]),
            (1, [10, 5, 1, 9]),
            (1, [10, 96, 0, 10]),
            (1, random_ip(rng)),
        ],
    )
}

/// A local destination as a remote pod addresses it.
fn local_dst(rng: &mut StdRng) -> [u8; 4] {
    pick!(
        rng,
        [
            (12, POD_IP),
            (2, OTHER_VETH_POD),
            (1, UNKNOWN_POD),
            (1, [10, 5, 1, 1]),
            (1, [10, 5, 1, 255]),
            (1, random_ip(rng)),
        ],
    )
}

/// A pod's frame entering its host veth (R2's input): to the gateway MAC, towards some
/// address.
fn pod_frame(rng: &mut StdRng, max: usize) -> Vec<u8> {
    let dst_mac = pick!(
        rng,
        [
            (30, BRIDGE_MAC),
            (1, [0xff; 6]),
            (1, [0x01, 0, 0x5e, 0, 0, 1]),
            (1, OTHER_POD_MAC),
        ],
    );
    let src_mac = pick!(rng, [(30, POD_MAC), (1, OTHER_POD_MAC), (1, rng.random())]);
    let src = pick!(
        rng,
        [(18, POD_IP), (1, OTHER_VETH_POD), (1, random_ip(rng))]
    );
    let dst = remote_dst(rng);
    let ports = flow_ports(rng);
    let mut f = eth(dst_mac, src_mac);
    f.extend(ip_packet(rng, src, dst, ports, max - 34));
    f
}

/// What the kernel routes into flannel.1 (the egress learner's input).
fn routed_frame(rng: &mut StdRng, max: usize) -> Vec<u8> {
    let src = pick!(
        rng,
        [
            (12, POD_IP),
            (1, OTHER_VETH_POD),
            (1, LOCAL_IP),
            (1, random_ip(rng)),
        ],
    );
    let dst = remote_dst(rng);
    let ports = flow_ports(rng);
    let mut f = eth(PEER_VTEP, LOCAL_VTEP);
    f.extend(ip_packet(rng, src, dst, ports, max - 34));
    f
}

/// A remote pod's packet to a local one (ports swapped: the remote side sends).
fn remote_to_local(rng: &mut StdRng, max_payload: usize) -> Vec<u8> {
    let src = pick!(
        rng,
        [(16, REMOTE_POD), (1, [10, 96, 0, 10]), (1, random_ip(rng))],
    );
    let dst = local_dst(rng);
    let (proto, pod_port, remote_port) = flow_ports(rng);
    ip_packet(rng, src, dst, (proto, remote_port, pod_port), max_payload)
}

/// What the kernel vxlan device hands its ingress after decapsulation (R1's input).
fn decapsulated_frame(rng: &mut StdRng, max: usize) -> Vec<u8> {
    let dst_mac = pick!(rng, [(18, LOCAL_VTEP), (1, BRIDGE_MAC), (1, [0xff; 6])],);
    let mut f = eth(dst_mac, PEER_VTEP);
    f.extend(remote_to_local(rng, max - 34));
    f
}

/// What the kernel delivers to the pod through its host veth (the ingress learner's input).
fn delivered_frame(rng: &mut StdRng, max: usize) -> Vec<u8> {
    let dst_mac = pick!(rng, [(18, POD_MAC), (2, OTHER_POD_MAC), (1, rng.random())],);
    let mut f = eth(dst_mac, BRIDGE_MAC);
    f.extend(remote_to_local(rng, max - 34));
    f
}

/// VXLAN as a flannel node sends it, from a peer or not, for us or not.
fn vxlan_frame(rng: &mut StdRng, max: usize) -> Vec<u8> {
    let mut inner = eth_typed(
        pick!(rng, [(30, LOCAL_VTEP), (1, BRIDGE_MAC), (1, [0xff; 6])]),
        PEER_VTEP,
        pick!(
            rng,
            [(18, [0x08, 0x00]), (1, [0x08, 0x06]), (1, rng.random())],
        ),
    );
    inner.extend(remote_to_local(rng, max - 34 - 16 - 34));
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
    if rng.random_bool(0.5) {
        // Stock flannel senders compute the outer UDP checksum.
        let c = udp_checksum(src, dst, &udp);
        udp[6..8].copy_from_slice(&c.to_be_bytes());
    }
    let mut outer = ipv4_header(0, 0x1234, 64, 17, src, dst, udp.len());
    outer[1] = pick!(rng, [(8, 0u8), (1, 1), (1, 2), (2, 3)]);
    fix_ip_checksum(&mut outer, 0);
    let mut f = eth(UPLINK_MAC, PEER_UPLINK_MAC);
    f.extend(outer);
    f.extend(udp);
    f
}

/// Not IPv4 at all, or wrapped in something we do not parse.
fn other_l2(rng: &mut StdRng, max: usize) -> Vec<u8> {
    let kind = rng.random_range(0..4);
    let mut f = match kind {
        0 => eth_typed([0xff; 6], PEER_UPLINK_MAC, [0x08, 0x06]),
        1 => eth_typed(UPLINK_MAC, PEER_UPLINK_MAC, [0x86, 0xdd]),
        2 => {
            // 802.1Q-tagged VXLAN from a peer.
            let mut f = eth_typed(UPLINK_MAC, PEER_UPLINK_MAC, [0x81, 0x00]);
            f.extend_from_slice(&[0, 5, 0x08, 0x00]);
            f.extend(vxlan_frame(rng, max - 4).split_off(14));
            return f;
        }
        _ => eth_typed(UPLINK_MAC, PEER_UPLINK_MAC, rng.random()),
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
        match rng.random_range(0..16) {
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
            12 => {
                // MAC addresses: someone else's, ours, random.
                if p.len() >= 12 {
                    let off = if rng.random_bool(0.5) { 0 } else { 6 };
                    let mac = pick!(
                        rng,
                        [
                            (1, BRIDGE_MAC),
                            (1, POD_MAC),
                            (1, OTHER_POD_MAC),
                            (1, LOCAL_VTEP),
                            (1, PEER_VTEP),
                            (1, rng.random()),
                        ],
                    );
                    p[off..off + 6].copy_from_slice(&mac);
                }
            }
            13 => {
                // TCP flags (of an option-less header at `ip`).
                if p.len() > ip + 33 {
                    p[ip + 33] = pick!(
                        rng,
                        [
                            (1, 0x02u8),
                            (1, 0x01),
                            (1, 0x04),
                            (1, 0x10),
                            (1, rng.random())
                        ],
                    );
                }
            }
            14 => {
                // Ports: a learned flow's, either way round, or random.
                if p.len() >= ip + 24 {
                    let (_, a, b) = flow_ports(rng);
                    let (s, d) = if rng.random_bool(0.5) { (a, b) } else { (b, a) };
                    p[ip + 20..ip + 22].copy_from_slice(&s.to_be_bytes());
                    p[ip + 22..ip + 24].copy_from_slice(&d.to_be_bytes());
                }
            }
            15 => {
                // ECN field.
                if p.len() > ip + 1 {
                    p[ip + 1] = (p[ip + 1] & !3) | rng.random_range(0..4u8);
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
                            (1, OTHER_VETH_POD),
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
    /// As a template built it (not mutated or grown): if the oracle certainly allows a fast
    /// path for it, the program must take it.
    pristine: bool,
}

fn generate(rng: &mut StdRng, max: usize) -> Case {
    let mut p = match rng.random_range(0..24) {
        0..=4 => pod_frame(rng, max),
        5..=6 => routed_frame(rng, max),
        7..=8 => decapsulated_frame(rng, max),
        9..=10 => delivered_frame(rng, max),
        11..=19 => vxlan_frame(rng, max),
        20 => other_l2(rng, max),
        _ => random_bytes(rng, max),
    };
    let template = p.clone();
    if rng.random_bool(0.03) {
        let target = pick!(
            rng,
            [
                (2, MAX_INNER as usize + 14),
                (2, MAX_INNER as usize + 15),
                (1, MAX_INNER as usize + 64),
                (1, MAX_INNER as usize + 65),
                (2, rng.random_range(1500..=max)),
                (1, max),
            ],
        );
        huge(&mut p, target);
    }
    mutate(rng, &mut p, max + 16);
    let gso = rng.random_bool(0.02).then(|| rng.random_range(1..=1500));
    Case {
        pristine: p == template,
        packet: p,
        gso,
    }
}

// ---------------------------------------------------------------------------------------------
// The oracle: when may a program redirect a packet, and what must come out?

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

/// Protocol, ports and TCP flags of the TCP/UDP header at `l4` (what the programs read).
fn l4_at(p: &[u8], proto: u8, l4: usize) -> Result<(u8, u16, u16, u8), String> {
    match proto {
        IPPROTO_UDP if p.len() >= l4 + 4 => Ok((proto, be16(p, l4), be16(p, l4 + 2), 0)),
        IPPROTO_TCP if p.len() >= l4 + 14 => Ok((proto, be16(p, l4), be16(p, l4 + 2), p[l4 + 13])),
        IPPROTO_UDP | IPPROTO_TCP => Err("L4 header truncated".into()),
        _ => Err("not TCP/UDP".into()),
    }
}

/// SYN, FIN or RST: conntrack must see it.
fn tcp_control(proto: u8, flags: u8) -> bool {
    proto == IPPROTO_TCP && flags & 0x07 != 0
}

/// A fast path the oracle allows; `certain` false when the flow is within a second of going
/// stale (then passing is right too).
struct Allowed {
    certain: bool,
    /// Delivery: the pod's MAC.
    pod_mac: [u8; 6],
}

/// Whether a remote pod's packet (option-less IPv4 header at `ip`) may be delivered straight
/// into its local pod: a known endpoint, no TCP state change, the flow's ingress direction
/// fresh and learned through the endpoint's veth, TTL left.
fn delivery_allowed(h: &Harness, p: &[u8], ip: usize) -> Result<Allowed, String> {
    let (proto, sport, dport, flags) = l4_at(p, p[ip + 9], ip + 20)?;
    let (src, dst) = (ip4(p, ip + 12), ip4(p, ip + 16));
    let Some((ifindex, pod_mac)) = endpoint_of(dst) else {
        return Err("destination not a local endpoint".into());
    };
    if tcp_control(proto, flags) {
        return Err("TCP SYN/FIN/RST".into());
    }
    let certain = match h.learned(&flow_key(dst, src, dport, sport, proto), Direction::Ingress) {
        Learned::Fresh(i) if i == ifindex => true,
        Learned::Unsure => false,
        other => {
            return Err(format!(
                "ingress direction not learned fresh through the endpoint's veth ({other:?})"
            ));
        }
    };
    if p[ip + 8] <= 1 {
        return Err("TTL would expire".into());
    }
    Ok(Allowed { certain, pod_mac })
}

/// R2: whether the pod veth's ingress may encapsulate this packet.
fn encap_allowed(h: &Harness, p: &[u8], gso: Option<u32>, flags: u32) -> Result<Allowed, String> {
    if flags & config_flags::FAST_TX == 0 {
        return Err("FAST_TX off".into());
    }
    if p.len() < 14 || p[12..14] != [0x08, 0x00] {
        return Err("not IPv4".into());
    }
    if p[..6] != BRIDGE_MAC {
        return Err("not addressed to the gateway (bridge) MAC".into());
    }
    let (ihl, _) = sane_ipv4(p, 14)?;
    if ihl != 20 {
        return Err("IP options".into());
    }
    if is_fragment(p, 14) {
        return Err("fragment".into());
    }
    let gso = gso.unwrap_or(0);
    if gso == 0 && p.len() - 14 > MAX_INNER as usize {
        return Err("larger than the underlay MTU".into());
    }
    let (proto, sport, dport, tcp_flags) = l4_at(p, p[23], 34)?;
    let (src, dst) = (ip4(p, 26), ip4(p, 30));
    if src != POD_IP || p[6..12] != POD_MAC {
        return Err("source is not the pod (address and MAC) behind this veth".into());
    }
    if !in_subnet(dst, PEER_SUBNET) {
        return Err("destination not in a valid peer's subnet".into());
    }
    if tcp_control(proto, tcp_flags) {
        return Err("TCP SYN/FIN/RST".into());
    }
    let certain = match h.learned(&flow_key(src, dst, sport, dport, proto), Direction::Egress) {
        Learned::Fresh(_) => true,
        Learned::Unsure => false,
        Learned::No => return Err("egress direction not learned fresh".into()),
    };
    if p[22] <= 1 {
        return Err("TTL would expire".into());
    }
    if gso != 0 {
        if proto == IPPROTO_UDP {
            return Err("UDP GSO".into());
        }
        if gso as usize + 20 + usize::from(p[34 + 12] >> 4) * 4 > MAX_INNER as usize {
            return Err("GSO segments larger than the underlay MTU".into());
        }
    }
    Ok(Allowed {
        // Test-run cannot set gso_type, and adjust_room refuses to encapsulate such a
        // synthetic GSO skb: allowed, but not required here.
        certain: certain && gso == 0,
        pod_mac: [0; 6],
    })
}

/// R3: whether the uplink may decapsulate this packet and deliver it into a pod.
fn decap_allowed(h: &Harness, p: &[u8], gso: Option<u32>, flags: u32) -> Result<Allowed, String> {
    if flags & config_flags::FAST_RX_BEFORE_DECAP == 0 {
        return Err("FAST_RX_BEFORE_DECAP off".into());
    }
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
    if usize::from(be16(p, 38)) != tot - 20 {
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
    let (inner_ihl, inner_tot) = sane_ipv4(&p[..14 + tot], INNER_IP)?;
    if inner_ihl != 20 {
        return Err("inner IP options".into());
    }
    if INNER_IP + inner_tot > 14 + tot {
        return Err("inner datagram beyond the outer one".into());
    }
    if is_fragment(p, INNER_IP) {
        return Err("inner fragment".into());
    }
    let allowed = delivery_allowed(h, p, INNER_IP)?;
    if gso.unwrap_or(0) != 0 {
        return Err("GSO VXLAN (no DECAP_L4_UDP on this kernel)".into());
    }
    if p[15] & 3 == 3 && p[INNER_IP + 1] & 3 == 0 {
        return Err("outer CE on a not-ECN-capable inner packet".into());
    }
    Ok(allowed)
}

/// R1: whether the vxlan device's ingress may deliver this (decapsulated) frame into a pod.
fn deliver_allowed(h: &Harness, p: &[u8], flags: u32) -> Result<Allowed, String> {
    if flags & config_flags::FAST_RX_AFTER_DECAP == 0 {
        return Err("FAST_RX_AFTER_DECAP off".into());
    }
    if p.len() < 14 || p[12..14] != [0x08, 0x00] {
        return Err("not IPv4".into());
    }
    if p[..6] != LOCAL_VTEP {
        return Err("not addressed to our VtepMAC".into());
    }
    let (ihl, _) = sane_ipv4(p, 14)?;
    if ihl != 20 {
        return Err("IP options".into());
    }
    if is_fragment(p, 14) {
        return Err("fragment".into());
    }
    delivery_allowed(h, p, 14)
}

/// Whether a learner must learn this packet (given a configured datapath): a TCP/UDP packet
/// (not a fragment) between a local endpoint and a remote pod, seen where the learner sits.
fn learnable(program: &str, p: &[u8]) -> Result<(), String> {
    if p.len() < 34 || p[12..14] != [0x08, 0x00] {
        return Err("not IPv4".into());
    }
    let ihl = usize::from(p[14] & 0x0f) * 4;
    if p[14] >> 4 != 4 || ihl < 20 {
        return Err("not an IPv4 header".into());
    }
    if is_fragment(p, 14) {
        return Err("fragment".into());
    }
    l4_at(p, p[23], 14 + ihl)?;
    let (src, dst) = (ip4(p, 26), ip4(p, 30));
    if program == program_names::VXLAN_EGRESS {
        if endpoint_of(src).is_none() {
            return Err("source not a local endpoint".into());
        }
        if !in_subnet(dst, PEER_SUBNET) {
            return Err("destination not a remote pod".into());
        }
    } else {
        match endpoint_of(dst) {
            Some((ifindex, mac)) if ifindex == HERE && p[..6] == mac => {}
            _ => return Err("destination not the pod (address and MAC) of this veth".into()),
        }
        if !in_subnet(src, PEER_SUBNET) {
            return Err("source not a remote pod".into());
        }
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

/// The outer ECN field for an inner one (RFC 6040 normal mode, INET_ECN_encapsulate).
fn ecn_encapsulate(inner_tos: u8) -> u8 {
    match inner_tos & 3 {
        3 => 2,
        ecn => ecn,
    }
}

/// Checks an R2 output: flannel's VXLAN in front of the routed inner packet.
fn check_encap_output(p: &[u8], out: &[u8]) -> Result<(), String> {
    if out.len() != p.len() + 50 || out[..14] != p[..14] {
        return Err("encap: length or outer Ethernet wrong".into());
    }
    if checksum(&out[14..34]) != 0
        || out[14] != 0x45
        || out[15] != ecn_encapsulate(p[15])
        || usize::from(be16(out, 16)) != p.len() - 14 + 50
        || out[20..24] != [0, 0, 64, 17]
        || ip4(out, 26) != LOCAL_IP
        || ip4(out, 30) != PEER_IP
    {
        return Err(format!("encap: outer IPv4 wrong: {:02x?}", &out[14..34]));
    }
    if !(32768..60999).contains(&be16(out, 34))
        || be16(out, 36) != PORT
        || usize::from(be16(out, 38)) != p.len() - 14 + 30
        || out[40..42] != [0, 0]
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
    let mut inner = p[14..].to_vec();
    inner[8] -= 1;
    fix_ip_checksum(&mut inner, 0);
    if out[64..] != inner[..] {
        return Err("encap: inner packet not routed (TTL - 1, checksum) or changed".into());
    }
    Ok(())
}

/// Checks a delivery into a pod: pod MAC <- bridge MAC, the inner packet routed (TTL - 1, CE
/// when `ce`, checksum right) and otherwise unchanged, the mark cleared.
fn check_delivery_output(
    inner: &[u8],
    out: &[u8],
    pod_mac: [u8; 6],
    ce: bool,
    mark: u32,
) -> Result<(), String> {
    let mut expected = delivered(inner, pod_mac);
    if ce {
        expected[15] |= 3;
        fix_ip_checksum(&mut expected, 14);
    }
    if out != expected {
        return Err(format!(
            "delivery: frame not as routed into the pod (ce {ce}): {:02x?}",
            &out[..out.len().min(40)]
        ));
    }
    if mark != 0 {
        return Err("delivery: mark not cleared".into());
    }
    Ok(())
}
// ---------------------------------------------------------------------------------------------
// Bookkeeping

/// The packet as hex, its first 160 bytes (the headers) for long ones: the seed reproduces
/// the whole packet.
fn hex(p: &[u8]) -> String {
    let shown: String = p.iter().take(160).map(|b| format!("{b:02x}")).collect();
    if p.len() > 160 {
        format!("{shown}... ({} bytes)", p.len())
    } else {
        shown
    }
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
    stat::NAMES[i].starts_with("kernel_")
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
    for program in FUZZED {
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

fn is_fast_reason(i: usize) -> bool {
    stat::is_reason(i as u32) && stat::NAMES[i].starts_with("fast_")
}

/// The fast-path packet counter of a program (the learners have none).
fn fast_counter(program: &str) -> Option<u32> {
    match program {
        p if p == program_names::UPLINK_INGRESS => Some(stat::FAST_RX_BEFORE_DECAP_PACKETS),
        p if p == program_names::VXLAN_INGRESS => Some(stat::FAST_RX_AFTER_DECAP_PACKETS),
        p if p == program_names::POD_INGRESS => Some(stat::FAST_TX_PACKETS),
        _ => None,
    }
}

fn is_learner(program: &str) -> bool {
    program == program_names::VXLAN_EGRESS || program == program_names::POD_EGRESS
}

/// The datapath configuration of a batch: mostly every fast path on, sometimes without the
/// peer's next hop, single pieces or none, the probe flag set, or unconfigured.
fn batch_mode(batch_no: u64) -> (DatapathConfig, [u8; 4], &'static str) {
    match batch_no % 10 {
        3 => (config(ALL_FAST), [0; 4], "all, no next hop"),
        6 => match (batch_no / 10) % 4 {
            0 => (config(0), NEXTHOP_IP, "fast paths off"),
            1 => (config(config_flags::FAST_TX), NEXTHOP_IP, "tx only"),
            2 => (
                config(config_flags::FAST_RX_BEFORE_DECAP),
                NEXTHOP_IP,
                "rx-before-decap only",
            ),
            _ => (
                config(config_flags::FAST_RX_AFTER_DECAP),
                NEXTHOP_IP,
                "rx-after-decap only",
            ),
        },
        7 => (DatapathConfig::default(), NEXTHOP_IP, "unconfigured"),
        9 => (
            config(ALL_FAST | config_flags::HAVE_DECAP_L4_UDP),
            NEXTHOP_IP,
            "all + DECAP_L4_UDP flag",
        ),
        _ => (config(ALL_FAST), NEXTHOP_IP, "all"),
    }
}

/// What the oracle says about a redirect by `program` of case `p`.
fn redirect_allowed(
    h: &Harness,
    program: &str,
    p: &[u8],
    gso: Option<u32>,
    cfg: &DatapathConfig,
) -> Result<Allowed, String> {
    if cfg.enabled == 0 {
        return Err("datapath unconfigured".into());
    }
    match program {
        x if x == program_names::UPLINK_INGRESS => decap_allowed(h, p, gso, cfg.flags),
        x if x == program_names::VXLAN_INGRESS => deliver_allowed(h, p, cfg.flags),
        x if x == program_names::POD_INGRESS => encap_allowed(h, p, gso, cfg.flags),
        _ => Err("a learner never redirects".into()),
    }
}

fn check_output(
    program: &str,
    p: &[u8],
    out: &[u8],
    mark: u32,
    allowed: &Allowed,
) -> Result<(), String> {
    match program {
        x if x == program_names::UPLINK_INGRESS => {
            check_delivery_output(&p[INNER_IP..], out, allowed.pod_mac, p[15] & 3 == 3, mark)
        }
        x if x == program_names::VXLAN_INGRESS => {
            check_delivery_output(&p[14..], out, allowed.pod_mac, false, mark)
        }
        _ => {
            if mark != MARK {
                return Err("encap changed the mark".into());
            }
            check_encap_output(p, out)
        }
    }
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
        let (cfg, nexthop, mode) = batch_mode(batch_no);
        h.config.set(0, cfg, 0).expect("config");
        h.set_nexthop(nexthop);
        for program in FUZZED {
            // The learners of the previous program changed the flows: start from the table.
            h.reset_flows();
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
                let (ret, mark) = match result {
                    Ok(r) => r,
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
                        if mark != MARK {
                            findings.add(program, "pass changed the mark", p, case.gso);
                        }
                        if program == program_names::UPLINK_INGRESS
                            && cfg.enabled != 0
                            && let Some(how) = spoof_the_kernel_would_take(p)
                        {
                            findings.add(
                                program,
                                format!("spoofed VXLAN ({how}) passed to the kernel vxlan device"),
                                p,
                                case.gso,
                            );
                        }
                        if case.pristine
                            && let Ok(allowed) = redirect_allowed(&h, program, p, case.gso, &cfg)
                            && allowed.certain
                        {
                            findings.add(
                                program,
                                "an eligible template packet was not fast-pathed",
                                p,
                                case.gso,
                            );
                        }
                        "pass"
                    }
                    TC_ACT_SHOT => {
                        drops += 1;
                        if program != program_names::UPLINK_INGRESS {
                            findings.add(
                                program,
                                "only the uplink drops, and only spoofs",
                                p,
                                case.gso,
                            );
                        } else if cfg.enabled == 0 {
                            findings.add(program, "drop while unconfigured", p, case.gso);
                        } else if out != *p {
                            findings.add(program, "drop after changing the packet", p, case.gso);
                        }
                        "drop"
                    }
                    TC_ACT_REDIRECT => {
                        redirects += 1;
                        match redirect_allowed(&h, program, p, case.gso, &cfg) {
                            Err(why) => findings.add(
                                program,
                                format!("redirected although: {why}"),
                                p,
                                case.gso,
                            ),
                            Ok(allowed) => {
                                if let Err(why) = check_output(program, p, &out, mark, &allowed) {
                                    findings.add(program, why, p, case.gso);
                                }
                            }
                        }
                        redirect_bytes += if program == program_names::POD_INGRESS {
                            (p.len() - 14) as u64
                        } else {
                            (out.len() - 14) as u64
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
                            "redirect" => fast_counter(program) == Some(r as u32),
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
                    // encapsulate those synthetic GSO skbs (and 6.18 rejects DECAP_L4_UDP);
                    // any other helper error is a bug.
                    if moved == [stat::KERNEL_HELPER_ERROR as usize] && case.gso.is_none() {
                        findings.add(program, "helper error on a plain packet", p, case.gso);
                    }
                    if moved == [stat::DROP_HELPER_ERROR as usize] {
                        findings.add(
                            program,
                            "drop_helper_error (a half-done rewrite)",
                            p,
                            case.gso,
                        );
                    }
                    if verdict == "drop"
                        && moved == [stat::DROP_UNKNOWN_SOURCE as usize]
                        && !is_spoof_candidate(p)
                    {
                        findings.add(program, "drop_unknown_source of a non-spoof", p, case.gso);
                    }
                    if is_learner(program) && cfg.enabled != 0 {
                        let learned = moved == [stat::KERNEL_LEARNED as usize];
                        match learnable(program, p) {
                            Ok(()) if !learned => findings.add(
                                program,
                                format!("a learnable packet was not learned ({moved:?})"),
                                p,
                                case.gso,
                            ),
                            Err(why) if learned => findings.add(
                                program,
                                format!("learned although: {why}"),
                                p,
                                case.gso,
                            ),
                            _ => {}
                        }
                    }
                }
            }
            let after = h.stats();
            let delta: Vec<u64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
            let sum = |filter: &dyn Fn(usize) -> bool| -> u64 {
                (0..delta.len())
                    .filter(|&i| filter(i))
                    .map(|i| delta[i])
                    .sum()
            };
            let reason_sum = sum(&|i| stat::is_reason(i as u32));
            let pass_sum = sum(&|i| is_pass_reason(i));
            let drop_sum = sum(&|i| is_drop_reason(i));
            let own = fast_counter(program);
            let own_bytes = own.and_then(stat::bytes_of);
            let (own_packets, own_byte_count) = (
                own.map_or(0, |i| delta[i as usize]),
                own_bytes.map_or(0, |i| delta[i as usize]),
            );
            // Every other fast counter (packets and bytes) stays still.
            let others = sum(&|i| {
                (is_fast_reason(i) || stat::NAMES[i].starts_with("fast_"))
                    && Some(i as u32) != own
                    && Some(i as u32) != own_bytes
            });
            assert_eq!(
                (
                    reason_sum,
                    pass_sum,
                    drop_sum,
                    own_packets,
                    own_byte_count,
                    others
                ),
                (runs, passes, drops, redirects, redirect_bytes, 0),
                "{program} batch {batch_no} ({mode}): counters (sum, pass, drop, redirect, bytes, other fast counters) vs runs; delta {delta:?}"
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
        FUZZED.len()
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
    // The fuzz reached every fast path and every learner's learning (a map set-up or template
    // that stops doing so would make the oracle checks above vacuous).
    let floor = (packets as u64 / 1000).max(1);
    for program in FUZZED {
        let (index, what) = match fast_counter(program) {
            Some(i) => (i, "fast-path redirects"),
            None => (stat::KERNEL_LEARNED, "learned packets"),
        };
        let got = totals[program][index as usize];
        assert!(
            got >= floor,
            "{program}: only {got} {what} in {packets} packets (expected at least {floor})"
        );
    }
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
    p.extend(eth(vtep_mac, PEER_VTEP));
    p.extend(ipv4_header(
        0,
        0x1234,
        64,
        17,
        [10, 5, 2, 3],
        [10, 5, 1, 2],
        8 + data.len(),
    ));
    p.extend(udp(5000, 7777, data));
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
/// delivered: decapsulated by the program (R3, `bpf_redirect_peer` into the pod) when plain,
/// by the kernel device with IP options or fragmented. Sender and receiver are namespaces joined by a veth; the
/// receiver is a flannel node (flannel.1, cni0, a pod) with the decap program on its uplink.
#[test]
fn vxlan_from_a_source_without_lease_is_dropped_on_a_real_link() {
    let mut h = Harness::new();
    // Node 1 (192.168.100.1) is the receiver; node 2, on the other end of its eth0, sends
    // from the peer's address (its own, 192.168.100.2) and from a stranger's (.77).
    let mut cluster = Cluster::with(ClusterOptions {
        nodes: 2,
        underlay: UnderlayKind::DirectVeth,
        etcd: false,
        ..ClusterOptions::default()
    });
    // The pod's link at 1500: the fragmented shape's inner packet must fit it.
    cluster.nodes[0].add_pod("10.5.1.1/24", 1500);
    let receiver = &cluster.nodes[0];
    let (node, pod, sender) = (&receiver.ns, &receiver.pods[0].ns, &cluster.nodes[1].ns);
    sender.run(&["ip", "addr", "add", "192.168.100.77/24", "dev", "eth0"]);
    flanneld::add_device(node, receiver.ip, "10.5.1.0/24", Some("02:00:00:00:01:01"));
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
    for conf in ["all", "default", "flannel.1"] {
        // Slash form: the device name has a dot.
        node.sysctl(&format!("net/ipv4/conf/{conf}/rp_filter"), "0");
    }
    let socket = pod.enter(|| UdpSocket::bind("10.5.1.2:7777").expect("pod socket"));
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");

    // Control, no program attached: the kernel vxlan device accepts VXLAN from anyone, in
    // every shape, so the stranger's packets reach the pod (they are right; only the filter
    // can stop them).
    let in_before = udp_in_datagrams(node);
    for shape in [Shape::Plain, Shape::IpOptions, Shape::Fragmented] {
        let data = data_for(shape, "control");
        send_vxlan(
            sender,
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
        udp_in_datagrams(node) >= in_before + 3,
        "the kernel vxlan socket counts what it decapsulates (else the check below is vacuous)"
    );

    // The decap program on the node's uplink, configured with the real interfaces.
    // With R3 on and the flow of the test's datagrams learned (as the learners would have it
    // after a round trip through the kernel path), so that the peer's plain VXLAN is
    // decapsulated by the program and delivered with bpf_redirect_peer on the real link.
    let mut cfg = config(config_flags::FAST_RX_BEFORE_DECAP);
    cfg.uplink_ifindex = node.ifindex("eth0");
    cfg.vxlan_ifindex = node.ifindex("flannel.1");
    cfg.bridge_ifindex = node.ifindex("cni0");
    h.config.set(0, cfg, 0).expect("config");
    let vpod = node.ifindex(&receiver.pod_host_veths()[0]);
    let mac_of = |ns: &NetNs, dev: &str| -> [u8; 6] {
        let bytes: Vec<u8> = ns
            .mac(dev)
            .split(':')
            .map(|b| u8::from_str_radix(b, 16).expect("MAC byte"))
            .collect();
        bytes.try_into().expect("6-byte MAC")
    };
    h.endpoints
        .insert(
            [10, 5, 1, 2],
            Endpoint {
                host_ifindex: vpod,
                pod_mac: mac_of(pod, "eth0"),
                gateway_mac: mac_of(node, "cni0"),
                generation: 1,
            },
            0,
        )
        .expect("endpoint");
    let pod_flow = flow_key(POD_IP, REMOTE_POD, 7777, 5000, IPPROTO_UDP);
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
        let in_before = udp_in_datagrams(node);
        let stranger = data_for(shape, "stranger");
        send_vxlan(
            sender,
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
        let now = now_ns();
        h.flows
            .insert(
                pod_flow,
                FlowState {
                    egress_seen_ns: now,
                    ingress_seen_ns: now,
                    ingress_ifindex: vpod,
                    _pad: 0,
                },
                0,
            )
            .expect("learned flow");
        send_vxlan(sender, PEER_IP, &vxlan_payload(LOCAL_VTEP, &peer), shape);
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
                after[stat::FAST_RX_BEFORE_DECAP_PACKETS as usize]
                    - before[stat::FAST_RX_BEFORE_DECAP_PACKETS as usize],
                1,
                "the peer's packet is decapsulated by the program and delivered into the pod; counters moved: {moved:?}"
            );
            assert_eq!(
                udp_in_datagrams(node),
                in_before,
                "nothing reached the node's kernel vxlan socket (stranger dropped, peer decapsulated in BPF)"
            );
        } else {
            assert!(
                udp_in_datagrams(node) > in_before,
                "{shape:?}: the peer's packet took the kernel vxlan device"
            );
        }
    }
    assert!(receive(&socket).is_none(), "no further datagram at the pod");
}
