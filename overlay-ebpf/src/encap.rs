//! VXLAN encapsulation towards remote pod subnets, exactly as flannel's `flannel.<VNI>` device
//! puts it on the wire, then straight out of the uplink. Two attach points: TC egress of the
//! kernel vxlan device (default: the kernel routes and runs netfilter first) and TC ingress of
//! the pod bridge (direct mode: skips the node's routing and netfilter for pod traffic).

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        BPF_F_ADJ_ROOM_FIXED_GSO, TC_ACT_REDIRECT, TC_ACT_SHOT,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    helpers::{bpf_get_hash_recalc, bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_redirect_neigh},
    maps::lpm_trie::Key,
    programs::TcContext,
};
use overlay_common::{DatapathConfig, FlowKey, PeerInfo, VXLAN_OVERHEAD, peer_flags, stat};

use crate::{
    maps::{PEERS, SERVICE_FLOWS, config},
    parse::{
        ETH_LEN, ETH_P_IPV4, EthHdr, IPPROTO_TCP, IPPROTO_UDP, IPV4_LEN, Ipv4Hdr, VXLAN_FLAG_I,
        decrement_ttl, gso_size, in_subnet, ipv4_checksum, ipv4_header_ok, load, pass, vni_wire,
    },
    stats::Verdict,
};

/// C's `BPF_F_ADJ_ROOM_ENCAP_L2(len)`: the inner L2 header length in the top byte.
const fn encap_l2(len: u64) -> u64 {
    (len & 0xff) << 56
}

const ENCAP_FLAGS: u64 = BPF_F_ADJ_ROOM_FIXED_GSO as u64
    | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 as u64
    | BPF_F_ADJ_ROOM_ENCAP_L4_UDP as u64
    | BPF_F_ADJ_ROOM_ENCAP_L2_ETH as u64
    | encap_l2(ETH_LEN as u64);

/// The kernel vxlan device's default source-port range (`ip_local_port_range`, 32768-60999).
const SPORT_MIN: u64 = 32768;
const SPORT_MAX: u64 = 60999;
/// Outer TTL of the kernel vxlan device (`ttl` unset -> ip4_dst_hoplimit = 64).
const OUTER_TTL: u8 = 64;
/// Refresh a Service-flow entry at most once a second (one map write per flow per second).
const SERVICE_FLOW_REFRESH_NS: u64 = 1_000_000_000;

/// Outer IPv4 + UDP + VXLAN + inner Ethernet: the 50 bytes inserted after the outer MAC header.
#[repr(C)]
struct EncapHdr {
    ip: Ipv4Hdr,
    udp_sport: [u8; 2],
    udp_dport: [u8; 2],
    udp_len: [u8; 2],
    udp_check: [u8; 2],
    vxlan_flags: [u8; 4],
    vxlan_vni: [u8; 4],
    inner_eth: EthHdr,
}
const _: () = assert!(core::mem::size_of::<EncapHdr>() == VXLAN_OVERHEAD as usize);

#[inline(always)]
pub fn bridge_encap(ctx: &TcContext) -> Verdict {
    let Some(cfg) = config() else {
        return pass(stat::PASS_UNCONFIGURED);
    };
    let Some(eth) = load::<EthHdr>(ctx, 0) else {
        return pass(stat::PASS_TRUNCATED);
    };
    // Only unicast IPv4 routed to us (the pods' gateway); ARP, broadcasts etc. are the kernel's.
    if eth.proto != ETH_P_IPV4 || eth.dst[0] & 1 != 0 {
        return pass(stat::PASS_NOT_OURS);
    }
    let Some(ip) = load::<Ipv4Hdr>(ctx, ETH_LEN) else {
        return pass(stat::PASS_TRUNCATED);
    };
    if ip.version() != 4 || ip.header_len() < IPV4_LEN {
        return pass(stat::PASS_NOT_OURS);
    }
    if ip.is_fragment() {
        return pass(stat::PASS_FRAGMENT);
    }
    if in_subnet(ip.daddr, cfg.subnet_addr, cfg.subnet_mask) {
        return pass(stat::PASS_NO_ROUTE);
    }
    let peer = match PEERS.get(Key::new(32, ip.daddr)) {
        Some(peer) if peer.flags & peer_flags::VALID != 0 => *peer,
        _ => {
            remember_service_flow(ctx, cfg, &ip);
            return pass(stat::PASS_NO_ROUTE);
        }
    };
    if ip.ttl <= 1 {
        return pass(stat::PASS_TTL);
    }
    encapsulate_and_send(ctx, cfg, &ip, &peer, true)
}

