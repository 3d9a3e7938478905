//! The flow hashes that pick a Maglev slot, shared so that userspace (tests, `gpulb flows`)
//! can predict what the kernel chooses, and the address words the maps key by.

use crate::{Addr6, FlowKeyOf, MAGLEV_MAX_SIZE, Service};

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

/// Index into `MAGLEV_V2` for a flow hash in the service's current block.
#[inline(always)]
pub const fn maglev_index(service: &Service, hash: u32) -> u32 {
    service.block * MAGLEV_MAX_SIZE + hash % service.table_size
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FlowKey, FlowKey6, PROTO_TCP};

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
            _pad: 0,
            _pad2: 0,
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
            _pad: 0,
            _pad2: 0,
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
            _pad: 0,
            _pad2: 0,
        };
        assert_eq!(affinity_hash(&key(1)), affinity_hash(&key(2)));
        assert_ne!(flow_hash(&key(1)), flow_hash(&key(2)));
    }
}
