//! The scheduler: one decision per new connection, made from what the kernel holds at that
//! moment, for XDP and the socket programs alike.
//!
//! Candidates: `Sched::choices` backends of the VIP's member list from a place a hash picks
//! (more, up to `MAX_CHOICES`, only while every one seen is at its cap), and, when sticky,
//! the backends in the VIP's Maglev slots for the flow's hash and a second hash of it (the
//! client address's under affinity). A backend at its cap (`max_flows`) or out of the table
//! is never chosen. Each candidate's load is its live flows (counted here, exact), or what
//! its engine reports running and waiting (or its KV-cache use in slots) when that is larger
//! and fresh. It has room while its load is below its batch slots (from the config or
//! learned from the engine; unknown: never); loads compare relative to slots (1 when
//! unknown) times weight.
//!
//! Sticky (`Sched::is_sticky`, while the engines' prefix caches pay for it): the hash's own
//! pick keeps the flow while it has a free slot and its load is at most a quarter of its
//! slots (at least one flow) above the least loaded candidate's, so a client stays on its
//! instance and its prefix cache while the load stays even; then, on the same terms, the
//! hash's second pick (a busy client lands on two instances); then the least loaded
//! candidate, the picks winning ties. Balanced (otherwise): the least loaded member, ties
//! rotating with each new flow (per CPU), as round-robin would: the oracle's rule.
//! Either way a candidate with a free slot beats one without, and when none has one the
//! lowest load wins: overflow spreads evenly. A backend that refused a connection within
//! the last second (`REFUSED_AT`, set at TC egress) comes after all others.
//!
//! Verifier-friendly on purpose: the decision does not depend on the address family (only
//! the final lookup does), and the decision and the score (of the members, and for the
//! fallback and slack checks) are global BPF functions: the verifier checks each once,
//! whatever state its caller is in. The two hash picks are scored inline, before the
//! members' loop: a call's return is dear (see `ingress`), and inlined in the loop the score
//! would multiply the states past the verifier's limit.

use lb_common::{DEFAULT_CHOICES, Flow, MAX_CHOICES, MAX_MEMBERS, Service, fmix64, maglev_index};

use crate::{
    family::Family,
    flows::live_flows,
    maps::{BACKEND_LOAD, BACKENDS, MAGLEV_V2, MEMBERS, REFUSED_AT, SCHED, VIP_STATS},
};

/// A backend as one family's data path uses it: its address in that family, its port, and
/// the generation of its id (what a conntrack entry records).
#[derive(Clone, Copy)]
pub struct Target<A> {
    pub addr_be: A,
    pub port_be: u16,
    pub generation: u8,
}

/// The backend in the service's Maglev slot for `hash`; `None` for an unprogrammed slot.
#[inline(always)]
pub fn maglev_pick<F: Family>(service: &Service, hash: u32) -> Option<(u32, Target<F::Addr>)> {
    let id = *MAGLEV_V2.get(maglev_index(service, hash))?;
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
        generation: backend.generation,
    })
}

