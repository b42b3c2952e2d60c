//! Packet-level tests of the fast-path eBPF programs through BPF_PROG_TEST_RUN: the real
//! programs, loaded by the agent's loader (so the kernel verifier accepts them), with maps set
//! up by the test (config, peers, peer sources, endpoints, learned flows), fed hand-built
//! packets. See ../../shared/design/fastpath.md (R1, R2, R3, R4).
//!
//! Needs root (CAP_BPF, CAP_NET_ADMIN): fails loudly otherwise; bpffs at /sys/fs/bpf is
//! mounted when missing.
//!
//! Notes on test-run:
//! - the program runs with skb->dev = loopback (ifindex 1): endpoints of "this veth" have
//!   host_ifindex 1 ([`HERE`]);
//! - `bpf_redirect_neigh` / `bpf_redirect_peer` only record the target and return
//!   TC_ACT_REDIRECT; nothing is transmitted, so the output bytes are the packet as the
//!   program left it (the outer Ethernet header of an encapsulated packet is filled in later
//!   by the neighbour layer);
//! - learned flows are fresh when their timestamps are recent `CLOCK_MONOTONIC` values (what
//!   `bpf_ktime_get_ns` returns).

mod bpf;

use aya::maps::lpm_trie::Key;
use bpf::*;
use overlay_agent::dataplane::ebpf::probe_decap_l4_udp;
use overlay_common::{
    DatapathConfig, Endpoint, FLOW_FRESH_NS, FlowKey, FlowState, PeerSource, config_flags,
    peer_flags, program_names, stat,
};
use overlay_tests::stats::moved;

/// A pod of an incomplete (not VALID) peer lease (10.5.3.0/24).
const INVALID_PEER_POD: [u8; 4] = [10, 5, 3, 4];
/// An address no peer has.
const NO_PEER_POD: [u8; 4] = [10, 5, 9, 3];

const UDP_POD_PORT: u16 = 40000;
const UDP_REMOTE_PORT: u16 = 5000;
const TCP_POD_PORT: u16 = 40001;
const TCP_REMOTE_PORT: u16 = 80;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;

/// The UDP flow between local address `pod`:40000 and remote address `remote`:5000.
fn udp_flow_of(pod: [u8; 4], remote: [u8; 4]) -> FlowKey {
    flow_key(pod, remote, UDP_POD_PORT, UDP_REMOTE_PORT, IPPROTO_UDP)
}

fn udp_flow() -> FlowKey {
    udp_flow_of(POD_IP, REMOTE_POD)
}

fn tcp_flow() -> FlowKey {
    flow_key(
        POD_IP,
        REMOTE_POD,
        TCP_POD_PORT,
        TCP_REMOTE_PORT,
        IPPROTO_TCP,
    )
}

/// Both directions seen through the kernel path just now, delivered through `ifindex`.
fn fresh_via(ifindex: u32) -> FlowState {
    let now = now_ns();
    FlowState {
        egress_seen_ns: now,
        ingress_seen_ns: now,
        ingress_ifindex: ifindex,
        _pad: 0,
    }
}

fn fresh() -> FlowState {
    fresh_via(HERE)
}

/// Per-run skb fields.
#[derive(Clone, Copy, Default)]
struct Ctx {
    gso_size: Option<u32>,
    mark: u32,
}

const PLAIN: Ctx = Ctx {
    gso_size: None,
    mark: 0,
};

fn gso(size: u32) -> Ctx {
    Ctx {
        gso_size: Some(size),
        mark: 0,
    }
}

struct Outcome {
    verdict: u32,
    out: Vec<u8>,
    /// `skb->mark` after the run.
    mark: u32,
}

impl Harness {
    /// Programs loaded, configured as node 10.5.1.0/24 (all fast paths on) with one valid
    /// peer 10.5.2.0/24 (next hop resolved) and one incomplete lease 10.5.3.0/24; our pod
    /// 10.5.1.2 behind this veth, pod 10.5.1.4 behind another; the UDP and the TCP flow
    /// between our pod and 10.5.2.3 learned just now.
    fn new() -> Self {
        let mut h = Self::load([0; 4]);
        h.learn(udp_flow(), fresh());
        h.learn(tcp_flow(), fresh());
        h
    }

    fn learn(&mut self, key: FlowKey, state: FlowState) {
        self.flows.insert(key, state, 0).expect("write flow");
    }

    fn forget(&mut self, key: FlowKey) {
        let _ = self.flows.remove(&key);
    }

    fn flow(&self, key: &FlowKey) -> Option<FlowState> {
        self.flows.get(key, 0).ok()
    }

    /// Runs `program` on `packet` with the given skb fields; returns the verdict, the packet
    /// as the program left it, and the skb mark afterwards.
    fn run(&mut self, program: &'static str, packet: &[u8], ctx: Ctx) -> Outcome {
        let mut out = Vec::new();
        let (verdict, mark) = self
            .test_run(program, packet, ctx.mark, ctx.gso_size, &mut out)
            .unwrap_or_else(|e| {
                panic!(
                    "BPF_PROG_TEST_RUN of {program} on a {}-byte packet (gso_size {:?}): {e:?}",
                    packet.len(),
                    ctx.gso_size
                )
            });
        Outcome { verdict, out, mark }
    }

    /// Runs and checks: the verdict, that exactly counter `reason` moved (by one; plus the
    /// matching byte counter for a fast path, by the inner IPv4 length), and for a pass or
    /// drop that the bytes and the mark are untouched. Returns the output packet.
    fn expect_ctx(
        &mut self,
        program: &'static str,
        packet: &[u8],
        ctx: Ctx,
        verdict: u32,
        reason: u32,
        what: &str,
    ) -> Outcome {
        let before = self.stats();
        let outcome = self.run(program, packet, ctx);
        let after = self.stats();
        let moved_now = moved(&before, &after);
        assert_eq!(
            outcome.verdict, verdict,
            "{program} ({what}): verdict; counters moved: {moved_now:?}"
        );
        let mut expected_moves = vec![(stat::NAMES[reason as usize], 1u64)];
        match stat::bytes_of(reason) {
            Some(bytes) => {
                let inner = if reason == stat::FAST_TX_PACKETS {
                    packet.len() - 14
                } else {
                    outcome.out.len() - 14
                };
                expected_moves.push((stat::NAMES[bytes as usize], inner as u64));
            }
            None => {
                assert_eq!(
                    outcome.out, packet,
                    "{program} ({what}): a pass/drop must leave the packet untouched"
                );
                assert_eq!(
                    outcome.mark, ctx.mark,
                    "{program} ({what}): a pass/drop must leave the mark alone"
                );
            }
        }
        expected_moves.sort();
        let mut actual = moved_now;
        actual.sort();
        assert_eq!(actual, expected_moves, "{program} ({what}): counters");
        outcome
    }

    fn expect(
        &mut self,
        program: &'static str,
        packet: &[u8],
        verdict: u32,
        reason: u32,
        what: &str,
    ) -> Vec<u8> {
        self.expect_ctx(program, packet, PLAIN, verdict, reason, what)
            .out
    }

    fn expect_pass(&mut self, program: &'static str, packet: &[u8], reason: u32, what: &str) {
        self.expect(program, packet, TC_ACT_UNSPEC, reason, what);
    }

    /// Delivery (R1, R3) of `good` (a packet of the learned UDP flow, to our pod) judges the
    /// flow's ingress direction: it must be fresh and learned through the endpoint's veth; the
    /// egress direction does not matter (a one-way stream to the pod). Runs `good` under each
    /// such flow state, expecting a redirect counted as `fast_reason` or a not-learned pass;
    /// then with the flow forgotten; leaves the flow learned fresh.
    fn expect_delivery_judges_the_ingress_direction(
        &mut self,
        prog: &'static str,
        good: &[u8],
        fast_reason: u32,
    ) {
        let stale = now_ns() - FLOW_FRESH_NS - 1_000_000_000;
        for (what, state, fast) in [
            (
                "ingress stale",
                FlowState {
                    ingress_seen_ns: stale,
                    ..fresh()
                },
                false,
            ),
            (
                "ingress never seen",
                FlowState {
                    ingress_seen_ns: 0,
                    ..fresh()
                },
                false,
            ),
            (
                "learned through another veth",
                fresh_via(OTHER_IFINDEX),
                false,
            ),
            (
                "egress stale",
                FlowState {
                    egress_seen_ns: stale,
                    ..fresh()
                },
                true,
            ),
            (
                "egress never seen (one-way flow)",
                FlowState {
                    egress_seen_ns: 0,
                    ..fresh()
                },
                true,
            ),
        ] {
            self.learn(udp_flow(), state);
            if fast {
                self.expect(prog, good, TC_ACT_REDIRECT, fast_reason, what);
            } else {
                self.expect_pass(prog, good, stat::KERNEL_NOT_LEARNED, what);
            }
        }
        self.forget(udp_flow());
        self.expect_pass(prog, good, stat::KERNEL_NOT_LEARNED, "never learned");
        self.learn(udp_flow(), fresh());
    }
}

// ---------------------------------------------------------------------------------------------
// Packet building

/// An option-less IPv4 header (id 0x4321, DF, checksum computed) followed by `payload`.
fn ipv4(tos: u8, ttl: u8, proto: u8, src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut h = ipv4_header(tos, 0x4321, ttl, proto, src, dst, payload.len());
    h.extend_from_slice(payload);
    h
}

