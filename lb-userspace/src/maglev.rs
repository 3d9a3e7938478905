//! Weighted Maglev (Eisenbud et al., NSDI 2016; weights as in Katran's MaglevV2): pure code
//! from backends and weights to a lookup table, and the diff between two tables.
//!
//! Each backend walks its own permutation of the slots (offset and skip from a hash of its
//! address), and backends take turns claiming their next free slot; a backend of weight w
//! gets w/max_weight turns per round. The permutations depend only on each backend's
//! address, so adding or removing one backend moves few of the others' slots.

use std::collections::BTreeMap;

use lb_common::fmix64;

/// A table slot with no backend (every weight was 0).
pub const EMPTY: u32 = 0;

const OFFSET_SEED: u64 = 0x5851_f42d_4c95_7f2d;
const SKIP_SEED: u64 = 0x1405_7b7e_f767_814f;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaglevBackend {
    /// Written into the table (a BACKENDS id, ≥ 1).
    pub id: u32,
    /// Stable identity of the backend (its address and port): drives its permutation.
    pub key: u64,
    pub weight: u32,
}

/// The permutation identity of a backend address.
pub fn backend_key(addr: std::net::IpAddr, port: u16) -> u64 {
    let bits = match addr {
        // IPv4: the address itself, as before IPv6 (tables stay the same across upgrades).
        std::net::IpAddr::V4(a) => u64::from(u32::from(a)),
        std::net::IpAddr::V6(a) => {
            let a = u128::from(a);
            lb_common::fmix64((a >> 64) as u64 ^ lb_common::fmix64(a as u64))
        }
    };
    (bits << 16) | u64::from(port)
}

/// Builds a table of `size` slots (a prime). Backends of weight 0 get no slot; if every
/// weight is 0 the table is all `EMPTY`.
pub fn build_table(backends: &[MaglevBackend], size: u32) -> Vec<u32> {
    let m = u64::from(size);
    let mut table = vec![EMPTY; size as usize];
    // Sorted by key: the table depends on the set of backends, not on config order.
    let mut active: Vec<MaglevBackend> =
        backends.iter().copied().filter(|b| b.weight > 0).collect();
    active.sort_by_key(|b| b.key);
    let Some(max_weight) = active.iter().map(|b| u64::from(b.weight)).max() else {
        return table;
    };
    let offset: Vec<u64> = active
        .iter()
        .map(|b| fmix64(b.key ^ OFFSET_SEED) % m)
        .collect();
    let skip: Vec<u64> = active
        .iter()
        .map(|b| fmix64(b.key ^ SKIP_SEED) % (m - 1) + 1)
        .collect();
    let mut next = vec![0u64; active.len()];
    let mut credit = vec![0u64; active.len()];
    let mut filled = 0u64;
    loop {
        for (i, b) in active.iter().enumerate() {
            credit[i] += u64::from(b.weight);
            if credit[i] < max_weight {
                continue;
            }
            credit[i] -= max_weight;
            // Walk this backend's permutation to its next free slot. `m` is prime and
            // 0 < skip < m, so the walk visits every slot and terminates.
            let slot = loop {
                let c = ((offset[i] + next[i] * skip[i]) % m) as usize;
                next[i] += 1;
                if table[c] == EMPTY {
                    break c;
                }
            };
            table[slot] = b.id;
            filled += 1;
            if filled == m {
                return table;
            }
        }
    }
}

/// Slots whose backend differs, as (slot, new backend id): what must be written to move
/// from `old` to `new`.
pub fn diff(old: &[u32], new: &[u32]) -> Vec<(u32, u32)> {
    assert_eq!(old.len(), new.len(), "tables of different sizes");
    old.iter()
        .zip(new)
        .enumerate()
        .filter(|(_, (o, n))| o != n)
        .map(|(slot, (_, &n))| (slot as u32, n))
        .collect()
}

