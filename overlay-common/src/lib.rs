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
    /// LRU hash: [`crate::FlowKey`] of a local pod's flow towards a non-pod address
    /// (e.g. a Service IP that kube-proxy DNATs) -> `u64` last-seen ktime.
    pub const SERVICE_FLOWS: &str = "OVL_SVC_FLOWS";
}

/// Program names (the Rust function names in `overlay-ebpf`).
pub mod program_names {
    /// TC ingress on the pod bridge: encapsulates pod traffic towards remote subnets (direct
    /// mode).
    pub const BRIDGE_EGRESS: &str = "overlay_bridge_encap";
    /// TC egress on the kernel vxlan device (`flannel.<VNI>`): encapsulates what the kernel
    /// routed there (default mode).
    pub const VXLAN_EGRESS: &str = "overlay_vxlan_encap";
    /// TC ingress on the uplink: filters and decapsulates VXLAN towards local pods.
    pub const UPLINK_INGRESS: &str = "overlay_uplink_decap";
}

/// Capacity of the peer maps: one entry per remote node lease.
pub const MAX_PEERS: u32 = 65_536;
/// Capacity of the Service-flow guard.
pub const MAX_SERVICE_FLOWS: u32 = 65_536;

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
    /// The kernel's `flannel.<VNI>` device: decapsulated packets enter the stack through it.
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

/// Flags of [`DatapathConfig::flags`].
pub mod config_flags {
    /// Direct mode (the bridge program encapsulates). Decap delivers straight to the pod through the bridge (`bpf_redirect_neigh`), skipping
    /// the node's netfilter/conntrack; replies of flows the Service guard remembered still go
    /// the kernel way. Only correct when no NAT happens before the bridge's TC hook (e.g.
    /// br_netfilter off). Without this flag, decapsulated packets enter the stack through the
    /// kernel vxlan device exactly as if it had decapsulated them (conntrack, iptables and
    /// rp_filter see what flannel would give them).
    pub const DECAP_DIRECT: u32 = 1;
}

/// Key of [`map_names::SERVICE_FLOWS`]: a local pod's endpoint of a flow that left through the
/// kernel path towards a non-pod address. Replies to it must go through the kernel too (its
/// conntrack holds the reverse NAT).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowKey {
    /// The local pod's address, network byte order.
    pub pod_ip: [u8; 4],
    /// The local pod's port, network byte order.
    pub pod_port_be: u16,
    /// IP protocol number (6 TCP, 17 UDP).
    pub protocol: u8,
    pub _pad: u8,
}

/// Indexes of [`map_names::STATS`]. Every packet a program sees bumps exactly one reason
/// counter (all but the two `*_BYTES` counters, which encap/decap bump alongside their packet
/// counter).
pub mod stat {
    /// Encapsulated and sent to a peer.
    pub const ENCAP_PACKETS: u32 = 0;
    /// Bytes of inner packets encapsulated.
    pub const ENCAP_BYTES: u32 = 1;
    /// Decapsulated and delivered towards a local pod.
    pub const DECAP_PACKETS: u32 = 2;
    pub const DECAP_BYTES: u32 = 3;
    /// Passed to the kernel: not ours (not IPv4, not VXLAN, other port/VNI/destination...).
    pub const PASS_NOT_OURS: u32 = 4;
    /// Passed to the kernel: IP fragment.
    pub const PASS_FRAGMENT: u32 = 5;
    /// Passed to the kernel: no peer for the destination, an address the kernel owns, or the
    /// device to deliver through is missing.
    pub const PASS_NO_ROUTE: u32 = 6;
    /// Passed to the kernel: larger than the underlay carries (the kernel answers PMTU).
    pub const PASS_TOO_BIG: u32 = 7;
    /// Passed to the kernel: reply of a Service (DNAT) flow, needs conntrack.
    pub const PASS_SERVICE_FLOW: u32 = 8;
    /// Passed to the kernel: datapath not configured yet.
    pub const PASS_UNCONFIGURED: u32 = 9;
    /// Passed to the kernel: TTL would expire.
    pub const PASS_TTL: u32 = 10;
    /// Passed to the kernel untouched: a helper failed before the packet changed
    /// (adjust_room, redirect).
    pub const PASS_HELPER_ERROR: u32 = 11;
    /// Dropped: VXLAN for us from an underlay address that holds no lease.
    pub const DROP_UNKNOWN_SOURCE: u32 = 12;
    /// Dropped: VXLAN for us that is malformed (truncated, bad flags, inner not IPv4).
    pub const DROP_MALFORMED: u32 = 13;
    /// Passed to the kernel: truncated header on a packet that may not be ours.
    pub const PASS_TRUNCATED: u32 = 14;
    /// Passed to the kernel: a GRO-merged VXLAN super-packet (its vxlan device decapsulates it).
    pub const PASS_GSO: u32 = 15;
    /// Dropped: a helper failed after the packet was already rewritten (half-built headers
    /// must not reach the kernel).
    pub const DROP_HELPER_ERROR: u32 = 16;
    /// Number of counters.
    pub const COUNT: u32 = 17;

    /// Names for metrics and status, indexed like the constants above.
    pub const NAMES: [&str; COUNT as usize] = [
        "encap_packets",
        "encap_bytes",
        "decap_packets",
        "decap_bytes",
        "pass_not_ours",
        "pass_fragment",
        "pass_no_route",
        "pass_too_big",
        "pass_service_flow",
        "pass_unconfigured",
        "pass_ttl",
        "pass_helper_error",
        "drop_unknown_source",
        "drop_malformed",
        "pass_truncated",
        "pass_gso",
        "drop_helper_error",
    ];

    /// Whether a counter counts packets by reason (as opposed to bytes).
    pub const fn is_reason(index: u32) -> bool {
        index != ENCAP_BYTES && index != DECAP_BYTES && index < COUNT
    }
}

const _: () = assert!(core::mem::size_of::<PeerInfo>() == 16);
const _: () = assert!(core::mem::size_of::<PeerSource>() == 8);
const _: () = assert!(core::mem::size_of::<DatapathConfig>() == 52);
const _: () = assert!(core::mem::size_of::<FlowKey>() == 8);

#[cfg(feature = "user")]
mod pod_impls {
    // SAFETY: all four are repr(C), made of integers and byte arrays only, with no implicit
    // padding (sizes asserted above), so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::PeerInfo {}
    unsafe impl aya::Pod for super::PeerSource {}
    unsafe impl aya::Pod for super::DatapathConfig {}
    unsafe impl aya::Pod for super::FlowKey {}
}