/// A TCP segment (20-byte header, 4 bytes of data; the checksum is not the programs' business).
fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut t = sport.to_be_bytes().to_vec();
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0x10, 0, 0, 0, 0x20, 0]); // seq, ack
    t.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    t.extend_from_slice(b"data");
    t
}

/// Pod 10.5.1.2:40000 -> remote pod 10.5.2.3:5000, UDP "ping", TTL 64, DF, id 0x1234, as it
/// enters the host veth (to the bridge's MAC). Checksum 0x118b computed by hand.
fn pod_to_remote() -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&BRIDGE_MAC);
    p.extend_from_slice(&POD_MAC);
    p.extend_from_slice(&[0x08, 0x00]);
    p.extend_from_slice(&[
        0x45, 0x00, 0x00, 0x20, 0x12, 0x34, 0x40, 0x00, 0x40, 0x11, 0x11, 0x8b, 10, 5, 1, 2, 10, 5,
        2, 3,
    ]);
    p.extend_from_slice(&[
        0x9c, 0x40, 0x13, 0x88, 0x00, 0x0c, 0x00, 0x00, b'p', b'i', b'n', b'g',
    ]);
    p
}

/// Our pod's TCP segment of the learned TCP flow, entering the host veth.
fn pod_tcp(flags: u8) -> Vec<u8> {
    let mut p = eth(BRIDGE_MAC, POD_MAC);
    p.extend(ipv4(
        0,
        64,
        IPPROTO_TCP,
        POD_IP,
        REMOTE_POD,
        &tcp(TCP_POD_PORT, TCP_REMOTE_PORT, flags),
    ));
    p
}

/// A UDP "pong" from the remote side's port 5000 to the pod side's 40000, `src` -> `dst`, as
/// an IPv4 packet.
fn pong(src: [u8; 4], dst: [u8; 4], tos: u8, ttl: u8) -> Vec<u8> {
    ipv4(
        tos,
        ttl,
        IPPROTO_UDP,
        src,
        dst,
        &udp(UDP_REMOTE_PORT, UDP_POD_PORT, b"pong"),
    )
}

/// A UDP "ping" from the pod side's port 40000 to the remote side's 5000, `src` -> `dst`, as
/// an IPv4 packet.
fn ping(src: [u8; 4], dst: [u8; 4], ttl: u8) -> Vec<u8> {
    ipv4(
        0,
        ttl,
        IPPROTO_UDP,
        src,
        dst,
        &udp(UDP_POD_PORT, UDP_REMOTE_PORT, b"ping"),
    )
}

/// Remote pod 10.5.2.3:5000 -> our pod 10.5.1.2:40000, UDP "pong", as an IPv4 packet.
fn remote_udp(tos: u8, ttl: u8) -> Vec<u8> {
    pong(REMOTE_POD, POD_IP, tos, ttl)
}

/// An ICMP message of `icmp_type` (code 0, id 1, seq 1) from `src` to `dst` with `ttl`, in
/// an Ethernet frame `dst_mac` <- `src_mac`.
fn icmp_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    ttl: u8,
    src: [u8; 4],
    dst: [u8; 4],
    icmp_type: u8,
) -> Vec<u8> {
    let mut f = eth(dst_mac, src_mac);
    f.extend(ipv4(0, ttl, 1, src, dst, &[icmp_type, 0, 0, 0, 0, 1, 0, 1]));
    f
}

/// `frame` with the (outer) IPv4 header checksum broken (`flip` xored into its first byte).
fn bad_checksum_of(frame: &[u8], flip: u8) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[24] ^= flip;
    f
}

/// `frame` with MF set in its (outer) IPv4 header: a first fragment.
fn fragment_of(frame: &[u8]) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[20] = 0x20;
    fix_ip_checksum(&mut f, 14);
    f
}

/// `frame` with its (outer) IPv4 total length one byte longer than the frame.
fn length_beyond(frame: &[u8]) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[17] += 1;
    fix_ip_checksum(&mut f, 14);
    f
}

/// Remote pod 10.5.2.3:80 -> our pod 10.5.1.2:40001, TCP with `flags`.
fn remote_tcp(flags: u8) -> Vec<u8> {
    ipv4(
        0,
        64,
        IPPROTO_TCP,
        REMOTE_POD,
        POD_IP,
        &tcp(TCP_REMOTE_PORT, TCP_POD_PORT, flags),
    )
}

/// VXLAN from the peer node, as its flannel.1 sends it: outer Ethernet (our uplink MAC),
/// outer IPv4 `src` -> us with `outer_tos`, UDP 50000 -> 8472 (checksum computed or 0),
/// VXLAN I + VNI 1, inner Ethernet (our VtepMAC <- the peer's), then `inner_ip`.
fn vxlan_from(src: [u8; 4], outer_tos: u8, inner_ip: &[u8], udp_csum: bool) -> Vec<u8> {
    let mut vx = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
    vx.extend(eth(LOCAL_VTEP, PEER_VTEP));
    vx.extend_from_slice(inner_ip);
    let mut segment = udp(50000, 8472, &vx);
    if udp_csum {
        let c = udp_checksum(src, LOCAL_IP, &segment);
        segment[6..8].copy_from_slice(&c.to_be_bytes());
    }
    let mut outer = ipv4(outer_tos, 64, IPPROTO_UDP, src, LOCAL_IP, &segment);
    outer[6] = 0; // no DF, like the kernel device
    outer[4..6].copy_from_slice(&[0, 1]);
    fix_ip_checksum(&mut outer, 0);
    let mut f = eth(UPLINK_MAC, PEER_UPLINK_MAC);
    f.extend(outer);
    f
}

/// What flannel's kernel device on node 192.168.100.2 sends for remote pod 10.5.2.3:5000 ->
/// our pod 10.5.1.2:40000 (inner TTL 64, id 0x4321, checksum 0x209e; outer checksum 0x3146,
/// UDP checksum 0), written out by hand.
fn flannel_frame() -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&UPLINK_MAC);
    p.extend_from_slice(&PEER_UPLINK_MAC);
    p.extend_from_slice(&[0x08, 0x00]);
    p.extend_from_slice(&[
        0x45, 0x00, 0x00, 82, 0x00, 0x01, 0x00, 0x00, 64, 17, 0x31, 0x46, 192, 168, 100, 2, 192,
        168, 100, 1,
    ]);
    p.extend_from_slice(&[0xc3, 0x50, 0x21, 0x18, 0x00, 62, 0x00, 0x00]); // UDP 50000 -> 8472
    p.extend_from_slice(&[0x08, 0, 0, 0, 0x00, 0x00, 0x01, 0x00]); // VXLAN I, VNI 1
    p.extend_from_slice(&LOCAL_VTEP);
    p.extend_from_slice(&PEER_VTEP);
    p.extend_from_slice(&[0x08, 0x00]);
    p.extend_from_slice(&[
        0x45, 0x00, 0x00, 0x20, 0x43, 0x21, 0x00, 0x00, 64, 17, 0x20, 0x9e, 10, 5, 2, 3, 10, 5, 1,
        2,
    ]);
    p.extend_from_slice(&[
        0x13, 0x88, 0x9c, 0x40, 0x00, 0x0c, 0x00, 0x00, b'p', b'o', b'n', b'g',
    ]);
    p
}

/// The inner frame the pod must get for [`flannel_frame`]: pod MAC <- bridge MAC, TTL 63,
/// checksum 0x219e (by hand).
fn flannel_frame_delivered() -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&POD_MAC);
    p.extend_from_slice(&BRIDGE_MAC);
    p.extend_from_slice(&[0x08, 0x00]);
    p.extend_from_slice(&[
        0x45, 0x00, 0x00, 0x20, 0x43, 0x21, 0x00, 0x00, 63, 17, 0x21, 0x9e, 10, 5, 2, 3, 10, 5, 1,
        2,
    ]);
    p.extend_from_slice(&[
        0x13, 0x88, 0x9c, 0x40, 0x00, 0x0c, 0x00, 0x00, b'p', b'o', b'n', b'g',
    ]);
    p
}

/// What the kernel vxlan device hands its ingress after decapsulation (R1's input).
fn from_vxlan_device(inner_ip: &[u8]) -> Vec<u8> {
    let mut f = eth(LOCAL_VTEP, PEER_VTEP);
    f.extend_from_slice(inner_ip);
    f
}

/// What the kernel routes into the vxlan device (its egress, the egress learner's input):
/// inner Ethernet from the permanent neighbour, TTL already decremented.
fn into_vxlan_device(ip: &[u8]) -> Vec<u8> {
    let mut f = eth(PEER_VTEP, LOCAL_VTEP);
    f.extend_from_slice(ip);
    f
}

/// What the kernel delivers to the pod through the host veth (the ingress learner's input).
fn to_pod_veth(ip: &[u8]) -> Vec<u8> {
    let mut f = eth(POD_MAC, BRIDGE_MAC);
    f.extend_from_slice(ip);
    f
}

fn ip_of(frame: &[u8]) -> Vec<u8> {
    frame[14..].to_vec()
}

// ---------------------------------------------------------------------------------------------
// R2: encapsulation at the pod veth

