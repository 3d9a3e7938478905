//! Live TCP flows per backend (`LIVE_FLOWS`): what caps and bounded load read. A flow counts
//! from the end of its handshake (the client's first packet after its SYN) to its first FIN
//! or RST in either direction, so spoofed SYNs, which never complete a handshake, fill no cap.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use lb_common::{FLOW_COUNTED, FLOW_DONE, Flow, PROTO_TCP};

use crate::{
    maps::{LIVE_FIX, LIVE_FLOWS},
    parse::L4Packet,
};

/// Keeps `LIVE_FLOWS` right for a packet of a known flow, from either side: the client's
/// first packet after the SYN starts the count, the first FIN or RST ends it for good.
#[inline(always)]
pub fn track_live<A>(flow: *mut Flow, pkt: &L4Packet<A>, from_client: bool) {
    if pkt.flow.proto != PROTO_TCP {
        return;
    }
    // SAFETY: the LRU value stays valid while this program runs (RCU). Two CPUs racing on
    // the flags of one flow (a FIN and its retransmission) can count it twice; the daemon's
    // reconciliation repairs that.
    unsafe {
        let flags = (*flow).flags;
        if pkt.is_close != 0 {
            (*flow).flags = (flags & !FLOW_COUNTED) | FLOW_DONE;
            if flags & FLOW_COUNTED != 0 {
                add_live((*flow).backend, u64::MAX);
            }
        } else if from_client && pkt.is_syn == 0 && flags & (FLOW_COUNTED | FLOW_DONE) == 0 {
            (*flow).flags = flags | FLOW_COUNTED;
            add_live((*flow).backend, 1);
        }
    }
}

/// Takes a flow out of its backend's count for good (its entry is about to be replaced).
#[inline(always)]
pub fn end_count(flow: *mut Flow) {
    // SAFETY: as in `track_live`.
    unsafe {
        if (*flow).flags & FLOW_COUNTED != 0 {
            (*flow).flags = ((*flow).flags & !FLOW_COUNTED) | FLOW_DONE;
            add_live((*flow).backend, u64::MAX);
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

/// A backend's live flows: the data path's count plus the daemon's correction. A sum below
/// zero (a double decrement not yet repaired) reads as 0 here; the daemon repairs the count.
#[inline(always)]
pub fn live_flows(backend_id: u32) -> u64 {
    let v =
        read_count(LIVE_FLOWS.get(backend_id)).wrapping_add(read_count(LIVE_FIX.get(backend_id)));
    if (v as i64) < 0 { 0 } else { v }
}

#[inline(always)]
fn read_count(n: Option<&u64>) -> u64 {
    match n {
        Some(n) => {
            // SAFETY: a valid map value; a racing write leaves it old or new, both fine.
            unsafe { core::ptr::read_volatile(n) }
        }
        None => 0,
    }
}
