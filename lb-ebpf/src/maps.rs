//! Every map of the data path. Each static's name is its kernel name (and pinned file), and
//! its entries come from the schema in `lb_common::maps`; a userspace test checks the compiled
//! object against that schema.

use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use lb_common::{
    Addr6, AdmitCounters, AllowKey, AllowKey6, Backend, BackendVip, BackendVip6, Counters,
    CtConfig, EngineLoad, FloodState, Flow, FlowKey, FlowKey6, Members, RateKey, RateKey6, RevNat,
    RevNat6, Sched, Service, ServiceLimits, SockRevKey, SockRevKey6, VipKey, VipKey6, maps as spec,
};

// BTF maps (`.maps`): bpftool shows their keys and values by field. The loader pins each
// under its name (`Datapath::load`), as `#[map]`'s pinning did.
const fn entries(spec: spec::MapSpec) -> usize {
    spec.default_entries() as usize
}
const fn flags(spec: spec::MapSpec) -> usize {
    spec.flags as usize
}

/// VIP (address, port, protocol) → service id, table size and Maglev block. Written last by
/// the daemon, so a VIP is only visible once its backends and table are in place; replaced
/// whole to switch to a new table.
#[btf_map]
pub static SERVICES_V2: HashMap<
    VipKey,
    Service,
    { entries(spec::SERVICES) },
    { flags(spec::SERVICES) },
> = HashMap::new();

/// Backend id → address. Id 0 stays zero: an unprogrammed Maglev slot reads 0.
#[btf_map]
pub static BACKENDS: Array<Backend, { entries(spec::BACKENDS) }, { flags(spec::BACKENDS) }> =
    Array::new();

/// Maglev lookup tables, two blocks of `MAGLEV_MAX_SIZE` slots per service: the one in use
/// and the one the next table is written into.
#[btf_map]
pub static MAGLEV_V2: Array<u32, { entries(spec::MAGLEV) }, { flags(spec::MAGLEV) }> = Array::new();

/// Conntrack, client → VIP 5-tuple → backend: one entry per flow, made only by a packet
/// that opens one (or a mid-flow packet, uncounted), and only within the CPU's insert
/// budget (`FLOOD`). The reply's reverse NAT is derived from it and `VIP_OF`.
// LRU: the oldest flows go when it is full (the insert budget keeps a flood from churning
// it). Resized by the daemon at load.
#[btf_map]
pub static CONNS_V3: LruHashMap<FlowKey, Flow, { entries(spec::CONNS) }, { flags(spec::CONNS) }> =
    LruHashMap::new();

/// Backend (address, port, protocol) → the VIP its replies are rewritten to, read by
/// `gpulb_egress` to find the reply's conntrack entry.
#[btf_map]
pub static VIP_OF: HashMap<VipKey, BackendVip, { entries(spec::VIP_OF) }, { flags(spec::VIP_OF) }> =
    HashMap::new();

#[btf_map]
pub static VIP_STATS: PerCpuArray<
    Counters,
    { entries(spec::VIP_STATS) },
    { flags(spec::VIP_STATS) },
> = PerCpuArray::new();

#[btf_map]
pub static BACKEND_STATS: PerCpuArray<
    Counters,
    { entries(spec::BACKEND_STATS) },
    { flags(spec::BACKEND_STATS) },
> = PerCpuArray::new();

/// Replies NATed back to the VIP, by backend id (`BACKEND_STATS` counts the other way).
#[btf_map]
pub static BACKEND_EGRESS: PerCpuArray<
    Counters,
    { entries(spec::BACKEND_EGRESS) },
    { flags(spec::BACKEND_EGRESS) },
> = PerCpuArray::new();

/// One count per packet, by `Reason`.
#[btf_map]
pub static REASONS_V3: PerCpuArray<u64, { entries(spec::REASONS) }, { flags(spec::REASONS) }> =
    PerCpuArray::new();

/// Admission control and backend choice, by service id. All zero: no limits.
#[btf_map]
pub static LIMITS: Array<ServiceLimits, { entries(spec::LIMITS) }, { flags(spec::LIMITS) }> =
    Array::new();

/// GCRA state per (source, service): the theoretical arrival time of its next new flow.
// LRU: a flood from many sources evicts old buckets (a fresh bucket is a full one).
#[btf_map]
pub static RATE_LIMIT: LruHashMap<
    RateKey,
    u64,
    { entries(spec::RATE_LIMIT) },
    { flags(spec::RATE_LIMIT) },
> = LruHashMap::new();

/// Allowed source prefixes of the VIPs with `LIMIT_ALLOWLIST`.
#[btf_map]
pub static ALLOW: LpmTrie<AllowKey, u32, { entries(spec::ALLOW) }, { flags(spec::ALLOW) }> =
    LpmTrie::new();

/// Live TCP flows per backend id: up when a flow's handshake completes (the client's first
/// packet after its SYN), down at its first FIN or RST (either direction). Global, not
/// per-CPU: the choice of a new flow reads the sum. Only the data path writes it (atomic
/// adds), so no increment is ever lost to a userspace write.
#[btf_map]
pub static LIVE_FLOWS: Array<u64, { entries(spec::LIVE_FLOWS) }, { flags(spec::LIVE_FLOWS) }> =
    Array::new();

/// The daemon's correction of each `LIVE_FLOWS` count (an `i64`): the count a decision
/// reads is the sum, so reconciliation repairs a count either way without touching the data
/// path's counter.
#[btf_map]
pub static LIVE_FIX: Array<u64, { entries(spec::LIVE_FIX) }, { flags(spec::LIVE_FIX) }> =
    Array::new();

