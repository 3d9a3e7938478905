//! Admission control of new flows: the allow-list (LPM), the per-source rate limit (GCRA),
//! and the refusal (a RST written over the SYN and sent back, or a drop).

use aya_ebpf::{
    btf_maps::{LpmTrie, LruHashMap, lpm_trie::Key},
    helpers::{bpf_ktime_get_ns, bpf_xdp_adjust_tail},
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
pub fn is_allowed_in<K, const N: usize, const F: usize>(
    map: &LpmTrie<K, u32, N, F>,
    bits: u32,
    data: K,
) -> bool {
    map.get(&Key::new(32 + bits, data)).is_some()
}

/// GCRA: a source may open one flow every `interval_ns`, and run up to `burst_ns` ahead.
/// Refusals do not advance its schedule, so a flooding source gets through again at its
/// rate. Concurrent SYNs of one source on two CPUs may both pass; the limit is per source,
/// not exact to the packet.
#[inline(always)]
pub fn is_over_rate_in<K, const N: usize, const F: usize>(
    map: &LruHashMap<K, u64, N, F>,
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
/// flow, its rate limit; the `Err` says why not (the caller refuses).
#[inline(always)]
pub fn admit<F: Family>(
    pkt: &L4Packet<F::Addr>,
    service: &Service,
    limits: &ServiceLimits,
) -> Result<(), Refusal> {
    if limits.has_allowlist() && !F::is_allowed(service.id, &pkt.flow.src_be) {
        return Err(Refusal::NotAllowed);
    }
    // Established flows are never refused: only packets that open a flow are rate limited
    // (a mid-flow packet that lost its conntrack entry is re-hashed, unlimited).
    if pkt.opens_flow()
        && limits.has_rate_limit()
        && F::is_over_rate(service.id, &pkt.flow, limits, exact_now_ns())
    {
        return Err(Refusal::RateLimited);
    }
    Ok(())
}

/// The exact clock, for the rate limit alone: the coarse one the rest of the ingress path
/// reads stands still within a tick (1-4 ms), and a GCRA on it would admit at most
/// `burst / interval` flows a tick, fewer than `rate` when the burst is small.
#[inline(always)]
fn exact_now_ns() -> u64 {
    // SAFETY: the helper has no preconditions.
    unsafe { bpf_ktime_get_ns() }
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
/// IP and TCP headers rewritten field by field, anything after the TCP header cut off. The
/// bytes are those of `lb_common::reset_headers` (tests compare them). A subprogram that
/// builds nothing on the stack: the forwarding path's frame and the scheduler's leave little.
#[inline(never)]
fn write_reset<F: Family>(ctx: &XdpContext, pkt: &L4Packet<F::Addr>) -> Option<()> {
    if pkt.flow.proto != PROTO_TCP || pkt.is_syn == 0 {
        return None;
    }
    let tcp: *const network_types::tcp::TcpHdr = ptr_at(ctx, pkt.l4)?;
    // SAFETY: bounds checked by `ptr_at`.
    let ack = u32::from_be_bytes(unsafe { (*tcp).seq }).wrapping_add(1);
    // The answer has no IPv4 options or IPv6 extension headers: its TCP header follows the
    // fixed IP header, over whatever the SYN had there, and the rest is cut off.
    let ip_len = F::DST_OFF + 4 * F::WORDS;
    let len = ctx.data_end() - ctx.data();
    let want = pkt.l3 + ip_len + TCP_LEN;
    if len > want {
        // SAFETY: the helper only moves data_end; every pointer is re-derived below.
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx, -((len - want) as i32)) } != 0 {
            return None;
        }
    }
    let eth: *mut [u8; 12] = ptr_at(ctx, 0)?;
    // SAFETY: bounds checked by `ptr_at` after the tail moved.
    unsafe {
        let macs = *eth;
        let e = &mut *eth;
        e[..6].copy_from_slice(&macs[6..]);
        e[6..].copy_from_slice(&macs[..6]);
    }
    // From the VIP (the SYN's destination) back to the client (its source).
    let (server, client) = (
        F::host_words(&pkt.flow.dst_be),
        F::host_words(&pkt.flow.src_be),
    );
    let mut addr_sum = 0u32;
    for i in 0..4 {
        if i >= F::WORDS {
            break;
        }
        addr_sum +=
            (server[i] >> 16) + (server[i] & 0xffff) + (client[i] >> 16) + (client[i] & 0xffff);
    }
    let fixed: *mut [u8; 8] = ptr_at(ctx, pkt.l3)?;
    // SAFETY: bounds checked by `ptr_at`.
    unsafe {
        if F::WORDS == 1 {
            // IPv4: version 4, IHL 5, length 40, DF; then TTL 64, TCP and the checksum.
            *fixed = [0x45, 0, 0, 40, 0, 0, 0x40, 0];
            let check = !fold(0x4500 + 40 + 0x4000 + (64 << 8 | PROTO_TCP as u32) + addr_sum);
            let rest: *mut [u8; 4] = ptr_at(ctx, pkt.l3 + 8)?;
            let [hi, lo] = check.to_be_bytes();
            *rest = [64, PROTO_TCP, hi, lo];
        } else {
            // IPv6: version 6, payload 20 bytes of TCP, hop limit 64.
            *fixed = [0x60, 0, 0, 0, 0, TCP_LEN as u8, PROTO_TCP, 64];
        }
    }
    let (server_be, client_be) = (F::words(&pkt.flow.dst_be), F::words(&pkt.flow.src_be));
    for i in 0..4 {
        if i >= F::WORDS {
            break;
        }
        let src: *mut [u8; 4] = ptr_at(ctx, pkt.l3 + F::SRC_OFF + 4 * i)?;
        let dst: *mut [u8; 4] = ptr_at(ctx, pkt.l3 + F::DST_OFF + 4 * i)?;
        // SAFETY: bounds checked by `ptr_at`.
        unsafe {
            *src = server_be[i].to_ne_bytes();
            *dst = client_be[i].to_ne_bytes();
        }
    }
    // TCP: the VIP's port back to the client's, seq 0, acking the SYN, RST|ACK, window 0.
    let (sport, dport) = (pkt.flow.dport_be, pkt.flow.sport_be);
    let pseudo = addr_sum + PROTO_TCP as u32 + TCP_LEN as u32;
    let words = u16::from_be(sport) as u32
        + u16::from_be(dport) as u32
        + (ack >> 16)
        + (ack & 0xffff)
        + 0x5014;
    let check = !fold(pseudo + words);
    let t: *mut [u8; TCP_LEN] = ptr_at(ctx, pkt.l3 + ip_len)?;
    let (s, d, a, c) = (
        sport.to_ne_bytes(),
        dport.to_ne_bytes(),
        ack.to_be_bytes(),
        check.to_be_bytes(),
    );
    // SAFETY: bounds checked by `ptr_at`.
    unsafe {
        *t = [
            s[0], s[1], d[0], d[1], 0, 0, 0, 0, a[0], a[1], a[2], a[3], 0x50, 0x14, 0, 0, c[0],
            c[1], 0, 0,
        ];
    }
    Some(())
}

const TCP_LEN: usize = 20;

/// One's-complement fold of a 32-bit sum to 16 bits.
#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}
