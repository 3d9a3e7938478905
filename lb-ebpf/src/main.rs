//! gpulb data path.
//!
//! `gpulb_ingress` (XDP) picks a backend for each new flow to a VIP with the VIP's Maglev
//! table, records it in the `CONNS` LRU, and NATs the destination to the local backend before
//! passing the packet to the stack. `gpulb_egress` (TC) rewrites the replies of those flows,
//! and only those, back to the VIP.
#![no_std]
#![no_main]
// `atomic_xadd`: core's atomic types have no fetch_add on the BPF target.
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "core_intrinsics, for atomic_xadd")]

mod family;
mod parse;

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, xdp_action},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    helpers::{bpf_ktime_get_ns, bpf_xdp_adjust_tail},
    macros::{cgroup_sock_addr, classifier, map, xdp},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    programs::{SockAddrContext, TcContext, XdpContext},
};
use family::{Family, V4, V6};
use lb_common::{
    ALLOW_ENTRIES, Addr6, AdmitCounters, AllowKey, AllowKey6, Backend, CONNTRACK_DEFAULT_SIZE,
    CONNTRACK6_DEFAULT_SIZE, Candidates, Counters, FLOW_COUNTED, Flow, FlowKey, FlowKey6,
    FlowKeyOf, LIMIT_AFFINITY, LIMIT_ALLOWLIST, LIMIT_CHECK_LOAD, LIMIT_REFUSE_RST, MAGLEV_ENTRIES,
    MAX_BACKENDS, MAX_CANDIDATES, MAX_SERVICES, PROTO_TCP, PROTO_UDP, RATE_LIMIT_ENTRIES, RateKey,
    RateKey6, Reason, RevNat, RevNat6, RevNatOf, SOCK_REVNAT_ENTRIES, Service, ServiceLimits,
    SockRevKey, SockRevKey6, VipKey, VipKey6, VipKeyOf, affinity_hash, flow_hash, fmix64,
    maglev_index,
};
use parse::{
    IP_CHECK_OFF, L4Packet, Parsed, TCP_CHECK_OFF, UDP_CHECK_OFF, csum_update, parse_l4, ptr_at,
};

/// VIP (address, port, protocol) → service id and table size. Written last by the daemon,
/// so a VIP is only visible once its backends and table are in place.
#[map]
static SERVICES: HashMap<VipKey, Service> = HashMap::pinned(MAX_SERVICES, 0);

/// Backend id → address. Id 0 stays zero: an unprogrammed Maglev slot reads 0.
#[map]
static BACKENDS: Array<Backend> = Array::pinned(MAX_BACKENDS, 0);

/// Maglev lookup tables, one block of `MAGLEV_MAX_SIZE` slots per service.
#[map]
static MAGLEV: Array<u32> = Array::pinned(MAGLEV_ENTRIES, 0);

/// Conntrack, client → VIP 5-tuple → backend.
// LRU: a SYN flood must evict old flows, not fail inserts. Resized by the daemon at load.
#[map]
static CONNS: LruHashMap<FlowKey, Flow> = LruHashMap::pinned(CONNTRACK_DEFAULT_SIZE, 0);

/// Reverse NAT, backend → client 5-tuple → VIP, read by `gpulb_egress`. Same size and
/// insert pattern as `CONNS`.
#[map]
static REVNAT: LruHashMap<FlowKey, RevNat> = LruHashMap::pinned(CONNTRACK_DEFAULT_SIZE, 0);

#[map]
static VIP_STATS: PerCpuArray<Counters> = PerCpuArray::pinned(MAX_SERVICES, 0);

#[map]
static BACKEND_STATS: PerCpuArray<Counters> = PerCpuArray::pinned(MAX_BACKENDS, 0);

/// One count per packet, by `Reason`.
#[map]
static REASONS_V2: PerCpuArray<u64> = PerCpuArray::pinned(Reason::COUNT, 0);

/// Admission control and backend choice, by service id. All zero: no limits.
#[map]
static LIMITS: Array<ServiceLimits> = Array::pinned(MAX_SERVICES, 0);

/// GCRA state per (source, service): the theoretical arrival time of its next new flow.
// LRU: a flood from many sources evicts old buckets (a fresh bucket is a full one).
#[map]
static RATE_LIMIT: LruHashMap<RateKey, u64> = LruHashMap::pinned(RATE_LIMIT_ENTRIES, 0);

