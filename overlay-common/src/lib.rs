//! Shared between the eBPF programs (`overlay-ebpf`, `no_std`) and the agent.
//!
//! Every map value is `#[repr(C)]`, made of fixed-width integers and byte arrays only (no
//! `bool`, enum or `Option`: a map can hold any bit pattern), padded explicitly, and checked
//! for size at compile time. IPv4 addresses are stored as `[u8; 4]` in network byte order,
//! exactly as they appear in a packet, so neither side converts on the hot path.
#![no_std]

/// Map names as the kernel sees them (at most 15 bytes). Both sides use these constants.
pub mod map_names {
    /// LPM trie: remote pod subnet -> [`crate::PeerInfo`].
    pub const PEERS: &str = "OVL_PEERS";
    /// Hash: underlay IPv4 of a node holding a lease -> [`crate::PeerSource`].
    pub const PEER_SOURCES: &str = "OVL_PEER_SRCS";
    /// One-entry array: [`crate::DatapathConfig`].
    pub const CONFIG: &str = "OVL_CONFIG";
    /// Per-CPU array of `u64`, indexed by [`crate::stat`].
    pub const STATS: &str = "OVL_STATS";
    /// Hash: a local pod's IPv4 address -> [`crate::Endpoint`] (learned from netlink).
    pub const ENDPOINTS: &str = "OVL_ENDPOINTS";
    /// LRU hash: [`crate::FlowKey`] -> [`crate::FlowState`]: flows seen crossing the kernel
    /// path unchanged, per direction (learn-then-bypass).
    pub const FLOWS: &str = "OVL_FLOWS";
}

/// Program names (the Rust function names in `overlay-ebpf`).
pub mod program_names {
    /// TCX ingress on the uplink: drops spoofed VXLAN; decapsulates VXLAN of learned flows
    /// to local pods and delivers it into the pod (`bpf_redirect_peer`); the rest goes to
    /// the kernel vxlan device.
    pub const UPLINK_INGRESS: &str = "overlay_uplink_decap";
    /// TCX ingress on the kernel vxlan device (`flannel.<VNI>`): what the kernel
    /// decapsulated, for learned flows to local pods, goes straight into the pod.
    pub const VXLAN_INGRESS: &str = "overlay_vxlan_deliver";
    /// TCX egress on the kernel vxlan device: learns the tuples that left through the kernel
    /// path (after all NAT); the kernel device encapsulates.
    pub const VXLAN_EGRESS: &str = "overlay_vxlan_learn";
    /// TCX ingress on each host-side pod veth: encapsulates learned flows to remote pods and
    /// sends them out of the uplink.
    pub const POD_INGRESS: &str = "overlay_pod_encap";
    /// TCX egress on each host-side pod veth: learns the tuples the kernel delivered to the
    /// pod (after un-NAT).
    pub const POD_EGRESS: &str = "overlay_pod_learn";
    /// Run once at load with BPF_PROG_TEST_RUN: does the kernel accept
    /// `BPF_F_ADJ_ROOM_DECAP_L4_UDP` (clears the tunnel GSO state on decap)?
    pub const PROBE_DECAP_L4_UDP: &str = "overlay_probe_decap_l4_udp";
}

/// `BPF_F_ADJ_ROOM_DECAP_L4_UDP` (bpf-next, 2026; not in 6.18): `bpf_skb_adjust_room` clears
/// `SKB_GSO_UDP_TUNNEL[_CSUM]` and `skb->encapsulation` when it removes a UDP tunnel header.
/// Kernels without it reject the bit with -EINVAL.
pub const BPF_F_ADJ_ROOM_DECAP_L4_UDP: u64 = 1 << 10;

/// Capacity of the peer maps: one entry per remote node lease.
pub const MAX_PEERS: u32 = 65_536;
/// Capacity of the endpoint map: local pods.
pub const MAX_ENDPOINTS: u32 = 4_096;
/// Capacity of the learned-flow table (LRU: the least recently used flow is evicted and
/// simply takes the kernel path again).
pub const MAX_FLOWS: u32 = 262_144;
/// A learned direction of a flow is trusted this long; then its next packet crosses the
/// kernel path again, which re-validates it (a NAT rule added since, conntrack kept alive).
pub const FLOW_FRESH_NS: u64 = 5_000_000_000;

