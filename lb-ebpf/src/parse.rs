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
    // SAFETY: bounds checked by `ptr_at`.
    let (vihl, frags, proto, src, dst) = unsafe {
        let h = &*ip;
        (
            h.vihl,
            u16::from_be_bytes(h.frags),
            h.proto,
            h.src_addr,
            h.dst_addr,
        )
    };
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        return Err(Reason::PassMalformed);
    }
    if frags & IP_MF_OFFSET_MASK != 0 {
        return Err(Reason::PassFragment);
    }
    parse_transport(
        ctx,
        l3,
        l3 + ihl,
        proto,
        u32::from_ne_bytes(src),
        u32::from_ne_bytes(dst),
    )
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
    // The addresses are read last, each word assembled at once into the parsed packet:
    // loaded before the walk and the transport header (as the compiler would otherwise
    // schedule them), their 32 bytes would each be spilled to the stack, which the
    // scheduler's call cannot spare.
    let ip: *const Ipv6Hdr = ptr_at(ctx, l3).ok_or(Reason::PassMalformed)?;
    let word = |p: *const u8| -> u32 {
        // SAFETY: `p` lies inside the header bounds-checked by `ptr_at`; volatile keeps the
        // loads here.
        unsafe {
            u32::from_ne_bytes([
                core::ptr::read_volatile(p),
                core::ptr::read_volatile(p.add(1)),
                core::ptr::read_volatile(p.add(2)),
                core::ptr::read_volatile(p.add(3)),
            ])
        }
    };
    // SAFETY: in bounds (above); only the addresses of the fields are taken.
    let (src, dst) = unsafe {
        (
            (&raw const (*ip).src_addr).cast::<u8>(),
            (&raw const (*ip).dst_addr).cast::<u8>(),
        )
    };
    let addr = |p: *const u8| -> Addr6 {
        // SAFETY: the 16 bytes of an address field.
        unsafe { [word(p), word(p.add(4)), word(p.add(8)), word(p.add(12))] }
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
                    [t.source, t.dest],
                    t.syn(),
                    t.ack(),
                    t.fin(),
                    t.rst(),
                    t.seq,
                )
            };
            (
                ports,
                (syn != 0 && ack == 0) as u32,
                (fin != 0 || rst != 0) as u32,
                (rst != 0 && ack != 0 && u32::from_ne_bytes(seq) == 0) as u32,
            )
        }
        PROTO_UDP => {
            let udp: *const UdpHdr = ptr_at(ctx, l4).ok_or(Reason::PassMalformed)?;
            // SAFETY: bounds checked by `ptr_at`.
            (unsafe { [(*udp).src, (*udp).dst] }, 0, 0, 0)
        }
        _ => return Err(Reason::PassNotTcpUdp),
    };
    Ok(L4Packet {
        l3,
        l4,
        flow: FlowKeyOf {
            src_be,
            dst_be,
            sport_be: u16::from_ne_bytes(ports[0]),
            dport_be: u16::from_ne_bytes(ports[1]),
            proto,
            _pad: [0; 3],
        },
        is_syn,
        is_close,
        is_refusal,
    })
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
