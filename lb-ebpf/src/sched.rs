//! The scheduler: one decision per new connection, made from what the kernel holds at that
//! moment, for XDP and the socket programs alike.
//!
//! Candidates: the backend in the VIP's Maglev slot for the flow's hash (the client
//! address's under affinity), then backends of the VIP's member list from a place the hash
//! picks: `Sched::choices` of them (more, up to `MAX_CHOICES`, only while every one seen is
//! at its cap). A backend at its cap (`max_flows`) or out of the table is never chosen. Each
//! candidate's load is its live flows (counted here, exact), or what its engine reports
//! running and waiting (or its KV-cache use in slots) when that is larger and fresh; its
//! capacity is its batch slots (from the config or learned from the engine; 1 when unknown)
//! times its weight.
//!
//! The hash's own pick keeps the flow while it has a free slot, so a client stays on its
//! instance (and its prefix cache) while there is room. Otherwise the candidate with the
//! lowest load relative to capacity wins, one with a free slot before one without; the
//! hash's pick is weighed without this flow, so it wins ties and keeps the flow while it is
//! at most one flow above the best.
//!
//! Verifier-friendly on purpose: the decision does not depend on the address family (only
//! the final lookup does), candidates are gathered before they are scored, and each score
//! is one `u64` from straight-line code.

use lb_common::{DEFAULT_CHOICES, MAX_CHOICES, MAX_MEMBERS, Service, fmix64, maglev_index};

use crate::{
    family::Family,
    flows::live_flows,
    maps::{BACKEND_LOAD, BACKENDS, MAGLEV, MEMBERS, SCHED},
};

/// A backend as one family's data path uses it: its address in that family, and its port.
#[derive(Clone, Copy)]
pub struct Target<A> {
    pub addr_be: A,
    pub port_be: u16,
}

/// The backend in the service's Maglev slot for `hash`; `None` for an unprogrammed slot.
#[inline(always)]
pub fn maglev_pick<F: Family>(service: &Service, hash: u32) -> Option<(u32, Target<F::Addr>)> {
    let id = *MAGLEV.get(maglev_index(service, hash))?;
    Some((id, lookup_backend::<F>(id)?))
}

/// A programmed backend of family `F`; `None` for id 0, for removed slots, and for a
/// backend of the other family (the daemon never mixes them in one VIP).
#[inline(always)]
pub fn lookup_backend<F: Family>(id: u32) -> Option<Target<F::Addr>> {
    let backend = *BACKENDS.get(id)?;
    if id == 0 || backend.is_unset() {
        return None;
    }
    Some(Target {
        addr_be: F::backend_addr(id, &backend)?,
        port_be: backend.port_be,
    })
}

/// What a new flow gets.
pub enum Decision<A> {
    /// This backend; `moved`: not the consistent hash's own pick.
    Chosen {
        id: u32,
        target: Target<A>,
        moved: bool,
    },
    /// Every candidate is at its cap.
    Full,
    /// No backend takes new flows.
    Empty,
}

/// `decide`'s answer before the family's lookup.
const CHOSE_NONE: u64 = 0;
/// Set with an id: the hash's own pick.
const CHOSE_PRIMARY: u64 = 1 << 32;
/// Every candidate was at its cap.
const CHOSE_FULL: u64 = 1 << 33;

/// A score no candidate has: out of the table, or absent.
const UNUSABLE: u64 = u64::MAX;
/// At its cap.
const AT_CAP: u64 = u64::MAX - 1;
/// Added to the score of a candidate without a free slot: any with one wins.
const NO_ROOM: u64 = 1 << 62;
/// Load is scaled by this before it is divided by capacity.
const LOAD_SHIFT: u32 = 24;

#[inline(always)]
pub fn decide<F: Family>(service: &Service, hash: u32, now: u64) -> Decision<F::Addr> {
    let chose = gpulb_choose(service.id, service.table_size, hash, now);
    let id = chose as u32;
    if id == 0 {
        return if chose & CHOSE_FULL != 0 {
            Decision::Full
        } else {
            Decision::Empty
        };
    }
    match lookup_backend::<F>(id) {
        Some(target) => Decision::Chosen {
            id,
            target,
            moved: chose & CHOSE_PRIMARY == 0,
        },
        None => Decision::Empty,
    }
}

