//! The map schema: one spec per map the data path pins, with the kernel name, type, key and
//! value sizes and entries. The BPF statics (lb-ebpf `maps.rs`) take their entries from
//! here, userspace checks pinned maps against it, and a test checks it against the compiled
//! object.

use core::mem::size_of;

use crate::{
    ALLOW_ENTRIES, Addr6, AdmitCounters, AllowKey, AllowKey6, Backend, BackendVip, BackendVip6,
    CONNTRACK_DEFAULT_SIZE, CONNTRACK6_DEFAULT_SIZE, Counters, CtConfig, EngineLoad, FloodState,
    Flow, FlowKey, FlowKey6, IPV6_IDLE_ENTRIES, MAGLEV_ENTRIES, MAX_BACKENDS, MAX_SERVICES,
    Members, RATE_LIMIT_ENTRIES, RateKey, RateKey6, RevNat, RevNat6, SOCK_REVNAT_ENTRIES, Sched,
    Service, ServiceLimits, SockRevKey, SockRevKey6, VIP_PORT_WORDS, VipKey, VipKey6,
};

/// The BPF map type (`enum bpf_map_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum MapKind {
    Hash = 1,
    Array = 2,
    PerCpuArray = 6,
    LruHash = 9,
    LpmTrie = 11,
}

/// How many entries a map has: fixed by this build, the conntrack size the config names, or
/// a size that follows whether any VIP is IPv6.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entries {
    Fixed(u32),
    /// `conntrack_size` (IPv4 flows).
    Conntrack,
    /// `conntrack_size_v6` (IPv6 flows).
    Conntrack6,
    /// This many with an IPv6 VIP, `IPV6_IDLE_ENTRIES` without.
    Ipv6(u32),
}

/// The sizes the config gives the maps: the conntrack tables' (entries), and whether the
/// other IPv6 maps get their full size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    /// `conntrack_size`.
    pub v4: u32,
    /// `conntrack_size_v6`.
    pub v6: u32,
    /// Some VIP is IPv6.
    pub ipv6: bool,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            v4: CONNTRACK_DEFAULT_SIZE,
            v6: CONNTRACK6_DEFAULT_SIZE,
            ipv6: true,
        }
    }
}

/// One map as the kernel knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSpec {
    /// The kernel name and the pinned file's name; ≤ 15 bytes (the kernel truncates).
    pub name: &'static str,
    pub kind: MapKind,
    pub key_size: u32,
    pub value_size: u32,
    pub entries: Entries,
    /// `BPF_F_*` map flags.
    pub flags: u32,
}

impl MapSpec {
    /// Entries this map has under `sizes`.
    pub const fn max_entries(&self, sizes: &MapSizes) -> u32 {
        match self.entries {
            Entries::Fixed(n) => n,
            Entries::Conntrack => sizes.v4,
            Entries::Conntrack6 => sizes.v6,
            Entries::Ipv6(n) if sizes.ipv6 => n,
            Entries::Ipv6(_) => IPV6_IDLE_ENTRIES,
        }
    }

    /// Entries when the config names no sizes (what the BPF statics declare).
    pub const fn default_entries(&self) -> u32 {
        match self.entries {
            Entries::Fixed(n) => n,
            Entries::Conntrack => CONNTRACK_DEFAULT_SIZE,
            Entries::Conntrack6 => CONNTRACK6_DEFAULT_SIZE,
            Entries::Ipv6(n) => n,
        }
    }
}

/// `BPF_F_NO_PREALLOC`: LPM tries must be created with it; hash maps with it free a replaced
/// entry only after an RCU grace period.
pub const F_NO_PREALLOC: u32 = 1;

const fn spec(
    name: &'static str,
    kind: MapKind,
    key_size: usize,
    value_size: usize,
    entries: Entries,
) -> MapSpec {
    MapSpec {
        name,
        kind,
        key_size: key_size as u32,
        value_size: value_size as u32,
        entries,
        flags: if matches!(kind, MapKind::LpmTrie) {
            F_NO_PREALLOC
        } else {
            0
        },
    }
}

