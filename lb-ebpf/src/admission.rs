//! Admission control of new flows: the allow-list (LPM), the per-source rate limit (GCRA),
//! and the refusal (a RST written over the SYN and sent back, or a drop).

use aya_ebpf::{
    helpers::bpf_xdp_adjust_tail,
    maps::{LpmTrie, LruHashMap, lpm_trie::Key},
    programs::XdpContext,
};
use lb_common::{PROTO_TCP, Reason, Service, ServiceLimits};

use crate::{
    family::Family,
    parse::{L4Packet, ptr_at},
    stats::count_admission,
};

/// Whether `key`'s source lies in an allowed prefix of its service (LPM: the service id
/// is the first 32 bits of every prefix).
#[inline(always)]
pub fn is_allowed_in<K>(map: &LpmTrie<K, u32>, bits: u32, data: K) -> bool {
    map.get(&Key::new(32 + bits, data)).is_some()
}

/// GCRA: a source may open one flow every `interval_ns`, and run up to `burst_ns` ahead.
/// Refusals do not advance its schedule, so a flooding source gets through again at its
/// rate. Concurrent SYNs of one source on two CPUs may both pass; the limit is per source,
/// not exact to the packet.
#[inline(always)]
pub fn is_over_rate_in<K>(
    map: &LruHashMap<K, u64>,
    key: &K,
    limits: &ServiceLimits,
    now: u64,
) -> bool {
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

/// Why a new flow was refused.
#[derive(Clone, Copy)]
pub enum Refusal {
    NotAllowed,
    RateLimited,
    BackendsFull,
}

/// Lets a packet without a conntrack entry through the VIP's allow-list and, if it opens a
/// flow, its rate limit; the `Err` is the refusal's verdict.
#[inline(always)]
pub fn admit<F: Family>(
    ctx: &XdpContext,
    pkt: &L4Packet<F::Addr>,
    service: &Service,
    limits: &ServiceLimits,
    now: u64,
) -> Result<(), Reason> {
    if limits.has_allowlist() && !F::is_allowed(service.id, &pkt.flow.src_be) {
        return Err(refuse::<F>(ctx, pkt, service, limits, Refusal::NotAllowed));
    }
    // Established flows are never refused: only packets that open a flow are rate limited
    // (a mid-flow packet that lost its conntrack entry is re-hashed, unlimited).
    if pkt.opens_flow()
        && limits.has_rate_limit()
        && F::is_over_rate(service.id, &pkt.flow, limits, now)
    {
        return Err(refuse::<F>(ctx, pkt, service, limits, Refusal::RateLimited));
    }
    Ok(())
}

/// Counts the refusal for the VIP, and answers a SYN with a RST when the VIP says so;
/// anything else is dropped.
#[inline(always)]
pub fn refuse<F: Family>(
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
    if limits.refuses_with_rst() && write_reset::<F>(ctx, pkt).is_some() {
        Reason::RefuseReset
    } else {
        Reason::RefuseDrop
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
