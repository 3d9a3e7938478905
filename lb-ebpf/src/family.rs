//! What differs between IPv4 and IPv6 in the data path: the maps of each, where the
//! addresses sit in the header, and how a socket's address is read and written. Everything
//! else (the choice of a backend, admission, NAT, conntrack) is written once, generic over
//! `Family`.

use aya_ebpf::bindings::bpf_sock_addr;
use lb_common::{
    Addr6, Address, AllowKey, AllowKey6, Backend, BackendVipOf, Flow, FlowKeyOf,
    RATE_V6_PREFIX_DEFAULT, RateKey, RateKey6, RevNatOf, Service, ServiceLimits, SockRevKey,
    SockRevKey6, VipKeyOf,
};

use crate::{
    admission::{is_allowed_in, is_over_rate_in},
    maps::{
        ALLOW, ALLOW6, BACKEND_ADDR6, CONNS_V3, CONNS6_V3, RATE_LIMIT, RATE_LIMIT6_V2, SERVICES_V2,
        SERVICES6_V2, SOCK_REVNAT, SOCK_REVNAT6, VIP_OF, VIP_OF6,
    },
};

pub trait Family {
    /// `u32` or `Addr6`: the header's address bytes as native words.
    type Addr: Address + Copy + 'static;
    /// 32-bit words in an address.
    const WORDS: usize;
    /// Offsets of the source and destination addresses in the IP header.
    const SRC_OFF: usize;
    const DST_OFF: usize;

    // The maps are reached through these (not returned): each map's type carries its own
    // size, which differs between the families.
    fn service(vip: &VipKeyOf<Self::Addr>) -> Option<Service>;
    /// The flow's conntrack entry, written in place.
    fn conn(flow: &FlowKeyOf<Self::Addr>) -> Option<*mut Flow>;
    /// Best effort (a flow without an entry stays with the consistent hash); `flags` as
    /// `bpf_map_update_elem`'s. Whether the entry was written.
    fn insert_conn(flow: &FlowKeyOf<Self::Addr>, value: &Flow, flags: u32) -> bool;
    fn remove_conn(flow: &FlowKeyOf<Self::Addr>);
    /// Backend (address, port, protocol) → its VIP, for the egress program.
    fn vip_of(backend: &VipKeyOf<Self::Addr>) -> Option<BackendVipOf<Self::Addr>>;
    /// The backend's address in this family; `None` for one of the other family.
    fn backend_addr(id: u32, backend: &Backend) -> Option<Self::Addr>;
    fn is_allowed(service_id: u32, src: &Self::Addr) -> bool;
    fn is_over_rate(
        service_id: u32,
        flow: &FlowKeyOf<Self::Addr>,
        limits: &ServiceLimits,
        now: u64,
    ) -> bool;
    /// The address as the header's 32-bit words in memory order; words past `WORDS` are 0.
    fn words(addr: &Self::Addr) -> [u32; 4];
    /// The same words in host order, for checksum arithmetic.
    #[inline(always)]
    fn host_words(addr: &Self::Addr) -> [u32; 4] {
        Self::words(addr).map(u32::from_be)
    }

    /// The destination (connect, sendmsg) or peer (getpeername, recvmsg) of a socket call.
    fn sock_ip(sa: *mut bpf_sock_addr) -> Self::Addr;
    fn set_sock_ip(sa: *mut bpf_sock_addr, addr: &Self::Addr);
    /// Records that the socket `cookie` was sent to (`addr`, `port_be`) instead of `vip`.
    fn remember_socket(cookie: u64, addr: &Self::Addr, port_be: u16, vip: &RevNatOf<Self::Addr>);
    fn socket_vip(cookie: u64, addr: &Self::Addr, port_be: u16) -> Option<RevNatOf<Self::Addr>>;
}

pub enum V4 {}
pub enum V6 {}

impl Family for V4 {
    type Addr = u32;
    const WORDS: usize = 1;
    const SRC_OFF: usize = 12;
    const DST_OFF: usize = 16;

