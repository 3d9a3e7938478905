//! gpulb data path: the program entry points. Each maps its `try_*` step's verdict to an
//! action and counts it once.
//!
//! `gpulb_ingress` (XDP) picks a backend for each new flow to a VIP with the VIP's Maglev
//! table, records it in the `CONNS` LRU, and NATs the destination to the local backend before
//! passing the packet to the stack. `gpulb_egress` (TC) rewrites the replies of those flows,
//! and only those, back to the VIP. The cgroup programs balance this host's own sockets.
#![no_std]
#![no_main]
// `atomic_xadd`: core's atomic types have no fetch_add on the BPF target.
#![feature(core_intrinsics)]
// `asm!` on BPF: packet loads and stores of any alignment in one instruction (`parse`).
#![feature(asm_experimental_arch)]
#![expect(internal_features, reason = "core_intrinsics, for atomic_xadd")]

mod admission;
mod egress;
mod family;
mod flood;
mod flows;
mod ingress;
mod maps;
mod nat;
mod parse;
mod sched;
mod sock;
mod stats;

use aya_ebpf::{
    bindings::{TC_ACT_UNSPEC, xdp_action},
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};
use family::{V4, V6};
use lb_common::Reason;
use sock::{sock_forward, sock_reverse};
use stats::count_reason;

#[xdp]
pub fn gpulb_ingress(ctx: XdpContext) -> u32 {
    let reason = match ingress::try_ingress(&ctx) {
        Ok(reason) | Err(reason) => reason,
    };
    count_reason(reason);
    match reason {
        Reason::DropNoBackend | Reason::RefuseDrop => xdp_action::XDP_DROP,
        Reason::RefuseReset => xdp_action::XDP_TX,
        _ => xdp_action::XDP_PASS,
    }
}

#[classifier]
pub fn gpulb_egress(ctx: TcContext) -> i32 {
    let reason = match egress::try_egress(&ctx) {
        Ok(reason) | Err(reason) => reason,
    };
    count_reason(reason);
    // No verdict: the packet goes on to the next TC filter or TCX program (other tools'),
    // then out. TC_ACT_OK would end the chain and skip theirs.
    TC_ACT_UNSPEC
}

/// A process on this host connects to a VIP: it never crosses the NIC's XDP hook, so its
/// socket is pointed at a backend here, before the first packet.
#[cgroup_sock_addr(connect4)]
pub fn gpulb_connect4(ctx: SockAddrContext) -> i32 {
    sock_forward::<V4>(&ctx);
    1 // let the connect proceed
}

/// The same per datagram, for unconnected UDP sockets.
#[cgroup_sock_addr(sendmsg4)]
pub fn gpulb_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock_forward::<V4>(&ctx);
    1
}

/// getpeername() of a balanced socket shows the VIP, as the application connected to.
#[cgroup_sock_addr(getpeername4)]
pub fn gpulb_getpeername4(ctx: SockAddrContext) -> i32 {
    sock_reverse::<V4>(&ctx);
    1
}

/// recvfrom() on a balanced UDP socket shows the VIP as the sender.
#[cgroup_sock_addr(recvmsg4)]
pub fn gpulb_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock_reverse::<V4>(&ctx);
    1
}

#[cgroup_sock_addr(connect6)]
pub fn gpulb_connect6(ctx: SockAddrContext) -> i32 {
    sock_forward::<V6>(&ctx);
    1
}

#[cgroup_sock_addr(sendmsg6)]
pub fn gpulb_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock_forward::<V6>(&ctx);
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn gpulb_getpeername6(ctx: SockAddrContext) -> i32 {
    sock_reverse::<V6>(&ctx);
    1
}

#[cgroup_sock_addr(recvmsg6)]
pub fn gpulb_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock_reverse::<V6>(&ctx);
    1
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program that could reach a panic.
    unsafe { core::hint::unreachable_unchecked() }
}
