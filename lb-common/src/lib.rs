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
    /// `_V2`: more reasons than the first version had entries for.
    pub const REASONS: &str = "REASONS_V2";
    pub const LIMITS: &str = "LIMITS";
    pub const RATE_LIMIT: &str = "RATE_LIMIT";
    pub const ALLOW: &str = "ALLOW";
    pub const LIVE_FLOWS: &str = "LIVE_FLOWS";
    pub const CANDIDATES: &str = "CANDIDATES";
    pub const ADMIT_STATS: &str = "ADMIT_STATS";
    pub const SOCK_REVNAT: &str = "SOCK_REVNAT";
    pub const SOCK_NETNS: &str = "SOCK_NETNS";
    /// The IPv6 counterparts of the maps keyed or valued by an address.
    pub const SERVICES6: &str = "SERVICES6";
    pub const BACKEND_ADDR6: &str = "BACKEND_ADDR6";
    pub const CONNS6: &str = "CONNS6";
    pub const REVNAT6: &str = "REVNAT6";
    pub const RATE_LIMIT6: &str = "RATE_LIMIT6";
    pub const ALLOW6: &str = "ALLOW6";
    pub const SOCK_REVNAT6: &str = "SOCK_REVNAT6";
    /// Pinned by earlier versions, removed at load: `REASONS` had 11 entries.
    pub const RETIRED: [&str; 1] = ["REASONS"];
    /// Every map the daemon pins; the CLI and the clean-up use this list.
    pub const ALL: [&str; 23] = [
        SERVICES,
        BACKENDS,
        MAGLEV,
        CONNS,
        REVNAT,
        VIP_STATS,
        BACKEND_STATS,
        REASONS,
        LIMITS,
        RATE_LIMIT,
        ALLOW,
        LIVE_FLOWS,
        CANDIDATES,
        ADMIT_STATS,
        SOCK_REVNAT,
        SOCK_NETNS,
        SERVICES6,
        BACKEND_ADDR6,
        CONNS6,
        REVNAT6,
        RATE_LIMIT6,
        ALLOW6,
        SOCK_REVNAT6,
    ];
}

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
/// `MAGLEV` entries: one block per service.
pub const MAGLEV_ENTRIES: u32 = MAX_SERVICES * MAGLEV_MAX_SIZE;
/// Conntrack entries when the config names none.
pub const CONNTRACK_DEFAULT_SIZE: u32 = 1 << 20;
/// IPv6 conntrack entries when the config names none: a separate table (its keys are 40
/// bytes, and an LRU map allocates all of its entries up front), smaller by default.
pub const CONNTRACK6_DEFAULT_SIZE: u32 = 1 << 17;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// `Backend::flags`: no new flows are sent to it; its established flows continue.
pub const BACKEND_DRAINING: u16 = 1;
/// `Backend::flags`: an IPv6 backend; `addr_be` is 0 and the address is in `BACKEND_ADDR6`.
pub const BACKEND_IPV6: u16 = 2;

/// Sources tracked by the per-VIP rate limit at once (LRU: a flood from many addresses
/// evicts the oldest buckets rather than failing).
pub const RATE_LIMIT_ENTRIES: u32 = 65536;
/// Allowed CIDRs, all VIPs together.
pub const ALLOW_ENTRIES: u32 = 1024;
/// Backends of one VIP that caps and bounded load can choose among when the Maglev pick is
/// full (`Candidates`).
pub const MAX_CANDIDATES: usize = 32;

/// Sockets balanced at connect/sendmsg whose peer is shown as the VIP again.
pub const SOCK_REVNAT_ENTRIES: u32 = 65536;

/// `ServiceLimits::flags`: refused new flows get a TCP RST (otherwise they are dropped).
pub const LIMIT_REFUSE_RST: u32 = 1;
/// Only sources in the VIP's `ALLOW` prefixes may open flows.
pub const LIMIT_ALLOWLIST: u32 = 2;
/// Hash the client address only (session affinity), not the whole 5-tuple.
pub const LIMIT_AFFINITY: u32 = 4;
/// Some backend has a flow cap, or the VIP bounds load: new flows consult `LIVE_FLOWS`.
pub const LIMIT_CHECK_LOAD: u32 = 8;

/// `Flow::flags`: the flow is counted in its backend's `LIVE_FLOWS` (TCP, not closed yet).
pub const FLOW_COUNTED: u16 = 1;

/// An IPv6 address as the data path keys it: the header's 16 bytes as four native words.
pub type Addr6 = [u32; 4];

