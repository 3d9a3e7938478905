//! XDP ingress: a packet to a VIP is forwarded to its flow's backend. A packet to a port no
//! VIP serves is passed after one array read; a packet of a known flow takes its conntrack
//! entry's backend; any other goes through four steps: the VIP's service → admit → choose →
//! record (within the CPU's insert budget).

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_ktime_get_coarse_ns,
    programs::XdpContext,
};
use lb_common::{
    FLOW_DONE, Flow, Reason, Service, ServiceLimits, VipKeyOf, affinity_hash, flow_hash,
    vip_port_bit,
};

use crate::{
    admission::{Refusal, admit, refuse},
    family::{Family, V4, V6},
    flood::{has_insert_budget, spend_insert},
    flows::{end_count, track_live},
    maps::{BACKEND_STATS, LIMITS, VIP_PORTS, VIP_STATS},
    nat::rewrite_destination,
    parse::{L3, L4Packet, parse_ipv4, parse_ipv6, parse_l2},
    sched::{Decision, Target, decide, flow_backend, maglev_pick},
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
// bytes. The steps inside a path are inlined: every call ends in a return, which the
// kernel's return-stack mitigation makes dear (SRSO's safe RET on AMD hosts); inlining the
// NAT and the record took 8 and 35 ns off a packet on this VM.

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
    if !is_vip_port(pkt) {
        return Err(Reason::PassNotVip);
    }
    // A packet of a known flow goes to its entry's backend without the VIP's entry: the
    // flow's entry names its service, and its backend is checked to be still that
    // service's. A SYN is not looked up: it opens a new flow (a reused port, or a replay),
    // admitted and chosen again; an entry its 5-tuple still has is replaced when the new
    // one is recorded, and dropped if the SYN is refused or goes without state, so nothing
    // of the old flow forwards. Katran does not look a SYN up either.
    let known = if pkt.is_syn == 0 {
        lookup_flow::<F>(pkt)
    } else {
        None
    };
    let (service_id, backend_id, backend, reason) = match known {
        Some((service_id, id, backend)) => (service_id, id, backend, Reason::FwdEstablished),
        None => {
            let vip = VipKeyOf {
                addr_be: pkt.flow.dst_be,
                port_be: pkt.flow.dport_be,
                proto: pkt.flow.proto,
                _pad: 0,
            };
            let service = F::service(&vip).ok_or(Reason::PassNotVip)?;
            let (id, backend, reason) = select_backend::<F>(ctx, pkt, &service)?;
            (service.id, id, backend, reason)
        }
    };

    rewrite_destination::<F>(ctx, pkt, &backend)?;

    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let new_flow = pkt.opens_flow() && !matches!(reason, Reason::FwdEstablished);
    count_traffic(&VIP_STATS, service_id, bytes, new_flow);
    count_traffic(&BACKEND_STATS, backend_id, bytes, new_flow);
    Ok(reason)
}

/// Whether some VIP serves the packet's protocol and destination port (`VIP_PORTS`).
#[inline(always)]
fn is_vip_port<A>(pkt: &L4Packet<A>) -> bool {
    let (word, bit) = vip_port_bit(pkt.flow.proto, u16::from_be(pkt.flow.dport_be));
    VIP_PORTS.get(word).is_some_and(|w| w & bit != 0)
}

/// The backend for a packet of a VIP without a (valid) conntrack entry: a new choice for a
/// packet that opens a flow, or the consistent hash's for a mid-flow packet whose entry is
/// gone (so an unchanged table keeps it on its backend). State is kept only within the
/// CPU's insert budget (`flood`).
#[inline(always)]
fn select_backend<F: Family>(
    ctx: &XdpContext,
    pkt: &L4Packet<F::Addr>,
    service: &Service,
) -> Result<(u32, Target<F::Addr>, Reason), Reason> {
    let now = now_ns();
    let (id, backend, stateful) = match pick::<F>(ctx, pkt, service, now) {
        Ok(picked) => picked,
        Err(reason) => {
            forget_replaced::<F>(pkt, service);
            return Err(reason);
        }
    };
    if !stateful {
        forget_replaced::<F>(pkt, service);
        return Ok((id, backend, Reason::FwdStateless));
    }
    // Only a flow that gets a backend spends budget: refusals and drops make no state.
    spend_insert();
    record::<F>(pkt, service, id, &backend, now);
    let reason = if pkt.opens_flow() {
        Reason::FwdNewFlow
    } else {
        Reason::FwdRehashed
    };
    Ok((id, backend, reason))
}

/// Admission, then the choice of a backend for a flow without an entry; `true` if the CPU
/// may record it (within its insert budget).
#[inline(always)]
fn pick<F: Family>(
    ctx: &XdpContext,
    pkt: &L4Packet<F::Addr>,
    service: &Service,
    now: u64,
) -> Result<(u32, Target<F::Addr>, bool), Reason> {
    // Limits of a service the daemon never configured read as all zero: none.
    let limits = LIMITS.get(service.id).copied().unwrap_or_default();
    admit::<F>(pkt, service, &limits)
        .map_err(|why| refuse::<F>(ctx, pkt, service, &limits, why))?;
    let stateful = has_insert_budget(now);
    let (id, backend) = choose::<F>(ctx, pkt, service, &limits, now, stateful)?;
    Ok((id, backend, stateful))
}

