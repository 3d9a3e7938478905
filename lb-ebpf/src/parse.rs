//! Bounds-checked header access and the parse shared by ingress and egress.

use core::mem;

use lb_common::{Addr6, FlowKeyOf, MAX_EXT_HEADERS, PROTO_TCP, PROTO_UDP, Reason};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};

/// EtherTypes as they sit in memory (network order read as a native u16).
const ETH_P_IP: u16 = 0x0800_u16.to_be();
const ETH_P_IPV6: u16 = 0x86dd_u16.to_be();
const ETH_P_8021Q: u16 = 0x8100_u16.to_be();
/// IPv4 `frags` field: MF flag plus the 13-bit offset; any bit set means "a fragment".
const IP_MF_OFFSET_MASK: u16 = 0x3fff;
/// Offset of the destination port inside the TCP and UDP headers.
pub const DPORT_OFF: usize = 2;
/// Offset of the checksum field inside the TCP and UDP headers.
pub const TCP_CHECK_OFF: usize = 16;
pub const UDP_CHECK_OFF: usize = 6;
/// Offset of the IPv4 header checksum.
pub const IP_CHECK_OFF: usize = 10;

/// Largest offset `ptr_at` accepts.
const MAX_HEADER_OFFSET: usize = 0x3fff;

/// What both programs can read packets from.
pub trait PacketCtx {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
}

impl PacketCtx for aya_ebpf::programs::XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        self.data_end()
    }
}

impl PacketCtx for aya_ebpf::programs::TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        self.data_end()
    }
}

/// A pointer to a `T` at `offset`, or `None` if the packet is too short: the check the
/// verifier needs before any access.
#[inline(always)]
pub fn ptr_at<C: PacketCtx, T>(ctx: &C, offset: usize) -> Option<*mut T> {
    // Header offsets reach at most ~8.3 KB (four 2 KB IPv6 extension headers). The explicit
    // bound also tells the verifier the range of an offset the compiler kept on the stack,
    // which it would otherwise refuse to add to a packet pointer.
    if offset > MAX_HEADER_OFFSET {
        return None;
    }
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

// Packet fields sit at any byte offset (an IPv4 address at 26, after Ethernet). Read or
// written through a Rust pointer of their type they would have to be aligned, and through
// `read_unaligned`/`write_unaligned` LLVM's BPF backend moves them a byte at a time (with
// the spills those bytes cost). These are one BPF instruction each, which the verifier
// allows at any alignment in packet memory on the CPUs with efficient unaligned access
// (x86-64, arm64).

/// The 2 bytes at `p`, as they sit in memory (network order read as native).
///
/// # Safety
/// `p` and the byte after it lie inside the packet, bounds-checked (`ptr_at`).
#[inline(always)]
pub unsafe fn load_u16(p: *const u8) -> u16 {
    let v: u16;
    // SAFETY: the caller's; the instruction reads those 2 bytes only.
    unsafe {
        core::arch::asm!("{v} = *(u16 *)({p} + 0)", p = in(reg) p, v = lateout(reg) v,
            options(readonly, nostack, preserves_flags));
    }
    v
}

/// The 4 bytes at `p`, as they sit in memory.
///
/// # Safety
/// As `load_u16`, for 4 bytes.
#[inline(always)]
pub unsafe fn load_u32(p: *const u8) -> u32 {
    let v: u32;
    // SAFETY: the caller's; the instruction reads those 4 bytes only.
    unsafe {
        core::arch::asm!("{v} = *(u32 *)({p} + 0)", p = in(reg) p, v = lateout(reg) v,
            options(readonly, nostack, preserves_flags));
    }
    v
}

/// Writes `v` as it sits in memory to the 2 bytes at `p`.
///
/// # Safety
/// As `load_u16`, and the packet is writable (XDP).
#[inline(always)]
pub unsafe fn store_u16(p: *mut u8, v: u16) {
    // SAFETY: the caller's; the instruction writes those 2 bytes only.
    unsafe {
        core::arch::asm!("*(u16 *)({p} + 0) = {v}", p = in(reg) p, v = in(reg) v,
            options(nostack, preserves_flags));
    }
}

/// Writes `v` as it sits in memory to the 4 bytes at `p`.
///
/// # Safety
/// As `store_u16`, for 4 bytes.
#[inline(always)]
pub unsafe fn store_u32(p: *mut u8, v: u32) {
    // SAFETY: the caller's; the instruction writes those 4 bytes only.
    unsafe {
        core::arch::asm!("*(u32 *)({p} + 0) = {v}", p = in(reg) p, v = in(reg) v,
            options(nostack, preserves_flags));
    }
}

/// A TCP or UDP packet, parsed; `A` is its address family's (`u32` or `Addr6`).
pub struct L4Packet<A> {
    /// Offset of the IP header.
    pub l3: usize,
    /// Offset of the TCP/UDP header.
    pub l4: usize,
    /// The packet's 5-tuple, in its own direction.
    pub flow: FlowKeyOf<A>,
    /// TCP: a SYN without ACK (a client opening a connection). UDP: always 0.
    pub is_syn: u32,
    /// TCP: FIN or RST (the flow is ending). UDP: always 0.
    pub is_close: u32,
    /// TCP: a RST with ACK and sequence number 0, what a host sends to refuse a SYN (RFC
    /// 9293: a reset to a segment without ACK takes sequence number 0). UDP: always 0.
    pub is_refusal: u32,
}

impl<A> L4Packet<A> {
    /// Opens a flow: a TCP SYN without ACK, or any UDP datagram.
    #[inline(always)]
    pub fn opens_flow(&self) -> bool {
        self.flow.proto == PROTO_UDP || self.is_syn != 0
    }
}

pub enum Parsed {
    V4(L4Packet<u32>),
    V6(L4Packet<Addr6>),
}

/// Parses Ethernet, one optional 802.1Q tag, IPv4 (options included) or IPv6 (with up to
/// `MAX_EXT_HEADERS` extension headers), and TCP or UDP. The `Err` names why the packet is
/// not one the load balancer handles.
#[inline(always)]
pub fn parse_l4<C: PacketCtx>(ctx: &C) -> Result<Parsed, Reason> {
    match parse_l2(ctx)? {
        L3::V4(l3) => parse_ipv4(ctx, l3).map(Parsed::V4),
        L3::V6(l3) => parse_ipv6(ctx, l3).map(Parsed::V6),
    }
}

/// The network layer a frame carries, and its offset.
pub enum L3 {
    V4(usize),
    V6(usize),
}

/// Ethernet and one optional 802.1Q tag: which IP version follows, and where.
#[inline(always)]
pub fn parse_l2<C: PacketCtx>(ctx: &C) -> Result<L3, Reason> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(Reason::PassMalformed)?;
    let mut l3 = EthHdr::LEN;
    // SAFETY: `ptr_at` checked that the header lies inside the packet.
    let mut ether_type = unsafe { (*eth).ether_type };
    if ether_type == ETH_P_8021Q {
        let vlan: *const VlanHdr = ptr_at(ctx, l3).ok_or(Reason::PassMalformed)?;
        // SAFETY: bounds checked by `ptr_at`.
        ether_type = unsafe { (*vlan).ether_type };
        l3 += VlanHdr::LEN;
    }
    if ether_type == ETH_P_IP {
        Ok(L3::V4(l3))
    } else if ether_type == ETH_P_IPV6 {
        Ok(L3::V6(l3))
    } else {
        Err(Reason::PassNotIp)
    }
}