/// Checks an R2 output against what flannel's device puts on the wire for `input`; returns
/// the UDP source port.
fn assert_flannel_encap(input: &[u8], out: &[u8]) -> u16 {
    assert_eq!(out.len(), input.len() + 50, "50 bytes of VXLAN overhead");
    // Outer Ethernet: left for redirect_neigh to fill in.
    assert_eq!(out[..14], input[..14], "outer Ethernet");
    // Outer IPv4: 45, tos from the inner ECN, total length, (id), no DF/fragment, TTL 64,
    // UDP, checksum, 192.168.100.1 -> 192.168.100.2.
    let outer_len = (input.len() - 14 + 50) as u16;
    let mut expected_outer = vec![0x45, 0x00];
    expected_outer.extend_from_slice(&outer_len.to_be_bytes());
    expected_outer.extend_from_slice(&out[18..20]); // id: random per packet
    expected_outer.extend_from_slice(&[0x00, 0x00, 64, 17, 0, 0]);
    expected_outer.extend_from_slice(&LOCAL_IP);
    expected_outer.extend_from_slice(&PEER_IP);
    let inner_ecn = input[15] & 3;
    expected_outer[1] = if inner_ecn == 3 { 2 } else { inner_ecn };
    let c = checksum(&expected_outer);
    expected_outer[10..12].copy_from_slice(&c.to_be_bytes());
    assert_eq!(out[14..34], expected_outer[..], "outer IPv4 header");
    // UDP: source port from the flow hash in the kernel vxlan range, dport 8472, length,
    // checksum 0.
    let sport = u16::from_be_bytes([out[34], out[35]]);
    assert!(
        (32768..60999).contains(&sport),
        "source port {sport} outside 32768-60998"
    );
    let mut expected_udp = vec![0x21, 0x18];
    expected_udp.extend_from_slice(&(outer_len - 20).to_be_bytes());
    expected_udp.extend_from_slice(&[0, 0]);
    assert_eq!(
        out[36..42],
        expected_udp[..],
        "UDP dport, length, checksum 0"
    );
    // VXLAN: I flag, VNI 1.
    assert_eq!(
        out[42..50],
        [0x08, 0, 0, 0, 0x00, 0x00, 0x01, 0x00],
        "VXLAN"
    );
    // Inner Ethernet: peer VtepMAC <- our VtepMAC, IPv4.
    assert_eq!(out[50..56], PEER_VTEP, "inner destination MAC");
    assert_eq!(out[56..62], LOCAL_VTEP, "inner source MAC");
    assert_eq!(out[62..64], [0x08, 0x00]);
    // Inner IPv4: routed (TTL - 1, checksum right), else as the pod sent it.
    let mut expected_inner = input[14..].to_vec();
    expected_inner[8] -= 1;
    fix_ip_checksum(&mut expected_inner, 0);
    assert_eq!(out[64..], expected_inner[..], "inner packet");
    sport
}

#[test]
fn r2_encap_produces_flannel_vxlan_bytes() {
    let mut h = Harness::new();
    let input = pod_to_remote();
    let out = h.expect(
        program_names::POD_INGRESS,
        &input,
        TC_ACT_REDIRECT,
        stat::FAST_TX_PACKETS,
        "learned UDP flow to a remote pod",
    );
    // Golden bytes, written by hand from the spec (except the random IP id and the hashed
    // source port, which are checked separately).
    let id = [out[18], out[19]];
    let sport = u16::from_be_bytes([out[34], out[35]]);
    assert!(
        (32768..60999).contains(&sport),
        "source port {sport} outside the kernel's 32768-60998"
    );
    let mut golden = Vec::new();
    golden.extend_from_slice(&input[..14]); // outer Ethernet: redirect_neigh fills it in
    let mut outer_ip = vec![
        0x45, 0x00, 0x00, 82, id[0], id[1], 0x00, 0x00, 64, 17, 0, 0, 192, 168, 100, 1, 192, 168,
        100, 2,
    ];
    // The outer checksum without the id is 0x4500 + 0x0052 + 0x4011 + 0xc0a8 + 0x6401 +
    // 0xc0a8 + 0x6402 (= 0x2ceb6, folded 0xceb8); the id adds to it.
    let sum = 0xceb8u32 + u32::from(u16::from_be_bytes(id));
    let folded = (sum & 0xffff) + (sum >> 16);
    outer_ip[10..12].copy_from_slice(&(!(folded as u16)).to_be_bytes());
    golden.extend_from_slice(&outer_ip);
    golden.extend_from_slice(&sport.to_be_bytes());
    golden.extend_from_slice(&[0x21, 0x18, 0x00, 62, 0x00, 0x00]); // 8472, length 62, csum 0
    golden.extend_from_slice(&[0x08, 0, 0, 0, 0x00, 0x00, 0x01, 0x00]); // VXLAN I, VNI 1
    golden.extend_from_slice(&PEER_VTEP);
    golden.extend_from_slice(&LOCAL_VTEP);
    golden.extend_from_slice(&[0x08, 0x00]);
    // Inner IPv4: as sent, TTL 63 (we routed it), checksum 0x128b (by hand).
    golden.extend_from_slice(&[
        0x45, 0x00, 0x00, 0x20, 0x12, 0x34, 0x40, 0x00, 0x3f, 0x11, 0x12, 0x8b, 10, 5, 1, 2, 10, 5,
        2, 3,
    ]);
    golden.extend_from_slice(&[
        0x9c, 0x40, 0x13, 0x88, 0x00, 0x0c, 0x00, 0x00, b'p', b'i', b'n', b'g',
    ]);
    assert_eq!(out, golden, "R2 output vs golden bytes");
    assert_eq!(checksum(&out[14..34]), 0, "outer IPv4 checksum must verify");
    assert_flannel_encap(&input, &out);

    // Same flow, same source port (ECMP/RSS stability).
    let again = h.run(program_names::POD_INGRESS, &input, PLAIN);
    assert_eq!(again.verdict, TC_ACT_REDIRECT);
    assert_eq!(
        again.out[34..36],
        out[34..36],
        "stable source port per flow"
    );

    // Without a resolved next hop the same bytes go out (bpf_redirect_neigh without nh).
    h.peers
        .insert(
            &Key::new(24, [10, 5, 2, 0]),
            peer(PEER_IP, peer_flags::VALID, [0; 4]),
            0,
        )
        .expect("peer without next hop");
    let out = h.expect(
        program_names::POD_INGRESS,
        &input,
        TC_ACT_REDIRECT,
        stat::FAST_TX_PACKETS,
        "no next hop yet",
    );
    assert_flannel_encap(&input, &out);
}

#[test]
fn r2_encap_of_tcp_and_ecn_like_the_kernel_device() {
    let mut h = Harness::new();
    let prog = program_names::POD_INGRESS;
    // A TCP ACK (and PSH|ACK) of the learned TCP flow.
    for flags in [TCP_ACK, TCP_ACK | TCP_PSH] {
        let input = pod_tcp(flags);
        let out = h.expect(
            prog,
            &input,
            TC_ACT_REDIRECT,
            stat::FAST_TX_PACKETS,
            "TCP data",
        );
        assert_flannel_encap(&input, &out);
    }
    // RFC 6040 / INET_ECN_encapsulate: the outer header carries the inner ECN field, CE as
    // ECT(0) (checked inside assert_flannel_encap); the inner keeps its own.
    for tos in [0x01u8, 0x02, 0x03, 0xb8, 0xbb] {
        let mut input = pod_to_remote();
        input[15] = tos;
        fix_ip_checksum(&mut input, 14);
        let out = h.expect(
            prog,
            &input,
            TC_ACT_REDIRECT,
            stat::FAST_TX_PACKETS,
            &format!("inner tos {tos:#04x}"),
        );
        assert_flannel_encap(&input, &out);
        assert_eq!(out[15], if tos & 3 == 3 { 2 } else { tos & 3 }, "outer tos");
    }
}