/// The flow's service and backend, if it has a conntrack entry whose backend id still names
/// the backend it was made for (same service, same generation); the entry's last-seen time
/// and the live count are kept up to date. Not for a SYN (`ingress`).
#[inline(always)]
fn lookup_flow<F: Family>(pkt: &L4Packet<F::Addr>) -> Option<(u32, u32, Target<F::Addr>)> {
    let flow = F::conn(&pkt.flow)?;
    // SAFETY: the LRU value stays valid while this program runs (RCU); a racing update of
    // the same flow writes the same backend.
    let entry = unsafe { *flow };
    // A stale entry (its backend id was cleared or handed on: its service, gone or another
    // VIP's, or its generation changed) is not this flow's: it neither forwards nor counts,
    // and the new choice overwrites it.
    let backend = flow_backend::<F>(&entry)?;
    // SAFETY: as above; a torn timestamp only affects `gpulb flows`' idle column.
    unsafe { (*flow).last_seen_ns = now_ns() };
    track_live(flow, pkt, true);
    Some((u32::from(entry.service), entry.backend, backend))
}

/// A SYN that opens no new entry drops the one its 5-tuple may still have (a replay or a
/// reused port), ending its count: the old flow's packets must not forward.
#[inline(always)]
fn forget_replaced<F: Family>(pkt: &L4Packet<F::Addr>, service: &Service) {
    if pkt.is_syn != 0 && end_old_count::<F>(pkt, service) {
        F::remove_conn(&pkt.flow);
    }
}

/// Ends the count of the entry of this packet's 5-tuple, if it is this service's and its
/// backend's; whether there is an entry.
#[inline(always)]
fn end_old_count<F: Family>(pkt: &L4Packet<F::Addr>, service: &Service) -> bool {
    let Some(flow) = F::conn(&pkt.flow) else {
        return false;
    };
    // SAFETY: the LRU value stays valid while this program runs (RCU).
    let entry = unsafe { *flow };
    if u32::from(entry.service) == service.id && flow_backend::<F>(&entry).is_some() {
        end_count(flow);
    }
    true
}

/// The backend for a flow without an entry: the scheduler's choice for a flow being opened
/// while conntrack can record it; otherwise (a mid-flow packet whose entry was evicted, or
/// any flow in flood mode) the consistent hash alone, which the flow's next packets find
/// again without state.
#[inline(always)]
fn choose<F: Family>(
    ctx: &XdpContext,
    pkt: &L4Packet<F::Addr>,
    service: &Service,
    limits: &ServiceLimits,
    now: u64,
    stateful: bool,
) -> Result<(u32, Target<F::Addr>), Reason> {
    let hash = if limits.has_affinity() {
        affinity_hash(&pkt.flow)
    } else {
        flow_hash(&pkt.flow)
    };
    if !pkt.opens_flow() || !stateful {
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

/// Records the flow in conntrack: its one entry, from which the reply's reverse NAT is
/// derived. A flow opened by a SYN counts live once its handshake completes (`track_live`);
/// an entry made by a mid-flow packet never counts.
#[inline(always)]
fn record<F: Family>(
    pkt: &L4Packet<F::Addr>,
    service: &Service,
    backend_id: u32,
    backend: &Target<F::Addr>,
    now: u64,
) {
    let flow = Flow {
        backend: backend_id,
        service: service.id as u8,
        generation: backend.generation,
        flags: if pkt.opens_flow() { 0 } else { FLOW_DONE },
        last_seen_ns: now,
    };
    // A SYN's entry is new unless its 5-tuple has one (a replay, a reused port): that one's
    // count is ended, then the entry is overwritten in place (no moment without one, when a
    // packet on another CPU would make an entry of its own). Any other failure is memory
    // pressure; the packet is still forwarded, and the next one re-hashes to the same
    // backend, so an old entry that could not be overwritten goes.
    if pkt.is_syn != 0 && F::insert_conn(&pkt.flow, &flow, BPF_NOEXIST) {
        return;
    }
    let replaced = pkt.is_syn != 0 && end_old_count::<F>(pkt, service);
    if !F::insert_conn(&pkt.flow, &flow, BPF_ANY) && replaced {
        F::remove_conn(&pkt.flow);
    }
}

/// `CLOCK_MONOTONIC` as of the last tick, for every time the ingress path keeps but the rate
/// limit's (`admission`): no clock read (a TSC read was a fifth of an established packet's
/// cost, 20 ns of a new flow's, on this VM). A tick (1-4 ms) is far below what the times
/// serve: idle times, the insert budget's second, the hold of a refusing backend, engine
/// load's freshness.
#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: the helper has no preconditions.
    unsafe { bpf_ktime_get_coarse_ns() }
}
