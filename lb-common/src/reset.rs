//! The TCP RST+ACK that refuses a SYN, built as bytes: the XDP program writes it over the
//! SYN and sends it back; tests compare against it.

use crate::{Addr6, PROTO_TCP};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{addr6_of, ipv6_of};

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
}