#[test]
fn r2_pass_reasons() {
    let mut h = Harness::new();
    let prog = program_names::POD_INGRESS;
    let good = pod_to_remote();
    h.expect(
        prog,
        &good,
        TC_ACT_REDIRECT,
        stat::FAST_TX_PACKETS,
        "control",
    );

    // Not learned: a new flow, and a flow whose egress direction (the one R2 takes) is not
    // fresh. Each direction is judged on its own: a stale or missing ingress direction does
    // not keep the pod's packets off the fast path (a one-way UDP stream).
    h.forget(udp_flow());
    h.expect_pass(prog, &good, stat::KERNEL_NOT_LEARNED, "flow never learned");
    let now = now_ns();
    let stale = now - FLOW_FRESH_NS - 1_000_000_000;
    for (what, egress, ingress, fast) in [
        ("egress never seen", 0, now, false),
        ("egress stale", stale, now, false),
        ("both stale", stale, stale, false),
        ("ingress never seen (one-way flow)", now, 0, true),
        ("ingress stale", now, stale, true),
    ] {
        h.learn(
            udp_flow(),
            FlowState {
                egress_seen_ns: egress,
                ingress_seen_ns: ingress,
                ingress_ifindex: HERE,
                _pad: 0,
            },
        );
        if fast {
            h.expect(prog, &good, TC_ACT_REDIRECT, stat::FAST_TX_PACKETS, what);
        } else {
            h.expect_pass(prog, &good, stat::KERNEL_NOT_LEARNED, what);
        }
    }
    // Another flow between the same pods (other port) is not the learned one.
    h.learn(udp_flow(), fresh());
    let mut other_port = good.clone();
    other_port[37] ^= 1;
    h.expect_pass(prog, &other_port, stat::KERNEL_NOT_LEARNED, "other port");

    // TCP SYN, FIN, RST of a learned flow: conntrack must see them.
    for flags in [
        TCP_SYN,
        TCP_SYN | TCP_ACK,
        TCP_FIN | TCP_ACK,
        TCP_RST,
        TCP_RST | TCP_ACK,
    ] {
        h.expect_pass(
            prog,
            &pod_tcp(flags),
            stat::KERNEL_TCP_CONTROL,
            &format!("TCP flags {flags:#04x}"),
        );
    }

    // The source is not the pod of this veth (unknown address, or another veth's pod), even
    // with a learned flow.
    for (what, src, mac) in [
        ("unknown endpoint", UNKNOWN_POD, POD_MAC),
        (
            "another veth's pod (its MAC)",
            OTHER_VETH_POD,
            OTHER_POD_MAC,
        ),
        ("our pod's address from another MAC", POD_IP, OTHER_POD_MAC),
    ] {
        h.learn(udp_flow_of(src, REMOTE_POD), fresh());
        let mut p = good.clone();
        p[6..12].copy_from_slice(&mac);
        p[26..30].copy_from_slice(&src);
        fix_ip_checksum(&mut p, 14);
        h.expect_pass(prog, &p, stat::KERNEL_NO_ENDPOINT, what);
    }

    // No (valid) peer for the destination, even with a learned flow.
    for (what, dst) in [
        ("no peer", NO_PEER_POD),
        ("incomplete peer lease", INVALID_PEER_POD),
        ("a local address", OTHER_VETH_POD),
    ] {
        h.learn(udp_flow_of(POD_IP, dst), fresh());
        let mut p = good.clone();
        p[30..34].copy_from_slice(&dst);
        fix_ip_checksum(&mut p, 14);
        h.expect_pass(prog, &p, stat::KERNEL_NO_ENDPOINT, what);
    }
    // A peer whose lease became incomplete.
    h.peers
        .insert(
            &Key::new(24, [10, 5, 2, 0]),
            peer(PEER_IP, 0, NEXTHOP_IP),
            0,
        )
        .expect("peer");
    h.expect_pass(prog, &good, stat::KERNEL_NO_ENDPOINT, "peer not VALID");
    h.peers
        .insert(
            &Key::new(24, [10, 5, 2, 0]),
            peer(PEER_IP, peer_flags::VALID, NEXTHOP_IP),
            0,
        )
        .expect("peer");

    // Too big for the underlay (uplink MTU - 50): non-GSO by length, exactly at the limit
    // is fine.
    let big = |len: usize| {
        let mut p = eth(BRIDGE_MAC, POD_MAC);
        p.extend(ipv4(
            0,
            64,
            IPPROTO_UDP,
            POD_IP,
            REMOTE_POD,
            &udp(UDP_POD_PORT, UDP_REMOTE_PORT, &vec![0x5a; len - 28]),
        ));
        p
    };
    let at_limit = big(MAX_INNER as usize);
    let out = h.expect(
        prog,
        &at_limit,
        TC_ACT_REDIRECT,
        stat::FAST_TX_PACKETS,
        "exactly max_inner_len",
    );
    assert_flannel_encap(&at_limit, &out);
    h.expect_pass(
        prog,
        &big(MAX_INNER as usize + 1),
        stat::KERNEL_TOO_BIG,
        "one byte over",
    );
    // Whatever the protocol or endpoint: the kernel path answers "frag needed".
    let mut big_icmp = eth(BRIDGE_MAC, POD_MAC);
    big_icmp.extend(ipv4(
        0,
        64,
        1,
        POD_IP,
        REMOTE_POD,
        &vec![0; MAX_INNER as usize - 19],
    ));
    h.expect_pass(prog, &big_icmp, stat::KERNEL_TOO_BIG, "big ICMP");

    // GSO: each segment must fit (gso_size + IPv4 + TCP header).
    let mut tcp_gso = eth(BRIDGE_MAC, POD_MAC);
    let mut segment = tcp(TCP_POD_PORT, TCP_REMOTE_PORT, TCP_ACK);
    segment.resize(20 + 1900, 0x5a);
    tcp_gso.extend(ipv4(0, 64, IPPROTO_TCP, POD_IP, REMOTE_POD, &segment));
    h.expect_ctx(
        prog,
        &tcp_gso,
        gso(MAX_INNER - 40 + 1),
        TC_ACT_UNSPEC,
        stat::KERNEL_TOO_BIG,
        "GSO segments one byte too big",
    );
    // Segments that fit go on to the encapsulation. Test-run can set gso_size but not
    // gso_type, and bpf_skb_adjust_room refuses to encapsulate a GSO skb that is not TCP
    // GSO: that is the helper-error path (packet passed untouched). Real GSO encap is
    // covered by the namespace tests.
    h.expect_ctx(
        prog,
        &tcp_gso,
        gso(MAX_INNER - 40),
        TC_ACT_UNSPEC,
        stat::KERNEL_HELPER_ERROR,
        "GSO segments that fit (synthetic GSO skb)",
    );
    // UDP GSO (UDP_SEGMENT senders) stays on the kernel path, whatever its size.
    h.expect_ctx(
        prog,
        &big(1000),
        gso(500),
        TC_ACT_UNSPEC,
        stat::KERNEL_GSO,
        "UDP GSO",
    );

    // Fragments: More Fragments, or an offset.
    for (what, frag) in [("MF", 0x20u8), ("offset", 0x00), ("MF + DF", 0x60)] {
        let mut p = good.clone();
        p[20] = frag;
        p[21] = if what == "offset" { 0x10 } else { 0 };
        fix_ip_checksum(&mut p, 14);
        h.expect_pass(prog, &p, stat::KERNEL_FRAGMENT, what);
    }

    // IP options (NOP NOP NOP EOL): the kernel's.
    let mut options = good[..34].to_vec();
    options.extend_from_slice(&[1, 1, 1, 0]);
    options.extend_from_slice(&good[34..]);
    options[14] = 0x46;
    options[17] += 4;
    fix_ip_checksum(&mut options, 14);
    h.expect_pass(prog, &options, stat::KERNEL_NOT_OURS, "IP options");

    // TTL would expire.
    let mut ttl1 = good.clone();
    ttl1[22] = 1;
    fix_ip_checksum(&mut ttl1, 14);
    h.expect_pass(prog, &ttl1, stat::KERNEL_TTL, "TTL 1");

    // Not ours: ARP, broadcast, multicast, ICMP, a bad header checksum, a bad total length.
    let mut arp = good.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    h.expect_pass(prog, &arp, stat::KERNEL_NOT_OURS, "ARP");
    let mut broadcast = good.clone();
    broadcast[..6].copy_from_slice(&[0xff; 6]);
    h.expect_pass(prog, &broadcast, stat::KERNEL_NOT_OURS, "broadcast");
    let mut multicast = good.clone();
    multicast[..6].copy_from_slice(&[0x01, 0x00, 0x5e, 0, 0, 1]);
    h.expect_pass(prog, &multicast, stat::KERNEL_NOT_OURS, "multicast");
    let icmp = icmp_frame(BRIDGE_MAC, POD_MAC, 64, POD_IP, REMOTE_POD, 8);
    h.expect_pass(prog, &icmp, stat::KERNEL_NOT_OURS, "ICMP");
    let bad_checksum = bad_checksum_of(&good, 0x40);
    h.expect_pass(prog, &bad_checksum, stat::KERNEL_NOT_OURS, "bad checksum");
    let bad_length = length_beyond(&good);
    h.expect_pass(
        prog,
        &bad_length,
        stat::KERNEL_NOT_OURS,
        "total length > frame",
    );

    // The piece switched off, and the datapath unconfigured.
    h.set_config(config(ALL_FAST & !config_flags::FAST_TX));
    h.expect_pass(prog, &good, stat::KERNEL_DISABLED, "FAST_TX off");
    h.set_config(DatapathConfig::default());
    h.expect_pass(prog, &good, stat::KERNEL_DISABLED, "unconfigured");
    h.set_config(config(ALL_FAST));
    h.expect(
        prog,
        &good,
        TC_ACT_REDIRECT,
        stat::FAST_TX_PACKETS,
        "control again",
    );
}

/// The pod's frames for the fast path are the ones it routes through its gateway (to the
/// bridge's MAC). A frame the pod addresses to another MAC (a router or firewall pod it uses
/// as next hop on the bridge, whose own forwarded copy made the flow look learned) must take
/// the kernel path, where the bridge switches it to that MAC; encapsulating it would bypass
/// that pod.
#[test]
fn r2_only_takes_frames_addressed_to_the_gateway() {
    let mut h = Harness::new();
    let mut to_router_pod = pod_to_remote();
    to_router_pod[..6].copy_from_slice(&OTHER_POD_MAC);
    h.expect_pass(
        program_names::POD_INGRESS,
        &to_router_pod,
        stat::KERNEL_NOT_OURS,
        "unicast frame to another pod's MAC",
    );
}

// ---------------------------------------------------------------------------------------------
// R3: decapsulation on the uplink