/// A conntrack table: an LRU hash with the kernel's common LRU list, the kind Katran's
/// per-CPU tables are. A CPU takes free entries from a local list refilled 128 at a time,
/// so an insert costs a list pop; with `BPF_F_NO_COMMON_LRU` every insert rotated its CPU's
/// lists, and a new flow cost about 300 ns more (`cargo xtask bench datapath`).
const fn conntrack(name: &'static str, key_size: usize, entries: Entries) -> MapSpec {
    spec(name, LruHash, key_size, size_of::<Flow>(), entries)
}

use Entries::{Conntrack, Conntrack6, Fixed, Ipv6};
use MapKind::{Array, Hash, LpmTrie, LruHash, PerCpuArray};

/// The 4-byte prefix length an LPM trie key starts with.
const LPM_PREFIX: usize = 4;

/// `_V2`: the value names the service's current Maglev block. Not preallocated: a replaced
/// entry is freed only after every program that may be reading it has finished (RCU), so a
/// reader copies the old value or the new one whole, never half of each.
pub const SERVICES: MapSpec = MapSpec {
    flags: F_NO_PREALLOC,
    ..spec(
        "SERVICES_V2",
        Hash,
        size_of::<VipKey>(),
        size_of::<Service>(),
        Fixed(MAX_SERVICES),
    )
};
pub const BACKENDS: MapSpec = spec(
    "BACKENDS",
    Array,
    4,
    size_of::<Backend>(),
    Fixed(MAX_BACKENDS),
);
/// `_V2`: two blocks per service (double-buffered tables).
pub const MAGLEV: MapSpec = spec("MAGLEV_V2", Array, 4, 4, Fixed(MAGLEV_ENTRIES));
/// `_V3`: the common LRU list (`_V2` had a list per CPU); the reverse NAT is derived from it.
pub const CONNS: MapSpec = conntrack("CONNS_V3", size_of::<FlowKey>(), Conntrack);
pub const VIP_OF: MapSpec = spec(
    "VIP_OF",
    Hash,
    size_of::<VipKey>(),
    size_of::<BackendVip>(),
    Fixed(MAX_BACKENDS),
);
pub const VIP_STATS: MapSpec = spec(
    "VIP_STATS",
    PerCpuArray,
    4,
    size_of::<Counters>(),
    Fixed(MAX_SERVICES),
);
pub const BACKEND_STATS: MapSpec = spec(
    "BACKEND_STATS",
    PerCpuArray,
    4,
    size_of::<Counters>(),
    Fixed(MAX_BACKENDS),
);
/// Replies NATed back to the VIP, by backend id: the bytes clients are sent.
pub const BACKEND_EGRESS: MapSpec = spec(
    "BACKEND_EGRESS",
    PerCpuArray,
    4,
    size_of::<Counters>(),
    Fixed(MAX_BACKENDS),
);
/// `_V3`: room for reasons to come (`Reason::COUNT` of them are used).
pub const REASONS: MapSpec = spec("REASONS_V3", PerCpuArray, 4, 8, Fixed(REASON_SLOTS));
/// `REASONS` entries.
pub const REASON_SLOTS: u32 = 32;
pub const LIMITS: MapSpec = spec(
    "LIMITS",
    Array,
    4,
    size_of::<ServiceLimits>(),
    Fixed(MAX_SERVICES),
);
pub const RATE_LIMIT: MapSpec = spec(
    "RATE_LIMIT",
    LruHash,
    size_of::<RateKey>(),
    8,
    Fixed(RATE_LIMIT_ENTRIES),
);
pub const ALLOW: MapSpec = spec(
    "ALLOW",
    LpmTrie,
    LPM_PREFIX + size_of::<AllowKey>(),
    4,
    Fixed(ALLOW_ENTRIES),
);
pub const LIVE_FLOWS: MapSpec = spec("LIVE_FLOWS", Array, 4, 8, Fixed(MAX_BACKENDS));
pub const LIVE_FIX: MapSpec = spec("LIVE_FIX", Array, 4, 8, Fixed(MAX_BACKENDS));
pub const FLOOD: MapSpec = spec("FLOOD", PerCpuArray, 4, size_of::<FloodState>(), Fixed(1));
pub const FLOOD_AT: MapSpec = spec("FLOOD_AT", Array, 4, 8, Fixed(1));
pub const CT_CONFIG: MapSpec = spec("CT_CONFIG", Array, 4, size_of::<CtConfig>(), Fixed(1));
pub const REFUSED_AT: MapSpec = spec("REFUSED_AT", Array, 4, 8, Fixed(MAX_BACKENDS));
pub const MEMBERS: MapSpec = spec(
    "MEMBERS",
    Array,
    4,
    size_of::<Members>(),
    Fixed(MAX_SERVICES),
);
pub const SCHED: MapSpec = spec("SCHED", Array, 4, size_of::<Sched>(), Fixed(MAX_SERVICES));
pub const BACKEND_LOAD: MapSpec = spec(
    "BACKEND_LOAD",
    Array,
    4,
    size_of::<EngineLoad>(),
    Fixed(MAX_BACKENDS),
);
pub const ADMIT_STATS: MapSpec = spec(
    "ADMIT_STATS",
    PerCpuArray,
    4,
    size_of::<AdmitCounters>(),
    Fixed(MAX_SERVICES),
);
pub const SOCK_REVNAT: MapSpec = spec(
    "SOCK_REVNAT",
    LruHash,
    size_of::<SockRevKey>(),
    size_of::<RevNat>(),
    Fixed(SOCK_REVNAT_ENTRIES),
);
/// A bit per (protocol, port) some VIP serves (`vip_port_bit`): a packet to any other port
/// is passed without a hash lookup.
pub const VIP_PORTS: MapSpec = spec("VIP_PORTS", Array, 4, 8, Fixed(VIP_PORT_WORDS));
pub const SOCK_NETNS: MapSpec = spec("SOCK_NETNS", Array, 4, 8, Fixed(1));
pub const SERVICES6: MapSpec = MapSpec {
    flags: F_NO_PREALLOC,
    ..spec(
        "SERVICES6_V2",
        Hash,
        size_of::<VipKey6>(),
        size_of::<Service>(),
        Fixed(MAX_SERVICES),
    )
};
pub const BACKEND_ADDR6: MapSpec = spec(
    "BACKEND_ADDR6",
    Array,
    4,
    size_of::<Addr6>(),
    Fixed(MAX_BACKENDS),
);
pub const CONNS6: MapSpec = conntrack("CONNS6_V3", size_of::<FlowKey6>(), Conntrack6);
pub const VIP_OF6: MapSpec = spec(
    "VIP_OF6",
    Hash,
    size_of::<VipKey6>(),
    size_of::<BackendVip6>(),
    Ipv6(MAX_BACKENDS),
);
/// `_V2`: keyed by the source's prefix of the VIP's length (a /64 before).
pub const RATE_LIMIT6: MapSpec = spec(
    "RATE_LIMIT6_V2",
    LruHash,
    size_of::<RateKey6>(),
    8,
    Ipv6(RATE_LIMIT_ENTRIES),
);
pub const ALLOW6: MapSpec = spec(
    "ALLOW6",
    LpmTrie,
    LPM_PREFIX + size_of::<AllowKey6>(),
    4,
    Fixed(ALLOW_ENTRIES),
);
pub const SOCK_REVNAT6: MapSpec = spec(
    "SOCK_REVNAT6",
    LruHash,
    size_of::<SockRevKey6>(),
    size_of::<RevNat6>(),
    Ipv6(SOCK_REVNAT_ENTRIES),
);