    #[inline(always)]
    fn service(vip: &VipKeyOf<u32>) -> Option<Service> {
        // SAFETY: replaced whole by the daemon and (not preallocated) a replaced entry stays
        // intact until this program has finished; copied out at once.
        unsafe { SERVICES_V2.get(vip) }.copied()
    }
    #[inline(always)]
    fn conn(flow: &FlowKeyOf<u32>) -> Option<*mut Flow> {
        CONNS_V3.get_ptr_mut(flow)
    }
    #[inline(always)]
    fn insert_conn(flow: &FlowKeyOf<u32>, value: &Flow, flags: u32) -> bool {
        CONNS_V3.insert(flow, value, flags.into()).is_ok()
    }
    #[inline(always)]
    fn remove_conn(flow: &FlowKeyOf<u32>) {
        let _ = CONNS_V3.remove(flow);
    }
    #[inline(always)]
    fn vip_of(backend: &VipKeyOf<u32>) -> Option<BackendVipOf<u32>> {
        // SAFETY: copied out at once; written only by the daemon.
        unsafe { VIP_OF.get(backend) }.copied()
    }
    #[inline(always)]
    fn backend_addr(_id: u32, backend: &Backend) -> Option<u32> {
        (!backend.is_ipv6()).then_some(backend.addr_be)
    }
    #[inline(always)]
    fn is_allowed(service_id: u32, src: &u32) -> bool {
        let data = AllowKey {
            service: service_id,
            addr_be: *src,
        };
        is_allowed_in(&ALLOW, 32, data)
    }
    #[inline(always)]
    fn is_over_rate(
        service_id: u32,
        flow: &FlowKeyOf<u32>,
        limits: &ServiceLimits,
        now: u64,
    ) -> bool {
        let key = RateKey {
            src_be: flow.src_be,
            service: service_id,
        };
        is_over_rate_in(&RATE_LIMIT, &key, limits, now)
    }
    #[inline(always)]
    fn words(addr: &u32) -> [u32; 4] {
        [*addr, 0, 0, 0]
    }
    #[inline(always)]
    fn sock_ip(sa: *mut bpf_sock_addr) -> u32 {
        // SAFETY: the context the kernel passed; user_ip4 is readable in every v4 hook.
        unsafe { (*sa).user_ip4 }
    }
    #[inline(always)]
    fn set_sock_ip(sa: *mut bpf_sock_addr, addr: &u32) {
        // SAFETY: connect4/sendmsg4/getpeername4/recvmsg4 may write user_ip4.
        unsafe { (*sa).user_ip4 = *addr };
    }
    #[inline(always)]
    fn remember_socket(cookie: u64, addr: &u32, port_be: u16, vip: &RevNatOf<u32>) {
        let key = SockRevKey {
            cookie,
            addr_be: *addr,
            port_be,
            _pad: 0,
        };
        let _ = SOCK_REVNAT.insert(&key, vip, 0);
    }
    #[inline(always)]
    fn socket_vip(cookie: u64, addr: &u32, port_be: u16) -> Option<RevNatOf<u32>> {
        let key = SockRevKey {
            cookie,
            addr_be: *addr,
            port_be,
            _pad: 0,
        };
        // SAFETY: an 8-byte value written whole, copied out at once.
        unsafe { SOCK_REVNAT.get(&key) }.copied()
    }
}

impl Family for V6 {
    type Addr = Addr6;
    const WORDS: usize = 4;
    const SRC_OFF: usize = 8;
    const DST_OFF: usize = 24;