/// Allowed source prefixes of the VIPs with `LIMIT_ALLOWLIST`.
#[map]
static ALLOW: LpmTrie<AllowKey, u32> = LpmTrie::pinned(ALLOW_ENTRIES, 1); // BPF_F_NO_PREALLOC

/// Live TCP flows per backend id: up at a flow's first packet, down at its first FIN or RST
/// (either direction). Global, not per-CPU: the choice of a new flow reads the sum.
#[map]
static LIVE_FLOWS: Array<u64> = Array::pinned(MAX_BACKENDS, 0);

/// Backends in each service's table, for caps and bounded load.
#[map]
static CANDIDATES: Array<Candidates> = Array::pinned(MAX_SERVICES, 0);

#[map]
static ADMIT_STATS: PerCpuArray<AdmitCounters> = PerCpuArray::pinned(MAX_SERVICES, 0);

/// (socket, backend) → VIP, for the socket programs that show the peer as the VIP again.
#[map]
static SOCK_REVNAT: LruHashMap<SockRevKey, RevNat> = LruHashMap::pinned(SOCK_REVNAT_ENTRIES, 0);

/// [0]: the daemon's network namespace cookie. The socket programs run for every socket in
/// the cgroup, whatever its namespace; only sockets in the daemon's are balanced (0: none).
#[map]
static SOCK_NETNS: Array<u64> = Array::pinned(1, 0);

/// The IPv6 maps: the same roles as their IPv4 namesakes, with 16-byte addresses.
#[map]
static SERVICES6: HashMap<VipKey6, Service> = HashMap::pinned(MAX_SERVICES, 0);

/// Backend id → IPv6 address, for the `BACKENDS` entries flagged `BACKEND_IPV6`.
#[map]
static BACKEND_ADDR6: Array<Addr6> = Array::pinned(MAX_BACKENDS, 0);

#[map]
static CONNS6: LruHashMap<FlowKey6, Flow> = LruHashMap::pinned(CONNTRACK6_DEFAULT_SIZE, 0);

#[map]
static REVNAT6: LruHashMap<FlowKey6, RevNat6> = LruHashMap::pinned(CONNTRACK6_DEFAULT_SIZE, 0);

/// Keyed by the source's /64.
#[map]
static RATE_LIMIT6: LruHashMap<RateKey6, u64> = LruHashMap::pinned(RATE_LIMIT_ENTRIES, 0);

#[map]
static ALLOW6: LpmTrie<AllowKey6, u32> = LpmTrie::pinned(ALLOW_ENTRIES, 1); // BPF_F_NO_PREALLOC

#[map]
static SOCK_REVNAT6: LruHashMap<SockRevKey6, RevNat6> = LruHashMap::pinned(SOCK_REVNAT_ENTRIES, 0);

#[xdp]
pub fn gpulb_ingress(ctx: XdpContext) -> u32 {
    let reason = match try_ingress(&ctx) {
        Ok(reason) | Err(reason) => reason,
    };
    count_reason(reason);
    match reason {
        Reason::DropNoBackend | Reason::RefuseDrop => xdp_action::XDP_DROP,
        Reason::RefuseReset => xdp_action::XDP_TX,
        _ => xdp_action::XDP_PASS,
    }
}

#[classifier]
pub fn gpulb_egress(ctx: TcContext) -> i32 {
    let reason = match try_egress(&ctx) {
        Ok(reason) | Err(reason) => reason,
    };
    count_reason(reason);
    TC_ACT_OK
}

#[inline(always)]
fn count_reason(reason: Reason) {
    if let Some(n) = REASONS_V2.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot; no other writer runs on this CPU meanwhile.
        unsafe { *n += 1 };
    }
}

#[inline(always)]
fn count_traffic(map: &PerCpuArray<Counters>, index: u32, bytes: u64, new_flow: bool) {
    if let Some(c) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU slot; no other writer runs on this CPU meanwhile.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            (*c).new_flows += new_flow as u64;
        }
    }
}