#[inline(always)]
pub fn parse_ipv4<C: PacketCtx>(ctx: &C, l3: usize) -> Result<L4Packet<u32>, Reason> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, l3).ok_or(Reason::PassMalformed)?;
    // SAFETY: bounds checked by `ptr_at`; only the addresses of the fields are taken.
    let (vihl, frags, proto, src, dst) = unsafe {
        (
            (*ip).vihl,
            u16::from_be(load_u16((&raw const (*ip).frags).cast())),
            (*ip).proto,
            load_u32((&raw const (*ip).src_addr).cast()),
            load_u32((&raw const (*ip).dst_addr).cast()),
        )
    };
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        return Err(Reason::PassMalformed);
    }
    if frags & IP_MF_OFFSET_MASK != 0 {
        return Err(Reason::PassFragment);
    }
    parse_transport(ctx, l3, l3 + ihl, proto, src, dst)
}

/// IPv6 next-header values of the extension headers walked to reach TCP/UDP.
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AUTH: u8 = 51;
const IPV6_DEST_OPTS: u8 = 60;

#[inline(always)]
pub fn parse_ipv6<C: PacketCtx>(ctx: &C, l3: usize) -> Result<L4Packet<Addr6>, Reason> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, l3).ok_or(Reason::PassMalformed)?;
    // SAFETY: bounds checked by `ptr_at`.
    let (vcf, mut next) = unsafe { ((*ip).vcf[0], (*ip).next_hdr) };
    if vcf >> 4 != 6 {
        return Err(Reason::PassMalformed);
    }
    let mut l4 = l3 + Ipv6Hdr::LEN;
    for _ in 0..MAX_EXT_HEADERS {
        // Header size = (length + extra) × unit bytes.
        let (unit, extra) = match next {
            PROTO_TCP | PROTO_UDP => break,
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS => (8, 1),
            // Its length counts 4-byte units, minus 2 (RFC 4302).
            IPV6_AUTH => (4, 2),
            IPV6_FRAGMENT => return Err(Reason::PassFragment),
            _ => return Err(Reason::PassNotTcpUdp),
        };
        // Every extension header starts with (next header, length).
        let ext: *const [u8; 2] = ptr_at(ctx, l4).ok_or(Reason::PassMalformed)?;
        // SAFETY: bounds checked by `ptr_at`.
        let [following, len] = unsafe { *ext };
        l4 += (len as usize + extra) * unit;
        next = following;
    }
    // The addresses are read last, straight into the parsed packet: loaded before the walk
    // and the transport header (as the compiler would otherwise schedule them), their words
    // would be spilled to the stack, which the scheduler's call cannot spare.
    let ip: *const Ipv6Hdr = ptr_at(ctx, l3).ok_or(Reason::PassMalformed)?;
    // SAFETY: in bounds (above); only the addresses of the fields are taken.
    let (src, dst) = unsafe {
        (
            (&raw const (*ip).src_addr).cast::<u8>(),
            (&raw const (*ip).dst_addr).cast::<u8>(),
        )
    };
    let addr = |p: *const u8| -> Addr6 {
        // SAFETY: the 16 bytes of an address field, inside the checked header.
        unsafe {
            [
                load_u32(p),
                load_u32(p.add(4)),
                load_u32(p.add(8)),
                load_u32(p.add(12)),
            ]
        }
    };
    let mut pkt = parse_transport(ctx, l3, l4, next, [0; 4], [0; 4])?;
    pkt.flow.src_be = addr(src);
    pkt.flow.dst_be = addr(dst);
    Ok(pkt)
}