/// The chosen backend id in the low 32 bits (0: none), with `CHOSE_*` flags above.
///
/// A global BPF function (BTF linkage global): the verifier checks it once, on its own,
/// rather than again for every state a caller reaches it in, which the candidate loop would
/// multiply past the verifier's limit.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn gpulb_choose(service_id: u32, table_size: u32, hash: u32, now: u64) -> u64 {
    let service = Service {
        id: service_id,
        table_size,
    };
    if table_size == 0 {
        return CHOSE_NONE;
    }
    let service = &service;
    let sched = SCHED.get(service.id).copied().unwrap_or_default();
    let choices = if sched.choices == 0 {
        DEFAULT_CHOICES
    } else {
        sched.choices
    };
    let primary = MAGLEV
        .get(maglev_index(service, hash))
        .copied()
        .unwrap_or(0);
    let primary_score = score(primary, 0, now, sched.max_age_ns);
    if primary_score < NO_ROOM {
        return CHOSE_PRIMARY | primary as u64;
    }
    let mut best = primary;
    let mut best_score = primary_score;
    let mut full = primary_score == AT_CAP;
    let Some(members) = MEMBERS.get(service.id) else {
        return finish(best, best_score, primary, full);
    };
    let n = members.count;
    if n == 0 || n as usize > MAX_MEMBERS {
        return finish(best, best_score, primary, full);
    }
    // Another mix of the hash than Maglev's slot: where in the list to start.
    let start = (fmix64(hash as u64 ^ 0x5bd1_e995) as u32) % n;
    for k in 0..MAX_CHOICES {
        // Past `choices`, look further only while every backend seen is at its cap.
        if k >= n || (k >= choices && best_score < AT_CAP) {
            break;
        }
        let i = ((start + k) % n) as usize;
        if i >= MAX_MEMBERS {
            break;
        }
        let id = members.ids[i];
        if id == primary {
            continue;
        }
        let s = score(id, 1, now, sched.max_age_ns);
        full |= s == AT_CAP;
        if s < best_score {
            best = id;
            best_score = s;
        }
    }
    finish(best, best_score, primary, full)
}

#[inline(always)]
fn finish(best: u32, best_score: u64, primary: u32, full: bool) -> u64 {
    if best_score >= AT_CAP {
        return if full { CHOSE_FULL } else { CHOSE_NONE };
    }
    let flag = if best == primary { CHOSE_PRIMARY } else { 0 };
    flag | best as u64
}

/// A candidate's score, lower is better: `NO_ROOM` if it has no free slot, plus its load
/// after `extra` more flows relative to its capacity; `AT_CAP` or `UNUSABLE` when it cannot
/// take the flow.
#[inline(always)]
fn score(id: u32, extra: u64, now: u64, max_age_ns: u64) -> u64 {
    let Some(b) = BACKENDS.get(id) else {
        return UNUSABLE;
    };
    let (weight, max_flows) = (b.weight as u64, b.max_flows as u64);
    if id == 0 || b.is_unset() || !b.takes_new_flows() {
        return UNUSABLE;
    }
    let live = live_flows(id);
    if max_flows != 0 && live >= max_flows {
        return AT_CAP;
    }
    let mut inflight = live;
    let mut slots = 0;
    if let Some(e) = BACKEND_LOAD.get(id) {
        slots = e.slots as u64;
        if e.updated_ns != 0 && now.saturating_sub(e.updated_ns) <= max_age_ns {
            let engine = e.running as u64 + e.waiting as u64;
            let kv = e.kv_permille as u64 * slots / 1000 + e.waiting as u64;
            inflight = max(inflight, max(engine, kv));
        }
    }
    let capacity = max(slots, 1) * max(weight, 1);
    let load = ((inflight + extra) << LOAD_SHIFT) / capacity;
    let room = slots != 0 && inflight < capacity;
    if room { load } else { NO_ROOM | load }
}

#[inline(always)]
fn max(a: u64, b: u64) -> u64 {
    if a > b { a } else { b }
}
