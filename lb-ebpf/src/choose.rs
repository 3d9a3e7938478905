//! The backend for a new flow: the VIP's Maglev slot for the flow's hash, and, where caps or
//! bounded load apply, the first candidate with room when that pick has none.

use lb_common::{Candidates, MAX_CANDIDATES, Service, ServiceLimits, maglev_index};

use crate::{
    family::Family,
    flows::live_flows,
    maps::{BACKENDS, CANDIDATES, MAGLEV},
};

/// A backend as one family's data path uses it: its address in that family, and its port.
#[derive(Clone, Copy)]
pub struct Target<A> {
    pub addr_be: A,
    pub port_be: u16,
    pub max_flows: u16,
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
        max_flows: backend.max_flows,
    })
}

/// The backend for a new flow of a VIP whose backends have caps or a load bound: the Maglev
/// pick if it has room, else the first candidate with room, walked from a place the flow's
/// hash picks (so one client's flows try them in the same order). `true` with a backend
/// other than the pick; `None` when every backend is full.
#[inline(always)]
pub fn pick_with_room<F: Family>(
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
