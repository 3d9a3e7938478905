//! The fixture table: one packet each, with the verdict, reason and output expected.

use etherparse::PacketBuilder;
use lb_common::Reason;

use super::frames::*;

/// Every fixture, in the order they run (some expect an earlier one's conntrack entry).
pub fn table() -> Vec<Fixture> {
    let syn = tcp_packet(false, CLIENT, VIP, 40000, 80, true);
    vec![
        Fixture {
            name: "SYN to VIP",
            packet: syn.clone(),
            action: XDP_PASS,
            reason: Reason::FwdNewFlow,
            expect: Expect::Nat,
        },
        Fixture {
            name: "established packet",
            packet: tcp_packet(false, CLIENT, VIP, 40000, 80, false),
            action: XDP_PASS,
            reason: Reason::FwdEstablished,
            expect: Expect::NatSameAs("SYN to VIP"),
        },
        Fixture {
            name: "mid-flow packet without conntrack",
            packet: tcp_packet(false, CLIENT, VIP, 40001, 80, false),
            action: XDP_PASS,
            reason: Reason::FwdRehashed,
            expect: Expect::Nat,
        },
        Fixture {
            name: "TCP to a non-VIP port",
            packet: tcp_packet(false, CLIENT, VIP, 40002, 81, true),
            action: XDP_PASS,
            reason: Reason::PassNotVip,
            expect: Expect::Untouched,
        },
        Fixture {
            name: "TCP to a non-VIP address",
            packet: tcp_packet(false, CLIENT, [198, 18, 100, 9], 40002, 80, true),
            action: XDP_PASS,
            reason: Reason::PassNotVip,
            expect: Expect::Untouched,
        },
        Fixture {
            name: "mid-flow TCP to a non-VIP address on a VIP's port",
            packet: tcp_packet(false, CLIENT, [198, 18, 100, 9], 40002, 80, false),
            action: XDP_PASS,
            reason: Reason::PassNotVip,
            expect: Expect::Untouched,
        },
        Fixture {
            name: "UDP to a TCP VIP's port",
            packet: udp_packet(80, false),
            action: XDP_PASS,
            reason: Reason::PassNotVip,
            expect: Expect::Untouched,
        },
        Fixture {
            name: "ARP request for the VIP",
            packet: arp(),
            action: XDP_PASS,
            reason: Reason::PassNotIp,
            expect: Expect::Untouched,
        },
        Fixture {
            name: "ICMP echo to the VIP",
            packet: icmp_echo(),
            action: XDP_PASS,
            reason: Reason::PassNotTcpUdp,
            expect: Expect::Untouched,
        },
        Fixture {
            name: "IPv4 with options, SYN to VIP",
            packet: with_ip_options(tcp_packet(false, CLIENT, VIP, 40003, 80, true)),
            action: XDP_PASS,
            reason: Reason::FwdNewFlow,
            expect: Expect::Nat,
        },
        Fixture {
            name: "non-first fragment to VIP",
            packet: as_later_fragment(tcp_packet(false, CLIENT, VIP, 40004, 80, false)),
            action: XDP_PASS,
            reason: Reason::PassFragment,
            expect: Expect::Untouched,
        },
        Fixture {
            name: "802.1Q-tagged SYN to VIP",
            packet: tcp_packet(true, CLIENT, VIP, 40005, 80, true),
            action: XDP_PASS,
            reason: Reason::FwdNewFlow,
            expect: Expect::Nat,
        },
        Fixture {
            name: "UDP to UDP VIP",
            packet: udp_packet(53, false),
            action: XDP_PASS,
            reason: Reason::FwdNewFlow,
            expect: Expect::Nat,
        },
        Fixture {
            name: "UDP to UDP VIP, no checksum",
            packet: {
                let mut p = udp_packet(53, true);
                p[34..36].copy_from_slice(&40010u16.to_be_bytes());
                p
            },
            action: XDP_PASS,
            reason: Reason::FwdNewFlow,
            expect: Expect::Nat,
        },
        Fixture {
            name: "UDP to the TCP VIP's port",
            packet: udp_packet(80, false),
            action: XDP_PASS,
            reason: Reason::PassNotVip,
            expect: Expect::Untouched,
        },
        Fixture {
            name: "SYN to a VIP without backends",
            packet: tcp_packet(false, CLIENT, [198, 18, 100, 2], 40006, 80, true),
            action: XDP_DROP,
            reason: Reason::DropNoBackend,
            expect: Expect::Untouched,
        },
        Fixture {
            name: "truncated 802.1Q header",
            packet: tcp_packet(true, CLIENT, VIP, 40007, 80, true)[..16].to_vec(),
            action: XDP_PASS,
            reason: Reason::PassMalformed,
            expect: Expect::Untouched,
        },
        Fixture {
            name: "truncated IPv4 header",
            packet: syn[..14 + 12].to_vec(),
            action: XDP_PASS,
            reason: Reason::PassMalformed,
            expect: Expect::Untouched,
        },
        Fixture {
            name: "Ethernet header only",
            packet: syn[..14].to_vec(),
            action: XDP_PASS,
            reason: Reason::PassMalformed,
            expect: Expect::Untouched,
        },
        Fixture {
            name: "truncated TCP header",
            packet: syn[..14 + 20 + 10].to_vec(),
            action: XDP_PASS,
            reason: Reason::PassMalformed,
            expect: Expect::Untouched,
        },
        Fixture {
            name: "IPv4 header length below 20",
            packet: {
                let mut p = syn.clone();
                p[14] = 0x44;
                p
            },
            action: XDP_PASS,
            reason: Reason::PassMalformed,
            expect: Expect::Untouched,
        },
        Fixture {
            name: "IPv6 SYN to VIP",
            packet: tcp6_packet(CLIENT6, VIP6, 40020, true),
            action: XDP_PASS,
            reason: Reason::FwdNewFlow,
            expect: Expect::Nat,
        },
        Fixture {
            name: "IPv6 established packet",
            packet: tcp6_packet(CLIENT6, VIP6, 40020, false),
            action: XDP_PASS,
            reason: Reason::FwdEstablished,
            expect: Expect::NatSameAs("IPv6 SYN to VIP"),
        },
        Fixture {
            name: "IPv6 SYN behind hop-by-hop and destination options",
            packet: with_ext_headers(
                tcp6_packet(CLIENT6, VIP6, 40021, true),
                &[HOP_BY_HOP, DEST_OPTS],
            ),
            action: XDP_PASS,
            reason: Reason::FwdNewFlow,
            expect: Expect::Nat,
        },
        Fixture {
            name: "IPv6 SYN behind an authentication header",
            packet: with_ext_headers(tcp6_packet(CLIENT6, VIP6, 40022, true), &[AUTH]),
            action: XDP_PASS,
            reason: Reason::FwdNewFlow,
            expect: Expect::Nat,
        },
        Fixture {
            name: "IPv6 fragment to VIP",
            packet: with_ext_headers(tcp6_packet(CLIENT6, VIP6, 40023, true), &[FRAGMENT]),
            action: XDP_PASS,
            reason: Reason::PassFragment,
            expect: Expect::Untouched,
        },
        Fixture {
            name: "IPv6 with more extension headers than walked",
            packet: with_ext_headers(
                tcp6_packet(CLIENT6, VIP6, 40024, true),
                &[HOP_BY_HOP, DEST_OPTS, DEST_OPTS, DEST_OPTS, DEST_OPTS],
            ),
            action: XDP_PASS,
            reason: Reason::PassNotTcpUdp,
            expect: Expect::Untouched,
        },
        Fixture {
            name: "IPv6 extension header running past the end",
            packet: {
                let mut p = with_ext_headers(tcp6_packet(CLIENT6, VIP6, 40025, true), &[DEST_OPTS]);
                p[54 + 1] = 200;
                p
            },
            action: XDP_PASS,
            reason: Reason::PassMalformed,
            expect: Expect::Untouched,
        },
        Fixture {
            name: "UDP to IPv6 UDP VIP",
            packet: {
                let mut out = Vec::new();
                PacketBuilder::ethernet2(MAC_A, MAC_B)
                    .ipv6(CLIENT6, VIP6, 64)
                    .udp(40026, 53)
                    .write(&mut out, b"query")
                    .expect("build");
                out
            },
            action: XDP_PASS,
            reason: Reason::FwdNewFlow,
            expect: Expect::Nat,
        },
        Fixture {
            name: "ICMPv6 echo to the VIP",
            packet: {
                let mut out = Vec::new();
                PacketBuilder::ethernet2(MAC_A, MAC_B)
                    .ipv6(CLIENT6, VIP6, 64)
                    .icmpv6_echo_request(7, 1)
                    .write(&mut out, b"ping")
                    .expect("build");
                out
            },
            action: XDP_PASS,
            reason: Reason::PassNotTcpUdp,
            expect: Expect::Untouched,
        },
        Fixture {
            name: "IPv6 TCP to a non-VIP address",
            packet: tcp6_packet(CLIENT6, CLIENT6, 40027, true),
            action: XDP_PASS,
            reason: Reason::PassNotVip,
            expect: Expect::Untouched,
        },
        Fixture {
            name: "truncated IPv6 header",
            packet: tcp6_packet(CLIENT6, VIP6, 40028, true)[..14 + 30].to_vec(),
            action: XDP_PASS,
            reason: Reason::PassMalformed,
            expect: Expect::Untouched,
        },
    ]
}