/// TC egress on the kernel's `flannel.<VNI>` device: the kernel has routed the packet (and run
/// netfilter: conntrack confirmation, NAT, policies) and put the inner Ethernet header on it;
/// only the device's own encapsulation and outer-packet transmit are replaced.
#[inline(always)]
pub fn vxlan_device_encap(ctx: &TcContext) -> Verdict {
    let Some(cfg) = config() else {
        return pass(stat::PASS_UNCONFIGURED);
    };
    let Some(eth) = load::<EthHdr>(ctx, 0) else {
        return pass(stat::PASS_TRUNCATED);
    };
    if eth.proto != ETH_P_IPV4 {
        return pass(stat::PASS_NOT_OURS);
    }
    let Some(ip) = load::<Ipv4Hdr>(ctx, ETH_LEN) else {
        return pass(stat::PASS_TRUNCATED);
    };
    if ip.version() != 4 || ip.header_len() < IPV4_LEN {
        return pass(stat::PASS_NOT_OURS);
    }
    if ip.is_fragment() {
        return pass(stat::PASS_FRAGMENT);
    }
    match PEERS.get(Key::new(32, ip.daddr)) {
        Some(peer) if peer.flags & peer_flags::VALID != 0 => {
            let peer = *peer;
            encapsulate_and_send(ctx, cfg, &ip, &peer, false)
        }
        _ => pass(stat::PASS_NO_ROUTE),
    }
}

/// Size check, encapsulation, redirect to the uplink. `route_inner`: we are the router for
/// the inner packet (bridge ingress) and decrement its TTL; at the vxlan device the kernel
/// already did.
#[inline(always)]
fn encapsulate_and_send(
    ctx: &TcContext,
    cfg: &DatapathConfig,
    ip: &Ipv4Hdr,
    peer: &PeerInfo,
    route_inner: bool,
) -> Verdict {
    let inner_len = ctx.len().saturating_sub(ETH_LEN as u32);
    if inner_len > cfg.max_inner_len && gso_size(ctx) == 0 {
        // The kernel path (flannel.<VNI>, same MTU) fragments or answers "frag needed".
        return pass(stat::PASS_TOO_BIG);
    }
    // Malformed (bad checksum or length) or with options: the kernel path judges it.
    if !ipv4_header_ok(ip, inner_len) {
        return pass(stat::PASS_NOT_OURS);
    }
    // The flow hash must be taken before the headers change (entropy for ECMP/RSS).
    let hash = unsafe { bpf_get_hash_recalc(ctx.skb.skb) };
    if ctx
        .skb
        .adjust_room(VXLAN_OVERHEAD as i32, BPF_ADJ_ROOM_MAC, ENCAP_FLAGS)
        .is_err()
    {
        return pass(stat::PASS_HELPER_ERROR);
    }
    if write_headers(ctx, cfg, ip, peer, inner_len, hash, route_inner).is_err() {
        return Verdict {
            action: TC_ACT_SHOT as i32,
            reason: stat::DROP_HELPER_ERROR,
            bytes: 0,
        };
    }
    // FIB lookup + neighbour resolution by the kernel: works on routed underlays too.
    let action = unsafe { bpf_redirect_neigh(cfg.uplink_ifindex, core::ptr::null_mut(), 0, 0) };
    if action != TC_ACT_REDIRECT as i64 {
        return pass(stat::PASS_HELPER_ERROR);
    }
    Verdict {
        action: TC_ACT_REDIRECT as i32,
        reason: stat::ENCAP_PACKETS,
        bytes: inner_len,
    }
}

