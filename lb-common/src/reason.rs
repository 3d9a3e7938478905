//! Verdict reasons, one per packet.

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
    /// Mid-flow packet without conntrack entry: re-hashed through Maglev and recorded (not
    /// counted live: nobody saw its handshake).
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
    /// The CPU's conntrack insert budget for this second ran out (flood mode): a new flow or
    /// a mid-flow packet without entry forwarded by the consistent hash alone, no state kept.
    FwdStateless = 14,
}

impl Reason {
    pub const COUNT: u32 = 15;
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
        Reason::FwdStateless,
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
            Reason::FwdStateless => "fwd_stateless",
        }
    }
}