/// Every map the daemon pins; the layout check, the CLI and the clean-up use this list.
pub const ALL: [MapSpec; 32] = [
    SERVICES,
    BACKENDS,
    MAGLEV,
    CONNS,
    VIP_OF,
    VIP_STATS,
    BACKEND_STATS,
    BACKEND_EGRESS,
    REASONS,
    LIMITS,
    RATE_LIMIT,
    ALLOW,
    LIVE_FLOWS,
    LIVE_FIX,
    FLOOD,
    FLOOD_AT,
    CT_CONFIG,
    REFUSED_AT,
    MEMBERS,
    SCHED,
    BACKEND_LOAD,
    ADMIT_STATS,
    SOCK_REVNAT,
    SOCK_NETNS,
    VIP_PORTS,
    SERVICES6,
    BACKEND_ADDR6,
    CONNS6,
    VIP_OF6,
    RATE_LIMIT6,
    ALLOW6,
    SOCK_REVNAT6,
];

/// Pinned by earlier versions, removed at load: `REASONS` had 11 entries and `REASONS_V2`
/// 14; `CANDIDATES` held the backends that caps and bounded load chose among before the
/// scheduler; `REVNAT`/`REVNAT6` held a second entry per flow; `RATE_LIMIT6` keyed a /64.
pub const RETIRED: [&str; 6] = [
    "REASONS",
    "REASONS_V2",
    "CANDIDATES",
    "REVNAT",
    "REVNAT6",
    "RATE_LIMIT6",
];

