//! R2: VXLAN encapsulation at the pod's host veth (TCX ingress, before the bridge), exactly as
//! flannel's `flannel.<VNI>` device puts it on the wire, then straight out of the uplink to
//! the peer's next hop: no bridge, host routing, netfilter or vxlan device for learned flows.

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        BPF_F_ADJ_ROOM_FIXED_GSO, TC_ACT_REDIRECT, TC_ACT_SHOT,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_redir_neigh, bpf_redir_neigh__bindgen_ty_1,
    },
    helpers::{bpf_get_hash_recalc, bpf_get_prandom_u32, bpf_redirect_neigh},
    maps::lpm_trie::Key,
    programs::TcContext,
};
use overlay_common::{DatapathConfig, PeerInfo, VXLAN_OVERHEAD, config_flags, peer_flags, stat};

use crate::{
    flows::{endpoint, flow_key, is_learned_egress},
    maps::PEERS,
    parse::{
        ETH_LEN, ETH_P_IPV4, EthHdr, IPPROTO_UDP, IPV4_LEN, Ipv4Hdr, TCP_FIN, TCP_RST, TCP_SYN,
        VXLAN_FLAG_I, config_with, decrement_ttl, gso_size, ifindex, ipv4_checksum, ipv4_header_ok,
        load_l4, load_plain_ipv4, pass, vni_wire,
    },
    stats::Verdict,
};

const AF_INET: u32 = 2;
/// Largest IPv4 total length: the outer header of a GSO super-packet must fit in it.
const MAX_IP_LEN: u32 = 0xffff;

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

/// TCX ingress of a pod's host veth: the pod's own packets, before the bridge.
#[inline(always)]
pub fn pod_encap(ctx: &TcContext) -> Verdict {
    let cfg = match config_with(config_flags::FAST_TX) {
        Ok(cfg) => cfg,
        Err(verdict) => return verdict,
    };
    let (eth, ip) = match load_plain_ipv4(ctx) {
        Ok(headers) => headers,
        Err(verdict) => return verdict,
    };
    // Only unicast sent to the gateway; broadcasts etc. are the kernel's.
    if eth.dst[0] & 1 != 0 {
        return pass(stat::KERNEL_NOT_OURS);
    }
    let inner_len = ctx.len().saturating_sub(ETH_LEN as u32);
    let gso = gso_size(ctx);
    if gso == 0 && inner_len > cfg.max_inner_len {
        // Larger than the underlay carries, whatever the protocol: the kernel path answers
        // "frag needed" (or fragments), as on a flannel node.
        return pass(stat::KERNEL_TOO_BIG);
    }
    let Some(l4) = load_l4(ctx, ETH_LEN + IPV4_LEN, ip.proto) else {
        return pass(stat::KERNEL_NOT_OURS);
    };
    // The source must be the pod behind this very veth, with its MAC (a forwarding pod's
    // other traffic, a spoofed source, or a re-created pod the agent has not seen yet takes
    // the kernel path).
    let Some(ep) = endpoint(ip.saddr) else {
        return pass(stat::KERNEL_NO_ENDPOINT);
    };
    if ep.host_ifindex != ifindex(ctx) || ep.pod_mac != eth.src {
        return pass(stat::KERNEL_NO_ENDPOINT);
    }
    // Routed through the gateway: a frame for another MAC on the bridge (a router or
    // firewall pod used as next hop) is switched to it by the kernel, never sent past it.
    if eth.dst != ep.gateway_mac {
        return pass(stat::KERNEL_NOT_OURS);
    }
    let peer = match PEERS.get(Key::new(32, ip.daddr)) {
        Some(peer) if peer.flags & peer_flags::VALID != 0 => *peer,
        _ => return pass(stat::KERNEL_NO_ENDPOINT),
    };
    if l4.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0 {
        return pass(stat::KERNEL_TCP_CONTROL);
    }
    if !is_learned_egress(&flow_key(ip.saddr, ip.daddr, l4.sport, l4.dport, ip.proto)) {
        return pass(stat::KERNEL_NOT_LEARNED);
    }
    if ip.ttl <= 1 {
        return pass(stat::KERNEL_TTL);
    }
    // bpf_redirect does no MTU check: every packet on the wire (each segment of a GSO
    // super-packet) must fit in the underlay, or the kernel path answers "frag needed".
    let largest = if gso == 0 {
        inner_len
    } else if ip.proto == IPPROTO_UDP {
        // UDP GSO (UDP_SEGMENT senders) stays on the kernel path.
        return pass(stat::KERNEL_GSO);
    } else {
        gso + IPV4_LEN as u32 + l4.header_len
    };
    if largest > cfg.max_inner_len || inner_len + VXLAN_OVERHEAD > MAX_IP_LEN {
        return pass(stat::KERNEL_TOO_BIG);
    }
    // Malformed (bad checksum or length): the kernel path judges it.
    if !ipv4_header_ok(&ip, inner_len) {
        return pass(stat::KERNEL_NOT_OURS);
    }
    encapsulate_and_send(ctx, cfg, &ip, &peer, inner_len)
}

/// Encapsulation and redirect to the uplink, addressed to the peer's next hop.
#[inline(always)]
fn encapsulate_and_send(
    ctx: &TcContext,
    cfg: &DatapathConfig,
    ip: &Ipv4Hdr,
    peer: &PeerInfo,
    inner_len: u32,
) -> Verdict {
    // The flow hash must be taken before the headers change (entropy for ECMP/RSS).
    let hash = unsafe { bpf_get_hash_recalc(ctx.skb.skb) };
    if ctx
        .skb
        .adjust_room(VXLAN_OVERHEAD as i32, BPF_ADJ_ROOM_MAC, ENCAP_FLAGS)
        .is_err()
    {
        return pass(stat::KERNEL_HELPER_ERROR);
    }
    if write_headers(ctx, cfg, ip, peer, inner_len, hash).is_err() {
        return Verdict {
            action: TC_ACT_SHOT as i32,
            reason: stat::DROP_HELPER_ERROR,
            bytes: 0,
        };
    }
    // With the next hop known only the neighbour layer runs: no route lookup per packet.
    // Until the agent has resolved it, the kernel routes each packet.
    let action = if peer.nexthop_ip == [0; 4] {
        unsafe { bpf_redirect_neigh(cfg.uplink_ifindex, core::ptr::null_mut(), 0, 0) }
    } else {
        let mut nexthop = bpf_redir_neigh {
            nh_family: AF_INET,
            __bindgen_anon_1: bpf_redir_neigh__bindgen_ty_1 {
                ipv4_nh: u32::from_ne_bytes(peer.nexthop_ip),
            },
        };
        unsafe {
            bpf_redirect_neigh(
                cfg.uplink_ifindex,
                &mut nexthop,
                core::mem::size_of::<bpf_redir_neigh>() as i32,
                0,
            )
        }
    };
    if action != TC_ACT_REDIRECT as i64 {
        // Headers are already rewritten: they must not reach the kernel half-done.
        return Verdict {
            action: TC_ACT_SHOT as i32,
            reason: stat::DROP_HELPER_ERROR,
            bytes: 0,
        };
    }
    Verdict {
        action: TC_ACT_REDIRECT as i32,
        reason: stat::FAST_TX_PACKETS,
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
) -> Result<(), ()> {
    decrement_ttl(ctx, ETH_LEN + VXLAN_OVERHEAD as usize, inner)?;
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
