//! Benchmark support for `cargo xtask bench datapath`; never attached to an interface.
//!
//! `BPF_PROG_TEST_RUN` with `repeat > 1` does not restore the packet between iterations, so a
//! program that rewrites it (gpulb's NAT, Katran's encapsulation) would see its own output
//! from the second iteration on. `gpulb_bench_wrap` moves the packet's start back and writes
//! the original packet back first, optionally gives it a fresh source (so that every
//! iteration is a new flow), and tail-calls `BENCH_PROGS[0]`. Its own cost is measured by
//! tail-calling `gpulb_noop`, and subtracted.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext as _,
    bindings::xdp_action,
    helpers::{bpf_xdp_adjust_head, bpf_xdp_store_bytes},
    macros::{map, xdp},
    maps::{Array, PerCpuArray, ProgramArray},
    programs::XdpContext,
};

/// Every benchmark packet is padded to this length (IPv6 + TCP headers fit).
const PKT_LEN: usize = 80;
/// Offsets of the IPv4 source address and the L4 source port in an untagged packet.
const SRC_ADDR_OFF: u32 = 26;
const SRC_PORT_OFF: u32 = 34;

/// [0]: the packet to restore. Written by the bench before each case.
#[map]
static BENCH_PKT: Array<[u8; PKT_LEN]> = Array::with_max_entries(1, 0);

/// [0]: 1 = give each iteration a new source address and port (new-flow case).
#[map]
static BENCH_CFG: Array<u32> = Array::with_max_entries(1, 0);

/// Per-CPU iteration counter that makes the fresh sources.
#[map]
static BENCH_SEQ: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

#[map]
static BENCH_PROGS: ProgramArray = ProgramArray::with_max_entries(1, 0);

#[xdp]
pub fn gpulb_noop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[xdp]
pub fn gpulb_bench_wrap(ctx: XdpContext) -> u32 {
    // A program that encapsulates (Katran's IPIP) moves the packet's start, and the test run
    // keeps it moved: move it back to PKT_LEN bytes. Called even when nothing moved, so the
    // calibration against `gpulb_noop` includes it.
    let grown = (ctx.data_end() - ctx.data()) as i32 - PKT_LEN as i32;
    // SAFETY: the context we were given; the helper checks the offset against the headroom.
    if unsafe { bpf_xdp_adjust_head(ctx.as_ptr().cast(), grown) } != 0 {
        return xdp_action::XDP_ABORTED;
    }
    let Some(pkt) = BENCH_PKT.get_ptr(0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: `pkt` points to a PKT_LEN-byte map value; the helper bounds-checks the packet.
    if unsafe { bpf_xdp_store_bytes(ctx.as_ptr().cast(), 0, pkt as *mut _, PKT_LEN as u32) } != 0 {
        return xdp_action::XDP_ABORTED;
    }
    if BENCH_CFG.get(0).copied() == Some(1) {
        if let Some(seq) = BENCH_SEQ.get_ptr_mut(0) {
            // SAFETY: per-CPU slot, no concurrent writer on this CPU.
            let n = unsafe {
                *seq = (*seq).wrapping_add(1);
                *seq
            };
            // 198.18.128.0/17 sources, ports 1024..=65535: distinct 5-tuples for 2^31 runs.
            let addr: u32 = (0xc612_8000 | ((n / 64512) & 0x7fff)).to_be();
            let port: u16 = (1024 + n % 64512) as u16;
            let port = port.to_be();
            // SAFETY: local values of the stated sizes; the helper bounds-checks the packet.
            unsafe {
                bpf_xdp_store_bytes(
                    ctx.as_ptr().cast(),
                    SRC_ADDR_OFF,
                    &addr as *const u32 as *mut _,
                    4,
                );
                bpf_xdp_store_bytes(
                    ctx.as_ptr().cast(),
                    SRC_PORT_OFF,
                    &port as *const u16 as *mut _,
                    2,
                );
            }
        }
    }
    // SAFETY: tail_call only returns on failure; the context is the one we were given.
    unsafe { BENCH_PROGS.tail_call(&ctx, 0) };
    xdp_action::XDP_ABORTED
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program that could reach a panic.
    unsafe { core::hint::unreachable_unchecked() }
}