#[test]
fn r3_decap_of_a_flannel_frame_delivers_into_the_pod() {
    let mut h = Harness::new();
    let prog = program_names::UPLINK_INGRESS;
    let marked = Ctx {
        gso_size: None,
        mark: 0x0000_4000,
    };
    // UDP checksum 0 (BPF or kernel senders by default), hand-written bytes.
    let input = flannel_frame();
    assert_eq!(
        input,
        vxlan_from(PEER_IP, 0, &ip_of(&flannel_frame_delivered_input()), false),
        "the hand-written frame agrees with the builder"
    );
    let outcome = h.expect_ctx(
        prog,
        &input,
        marked,
        TC_ACT_REDIRECT,
        stat::FAST_RX_BEFORE_DECAP_PACKETS,
        "outer UDP checksum 0",
    );
    assert_eq!(outcome.out, flannel_frame_delivered(), "pod frame");
    assert_eq!(outcome.mark, 0, "mark cleared");

    // Outer UDP checksum computed (stock flannel senders): received all the same.
    let with_csum = vxlan_from(PEER_IP, 0, &ip_of(&flannel_frame_delivered_input()), true);
    assert_ne!(with_csum[40..42], [0, 0]);
    let outcome = h.expect_ctx(
        prog,
        &with_csum,
        marked,
        TC_ACT_REDIRECT,
        stat::FAST_RX_BEFORE_DECAP_PACKETS,
        "outer UDP checksum set",
    );
    assert_eq!(outcome.out, flannel_frame_delivered(), "pod frame");
    assert_eq!(outcome.mark, 0, "mark cleared");

    // TCP data of the learned TCP flow; a pod behind another veth gets its own MAC.
    for flags in [TCP_ACK, TCP_ACK | TCP_PSH] {
        let inner = remote_tcp(flags);
        let out = h.expect(
            prog,
            &vxlan_from(PEER_IP, 0, &inner, true),
            TC_ACT_REDIRECT,
            stat::FAST_RX_BEFORE_DECAP_PACKETS,
            "TCP data",
        );
        assert_eq!(out, delivered(&inner, POD_MAC));
    }
    h.learn(
        udp_flow_of(OTHER_VETH_POD, REMOTE_POD),
        fresh_via(OTHER_IFINDEX),
    );
    let inner = ipv4(
        0,
        64,
        IPPROTO_UDP,
        REMOTE_POD,
        OTHER_VETH_POD,
        &udp(UDP_REMOTE_PORT, UDP_POD_PORT, b"other"),
    );
    let out = h.expect(
        prog,
        &vxlan_from(PEER_IP, 0, &inner, false),
        TC_ACT_REDIRECT,
        stat::FAST_RX_BEFORE_DECAP_PACKETS,
        "pod behind another veth",
    );
    assert_eq!(out, delivered(&inner, OTHER_POD_MAC));
}

/// The inner IPv4 packet of [`flannel_frame`], as a frame (for the builder cross-check).
fn flannel_frame_delivered_input() -> Vec<u8> {
    flannel_frame()[50..].to_vec()
}

#[test]
fn r3_ecn_follows_rfc_6040() {
    let mut h = Harness::new();
    let prog = program_names::UPLINK_INGRESS;
    // Outer CE, inner ECT(0): the pod gets CE, TTL 63, checksum right. By hand: inner header
    // 45 02 ... checksum 0x209c in; 45 03 ... ttl 63 checksum 0x219b out.
    let inner = remote_udp(0x02, 64);
    let mut hand_inner = flannel_frame()[64..].to_vec();
    hand_inner[1] = 0x02;
    hand_inner[4..8].copy_from_slice(&[0x43, 0x21, 0x40, 0x00]);
    fix_ip_checksum(&mut hand_inner, 0);
    assert_eq!(inner, hand_inner, "builder agrees");
    let input = vxlan_from(PEER_IP, 0x03, &inner, false);
    let out = h.expect(
        prog,
        &input,
        TC_ACT_REDIRECT,
        stat::FAST_RX_BEFORE_DECAP_PACKETS,
        "outer CE, inner ECT(0)",
    );
    let mut expected = delivered(&inner, POD_MAC);
    expected[15] = 0x03;
    fix_ip_checksum(&mut expected, 14);
    assert_eq!(out, expected, "inner marked CE");
    assert_eq!(checksum(&out[14..34]), 0, "inner checksum verifies");
    assert_eq!(out[15], 0x03);

    // Outer CE, inner ECT(1) / CE: CE.
    for tos in [0x01u8, 0x03, 0xb9] {
        let inner = remote_udp(tos, 64);
        let out = h.expect(
            prog,
            &vxlan_from(PEER_IP, 0x03, &inner, true),
            TC_ACT_REDIRECT,
            stat::FAST_RX_BEFORE_DECAP_PACKETS,
            &format!("outer CE, inner tos {tos:#04x}"),
        );
        let mut expected = delivered(&inner, POD_MAC);
        expected[15] = tos | 0x03;
        fix_ip_checksum(&mut expected, 14);
        assert_eq!(out, expected, "inner tos {tos:#04x} marked CE");
    }

    // Outer ECT(0)/ECT(1)/not-ECT: the inner ECN stays as it is.
    for (outer, inner_tos) in [(0x02u8, 0x00u8), (0x01, 0x02), (0x02, 0x01), (0x00, 0x02)] {
        let inner = remote_udp(inner_tos, 64);
        let out = h.expect(
            prog,
            &vxlan_from(PEER_IP, outer, &inner, false),
            TC_ACT_REDIRECT,
            stat::FAST_RX_BEFORE_DECAP_PACKETS,
            &format!("outer {outer:#04x}, inner {inner_tos:#04x}"),
        );
        assert_eq!(out, delivered(&inner, POD_MAC), "inner ECN untouched");
    }

    // Outer CE, inner not-ECT: the kernel decides (RFC 6040: drop).
    for inner_tos in [0x00u8, 0xb8] {
        h.expect_pass(
            prog,
            &vxlan_from(PEER_IP, 0x03, &remote_udp(inner_tos, 64), false),
            stat::KERNEL_ECN,
            &format!("outer CE, inner not-ECT tos {inner_tos:#04x}"),
        );
    }
}

