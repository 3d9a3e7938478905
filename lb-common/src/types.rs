//! Map keys and values. Every one is `#[repr(C)]` with explicit padding and no `bool`, so
//! the kernel and userspace agree on the layout bit for bit; fields ending in `_be` hold
//! network byte order, exactly as in the packet headers.

use crate::{
    BACKEND_DRAINING, BACKEND_IPV6, BACKEND_OUT, FLOW_COUNTED, FLOW_DONE, LIMIT_AFFINITY,
    LIMIT_ALLOWLIST, LIMIT_REFUSE_RST, MAX_MEMBERS, SCHED_STICKY,
};

/// An IPv6 address as the data path keys it: the header's 16 bytes as four native words.
pub type Addr6 = [u32; 4];

/// `SERVICES` (`VipKey`) and `SERVICES6` (`VipKey6`) key: what a client connects to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VipKeyOf<A> {
    pub addr_be: A,
    pub port_be: u16,
    pub proto: u8, // PROTO_TCP or PROTO_UDP
    pub _pad: u8,
}
pub type VipKey = VipKeyOf<u32>;
pub type VipKey6 = VipKeyOf<Addr6>;
const _: () = assert!(core::mem::size_of::<VipKey>() == 8);
const _: () = assert!(core::mem::size_of::<VipKey6>() == 20);

/// `SERVICES_V2` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Service {
    /// Index into `VIP_STATS`, `LIMITS`, `MEMBERS`, ...
    pub id: u32,
    /// This service's Maglev table size (a prime ≤ `MAGLEV_MAX_SIZE`).
    pub table_size: u32,
    /// The `MAGLEV_V2` block its table is in: `2 × id` or `2 × id + 1`. A new table is
    /// written into the other block, then this entry is replaced whole: the data path sees
    /// the old table or the new one, never a mix.
    pub block: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<Service>() == 16);

impl Service {
    /// The service whose block this is.
    pub const fn id_of_block(block: u32) -> u32 {
        block / 2
    }

    /// The first block of service `id` (where a new service's table goes).
    pub const fn first_block(id: u32) -> u32 {
        2 * id
    }

    /// The other block of the same service.
    pub const fn other_block(block: u32) -> u32 {
        block ^ 1
    }
}

/// `BACKENDS` value, indexed by backend id (≥ 1).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    pub addr_be: u32,
    /// Weight: its share of the consistent hash, and a multiplier of its capacity.
    pub weight: u32,
    pub port_be: u16,
    /// Service id this backend belongs to (below `MAX_SERVICES`).
    pub service: u8,
    /// Bumped each time the id is handed to a new backend, and kept when the slot is
    /// cleared: a conntrack entry of an earlier holder of the id does not match it. (Was the
    /// upper byte of a u16 service id, always 0: entries and flows from before read as
    /// generation 0, and match.)
    pub generation: u8,
    pub flags: u16, // BACKEND_DRAINING, BACKEND_IPV6, BACKEND_OUT
    /// Most concurrent TCP flows it takes (`LIVE_FLOWS`); 0: no cap.
    pub max_flows: u16,
}
const _: () = assert!(core::mem::size_of::<Backend>() == 16);

impl Backend {
    /// An all-zero slot: never programmed, or removed.
    pub const fn is_unset(&self) -> bool {
        self.addr_be == 0 && self.port_be == 0
    }

    /// Takes no new flows; its established flows continue.
    pub const fn is_draining(&self) -> bool {
        self.flags & BACKEND_DRAINING != 0
    }

    /// Its address is in `BACKEND_ADDR6` (`addr_be` is 0).
    pub const fn is_ipv6(&self) -> bool {
        self.flags & BACKEND_IPV6 != 0
    }

    /// Takes new flows: in its VIP's table (ready, not draining, weight above 0).
    pub const fn takes_new_flows(&self) -> bool {
        self.flags & BACKEND_OUT == 0 && self.weight != 0
    }
}

/// A 5-tuple in the direction of the packet: `CONNS_V3` (`CONNS6_V3`) keys are client →
/// VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKeyOf<A> {
    pub src_be: A,
    pub dst_be: A,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    // Two fields, not `[u8; 3]`: the BPF target zeroes an odd-sized array with a call to
    // memset, on every packet.
    pub _pad: u8,
    pub _pad2: u16,
}
pub type FlowKey = FlowKeyOf<u32>;
pub type FlowKey6 = FlowKeyOf<Addr6>;
const _: () = assert!(core::mem::size_of::<FlowKey>() == 16);
const _: () = assert!(core::mem::size_of::<FlowKey6>() == 40);

/// `CONNS_V3` value: the flow's backend, and everything the reply's reverse NAT needs (the
/// VIP is the key's destination).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub backend: u32,
    /// The service and the backend's generation when the flow was recorded: a hit whose
    /// backend no longer matches both is stale (the id was handed on) and is chosen anew.
    pub service: u8,
    pub generation: u8,
    /// `FLOW_COUNTED`, `FLOW_DONE`.
    pub flags: u16,
    /// `bpf_ktime_get_coarse_ns()` at the last packet (CLOCK_MONOTONIC as of the last tick,
    /// boot time excluded).
    pub last_seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<Flow>() == 16);

