//! Bounds-checked header access and the parse shared by ingress and egress.

use core::mem;

use lb_common::{FlowKey, PROTO_TCP, PROTO_UDP, Reason};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr, vlan::VlanHdr};

/// EtherTypes as they sit in memory (network order read as a native u16).
const ETH_P_IP: u16 = 0x0800_u16.to_be();
const ETH_P_8021Q: u16 = 0x8100_u16.to_be();
/// IPv4 `frags` field: MF flag plus the 13-bit offset; any bit set means "a fragment".
const IP_MF_OFFSET_MASK: u16 = 0x3fff;
/// Offset of the checksum field inside the TCP and UDP headers.
pub const TCP_CHECK_OFF: usize = 16;
pub const UDP_CHECK_OFF: usize = 6;
/// Offset of the source address inside the IPv4 header, and of its checksum.
pub const IP_SRC_OFF: usize = 12;
pub const IP_CHECK_OFF: usize = 10;

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
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// An IPv4 TCP or UDP packet, parsed.
pub struct L4Packet {
    /// Offset of the IPv4 header.
    pub l3: usize,
    /// Offset of the TCP/UDP header.
    pub l4: usize,
    pub ip: *mut Ipv4Hdr,
    /// The packet's 5-tuple, in its own direction.
    pub flow: FlowKey,
    /// TCP: a SYN without ACK (a client opening a connection). UDP: always 0.
    pub is_syn: u32,
    /// TCP: FIN or RST (the flow is ending). UDP: always 0.
    pub is_close: u32,
}

/// Parses Ethernet, one optional 802.1Q tag, IPv4 (options included) and TCP or UDP. The
/// `Err` names why the packet is not one the load balancer handles.
#[inline(always)]
pub fn parse_l4<C: PacketCtx>(ctx: &C) -> Result<L4Packet, Reason> {
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
    if ether_type != ETH_P_IP {
        return Err(Reason::PassNotIpv4);
    }
    let ip: *mut Ipv4Hdr = ptr_at(ctx, l3).ok_or(Reason::PassMalformed)?;
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
    let l4 = l3 + ihl;
    let (ports, is_syn, is_close) = match proto {
        PROTO_TCP => {
            let tcp: *const TcpHdr = ptr_at(ctx, l4).ok_or(Reason::PassMalformed)?;
            // SAFETY: bounds checked by `ptr_at`.
            let (ports, syn, ack, fin, rst) = unsafe {
                let t = &*tcp;
                ([t.source, t.dest], t.syn(), t.ack(), t.fin(), t.rst())
            };
            (
                ports,
                (syn != 0 && ack == 0) as u32,
                (fin != 0 || rst != 0) as u32,
            )
        }
        PROTO_UDP => {
            let udp: *const UdpHdr = ptr_at(ctx, l4).ok_or(Reason::PassMalformed)?;
            // SAFETY: bounds checked by `ptr_at`.
            (unsafe { [(*udp).src, (*udp).dst] }, 0, 0)
        }
        _ => return Err(Reason::PassNotTcpUdp),
    };
    Ok(L4Packet {
        l3,
        l4,
        ip,
        flow: FlowKey {
            src_be: u32::from_ne_bytes(src),
            dst_be: u32::from_ne_bytes(dst),
            sport_be: u16::from_ne_bytes(ports[0]),
            dport_be: u16::from_ne_bytes(ports[1]),
            proto,
            _pad: [0; 3],
        },
        is_syn,
        is_close,
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
/// data changed one 32-bit word (`old_be` → `new_be`, network order as in memory) and one
/// 16-bit word. Values in host order, as read with `from_be_bytes`.
#[inline(always)]
pub fn csum_update(check: u16, old32: u32, new32: u32, old16: u16, new16: u16) -> u16 {
    let sum = (!check as u32 & 0xffff)
        + (!(old32 >> 16) & 0xffff)
        + (!old32 & 0xffff)
        + (new32 >> 16)
        + (new32 & 0xffff)
        + (!old16 as u32 & 0xffff)
        + new16 as u32;
    !csum_fold(sum)
}