/// The backend a conntrack entry names, if it still is the one the entry was made for: the
/// same service and generation. `None` when the slot was cleared or handed on.
#[inline(always)]
pub fn flow_backend<F: Family>(flow: &Flow) -> Option<Target<F::Addr>> {
    let backend = *BACKENDS.get(flow.backend)?;
    if flow.backend == 0
        || backend.is_unset()
        || backend.service != flow.service
        || backend.generation != flow.generation
    {
        return None;
    }
    Some(Target {
        addr_be: F::backend_addr(flow.backend, &backend)?,
        port_be: backend.port_be,
        generation: backend.generation,
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
/// Added (with `NO_ROOM`) to the score of a backend that refused a connection within
/// `REFUSED_HOLD_NS`: any other wins.
const REFUSING: u64 = 1 << 61;
/// The lowest score of a refusing backend.
const REFUSED_FLOOR: u64 = NO_ROOM | REFUSING;
/// How long a refusal keeps a backend last: longer than a dead instance's ejection takes
/// (pidfd: tens of milliseconds; a failed probe: its interval), short enough that a backend
/// that refused once (a full accept queue) is back soon.
const REFUSED_HOLD_NS: u64 = 1_000_000_000;
/// Mixed into the hash for its second pick.
const SECOND_PICK: u64 = 0x27d4_eb2f_1656_67c5;
/// Load is scaled by this before it is divided by capacity.
const LOAD_SHIFT: u32 = 24;

/// The scheduler's choice for a new flow: `hash` picks its Maglev slots (the client
/// address's under affinity); `spread` is added to where a balanced choice starts among
/// the members (which turns with every new flow of the VIP on this CPU, so that ties
/// rotate).
#[inline(always)]
pub fn decide<F: Family>(service: &Service, hash: u32, spread: u32, now: u64) -> Decision<F::Addr> {
    let chose = gpulb_choose(service.block, service.table_size, hash, spread, now);
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
pub extern "C" fn gpulb_choose(
    block: u32,
    table_size: u32,
    hash: u32,
    spread: u32,
    now: u64,
) -> u64 {
    // The block names the service too (a global function takes at most five arguments).
    let service = Service {
        id: Service::id_of_block(block),
        table_size,
        block,
        _pad: 0,
    };
    if table_size == 0 {
        return CHOSE_NONE;
    }
    let service = &service;
    let sched = SCHED.get(service.id).copied().unwrap_or_default();
    let sticky = sched.is_sticky();
    let choices = if sched.choices == 0 {
        DEFAULT_CHOICES
    } else {
        sched.choices
    };
    let max_age = sched.max_age_ns;
    let primary = MAGLEV_V2
        .get(maglev_index(service, hash))
        .copied()
        .unwrap_or(0);
    // Sticky: the hash's second pick too (another slot of the same table), where a client's
    // flows go when its first is busy, so a busy client spreads over two backends (and both
    // hold its prefix cache). Balanced: neither is weighed apart from the members, so ties
    // fall evenly.
    let (primary_score, second, second_score) = if sticky {
        let second = MAGLEV_V2
            .get(maglev_index(
                service,
                fmix64(hash as u64 ^ SECOND_PICK) as u32,
            ))
            .copied()
            .unwrap_or(0);
        let second_score = if second == primary {
            UNUSABLE
        } else {
            score(second, now, max_age, WITH_FLOW)
        };
        (
            score(primary, now, max_age, WITH_FLOW),
            second,
            second_score,
        )
    } else {
        (UNUSABLE, 0, UNUSABLE)
    };
    let picks_best = if second_score < primary_score {
        second_score
    } else {
        primary_score
    };
    let mut full = primary_score == AT_CAP || second_score == AT_CAP;
    let (mut best, mut best_score) = (0, UNUSABLE);
    if let Some(members) = MEMBERS.get(service.id) {
        let n = members.count;
        // Not `n <= MAX_MEMBERS` here: the compiler would then drop the index check below
        // as redundant, and the verifier, which cannot tell, refuses the access.
        if n != 0 {
            // Where in the list to start: by the client under sticky, so its flows weigh
            // the same members; balanced, one further with each new flow of the VIP on this
            // CPU, so that ties rotate as round-robin would.
            let start = if sticky {
                fmix64(hash as u64 ^ 0x5bd1_e995) as u32
            } else {
                let turn = VIP_STATS.get(service.id).map_or(0, |c| c.new_flows as u32);
                turn.wrapping_add(spread)
            } % n;
            // The place in the list, turned forward here rather than computed as
            // `(start + k) % n`: one division instead of one per candidate.
            let mut next = start;
            for k in 0..MAX_CHOICES {
                // Past `choices`, look further only while every backend seen is at its cap
                // or refusing.
                if k >= n
                    || (k >= choices && (best_score < REFUSED_FLOOR || picks_best < REFUSED_FLOOR))
                {
                    break;
                }
                // Masked rather than compared: the verifier of older kernels (6.1) loses a
                // compared bound when the compiler spills the register before the check.
                let i = next as usize & (MAX_MEMBERS - 1);
                next = if next + 1 == n { 0 } else { next + 1 };
                let id = members.ids[i];
                if sticky && (id == primary || id == second) {
                    continue;
                }
                let s = gpulb_score(id, now, max_age, WITH_FLOW);
                full |= s == AT_CAP;
                if s < best_score {
                    best = id;
                    best_score = s;
                }
            }
        }
    }
    if !sticky && best_score == UNUSABLE && primary != 0 {
        // No member list (yet): the hash's pick alone.
        best = primary;
        best_score = gpulb_score(primary, now, max_age, WITH_FLOW);
        full = best_score == AT_CAP;
    }
    // Sticky: the hash's picks win ties (the primary first). Balanced: their scores are
    // `UNUSABLE`, and these change nothing.
    if second_score <= best_score && second_score != UNUSABLE {
        best = second;
        best_score = second_score;
    }
    if primary_score <= best_score && primary_score != UNUSABLE {
        best = primary;
        best_score = primary_score;
    }
    if sticky && best != primary {
        // A pick keeps the flow while it has a free slot and its load is at most its slack
        // above the least loaded one's: a client stays put while the load stays even.
        if primary_score < NO_ROOM && gpulb_score(primary, now, max_age, LESS_SLACK) <= best_score {
            return CHOSE_PRIMARY | primary as u64;
        }
        if best != second
            && second_score < NO_ROOM
            && gpulb_score(second, now, max_age, LESS_SLACK) <= best_score
        {
            return second as u64;
        }
    }
    if best_score >= AT_CAP {
        return if full { CHOSE_FULL } else { CHOSE_NONE };
    }
    let flag = if best == primary { CHOSE_PRIMARY } else { 0 };
    flag | best as u64
}

const _: () = assert!(MAX_MEMBERS.is_power_of_two());

/// `gpulb_score`'s `mode`: the load with this flow.
const WITH_FLOW: u64 = 0;
/// `gpulb_score`'s `mode`: the load with this flow less the sticky slack, a quarter of the
/// backend's slots (at least one flow): how far a hash's pick may be above the least loaded
/// and keep a sticky client's flow.
const LESS_SLACK: u64 = 1;
/// The sticky slack is the slots divided by this.
const SLACK_SHARE: u64 = 4;

/// `score` as a global BPF function, like `gpulb_choose`: verified once, whatever its
/// caller.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn gpulb_score(id: u32, now: u64, max_age_ns: u64, mode: u64) -> u64 {
    score(id, now, max_age_ns, mode)
}

/// A candidate's score, lower is better: `NO_ROOM` if it has no free slot, plus its load
/// with this flow relative to its capacity (less its slack, in `LESS_SLACK` mode);
/// `AT_CAP` or `UNUSABLE` when it cannot take the flow.
#[inline(always)]
fn score(id: u32, now: u64, max_age_ns: u64, mode: u64) -> u64 {
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
    // Refused a connection just now (its process died, or stopped listening): last, behind
    // any backend that takes the flow, until ejected or the hold is over.
    let refused_at = REFUSED_AT.get(id).copied().unwrap_or(0);
    let refusing = refused_at != 0 && now.saturating_sub(refused_at) < REFUSED_HOLD_NS;
    let mut inflight = live;
    let mut slots = 0;
    if let Some(e) = BACKEND_LOAD.get(id) {
        slots = e.slots as u64;
        if e.updated_ns != 0 && now.saturating_sub(e.updated_ns) <= max_age_ns {
            // The engine's requests (or its KV cache's worth of slots) beyond the live flows
            // it served when it answered: load from elsewhere, on top of the flows now.
            let engine = e.running as u64 + e.waiting as u64;
            let kv = e.kv_permille as u64 * slots / 1000 + e.waiting as u64;
            inflight = live + max(engine, kv).saturating_sub(e.live_at_signal as u64);
        }
    }
    // A free slot is a real one; the weight scales the load comparison (a weight-2 backend
    // takes twice the load of a weight-1 one before they compare equal).
    let capacity = max(slots, 1) * max(weight, 1);
    let mut flows = inflight + 1;
    if mode == LESS_SLACK {
        flows = flows.saturating_sub(max(slots / SLACK_SHARE, 1));
    }
    let load = (flows << LOAD_SHIFT) / capacity;
    if refusing {
        NO_ROOM | REFUSING | load
    } else if slots != 0 && inflight < slots {
        load
    } else {
        NO_ROOM | load
    }
}

#[inline(always)]
fn max(a: u64, b: u64) -> u64 {
    if a > b { a } else { b }
}
