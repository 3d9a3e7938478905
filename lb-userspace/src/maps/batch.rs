//! Batch reads and writes of an array map of `u32` (`BPF_MAP_LOOKUP_BATCH`,
//! `BPF_MAP_UPDATE_BATCH`, kernel 5.6+): one system call for thousands of Maglev slots
//! instead of one per slot. aya 0.14 has no batch API, so this is the raw `bpf()` call.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::maps::{Array, IterableMap as _, MapData};

/// `bpf_cmd` numbers (include/uapi/linux/bpf.h).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// The `batch` member of `union bpf_attr`. The kernel reads `size_of::<BatchAttr>()` bytes
/// and zero-fills the rest of its union.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}
const _: () = assert!(size_of::<BatchAttr>() == 56);

/// Slots per call: the kernel copies each one and may reschedule between them, so a bound
/// keeps one call short and the buffers small.
const CHUNK: usize = 16384;

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("batch {op} failed at index {at} after {done} of {of} slots")]
    Call {
        op: &'static str,
        at: u32,
        done: u32,
        of: usize,
        #[source]
        source: io::Error,
    },
    #[error("batch read from index {from} got {got} slots, not the ones after it")]
    Short { from: u32, got: u32 },
}

/// Runs a batch command on `map`, whose `count` keys and values `attr` points to.
///
/// # Safety
/// `attr.keys` and `attr.values` point to `attr.count` live `u32` each, writable for a
/// lookup, and `attr.in_batch`/`attr.out_batch` are null or point to a live `u32`.
#[expect(
    unsafe_code,
    reason = "the bpf() system call has no safe wrapper in aya 0.14"
)]
unsafe fn bpf(
    cmd: libc::c_long,
    map: &Array<MapData, u32>,
    attr: &mut BatchAttr,
) -> io::Result<()> {
    attr.map_fd = map.map().fd().as_fd().as_raw_fd() as u32;
    // SAFETY: `attr` is a valid, writable `BatchAttr` of the size passed. The map is a
    // `BPF_MAP_TYPE_ARRAY` with 4-byte keys and values (aya's `Array::try_from` checked
    // both), so the kernel reads or writes `count` of each, which the caller provides.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            size_of::<BatchAttr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Writes `values[i]` to index `keys[i]`.
#[expect(unsafe_code, reason = "calls `bpf`, with buffers of `count` u32")]
pub fn update(map: &Array<MapData, u32>, keys: &[u32], values: &[u32]) -> Result<(), BatchError> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    let of = keys.len();
    let mut done = 0;
    for (keys, values) in keys.chunks(CHUNK).zip(values.chunks(CHUNK)) {
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: keys.len() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `keys` and `values` hold `count` u32 each and outlive the call.
        if let Err(source) = unsafe { bpf(BPF_MAP_UPDATE_BATCH, map, &mut attr) } {
            // Past its checks the kernel writes back how many it wrote before the one that
            // failed; a call refused before them (bad descriptor, flags) leaves `count` as
            // it was, and wrote nothing.
            let written = if (attr.count as usize) < keys.len() {
                attr.count
            } else {
                0
            };
            return Err(BatchError::Call {
                op: "update",
                at: keys.get(written as usize).copied().unwrap_or_default(),
                done: done + written,
                of,
                source,
            });
        }
        done += keys.len() as u32;
    }
    Ok(())
}

/// Reads indexes `start..start + len`.
#[expect(unsafe_code, reason = "calls `bpf`, with buffers of `count` u32")]
pub fn lookup(map: &Array<MapData, u32>, start: u32, len: u32) -> Result<Vec<u32>, BatchError> {
    let mut out = Vec::with_capacity(len as usize);
    let mut keys = vec![0u32; CHUNK.min(len as usize)];
    let mut values = vec![0u32; keys.len()];
    while out.len() < len as usize {
        let next = start + out.len() as u32;
        let want = keys.len().min(len as usize - out.len());
        // The kernel starts after the key `in_batch` points to, or at index 0 without one.
        let after = next.wrapping_sub(1);
        let mut last = 0u32;
        let mut attr = BatchAttr {
            in_batch: if next == 0 {
                0
            } else {
                (&raw const after) as u64
            },
            out_batch: (&raw mut last) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: want as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `keys` and `values` hold at least `count` writable u32 each, `after` and
        // `last` are u32, and all outlive the call.
        match unsafe { bpf(BPF_MAP_LOOKUP_BATCH, map, &mut attr) } {
            Ok(()) => {}
            // The end of the map: `count` says how many it read before it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(source) => {
                return Err(BatchError::Call {
                    op: "lookup",
                    at: next,
                    done: out.len() as u32,
                    of: len as usize,
                    source,
                });
            }
        }
        let got = attr.count.min(want as u32);
        // An array's keys follow each other from the first; a first key other than `next`
        // (the kernel starts over at 0 past the end) or nothing read is an error.
        if got == 0 || keys[0] != next {
            return Err(BatchError::Short { from: next, got });
        }
        out.extend_from_slice(&values[..got as usize]);
    }
    Ok(out)
}
