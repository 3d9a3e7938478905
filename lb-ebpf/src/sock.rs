//! Socket-level balancing of this host's own clients (cgroup sock_addr hooks): connect and
//! sendmsg point a VIP socket at a backend before any packet exists; getpeername and recvmsg
//! show the VIP again.

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns},
    programs::SockAddrContext,
};
use lb_common::{Reason, RevNatOf, VipKeyOf, fmix64};

use crate::{
    family::Family,
    maps::{BACKEND_STATS, SOCK_NETNS, VIP_STATS},
    sched::{Decision, decide},
    stats::{count_reason, count_traffic},
};

#[inline(always)]
fn is_daemon_netns(ctx: &SockAddrContext) -> bool {
    let Some(&ours) = SOCK_NETNS.get(0) else {
        return false;
    };
    // SAFETY: the helper only reads the socket's namespace.
    ours != 0 && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == ours
}

#[inline(always)]
fn socket_cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: the helper reads the socket's cookie (assigned on first use).
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// The scheduler's choice for the socket (its cookie is the flow's hash): the same decision
/// as XDP's for a client from the network. Admission control is for those clients; local
/// sockets skip it.
#[inline(always)]
pub fn sock_forward<F: Family>(ctx: &SockAddrContext) {
    if !is_daemon_netns(ctx) {
        return;
    }
    let sa = ctx.sock_addr;
    // SAFETY: the context the kernel passed; these fields are readable in connect/sendmsg.
    let (port, proto) = unsafe { ((*sa).user_port, (*sa).protocol) };
    let ip = F::sock_ip(sa);
    let vip = VipKeyOf {
        addr_be: ip,
        port_be: port as u16,
        proto: proto as u8,
        _pad: 0,
    };
    let Some(service) = F::service(&vip) else {
        return;
    };
    let cookie = socket_cookie(ctx);
    let hash = fmix64(cookie) as u32;
    // SAFETY: the helper has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let Decision::Chosen {
        id: backend_id,
        target: backend,
        ..
    } = decide::<F>(&service, hash, hash, now)
    // (no new-flow count rotates ties here)
    else {
        return; // no backend with room: the connect goes to the VIP, as without gpulb
    };
    let revnat = RevNatOf {
        vip_be: ip,
        vport_be: port as u16,
        _pad: 0,
    };
    F::remember_socket(cookie, &backend.addr_be, backend.port_be, &revnat);
    F::set_sock_ip(sa, &backend.addr_be);
    // SAFETY: connect/sendmsg may write the destination port.
    unsafe { (*sa).user_port = backend.port_be as u32 };
    count_traffic(&VIP_STATS, service.id, 0, true);
    count_traffic(&BACKEND_STATS, backend_id, 0, true);
    count_reason(Reason::SockBalanced);
}

#[inline(always)]
pub fn sock_reverse<F: Family>(ctx: &SockAddrContext) {
    if !is_daemon_netns(ctx) {
        return;
    }
    let sa = ctx.sock_addr;
    // SAFETY: the context the kernel passed; readable in getpeername/recvmsg.
    let port = unsafe { (*sa).user_port };
    let ip = F::sock_ip(sa);
    if let Some(revnat) = F::socket_vip(socket_cookie(ctx), &ip, port as u16) {
        F::set_sock_ip(sa, &revnat.vip_be);
        // SAFETY: getpeername/recvmsg may write the address shown.
        unsafe { (*sa).user_port = revnat.vport_be as u32 };
    }
}