/// `Ok`: the packet was NATed to a backend (and why: new, established, re-hashed).
/// `Err`: passed untouched or dropped, and why.
#[inline(always)]
fn try_ingress(ctx: &XdpContext) -> Result<Reason, Reason> {
    match parse_l4(ctx)? {
        Parsed::V4(pkt) => ingress::<V4>(ctx, &pkt),
        Parsed::V6(pkt) => ingress::<V6>(ctx, &pkt),
    }
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

/// A backend as one family's data path uses it: its address in that family, and its port.
#[derive(Clone, Copy)]
struct Target<A> {
    addr_be: A,
    port_be: u16,
    max_flows: u16,
}

/// The backend of this packet's flow: conntrack's, or a new choice for a new flow (and for a
/// mid-flow packet whose entry is gone, so an unchanged table keeps it on its backend).
#[inline(always)]
fn select_backend<F: Family>(
    ctx: &XdpContext,
    pkt: &L4Packet<F::Addr>,
    service: &Service,
) -> Result<(u32, Target<F::Addr>, Reason), Reason> {
    let now = bpf_ktime_get_ns_safe();
    if let Some(flow) = F::conns().get_ptr_mut(&pkt.flow) {
        // SAFETY: the LRU value stays valid while this program runs (RCU); a racing update
        // of the same flow writes the same backend.
        let backend_id = unsafe { (*flow).backend };
        if let Some(backend) = lookup_backend::<F>(backend_id) {
            // SAFETY: as above; a torn timestamp only affects `gpulb flows`' idle column.
            unsafe { (*flow).last_seen_ns = now };
            track_live(flow, pkt);
            return Ok((backend_id, backend, Reason::FwdEstablished));
        }
    }

    // Limits of a service the daemon never configured read as all zero: none.
    let limits = LIMITS.get(service.id).copied().unwrap_or_default();
    // Established flows are never refused: only packets that open a flow are admitted or not
    // (a mid-flow packet that lost its conntrack entry is re-hashed below, unlimited).
    let is_new = pkt.flow.proto == PROTO_UDP || pkt.is_syn != 0;
    if limits.flags & LIMIT_ALLOWLIST != 0 && !F::is_allowed(service.id, &pkt.flow.src_be) {
        return Err(refuse::<F>(ctx, pkt, service, &limits, Refusal::NotAllowed));
    }
    if is_new && limits.interval_ns != 0 && F::is_over_rate(service.id, &pkt.flow, &limits, now) {
        return Err(refuse::<F>(
            ctx,
            pkt,
            service,
            &limits,
            Refusal::RateLimited,
        ));
    }

    let hash = if limits.flags & LIMIT_AFFINITY != 0 {
        affinity_hash(&pkt.flow)
    } else {
        flow_hash(&pkt.flow)
    };
    let (mut backend_id, mut backend) =
        maglev_pick::<F>(service, hash).ok_or(Reason::DropNoBackend)?;
    if is_new && limits.flags & LIMIT_CHECK_LOAD != 0 {
        match pick_with_room::<F>(service, &limits, hash, backend_id, backend) {
            Some((id, b, redirected)) => {
                if redirected {
                    count_admission(service.id, |c| &mut c.redirected);
                }
                backend_id = id;
                backend = b;
            }
            None => {
                return Err(refuse::<F>(
                    ctx,
                    pkt,
                    service,
                    &limits,
                    Refusal::BackendsFull,
                ));
            }
        }
    }

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

    let reason = if is_new {
        Reason::FwdNewFlow
    } else {
        Reason::FwdRehashed
    };
    Ok((backend_id, backend, reason))
}

/// Keeps `LIVE_FLOWS` right for a packet of a known flow: its first FIN or RST ends it, and a
/// SYN reusing the 5-tuple of an ended flow starts it again.
#[inline(always)]
fn track_live<A>(flow: *mut Flow, pkt: &L4Packet<A>) {
    if pkt.flow.proto != PROTO_TCP {
        return;
    }
    // SAFETY: as in `select_backend`. Two CPUs racing on the flags of one flow (a FIN and
    // its retransmission) can count it twice; the daemon's reconciliation repairs that.
    unsafe {
        let counted = (*flow).flags & FLOW_COUNTED != 0;
        if counted && pkt.is_close != 0 {
            (*flow).flags &= !FLOW_COUNTED;
            add_live((*flow).backend, u64::MAX);
        } else if !counted && pkt.is_syn != 0 {
            (*flow).flags |= FLOW_COUNTED;
            add_live((*flow).backend, 1);
        }
    }
}

/// Adds `delta` (`u64::MAX` for -1) to a backend's live flows, atomically.
#[inline(always)]
fn add_live(backend_id: u32, delta: u64) {
    if let Some(n) = LIVE_FLOWS.get_ptr_mut(backend_id) {
        // SAFETY: a valid, aligned map value; every writer uses atomic adds. The old value is
        // unused, so this is BPF's plain atomic add (no BPF_FETCH).
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(n, delta) };
    }
}

