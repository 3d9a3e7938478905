//! Destination NAT of a forwarded packet, with incremental checksum updates (RFC 1624).

use aya_ebpf::programs::XdpContext;
use lb_common::{PROTO_TCP, Reason};

use crate::{
    family::Family,
    parse::{IP_CHECK_OFF, L4Packet, csum_update, ptr_at},
    sched::Target,
};

/// Rewrites the destination address and port to the backend's, updating the IPv4 header
/// checksum and the TCP/UDP checksum. A subprogram, for the same stack reason as `record`.
#[inline(never)]
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
    // SAFETY: bounds checked by `ptr_at`; packet data is only 2-byte aligned.
    unsafe { core::ptr::write_unaligned(dst, backend.addr_be) };
    if F::WORDS == 1 {
        let check: *mut [u8; 2] =
            ptr_at(ctx, pkt.l3 + IP_CHECK_OFF).ok_or(Reason::PassMalformed)?;
        // SAFETY: bounds checked by `ptr_at`.
        unsafe {
            let old = u16::from_be_bytes(*check);
            *check = csum_update(old, 1, &old_addr, &new_addr, 0, 0).to_be_bytes();
        }
    }

    if pkt.flow.proto == PROTO_TCP {
        let tcp: *mut network_types::tcp::TcpHdr =
            ptr_at(ctx, pkt.l4).ok_or(Reason::PassMalformed)?;
        // SAFETY: bounds checked by `ptr_at`.
        unsafe {
            let tcp = &mut *tcp;
            let check = u16::from_be_bytes(tcp.check);
            tcp.check = csum_update(check, F::WORDS, &old_addr, &new_addr, old_port, new_port)
                .to_be_bytes();
            tcp.dest = backend.port_be.to_ne_bytes();
        }
    } else {
        let udp: *mut network_types::udp::UdpHdr =
            ptr_at(ctx, pkt.l4).ok_or(Reason::PassMalformed)?;
        // SAFETY: bounds checked by `ptr_at`.
        unsafe {
            let udp = &mut *udp;
            let check = u16::from_be_bytes(udp.check);
            // A zero UDP checksum means "none" and must stay so; a computed 0 is sent as 0xffff.
            if check != 0 {
                let mut new =
                    csum_update(check, F::WORDS, &old_addr, &new_addr, old_port, new_port);
                if new == 0 {
                    new = 0xffff;
                }
                udp.check = new.to_be_bytes();
            }
            udp.dst = backend.port_be.to_ne_bytes();
        }
    }
    Ok(())
}