/// What the data path hashes of an address: `u32` (IPv4) or `Addr6`, in network order.
pub trait Address: Copy {
    /// 64 bits that depend on every bit of the address; an IPv4 address is itself, so
    /// IPv4 hashes are what they were before IPv6 existed.
    fn hash_bits(&self) -> u64;
}

impl Address for u32 {
    #[inline(always)]
    fn hash_bits(&self) -> u64 {
        *self as u64
    }
}

impl Address for Addr6 {
    #[inline(always)]
    fn hash_bits(&self) -> u64 {
        let hi = ((self[0] as u64) << 32) | self[1] as u64;
        let lo = ((self[2] as u64) << 32) | self[3] as u64;
        fmix64(hi ^ fmix64(lo))
    }
}

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
    /// Most concurrent TCP flows it takes (`LIVE_FLOWS`); 0: no cap.
    pub max_flows: u16,
}
const _: () = assert!(core::mem::size_of::<Backend>() == 16);

impl Backend {
    /// An all-zero slot: never programmed, or removed.
    pub const fn is_unset(&self) -> bool {
        self.addr_be == 0 && self.port_be == 0
    }
}

/// A 5-tuple in the direction of the packet. `CONNS` keys are client → VIP; `REVNAT` keys
/// are backend → client (the reply as the TC egress program sees it). `FlowKey6` for
/// `CONNS6` and `REVNAT6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKeyOf<A> {
    pub src_be: A,
    pub dst_be: A,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
pub type FlowKey = FlowKeyOf<u32>;
pub type FlowKey6 = FlowKeyOf<Addr6>;
const _: () = assert!(core::mem::size_of::<FlowKey>() == 16);
const _: () = assert!(core::mem::size_of::<FlowKey6>() == 40);

/// `CONNS` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub backend: u32,
    pub service: u16,
    /// `FLOW_COUNTED`. Was the upper half of a u32 service id, always 0, in the first layout:
    /// flows from before an upgrade read as uncounted, which they are.
    pub flags: u16,
    /// `bpf_ktime_get_ns()` at the last packet (CLOCK_MONOTONIC, boot time excluded).
    pub last_seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<Flow>() == 16);

/// `REVNAT` (`REVNAT6`) value: what the reply's source is rewritten to.
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
    /// Bounded load in percent of the weighted mean of live flows (125: at most 25% over its
    /// share); 0 = off.
    pub bound_pct: u32,
    pub flags: u32, // LIMIT_*
}
const _: () = assert!(core::mem::size_of::<ServiceLimits>() == 24);

/// `CANDIDATES` value, by service id: the backends in its table, for the walk that looks for
/// one below its cap and bound when the Maglev pick is not.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidates {
    pub count: u32,
    pub total_weight: u32,
    pub ids: [u32; MAX_CANDIDATES],
    pub weights: [u32; MAX_CANDIDATES],
}
const _: () = assert!(core::mem::size_of::<Candidates>() == 8 + 8 * MAX_CANDIDATES);

impl Default for Candidates {
    fn default() -> Self {
        Self {
            count: 0,
            total_weight: 0,
            ids: [0; MAX_CANDIDATES],
            weights: [0; MAX_CANDIDATES],
        }
    }
}

/// `RATE_LIMIT` key: one bucket per source and VIP. `RATE_LIMIT6` keys an IPv6 source by
/// its /64 (`[u32; 2]`): one host usually holds a whole /64, and would otherwise get a bucket
/// per address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RateKeyOf<A> {
    pub src_be: A,
    pub service: u32,
}
pub type RateKey = RateKeyOf<u32>;
pub type RateKey6 = RateKeyOf<[u32; 2]>;
const _: () = assert!(core::mem::size_of::<RateKey>() == 8);
const _: () = assert!(core::mem::size_of::<RateKey6>() == 12);

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
/// refused, and how many went past a full Maglev pick to another backend.
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

/// Why a packet got its verdict: `REASONS` is indexed by these, one count per packet.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Neither IPv4 nor IPv6 (ARP, LLDP, ...): passed untouched.
    PassNotIp = 0,
    /// IP but neither TCP nor UDP (ICMP, ESP, ...), or IPv6 with more extension headers
    /// before TCP/UDP than the program walks (`MAX_EXT_HEADERS`): passed untouched.
    PassNotTcpUdp = 1,
    /// An IPv4 fragment, or an IPv6 packet with a fragment header: passed untouched (only
    /// the first fragment carries ports, so fragments cannot be NATed consistently).
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
    /// New flow refused by admission control (`ADMIT_STATS` says why), answered with a TCP
    /// RST sent back out of the interface.
    RefuseReset = 11,
    /// New flow refused by admission control, dropped.
    RefuseDrop = 12,
    /// A socket on this host connected (or sent) to a VIP: its destination was rewritten to
    /// a backend before any packet existed (cgroup connect4/sendmsg4).
    SockBalanced = 13,
}

