//! gpulb data path.
//!
//! `gpulb_ingress` (XDP) picks a backend for each new flow to a VIP with the VIP's Maglev
//! table, records it in the `CONNS` LRU, and NATs the destination to the local backend before
//! passing the packet to the stack. `gpulb_egress` (TC) rewrites the replies of those flows,
//! and only those, back to the VIP.
#![no_std]
#![no_main]

mod parse;

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, xdp_action},
    helpers::bpf_ktime_get_ns,
    macros::{classifier, map, xdp},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{TcContext, XdpContext},
};
use lb_common::{
    Backend, CONNTRACK_DEFAULT_SIZE, Counters, Flow, FlowKey, MAGLEV_ENTRIES, MAX_BACKENDS,
    MAX_SERVICES, PROTO_TCP, PROTO_UDP, Reason, RevNat, Service, VipKey, flow_hash, maglev_index,
};
use parse::{
    IP_CHECK_OFF, IP_SRC_OFF, L4Packet, TCP_CHECK_OFF, UDP_CHECK_OFF, csum_update, parse_l4, ptr_at,
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
static REASONS: PerCpuArray<u64> = PerCpuArray::pinned(Reason::COUNT, 0);

#[xdp]
pub fn gpulb_ingress(ctx: XdpContext) -> u32 {
    let reason = match try_ingress(&ctx) {
        Ok(reason) | Err(reason) => reason,
    };
    count_reason(reason);
    if is_drop(reason) {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
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
fn is_drop(reason: Reason) -> bool {
    matches!(reason, Reason::DropNoBackend)
}

#[inline(always)]
fn count_reason(reason: Reason) {
    if let Some(n) = REASONS.get_ptr_mut(reason as u32) {
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
    let pkt = parse_l4(ctx)?;
    let vip = VipKey {
        addr_be: pkt.flow.dst_be,
        port_be: pkt.flow.dport_be,
        proto: pkt.flow.proto,
        _pad: 0,
    };
    // SAFETY: SERVICES entries are only replaced whole by userspace; a torn read is not
    // possible for an 8-byte value copied out at once.
    let service = *unsafe { SERVICES.get(&vip) }.ok_or(Reason::PassNotVip)?;
    let (backend_id, backend, reason) = select_backend(&pkt, &service)?;

    rewrite_destination(ctx, &pkt, &backend)?;

    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let new_flow = matches!(reason, Reason::FwdNewFlow);
    count_traffic(&VIP_STATS, service.id, bytes, new_flow);
    count_traffic(&BACKEND_STATS, backend_id, bytes, new_flow);
    Ok(reason)
}

/// The backend of this packet's flow: conntrack's, or Maglev's for a new flow (and for a
/// mid-flow packet whose entry is gone, so an unchanged table keeps it on its backend).
#[inline(always)]
fn select_backend(pkt: &L4Packet, service: &Service) -> Result<(u32, Backend, Reason), Reason> {
    let now = bpf_ktime_get_ns_safe();
    if let Some(flow) = CONNS.get_ptr_mut(&pkt.flow) {
        // SAFETY: the LRU value stays valid while this program runs (RCU); a racing update
        // of the same flow writes the same backend.
        let backend_id = unsafe { (*flow).backend };
        if let Some(backend) = lookup_backend(backend_id) {
            // SAFETY: as above; a torn timestamp only affects `gpulb flows`' idle column.
            unsafe { (*flow).last_seen_ns = now };
            return Ok((backend_id, backend, Reason::FwdEstablished));
        }
    }

    let slot = maglev_index(service, flow_hash(&pkt.flow));
    let backend_id = *MAGLEV.get(slot).ok_or(Reason::DropNoBackend)?;
    let backend = lookup_backend(backend_id).ok_or(Reason::DropNoBackend)?;

    let flow = Flow {
        backend: backend_id,
        service: service.id,
        last_seen_ns: now,
    };
    let reply = FlowKey {
        src_be: backend.addr_be,
        dst_be: pkt.flow.src_be,
        sport_be: backend.port_be,
        dport_be: pkt.flow.sport_be,
        proto: pkt.flow.proto,
        _pad: [0; 3],
    };
    let revnat = RevNat {
        vip_be: pkt.flow.dst_be,
        vport_be: pkt.flow.dport_be,
        _pad: 0,
    };
    // An insert can only fail under memory pressure; the packet is still forwarded, and the
    // next one re-hashes to the same backend.
    let _ = REVNAT.insert(&reply, &revnat, 0);
    let _ = CONNS.insert(&pkt.flow, &flow, 0);

    let is_new = pkt.flow.proto == PROTO_UDP || pkt.is_syn != 0;
    let reason = if is_new {
        Reason::FwdNewFlow
    } else {
        Reason::FwdRehashed
    };
    Ok((backend_id, backend, reason))
}

/// A programmed backend; `None` for id 0 and for removed slots.
#[inline(always)]
fn lookup_backend(id: u32) -> Option<Backend> {
    let backend = *BACKENDS.get(id)?;
    if id == 0 || backend.is_unset() {
        return None;
    }
    Some(backend)
}

#[inline(always)]
fn bpf_ktime_get_ns_safe() -> u64 {
    // SAFETY: the helper has no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// Destination NAT with incremental IPv4 and TCP/UDP checksum updates.
#[inline(always)]
fn rewrite_destination(ctx: &XdpContext, pkt: &L4Packet, backend: &Backend) -> Result<(), Reason> {
    let old_addr = u32::from_be(pkt.flow.dst_be);
    let new_addr = u32::from_be(backend.addr_be);
    let old_port = u16::from_be(pkt.flow.dport_be);
    let new_port = u16::from_be(backend.port_be);

    // SAFETY: `pkt.ip` was bounds-checked by `parse_l4` and the packet has not moved.
    unsafe {
        let ip = &mut *pkt.ip;
        let check = csum_update(u16::from_be_bytes(ip.check), old_addr, new_addr, 0, 0);
        ip.check = check.to_be_bytes();
        ip.dst_addr = backend.addr_be.to_ne_bytes();
    }

    if pkt.flow.proto == PROTO_TCP {
        let tcp: *mut network_types::tcp::TcpHdr =
            ptr_at(ctx, pkt.l4).ok_or(Reason::PassMalformed)?;
        // SAFETY: bounds checked by `ptr_at`.
        unsafe {
            let tcp = &mut *tcp;
            let check = u16::from_be_bytes(tcp.check);
            tcp.check = csum_update(check, old_addr, new_addr, old_port, new_port).to_be_bytes();
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
                let mut new = csum_update(check, old_addr, new_addr, old_port, new_port);
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
    let pkt = parse_l4(ctx).map_err(|_| Reason::EgressPass)?;
    // SAFETY: REVNAT values are written whole; an 8-byte copy.
    let revnat = *unsafe { REVNAT.get(&pkt.flow) }.ok_or(Reason::EgressPass)?;

    let (check_off, l4_flags) = if pkt.flow.proto == PROTO_TCP {
        (pkt.l4 + TCP_CHECK_OFF, 0)
    } else {
        (pkt.l4 + UDP_CHECK_OFF, BPF_F_MARK_MANGLED_0 as u64)
    };
    let (old_addr, new_addr) = (pkt.flow.src_be, revnat.vip_be);
    let (old_port, new_port) = (pkt.flow.sport_be, revnat.vport_be);

    let fail = |_| Reason::EgressPass;
    ctx.skb
        .l4_csum_replace(
            check_off,
            old_addr as u64,
            new_addr as u64,
            l4_flags | BPF_F_PSEUDO_HDR as u64 | 4,
        )
        .map_err(fail)?;
    ctx.skb
        .l4_csum_replace(check_off, old_port as u64, new_port as u64, l4_flags | 2)
        .map_err(fail)?;
    ctx.skb
        .l3_csum_replace(pkt.l3 + IP_CHECK_OFF, old_addr as u64, new_addr as u64, 4)
        .map_err(fail)?;
    ctx.skb
        .store(pkt.l3 + IP_SRC_OFF, &new_addr, 0)
        .map_err(fail)?;
    ctx.skb.store(pkt.l4, &new_port, 0).map_err(fail)?;
    Ok(Reason::EgressRevNat)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program that could reach a panic.
    unsafe { core::hint::unreachable_unchecked() }
}