/// A backend's live flows; a count driven below zero by a double decrement reads as 0.
#[inline(always)]
fn live_flows(backend_id: u32) -> u64 {
    match LIVE_FLOWS.get(backend_id) {
        Some(n) => {
            // SAFETY: a valid map value; a racing atomic add leaves it old or new, both fine.
            let v = unsafe { core::ptr::read_volatile(n) };
            if (v as i64) < 0 { 0 } else { v }
        }
        None => 0,
    }
}

/// Whether `key`'s source lies in an allowed prefix of its service (LPM: the service id
/// is the first 32 bits of every prefix).
#[inline(always)]
fn is_allowed_in<K>(map: &LpmTrie<K, u32>, bits: u32, data: K) -> bool {
    map.get(&Key::new(32 + bits, data)).is_some()
}

/// GCRA: a source may open one flow every `interval_ns`, and run up to `burst_ns` ahead.
/// Refusals do not advance its schedule, so a flooding source gets through again at its
/// rate. Concurrent SYNs of one source on two CPUs may both pass; the limit is per source,
/// not exact to the packet.
#[inline(always)]
fn is_over_rate_in<K>(map: &LruHashMap<K, u64>, key: &K, limits: &ServiceLimits, now: u64) -> bool {
    if let Some(tat) = map.get_ptr_mut(key) {
        // SAFETY: the LRU value stays valid while this program runs.
        let stored = unsafe { *tat };
        let start = if stored > now { stored } else { now };
        let next = start + limits.interval_ns;
        if next - now > limits.burst_ns {
            return true;
        }
        // SAFETY: as above.
        unsafe { *tat = next };
        return false;
    }
    let _ = map.insert(key, &(now + limits.interval_ns), 0);
    false
}

/// The backend for a new flow of a VIP whose backends have caps or a load bound: the Maglev
/// pick if it has room, else the first candidate with room, walked from a place the flow's
/// hash picks (so one client's flows try them in the same order). `true` with a backend
/// other than the pick; `None` when every backend is full.
#[inline(always)]
fn pick_with_room<F: Family>(
    service: &Service,
    limits: &ServiceLimits,
    hash: u32,
    picked_id: u32,
    picked: Target<F::Addr>,
) -> Option<(u32, Target<F::Addr>, bool)> {
    let c = CANDIDATES.get(service.id)?;
    // The VIP's live flows (and the pick's weight among them) only matter to the bound.
    let (total, weight) = if limits.bound_pct != 0 {
        service_load(c, picked_id)
    } else {
        (0, 0)
    };
    if has_room(
        live_flows(picked_id),
        picked.max_flows,
        weight,
        total,
        c,
        limits,
    ) {
        return Some((picked_id, picked, false));
    }
    let n = c.count;
    if n == 0 || n as usize > MAX_CANDIDATES {
        return None;
    }
    let start = hash % n;
    for k in 0..MAX_CANDIDATES as u32 {
        if k >= n {
            break;
        }
        let i = ((start + k) % n) as usize;
        if i >= MAX_CANDIDATES {
            break;
        }
        let id = c.ids[i];
        let Some(backend) = lookup_backend::<F>(id) else {
            continue;
        };
        if has_room(
            live_flows(id),
            backend.max_flows,
            c.weights[i],
            total,
            c,
            limits,
        ) {
            return Some((id, backend, true));
        }
    }
    None
}

/// Whether a backend with `live` flows may take one more: under its cap, and (bounded load)
/// under `bound_pct`% of its weighted share of the VIP's `total` live flows.
#[inline(always)]
fn has_room(
    live: u64,
    max_flows: u16,
    weight: u32,
    total: u64,
    c: &Candidates,
    limits: &ServiceLimits,
) -> bool {
    if max_flows != 0 && live >= max_flows as u64 {
        return false;
    }
    // live < bound% × (total + 1) × weight / total_weight, in integers.
    limits.bound_pct == 0
        || live * c.total_weight as u64 * 100
            < limits.bound_pct as u64 * (total + 1) * weight as u64
}

/// The service's live flows over its candidates, and `id`'s weight among them.
#[inline(always)]
fn service_load(c: &Candidates, id: u32) -> (u64, u32) {
    let mut total = 0;
    let mut weight = 0;
    for i in 0..MAX_CANDIDATES {
        if i as u32 >= c.count {
            break;
        }
        total += live_flows(c.ids[i]);
        if c.ids[i] == id {
            weight = c.weights[i];
        }
    }
    (total, weight)
}

#[derive(Clone, Copy)]
enum Refusal {
    NotAllowed,
    RateLimited,
    BackendsFull,
}

