//! Counters, bumped once per packet at the verdict (reasons) or per forwarded packet
//! (traffic). All per-CPU: no other writer runs on this CPU meanwhile.

use aya_ebpf::btf_maps::PerCpuArray;
use lb_common::{AdmitCounters, Counters, Reason};

use crate::maps::{ADMIT_STATS, REASONS_V3};

#[inline(always)]
pub fn count_reason(reason: Reason) {
    if let Some(n) = REASONS_V3.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot; no other writer runs on this CPU meanwhile.
        unsafe { *n += 1 };
    }
}

#[inline(always)]
pub fn count_traffic<const N: usize, const F: usize>(
    map: &PerCpuArray<Counters, N, F>,
    index: u32,
    bytes: u64,
    new_flow: bool,
) {
    if let Some(c) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU slot; no other writer runs on this CPU meanwhile.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            (*c).new_flows += new_flow as u64;
        }
    }
}

#[inline(always)]
pub fn count_admission(service_id: u32, field: impl FnOnce(&mut AdmitCounters) -> &mut u64) {
    if let Some(c) = ADMIT_STATS.get_ptr_mut(service_id) {
        // SAFETY: per-CPU slot; no other writer runs on this CPU meanwhile.
        unsafe { *field(&mut *c) += 1 };
    }
}
