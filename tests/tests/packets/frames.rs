//! Test packets: builders for the fixture frames (IPv4, IPv6 with extension headers, VLAN,
//! fragments, ARP, ICMP), and the parse and checksum checks of what the program wrote.

use std::net::{IpAddr, SocketAddr};

use etherparse::{PacketBuilder, VlanId};
use lb_common::{FlowKey, FlowKey6, Reason, addr6_of, flow_hash};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

pub const CLIENT: [u8; 4] = [198, 18, 0, 2];
pub const VIP: [u8; 4] = [198, 18, 100, 1];
/// IPv6 fixtures use the documentation prefix: these packets exist only in BPF_PROG_TEST_RUN.
pub const CLIENT6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
pub const VIP6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
];
pub const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
pub const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 2];

/// What a fixture expects.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Expect {
    /// NATed to the backend Maglev picks for this flow (predicted from the plan's table).
    Nat,
    /// NATed to the same backend as the previous fixture's flow (conntrack).
    NatSameAs(&'static str),
    /// Passed or dropped with the bytes untouched.
    Untouched,
}

pub struct Fixture {
    pub name: &'static str,
    pub packet: Vec<u8>,
    pub action: u32,
    pub reason: Reason,
    pub expect: Expect,
}

pub fn tcp_packet(
    vlan: bool,
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    syn: bool,
) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2(MAC_A, MAC_B);
    let payload = b"GET / HTTP/1.1\r\n\r\n";
    let mut out = Vec::new();
    if vlan {
        let b = eth
            .single_vlan(VlanId::try_new(100).expect("vlan id"))
            .ipv4(src, dst, 64)
            .tcp(sport, dport, 1000, 65535);
        let b = if syn { b.syn() } else { b.ack(5000) };
        b.write(&mut out, payload).expect("build");
    } else {
        let b = eth.ipv4(src, dst, 64).tcp(sport, dport, 1000, 65535);
        let b = if syn { b.syn() } else { b.ack(5000) };
        b.write(&mut out, payload).expect("build");
    }
    out
}

pub fn udp_packet(dport: u16, zero_checksum: bool) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(CLIENT, VIP, 64)
        .udp(40000, dport)
        .write(&mut out, b"query")
        .expect("build");
    if zero_checksum {
        out[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&[0, 0]);
    }
    out
}

