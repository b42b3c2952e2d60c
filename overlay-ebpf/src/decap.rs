//! Uplink ingress: a strict classifier for VXLAN addressed to this node. Spoofed VXLAN (from an
//! address that holds no lease) is dropped; ours is decapsulated and delivered (through the
//! kernel vxlan device by default, or straight to the bridge, see `config_flags`).
//! Everything else goes to the kernel untouched.

use aya_ebpf::{
    bindings::{
        BPF_CSUM_LEVEL_DEC, BPF_F_ADJ_ROOM_FIXED_GSO, BPF_F_ADJ_ROOM_NO_CSUM_RESET, BPF_F_INGRESS,
        TC_ACT_REDIRECT, TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_redir_neigh,
        bpf_redir_neigh__bindgen_ty_1,
    },
    helpers::{bpf_csum_level, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use overlay_common::{DatapathConfig, FlowKey, VXLAN_OVERHEAD, config_flags, stat};

use crate::{
    maps::{PEER_SOURCES, SERVICE_FLOWS, config},
    parse::{
        ETH_LEN, ETH_P_IPV4, EthHdr, IPPROTO_TCP, IPPROTO_UDP, IPV4_LEN, Ipv4Hdr, UDP_LEN,
        UdpVxlanHdr, VXLAN_FLAG_I, VXLAN_LEN, decrement_ttl, gso_size, in_subnet, ipv4_header_ok,
        load, pass, vni_wire,
    },
    stats::Verdict,
};

const OUTER_UDP_OFF: usize = ETH_LEN + IPV4_LEN;
const INNER_ETH_OFF: usize = OUTER_UDP_OFF + UDP_LEN + VXLAN_LEN;
const INNER_IP_OFF: usize = INNER_ETH_OFF + ETH_LEN;
const AF_INET: u32 = 2;
/// The IPv4 fragment offset bits (a fragment other than the first).
const IP_OFFSET: u16 = 0x1fff;

#[inline(always)]
pub fn uplink_decap(ctx: &TcContext) -> Verdict {
    let Some(cfg) = config() else {
        return pass(stat::PASS_UNCONFIGURED);
    };
    let Some(proto) = load::<[u8; 2]>(ctx, 12) else {
        return pass(stat::PASS_TRUNCATED);
    };
    if proto != ETH_P_IPV4 {
        return pass(stat::PASS_NOT_OURS);
    }
    let Some(outer) = load::<Ipv4Hdr>(ctx, ETH_LEN) else {
        return pass(stat::PASS_TRUNCATED);
    };
    if outer.version() != 4
        || outer.proto != IPPROTO_UDP
        || outer.daddr != cfg.local_ip
        || outer.header_len() < IPV4_LEN
    {
        return pass(stat::PASS_NOT_OURS);
    }
    if u16::from_be_bytes(outer.frag_off) & IP_OFFSET != 0 {
        // A later fragment (no UDP header). The kernel reassembles, and its vxlan device then
        // decapsulates, only if the first fragment got through: that one is checked below.
        return pass(stat::PASS_FRAGMENT);
    }
    // The UDP header follows the outer header whatever its options: the source check must
    // see first fragments and packets with options too, or the kernel's vxlan device (which
    // accepts anyone) would take spoofed VXLAN wrapped that way (found by the fuzz test).
    let Some(udp) = load::<UdpVxlanHdr>(ctx, ETH_LEN + outer.header_len()) else {
        return pass(stat::PASS_TRUNCATED);
    };
    if u16::from_ne_bytes(udp.dport) != cfg.udp_port_be
        || udp.vxlan_flags & VXLAN_FLAG_I == 0
        || udp.vni_reserved[..3] != vni_wire(cfg.vni)[..3]
    {
        return pass(stat::PASS_NOT_OURS);
    }
    // Our port, address and VNI: only nodes holding a lease may send it.
    if PEER_SOURCES.get_ptr(&outer.saddr).is_none() {
        return Verdict {
            action: TC_ACT_SHOT as i32,
            reason: stat::DROP_UNKNOWN_SOURCE,
            bytes: 0,
        };
    }
    if outer.is_fragment() {
        // The kernel reassembles; its vxlan device then decapsulates.
        return pass(stat::PASS_FRAGMENT);
    }
    if outer.header_len() != IPV4_LEN {
        // IP options: rare, left to the kernel rather than parsed here.
        return pass(stat::PASS_NOT_OURS);
    }
    if udp.vxlan_flags != VXLAN_FLAG_I || udp.vxlan_reserved != [0; 3] || udp.vni_reserved[3] != 0 {
        // Extensions (GBP's group policy) or reserved bits: the kernel device applies them,
        // or drops the packet as it does when they are not enabled.
        return pass(stat::PASS_NOT_OURS);
    }
    let Some(inner_eth) = load::<EthHdr>(ctx, INNER_ETH_OFF) else {
        return pass(stat::PASS_TRUNCATED);
    };
    if inner_eth.proto != ETH_P_IPV4 {
        return pass(stat::PASS_NOT_OURS);
    }
    if inner_eth.dst != cfg.vtep_mac {
        // Not to our VtepMAC: the kernel would not route it (PACKET_OTHERHOST / broadcast);
        // its device gets it as it is (found by the fuzz test: direct mode routed it anyway).
        return pass(stat::PASS_NOT_OURS);
    }
    let Some(inner) = load::<Ipv4Hdr>(ctx, INNER_IP_OFF) else {
        return pass(stat::PASS_TRUNCATED);
    };
    if inner.version() != 4 || inner.header_len() < IPV4_LEN {
        return Verdict {
            action: TC_ACT_SHOT as i32,
            reason: stat::DROP_MALFORMED,
            bytes: 0,
        };
    }
    if !is_local_pod(cfg, inner.daddr) {
        return pass(stat::PASS_NO_ROUTE);
    }
    if inner.is_fragment() {
        return pass(stat::PASS_FRAGMENT);
    }
    if inner.ttl <= 1 {
        return pass(stat::PASS_TTL);
    }
    if inner.header_len() != IPV4_LEN {
        // Inner IP options: the kernel device's path handles them.
        return pass(stat::PASS_NOT_OURS);
    }
    // What the kernel's ip_rcv/udp_rcv check before its vxlan device sees the packet (and
    // ip_rcv again for the inner one): we bypass them, so must not accept what they drop.
    let outer_len = u32::from(u16::from_be_bytes(outer.tot_len));
    if !ipv4_header_ok(&outer, ctx.len().saturating_sub(ETH_LEN as u32))
        || outer_len < (INNER_IP_OFF + IPV4_LEN - ETH_LEN) as u32
        || u32::from(u16::from_be_bytes(udp.len)) != outer_len - IPV4_LEN as u32
        || !ipv4_header_ok(&inner, outer_len - (INNER_IP_OFF - ETH_LEN) as u32)
    {
        return Verdict {
            action: TC_ACT_SHOT as i32,
            reason: stat::DROP_MALFORMED,
            bytes: 0,
        };
    }
    let direct = cfg.flags & config_flags::DECAP_DIRECT != 0;
    if direct && (inner.proto == IPPROTO_TCP || inner.proto == IPPROTO_UDP) {
        let Some(dport) = load::<[u8; 2]>(ctx, INNER_IP_OFF + inner.header_len() + 2) else {
            return pass(stat::PASS_TRUNCATED);
        };
        let key = FlowKey {
            pod_ip: inner.daddr,
            pod_port_be: u16::from_ne_bytes(dport),
            protocol: inner.proto,
            _pad: 0,
        };
        if SERVICE_FLOWS.get_ptr(&key).is_some() {
            // A reply to a flow kube-proxy NATed: the kernel's conntrack must see it.
            return pass(stat::PASS_SERVICE_FLOW);
        }
    }
    let target_ifindex = if direct {
        cfg.bridge_ifindex
    } else {
        cfg.vxlan_ifindex
    };
    if target_ifindex == 0 {
        return pass(stat::PASS_NO_ROUTE);
    }
    if gso_size(ctx) != 0 {
        // GRO-merged VXLAN: the helper cannot clear the tunnel GSO type on decap (no
        // BPF_F_ADJ_ROOM_DECAP_L4_UDP on this kernel), so the kernel device decapsulates it.
        return pass(stat::PASS_GSO);
    }
    // With BPF_ADJ_ROOM_MAC the 50 bytes after the outer Ethernet header go (outer IPv4, UDP,
    // VXLAN, inner Ethernet): the outer Ethernet header (type IPv4 already) now heads the
    // inner packet.
    if ctx
        .skb
        .adjust_room(
            -(VXLAN_OVERHEAD as i32),
            BPF_ADJ_ROOM_MAC,
            (BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_NO_CSUM_RESET) as u64,
        )
        .is_err()
    {
        return pass(stat::PASS_HELPER_ERROR);
    }
    // The outer checksum a NIC may have validated (CHECKSUM_UNNECESSARY) no longer applies.
    // A no-op when the skb carries no such level.
    unsafe { bpf_csum_level(ctx.skb.skb, BPF_CSUM_LEVEL_DEC as u64) };
    let delivered = if direct {
        deliver_to_bridge(ctx, cfg, &inner)
    } else {
        deliver_through_vxlan_device(ctx, cfg, &inner_eth)
    };
    match delivered {
        Ok(()) => Verdict {
            action: TC_ACT_REDIRECT as i32,
            reason: stat::DECAP_PACKETS,
            bytes: ctx.len().saturating_sub(ETH_LEN as u32),
        },
        // The packet is already decapsulated: it must not reach the kernel half-done.
        Err(()) => Verdict {
            action: TC_ACT_SHOT as i32,
            reason: stat::DROP_HELPER_ERROR,
            bytes: 0,
        },
    }
}

/// Default delivery: the packet enters the stack through the kernel's `flannel.<VNI>` device
/// with the inner Ethernet header, exactly as if that device had decapsulated it, so
/// conntrack (Service replies), iptables and rp_filter see what flannel gives them.
#[inline(always)]
fn deliver_through_vxlan_device(
    ctx: &TcContext,
    cfg: &DatapathConfig,
    inner_eth: &EthHdr,
) -> Result<(), ()> {
    ctx.store(0, inner_eth, 0).map_err(|_| ())?;
    let action = unsafe { bpf_redirect(cfg.vxlan_ifindex, u64::from(BPF_F_INGRESS)) };
    if action == TC_ACT_REDIRECT as i64 {
        Ok(())
    } else {
        Err(())
    }
}

/// Direct delivery: route the inner packet to the pod ourselves (TTL - 1, as a router does)
/// and let the neighbour layer address it on the bridge.
#[inline(always)]
fn deliver_to_bridge(ctx: &TcContext, cfg: &DatapathConfig, inner: &Ipv4Hdr) -> Result<(), ()> {
    decrement_ttl(ctx, ETH_LEN, inner)?;
    let mut nexthop = bpf_redir_neigh {
        nh_family: AF_INET,
        __bindgen_anon_1: bpf_redir_neigh__bindgen_ty_1 {
            ipv4_nh: u32::from_ne_bytes(inner.daddr),
        },
    };
    let action = unsafe {
        bpf_redirect_neigh(
            cfg.bridge_ifindex,
            &mut nexthop,
            core::mem::size_of::<bpf_redir_neigh>() as i32,
            0,
        )
    };
    if action == TC_ACT_REDIRECT as i64 {
        Ok(())
    } else {
        Err(())
    }
}

/// A unicast address of a pod in our subnet: not the network or broadcast address and not the
/// bridge (gateway), which belong to the kernel.
#[inline(always)]
fn is_local_pod(cfg: &DatapathConfig, dst: [u8; 4]) -> bool {
    let broadcast = u32::from_ne_bytes(cfg.subnet_addr) | !u32::from_ne_bytes(cfg.subnet_mask);
    in_subnet(dst, cfg.subnet_addr, cfg.subnet_mask)
        && dst != cfg.subnet_addr
        && dst != cfg.gateway_ip
        && u32::from_ne_bytes(dst) != broadcast
}