impl Reason {
    pub const COUNT: u32 = 14;
    pub const ALL: [Reason; Self::COUNT as usize] = [
        Reason::PassNotIp,
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
        Reason::RefuseReset,
        Reason::RefuseDrop,
        Reason::SockBalanced,
    ];

    /// Stable name for the CLI and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::PassNotIp => "pass_not_ip",
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
            Reason::RefuseReset => "refuse_reset",
            Reason::RefuseDrop => "refuse_drop",
            Reason::SockBalanced => "sock_balanced",
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

/// IPv6 extension headers walked before TCP/UDP (hop-by-hop, routing, destination options,
/// authentication); a packet with more is passed as not TCP/UDP.
pub const MAX_EXT_HEADERS: usize = 4;

/// The hash of a flow that picks its Maglev slot. Shared so that userspace (tests, `gpulb
/// flows`) can predict what the kernel chooses.
#[inline(always)]
pub fn flow_hash<A: Address>(key: &FlowKeyOf<A>) -> u32 {
    // For IPv4 this is (src << 32) | dst.
    let addrs = key.src_be.hash_bits().rotate_left(32) ^ key.dst_be.hash_bits();
    let rest = ((key.sport_be as u64) << 24) | ((key.dport_be as u64) << 8) | key.proto as u64;
    let h = fmix64(addrs ^ fmix64(rest ^ 0x9e37_79b9_7f4a_7c15));
    (h ^ (h >> 32)) as u32
}

/// The hash of a flow under session affinity: the client address and the VIP only, so every
/// connection of a client lands on the same slot.
#[inline(always)]
pub fn affinity_hash<A: Address>(key: &FlowKeyOf<A>) -> u32 {
    let addrs = key.src_be.hash_bits().rotate_left(32) ^ key.dst_be.hash_bits();
    let rest = ((key.dport_be as u64) << 8) | key.proto as u64;
    let h = fmix64(addrs ^ fmix64(rest ^ 0x7f4a_7c15_9e37_79b9));
    (h ^ (h >> 32)) as u32
}

/// Internet checksum of `words` (host-order 16-bit values) plus `sum`, folded and inverted.
#[inline(always)]
pub const fn csum_words(mut sum: u32, words: &[u16]) -> u16 {
    let mut i = 0;
    while i < words.len() {
        sum += words[i] as u32;
        i += 1;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The TCP header (20 bytes, no options, checksum 0) of the RST+ACK that refuses a SYN, and
/// its words for the checksum.
#[inline(always)]
const fn reset_tcp(client_port_be: u16, server_port_be: u16, syn_seq: u32) -> [u8; 20] {
    let sport = server_port_be.to_ne_bytes();
    let dport = client_port_be.to_ne_bytes();
    let ack = syn_seq.wrapping_add(1).to_be_bytes();
    let mut t = [0u8; 20];
    t[0] = sport[0];
    t[1] = sport[1];
    t[2] = dport[0];
    t[3] = dport[1];
    let mut i = 0;
    while i < 4 {
        t[8 + i] = ack[i]; // ack_seq
        i += 1;
    }
    t[12] = 0x50; // data offset 5
    t[13] = 0x14; // RST | ACK
    t
}

/// Sets the checksum of `tcp` given the one's-complement sum of its pseudo-header.
#[inline(always)]
const fn seal_tcp(mut tcp: [u8; 20], pseudo_sum: u32) -> [u8; 20] {
    let mut words = [0u16; 10];
    let mut w = 0;
    while w < 10 {
        words[w] = u16::from_be_bytes([tcp[2 * w], tcp[2 * w + 1]]);
        w += 1;
    }
    let sum = csum_words(pseudo_sum, &words).to_be_bytes();
    tcp[16] = sum[0];
    tcp[17] = sum[1];
    tcp
}

/// IPv4 and TCP headers (40 bytes, no options) of the RST+ACK that refuses a SYN from
/// `client` to `server`: what a host with no listener would answer. Addresses and ports as
/// in the header (`_be`), `syn_seq` in host order.
#[inline(always)]
pub const fn reset_headers(
    client_be: u32,
    server_be: u32,
    client_port_be: u16,
    server_port_be: u16,
    syn_seq: u32,
) -> [u8; 40] {
    let src = server_be.to_ne_bytes();
    let dst = client_be.to_ne_bytes();
    let mut h = [0u8; 40];
    // IPv4: version 4, IHL 5, length 40, DF, TTL 64, TCP.
    h[0] = 0x45;
    h[3] = 40;
    h[6] = 0x40;
    h[8] = 64;
    h[9] = PROTO_TCP;
    let mut i = 0;
    while i < 4 {
        h[12 + i] = src[i];
        h[16 + i] = dst[i];
        i += 1;
    }
    let mut ip = [0u16; 10];
    let mut w = 0;
    while w < 10 {
        ip[w] = u16::from_be_bytes([h[2 * w], h[2 * w + 1]]);
        w += 1;
    }
    let ip_sum = csum_words(0, &ip).to_be_bytes();
    h[10] = ip_sum[0];
    h[11] = ip_sum[1];
    // Pseudo-header: source, destination, protocol, TCP length.
    let pseudo = [
        u16::from_be_bytes([src[0], src[1]]),
        u16::from_be_bytes([src[2], src[3]]),
        u16::from_be_bytes([dst[0], dst[1]]),
        u16::from_be_bytes([dst[2], dst[3]]),
        PROTO_TCP as u16,
        20,
    ];
    let tcp = seal_tcp(
        reset_tcp(client_port_be, server_port_be, syn_seq),
        !csum_words(0, &pseudo) as u32,
    );
    let mut i = 0;
    while i < 20 {
        h[20 + i] = tcp[i];
        i += 1;
    }
    h
}

/// The same for IPv6: a 40-byte IPv6 header (no extension headers) and the TCP header.
#[inline(always)]
pub const fn reset_headers6(
    client_be: &Addr6,
    server_be: &Addr6,
    client_port_be: u16,
    server_port_be: u16,
    syn_seq: u32,
) -> [u8; 60] {
    let mut h = [0u8; 60];
    // IPv6: version 6, payload length 20, next header TCP, hop limit 64.
    h[0] = 0x60;
    h[5] = 20;
    h[6] = PROTO_TCP;
    h[7] = 64;
    // Pseudo-header: source, destination, TCP length (32 bits), next header.
    let mut pseudo = [0u16; 20];
    let mut w = 0;
    while w < 4 {
        let src = server_be[w].to_ne_bytes();
        let dst = client_be[w].to_ne_bytes();
        let mut i = 0;
        while i < 4 {
            h[8 + 4 * w + i] = src[i];
            h[24 + 4 * w + i] = dst[i];
            i += 1;
        }
        pseudo[2 * w] = u16::from_be_bytes([src[0], src[1]]);
        pseudo[2 * w + 1] = u16::from_be_bytes([src[2], src[3]]);
        pseudo[8 + 2 * w] = u16::from_be_bytes([dst[0], dst[1]]);
        pseudo[8 + 2 * w + 1] = u16::from_be_bytes([dst[2], dst[3]]);
        w += 1;
    }
    pseudo[17] = 20;
    pseudo[19] = PROTO_TCP as u16;
    let tcp = seal_tcp(
        reset_tcp(client_port_be, server_port_be, syn_seq),
        !csum_words(0, &pseudo) as u32,
    );
    let mut i = 0;
    while i < 20 {
        h[40 + i] = tcp[i];
        i += 1;
    }
    h
}

/// An address as IPv4 or IPv6 map keys hold it (userspace: config to maps and back).
pub const fn addr6_of(ip: core::net::Ipv6Addr) -> Addr6 {
    let o = ip.octets();
    let mut a = [0u32; 4];
    let mut w = 0;
    while w < 4 {
        a[w] = u32::from_ne_bytes([o[4 * w], o[4 * w + 1], o[4 * w + 2], o[4 * w + 3]]);
        w += 1;
    }
    a
}

pub const fn ipv6_of(addr: &Addr6) -> core::net::Ipv6Addr {
    let mut o = [0u8; 16];
    let mut w = 0;
    while w < 4 {
        let b = addr[w].to_ne_bytes();
        let mut i = 0;
        while i < 4 {
            o[4 * w + i] = b[i];
            i += 1;
        }
        w += 1;
    }
    core::net::Ipv6Addr::from_octets(o)
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
    // SAFETY: see above.
    unsafe impl aya::Pod for ServiceLimits {}
    // SAFETY: see above.
    unsafe impl aya::Pod for Candidates {}
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(bytes: &[u8]) -> impl Iterator<Item = u32> + '_ {
        bytes
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
    }

    fn verifies(sum: u32) -> bool {
        let mut s = sum;
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        s == 0xffff
    }

    #[test]
    fn reset_answers_the_syn_with_valid_checksums() {
        let client = u32::from_ne_bytes([198, 18, 0, 2]);
        let vip = u32::from_ne_bytes([198, 18, 100, 1]);
        let h = reset_headers(client, vip, 40000u16.to_be(), 80u16.to_be(), 0xffff_fffe);
        assert_eq!(&h[12..16], &[198, 18, 100, 1], "from the VIP");
        assert_eq!(&h[16..20], &[198, 18, 0, 2], "to the client");
        assert_eq!(u16::from_be_bytes([h[20], h[21]]), 80);
        assert_eq!(u16::from_be_bytes([h[22], h[23]]), 40000);
        assert_eq!(&h[24..28], &[0; 4], "seq 0: the SYN carried no ACK");
        assert_eq!(&h[28..32], &0xffff_ffffu32.to_be_bytes(), "acks the SYN");
        assert_eq!(h[33], 0x14, "RST and ACK");
        assert!(verifies(words(&h[..20]).sum()), "IPv4 header checksum");
        let pseudo: u32 = words(&h[12..20]).sum::<u32>() + u32::from(PROTO_TCP) + 20;
        assert!(
            verifies(pseudo + words(&h[20..]).sum::<u32>()),
            "TCP checksum"
        );
    }

    #[test]
    fn reset6_answers_the_syn_with_a_valid_checksum() {
        let client = addr6_of("2001:db8::2".parse().expect("v6"));
        let vip = addr6_of("2001:db8:100::1".parse().expect("v6"));
        let h = reset_headers6(&client, &vip, 40000u16.to_be(), 80u16.to_be(), 7);
        assert_eq!(h[0] >> 4, 6, "IPv6");
        assert_eq!(u16::from_be_bytes([h[4], h[5]]), 20, "payload length");
        assert_eq!(h[6], PROTO_TCP);
        assert_eq!(ipv6_of(&vip).octets(), h[8..24], "from the VIP");
        assert_eq!(ipv6_of(&client).octets(), h[24..40], "to the client");
        assert_eq!(u16::from_be_bytes([h[40], h[41]]), 80);
        assert_eq!(u16::from_be_bytes([h[42], h[43]]), 40000);
        assert_eq!(&h[48..52], &8u32.to_be_bytes(), "acks the SYN");
        assert_eq!(h[53], 0x14, "RST and ACK");
        let pseudo: u32 = words(&h[8..40]).sum::<u32>() + 20 + u32::from(PROTO_TCP);
        assert!(
            verifies(pseudo + words(&h[40..]).sum::<u32>()),
            "TCP checksum"
        );
    }

    #[test]
    fn ipv6_words_round_trip() {
        let ip: core::net::Ipv6Addr = "2001:db8:1:2:3:4:5:6".parse().expect("v6");
        assert_eq!(ipv6_of(&addr6_of(ip)), ip);
        assert_eq!(addr6_of(ip)[0].to_ne_bytes(), [0x20, 0x01, 0x0d, 0xb8]);
    }

    #[test]
    fn ipv4_hashes_are_unchanged_and_ipv6_hashes_use_every_word() {
        let key = FlowKey {
            src_be: 0x0102_0304,
            dst_be: 0x0506_0708,
            sport_be: 1,
            dport_be: 80u16.to_be(),
            proto: PROTO_TCP,
            _pad: [0; 3],
        };
        // The formula before IPv6: addrs = (src << 32) | dst.
        let addrs = (0x0102_0304u64 << 32) | 0x0506_0708;
        let rest = (1u64 << 24) | ((80u16.to_be() as u64) << 8) | PROTO_TCP as u64;
        let h = fmix64(addrs ^ fmix64(rest ^ 0x9e37_79b9_7f4a_7c15));
        assert_eq!(flow_hash(&key), (h ^ (h >> 32)) as u32);
        let key6 = |last: u32| FlowKey6 {
            src_be: [1, 2, 3, last],
            dst_be: [5, 6, 7, 8],
            sport_be: 1,
            dport_be: 80u16.to_be(),
            proto: PROTO_TCP,
            _pad: [0; 3],
        };
        assert_ne!(flow_hash(&key6(4)), flow_hash(&key6(5)));
    }

    #[test]
    fn affinity_ignores_the_client_port() {
        let key = |sport: u16| FlowKey {
            src_be: 0x0102_0304,
            dst_be: 0x0506_0708,
            sport_be: sport,
            dport_be: 80u16.to_be(),
            proto: PROTO_TCP,
            _pad: [0; 3],
        };
        assert_eq!(affinity_hash(&key(1)), affinity_hash(&key(2)));
        assert_ne!(flow_hash(&key(1)), flow_hash(&key(2)));
    }
}
