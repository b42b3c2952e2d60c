//! Header layouts and small parsing helpers shared by encap and decap.
//!
//! Headers are read with `bpf_skb_load_bytes` (via `TcContext::load`) into byte-array structs:
//! it works on non-linear skbs, and a short packet simply fails the load (= truncated).

use aya_ebpf::{bindings::TC_ACT_UNSPEC, programs::TcContext};

use crate::stats::Verdict;

pub const ETH_LEN: usize = 14;
pub const IPV4_LEN: usize = 20;
pub const UDP_LEN: usize = 8;
pub const VXLAN_LEN: usize = 8;
pub const ETH_P_IPV4: [u8; 2] = [0x08, 0x00];
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
/// VXLAN flags byte: "I" (valid VNI).
pub const VXLAN_FLAG_I: u8 = 0x08;
/// The IPv4 fragment bits: More Fragments and the offset (Don't Fragment excluded).
const IP_MF_AND_OFFSET: u16 = 0x3fff;
/// `TC_ACT_UNSPEC` is TCX_NEXT: hand the packet to the next program / the kernel untouched.
/// (TC_ACT_OK would end a TCX chain.)
pub const PASS: i32 = TC_ACT_UNSPEC;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub ver_ihl: u8,
    pub tos: u8,
    pub tot_len: [u8; 2],
    pub id: [u8; 2],
    pub frag_off: [u8; 2],
    pub ttl: u8,
    pub proto: u8,
    pub check: [u8; 2],
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
}

impl Ipv4Hdr {
    #[inline(always)]
    pub fn version(&self) -> u8 {
        self.ver_ihl >> 4
    }
    /// Header length in bytes.
    #[inline(always)]
    pub fn header_len(&self) -> usize {
        usize::from(self.ver_ihl & 0x0f) * 4
    }
    #[inline(always)]
    pub fn is_fragment(&self) -> bool {
        u16::from_be_bytes(self.frag_off) & IP_MF_AND_OFFSET != 0
    }
}

/// UDP header followed by the VXLAN header (read in one load on decap).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UdpVxlanHdr {
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub len: [u8; 2],
    pub check: [u8; 2],
    pub vxlan_flags: u8,
    pub vxlan_reserved: [u8; 3],
    /// VNI (24 bits, big endian) then a reserved byte.
    pub vni_reserved: [u8; 4],
}

const _: () = assert!(core::mem::size_of::<EthHdr>() == ETH_LEN);
const _: () = assert!(core::mem::size_of::<Ipv4Hdr>() == IPV4_LEN);
const _: () = assert!(core::mem::size_of::<UdpVxlanHdr>() == UDP_LEN + VXLAN_LEN);

/// The VXLAN VNI field as it appears on the wire: VNI << 8, big endian.
#[inline(always)]
pub fn vni_wire(vni: u32) -> [u8; 4] {
    (vni << 8).to_be_bytes()
}

#[inline(always)]
pub fn load<T>(ctx: &TcContext, offset: usize) -> Option<T> {
    ctx.load::<T>(offset).ok()
}

/// `gso_size` of the skb: nonzero for GSO/GRO super-packets.
#[inline(always)]
pub fn gso_size(ctx: &TcContext) -> u32 {
    unsafe { (*ctx.skb.skb).gso_size }
}

/// Decrements the IPv4 TTL of the header at `ip_off` and fixes its checksum incrementally
/// (we forward the packet, as the kernel's routing would).
#[inline(always)]
pub fn decrement_ttl(ctx: &TcContext, ip_off: usize, ip: &Ipv4Hdr) -> Result<(), ()> {
    // TTL and protocol share one 16-bit checksum word; the helper takes it as stored in the
    // packet (network byte order), hence from_ne_bytes on the wire bytes.
    let old = u16::from_ne_bytes([ip.ttl, ip.proto]);
    let new = u16::from_ne_bytes([ip.ttl - 1, ip.proto]);
    ctx.l3_csum_replace(ip_off + 10, u64::from(old), u64::from(new), 2)
        .map_err(|_| ())?;
    ctx.store(ip_off + 8, &(ip.ttl - 1), 0).map_err(|_| ())
}