/// Slots held by each backend id.
pub fn slot_counts(table: &[u32]) -> BTreeMap<u32, usize> {
    let mut counts = BTreeMap::new();
    for &id in table.iter().filter(|&&id| id != EMPTY) {
        *counts.entry(id).or_insert(0) += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const M: u32 = 65537;

    fn backends(weights: &[u32]) -> Vec<MaglevBackend> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| MaglevBackend {
                id: i as u32 + 1,
                key: backend_key(
                    Ipv4Addr::new(198, 18, 0, 1 + (i / 200) as u8).into(),
                    8000 + i as u16,
                ),
                weight,
            })
            .collect()
    }

    /// Each backend's share of the table is within `tolerance` (absolute, as a fraction of
    /// the table) of weight / total weight.
    fn assert_shares(weights: &[u32], tolerance: f64) {
        let bs = backends(weights);
        let table = build_table(&bs, M);
        assert!(table.iter().all(|&id| id != EMPTY), "every slot filled");
        let counts = slot_counts(&table);
        let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
        for b in &bs {
            let share = *counts.get(&b.id).unwrap_or(&0) as f64 / f64::from(M);
            let want = f64::from(b.weight) / total;
            assert!(
                (share - want).abs() <= tolerance,
                "backend {} weight {}: share {share:.4}, want {want:.4} ± {tolerance}",
                b.id,
                b.weight
            );
        }
    }

    #[test]
    fn equal_weights_spread_within_one_percent() {
        for n in [2, 4, 7, 10, 100] {
            assert_shares(&vec![1; n], 0.01);
        }
    }

    #[test]
    fn unequal_weights_spread_within_one_percent() {
        assert_shares(&[1, 2, 3, 4], 0.01);
        assert_shares(&[100, 50, 25, 1], 0.01);
        assert_shares(&[5, 5, 5, 1, 1, 1, 10, 3], 0.01);
    }

    #[test]
    fn zero_weight_gets_no_slot() {
        let bs = backends(&[1, 0, 1]);
        let counts = slot_counts(&build_table(&bs, M));
        assert_eq!(counts.get(&2), None);
        assert_eq!(counts.values().sum::<usize>(), M as usize);
    }

    #[test]
    fn all_zero_weights_leave_table_empty() {
        let table = build_table(&backends(&[0, 0]), 251);
        assert!(table.iter().all(|&id| id == EMPTY));
    }

    #[test]
    fn removing_one_of_n_moves_at_most_one_nth_plus_two_percent() {
        for n in [4usize, 10, 50] {
            let all = backends(&vec![1; n]);
            let before = build_table(&all, M);
            for removed in [0, n / 2, n - 1] {
                let rest: Vec<_> = all
                    .iter()
                    .copied()
                    .filter(|b| b.id != all[removed].id)
                    .collect();
                let after = build_table(&rest, M);
                // Slots that belonged to the removed backend must move; count the others.
                let moved = diff(&before, &after).len() as f64 / f64::from(M);
                let bound = 1.0 / n as f64 + 0.02;
                assert!(moved <= bound, "n={n}: moved {moved:.4} > {bound:.4}");
                let others_moved = before
                    .iter()
                    .zip(&after)
                    .filter(|(b, a)| **b != all[removed].id && b != a)
                    .count() as f64
                    / f64::from(M);
                assert!(
                    others_moved <= 0.02,
                    "n={n}: {others_moved:.4} of others' slots moved"
                );
            }
        }
    }

    #[test]
    fn table_ignores_config_order() {
        let mut bs = backends(&[1, 2, 3]);
        let a = build_table(&bs, 251);
        bs.reverse();
        assert_eq!(a, build_table(&bs, 251));
    }

    #[test]
    fn diff_lists_changed_slots_only() {
        assert_eq!(diff(&[1, 2, 3, 4], &[1, 5, 3, 6]), vec![(1, 5), (3, 6)]);
        assert!(diff(&[1, 2], &[1, 2]).is_empty());
    }
}