/// One's-complement sum of 16-bit words, folded and complemented: 0 over data that includes
/// a correct checksum.
pub fn ones_complement(chunks: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for data in chunks {
        for pair in data.chunks(2) {
            let word = if pair.len() == 2 {
                u16::from_be_bytes([pair[0], pair[1]])
            } else {
                u16::from(pair[0]) << 8
            };
            sum += u32::from(word);
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

pub fn fix_ip_checksum(pkt: &mut [u8], l3: usize) {
    let ihl = usize::from(pkt[l3] & 0x0f) * 4;
    pkt[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
    let c = ones_complement(&[&pkt[l3..l3 + ihl]]);
    pkt[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
}

/// Adds 4 bytes of IPv4 options (NOPs) to an untagged packet.
pub fn with_ip_options(mut pkt: Vec<u8>) -> Vec<u8> {
    pkt.splice(34..34, [1u8, 1, 1, 1]);
    pkt[14] = 0x46;
    let len = u16::from_be_bytes([pkt[16], pkt[17]]) + 4;
    pkt[16..18].copy_from_slice(&len.to_be_bytes());
    fix_ip_checksum(&mut pkt, 14);
    pkt
}

/// A non-first fragment (offset 185 × 8 bytes) of an untagged packet.
pub fn as_later_fragment(mut pkt: Vec<u8>) -> Vec<u8> {
    pkt[20..22].copy_from_slice(&185u16.to_be_bytes());
    fix_ip_checksum(&mut pkt, 14);
    pkt
}

pub fn arp() -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&[0xff; 6]);
    p.extend_from_slice(&MAC_A);
    p.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    p.extend_from_slice(&MAC_A);
    p.extend_from_slice(&CLIENT);
    p.extend_from_slice(&[0; 6]);
    p.extend_from_slice(&VIP);
    p
}

pub fn icmp_echo() -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(CLIENT, VIP, 64)
        .icmpv4_echo_request(7, 1)
        .write(&mut out, b"ping")
        .expect("build");
    out
}

/// A TCP/UDP frame as the tests read it back, either family.
#[derive(Debug, Clone, Copy)]
pub struct Frame {
    pub l3: usize,
    pub l4: usize,
    pub v6: bool,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub proto: u8,
}

/// Parses what the fixtures build: an optional 802.1Q tag, IPv4 with options or IPv6 with
/// hop-by-hop, routing, destination options and authentication headers, then TCP/UDP.
pub fn frame_of(pkt: &[u8]) -> Frame {
    let l3 = if pkt[12..14] == [0x81, 0x00] { 18 } else { 14 };
    let v6 = pkt[l3 - 2..l3] == [0x86, 0xdd];
    let (src, dst, proto, l4) = if v6 {
        let (mut next, mut l4) = (pkt[l3 + 6], l3 + 40);
        while matches!(next, 0 | 43 | 51 | 60) {
            let len = usize::from(pkt[l4 + 1]);
            let size = if next == 51 {
                (len + 2) * 4
            } else {
                (len + 1) * 8
            };
            next = pkt[l4];
            l4 += size;
        }
        let ip = |o: usize| IpAddr::from(<[u8; 16]>::try_from(&pkt[o..o + 16]).expect("16 bytes"));
        (ip(l3 + 8), ip(l3 + 24), next, l4)
    } else {
        let ip = |o: usize| IpAddr::from(<[u8; 4]>::try_from(&pkt[o..o + 4]).expect("4 bytes"));
        let l4 = l3 + usize::from(pkt[l3] & 0x0f) * 4;
        (ip(l3 + 12), ip(l3 + 16), pkt[l3 + 9], l4)
    };
    let port = |o: usize| u16::from_be_bytes([pkt[o], pkt[o + 1]]);
    Frame {
        l3,
        l4,
        v6,
        src: SocketAddr::new(src, port(l4)),
        dst: SocketAddr::new(dst, port(l4 + 2)),
        proto,
    }
}

/// The IPv4 conntrack key of a frame.
pub fn flow_of(pkt: &[u8]) -> FlowKey {
    let f = frame_of(pkt);
    let (IpAddr::V4(src), IpAddr::V4(dst)) = (f.src.ip(), f.dst.ip()) else {
        panic!("an IPv4 frame: {f:?}");
    };
    FlowKey {
        src_be: u32::from_ne_bytes(src.octets()),
        dst_be: u32::from_ne_bytes(dst.octets()),
        sport_be: f.src.port().to_be(),
        dport_be: f.dst.port().to_be(),
        proto: f.proto,
        _pad: 0,
        _pad2: 0,
    }
}

/// The Maglev hash the data path computes for a frame, either family.
pub fn hash_of(pkt: &[u8]) -> u32 {
    let f = frame_of(pkt);
    match (f.src.ip(), f.dst.ip()) {
        (IpAddr::V6(src), IpAddr::V6(dst)) => flow_hash(&FlowKey6 {
            src_be: addr6_of(src),
            dst_be: addr6_of(dst),
            sport_be: f.src.port().to_be(),
            dport_be: f.dst.port().to_be(),
            proto: f.proto,
            _pad: 0,
            _pad2: 0,
        }),
        _ => flow_hash(&flow_of(pkt)),
    }
}

/// Checks the checksums of a rewritten frame by recomputing them from scratch: the IPv4
/// header's, and TCP/UDP's over its pseudo-header (IPv4 or IPv6).
pub fn assert_checksums_valid(name: &str, pkt: &[u8]) {
    let f = frame_of(pkt);
    let (l3, l4) = (f.l3, f.l4);
    let (segment, addrs) = if f.v6 {
        let payload = usize::from(u16::from_be_bytes([pkt[l3 + 4], pkt[l3 + 5]]));
        (&pkt[l4..l3 + 40 + payload], &pkt[l3 + 8..l3 + 40])
    } else {
        assert_eq!(
            ones_complement(&[&pkt[l3..l4]]),
            0,
            "{name}: IPv4 header checksum"
        );
        let total = usize::from(u16::from_be_bytes([pkt[l3 + 2], pkt[l3 + 3]]));
        (&pkt[l4..l3 + total], &pkt[l3 + 12..l3 + 20])
    };
    if f.proto == 17 && segment[6..8] == [0, 0] {
        assert!(!f.v6, "{name}: IPv6 UDP must carry a checksum");
        return; // IPv4 UDP without checksum
    }
    let len = (segment.len() as u16).to_be_bytes();
    let pseudo = [addrs, &[0, f.proto], &len[..]].concat();
    assert_eq!(
        ones_complement(&[&pseudo, segment]),
        0,
        "{name}: L4 checksum"
    );
}

pub fn tcp6_packet(src: [u8; 16], dst: [u8; 16], sport: u16, syn: bool) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv6(src, dst, 64)
        .tcp(sport, 80, 1000, 65535);
    let b = if syn { b.syn() } else { b.ack(5000) };
    let mut out = Vec::new();
    b.write(&mut out, b"GET / HTTP/1.1\r\n\r\n").expect("build");
    out
}

/// IPv6 extension headers, by next-header value.
pub const HOP_BY_HOP: u8 = 0;
pub const FRAGMENT: u8 = 44;
pub const AUTH: u8 = 51;
pub const DEST_OPTS: u8 = 60;

/// Inserts extension headers of these kinds between the IPv6 header and TCP/UDP of an
/// untagged frame (the L4 checksum does not cover them, so it stays valid). Options headers
/// carry one PadN option; an authentication header is 12 bytes; a fragment header says
/// "first fragment, more follow".
pub fn with_ext_headers(mut pkt: Vec<u8>, kinds: &[u8]) -> Vec<u8> {
    let l4_proto = pkt[14 + 6];
    let mut ext = Vec::new();
    for (i, &kind) in kinds.iter().enumerate() {
        let next = kinds.get(i + 1).copied().unwrap_or(l4_proto);
        match kind {
            AUTH => ext.extend_from_slice(&[next, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1]),
            FRAGMENT => ext.extend_from_slice(&[next, 0, 0, 1, 0, 0, 0, 7]),
            _ => ext.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]),
        }
    }
    pkt[14 + 6] = kinds[0];
    let payload = u16::from_be_bytes([pkt[18], pkt[19]]) + ext.len() as u16;
    pkt[18..20].copy_from_slice(&payload.to_be_bytes());
    pkt.splice(54..54, ext);
    pkt
}
