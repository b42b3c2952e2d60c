//! Local delivery into a pod, shared by R1 (after the kernel's decap, at the vxlan device's
//! ingress) and R3 (after our own decap, at the uplink's ingress): the L2 header a routed
//! packet would get on the bridge (pod MAC, bridge MAC), TTL - 1 as the kernel's forwarding
//! does, mark cleared (redirect_peer keeps it, the veth path would not), then
//! `bpf_redirect_peer` into the pod's eth0: no host netfilter, forwarding, bridge or veth
//! backlog.

use aya_ebpf::{
    bindings::{TC_ACT_REDIRECT, TC_ACT_SHOT},
    helpers::bpf_redirect_peer,
    programs::TcContext,
};
use overlay_common::{Endpoint, config_flags, stat};

use crate::{
    flows::{endpoint, flow_key, learned_ingress},
    parse::{
        ETH_LEN, ETH_P_IPV4, EthHdr, IPV4_LEN, Ipv4Hdr, L4, TCP_FIN, TCP_RST, TCP_SYN, config_with,
        decrement_ttl, ipv4_header_ok, load_l4, load_plain_ipv4, pass,
    },
    stats::Verdict,
};

/// Whether a remote pod's packet to `ip.daddr` may be delivered straight into the pod:
/// the destination is a known pod, the kernel recently delivered this very tuple through the
/// veth that pod sits behind (a flow un-NATed on the way in, like a Service reply, never
/// is), and the packet changes no TCP state. `Err`: the pass verdict.
#[inline(always)]
pub fn eligible_for_delivery(ip: &Ipv4Hdr, l4: &L4) -> Result<&'static Endpoint, Verdict> {
    let Some(ep) = endpoint(ip.daddr) else {
        return Err(pass(stat::KERNEL_NO_ENDPOINT));
    };
    if l4.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0 {
        return Err(pass(stat::KERNEL_TCP_CONTROL));
    }
    let key = flow_key(ip.daddr, ip.saddr, l4.dport, l4.sport, ip.proto);
    match learned_ingress(&key) {
        Some(state) if state.ingress_ifindex == ep.host_ifindex => {}
        _ => return Err(pass(stat::KERNEL_NOT_LEARNED)),
    }
    if ip.ttl <= 1 {
        return Err(pass(stat::KERNEL_TTL));
    }
    Ok(ep)
}

/// Rewrites the frame at offset 0 (Ethernet, then `ip`) for the pod and redirects it there.
/// The packet may already be changed (decapsulated): a failure drops it.
#[inline(always)]
pub fn deliver(ctx: &TcContext, ip: &Ipv4Hdr, ep: &Endpoint, reason: u32) -> Verdict {
    let eth = EthHdr {
        dst: ep.pod_mac,
        src: ep.gateway_mac,
        proto: ETH_P_IPV4,
    };
    if decrement_ttl(ctx, ETH_LEN, ip).is_err() || ctx.store(0, &eth, 0).is_err() {
        return Verdict {
            action: TC_ACT_SHOT as i32,
            reason: stat::DROP_HELPER_ERROR,
            bytes: 0,
        };
    }
    ctx.set_mark(0);
    let action = unsafe { bpf_redirect_peer(ep.host_ifindex, 0) };
    if action != TC_ACT_REDIRECT as i64 {
        return Verdict {
            action: TC_ACT_SHOT as i32,
            reason: stat::DROP_HELPER_ERROR,
            bytes: 0,
        };
    }
    Verdict {
        action: TC_ACT_REDIRECT as i32,
        reason,
        bytes: ctx.len().saturating_sub(ETH_LEN as u32),
    }
}

/// R1, TCX ingress of the kernel vxlan device: the kernel decapsulated a remote pod's packet
/// (and cleared the tunnel GSO state, so GSO super-packets are safe here too).
#[inline(always)]
pub fn vxlan_deliver(ctx: &TcContext) -> Verdict {
    let cfg = match config_with(config_flags::FAST_RX_AFTER_DECAP) {
        Ok(cfg) => cfg,
        Err(verdict) => return verdict,
    };
    let (eth, ip) = match load_plain_ipv4(ctx) {
        Ok(headers) => headers,
        Err(verdict) => return verdict,
    };
    // Frames to our VtepMAC are the ones the kernel routes; the rest is not ours to route.
    if eth.dst != cfg.vtep_mac {
        return pass(stat::KERNEL_NOT_OURS);
    }
    let Some(l4) = load_l4(ctx, ETH_LEN + IPV4_LEN, ip.proto) else {
        return pass(stat::KERNEL_NOT_OURS);
    };
    let ep = match eligible_for_delivery(&ip, &l4) {
        Ok(ep) => ep,
        Err(verdict) => return verdict,
    };
    // ip_rcv would drop a bad header; we bypass it.
    if !ipv4_header_ok(&ip, ctx.len().saturating_sub(ETH_LEN as u32)) {
        return pass(stat::KERNEL_NOT_OURS);
    }
    deliver(ctx, &ip, ep, stat::FAST_RX_AFTER_DECAP_PACKETS)
}