/// The Internet checksum of a 20-byte IPv4 header: what belongs in `check` when it is zero,
/// and `[0, 0]` when the header (with its checksum) verifies.
#[inline(always)]
pub fn ipv4_checksum(ip: &Ipv4Hdr) -> [u8; 2] {
    let bytes: &[u8; IPV4_LEN] = unsafe { &*(ip as *const Ipv4Hdr as *const [u8; IPV4_LEN]) };
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < IPV4_LEN {
        sum += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_be_bytes()
}

/// An option-less IPv4 header as the kernel's `ip_rcv` accepts it: checksum right, total
/// length covering the header and within the `available` bytes. The fast paths bypass
/// `ip_rcv`, so they must not forward what it would drop (found by the fuzz test).
#[inline(always)]
pub fn ipv4_header_ok(ip: &Ipv4Hdr, available: u32) -> bool {
    let total = u32::from(u16::from_be_bytes(ip.tot_len));
    ip.ver_ihl == 0x45
        && total >= IPV4_LEN as u32
        && total <= available
        && ipv4_checksum(ip) == [0, 0]
}

#[inline(always)]
pub fn pass(reason: u32) -> Verdict {
    Verdict {
        action: PASS,
        reason,
        bytes: 0,
    }
}

/// TCP flags that change a connection's state: conntrack must see each of them.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;

/// Ports of a TCP or UDP header, and what the fast paths need besides.
#[derive(Clone, Copy)]
pub struct L4 {
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
    /// Header length in bytes (TCP data offset, 8 for UDP).
    pub header_len: u32,
}

/// The first 14 bytes of a TCP header (ports, sequence, ack, offset and flags).
#[repr(C)]
#[derive(Clone, Copy)]
struct TcpHead {
    sport: [u8; 2],
    dport: [u8; 2],
    seq: [u8; 4],
    ack: [u8; 4],
    data_offset: u8,
    flags: u8,
}

/// Reads the TCP or UDP header at `off` (`None`: other protocol or truncated).
#[inline(always)]
pub fn load_l4(ctx: &TcContext, off: usize, proto: u8) -> Option<L4> {
    match proto {
        IPPROTO_TCP => {
            let tcp = load::<TcpHead>(ctx, off)?;
            Some(L4 {
                sport: tcp.sport,
                dport: tcp.dport,
                tcp_flags: tcp.flags,
                header_len: u32::from(tcp.data_offset >> 4) * 4,
            })
        }
        IPPROTO_UDP => {
            let ports = load::<[u8; 4]>(ctx, off)?;
            Some(L4 {
                sport: [ports[0], ports[1]],
                dport: [ports[2], ports[3]],
                tcp_flags: 0,
                header_len: 8,
            })
        }
        _ => None,
    }
}

/// ECN field values (the low two bits of the TOS byte).
pub const ECN_MASK: u8 = 0x03;
pub const ECN_CE: u8 = 0x03;

/// Marks the IPv4 header at `ip_off` Congestion Experienced, fixing its checksum
/// incrementally (RFC 6040 decapsulation of an outer CE mark onto an ECN-capable inner).
#[inline(always)]
pub fn set_ecn_ce(ctx: &TcContext, ip_off: usize, ip: &Ipv4Hdr) -> Result<(), ()> {
    let old = u16::from_ne_bytes([ip.ver_ihl, ip.tos]);
    let new = u16::from_ne_bytes([ip.ver_ihl, ip.tos | ECN_CE]);
    ctx.l3_csum_replace(ip_off + 10, u64::from(old), u64::from(new), 2)
        .map_err(|_| ())?;
    ctx.store(ip_off + 1, &(ip.tos | ECN_CE), 0).map_err(|_| ())
}

/// `ifindex` of the device the program runs on.
#[inline(always)]
pub fn ifindex(ctx: &TcContext) -> u32 {
    unsafe { (*ctx.skb.skb).ifindex }
}

/// The datapath configuration, when the agent wrote one and turned `piece` (a
/// `config_flags` bit) on; `Err`: the pass verdict.
#[inline(always)]
pub fn config_with(piece: u32) -> Result<&'static overlay_common::DatapathConfig, Verdict> {
    match crate::maps::config() {
        Some(cfg) if cfg.flags & piece != 0 => Ok(cfg),
        _ => Err(pass(overlay_common::stat::KERNEL_DISABLED)),
    }
}

/// The Ethernet and IPv4 headers of a frame the fast paths may take: IPv4 without options,
/// not a fragment (the kernel path handles the rest). `Err`: the pass verdict.
#[inline(always)]
pub fn load_plain_ipv4(ctx: &TcContext) -> Result<(EthHdr, Ipv4Hdr), Verdict> {
    use overlay_common::stat;
    let eth = load::<EthHdr>(ctx, 0).ok_or(pass(stat::KERNEL_TRUNCATED))?;
    if eth.proto != ETH_P_IPV4 {
        return Err(pass(stat::KERNEL_NOT_OURS));
    }
    let ip = load::<Ipv4Hdr>(ctx, ETH_LEN).ok_or(pass(stat::KERNEL_TRUNCATED))?;
    if ip.ver_ihl != 0x45 {
        return Err(pass(stat::KERNEL_NOT_OURS));
    }
    if ip.is_fragment() {
        return Err(pass(stat::KERNEL_FRAGMENT));
    }
    Ok((eth, ip))
}