/// Conntrack tables of earlier versions (same key and value layout; `CONNS` had one entry
/// per direction, `CONNS_V2` a list per CPU), copied into their successors at load and then
/// removed: an upgrade keeps its flows.
pub const MIGRATED: [(&str, MapSpec); 4] = [
    ("CONNS", CONNS),
    ("CONNS6", CONNS6),
    ("CONNS_V2", CONNS),
    ("CONNS6_V2", CONNS6),
];

/// The conntrack tables of the first version, which counted a flow live from its SYN (later
/// ones count it from the end of its handshake).
pub const COUNTED_FROM_SYN: [&str; 2] = ["CONNS", "CONNS6"];

/// The VIP tables of the version before (one Maglev block per service, `SERVICES` values of
/// id and size), carried into `SERVICES_V2`/`SERVICES6_V2` and `MAGLEV_V2` at load (each
/// service's table into its first block) and then removed: an upgrade keeps every VIP's
/// table, so no flow moves.
pub const MIGRATED_TABLES: [&str; 3] = ["SERVICES", "SERVICES6", "MAGLEV"];

/// Whether `name` is one of gpulb's pinned maps (current or retired).
pub fn is_ours(name: &str) -> bool {
    ALL.iter().any(|m| m.name == name)
        || RETIRED.contains(&name)
        || MIGRATED.iter().any(|(old, _)| *old == name)
        || MIGRATED_TABLES.contains(&name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_maps_are_small_without_an_ipv6_vip() {
        let without = MapSizes {
            ipv6: false,
            ..MapSizes::default()
        };
        for map in [VIP_OF6, RATE_LIMIT6, SOCK_REVNAT6] {
            assert_eq!(map.max_entries(&without), IPV6_IDLE_ENTRIES, "{}", map.name);
            assert!(map.max_entries(&MapSizes::default()) > IPV6_IDLE_ENTRIES);
        }
        for map in [VIP_OF, RATE_LIMIT, SOCK_REVNAT, BACKEND_ADDR6] {
            assert_eq!(
                map.max_entries(&without),
                map.default_entries(),
                "{}",
                map.name
            );
        }
    }

    #[test]
    fn each_protocol_and_port_has_its_own_vip_ports_bit() {
        let mut seen = [0u64; VIP_PORT_WORDS as usize];
        for proto in [crate::PROTO_TCP, crate::PROTO_UDP] {
            for port in 0..=u16::MAX {
                let (word, bit) = crate::vip_port_bit(proto, port);
                assert!(word < VIP_PORT_WORDS, "{proto}/{port}");
                assert_eq!(bit.count_ones(), 1);
                assert_eq!(seen[word as usize] & bit, 0, "{proto}/{port} shares a bit");
                seen[word as usize] |= bit;
            }
        }
        assert!(seen.iter().all(|w| *w == u64::MAX), "every bit used");
    }

    #[test]
    fn names_are_unique_and_fit_the_kernel() {
        for (i, a) in ALL.iter().enumerate() {
            assert!(a.name.len() <= 15, "{} is longer than 15 bytes", a.name);
            assert!(
                ALL[i + 1..].iter().all(|b| b.name != a.name),
                "{} twice",
                a.name
            );
        }
    }
}