impl Flow {
    /// Counted in its backend's `LIVE_FLOWS`.
    pub const fn is_counted(&self) -> bool {
        self.flags & FLOW_COUNTED != 0
    }

    /// Counted already, or never to be: it has ended, or its entry was made by a mid-flow
    /// packet (an ACK nobody saw the handshake of may be spoofed).
    pub const fn is_done(&self) -> bool {
        self.flags & FLOW_DONE != 0
    }
}

/// `VIP_OF` (`VIP_OF6`) value, keyed by the backend's address, port and protocol (a
/// `VipKeyOf`): the VIP its replies are rewritten to and the backend they must come from.
/// The reverse NAT of a flow is derived from this and the flow's one conntrack entry, so the
/// two can never disagree. A backend serves one VIP (the config refuses a shared one).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendVipOf<A> {
    pub vip_be: A,
    pub vport_be: u16,
    pub service: u8,
    pub generation: u8,
    pub backend: u32,
}
pub type BackendVip = BackendVipOf<u32>;
pub type BackendVip6 = BackendVipOf<Addr6>;
const _: () = assert!(core::mem::size_of::<BackendVip>() == 12);
const _: () = assert!(core::mem::size_of::<BackendVip6>() == 24);

/// `FLOOD` value, per CPU: the conntrack insert budget of the current one-second window.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FloodState {
    /// `bpf_ktime_get_coarse_ns()` when the window began.
    pub window_ns: u64,
    /// Entries inserted in this window.
    pub inserts: u64,
    /// Packets forwarded by the consistent hash alone because the budget had run out.
    pub stateless: u64,
    /// Windows in which the budget ran out: seconds this CPU spent in flood mode.
    pub flood_windows: u64,
    /// 1 once this window's budget has run out.
    pub flooded: u64,
}
const _: () = assert!(core::mem::size_of::<FloodState>() == 40);

/// `CT_CONFIG` value ([0]): how conntrack takes new entries.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtConfig {
    /// Entries one CPU may insert per second before it stops inserting (flood mode); 0: no
    /// limit.
    pub inserts_per_cpu: u64,
}
const _: () = assert!(core::mem::size_of::<CtConfig>() == 8);

/// `SOCK_REVNAT` (`SOCK_REVNAT6`) value: the VIP a balanced socket's peer is shown as.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RevNatOf<A> {
    pub vip_be: A,
    pub vport_be: u16,
    pub _pad: u16,
}
pub type RevNat = RevNatOf<u32>;
pub type RevNat6 = RevNatOf<Addr6>;
const _: () = assert!(core::mem::size_of::<RevNat>() == 8);
const _: () = assert!(core::mem::size_of::<RevNat6>() == 20);

/// `LIMITS` value, by service id: admission control and backend choice of one VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceLimits {
    /// Rate limit as GCRA: one new flow per source every `interval_ns`; 0 = no limit.
    pub interval_ns: u64,
    /// How far ahead of schedule a source may run: `burst × interval_ns`.
    pub burst_ns: u64,
    /// IPv6 sources share a rate-limit bucket per prefix of this length (0 reads as 64).
    /// Was the bounded-load percentage before the scheduler, always 0 since.
    pub v6_prefix: u32,
    pub flags: u32, // LIMIT_*
}
const _: () = assert!(core::mem::size_of::<ServiceLimits>() == 24);

impl ServiceLimits {
    /// Refused new flows get a TCP RST (otherwise they are dropped).
    pub const fn refuses_with_rst(&self) -> bool {
        self.flags & LIMIT_REFUSE_RST != 0
    }

    /// Only sources in the VIP's `ALLOW` prefixes may open flows.
    pub const fn has_allowlist(&self) -> bool {
        self.flags & LIMIT_ALLOWLIST != 0
    }

    /// Flows are hashed by the client address (session affinity).
    pub const fn has_affinity(&self) -> bool {
        self.flags & LIMIT_AFFINITY != 0
    }

    /// Sources are rate limited.
    pub const fn has_rate_limit(&self) -> bool {
        self.interval_ns != 0
    }
}

/// `MEMBERS` value, by service id: the backends in the service's table, in id order. A
/// decision weighs the hash's own pick and the members that follow a place the hash picks.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Members {
    pub count: u32,
    pub _pad: u32,
    pub ids: [u32; MAX_MEMBERS],
}
const _: () = assert!(core::mem::size_of::<Members>() == 8 + 4 * MAX_MEMBERS);

impl Default for Members {
    fn default() -> Self {
        Self {
            count: 0,
            _pad: 0,
            ids: [0; MAX_MEMBERS],
        }
    }
}