#[test]
fn r3_pass_and_drop_reasons() {
    let mut h = Harness::new();
    let prog = program_names::UPLINK_INGRESS;
    let good = flannel_frame();
    h.expect(
        prog,
        &good,
        TC_ACT_REDIRECT,
        stat::FAST_RX_BEFORE_DECAP_PACKETS,
        "control",
    );

    // Anti-spoof: VXLAN for us from an address that holds no lease, in every shape the kernel
    // device would take (plain, first fragment, IP options), and whatever the fast-path
    // flags say.
    let spoofed = vxlan_from(STRANGER_IP, 0, &ip_of(&good[50..]), false);
    h.expect(
        prog,
        &spoofed,
        TC_ACT_SHOT,
        stat::DROP_UNKNOWN_SOURCE,
        "stranger",
    );
    let mut spoofed_first_fragment = spoofed.clone();
    spoofed_first_fragment[20] = 0x20;
    fix_ip_checksum(&mut spoofed_first_fragment, 14);
    h.expect(
        prog,
        &spoofed_first_fragment,
        TC_ACT_SHOT,
        stat::DROP_UNKNOWN_SOURCE,
        "stranger, first fragment",
    );
    let with_options = |frame: &[u8]| {
        let mut p = frame[..34].to_vec();
        p.extend_from_slice(&[1, 1, 1, 0]);
        p.extend_from_slice(&frame[34..]);
        p[14] = 0x46;
        p[17] += 4;
        fix_ip_checksum(&mut p, 14);
        p
    };
    h.expect(
        prog,
        &with_options(&spoofed),
        TC_ACT_SHOT,
        stat::DROP_UNKNOWN_SOURCE,
        "stranger, IP options",
    );
    h.set_config(config(0));
    h.expect(
        prog,
        &spoofed,
        TC_ACT_SHOT,
        stat::DROP_UNKNOWN_SOURCE,
        "stranger, fast paths off",
    );
    h.set_config(config(ALL_FAST));
    // A later fragment has no UDP header: the kernel drops it unless the first one came.
    let mut later_fragment = spoofed.clone();
    later_fragment[21] = 0x10;
    fix_ip_checksum(&mut later_fragment, 14);
    h.expect_pass(
        prog,
        &later_fragment,
        stat::KERNEL_FRAGMENT,
        "later fragment",
    );

    // From the peer: fragments and options go to the kernel (it reassembles/parses).
    let fragment = fragment_of(&good);
    h.expect_pass(
        prog,
        &fragment,
        stat::KERNEL_FRAGMENT,
        "peer's first fragment",
    );
    h.expect_pass(
        prog,
        &with_options(&good),
        stat::KERNEL_NOT_OURS,
        "peer's outer IP options",
    );

    // Not VXLAN for us.
    let mut wrong_vni = good.clone();
    wrong_vni[48] = 2;
    h.expect_pass(prog, &wrong_vni, stat::KERNEL_NOT_OURS, "wrong VNI");
    let mut wrong_port = good.clone();
    wrong_port[36..38].copy_from_slice(&4789u16.to_be_bytes());
    h.expect_pass(prog, &wrong_port, stat::KERNEL_NOT_OURS, "wrong port");
    let mut no_i_flag = good.clone();
    no_i_flag[42] = 0;
    h.expect_pass(prog, &no_i_flag, stat::KERNEL_NOT_OURS, "no I flag");
    for (what, at) in [
        ("GBP flag", 42usize),
        ("reserved", 44),
        ("last reserved", 49),
    ] {
        let mut p = good.clone();
        p[at] |= 0x80;
        h.expect_pass(prog, &p, stat::KERNEL_NOT_OURS, what);
    }
    let mut other_dst = good.clone();
    other_dst[33] = 9;
    fix_ip_checksum(&mut other_dst, 14);
    h.expect_pass(prog, &other_dst, stat::KERNEL_NOT_OURS, "outer dst not us");
    let mut arp = good.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    h.expect_pass(prog, &arp, stat::KERNEL_NOT_OURS, "ARP");
    let mut inner_not_ours = good.clone();
    inner_not_ours[50..56].copy_from_slice(&[0x02, 9, 9, 9, 9, 9]);
    h.expect_pass(
        prog,
        &inner_not_ours,
        stat::KERNEL_NOT_OURS,
        "inner dst MAC not our VtepMAC",
    );
    let mut inner_arp = good.clone();
    inner_arp[62..64].copy_from_slice(&[0x08, 0x06]);
    h.expect_pass(prog, &inner_arp, stat::KERNEL_NOT_OURS, "inner ARP");
    let mut inner_options = good[..84].to_vec();
    inner_options.extend_from_slice(&[1, 1, 1, 0]);
    inner_options.extend_from_slice(&good[84..]);
    inner_options[64] = 0x46;
    inner_options[67] += 4;
    inner_options[17] += 4;
    inner_options[39] += 4;
    fix_ip_checksum(&mut inner_options, 64);
    fix_ip_checksum(&mut inner_options, 14);
    h.expect_pass(
        prog,
        &inner_options,
        stat::KERNEL_NOT_OURS,
        "inner IP options",
    );
    let mut inner_fragment = good.clone();
    inner_fragment[70] = 0x20;
    fix_ip_checksum(&mut inner_fragment, 64);
    h.expect_pass(
        prog,
        &inner_fragment,
        stat::KERNEL_FRAGMENT,
        "inner fragment",
    );

    // What ip_rcv/udp_rcv would drop is not delivered behind their back.
    let mut bad_outer = good.clone();
    bad_outer[24] ^= 0x10;
    h.expect_pass(
        prog,
        &bad_outer,
        stat::KERNEL_NOT_OURS,
        "bad outer checksum",
    );
    let mut bad_inner = good.clone();
    bad_inner[74] ^= 0x10;
    h.expect_pass(
        prog,
        &bad_inner,
        stat::KERNEL_NOT_OURS,
        "bad inner checksum",
    );
    let mut udp_len = good.clone();
    udp_len[39] -= 1;
    h.expect_pass(prog, &udp_len, stat::KERNEL_NOT_OURS, "UDP length");
    let mut outer_len = good.clone();
    outer_len[17] += 1;
    fix_ip_checksum(&mut outer_len, 14);
    h.expect_pass(
        prog,
        &outer_len,
        stat::KERNEL_NOT_OURS,
        "outer length > frame",
    );

    // Truncated at every header boundary (test-run refuses IPv4 frames shorter than 34).
    for len in [34, 40, 42, 48, 50, 60, 64, 70, 83] {
        h.expect_pass(
            prog,
            &good[..len],
            stat::KERNEL_TRUNCATED,
            &format!("truncated to {len}"),
        );
    }
    for len in [84, 88, 92] {
        h.expect_pass(
            prog,
            &good[..len],
            stat::KERNEL_NOT_OURS,
            &format!("inner L4 cut to {len}"),
        );
    }

    // Flow eligibility.
    for (what, dst) in [
        ("unknown endpoint", UNKNOWN_POD),
        ("the gateway", [10, 5, 1, 1]),
    ] {
        h.learn(udp_flow_of(dst, REMOTE_POD), fresh());
        let inner = pong(REMOTE_POD, dst, 0, 64);
        h.expect_pass(
            prog,
            &vxlan_from(PEER_IP, 0, &inner, false),
            stat::KERNEL_NO_ENDPOINT,
            what,
        );
    }
    for flags in [TCP_SYN | TCP_ACK, TCP_FIN | TCP_ACK, TCP_RST] {
        h.expect_pass(
            prog,
            &vxlan_from(PEER_IP, 0, &remote_tcp(flags), false),
            stat::KERNEL_TCP_CONTROL,
            &format!("TCP flags {flags:#04x}"),
        );
    }
    h.expect_delivery_judges_the_ingress_direction(prog, &good, stat::FAST_RX_BEFORE_DECAP_PACKETS);
    let mut ttl1 = good.clone();
    ttl1[72] = 1;
    fix_ip_checksum(&mut ttl1, 64);
    h.expect_pass(prog, &ttl1, stat::KERNEL_TTL, "inner TTL 1");

    // The piece switched off: the kernel's device decapsulates (anti-spoof still ran).
    h.set_config(config(ALL_FAST & !config_flags::FAST_RX_BEFORE_DECAP));
    h.expect_pass(
        prog,
        &good,
        stat::KERNEL_DISABLED,
        "FAST_RX_BEFORE_DECAP off",
    );
    h.set_config(DatapathConfig::default());
    h.expect_pass(prog, &good, stat::KERNEL_DISABLED, "unconfigured");
    h.expect_pass(
        prog,
        &spoofed,
        stat::KERNEL_DISABLED,
        "unconfigured stranger",
    );
    h.set_config(config(ALL_FAST));

    // Removing the peer source turns its traffic into drops.
    h.sources.remove(&PEER_IP).expect("remove source");
    h.expect(
        prog,
        &good,
        TC_ACT_SHOT,
        stat::DROP_UNKNOWN_SOURCE,
        "source removed",
    );
}

#[test]
fn r3_leaves_gso_to_the_kernel_on_this_kernel() {
    let mut h = Harness::new();
    let prog = program_names::UPLINK_INGRESS;
    let udp_frame = flannel_frame();
    let tcp_frame = vxlan_from(PEER_IP, 0, &remote_tcp(TCP_ACK), true);
    for (what, frame) in [("inner UDP", &udp_frame), ("inner TCP", &tcp_frame)] {
        h.expect_ctx(
            prog,
            frame,
            gso(1400),
            TC_ACT_UNSPEC,
            stat::KERNEL_GSO,
            &format!("GRO-merged VXLAN, {what}"),
        );
    }
    // With DECAP_L4_UDP: inner UDP GSO still stays on the kernel path; inner TCP is
    // decapsulated with the flag, which 6.18 rejects (the helper fails before any change).
    h.set_config(config(ALL_FAST | config_flags::HAVE_DECAP_L4_UDP));
    h.expect_ctx(
        prog,
        &udp_frame,
        gso(1400),
        TC_ACT_UNSPEC,
        stat::KERNEL_GSO,
        "inner UDP GSO with DECAP_L4_UDP",
    );
    h.expect_ctx(
        prog,
        &tcp_frame,
        gso(1400),
        TC_ACT_UNSPEC,
        stat::KERNEL_HELPER_ERROR,
        "inner TCP GSO with DECAP_L4_UDP on a kernel without it",
    );
    // Non-GSO is unaffected by the flag.
    h.expect(
        prog,
        &udp_frame,
        TC_ACT_REDIRECT,
        stat::FAST_RX_BEFORE_DECAP_PACKETS,
        "non-GSO",
    );
}

#[test]
fn r2_output_decapsulates_on_the_peer() {
    let mut h = Harness::new();
    let input = pod_to_remote();
    let encapped = h.run(program_names::POD_INGRESS, &input, PLAIN);
    assert_eq!(encapped.verdict, TC_ACT_REDIRECT);
    // Reconfigure as the peer node (its pod 10.5.2.3 here, flow learned) and feed it the
    // encapsulated packet.
    let mut peer_cfg = config(ALL_FAST);
    peer_cfg.local_ip = PEER_IP;
    peer_cfg.subnet_addr = [10, 5, 2, 0];
    peer_cfg.gateway_ip = [10, 5, 2, 1];
    peer_cfg.vtep_mac = PEER_VTEP;
    h.set_config(peer_cfg);
    h.sources
        .insert(
            LOCAL_IP,
            PeerSource {
                lease_count: 1,
                generation: 1,
            },
            0,
        )
        .expect("source");
    h.endpoints
        .insert(
            REMOTE_POD,
            Endpoint {
                host_ifindex: HERE,
                pod_mac: OTHER_POD_MAC,
                gateway_mac: BRIDGE_MAC,
                generation: 1,
            },
            0,
        )
        .expect("endpoint");
    h.learn(
        flow_key(
            REMOTE_POD,
            POD_IP,
            UDP_REMOTE_PORT,
            UDP_POD_PORT,
            IPPROTO_UDP,
        ),
        fresh(),
    );
    let out = h.expect(
        program_names::UPLINK_INGRESS,
        &encapped.out,
        TC_ACT_REDIRECT,
        stat::FAST_RX_BEFORE_DECAP_PACKETS,
        "our encap on the peer",
    );
    // Routed twice: TTL 62.
    let mut expected = delivered(&encapped.out[64..], OTHER_POD_MAC);
    assert_eq!(expected[22], 62);
    fix_ip_checksum(&mut expected, 14);
    assert_eq!(out, expected);
}

// ---------------------------------------------------------------------------------------------
// R1: delivery after the kernel's decap