/// Bytes VXLAN over IPv4 adds in front of the inner Ethernet frame's IP packet:
/// outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14).
pub const VXLAN_OVERHEAD: u32 = 50;
/// Linux's default VXLAN port, which flannel uses when `Backend.Port` is 0.
pub const DEFAULT_VXLAN_PORT: u16 = 8472;

/// Key of [`map_names::PEERS`]: the data part of an LPM trie key, i.e. the subnet's network
/// address in network byte order. The prefix length lives in aya's `Key` wrapper.
pub type PeerSubnet = [u8; 4];

/// Value of [`map_names::PEERS`]: where to send traffic for one remote subnet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    /// The peer's PublicIP (outer destination), network byte order.
    pub underlay_ip: [u8; 4],
    /// The peer's VtepMAC (inner destination MAC, as flannel's vxlan device expects).
    pub vtep_mac: [u8; 6],
    /// Bit set of [`peer_flags`].
    pub flags: u16,
    /// Generation of the resync that last wrote this entry (mark-and-sweep).
    pub generation: u32,
    /// Underlay next hop towards `underlay_ip` (the peer itself on a flat underlay, else
    /// its gateway), so the fast path resolves only a neighbour, with no route lookup per
    /// packet. All zero: unknown, the fast path leaves the flow to the kernel.
    pub nexthop_ip: [u8; 4],
}

/// Flags of [`PeerInfo::flags`].
pub mod peer_flags {
    /// The entry is complete and may be used for encapsulation.
    pub const VALID: u16 = 1;
}

/// Value of [`map_names::PEER_SOURCES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerSource {
    /// How many leases name this underlay address (normally one).
    pub lease_count: u32,
    /// Generation of the resync that last wrote this entry.
    pub generation: u32,
}

/// Value of [`map_names::CONFIG`] (index 0). Written by the agent once its lease is held, and
/// whenever the bridge or uplink changes. All-zero (the initial state) means "not configured":
/// the programs then pass everything to the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DatapathConfig {
    /// Our PublicIP: outer source on encap, required outer destination on decap.
    pub local_ip: [u8; 4],
    /// Our subnet's network address and netmask (network byte order).
    pub subnet_addr: [u8; 4],
    pub subnet_mask: [u8; 4],
    /// The bridge's own address (the pods' gateway); traffic to it is the kernel's.
    pub gateway_ip: [u8; 4],
    /// VXLAN network identifier (host byte order, < 2^24).
    pub vni: u32,
    /// Interface indexes in the node's network namespace (0: not present).
    pub uplink_ifindex: u32,
    pub bridge_ifindex: u32,
    /// The kernel's `flannel.<VNI>` device (what the kernel path encapsulates with).
    pub vxlan_ifindex: u32,
    /// Largest inner IPv4 packet the underlay carries without fragmenting (uplink MTU - 50).
    pub max_inner_len: u32,
    /// Our VtepMAC (inner source MAC on encap; the kernel device's MAC).
    pub vtep_mac: [u8; 6],
    /// VXLAN UDP destination port, network byte order.
    pub udp_port_be: u16,
    /// Bit set of [`config_flags`].
    pub flags: u32,
    /// Nonzero once the agent has written a complete configuration.
    pub enabled: u32,
}

/// Flags of [`DatapathConfig::flags`]: which fast-path pieces are on (`--ebpf-fast-path`)
/// and what the kernel supports.
pub mod config_flags {
    /// R1: TCX ingress of the vxlan device delivers learned flows into the pod.
    pub const FAST_RX_AFTER_DECAP: u32 = 1;
    /// R2: TCX ingress of the pod veth encapsulates learned flows and sends them to the
    /// uplink.
    pub const FAST_TX: u32 = 2;
    /// R3: the uplink program decapsulates learned flows and delivers them into the pod.
    pub const FAST_RX_BEFORE_DECAP: u32 = 4;
    /// The kernel accepts [`crate::BPF_F_ADJ_ROOM_DECAP_L4_UDP`]: R3 may decapsulate
    /// GRO-merged (GSO) VXLAN too.
    pub const HAVE_DECAP_L4_UDP: u32 = 8;
}

