//! Every map of the data path. Each static's name is its kernel name (and pinned file), and
//! its entries come from the schema in `lb_common::maps`; a userspace test checks the compiled
//! object against that schema.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use lb_common::{
    Addr6, AdmitCounters, AllowKey, AllowKey6, Backend, BackendVip, BackendVip6, Counters,
    CtConfig, EngineLoad, FloodState, Flow, FlowKey, FlowKey6, Members, RateKey, RateKey6, RevNat,
    RevNat6, Sched, Service, ServiceLimits, SockRevKey, SockRevKey6, VipKey, VipKey6, maps as spec,
};

/// VIP (address, port, protocol) → service id, table size and Maglev block. Written last by
/// the daemon, so a VIP is only visible once its backends and table are in place; replaced
/// whole to switch to a new table.
#[map]
pub static SERVICES_V2: HashMap<VipKey, Service> =
    HashMap::pinned(spec::SERVICES.default_entries(), spec::SERVICES.flags);

/// Backend id → address. Id 0 stays zero: an unprogrammed Maglev slot reads 0.
#[map]
pub static BACKENDS: Array<Backend> =
    Array::pinned(spec::BACKENDS.default_entries(), spec::BACKENDS.flags);

/// Maglev lookup tables, two blocks of `MAGLEV_MAX_SIZE` slots per service: the one in use
/// and the one the next table is written into.
#[map]
pub static MAGLEV_V2: Array<u32> =
    Array::pinned(spec::MAGLEV.default_entries(), spec::MAGLEV.flags);

/// Conntrack, client → VIP 5-tuple → backend: one entry per flow, made only by a packet
/// that opens one (or a mid-flow packet, uncounted), and only within the CPU's insert
/// budget (`FLOOD`). The reply's reverse NAT is derived from it and `VIP_OF`.
// LRU with a list per CPU: inserts on one CPU evict that CPU's oldest entries, without a
// global lock. Resized by the daemon at load.
#[map]
pub static CONNS_V2: LruHashMap<FlowKey, Flow> =
    LruHashMap::pinned(spec::CONNS.default_entries(), spec::CONNS.flags);

/// Backend (address, port, protocol) → the VIP its replies are rewritten to, read by
/// `gpulb_egress` to find the reply's conntrack entry.
#[map]
pub static VIP_OF: HashMap<VipKey, BackendVip> =
    HashMap::pinned(spec::VIP_OF.default_entries(), spec::VIP_OF.flags);

#[map]
pub static VIP_STATS: PerCpuArray<Counters> =
    PerCpuArray::pinned(spec::VIP_STATS.default_entries(), spec::VIP_STATS.flags);

#[map]
pub static BACKEND_STATS: PerCpuArray<Counters> = PerCpuArray::pinned(
    spec::BACKEND_STATS.default_entries(),
    spec::BACKEND_STATS.flags,
);

/// Replies NATed back to the VIP, by backend id (`BACKEND_STATS` counts the other way).
#[map]
pub static BACKEND_EGRESS: PerCpuArray<Counters> = PerCpuArray::pinned(
    spec::BACKEND_EGRESS.default_entries(),
    spec::BACKEND_EGRESS.flags,
);

/// One count per packet, by `Reason`.
#[map]
pub static REASONS_V3: PerCpuArray<u64> =
    PerCpuArray::pinned(spec::REASONS.default_entries(), spec::REASONS.flags);

/// Admission control and backend choice, by service id. All zero: no limits.
#[map]
pub static LIMITS: Array<ServiceLimits> =
    Array::pinned(spec::LIMITS.default_entries(), spec::LIMITS.flags);

/// GCRA state per (source, service): the theoretical arrival time of its next new flow.
// LRU: a flood from many sources evicts old buckets (a fresh bucket is a full one).
#[map]
pub static RATE_LIMIT: LruHashMap<RateKey, u64> =
    LruHashMap::pinned(spec::RATE_LIMIT.default_entries(), spec::RATE_LIMIT.flags);

/// Allowed source prefixes of the VIPs with `LIMIT_ALLOWLIST`.
#[map]
pub static ALLOW: LpmTrie<AllowKey, u32> =
    LpmTrie::pinned(spec::ALLOW.default_entries(), spec::ALLOW.flags);

/// Live TCP flows per backend id: up when a flow's handshake completes (the client's first
/// packet after its SYN), down at its first FIN or RST (either direction). Global, not
/// per-CPU: the choice of a new flow reads the sum. Only the data path writes it (atomic
/// adds), so no increment is ever lost to a userspace write.
#[map]
pub static LIVE_FLOWS: Array<u64> =
    Array::pinned(spec::LIVE_FLOWS.default_entries(), spec::LIVE_FLOWS.flags);