#[test]
fn r1_delivers_what_the_kernel_decapsulated() {
    let mut h = Harness::new();
    let prog = program_names::VXLAN_INGRESS;
    let marked = Ctx {
        gso_size: None,
        mark: 0x0000_4000,
    };
    let input = from_vxlan_device(&flannel_frame()[64..]);
    let outcome = h.expect_ctx(
        prog,
        &input,
        marked,
        TC_ACT_REDIRECT,
        stat::FAST_RX_AFTER_DECAP_PACKETS,
        "learned UDP flow",
    );
    assert_eq!(
        outcome.out,
        flannel_frame_delivered(),
        "pod frame (by hand)"
    );
    assert_eq!(outcome.mark, 0, "mark cleared");
    // TCP data; GSO packets too (the kernel cleared the tunnel GSO state).
    let inner = remote_tcp(TCP_ACK);
    let out = h.expect(
        prog,
        &from_vxlan_device(&inner),
        TC_ACT_REDIRECT,
        stat::FAST_RX_AFTER_DECAP_PACKETS,
        "TCP data",
    );
    assert_eq!(out, delivered(&inner, POD_MAC));
    let mut big = remote_tcp(TCP_ACK);
    big.resize(2000, 0x5a);
    big[2..4].copy_from_slice(&2000u16.to_be_bytes());
    fix_ip_checksum(&mut big, 0);
    let outcome = h.expect_ctx(
        prog,
        &from_vxlan_device(&big),
        gso(1448),
        TC_ACT_REDIRECT,
        stat::FAST_RX_AFTER_DECAP_PACKETS,
        "TCP GSO",
    );
    assert_eq!(outcome.out, delivered(&big, POD_MAC));
    // A UDP GSO packet as well (the kernel device's output is a plain local GSO skb).
    let mut big_udp = remote_udp(0, 64);
    big_udp.resize(2000, 0x5a);
    big_udp[2..4].copy_from_slice(&2000u16.to_be_bytes());
    big_udp[24..26].copy_from_slice(&1980u16.to_be_bytes());
    fix_ip_checksum(&mut big_udp, 0);
    let outcome = h.expect_ctx(
        prog,
        &from_vxlan_device(&big_udp),
        gso(1400),
        TC_ACT_REDIRECT,
        stat::FAST_RX_AFTER_DECAP_PACKETS,
        "UDP GSO",
    );
    assert_eq!(outcome.out, delivered(&big_udp, POD_MAC));
}

#[test]
fn r1_pass_reasons() {
    let mut h = Harness::new();
    let prog = program_names::VXLAN_INGRESS;
    let inner = remote_udp(0, 64);
    let good = from_vxlan_device(&inner);
    h.expect(
        prog,
        &good,
        TC_ACT_REDIRECT,
        stat::FAST_RX_AFTER_DECAP_PACKETS,
        "control",
    );

    let mut not_our_mac = good.clone();
    not_our_mac[..6].copy_from_slice(&[0x02, 9, 9, 9, 9, 9]);
    h.expect_pass(
        prog,
        &not_our_mac,
        stat::KERNEL_NOT_OURS,
        "not to our VtepMAC",
    );
    let mut broadcast = good.clone();
    broadcast[..6].copy_from_slice(&[0xff; 6]);
    h.expect_pass(prog, &broadcast, stat::KERNEL_NOT_OURS, "broadcast");
    let mut arp = good.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    h.expect_pass(prog, &arp, stat::KERNEL_NOT_OURS, "ARP");
    let mut options = good[..34].to_vec();
    options.extend_from_slice(&[1, 1, 1, 0]);
    options.extend_from_slice(&good[34..]);
    options[14] = 0x46;
    options[17] += 4;
    fix_ip_checksum(&mut options, 14);
    h.expect_pass(prog, &options, stat::KERNEL_NOT_OURS, "IP options");
    let icmp = icmp_frame(LOCAL_VTEP, PEER_VTEP, 64, REMOTE_POD, POD_IP, 0);
    h.expect_pass(prog, &icmp, stat::KERNEL_NOT_OURS, "ICMP");
    let bad_checksum = bad_checksum_of(&good, 0x20);
    h.expect_pass(prog, &bad_checksum, stat::KERNEL_NOT_OURS, "bad checksum");
    let bad_length = length_beyond(&good);
    h.expect_pass(
        prog,
        &bad_length,
        stat::KERNEL_NOT_OURS,
        "total length > frame",
    );
    let fragment = fragment_of(&good);
    h.expect_pass(prog, &fragment, stat::KERNEL_FRAGMENT, "fragment");
    // (Test-run refuses IPv4 frames shorter than 14 + 20 bytes: no truncated-header case.)
    h.expect_pass(prog, &good[..36], stat::KERNEL_NOT_OURS, "no UDP ports");

    let unknown = pong(REMOTE_POD, UNKNOWN_POD, 0, 64);
    h.learn(udp_flow_of(UNKNOWN_POD, REMOTE_POD), fresh());
    h.expect_pass(
        prog,
        &from_vxlan_device(&unknown),
        stat::KERNEL_NO_ENDPOINT,
        "unknown endpoint",
    );
    for flags in [TCP_SYN | TCP_ACK, TCP_FIN, TCP_RST | TCP_ACK] {
        h.expect_pass(
            prog,
            &from_vxlan_device(&remote_tcp(flags)),
            stat::KERNEL_TCP_CONTROL,
            &format!("TCP flags {flags:#04x}"),
        );
    }
    h.expect_delivery_judges_the_ingress_direction(prog, &good, stat::FAST_RX_AFTER_DECAP_PACKETS);
    h.expect_pass(
        prog,
        &from_vxlan_device(&remote_udp(0, 1)),
        stat::KERNEL_TTL,
        "TTL 1",
    );

    h.set_config(config(ALL_FAST & !config_flags::FAST_RX_AFTER_DECAP));
    h.expect_pass(
        prog,
        &good,
        stat::KERNEL_DISABLED,
        "FAST_RX_AFTER_DECAP off",
    );
    h.set_config(DatapathConfig::default());
    h.expect_pass(prog, &good, stat::KERNEL_DISABLED, "unconfigured");
    h.set_config(config(ALL_FAST));
    h.expect(
        prog,
        &good,
        TC_ACT_REDIRECT,
        stat::FAST_RX_AFTER_DECAP_PACKETS,
        "control again",
    );
}

// ---------------------------------------------------------------------------------------------
// R4: learning

fn assert_between(what: &str, value: u64, low: u64, high: u64) {
    assert!(
        (low..=high).contains(&value),
        "{what}: {value} not within [{low}, {high}] (bpf_ktime_get_ns of the run)"
    );
}

#[test]
fn vxlan_egress_learns_the_egress_tuple() {
    let mut h = Harness::new();
    let prog = program_names::VXLAN_EGRESS;
    h.forget(udp_flow());
    // The kernel routed our pod's UDP packet into flannel.1 (TTL already 63).
    let leaving = into_vxlan_device(&ping(POD_IP, REMOTE_POD, 63));
    let before = now_ns();
    h.expect_pass(prog, &leaving, stat::KERNEL_LEARNED, "new flow");
    let after = now_ns();
    let state = h.flow(&udp_flow()).expect("the egress tuple is learned");
    assert_between("egress_seen_ns", state.egress_seen_ns, before, after);
    assert_eq!(state.ingress_seen_ns, 0, "ingress not seen yet");
    assert_eq!(state.ingress_ifindex, 0);

    // An existing entry: only the egress stamp moves.
    let old = FlowState {
        egress_seen_ns: 1,
        ingress_seen_ns: 12345,
        ingress_ifindex: 7,
        _pad: 0,
    };
    h.learn(udp_flow(), old);
    let before = now_ns();
    h.expect_pass(prog, &leaving, stat::KERNEL_LEARNED, "known flow");
    let after = now_ns();
    let state = h.flow(&udp_flow()).expect("flow");
    assert_between("egress_seen_ns", state.egress_seen_ns, before, after);
    assert_eq!(
        (state.ingress_seen_ns, state.ingress_ifindex),
        (12345, 7),
        "the ingress half is kept"
    );

    // TCP (a SYN too: learning sees every packet the kernel sent).
    h.forget(tcp_flow());
    let syn = into_vxlan_device(&ipv4(
        0,
        63,
        IPPROTO_TCP,
        POD_IP,
        REMOTE_POD,
        &tcp(TCP_POD_PORT, TCP_REMOTE_PORT, TCP_SYN),
    ));
    h.expect_pass(prog, &syn, stat::KERNEL_LEARNED, "TCP SYN");
    assert!(h.flow(&tcp_flow()).is_some_and(|s| s.egress_seen_ns != 0));

    // Nothing to learn: NATed traffic (DNAT to a Service that is not a pod, masqueraded
    // host traffic), pods we do not know, remote addresses that are no pod.
    for (what, src, dst) in [
        ("masqueraded source", LOCAL_IP, REMOTE_POD),
        ("unknown local source", UNKNOWN_POD, REMOTE_POD),
        ("destination not a remote pod", POD_IP, [10, 96, 0, 10]),
        ("incomplete peer", POD_IP, INVALID_PEER_POD),
    ] {
        let p = into_vxlan_device(&ping(src, dst, 63));
        h.expect_pass(prog, &p, stat::KERNEL_NO_ENDPOINT, what);
        assert!(
            h.flow(&udp_flow_of(src, dst)).is_none(),
            "{what}: nothing learned"
        );
    }
    h.forget(udp_flow());
    let fragment = fragment_of(&leaving);
    h.expect_pass(prog, &fragment, stat::KERNEL_FRAGMENT, "fragment");
    let icmp = icmp_frame(PEER_VTEP, LOCAL_VTEP, 63, POD_IP, REMOTE_POD, 8);
    h.expect_pass(prog, &icmp, stat::KERNEL_NOT_OURS, "ICMP");
    let mut arp = leaving.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    h.expect_pass(prog, &arp, stat::KERNEL_NOT_OURS, "ARP");
    h.expect_pass(prog, &leaving[..36], stat::KERNEL_TRUNCATED, "no UDP ports");
    h.set_config(DatapathConfig::default());
    h.expect_pass(prog, &leaving, stat::KERNEL_DISABLED, "unconfigured");
    assert!(h.flow(&udp_flow()).is_none(), "nothing learned");
    // Learning runs whatever fast-path pieces are on.
    h.set_config(config(0));
    h.expect_pass(prog, &leaving, stat::KERNEL_LEARNED, "fast paths off");
}