/// Value of [`map_names::ENDPOINTS`]: a local pod, learned from netlink (a veth whose master
/// is the pod bridge, its peer's address and MAC in the pod's network namespace).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// The host-side veth (the pod's eth0 is its peer).
    pub host_ifindex: u32,
    /// The pod's eth0 MAC: destination MAC of frames delivered into the pod.
    pub pod_mac: [u8; 6],
    /// The bridge's MAC (the pods' gateway): source MAC of frames delivered into the pod.
    pub gateway_mac: [u8; 6],
    /// Generation of the resync that last wrote this entry.
    pub generation: u32,
}

/// Key of [`map_names::FLOWS`]: a TCP/UDP flow between a local pod and a remote pod, seen
/// from the local pod (the same key for both directions).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// The local pod's address, network byte order.
    pub pod_ip: [u8; 4],
    /// The remote pod's address, network byte order.
    pub remote_ip: [u8; 4],
    /// Ports as on the wire (network byte order).
    pub pod_port_be: u16,
    pub remote_port_be: u16,
    /// IP protocol number (6 TCP, 17 UDP).
    pub protocol: u8,
    pub _pad: [u8; 3],
}

/// Value of [`map_names::FLOWS`]: when each direction last crossed the kernel path with
/// exactly this tuple. A direction takes its fast path only while its own timestamp is
/// fresh ([`FLOW_FRESH_NS`]), so a flow the kernel NATs (changing its tuple) never does.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowState {
    /// `bpf_ktime_get_ns` when the pod's packet left through the vxlan device (0: never).
    pub egress_seen_ns: u64,
    /// `bpf_ktime_get_ns` when the kernel delivered a packet of the flow to the pod.
    pub ingress_seen_ns: u64,
    /// The host veth the kernel delivered it through: the fast path delivers only there.
    pub ingress_ifindex: u32,
    pub _pad: u32,
}

/// Indexes of [`map_names::STATS`]. Every packet a program sees bumps exactly one reason
/// counter (all but the `*_BYTES` counters, which the fast paths bump alongside their packet
/// counter). `FAST_*`: the packet took a fast path; `KERNEL_*`: it went to the kernel
/// (untouched) and why; `DROP_*`: dropped.
pub mod stat {
    /// R2: encapsulated at the pod veth and sent out of the uplink.
    pub const FAST_TX_PACKETS: u32 = 0;
    /// Bytes of inner IPv4 packets (GSO super-packets count whole).
    pub const FAST_TX_BYTES: u32 = 1;
    /// R3: decapsulated on the uplink and delivered into the pod.
    pub const FAST_RX_BEFORE_DECAP_PACKETS: u32 = 2;
    pub const FAST_RX_BEFORE_DECAP_BYTES: u32 = 3;
    /// R1: decapsulated by the kernel device, then delivered into the pod.
    pub const FAST_RX_AFTER_DECAP_PACKETS: u32 = 4;
    pub const FAST_RX_AFTER_DECAP_BYTES: u32 = 5;
    /// To the kernel: not ours (not IPv4, not VXLAN for us, not TCP/UDP, IP options...).
    pub const KERNEL_NOT_OURS: u32 = 6;
    /// To the kernel: an IP fragment.
    pub const KERNEL_FRAGMENT: u32 = 7;
    /// To the kernel: no remote peer for the destination / not a known local pod / the
    /// packet did not come from the pod its veth belongs to.
    pub const KERNEL_NO_ENDPOINT: u32 = 8;
    /// To the kernel: this direction of the flow has not (recently) crossed the kernel path
    /// unchanged (new, NATed, or due for re-validation).
    pub const KERNEL_NOT_LEARNED: u32 = 9;
    /// To the kernel: TCP SYN, FIN or RST (conntrack must see every state change).
    pub const KERNEL_TCP_CONTROL: u32 = 10;
    /// To the kernel: larger than the underlay carries (the kernel answers PMTU).
    pub const KERNEL_TOO_BIG: u32 = 11;
    /// To the kernel: GRO-merged VXLAN this kernel cannot decapsulate in BPF (no
    /// `BPF_F_ADJ_ROOM_DECAP_L4_UDP`), or inner UDP GSO.
    pub const KERNEL_GSO: u32 = 12;
    /// To the kernel: the TTL would expire.
    pub const KERNEL_TTL: u32 = 13;
    /// To the kernel: datapath not configured yet, or this fast-path piece is off.
    pub const KERNEL_DISABLED: u32 = 14;
    /// To the kernel: a header was truncated.
    pub const KERNEL_TRUNCATED: u32 = 15;
    /// To the kernel untouched: a helper failed before the packet changed.
    pub const KERNEL_HELPER_ERROR: u32 = 16;
    /// To the kernel, after learning this direction of the flow (a learn program).
    pub const KERNEL_LEARNED: u32 = 17;
    /// To the kernel: outer ECN CE on an inner packet that is not ECN-capable (the kernel
    /// decides, as RFC 6040 says).
    pub const KERNEL_ECN: u32 = 18;
    /// Dropped: VXLAN for us from an underlay address that holds no lease.
    pub const DROP_UNKNOWN_SOURCE: u32 = 19;
    /// Dropped: a helper failed after the packet was already rewritten (half-built headers
    /// must not reach the kernel).
    pub const DROP_HELPER_ERROR: u32 = 20;
    /// Number of counters.
    pub const COUNT: u32 = 21;

