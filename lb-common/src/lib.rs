//! Types shared by the gpulb BPF programs (`lb-ebpf`) and userspace (`lb-userspace`).
//!
//! Every map value is `#[repr(C)]` with explicit padding and no `bool`, so the kernel and
//! userspace agree on the layout bit for bit. Fields ending in `_be` hold network byte order,
//! exactly as in the packet headers.
#![no_std]

/// Kernel-side map names. The static in lb-ebpf carries this name, and the pinned file under the
/// pin directory too. At most 15 bytes: the kernel truncates longer names.
pub mod maps {
    pub const SERVICES: &str = "SERVICES";
    pub const BACKENDS: &str = "BACKENDS";
    pub const MAGLEV: &str = "MAGLEV";
    pub const CONNS: &str = "CONNS";
    pub const REVNAT: &str = "REVNAT";
    pub const VIP_STATS: &str = "VIP_STATS";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const REASONS: &str = "REASONS";
    /// Every map the daemon pins; the CLI and the clean-up use this list.
    pub const ALL: [&str; 8] = [
        SERVICES,
        BACKENDS,
        MAGLEV,
        CONNS,
        REVNAT,
        VIP_STATS,
        BACKEND_STATS,
        REASONS,
    ];
}

/// Program names (the `#[xdp]`/`#[classifier]` function names in lb-ebpf).
pub mod programs {
    pub const INGRESS: &str = "gpulb_ingress";
    pub const EGRESS: &str = "gpulb_egress";
}

/// VIPs per host. Service ids index `VIP_STATS` and the `MAGLEV` blocks.
pub const MAX_SERVICES: u32 = 32;
/// Backend slots. Id 0 is never used, so a zero `MAGLEV` slot means "not programmed".
pub const MAX_BACKENDS: u32 = 4096;
/// Largest Maglev table (a prime). Each service owns a block of this many `MAGLEV` slots,
/// whatever its own (smaller or equal, prime) table size.
pub const MAGLEV_MAX_SIZE: u32 = 65537;
/// Maglev table size when the config names none, as in the Maglev paper and Katran.
pub const MAGLEV_DEFAULT_SIZE: u32 = 65537;
/// `MAGLEV` entries: one block per service.
pub const MAGLEV_ENTRIES: u32 = MAX_SERVICES * MAGLEV_MAX_SIZE;
/// Conntrack entries when the config names none.
pub const CONNTRACK_DEFAULT_SIZE: u32 = 1 << 20;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// `Backend::flags`: no new flows are sent to it; its established flows continue.
pub const BACKEND_DRAINING: u16 = 1;

/// `SERVICES` key: what a client connects to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VipKey {
    pub addr_be: u32,
    pub port_be: u16,
    pub proto: u8, // PROTO_TCP or PROTO_UDP
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<VipKey>() == 8);

/// `SERVICES` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Service {
    /// Index into `VIP_STATS`; its Maglev block starts at `id * MAGLEV_MAX_SIZE`.
    pub id: u32,
    /// This service's Maglev table size (a prime ≤ `MAGLEV_MAX_SIZE`).
    pub table_size: u32,
}
const _: () = assert!(core::mem::size_of::<Service>() == 8);

/// `BACKENDS` value, indexed by backend id (≥ 1).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    pub addr_be: u32,
    /// Maglev weight; the data path does not read it, the CLI does.
    pub weight: u32,
    pub port_be: u16,
    /// Service id this backend belongs to.
    pub service: u16,
    pub flags: u16, // BACKEND_DRAINING
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<Backend>() == 16);

impl Backend {
    /// An all-zero slot: never programmed, or removed.
    pub const fn is_unset(&self) -> bool {
        self.addr_be == 0 && self.port_be == 0
    }
}

/// A 5-tuple in the direction of the packet. `CONNS` keys are client → VIP; `REVNAT` keys
/// are backend → client (the reply as the TC egress program sees it).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src_be: u32,
    pub dst_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 16);

/// `CONNS` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub backend: u32,
    pub service: u32,
    /// `bpf_ktime_get_ns()` at the last packet (CLOCK_MONOTONIC, boot time excluded).
    pub last_seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<Flow>() == 16);

/// `REVNAT` value: what the reply's source is rewritten to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RevNat {
    pub vip_be: u32,
    pub vport_be: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<RevNat>() == 8);