/// `SCHED` value, by service id: how a new flow's backend is chosen.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Sched {
    /// Engine numbers older than this are ignored: live flows alone count.
    pub max_age_ns: u64,
    /// Backends weighed per decision (1 to `MAX_CHOICES`; 0 reads as `DEFAULT_CHOICES`).
    pub choices: u32,
    /// `SCHED_STICKY`.
    pub flags: u32,
}

impl Sched {
    /// A client's flows stay on the hash's picks while they have room (the engines' prefix
    /// caches pay for it); otherwise the least loaded candidate takes each flow.
    pub const fn is_sticky(&self) -> bool {
        self.flags & SCHED_STICKY != 0
    }
}
const _: () = assert!(core::mem::size_of::<Sched>() == 16);

/// `BACKEND_LOAD` value, by backend id: what its engine last reported, and its capacity.
/// Written by the daemon; read by every decision.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EngineLoad {
    /// `CLOCK_MONOTONIC` (what `bpf_ktime_get_ns` reads) when the engine answered; 0: never.
    pub updated_ns: u64,
    /// Requests the engine runs and holds waiting.
    pub running: u32,
    pub waiting: u32,
    /// Batch slots, from the config or learned from the engine; 0: unknown.
    pub slots: u32,
    /// KV-cache use in thousandths.
    pub kv_permille: u32,
    /// The backend's live flows when the engine answered: what the engine reports beyond
    /// them is load from elsewhere, added to the live flows as they are now (so a flow that
    /// ended since counts as ended at once).
    pub live_at_signal: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<EngineLoad>() == 32);

/// `RATE_LIMIT` key: one bucket per source and VIP. `RATE_LIMIT6_V2` keys an IPv6 source by
/// its prefix of the VIP's `v6_prefix` length (the rest of the address zeroed): one host
/// usually holds a whole /64, and would otherwise get a bucket per address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RateKeyOf<A> {
    pub src_be: A,
    pub service: u32,
}
pub type RateKey = RateKeyOf<u32>;
pub type RateKey6 = RateKeyOf<Addr6>;
const _: () = assert!(core::mem::size_of::<RateKey>() == 8);
const _: () = assert!(core::mem::size_of::<RateKey6>() == 20);

/// `ALLOW` (`ALLOW6`) key data (after the LPM prefix length): the service id, matched whole,
/// then the source prefix. Prefix length = 32 + the CIDR's length.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AllowKeyOf<A> {
    pub service: u32,
    pub addr_be: A,
}
pub type AllowKey = AllowKeyOf<u32>;
pub type AllowKey6 = AllowKeyOf<Addr6>;
const _: () = assert!(core::mem::size_of::<AllowKey>() == 8);
const _: () = assert!(core::mem::size_of::<AllowKey6>() == 20);

/// `SOCK_REVNAT` key: a socket (its cookie) and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevKey {
    pub cookie: u64,
    pub addr_be: u32,
    pub port_be: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<SockRevKey>() == 16);

/// `SOCK_REVNAT6` key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevKey6 {
    pub cookie: u64,
    pub addr_be: Addr6,
    pub port_be: u16,
    pub _pad: [u16; 3],
}
const _: () = assert!(core::mem::size_of::<SockRevKey6>() == 32);

/// Per-CPU admission counters of a VIP (`ADMIT_STATS` by service id): why new flows were
/// refused, and how many the scheduler sent elsewhere than the consistent hash's own pick.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AdmitCounters {
    pub rate_limited: u64,
    pub not_allowed: u64,
    pub backends_full: u64,
    pub redirected: u64,
}
const _: () = assert!(core::mem::size_of::<AdmitCounters>() == 32);

/// Per-CPU traffic counters (`VIP_STATS` by service id, `BACKEND_STATS` by backend id).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}
const _: () = assert!(core::mem::size_of::<Counters>() == 24);

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
    // SAFETY: see above.
    unsafe impl aya::Pod for ServiceLimits {}
    // SAFETY: see above.
    unsafe impl aya::Pod for Members {}
    // SAFETY: see above.
    unsafe impl aya::Pod for Sched {}
    // SAFETY: see above.
    unsafe impl aya::Pod for EngineLoad {}
    // SAFETY: see above.
    unsafe impl aya::Pod for RateKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for AllowKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for AdmitCounters {}
    // SAFETY: see above.
    unsafe impl aya::Pod for SockRevKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for VipKey6 {}
    // SAFETY: see above.
    unsafe impl aya::Pod for FlowKey6 {}
    // SAFETY: see above.
    unsafe impl aya::Pod for RevNat6 {}
    // SAFETY: see above.
    unsafe impl aya::Pod for RateKey6 {}
    // SAFETY: see above.
    unsafe impl aya::Pod for AllowKey6 {}
    // SAFETY: see above.
    unsafe impl aya::Pod for SockRevKey6 {}
    // SAFETY: see above.
    unsafe impl aya::Pod for BackendVip {}
    // SAFETY: see above.
    unsafe impl aya::Pod for BackendVip6 {}
    // SAFETY: see above.
    unsafe impl aya::Pod for FloodState {}
    // SAFETY: see above.
    unsafe impl aya::Pod for CtConfig {}
}