/// Counts the refusal for the VIP, and answers a SYN with a RST when the VIP says so;
/// anything else is dropped.
#[inline(always)]
fn refuse<F: Family>(
    ctx: &XdpContext,
    pkt: &L4Packet<F::Addr>,
    service: &Service,
    limits: &ServiceLimits,
    why: Refusal,
) -> Reason {
    match why {
        Refusal::NotAllowed => count_admission(service.id, |c| &mut c.not_allowed),
        Refusal::RateLimited => count_admission(service.id, |c| &mut c.rate_limited),
        Refusal::BackendsFull => count_admission(service.id, |c| &mut c.backends_full),
    }
    if limits.flags & LIMIT_REFUSE_RST != 0 && write_reset::<F>(ctx, pkt).is_some() {
        Reason::RefuseReset
    } else {
        Reason::RefuseDrop
    }
}

#[inline(always)]
fn count_admission(service_id: u32, field: impl FnOnce(&mut AdmitCounters) -> &mut u64) {
    if let Some(c) = ADMIT_STATS.get_ptr_mut(service_id) {
        // SAFETY: per-CPU slot; no other writer runs on this CPU meanwhile.
        unsafe { *field(&mut *c) += 1 };
    }
}

/// Turns a SYN into the RST+ACK that answers it, addressed back to the sender: MACs swapped,
/// IP and TCP headers rewritten, anything after the TCP header cut off.
#[inline(always)]
fn write_reset<F: Family>(ctx: &XdpContext, pkt: &L4Packet<F::Addr>) -> Option<()> {
    if pkt.flow.proto != PROTO_TCP || pkt.is_syn == 0 {
        return None;
    }
    let tcp: *const network_types::tcp::TcpHdr = ptr_at(ctx, pkt.l4)?;
    // SAFETY: bounds checked by `ptr_at`.
    let seq = u32::from_be_bytes(unsafe { (*tcp).seq });
    let headers = F::reset_headers(&pkt.flow, seq);
    // The answer has no IPv4 options or IPv6 extension headers: its TCP header follows the
    // fixed IP header, over whatever the SYN had there, and the rest is cut off.
    let len = ctx.data_end() - ctx.data();
    let want = pkt.l3 + core::mem::size_of::<F::Reset>();
    if len > want {
        // SAFETY: the helper only moves data_end; every pointer is re-derived below.
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx, -((len - want) as i32)) } != 0 {
            return None;
        }
    }
    let eth: *mut [u8; 12] = ptr_at(ctx, 0)?;
    let out: *mut F::Reset = ptr_at(ctx, pkt.l3)?;
    // SAFETY: bounds checked by `ptr_at` after the tail moved.
    unsafe {
        let macs = *eth;
        let e = &mut *eth;
        e[..6].copy_from_slice(&macs[6..]);
        e[6..].copy_from_slice(&macs[..6]);
        *out = headers;
    }
    Some(())
}

/// The backend in the service's Maglev slot for `hash`; `None` for an unprogrammed slot.
#[inline(always)]
fn maglev_pick<F: Family>(service: &Service, hash: u32) -> Option<(u32, Target<F::Addr>)> {
    let id = *MAGLEV.get(maglev_index(service, hash))?;
    Some((id, lookup_backend::<F>(id)?))
}

/// A programmed backend of family `F`; `None` for id 0, for removed slots, and for a
/// backend of the other family (the daemon never mixes them in one VIP).
#[inline(always)]
fn lookup_backend<F: Family>(id: u32) -> Option<Target<F::Addr>> {
    let backend = *BACKENDS.get(id)?;
    if id == 0 || backend.is_unset() {
        return None;
    }
    Some(Target {
        addr_be: F::backend_addr(id, &backend)?,
        port_be: backend.port_be,
        max_flows: backend.max_flows,
    })
}