/// Per-CPU traffic counters (`VIP_STATS` by service id, `BACKEND_STATS` by backend id).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}
const _: () = assert!(core::mem::size_of::<Counters>() == 24);

/// Why a packet got its verdict: `REASONS` is indexed by these, one count per packet.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Not IPv4 (ARP, IPv6, LLDP, ...): passed untouched.
    PassNotIpv4 = 0,
    /// IPv4 but neither TCP nor UDP (ICMP, ...): passed untouched.
    PassNotTcpUdp = 1,
    /// An IPv4 fragment: passed untouched (only the first carries ports, so fragments
    /// cannot be NATed consistently).
    PassFragment = 2,
    /// TCP/UDP, but no VIP has this address, port and protocol.
    PassNotVip = 3,
    /// Shorter than its headers claim: passed untouched for the stack to judge.
    PassMalformed = 4,
    /// A new flow: Maglev picked the backend, conntrack recorded it, packet NATed.
    FwdNewFlow = 5,
    /// Conntrack knew the flow: packet NATed to its backend.
    FwdEstablished = 6,
    /// Mid-flow packet without conntrack entry: re-hashed through Maglev and recorded.
    FwdRehashed = 7,
    /// VIP with no backend in its Maglev table: dropped.
    DropNoBackend = 8,
    /// TC egress: a reply of a NATed flow, source restored to the VIP.
    EgressRevNat = 9,
    /// TC egress: not a NATed flow's reply, untouched.
    EgressPass = 10,
}

impl Reason {
    pub const COUNT: u32 = 11;
    pub const ALL: [Reason; Self::COUNT as usize] = [
        Reason::PassNotIpv4,
        Reason::PassNotTcpUdp,
        Reason::PassFragment,
        Reason::PassNotVip,
        Reason::PassMalformed,
        Reason::FwdNewFlow,
        Reason::FwdEstablished,
        Reason::FwdRehashed,
        Reason::DropNoBackend,
        Reason::EgressRevNat,
        Reason::EgressPass,
    ];

    /// Stable name for the CLI and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::PassNotIpv4 => "pass_not_ipv4",
            Reason::PassNotTcpUdp => "pass_not_tcp_udp",
            Reason::PassFragment => "pass_fragment",
            Reason::PassNotVip => "pass_not_vip",
            Reason::PassMalformed => "pass_malformed",
            Reason::FwdNewFlow => "fwd_new_flow",
            Reason::FwdEstablished => "fwd_established",
            Reason::FwdRehashed => "fwd_rehashed",
            Reason::DropNoBackend => "drop_no_backend",
            Reason::EgressRevNat => "egress_revnat",
            Reason::EgressPass => "egress_pass",
        }
    }
}

/// 64-bit finaliser of MurmurHash3: cheap in BPF (shifts, xors, two multiplies) and mixes
/// every input bit into every output bit.
#[inline(always)]
pub const fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// The hash of a flow that picks its Maglev slot. Shared so that userspace (tests, `gpulb
/// flows`) can predict what the kernel chooses.
#[inline(always)]
pub const fn flow_hash(key: &FlowKey) -> u32 {
    let addrs = ((key.src_be as u64) << 32) | key.dst_be as u64;
    let rest = ((key.sport_be as u64) << 24) | ((key.dport_be as u64) << 8) | key.proto as u64;
    let h = fmix64(addrs ^ fmix64(rest ^ 0x9e37_79b9_7f4a_7c15));
    (h ^ (h >> 32)) as u32
}

/// Index into `MAGLEV` for a flow hash in a service's block.
#[inline(always)]
pub const fn maglev_index(service: &Service, hash: u32) -> u32 {
    service.id * MAGLEV_MAX_SIZE + hash % service.table_size
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY (all below): repr(C), no implicit padding (sizes asserted above), every bit
    // pattern is a valid value.
    // SAFETY: see above.
    unsafe impl aya::Pod for VipKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for Service {}
    // SAFETY: see above.
    unsafe impl aya::Pod for Backend {}
    // SAFETY: see above.
    unsafe impl aya::Pod for FlowKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for Flow {}
    // SAFETY: see above.
    unsafe impl aya::Pod for RevNat {}
    // SAFETY: see above.
    unsafe impl aya::Pod for Counters {}
}