    #[inline(always)]
    fn service(vip: &VipKeyOf<Addr6>) -> Option<Service> {
        // SAFETY: replaced whole by the daemon and (not preallocated) a replaced entry stays
        // intact until this program has finished; copied out at once.
        unsafe { SERVICES6_V2.get(vip) }.copied()
    }
    #[inline(always)]
    fn conn(flow: &FlowKeyOf<Addr6>) -> Option<*mut Flow> {
        CONNS6_V3.get_ptr_mut(flow)
    }
    #[inline(always)]
    fn insert_conn(flow: &FlowKeyOf<Addr6>, value: &Flow, flags: u32) -> bool {
        CONNS6_V3.insert(flow, value, flags.into()).is_ok()
    }
    #[inline(always)]
    fn remove_conn(flow: &FlowKeyOf<Addr6>) {
        let _ = CONNS6_V3.remove(flow);
    }
    #[inline(always)]
    fn vip_of(backend: &VipKeyOf<Addr6>) -> Option<BackendVipOf<Addr6>> {
        // SAFETY: copied out at once; written only by the daemon.
        unsafe { VIP_OF6.get(backend) }.copied()
    }
    #[inline(always)]
    fn backend_addr(id: u32, backend: &Backend) -> Option<Addr6> {
        if !backend.is_ipv6() {
            return None;
        }
        BACKEND_ADDR6.get(id).copied()
    }
    #[inline(always)]
    fn is_allowed(service_id: u32, src: &Addr6) -> bool {
        let data = AllowKey6 {
            service: service_id,
            addr_be: *src,
        };
        is_allowed_in(&ALLOW6, 128, data)
    }
    #[inline(always)]
    fn is_over_rate(
        service_id: u32,
        flow: &FlowKeyOf<Addr6>,
        limits: &ServiceLimits,
        now: u64,
    ) -> bool {
        let prefix = match limits.v6_prefix {
            0 => RATE_V6_PREFIX_DEFAULT,
            p => p,
        };
        let key = RateKey6 {
            src_be: prefix_of(&flow.src_be, prefix),
            service: service_id,
        };
        is_over_rate_in(&RATE_LIMIT6_V2, &key, limits, now)
    }
    #[inline(always)]
    fn words(addr: &Addr6) -> [u32; 4] {
        *addr
    }
    #[inline(always)]
    fn sock_ip(sa: *mut bpf_sock_addr) -> Addr6 {
        // SAFETY: the context the kernel passed; user_ip6 is readable in every v6 hook, one
        // 32-bit word at a time (volatile keeps the loads that size).
        unsafe {
            let ip = &raw const (*sa).user_ip6;
            [0, 1, 2, 3].map(|i| core::ptr::read_volatile(&raw const (*ip)[i]))
        }
    }
    #[inline(always)]
    fn set_sock_ip(sa: *mut bpf_sock_addr, addr: &Addr6) {
        // SAFETY: the v6 hooks may write user_ip6, in 32-bit words.
        unsafe {
            let ip = &raw mut (*sa).user_ip6;
            for (i, word) in addr.iter().enumerate() {
                core::ptr::write_volatile(&raw mut (*ip)[i], *word);
            }
        }
    }
    #[inline(always)]
    fn remember_socket(cookie: u64, addr: &Addr6, port_be: u16, vip: &RevNatOf<Addr6>) {
        let key = SockRevKey6 {
            cookie,
            addr_be: *addr,
            port_be,
            _pad: [0; 3],
        };
        let _ = SOCK_REVNAT6.insert(&key, vip, 0);
    }
    #[inline(always)]
    fn socket_vip(cookie: u64, addr: &Addr6, port_be: u16) -> Option<RevNatOf<Addr6>> {
        let key = SockRevKey6 {
            cookie,
            addr_be: *addr,
            port_be,
            _pad: [0; 3],
        };
        // SAFETY: a 20-byte value written whole; a racing rewrite of the same socket writes
        // the same VIP.
        unsafe { SOCK_REVNAT6.get(&key) }.copied()
    }
}

/// The first `len` bits of an IPv6 address (header words), the rest zeroed.
#[inline(always)]
fn prefix_of(addr: &Addr6, len: u32) -> Addr6 {
    let mut out = [0u32; 4];
    for (i, word) in out.iter_mut().enumerate() {
        let bits = len.saturating_sub(32 * i as u32).min(32);
        let mask = if bits == 0 {
            0
        } else {
            u32::MAX << (32 - bits)
        };
        *word = addr[i] & mask.to_be();
    }
    out
}
