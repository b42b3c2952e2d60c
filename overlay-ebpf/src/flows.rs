//! Learn-then-bypass (ONCache's idea): a flow takes a fast path only after its packets
//! crossed the kernel path with an unchanged tuple in both directions, learned where the
//! kernel is done with them: at the vxlan device's egress (after routing, netfilter and all
//! NAT) and at the pod veth's egress (after un-NAT). A NATed flow (kube-proxy's ClusterIP
//! DNAT, hostPort DNAT, masquerade) never matches, so conntrack keeps undoing its NAT.

use aya_ebpf::{helpers::bpf_ktime_get_ns, maps::lpm_trie::Key, programs::TcContext};
use overlay_common::{Endpoint, FLOW_FRESH_NS, FlowKey, FlowState, peer_flags, stat};

use crate::{
    maps::{ENDPOINTS, FLOWS, PEERS, config},
    parse::{
        ETH_LEN, ETH_P_IPV4, EthHdr, IPPROTO_TCP, IPPROTO_UDP, IPV4_LEN, Ipv4Hdr, L4, ifindex,
        load, load_l4, pass,
    },
    stats::Verdict,
};

#[inline(always)]
pub fn flow_key(
    pod_ip: [u8; 4],
    remote_ip: [u8; 4],
    pod_port: [u8; 2],
    remote_port: [u8; 2],
    protocol: u8,
) -> FlowKey {
    FlowKey {
        pod_ip,
        remote_ip,
        pod_port_be: u16::from_ne_bytes(pod_port),
        remote_port_be: u16::from_ne_bytes(remote_port),
        protocol,
        _pad: [0; 3],
    }
}

/// Whether `addr` lies in a remote node's subnet (a pod there).
#[inline(always)]
pub fn is_remote_pod(addr: [u8; 4]) -> bool {
    matches!(PEERS.get(Key::new(32, addr)), Some(peer) if peer.flags & peer_flags::VALID != 0)
}

/// A local pod known from netlink.
#[inline(always)]
pub fn endpoint(addr: [u8; 4]) -> Option<&'static Endpoint> {
    unsafe { ENDPOINTS.get(&addr) }
}

/// Whether a timestamp of a learned direction is recent enough to trust.
#[inline(always)]
fn fresh(seen: u64) -> bool {
    let now = unsafe { bpf_ktime_get_ns() };
    seen != 0 && now.wrapping_sub(seen) < FLOW_FRESH_NS
}

/// The pod's packets of this flow left through the kernel path unchanged within
/// [`FLOW_FRESH_NS`]: its next packet may be encapsulated at the pod veth. Only this
/// direction matters: a flow NATed on the way out (hostPort replies are un-DNATed, Services
/// DNATed) leaves with another tuple and is never learned under its pod tuple. (A flow that
/// only goes one way, like a UDP stream, takes the fast path too.)
#[inline(always)]
pub fn is_learned_egress(key: &FlowKey) -> bool {
    unsafe { FLOWS.get(key) }.is_some_and(|state| fresh(state.egress_seen_ns))
}

/// The kernel delivered this flow's packets to the pod unchanged within [`FLOW_FRESH_NS`]:
/// the learned state, to check the veth it went through.
#[inline(always)]
pub fn learned_ingress(key: &FlowKey) -> Option<&'static FlowState> {
    let state = unsafe { FLOWS.get(key) }?;
    fresh(state.ingress_seen_ns).then_some(state)
}

/// The IPv4 header and TCP/UDP ports of a routed frame; `Err` is the pass verdict.
#[inline(always)]
fn parse_tcp_udp(ctx: &TcContext) -> Result<(EthHdr, Ipv4Hdr, L4), Verdict> {
    let eth = load::<EthHdr>(ctx, 0).ok_or(pass(stat::KERNEL_TRUNCATED))?;
    if eth.proto != ETH_P_IPV4 {
        return Err(pass(stat::KERNEL_NOT_OURS));
    }
    let ip = load::<Ipv4Hdr>(ctx, ETH_LEN).ok_or(pass(stat::KERNEL_TRUNCATED))?;
    if ip.version() != 4 || ip.header_len() < IPV4_LEN {
        return Err(pass(stat::KERNEL_NOT_OURS));
    }
    if ip.is_fragment() {
        return Err(pass(stat::KERNEL_FRAGMENT));
    }
    if ip.proto != IPPROTO_TCP && ip.proto != IPPROTO_UDP {
        return Err(pass(stat::KERNEL_NOT_OURS));
    }
    let l4 =
        load_l4(ctx, ETH_LEN + ip.header_len(), ip.proto).ok_or(pass(stat::KERNEL_TRUNCATED))?;
    Ok((eth, ip, l4))
}

/// TCX egress of the vxlan device: the kernel routed a local pod's packet to a remote pod
/// and is about to encapsulate it. Learns that this tuple leaves unchanged.
#[inline(always)]
pub fn learn_egress(ctx: &TcContext) -> Verdict {
    if config().is_none() {
        return pass(stat::KERNEL_DISABLED);
    }
    let (_, ip, l4) = match parse_tcp_udp(ctx) {
        Ok(parsed) => parsed,
        Err(verdict) => return verdict,
    };
    if endpoint(ip.saddr).is_none() || !is_remote_pod(ip.daddr) {
        // Masqueraded host traffic, unknown pods: nothing to learn.
        return pass(stat::KERNEL_NO_ENDPOINT);
    }
    let key = flow_key(ip.saddr, ip.daddr, l4.sport, l4.dport, ip.proto);
    let now = unsafe { bpf_ktime_get_ns() };
    match FLOWS.get_ptr_mut(&key) {
        Some(state) => unsafe { (*state).egress_seen_ns = now },
        None => {
            let state = FlowState {
                egress_seen_ns: now,
                ..FlowState::default()
            };
            let _ = FLOWS.insert(&key, &state, 0);
        }
    }
    pass(stat::KERNEL_LEARNED)
}

/// TCX egress of a pod's host veth: the kernel delivers a remote pod's packet to the pod.
/// Learns that this tuple arrives unchanged, and through which veth.
#[inline(always)]
pub fn learn_ingress(ctx: &TcContext) -> Verdict {
    if config().is_none() {
        return pass(stat::KERNEL_DISABLED);
    }
    let (eth, ip, l4) = match parse_tcp_udp(ctx) {
        Ok(parsed) => parsed,
        Err(verdict) => return verdict,
    };
    let here = ifindex(ctx);
    // The kernel addressed the frame to the pod's real MAC: an endpoint entry that names
    // another MAC is stale (the pod was re-created, maybe on a reused ifindex) and must not
    // be learned through until the agent has replaced it.
    match endpoint(ip.daddr) {
        Some(ep) if ep.host_ifindex == here && ep.pod_mac == eth.dst => {}
        _ => return pass(stat::KERNEL_NO_ENDPOINT),
    }
    if !is_remote_pod(ip.saddr) {
        return pass(stat::KERNEL_NO_ENDPOINT);
    }
    let key = flow_key(ip.daddr, ip.saddr, l4.dport, l4.sport, ip.proto);
    let now = unsafe { bpf_ktime_get_ns() };
    match FLOWS.get_ptr_mut(&key) {
        Some(state) => unsafe {
            (*state).ingress_seen_ns = now;
            (*state).ingress_ifindex = here;
        },
        None => {
            let state = FlowState {
                ingress_seen_ns: now,
                ingress_ifindex: here,
                ..FlowState::default()
            };
            let _ = FLOWS.insert(&key, &state, 0);
        }
    }
    pass(stat::KERNEL_LEARNED)
}