/// The daemon's correction of each `LIVE_FLOWS` count (an `i64`): the count a decision
/// reads is the sum, so reconciliation repairs a count either way without touching the data
/// path's counter.
#[map]
pub static LIVE_FIX: Array<u64> =
    Array::pinned(spec::LIVE_FIX.default_entries(), spec::LIVE_FIX.flags);

/// This CPU's conntrack insert budget for the current second.
#[map]
pub static FLOOD: PerCpuArray<FloodState> =
    PerCpuArray::pinned(spec::FLOOD.default_entries(), spec::FLOOD.flags);

/// [0]: when any CPU last ran out of its insert budget; 0: never. Lets the egress program
/// restore the VIP on replies of flows opened without state (`STATELESS_NAT_HOLD_NS`).
#[map]
pub static FLOOD_AT: Array<u64> =
    Array::pinned(spec::FLOOD_AT.default_entries(), spec::FLOOD_AT.flags);

/// [0]: the insert budget (`CtConfig`), written by the daemon.
#[map]
pub static CT_CONFIG: Array<CtConfig> =
    Array::pinned(spec::CT_CONFIG.default_entries(), spec::CT_CONFIG.flags);

/// When each backend id last refused a connection (`bpf_ktime_get_ns`; 0: never): its RST
/// to a SYN, seen at TC egress. The scheduler passes it over for `REFUSED_HOLD_NS`, so the
/// few milliseconds between an instance's death and its ejection do not draw every new
/// connection to it (it has no flows, so it looks least loaded).
#[map]
pub static REFUSED_AT: Array<u64> =
    Array::pinned(spec::REFUSED_AT.default_entries(), spec::REFUSED_AT.flags);

/// The backends in each service's table, in id order: where a decision finds candidates
/// beside the consistent hash's own pick.
#[map]
pub static MEMBERS: Array<Members> =
    Array::pinned(spec::MEMBERS.default_entries(), spec::MEMBERS.flags);

/// How each service chooses (candidates per decision, engine signal age).
#[map]
pub static SCHED: Array<Sched> = Array::pinned(spec::SCHED.default_entries(), spec::SCHED.flags);

/// What each backend's engine last reported, and its capacity.
#[map]
pub static BACKEND_LOAD: Array<EngineLoad> = Array::pinned(
    spec::BACKEND_LOAD.default_entries(),
    spec::BACKEND_LOAD.flags,
);

#[map]
pub static ADMIT_STATS: PerCpuArray<AdmitCounters> =
    PerCpuArray::pinned(spec::ADMIT_STATS.default_entries(), spec::ADMIT_STATS.flags);

/// (socket, backend) → VIP, for the socket programs that show the peer as the VIP again.
#[map]
pub static SOCK_REVNAT: LruHashMap<SockRevKey, RevNat> =
    LruHashMap::pinned(spec::SOCK_REVNAT.default_entries(), spec::SOCK_REVNAT.flags);

/// [0]: the daemon's network namespace cookie. The socket programs run for every socket in
/// the cgroup, whatever its namespace; only sockets in the daemon's are balanced (0: none).
#[map]
pub static SOCK_NETNS: Array<u64> =
    Array::pinned(spec::SOCK_NETNS.default_entries(), spec::SOCK_NETNS.flags);

/// The IPv6 maps: the same roles as their IPv4 namesakes, with 16-byte addresses.
#[map]
pub static SERVICES6_V2: HashMap<VipKey6, Service> =
    HashMap::pinned(spec::SERVICES6.default_entries(), spec::SERVICES6.flags);

/// Backend id → IPv6 address, for the `BACKENDS` entries flagged `BACKEND_IPV6`.
#[map]
pub static BACKEND_ADDR6: Array<Addr6> = Array::pinned(
    spec::BACKEND_ADDR6.default_entries(),
    spec::BACKEND_ADDR6.flags,
);

#[map]
pub static CONNS6_V2: LruHashMap<FlowKey6, Flow> =
    LruHashMap::pinned(spec::CONNS6.default_entries(), spec::CONNS6.flags);

#[map]
pub static VIP_OF6: HashMap<VipKey6, BackendVip6> =
    HashMap::pinned(spec::VIP_OF6.default_entries(), spec::VIP_OF6.flags);

/// Keyed by the source's prefix of the VIP's `v6_prefix` length.
#[map]
pub static RATE_LIMIT6_V2: LruHashMap<RateKey6, u64> =
    LruHashMap::pinned(spec::RATE_LIMIT6.default_entries(), spec::RATE_LIMIT6.flags);

#[map]
pub static ALLOW6: LpmTrie<AllowKey6, u32> =
    LpmTrie::pinned(spec::ALLOW6.default_entries(), spec::ALLOW6.flags);

#[map]
pub static SOCK_REVNAT6: LruHashMap<SockRevKey6, RevNat6> = LruHashMap::pinned(
    spec::SOCK_REVNAT6.default_entries(),
    spec::SOCK_REVNAT6.flags,
);