#[inline(always)]
fn bpf_ktime_get_ns_safe() -> u64 {
    // SAFETY: the helper has no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// Destination NAT with incremental checksum updates (IPv4 header, TCP/UDP).
#[inline(always)]
fn rewrite_destination<F: Family>(
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

/// Replies of NATed flows get the VIP back as their source. Uses the skb helpers so that
/// checksums stay right whatever the skb's checksum state (offloaded partial sums included).
#[inline(always)]
fn try_egress(ctx: &TcContext) -> Result<Reason, Reason> {
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

/// A process on this host connects to a VIP: it never crosses the NIC's XDP hook, so its
/// socket is pointed at a backend here, before the first packet.
#[cgroup_sock_addr(connect4)]
pub fn gpulb_connect4(ctx: SockAddrContext) -> i32 {
    sock_forward::<V4>(&ctx);
    1 // let the connect proceed
}

/// The same per datagram, for unconnected UDP sockets.
#[cgroup_sock_addr(sendmsg4)]
pub fn gpulb_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock_forward::<V4>(&ctx);
    1
}

/// getpeername() of a balanced socket shows the VIP, as the application connected to.
#[cgroup_sock_addr(getpeername4)]
pub fn gpulb_getpeername4(ctx: SockAddrContext) -> i32 {
    sock_reverse::<V4>(&ctx);
    1
}

/// recvfrom() on a balanced UDP socket shows the VIP as the sender.
#[cgroup_sock_addr(recvmsg4)]
pub fn gpulb_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock_reverse::<V4>(&ctx);
    1
}

#[cgroup_sock_addr(connect6)]
pub fn gpulb_connect6(ctx: SockAddrContext) -> i32 {
    sock_forward::<V6>(&ctx);
    1
}

#[cgroup_sock_addr(sendmsg6)]
pub fn gpulb_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock_forward::<V6>(&ctx);
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn gpulb_getpeername6(ctx: SockAddrContext) -> i32 {
    sock_reverse::<V6>(&ctx);
    1
}

#[cgroup_sock_addr(recvmsg6)]
pub fn gpulb_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock_reverse::<V6>(&ctx);
    1
}

#[inline(always)]
fn is_daemon_netns(ctx: &SockAddrContext) -> bool {
    let Some(&ours) = SOCK_NETNS.get(0) else {
        return false;
    };
    // SAFETY: the helper only reads the socket's namespace.
    ours != 0 && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == ours
}

#[inline(always)]
fn socket_cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: the helper reads the socket's cookie (assigned on first use).
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// Maglev by the socket's cookie: a socket keeps its backend, sockets spread by weight.
/// Admission control and caps are for clients from the network; local sockets skip them.
#[inline(always)]
fn sock_forward<F: Family>(ctx: &SockAddrContext) {
    if !is_daemon_netns(ctx) {
        return;
    }
    let sa = ctx.sock_addr;
    // SAFETY: the context the kernel passed; these fields are readable in connect/sendmsg.
    let (port, proto) = unsafe { ((*sa).user_port, (*sa).protocol) };
    let ip = F::sock_ip(sa);
    let vip = VipKeyOf {
        addr_be: ip,
        port_be: port as u16,
        proto: proto as u8,
        _pad: 0,
    };
    // SAFETY: an 8-byte value written whole by userspace.
    let Some(service) = (unsafe { F::services().get(&vip) }).copied() else {
        return;
    };
    let cookie = socket_cookie(ctx);
    let hash = fmix64(cookie) as u32;
    let Some((backend_id, backend)) = maglev_pick::<F>(&service, hash) else {
        return; // no backend: the connect goes to the VIP, as without gpulb
    };
    let revnat = RevNatOf {
        vip_be: ip,
        vport_be: port as u16,
        _pad: 0,
    };
    F::remember_socket(cookie, &backend.addr_be, backend.port_be, &revnat);
    F::set_sock_ip(sa, &backend.addr_be);
    // SAFETY: connect/sendmsg may write the destination port.
    unsafe { (*sa).user_port = backend.port_be as u32 };
    count_traffic(&VIP_STATS, service.id, 0, true);
    count_traffic(&BACKEND_STATS, backend_id, 0, true);
    count_reason(Reason::SockBalanced);
}

#[inline(always)]
fn sock_reverse<F: Family>(ctx: &SockAddrContext) {
    if !is_daemon_netns(ctx) {
        return;
    }
    let sa = ctx.sock_addr;
    // SAFETY: the context the kernel passed; readable in getpeername/recvmsg.
    let port = unsafe { (*sa).user_port };
    let ip = F::sock_ip(sa);
    if let Some(revnat) = F::socket_vip(socket_cookie(ctx), &ip, port as u16) {
        F::set_sock_ip(sa, &revnat.vip_be);
        // SAFETY: getpeername/recvmsg may write the address shown.
        unsafe { (*sa).user_port = revnat.vport_be as u32 };
    }
}

/// A backend's FIN or RST ends the flow's count, as the client's would.
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
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program that could reach a panic.
    unsafe { core::hint::unreachable_unchecked() }
}
