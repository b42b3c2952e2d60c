//! Uplink ingress: a strict classifier for VXLAN addressed to this node. Spoofed VXLAN (from an
//! address that holds no lease) is dropped. R3: VXLAN of a learned flow to a local pod is
//! decapsulated here and delivered into the pod; the rest goes to the kernel untouched (its
//! vxlan device decapsulates, and R1 may then deliver it). Decapsulated frames are never
//! handed back to the vxlan device.

use aya_ebpf::{
    bindings::{
        BPF_CSUM_LEVEL_DEC, BPF_F_ADJ_ROOM_FIXED_GSO, BPF_F_ADJ_ROOM_NO_CSUM_RESET, TC_ACT_SHOT,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    helpers::bpf_csum_level,
    programs::TcContext,
};
use overlay_common::{
    BPF_F_ADJ_ROOM_DECAP_L4_UDP, DatapathConfig, Endpoint, VXLAN_OVERHEAD, config_flags, stat,
};

use crate::{
    deliver::{deliver, eligible_for_delivery},
    maps::{PEER_SOURCES, config},
    parse::{
        ECN_CE, ECN_MASK, ETH_LEN, ETH_P_IPV4, EthHdr, IPPROTO_UDP, IPV4_LEN, Ipv4Hdr, UDP_LEN,
        UdpVxlanHdr, VXLAN_FLAG_I, VXLAN_LEN, gso_size, ipv4_header_ok, load, load_l4, pass,
        set_ecn_ce, vni_wire,
    },
    stats::Verdict,
};

const OUTER_UDP_OFF: usize = ETH_LEN + IPV4_LEN;
const INNER_ETH_OFF: usize = OUTER_UDP_OFF + UDP_LEN + VXLAN_LEN;
const INNER_IP_OFF: usize = INNER_ETH_OFF + ETH_LEN;
/// The IPv4 fragment offset bits (a fragment other than the first).
const IP_OFFSET: u16 = 0x1fff;

#[inline(always)]
pub fn uplink_decap(ctx: &TcContext) -> Verdict {
    let Some(cfg) = config() else {
        return pass(stat::KERNEL_DISABLED);
    };
    let (outer, udp) = match our_vxlan_from_a_peer(ctx, cfg) {
        Ok(headers) => headers,
        Err(verdict) => return verdict,
    };
    let (inner, ep) = match fast_path_candidate(ctx, cfg, &outer, &udp) {
        Ok(found) => found,
        Err(verdict) => return verdict,
    };
    match decapsulate(ctx, cfg, &outer, inner) {
        Ok(inner) => deliver(ctx, &inner, ep, stat::FAST_RX_BEFORE_DECAP_PACKETS),
        Err(verdict) => verdict,
    }
}

/// The classifier: VXLAN to our address, port and VNI, from an address that holds a lease
/// (else dropped). Anything else goes to the kernel untouched.
#[inline(always)]
fn our_vxlan_from_a_peer(
    ctx: &TcContext,
    cfg: &DatapathConfig,
) -> Result<(Ipv4Hdr, UdpVxlanHdr), Verdict> {
    let Some(proto) = load::<[u8; 2]>(ctx, 12) else {
        return Err(pass(stat::KERNEL_TRUNCATED));
    };
    if proto != ETH_P_IPV4 {
        return Err(pass(stat::KERNEL_NOT_OURS));
    }
    let Some(outer) = load::<Ipv4Hdr>(ctx, ETH_LEN) else {
        return Err(pass(stat::KERNEL_TRUNCATED));
    };
    if outer.version() != 4
        || outer.proto != IPPROTO_UDP
        || outer.daddr != cfg.local_ip
        || outer.header_len() < IPV4_LEN
    {
        return Err(pass(stat::KERNEL_NOT_OURS));
    }
    if u16::from_be_bytes(outer.frag_off) & IP_OFFSET != 0 {
        // A later fragment (no UDP header). The kernel reassembles, and its vxlan device then
        // decapsulates, only if the first fragment got through: that one is checked below.
        return Err(pass(stat::KERNEL_FRAGMENT));
    }
    // The UDP header follows the outer header whatever its options: the source check must
    // see first fragments and packets with options too, or the kernel's vxlan device (which
    // accepts anyone) would take spoofed VXLAN wrapped that way (found by the fuzz test).
    let Some(udp) = load::<UdpVxlanHdr>(ctx, ETH_LEN + outer.header_len()) else {
        return Err(pass(stat::KERNEL_TRUNCATED));
    };
    if u16::from_ne_bytes(udp.dport) != cfg.udp_port_be
        || udp.vxlan_flags & VXLAN_FLAG_I == 0
        || udp.vni_reserved[..3] != vni_wire(cfg.vni)[..3]
    {
        return Err(pass(stat::KERNEL_NOT_OURS));
    }
    // Our port, address and VNI: only nodes holding a lease may send it.
    if PEER_SOURCES.get_ptr(&outer.saddr).is_none() {
        return Err(Verdict {
            action: TC_ACT_SHOT as i32,
            reason: stat::DROP_UNKNOWN_SOURCE,
            bytes: 0,
        });
    }
    Ok((outer, udp))
}

/// R3's conditions: plain VXLAN (no options, fragments or extensions) carrying plain IPv4
/// to our VtepMAC, for a local pod whose flow the kernel path has learned, and headers the
/// kernel's ip_rcv/udp_rcv would accept (we bypass them).
#[inline(always)]
fn fast_path_candidate(
    ctx: &TcContext,
    cfg: &DatapathConfig,
    outer: &Ipv4Hdr,
    udp: &UdpVxlanHdr,
) -> Result<(Ipv4Hdr, &'static Endpoint), Verdict> {
    if outer.is_fragment() {
        // The kernel reassembles; its vxlan device then decapsulates.
        return Err(pass(stat::KERNEL_FRAGMENT));
    }
    if cfg.flags & config_flags::FAST_RX_BEFORE_DECAP == 0 {
        return Err(pass(stat::KERNEL_DISABLED));
    }
    if outer.header_len() != IPV4_LEN {
        // IP options: rare, left to the kernel rather than parsed here.
        return Err(pass(stat::KERNEL_NOT_OURS));
    }
    if udp.vxlan_flags != VXLAN_FLAG_I || udp.vxlan_reserved != [0; 3] || udp.vni_reserved[3] != 0 {
        // Extensions (GBP's group policy) or reserved bits: the kernel device applies them,
        // or drops the packet as it does when they are not enabled.
        return Err(pass(stat::KERNEL_NOT_OURS));
    }
    let Some(inner_eth) = load::<EthHdr>(ctx, INNER_ETH_OFF) else {
        return Err(pass(stat::KERNEL_TRUNCATED));
    };
    if inner_eth.proto != ETH_P_IPV4 || inner_eth.dst != cfg.vtep_mac {
        // Not IPv4 to our VtepMAC: the kernel would not route it (PACKET_OTHERHOST /
        // broadcast); its device gets it as it is.
        return Err(pass(stat::KERNEL_NOT_OURS));
    }
    let Some(inner) = load::<Ipv4Hdr>(ctx, INNER_IP_OFF) else {
        return Err(pass(stat::KERNEL_TRUNCATED));
    };
    if inner.ver_ihl != 0x45 {
        // Not IPv4, or inner IP options: the kernel device's path handles them.
        return Err(pass(stat::KERNEL_NOT_OURS));
    }
    if inner.is_fragment() {
        return Err(pass(stat::KERNEL_FRAGMENT));
    }
    let Some(l4) = load_l4(ctx, INNER_IP_OFF + IPV4_LEN, inner.proto) else {
        return Err(pass(stat::KERNEL_NOT_OURS));
    };
    let ep = eligible_for_delivery(&inner, &l4)?;
    // What the kernel's ip_rcv/udp_rcv check before its vxlan device sees the packet (and
    // ip_rcv again for the inner one): we bypass them, so must not accept what they drop.
    let outer_len = u32::from(u16::from_be_bytes(outer.tot_len));
    if !ipv4_header_ok(outer, ctx.len().saturating_sub(ETH_LEN as u32))
        || outer_len < (INNER_IP_OFF + IPV4_LEN - ETH_LEN) as u32
        || u32::from(u16::from_be_bytes(udp.len)) != outer_len - IPV4_LEN as u32
        || !ipv4_header_ok(&inner, outer_len - (INNER_IP_OFF - ETH_LEN) as u32)
    {
        return Err(pass(stat::KERNEL_NOT_OURS));
    }
    Ok((inner, ep))
}

/// Strips the 50 bytes of VXLAN (GSO only where the kernel can, see below) and applies
/// RFC 6040's ECN rule; returns the inner header as it now is.
#[inline(always)]
fn decapsulate(
    ctx: &TcContext,
    cfg: &DatapathConfig,
    outer: &Ipv4Hdr,
    inner: Ipv4Hdr,
) -> Result<Ipv4Hdr, Verdict> {
    let mut flags = (BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_NO_CSUM_RESET) as u64;
    if gso_size(ctx) != 0 {
        // GRO-merged VXLAN: without DECAP_L4_UDP the skb would keep its tunnel GSO type
        // after decap, which breaks a pod that forwards it; inner UDP GSO breaks even local
        // delivery. The kernel device decapsulates those (and R1 delivers them).
        if cfg.flags & config_flags::HAVE_DECAP_L4_UDP == 0 || inner.proto == IPPROTO_UDP {
            return Err(pass(stat::KERNEL_GSO));
        }
        flags |= BPF_F_ADJ_ROOM_DECAP_L4_UDP;
    }
    // RFC 6040: an outer CE mark is copied onto an ECN-capable inner packet; on a
    // not-ECN-capable one the kernel decides (it drops it, as the RFC says).
    let outer_ce = outer.tos & ECN_MASK == ECN_CE;
    if outer_ce && inner.tos & ECN_MASK == 0 {
        return Err(pass(stat::KERNEL_ECN));
    }
    // With BPF_ADJ_ROOM_MAC the 50 bytes after the outer Ethernet header go (outer IPv4, UDP,
    // VXLAN, inner Ethernet): the outer Ethernet header (type IPv4 already) now heads the
    // inner packet.
    if ctx
        .skb
        .adjust_room(-(VXLAN_OVERHEAD as i32), BPF_ADJ_ROOM_MAC, flags)
        .is_err()
    {
        return Err(pass(stat::KERNEL_HELPER_ERROR));
    }
    // The outer checksum a NIC may have validated (CHECKSUM_UNNECESSARY) no longer applies.
    // A no-op when the skb carries no such level.
    unsafe { bpf_csum_level(ctx.skb.skb, BPF_CSUM_LEVEL_DEC as u64) };
    let mut inner = inner;
    if outer_ce && inner.tos & ECN_MASK != ECN_CE {
        if set_ecn_ce(ctx, ETH_LEN, &inner).is_err() {
            return Err(Verdict {
                action: TC_ACT_SHOT as i32,
                reason: stat::DROP_HELPER_ERROR,
                bytes: 0,
            });
        }
        // The TTL rewrite in `deliver` patches the checksum incrementally from this header.
        inner.tos |= ECN_CE;
    }
    Ok(inner)
}
