//! Batch reads and writes of an array map (`BPF_MAP_LOOKUP_BATCH`, `BPF_MAP_UPDATE_BATCH`,
//! kernel 5.6+): one system call for a whole Maglev block instead of one per slot. aya 0.14
//! has no batch API, so this is the raw `bpf()` call.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

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

#[expect(unsafe_code, reason = "the bpf() system call has no safe wrapper here")]
fn bpf(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid, writable `BatchAttr` of the size passed; the buffers it
    // points to are live for the call and sized for `count` keys and values (the callers).
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

/// Writes `values[i]` to index `keys[i]` of an array map of `u32` values.
pub(super) fn update(fd: BorrowedFd<'_>, keys: &[u32], values: &[u32]) -> io::Result<()> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    for (keys, values) in keys.chunks(CHUNK).zip(values.chunks(CHUNK)) {
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: keys.len() as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        bpf(BPF_MAP_UPDATE_BATCH, &mut attr)?;
        if attr.count as usize != keys.len() {
            return Err(io::Error::other(format!(
                "batch update wrote {} of {} slots",
                attr.count,
                keys.len()
            )));
        }
    }
    Ok(())
}

/// Reads indexes `start..start + len` of an array map of `u32` values.
pub(super) fn lookup(fd: BorrowedFd<'_>, start: u32, len: u32) -> io::Result<Vec<u32>> {
    let mut out = Vec::with_capacity(len as usize);
    let mut keys = vec![0u32; CHUNK.min(len as usize)];
    let mut values = vec![0u32; keys.len()];
    while out.len() < len as usize {
        let next = start + out.len() as u32;
        let want = keys.len().min(len as usize - out.len());
        // The kernel starts after the key `in_batch` points to, or at index 0 without one.
        let after = next.wrapping_sub(1);
        let mut out_batch = 0u32;
        let mut attr = BatchAttr {
            in_batch: if next == 0 {
                0
            } else {
                (&raw const after) as u64
            },
            out_batch: (&raw mut out_batch) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: want as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        match bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) {
            Ok(()) => {}
            // The end of the map: `count` says how many it read before it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
        let got = attr.count as usize;
        if got == 0 || keys[0] != next {
            return Err(io::Error::other(format!(
                "batch lookup from index {next} read {got} slots"
            )));
        }
        out.extend_from_slice(&values[..got.min(want)]);
    }
    Ok(out)
}
