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
    /// Pinned by earlier versions, removed at load: `REASONS` had 11 entries.
    pub const RETIRED: [&str; 1] = ["REASONS"];
    /// Every map the daemon pins; the CLI and the clean-up use this list.
    pub const ALL: [&str; 16] = [
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
    pub service: u16,
    /// `FLOW_COUNTED`. Was the upper half of a u32 service id, always 0, in the first layout:
    /// flows from before an upgrade read as uncounted, which they are.
    pub flags: u16,
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

/// `RATE_LIMIT` key: one bucket per source and VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RateKey {
    pub src_be: u32,
    pub service: u32,
}
const _: () = assert!(core::mem::size_of::<RateKey>() == 8);

/// `ALLOW` key data (after the LPM prefix length): the service id, matched whole, then the
/// source prefix. Prefix length = 32 + the CIDR's length.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AllowKey {
    pub service: u32,
    pub addr_be: u32,
}
const _: () = assert!(core::mem::size_of::<AllowKey>() == 8);

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
        Reason::RefuseReset,
        Reason::RefuseDrop,
        Reason::SockBalanced,
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

/// The hash of a flow that picks its Maglev slot. Shared so that userspace (tests, `gpulb
/// flows`) can predict what the kernel chooses.
#[inline(always)]
pub const fn flow_hash(key: &FlowKey) -> u32 {
    let addrs = ((key.src_be as u64) << 32) | key.dst_be as u64;
    let rest = ((key.sport_be as u64) << 24) | ((key.dport_be as u64) << 8) | key.proto as u64;
    let h = fmix64(addrs ^ fmix64(rest ^ 0x9e37_79b9_7f4a_7c15));
    (h ^ (h >> 32)) as u32
}

/// The hash of a flow under session affinity: the client address and the VIP only, so every
/// connection of a client lands on the same slot.
#[inline(always)]
pub const fn affinity_hash(key: &FlowKey) -> u32 {
    let addrs = ((key.src_be as u64) << 32) | key.dst_be as u64;
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
    let sport = server_port_be.to_ne_bytes();
    let dport = client_port_be.to_ne_bytes();
    let ack = syn_seq.wrapping_add(1).to_be_bytes();
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
        h[28 + i] = ack[i]; // TCP ack_seq, offset 8
        i += 1;
    }
    h[20] = sport[0];
    h[21] = sport[1];
    h[22] = dport[0];
    h[23] = dport[1];
    h[32] = 0x50; // data offset 5
    h[33] = 0x14; // RST | ACK
    let mut ip = [0u16; 10];
    let mut tcp = [0u16; 10];
    let mut w = 0;
    while w < 10 {
        ip[w] = u16::from_be_bytes([h[2 * w], h[2 * w + 1]]);
        tcp[w] = u16::from_be_bytes([h[20 + 2 * w], h[21 + 2 * w]]);
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
    let pseudo_sum = !csum_words(0, &pseudo) as u32;
    let tcp_sum = csum_words(pseudo_sum, &tcp).to_be_bytes();
    h[36] = tcp_sum[0];
    h[37] = tcp_sum[1];
    h
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
