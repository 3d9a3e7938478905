//! Types shared by the gpulb BPF programs (`lb-ebpf`) and userspace (`lb-userspace`): the
//! map schema, map keys and values, limits, verdict reasons, the flow hashes, and the RST
//! that refuses a SYN.
#![no_std]

mod hash;
pub mod maps;
mod reason;
mod reset;
mod types;

pub use hash::*;
pub use reason::*;
pub use reset::*;
pub use types::*;

/// Program names (the `#[xdp]`/`#[classifier]` function names in lb-ebpf).
pub mod programs {
    pub const INGRESS: &str = "gpulb_ingress";
    pub const EGRESS: &str = "gpulb_egress";
    /// Socket-level balancing of this host's own clients (cgroup sock_addr hooks).
    pub const CONNECT4: &str = "gpulb_connect4";
    pub const SENDMSG4: &str = "gpulb_sendmsg4";
    pub const GETPEERNAME4: &str = "gpulb_getpeername4";
    pub const RECVMSG4: &str = "gpulb_recvmsg4";
    pub const CONNECT6: &str = "gpulb_connect6";
    pub const SENDMSG6: &str = "gpulb_sendmsg6";
    pub const GETPEERNAME6: &str = "gpulb_getpeername6";
    pub const RECVMSG6: &str = "gpulb_recvmsg6";
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
/// `MAGLEV_V2` entries: two blocks per service, the one in use and the one the next table is
/// written into.
pub const MAGLEV_ENTRIES: u32 = 2 * MAX_SERVICES * MAGLEV_MAX_SIZE;
/// Conntrack entries when the config names none.
pub const CONNTRACK_DEFAULT_SIZE: u32 = 1 << 20;
/// IPv6 conntrack entries when the config names none and has an IPv6 VIP: a separate table
/// (its keys are 40 bytes, and an LRU map allocates all of its entries up front).
pub const CONNTRACK6_DEFAULT_SIZE: u32 = 1 << 17;
/// Entries of each preallocated IPv6 map (conntrack unless the config sizes it, rate limit,
/// socket reverse NAT, `VIP_OF6`) while no VIP is IPv6: they would hold nothing.
pub const IPV6_IDLE_ENTRIES: u32 = 1024;
/// IPv6 conntrack entries when the config names none and has no IPv6 VIP.
pub const CONNTRACK6_IDLE_SIZE: u32 = IPV6_IDLE_ENTRIES;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// `VIP_PORTS` entries: a bit per TCP port, then a bit per UDP port, 64 to a word.
pub const VIP_PORT_WORDS: u32 = 2 * 65536 / 64;

/// Where (protocol, port in host order) lies in `VIP_PORTS`: the word and its bit. Any
/// protocol but UDP counts as TCP (the data path only asks for those two).
#[inline(always)]
pub const fn vip_port_bit(proto: u8, port: u16) -> (u32, u64) {
    let base = if proto == PROTO_UDP { 65536 / 64 } else { 0 };
    (base + (port >> 6) as u32, 1 << (port & 63))
}

/// `Backend::flags`: no new flows are sent to it; its established flows continue.
pub const BACKEND_DRAINING: u16 = 1;
/// `Backend::flags`: an IPv6 backend; `addr_be` is 0 and the address is in `BACKEND_ADDR6`.
pub const BACKEND_IPV6: u16 = 2;
/// `Backend::flags`: takes no new flows (draining, not ready, exited, weight 0); its
/// established flows continue. Set before the tables change, so an ejection is one write.
pub const BACKEND_OUT: u16 = 4;

/// Sources tracked by the per-VIP rate limit at once (LRU: a flood from many addresses
/// evicts the oldest buckets rather than failing).
pub const RATE_LIMIT_ENTRIES: u32 = 65536;
/// Allowed CIDRs, all VIPs together.
pub const ALLOW_ENTRIES: u32 = 1024;
/// Backends one VIP can hold in its member list (`Members`): every backend id.
pub const MAX_MEMBERS: usize = MAX_BACKENDS as usize;
/// Backends a decision looks at: the first `Sched::choices` are weighed, the rest only when
/// those are all at their caps.
pub const MAX_CHOICES: u32 = 8;
/// Default `Sched::choices`: with four or fewer backends, every one of them.
pub const DEFAULT_CHOICES: u32 = 4;

/// Sockets balanced at connect/sendmsg whose peer is shown as the VIP again.
pub const SOCK_REVNAT_ENTRIES: u32 = 65536;

/// `ServiceLimits::flags`: refused new flows get a TCP RST (otherwise they are dropped).
pub const LIMIT_REFUSE_RST: u32 = 1;
/// Only sources in the VIP's `ALLOW` prefixes may open flows.
pub const LIMIT_ALLOWLIST: u32 = 2;
/// Hash the client address only (session affinity), not the whole 5-tuple.
pub const LIMIT_AFFINITY: u32 = 4;

/// `Sched::flags`: keep a client's flows on the hash's picks while they have room.
pub const SCHED_STICKY: u32 = 1;

/// `Flow::flags`: the flow is counted in its backend's `LIVE_FLOWS`: a TCP flow whose
/// handshake completed (the client's first packet after its SYN) and that has not ended.
pub const FLOW_COUNTED: u16 = 1;
/// `Flow::flags`: never counted (again): the flow ended (a FIN or RST either way), or its
/// entry was made by a mid-flow packet, which may be spoofed.
pub const FLOW_DONE: u16 = 2;

/// Conntrack inserts one CPU may make per second when the config names no budget. A flood on
/// 16 CPUs then takes over three seconds to turn the default table (1 M entries) over;
/// honest LLM traffic opens hundreds of connections a second.
pub const CT_INSERTS_PER_CPU_DEFAULT: u64 = 20_000;
/// How long after a CPU last ran out of its insert budget the egress program still restores
/// the VIP on replies of flows without an entry, when the consistent hash sends the flow to
/// the replying backend: flows opened statelessly during a flood get an entry again at the
/// client's next packet once the budget allows.
pub const STATELESS_NAT_HOLD_NS: u64 = 60_000_000_000;
/// Length of the IPv6 prefix that shares a rate-limit bucket when the config names none.
pub const RATE_V6_PREFIX_DEFAULT: u32 = 64;

/// IPv6 extension headers walked before TCP/UDP (hop-by-hop, routing, destination options,
/// authentication); a packet with more is passed as not TCP/UDP.
pub const MAX_EXT_HEADERS: usize = 4;
