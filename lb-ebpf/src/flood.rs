//! Flood mode: each CPU may insert `CtConfig::inserts_per_cpu` conntrack entries a second.
//! Past that, until the second is over, new flows and mid-flow packets without an entry are
//! forwarded by the consistent hash alone and leave no state (as Katran does), so a flood
//! of SYNs, ACKs or UDP from many sources cannot evict the entries of live flows.

use lb_common::FloodState;

use crate::maps::{CT_CONFIG, FLOOD, FLOOD_AT};

const WINDOW_NS: u64 = 1_000_000_000;

/// Whether this CPU may insert a conntrack entry now; `false` in flood mode (its budget for
/// this second is spent), counted as one stateless packet. Spends nothing: `spend_insert`
/// does, once the flow has a backend.
#[inline(always)]
pub fn has_insert_budget(now: u64) -> bool {
    let budget = match CT_CONFIG.get(0) {
        Some(c) if c.inserts_per_cpu != 0 => c.inserts_per_cpu,
        _ => return true,
    };
    let Some(state) = FLOOD.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: this CPU's own value; XDP programs on one CPU do not preempt each other, so
    // nothing races with these plain writes.
    let state: &mut FloodState = unsafe { &mut *state };
    // Saturating: a window started by the exact clock (an earlier version's program, a
    // test's) may lie a tick ahead of the coarse one.
    if now.saturating_sub(state.window_ns) >= WINDOW_NS {
        state.window_ns = now;
        state.inserts = 0;
        state.flooded = 0;
    }
    if state.inserts < budget {
        return true;
    }
    if state.flooded == 0 {
        // The first refusal of this window: one more flood second, and a mark the egress
        // program reads (written once per CPU and second, not per packet).
        state.flooded = 1;
        state.flood_windows += 1;
        if let Some(at) = FLOOD_AT.get_ptr_mut(0) {
            // SAFETY: a valid, aligned map value; a racing writer stores a time as recent.
            unsafe { core::ptr::write_volatile(at, now) };
        }
    }
    state.stateless += 1;
    false
}

/// Spends one insert of this CPU's budget (after `has_insert_budget` said yes).
#[inline(always)]
pub fn spend_insert() {
    if let Some(state) = FLOOD.get_ptr_mut(0) {
        // SAFETY: as in `has_insert_budget`.
        unsafe { (*state).inserts += 1 };
    }
}

/// Whether a CPU ran out of its budget within `STATELESS_NAT_HOLD_NS`.
#[inline(always)]
pub fn was_flooded(now: u64) -> bool {
    match FLOOD_AT.get(0) {
        Some(&at) => at != 0 && now.wrapping_sub(at) < lb_common::STATELESS_NAT_HOLD_NS,
        None => false,
    }
}
