//! Live TCP flows per backend (`LIVE_FLOWS`): what caps and bounded load read. A flow counts
//! from its first packet to its first FIN or RST in either direction.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use lb_common::{FLOW_COUNTED, Flow, PROTO_TCP};

use crate::{maps::LIVE_FLOWS, parse::L4Packet};

/// Keeps `LIVE_FLOWS` right for a packet of a known flow: its first FIN or RST ends it, and a
/// SYN reusing the 5-tuple of an ended flow starts it again.
#[inline(always)]
pub fn track_live<A>(flow: *mut Flow, pkt: &L4Packet<A>) {
    if pkt.flow.proto != PROTO_TCP {
        return;
    }
    // SAFETY: the LRU value stays valid while this program runs (RCU). Two CPUs racing on
    // the flags of one flow (a FIN and its retransmission) can count it twice; the daemon's
    // reconciliation repairs that.
    unsafe {
        let counted = (*flow).is_counted();
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
pub fn add_live(backend_id: u32, delta: u64) {
    if let Some(n) = LIVE_FLOWS.get_ptr_mut(backend_id) {
        // SAFETY: a valid, aligned map value; every writer uses atomic adds. The old value is
        // unused, so this is BPF's plain atomic add (no BPF_FETCH).
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(n, delta) };
    }
}

/// A backend's live flows; a count driven below zero by a double decrement reads as 0.
#[inline(always)]
pub fn live_flows(backend_id: u32) -> u64 {
    match LIVE_FLOWS.get(backend_id) {
        Some(n) => {
            // SAFETY: a valid map value; a racing atomic add leaves it old or new, both fine.
            let v = unsafe { core::ptr::read_volatile(n) };
            if (v as i64) < 0 { 0 } else { v }
        }
        None => 0,
    }
}