    /// Names for metrics and status, indexed like the constants above.
    pub const NAMES: [&str; COUNT as usize] = [
        "fast_tx_packets",
        "fast_tx_bytes",
        "fast_rx_before_decap_packets",
        "fast_rx_before_decap_bytes",
        "fast_rx_after_decap_packets",
        "fast_rx_after_decap_bytes",
        "kernel_not_ours",
        "kernel_fragment",
        "kernel_no_endpoint",
        "kernel_not_learned",
        "kernel_tcp_control",
        "kernel_too_big",
        "kernel_gso",
        "kernel_ttl",
        "kernel_disabled",
        "kernel_truncated",
        "kernel_helper_error",
        "kernel_learned",
        "kernel_ecn",
        "drop_unknown_source",
        "drop_helper_error",
    ];

    /// Whether a counter counts packets by reason (as opposed to bytes).
    pub const fn is_reason(index: u32) -> bool {
        index != FAST_TX_BYTES
            && index != FAST_RX_BEFORE_DECAP_BYTES
            && index != FAST_RX_AFTER_DECAP_BYTES
            && index < COUNT
    }

    /// The byte counter that goes with a fast-path packet counter.
    pub const fn bytes_of(index: u32) -> Option<u32> {
        match index {
            FAST_TX_PACKETS => Some(FAST_TX_BYTES),
            FAST_RX_BEFORE_DECAP_PACKETS => Some(FAST_RX_BEFORE_DECAP_BYTES),
            FAST_RX_AFTER_DECAP_PACKETS => Some(FAST_RX_AFTER_DECAP_BYTES),
            _ => None,
        }
    }
}

const _: () = assert!(core::mem::size_of::<PeerInfo>() == 20);
const _: () = assert!(core::mem::size_of::<PeerSource>() == 8);
const _: () = assert!(core::mem::size_of::<DatapathConfig>() == 52);
const _: () = assert!(core::mem::size_of::<Endpoint>() == 20);
const _: () = assert!(core::mem::size_of::<FlowKey>() == 16);
const _: () = assert!(core::mem::size_of::<FlowState>() == 24);

#[cfg(feature = "user")]
mod pod_impls {
    // SAFETY: all of these are repr(C), made of integers and byte arrays only, with no implicit
    // padding (sizes asserted above), so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::PeerInfo {}
    unsafe impl aya::Pod for super::PeerSource {}
    unsafe impl aya::Pod for super::DatapathConfig {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowState {}
    unsafe impl aya::Pod for super::Endpoint {}
}
