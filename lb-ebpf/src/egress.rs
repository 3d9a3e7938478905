//! TC egress: replies of NATed flows get the VIP back as their source, and a backend's FIN
//! or RST ends its flow's live count. A reply's VIP comes from its backend (`VIP_OF`), and
//! the flow from its one conntrack entry, so the two cannot disagree.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::bpf_ktime_get_ns,
    programs::TcContext,
};
use lb_common::{BackendVipOf, FlowKeyOf, PROTO_TCP, Reason, VipKeyOf, affinity_hash, flow_hash};

use crate::{
    family::{Family, V4, V6},
    flood::was_flooded,
    flows::track_live,
    maps::{BACKEND_EGRESS, LIMITS, REFUSED_AT},
    parse::{IP_CHECK_OFF, L4Packet, Parsed, TCP_CHECK_OFF, UDP_CHECK_OFF, parse_l4},
    sched::maglev_pick,
    stats::count_traffic,
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
    let owner_key = VipKeyOf {
        addr_be: pkt.flow.src_be,
        port_be: pkt.flow.sport_be,
        proto: pkt.flow.proto,
        _pad: 0,
    };
    let owner = F::vip_of(&owner_key).ok_or(Reason::EgressPass)?;
    if !is_our_reply::<F>(pkt, &owner) {
        return Err(Reason::EgressPass);
    }
    if pkt.is_refusal != 0 {
        mark_refused(owner.backend);
    }
    let (check_off, l4_flags) = if pkt.flow.proto == PROTO_TCP {
        (pkt.l4 + TCP_CHECK_OFF, 0)
    } else {
        (pkt.l4 + UDP_CHECK_OFF, BPF_F_MARK_MANGLED_0 as u64)
    };
    let old_addr = F::words(&pkt.flow.src_be);
    let new_addr = F::words(&owner.vip_be);
    let (old_port, new_port) = (pkt.flow.sport_be, owner.vport_be);

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
        .store(pkt.l3 + F::SRC_OFF, &owner.vip_be, 0)
        .map_err(fail)?;
    ctx.skb.store(pkt.l4, &new_port, 0).map_err(fail)?;
    count_traffic(&BACKEND_EGRESS, owner.backend, u64::from(ctx.len()), false);
    Ok(Reason::EgressRevNat)
}

/// Whether this packet from a backend answers a flow the ingress program sent it: the
/// flow's entry names this backend (and a FIN or RST ends its count), or, with no entry, a
/// CPU was in flood mode lately and the consistent hash sends the flow here (it may have
/// been opened without state). A connection made to the backend directly has neither, and
/// keeps its addresses.
#[inline(always)]
fn is_our_reply<F: Family>(reply: &L4Packet<F::Addr>, owner: &BackendVipOf<F::Addr>) -> bool {
    let key = FlowKeyOf {
        src_be: reply.flow.dst_be,
        dst_be: owner.vip_be,
        sport_be: reply.flow.dport_be,
        dport_be: owner.vport_be,
        proto: reply.flow.proto,
        _pad: 0,
        _pad2: 0,
    };
    if let Some(flow) = F::conn(&key) {
        // SAFETY: the LRU value stays valid while this program runs (RCU).
        let entry = unsafe { *flow };
        if entry.backend != owner.backend || entry.generation != owner.generation {
            return false;
        }
        if reply.is_close != 0 {
            track_live(flow, reply, false);
        }
        return true;
    }
    // SAFETY: the helper has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    was_flooded(now) && hash_pick::<F>(&key, owner) == Some(owner.backend)
}

/// The consistent hash's backend for a flow of the owner's VIP, as ingress computes it.
#[inline(never)]
fn hash_pick<F: Family>(key: &FlowKeyOf<F::Addr>, owner: &BackendVipOf<F::Addr>) -> Option<u32> {
    let vip = VipKeyOf {
        addr_be: owner.vip_be,
        port_be: owner.vport_be,
        proto: key.proto,
        _pad: 0,
    };
    let service = F::service(&vip)?;
    let limits = LIMITS.get(service.id).copied().unwrap_or_default();
    let hash = if limits.has_affinity() {
        affinity_hash(key)
    } else {
        flow_hash(key)
    };
    maglev_pick::<F>(&service, hash).map(|(id, _)| id)
}

/// A backend refused a connection (its RST to a SYN): the scheduler passes it over for a
/// while (`REFUSED_AT`).
#[inline(always)]
fn mark_refused(backend: u32) {
    if let Some(at) = REFUSED_AT.get_ptr_mut(backend) {
        // SAFETY: the helper has no preconditions; the map value is valid and aligned, and a
        // racing writer stores a time as recent.
        unsafe { core::ptr::write_volatile(at, bpf_ktime_get_ns()) };
    }
}