#[test]
fn pod_egress_learns_the_ingress_tuple_and_veth() {
    let mut h = Harness::new();
    let prog = program_names::POD_EGRESS;
    h.forget(udp_flow());
    // The kernel delivers the remote pod's packet to our pod (TTL 63 after routing).
    let arriving = to_pod_veth(&remote_udp(0, 63));
    let before = now_ns();
    h.expect_pass(prog, &arriving, stat::KERNEL_LEARNED, "new flow");
    let after = now_ns();
    let state = h.flow(&udp_flow()).expect("the ingress tuple is learned");
    assert_between("ingress_seen_ns", state.ingress_seen_ns, before, after);
    assert_eq!(state.ingress_ifindex, HERE, "through this veth");
    assert_eq!(state.egress_seen_ns, 0);

    // An existing entry: the ingress half moves, the egress stamp stays.
    h.learn(
        udp_flow(),
        FlowState {
            egress_seen_ns: 4242,
            ingress_seen_ns: 1,
            ingress_ifindex: OTHER_IFINDEX,
            _pad: 0,
        },
    );
    let before = now_ns();
    h.expect_pass(prog, &arriving, stat::KERNEL_LEARNED, "known flow");
    let after = now_ns();
    let state = h.flow(&udp_flow()).expect("flow");
    assert_between("ingress_seen_ns", state.ingress_seen_ns, before, after);
    assert_eq!(state.ingress_ifindex, HERE);
    assert_eq!(state.egress_seen_ns, 4242, "the egress half is kept");

    // TCP.
    h.forget(tcp_flow());
    h.expect_pass(
        prog,
        &to_pod_veth(&remote_tcp(TCP_SYN | TCP_ACK)),
        stat::KERNEL_LEARNED,
        "TCP SYN-ACK",
    );
    assert!(
        h.flow(&tcp_flow())
            .is_some_and(|s| s.ingress_ifindex == HERE)
    );

    // Nothing to learn: a reply un-NATed from a Service address, a pod behind another veth
    // (not where this veth delivers), an unknown address, a local sender.
    for (what, src, dst) in [
        ("un-DNATed Service reply", [10, 96, 0, 10], POD_IP),
        ("pod behind another veth", REMOTE_POD, OTHER_VETH_POD),
        ("unknown pod", REMOTE_POD, UNKNOWN_POD),
        ("local sender", OTHER_VETH_POD, POD_IP),
        ("node address", LOCAL_IP, POD_IP),
        (
            "a stale endpoint (the pod's MAC changed)",
            REMOTE_POD,
            POD_IP,
        ),
    ] {
        let mut p = to_pod_veth(&pong(src, dst, 0, 63));
        // Frames to the destination's real MAC (only the checked property differs).
        if dst == OTHER_VETH_POD {
            p[..6].copy_from_slice(&OTHER_POD_MAC);
        }
        if what.starts_with("a stale endpoint") {
            p[..6].copy_from_slice(&[0x02, 0xcc, 0xcc, 0xcc, 0xcc, 0x02]);
            h.forget(udp_flow());
        }
        h.expect_pass(prog, &p, stat::KERNEL_NO_ENDPOINT, what);
        assert!(
            h.flow(&udp_flow_of(dst, src)).is_none(),
            "{what}: nothing learned"
        );
    }
    h.forget(udp_flow());
    let fragment = fragment_of(&arriving);
    h.expect_pass(prog, &fragment, stat::KERNEL_FRAGMENT, "fragment");
    h.set_config(DatapathConfig::default());
    h.expect_pass(prog, &arriving, stat::KERNEL_DISABLED, "unconfigured");
    assert!(h.flow(&udp_flow()).is_none(), "nothing learned");
}

/// Learn-then-bypass end to end: no fast path until the learners saw the flow; each
/// direction opens once its own learner saw it (the pod's packets leaving through flannel.1:
/// R2; the kernel delivering to the pod: R1 and R3).
#[test]
fn learning_each_direction_opens_its_fast_paths() {
    let mut h = Harness::new();
    h.forget(udp_flow());
    let out_of_pod = pod_to_remote();
    let from_peer = flannel_frame();
    let decapsulated = from_vxlan_device(&flannel_frame()[64..]);
    let check_all = |h: &mut Harness, tx: bool, rx: bool, what: &str| {
        if tx {
            h.expect(
                program_names::POD_INGRESS,
                &out_of_pod,
                TC_ACT_REDIRECT,
                stat::FAST_TX_PACKETS,
                what,
            );
        } else {
            h.expect_pass(
                program_names::POD_INGRESS,
                &out_of_pod,
                stat::KERNEL_NOT_LEARNED,
                what,
            );
        }
        if rx {
            h.expect(
                program_names::UPLINK_INGRESS,
                &from_peer,
                TC_ACT_REDIRECT,
                stat::FAST_RX_BEFORE_DECAP_PACKETS,
                what,
            );
            h.expect(
                program_names::VXLAN_INGRESS,
                &decapsulated,
                TC_ACT_REDIRECT,
                stat::FAST_RX_AFTER_DECAP_PACKETS,
                what,
            );
        } else {
            h.expect_pass(
                program_names::UPLINK_INGRESS,
                &from_peer,
                stat::KERNEL_NOT_LEARNED,
                what,
            );
            h.expect_pass(
                program_names::VXLAN_INGRESS,
                &decapsulated,
                stat::KERNEL_NOT_LEARNED,
                what,
            );
        }
    };
    check_all(&mut h, false, false, "nothing learned");
    // The kernel path: our pod's packet leaves through flannel.1 ...
    let mut routed = out_of_pod.clone();
    routed[..6].copy_from_slice(&PEER_VTEP);
    routed[6..12].copy_from_slice(&LOCAL_VTEP);
    routed[22] -= 1;
    fix_ip_checksum(&mut routed, 14);
    h.expect_pass(
        program_names::VXLAN_EGRESS,
        &routed,
        stat::KERNEL_LEARNED,
        "egress",
    );
    check_all(&mut h, true, false, "egress learned only");
    // ... and the reply reaches it through its veth.
    h.expect_pass(
        program_names::POD_EGRESS,
        &flannel_frame_delivered(),
        stat::KERNEL_LEARNED,
        "ingress",
    );
    check_all(&mut h, true, true, "both learned");
    // The other order: a flow first seen coming in opens delivery only.
    h.forget(udp_flow());
    h.expect_pass(
        program_names::POD_EGRESS,
        &flannel_frame_delivered(),
        stat::KERNEL_LEARNED,
        "ingress first",
    );
    check_all(&mut h, false, true, "ingress learned only");
}

// ---------------------------------------------------------------------------------------------
// Probe and the unconfigured datapath

#[test]
fn decap_l4_udp_probe_is_false_on_this_kernel() {
    let mut h = Harness::new();
    let before = h.stats();
    assert!(
        !probe_decap_l4_udp(&mut h.ebpf).expect("probe runs"),
        "6.18 has no BPF_F_ADJ_ROOM_DECAP_L4_UDP"
    );
    // The probe program itself: 0 (flag rejected) on a VXLAN frame it could otherwise shrink.
    let outcome = h.run(program_names::PROBE_DECAP_L4_UDP, &flannel_frame(), PLAIN);
    assert_eq!(outcome.verdict, 0, "probe program's answer");
    assert_eq!(
        outcome.out,
        flannel_frame(),
        "a rejected flag changes nothing"
    );
    assert_eq!(h.stats(), before, "the probe counts nothing");
}

#[test]
fn unconfigured_datapath_passes_everything() {
    let mut h = Harness::new();
    h.set_config(DatapathConfig::default());
    let spoofed = vxlan_from(STRANGER_IP, 0, &ip_of(&flannel_frame()[50..]), false);
    for (program, packet) in [
        (program_names::POD_INGRESS, pod_to_remote()),
        (program_names::UPLINK_INGRESS, flannel_frame()),
        (program_names::UPLINK_INGRESS, spoofed),
        (
            program_names::VXLAN_INGRESS,
            from_vxlan_device(&flannel_frame()[64..]),
        ),
        (
            program_names::VXLAN_EGRESS,
            into_vxlan_device(&pod_to_remote()[14..]),
        ),
        (program_names::POD_EGRESS, flannel_frame_delivered()),
    ] {
        h.expect_pass(program, &packet, stat::KERNEL_DISABLED, "unconfigured");
    }
    // Not configured yet also means: enabled = 0 with everything else written.
    let mut cfg = config(ALL_FAST);
    cfg.enabled = 0;
    h.set_config(cfg);
    h.expect_pass(
        program_names::POD_INGRESS,
        &pod_to_remote(),
        stat::KERNEL_DISABLED,
        "enabled 0",
    );
    h.expect_pass(
        program_names::UPLINK_INGRESS,
        &flannel_frame(),
        stat::KERNEL_DISABLED,
        "enabled 0",
    );
}