/// Fills the 50 bytes adjust_room opened (and routes the inner packet: TTL - 1).
#[inline(always)]
fn write_headers(
    ctx: &TcContext,
    cfg: &DatapathConfig,
    inner: &Ipv4Hdr,
    peer: &PeerInfo,
    inner_len: u32,
    hash: u32,
    route_inner: bool,
) -> Result<(), ()> {
    if route_inner {
        decrement_ttl(ctx, ETH_LEN + VXLAN_OVERHEAD as usize, inner)?;
    }
    let outer_len = inner_len + VXLAN_OVERHEAD;
    let mut hdr = EncapHdr {
        ip: Ipv4Hdr {
            ver_ihl: 0x45,
            tos: ecn_encapsulate(inner.tos),
            tot_len: (outer_len as u16).to_be_bytes(),
            // DF off like the kernel device, so fragments need distinct IDs.
            id: (unsafe { bpf_get_prandom_u32() } as u16).to_ne_bytes(),
            frag_off: [0, 0],
            ttl: OUTER_TTL,
            proto: IPPROTO_UDP,
            check: [0, 0],
            saddr: cfg.local_ip,
            daddr: peer.underlay_ip,
        },
        udp_sport: udp_source_port(hash).to_be_bytes(),
        udp_dport: cfg.udp_port_be.to_ne_bytes(),
        udp_len: ((outer_len - IPV4_LEN as u32) as u16).to_be_bytes(),
        // Zero UDP checksum: allowed over IPv4, and what flannel's device sends by default.
        udp_check: [0, 0],
        vxlan_flags: [VXLAN_FLAG_I, 0, 0, 0],
        vxlan_vni: vni_wire(cfg.vni),
        inner_eth: EthHdr {
            dst: peer.vtep_mac,
            src: cfg.vtep_mac,
            proto: ETH_P_IPV4,
        },
    };
    hdr.ip.check = ipv4_checksum(&hdr.ip);
    ctx.store(ETH_LEN, &hdr, 0).map_err(|_| ())
}

/// The kernel's `udp_flow_src_port` with the default local port range.
#[inline(always)]
fn udp_source_port(hash: u32) -> u16 {
    let hash = hash ^ (hash << 16);
    (((u64::from(hash) * (SPORT_MAX - SPORT_MIN)) >> 32) + SPORT_MIN) as u16
}

/// RFC 6040 normal-mode ECN encapsulation (the kernel's INET_ECN_encapsulate with outer tos 0).
#[inline(always)]
fn ecn_encapsulate(inner_tos: u8) -> u8 {
    let ecn = inner_tos & 0x03;
    if ecn == 0x03 { 0x02 } else { ecn }
}

/// The Service reply guard: a local pod's TCP/UDP flow towards a non-pod address (such as a
/// ClusterIP that kube-proxy DNATs to a remote pod) is remembered, so that its replies are left
/// to the kernel path, whose conntrack undoes the NAT.
#[inline(always)]
fn remember_service_flow(ctx: &TcContext, cfg: &DatapathConfig, ip: &Ipv4Hdr) {
    if (ip.proto != IPPROTO_TCP && ip.proto != IPPROTO_UDP)
        || !in_subnet(ip.saddr, cfg.subnet_addr, cfg.subnet_mask)
    {
        return;
    }
    let Some(sport) = load::<[u8; 2]>(ctx, ETH_LEN + ip.header_len()) else {
        return;
    };
    let key = FlowKey {
        pod_ip: ip.saddr,
        pod_port_be: u16::from_ne_bytes(sport),
        protocol: ip.proto,
        _pad: 0,
    };
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(seen) = SERVICE_FLOWS.get_ptr(&key) {
        if now.saturating_sub(unsafe { *seen }) < SERVICE_FLOW_REFRESH_NS {
            return;
        }
    }
    let _ = SERVICE_FLOWS.insert(&key, &now, 0);
}
