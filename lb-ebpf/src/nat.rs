//! Destination NAT of a forwarded packet, with incremental checksum updates (RFC 1624).

use aya_ebpf::programs::XdpContext;
use lb_common::{PROTO_TCP, Reason};
use network_types::{tcp::TcpHdr, udp::UdpHdr};

use crate::{
    family::Family,
    parse::{
        DPORT_OFF, IP_CHECK_OFF, L4Packet, TCP_CHECK_OFF, UDP_CHECK_OFF, csum_update, load_u16,
        ptr_at, store_u16, store_u32,
    },
    sched::Target,
};

/// Rewrites the destination address and port to the backend's, updating the IPv4 header
/// checksum and the TCP/UDP checksum.
#[inline(always)]
pub fn rewrite_destination<F: Family>(
    ctx: &XdpContext,
    pkt: &L4Packet<F::Addr>,
    backend: &Target<F::Addr>,
) -> Result<(), Reason> {
    let old_addr = F::host_words(&pkt.flow.dst_be);
    let new_addr = F::host_words(&backend.addr_be);
    let old_port = u16::from_be(pkt.flow.dport_be);
    let new_port = u16::from_be(backend.port_be);

    let dst: *mut F::Addr = ptr_at(ctx, pkt.l3 + F::DST_OFF).ok_or(Reason::PassMalformed)?;
    let new_words = F::words(&backend.addr_be);
    for (i, word) in new_words.iter().enumerate().take(F::WORDS) {
        // SAFETY: bounds checked by `ptr_at` (word `i` of the address).
        unsafe { store_u32(dst.cast::<u8>().add(4 * i), *word) };
    }
    if F::WORDS == 1 {
        let check: *mut [u8; 2] =
            ptr_at(ctx, pkt.l3 + IP_CHECK_OFF).ok_or(Reason::PassMalformed)?;
        // SAFETY: bounds checked by `ptr_at`.
        unsafe {
            let old = u16::from_be(load_u16(check.cast()));
            store_u16(
                check.cast(),
                csum_update(old, 1, &old_addr, &new_addr, 0, 0).to_be(),
            );
        }
    }

    if pkt.flow.proto == PROTO_TCP {
        let tcp: *mut TcpHdr = ptr_at(ctx, pkt.l4).ok_or(Reason::PassMalformed)?;
        // SAFETY: bounds checked by `ptr_at`; the offsets lie inside the header.
        unsafe {
            let tcp = tcp.cast::<u8>();
            let check = u16::from_be(load_u16(tcp.add(TCP_CHECK_OFF)));
            let new = csum_update(check, F::WORDS, &old_addr, &new_addr, old_port, new_port);
            store_u16(tcp.add(TCP_CHECK_OFF), new.to_be());
            store_u16(tcp.add(DPORT_OFF), backend.port_be);
        }
    } else {
        let udp: *mut UdpHdr = ptr_at(ctx, pkt.l4).ok_or(Reason::PassMalformed)?;
        // SAFETY: as above.
        unsafe {
            let udp = udp.cast::<u8>();
            let check = u16::from_be(load_u16(udp.add(UDP_CHECK_OFF)));
            // A zero UDP checksum means "none" and must stay so; a computed 0 is sent as
            // 0xffff.
            if check != 0 {
                let mut new =
                    csum_update(check, F::WORDS, &old_addr, &new_addr, old_port, new_port);
                if new == 0 {
                    new = 0xffff;
                }
                store_u16(udp.add(UDP_CHECK_OFF), new.to_be());
            }
            store_u16(udp.add(DPORT_OFF), backend.port_be);
        }
    }
    Ok(())
}
