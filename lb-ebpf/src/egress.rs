//! TC egress: replies of NATed flows get the VIP back as their source, and a backend's FIN
//! or RST ends its flow's live count.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::bpf_ktime_get_ns,
    programs::TcContext,
};
use lb_common::{FlowKeyOf, PROTO_TCP, Reason, RevNatOf};

use crate::{
    family::{Family, V4, V6},
    flows::track_live,
    maps::REFUSED_AT,
    parse::{IP_CHECK_OFF, L4Packet, Parsed, TCP_CHECK_OFF, UDP_CHECK_OFF, parse_l4},
};

/// Replies of NATed flows get the VIP back as their source. Uses the skb helpers so that
/// checksums stay right whatever the skb's checksum state (offloaded partial sums included).
#[inline(always)]
pub fn try_egress(ctx: &TcContext) -> Result<Reason, Reason> {
    match parse_l4(ctx).map_err(|_| Reason::EgressPass)? {
        Parsed::V4(pkt) => egress::<V4>(ctx, &pkt),
        Parsed::V6(pkt) => egress::<V6>(ctx, &pkt),
    }
}

#[inline(always)]
fn egress<F: Family>(ctx: &TcContext, pkt: &L4Packet<F::Addr>) -> Result<Reason, Reason> {
    // SAFETY: REVNAT values are written whole and copied out at once.
    let revnat = *unsafe { F::revnat().get(&pkt.flow) }.ok_or(Reason::EgressPass)?;
    if pkt.is_close != 0 {
        end_flow_of_reply::<F>(pkt, &revnat);
    }

    let (check_off, l4_flags) = if pkt.flow.proto == PROTO_TCP {
        (pkt.l4 + TCP_CHECK_OFF, 0)
    } else {
        (pkt.l4 + UDP_CHECK_OFF, BPF_F_MARK_MANGLED_0 as u64)
    };
    let old_addr = F::words(&pkt.flow.src_be);
    let new_addr = F::words(&revnat.vip_be);
    let (old_port, new_port) = (pkt.flow.sport_be, revnat.vport_be);

    let fail = |_| Reason::EgressPass;
    for i in 0..4 {
        if i >= F::WORDS {
            break;
        }
        ctx.skb
            .l4_csum_replace(
                check_off,
                old_addr[i] as u64,
                new_addr[i] as u64,
                l4_flags | BPF_F_PSEUDO_HDR as u64 | 4,
            )
            .map_err(fail)?;
    }
    // Only IPv4 has a header checksum.
    if F::WORDS == 1 {
        ctx.skb
            .l3_csum_replace(
                pkt.l3 + IP_CHECK_OFF,
                old_addr[0] as u64,
                new_addr[0] as u64,
                4,
            )
            .map_err(fail)?;
    }
    ctx.skb
        .l4_csum_replace(check_off, old_port as u64, new_port as u64, l4_flags | 2)
        .map_err(fail)?;
    ctx.skb
        .store(pkt.l3 + F::SRC_OFF, &revnat.vip_be, 0)
        .map_err(fail)?;
    ctx.skb.store(pkt.l4, &new_port, 0).map_err(fail)?;
    Ok(Reason::EgressRevNat)
}

/// A backend's FIN or RST ends the flow's count, as the client's would; a RST refusing the
/// SYN marks the backend as refusing (`REFUSED_AT`).
#[inline(always)]
fn end_flow_of_reply<F: Family>(reply: &L4Packet<F::Addr>, revnat: &RevNatOf<F::Addr>) {
    let key = FlowKeyOf {
        src_be: reply.flow.dst_be,
        dst_be: revnat.vip_be,
        sport_be: reply.flow.dport_be,
        dport_be: revnat.vport_be,
        proto: reply.flow.proto,
        _pad: [0; 3],
    };
    if let Some(flow) = F::conns().get_ptr_mut(&key) {
        track_live(flow, reply);
        if reply.is_refusal != 0 {
            // SAFETY: the LRU value stays valid while this program runs (RCU).
            let backend = unsafe { (*flow).backend };
            if let Some(at) = REFUSED_AT.get_ptr_mut(backend) {
                // SAFETY: a valid, aligned map value; a racing writer stores a time as recent.
                unsafe { core::ptr::write_volatile(at, bpf_ktime_get_ns()) };
            }
        }
    }
}
