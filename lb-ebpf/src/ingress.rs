//! XDP ingress: a packet to a VIP is forwarded to its flow's backend. A packet of a known
//! flow takes the conntrack entry's backend; any other goes through four steps: look up the
//! flow → admit → choose → record.

use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::XdpContext};
use lb_common::{
    FLOW_COUNTED, Flow, FlowKeyOf, PROTO_TCP, Reason, RevNatOf, Service, ServiceLimits, VipKeyOf,
    affinity_hash, flow_hash,
};

use crate::{
    admission::{Refusal, admit, refuse},
    family::{Family, V4, V6},
    flows::{add_live, track_live},
    maps::{BACKEND_STATS, LIMITS, VIP_STATS},
    nat::rewrite_destination,
    parse::{L3, L4Packet, parse_ipv4, parse_ipv6, parse_l2},
    sched::{Decision, Target, decide, lookup_backend, maglev_pick},
    stats::{count_admission, count_traffic},
};

/// `Ok`: the packet was NATed to a backend (and why: new, established, re-hashed).
/// `Err`: passed untouched or dropped, and why.
#[inline(always)]
pub fn try_ingress(ctx: &XdpContext) -> Result<Reason, Reason> {
    match parse_l2(ctx)? {
        L3::V4(l3) => ingress_v4(ctx, l3),
        L3::V6(l3) => ingress_v6(ctx, l3),
    }
}

// Each family's path (parse included) is a BPF subprogram of its own: one stack frame holds
// one family's values, so a frame plus the scheduler's stays within the verifier's 512
// bytes.

#[inline(never)]
fn ingress_v4(ctx: &XdpContext, l3: usize) -> Result<Reason, Reason> {
    ingress::<V4>(ctx, &parse_ipv4(ctx, l3)?)
}

#[inline(never)]
fn ingress_v6(ctx: &XdpContext, l3: usize) -> Result<Reason, Reason> {
    ingress::<V6>(ctx, &parse_ipv6(ctx, l3)?)
}

#[inline(always)]
fn ingress<F: Family>(ctx: &XdpContext, pkt: &L4Packet<F::Addr>) -> Result<Reason, Reason> {
    let vip = VipKeyOf {
        addr_be: pkt.flow.dst_be,
        port_be: pkt.flow.dport_be,
        proto: pkt.flow.proto,
        _pad: 0,
    };
    // SAFETY: SERVICES entries are only replaced whole by userspace; a torn read is not
    // possible for an 8-byte value copied out at once.
    let service = *unsafe { F::services().get(&vip) }.ok_or(Reason::PassNotVip)?;
    let (backend_id, backend, reason) = select_backend::<F>(ctx, pkt, &service)?;

    rewrite_destination::<F>(ctx, pkt, &backend)?;

    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let new_flow = matches!(reason, Reason::FwdNewFlow);
    count_traffic(&VIP_STATS, service.id, bytes, new_flow);
    count_traffic(&BACKEND_STATS, backend_id, bytes, new_flow);
    Ok(reason)
}

/// The backend of this packet's flow: conntrack's, or a new choice for a new flow (and for a
/// mid-flow packet whose entry is gone, so an unchanged table keeps it on its backend).
#[inline(always)]
fn select_backend<F: Family>(
    ctx: &XdpContext,
    pkt: &L4Packet<F::Addr>,
    service: &Service,
) -> Result<(u32, Target<F::Addr>, Reason), Reason> {
    let now = now_ns();
    if let Some((id, backend)) = lookup_flow::<F>(pkt, now) {
        return Ok((id, backend, Reason::FwdEstablished));
    }
    // Limits of a service the daemon never configured read as all zero: none.
    let limits = LIMITS.get(service.id).copied().unwrap_or_default();
    admit::<F>(ctx, pkt, service, &limits, now)?;
    let (id, backend) = choose::<F>(ctx, pkt, service, &limits, now)?;
    record::<F>(pkt, service, id, &backend, now);
    let reason = if pkt.opens_flow() {
        Reason::FwdNewFlow
    } else {
        Reason::FwdRehashed
    };
    Ok((id, backend, reason))
}

/// The conntrack entry's backend, if the flow has one whose backend is still programmed;
/// the entry's last-seen time and the live count are kept up to date.
#[inline(always)]
fn lookup_flow<F: Family>(pkt: &L4Packet<F::Addr>, now: u64) -> Option<(u32, Target<F::Addr>)> {
    let flow = F::conns().get_ptr_mut(&pkt.flow)?;
    // SAFETY: the LRU value stays valid while this program runs (RCU); a racing update of
    // the same flow writes the same backend.
    let backend_id = unsafe { (*flow).backend };
    let backend = lookup_backend::<F>(backend_id)?;
    // SAFETY: as above; a torn timestamp only affects `gpulb flows`' idle column.
    unsafe { (*flow).last_seen_ns = now };
    track_live(flow, pkt);
    Some((backend_id, backend))
}

/// The backend for a flow without an entry: the scheduler's choice for a flow being opened;
/// for a mid-flow packet (its entry was evicted) the consistent hash alone, so that an
/// unchanged table keeps it on its backend.
#[inline(always)]
fn choose<F: Family>(
    ctx: &XdpContext,
    pkt: &L4Packet<F::Addr>,
    service: &Service,
    limits: &ServiceLimits,
    now: u64,
) -> Result<(u32, Target<F::Addr>), Reason> {
    let hash = if limits.has_affinity() {
        affinity_hash(&pkt.flow)
    } else {
        flow_hash(&pkt.flow)
    };
    if !pkt.opens_flow() {
        return maglev_pick::<F>(service, hash).ok_or(Reason::DropNoBackend);
    }
    match decide::<F>(service, hash, 0, now) {
        Decision::Chosen { id, target, moved } => {
            if moved {
                count_admission(service.id, |c| &mut c.redirected);
            }
            Ok((id, target))
        }
        Decision::Full => Err(refuse::<F>(
            ctx,
            pkt,
            service,
            limits,
            Refusal::BackendsFull,
        )),
        Decision::Empty => Err(Reason::DropNoBackend),
    }
}

/// Records the flow in conntrack and its reply in reverse NAT; a TCP flow being opened is
/// counted live. A subprogram: its keys take stack the scheduler's call must not carry.
#[inline(never)]
fn record<F: Family>(
    pkt: &L4Packet<F::Addr>,
    service: &Service,
    backend_id: u32,
    backend: &Target<F::Addr>,
    now: u64,
) {
    let counted = pkt.flow.proto == PROTO_TCP && pkt.is_close == 0;
    let flow = Flow {
        backend: backend_id,
        service: service.id as u16,
        flags: if counted { FLOW_COUNTED } else { 0 },
        last_seen_ns: now,
    };
    let reply = FlowKeyOf {
        src_be: backend.addr_be,
        dst_be: pkt.flow.src_be,
        sport_be: backend.port_be,
        dport_be: pkt.flow.sport_be,
        proto: pkt.flow.proto,
        _pad: [0; 3],
    };
    let revnat = RevNatOf {
        vip_be: pkt.flow.dst_be,
        vport_be: pkt.flow.dport_be,
        _pad: 0,
    };
    // An insert can only fail under memory pressure; the packet is still forwarded, and the
    // next one re-hashes to the same backend.
    let _ = F::revnat().insert(&reply, &revnat, 0);
    if F::conns().insert(&pkt.flow, &flow, 0).is_ok() && counted {
        add_live(backend_id, 1);
    }
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: the helper has no preconditions.
    unsafe { bpf_ktime_get_ns() }
}
