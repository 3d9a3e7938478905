//! This network namespace's TCP sockets (`/proc/net/tcp` and `tcp6`, read with procfs): how
//! many connections each local backend has, and whether it listens here.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use procfs::net::TcpState;

/// The TCP sockets of this network namespace. IPv4-mapped addresses (IPv4 clients of a
/// dual-stack socket) are counted as IPv4.
#[derive(Debug, Default)]
pub struct TcpSockets {
    /// ESTABLISHED or SYN_RECV, by local address and port.
    established: HashMap<(IpAddr, u16), usize>,
    /// Listening sockets (0.0.0.0 or :: for a wildcard).
    listening: HashSet<(IpAddr, u16)>,
}

impl TcpSockets {
    /// Reads both tables; one that cannot be read (no IPv6, say) counts as empty.
    pub fn read() -> Self {
        let entries = [procfs::net::tcp(), procfs::net::tcp6()]
            .into_iter()
            .flat_map(Result::unwrap_or_default)
            .map(|e| (e.local_address, e.state));
        Self::from_entries(entries)
    }

    fn from_entries(entries: impl Iterator<Item = (SocketAddr, TcpState)>) -> Self {
        let mut out = Self::default();
        for (local, state) in entries {
            let key = (local.ip().to_canonical(), local.port());
            match state {
                TcpState::Listen => {
                    out.listening.insert(key);
                }
                // SYN_RECV: a handshake the data path already sent here.
                TcpState::Established | TcpState::SynRecv | TcpState::NewSynRecv => {
                    *out.established.entry(key).or_insert(0) += 1;
                }
                _ => {}
            }
        }
        out
    }

    /// A socket listens on this address: its own, or the wildcard of its family, or `::`
    /// (dual-stack: it takes IPv4 too).
    pub fn is_listening(&self, addr: IpAddr, port: u16) -> bool {
        let wildcard = match addr {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        [addr, wildcard, IpAddr::V6(Ipv6Addr::UNSPECIFIED)]
            .iter()
            .any(|a| self.listening.contains(&(*a, port)))
    }

    /// Established (or being established) connections to `addr:port`.
    pub fn connections(&self, addr: IpAddr, port: u16) -> usize {
        self.established.get(&(addr, port)).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sock(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    #[test]
    fn connections_and_listeners_of_both_families() {
        let s = TcpSockets::from_entries(
            [
                (sock("198.18.0.1:8001"), TcpState::Established),
                (sock("198.18.0.1:8001"), TcpState::SynRecv),
                (sock("198.18.0.1:8001"), TcpState::TimeWait),
                // An IPv4 client of a dual-stack socket counts as IPv4.
                (sock("[::ffff:198.18.0.1]:8001"), TcpState::Established),
                (sock("[::1]:8002"), TcpState::Established),
                (sock("0.0.0.0:8001"), TcpState::Listen),
                (sock("[::]:8003"), TcpState::Listen),
            ]
            .into_iter(),
        );
        let v4: IpAddr = "198.18.0.1".parse().expect("v4");
        assert_eq!(s.connections(v4, 8001), 3);
        assert_eq!(s.connections(IpAddr::V6(Ipv6Addr::LOCALHOST), 8002), 1);
        assert!(s.is_listening(v4, 8001), "an IPv4 wildcard");
        assert!(s.is_listening(v4, 8003), "a dual-stack wildcard");
        assert!(!s.is_listening(v4, 8002));
    }
}