/// The TCP or UDP header at `l4`: ports and the flags that open or end a flow.
#[inline(always)]
fn parse_transport<C: PacketCtx, A>(
    ctx: &C,
    l3: usize,
    l4: usize,
    proto: u8,
    src_be: A,
    dst_be: A,
) -> Result<L4Packet<A>, Reason> {
    let (ports, is_syn, is_close, is_refusal) = match proto {
        PROTO_TCP => {
            let tcp: *const TcpHdr = ptr_at(ctx, l4).ok_or(Reason::PassMalformed)?;
            // SAFETY: bounds checked by `ptr_at`.
            let (ports, syn, ack, fin, rst, seq) = unsafe {
                let t = &*tcp;
                (
                    load_ports(tcp.cast()),
                    t.syn(),
                    t.ack(),
                    t.fin(),
                    t.rst(),
                    load_u32((&raw const t.seq).cast()),
                )
            };
            (
                ports,
                (syn != 0 && ack == 0) as u32,
                (fin != 0 || rst != 0) as u32,
                (rst != 0 && ack != 0 && seq == 0) as u32,
            )
        }
        PROTO_UDP => {
            let udp: *const UdpHdr = ptr_at(ctx, l4).ok_or(Reason::PassMalformed)?;
            // SAFETY: bounds checked by `ptr_at`.
            (unsafe { load_ports(udp.cast()) }, 0, 0, 0)
        }
        _ => return Err(Reason::PassNotTcpUdp),
    };
    Ok(L4Packet {
        l3,
        l4,
        flow: FlowKeyOf {
            src_be,
            dst_be,
            sport_be: ports[0],
            dport_be: ports[1],
            proto,
            _pad: 0,
            _pad2: 0,
        },
        is_syn,
        is_close,
        is_refusal,
    })
}

/// The source and destination ports at the start of a TCP or UDP header, as in memory.
///
/// # Safety
/// As `load_u16`, for the header's first 4 bytes.
#[inline(always)]
unsafe fn load_ports(l4: *const u8) -> [u16; 2] {
    // SAFETY: the caller's.
    unsafe { [load_u16(l4), load_u16(l4.add(2))] }
}

/// One's-complement fold of a 32-bit sum to 16 bits.
#[inline(always)]
fn csum_fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// RFC 1624 incremental update, HC' = ~(~HC + ~m + m'), for a checksum field whose covered
/// data changed the first `words` 32-bit words of `old32` to those of `new32` (an address:
/// 1 word for IPv4, 4 for IPv6) and one 16-bit word (a port). Values in host order, as read
/// with `from_be_bytes`.
#[inline(always)]
pub fn csum_update(
    check: u16,
    words: usize,
    old32: &[u32; 4],
    new32: &[u32; 4],
    old16: u16,
    new16: u16,
) -> u16 {
    let mut sum = (!check as u32 & 0xffff) + (!old16 as u32 & 0xffff) + new16 as u32;
    for i in 0..4 {
        if i >= words {
            break;
        }
        sum += (!(old32[i] >> 16) & 0xffff)
            + (!old32[i] & 0xffff)
            + (new32[i] >> 16)
            + (new32[i] & 0xffff);
    }
    !csum_fold(sum)
}