/// This CPU's conntrack insert budget for the current second.
#[btf_map]
pub static FLOOD: PerCpuArray<FloodState, { entries(spec::FLOOD) }, { flags(spec::FLOOD) }> =
    PerCpuArray::new();

/// [0]: when any CPU last ran out of its insert budget; 0: never. Lets the egress program
/// restore the VIP on replies of flows opened without state (`STATELESS_NAT_HOLD_NS`).
#[btf_map]
pub static FLOOD_AT: Array<u64, { entries(spec::FLOOD_AT) }, { flags(spec::FLOOD_AT) }> =
    Array::new();

/// [0]: the insert budget (`CtConfig`), written by the daemon.
#[btf_map]
pub static CT_CONFIG: Array<CtConfig, { entries(spec::CT_CONFIG) }, { flags(spec::CT_CONFIG) }> =
    Array::new();

/// When each backend id last refused a connection (`bpf_ktime_get_ns`; 0: never): its RST
/// to a SYN, seen at TC egress. The scheduler passes it over for `REFUSED_HOLD_NS`, so the
/// few milliseconds between an instance's death and its ejection do not draw every new
/// connection to it (it has no flows, so it looks least loaded).
#[btf_map]
pub static REFUSED_AT: Array<u64, { entries(spec::REFUSED_AT) }, { flags(spec::REFUSED_AT) }> =
    Array::new();

/// The backends in each service's table, in id order: where a decision finds candidates
/// beside the consistent hash's own pick.
#[btf_map]
pub static MEMBERS: Array<Members, { entries(spec::MEMBERS) }, { flags(spec::MEMBERS) }> =
    Array::new();

/// How each service chooses (candidates per decision, engine signal age).
#[btf_map]
pub static SCHED: Array<Sched, { entries(spec::SCHED) }, { flags(spec::SCHED) }> = Array::new();

/// What each backend's engine last reported, and its capacity.
#[btf_map]
pub static BACKEND_LOAD: Array<
    EngineLoad,
    { entries(spec::BACKEND_LOAD) },
    { flags(spec::BACKEND_LOAD) },
> = Array::new();

#[btf_map]
pub static ADMIT_STATS: PerCpuArray<
    AdmitCounters,
    { entries(spec::ADMIT_STATS) },
    { flags(spec::ADMIT_STATS) },
> = PerCpuArray::new();

/// (socket, backend) → VIP, for the socket programs that show the peer as the VIP again.
#[btf_map]
pub static SOCK_REVNAT: LruHashMap<
    SockRevKey,
    RevNat,
    { entries(spec::SOCK_REVNAT) },
    { flags(spec::SOCK_REVNAT) },
> = LruHashMap::new();

/// [0]: the daemon's network namespace cookie. The socket programs run for every socket in
/// the cgroup, whatever its namespace; only sockets in the daemon's are balanced (0: none).
#[btf_map]
pub static SOCK_NETNS: Array<u64, { entries(spec::SOCK_NETNS) }, { flags(spec::SOCK_NETNS) }> =
    Array::new();

/// A bit per (protocol, port) some VIP of either family serves (`lb_common::vip_port_bit`):
/// the rest of the host's traffic (its ssh, its storage, its model downloads) is passed
/// after one array read, without a hash lookup. Set by the daemon before a VIP's service
/// entry, cleared after the last VIP on the port is gone.
#[btf_map]
pub static VIP_PORTS: Array<u64, { entries(spec::VIP_PORTS) }, { flags(spec::VIP_PORTS) }> =
    Array::new();

/// The IPv6 maps: the same roles as their IPv4 namesakes, with 16-byte addresses.
#[btf_map]
pub static SERVICES6_V2: HashMap<
    VipKey6,
    Service,
    { entries(spec::SERVICES6) },
    { flags(spec::SERVICES6) },
> = HashMap::new();

/// Backend id → IPv6 address, for the `BACKENDS` entries flagged `BACKEND_IPV6`.
#[btf_map]
pub static BACKEND_ADDR6: Array<
    Addr6,
    { entries(spec::BACKEND_ADDR6) },
    { flags(spec::BACKEND_ADDR6) },
> = Array::new();

#[btf_map]
pub static CONNS6_V3: LruHashMap<
    FlowKey6,
    Flow,
    { entries(spec::CONNS6) },
    { flags(spec::CONNS6) },
> = LruHashMap::new();

#[btf_map]
pub static VIP_OF6: HashMap<
    VipKey6,
    BackendVip6,
    { entries(spec::VIP_OF6) },
    { flags(spec::VIP_OF6) },
> = HashMap::new();

/// Keyed by the source's prefix of the VIP's `v6_prefix` length.
#[btf_map]
pub static RATE_LIMIT6_V2: LruHashMap<
    RateKey6,
    u64,
    { entries(spec::RATE_LIMIT6) },
    { flags(spec::RATE_LIMIT6) },
> = LruHashMap::new();

#[btf_map]
pub static ALLOW6: LpmTrie<AllowKey6, u32, { entries(spec::ALLOW6) }, { flags(spec::ALLOW6) }> =
    LpmTrie::new();

#[btf_map]
pub static SOCK_REVNAT6: LruHashMap<
    SockRevKey6,
    RevNat6,
    { entries(spec::SOCK_REVNAT6) },
    { flags(spec::SOCK_REVNAT6) },
> = LruHashMap::new();
