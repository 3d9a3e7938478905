//! This network namespace's TCP sockets (`/proc/net/tcp` and `tcp6`, read with procfs): the
//! established connections of each local backend (by peer), and whether it listens here.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use procfs::net::TcpState;

/// The TCP sockets of this network namespace. IPv4-mapped addresses (IPv4 clients of a
/// dual-stack socket) are counted as IPv4.
#[derive(Debug, Default)]
pub struct TcpSockets {
    /// The peers of ESTABLISHED sockets, by local address and port. (A half-open
    /// connection, which a spoofed SYN makes, is not one.)
    established: HashMap<(IpAddr, u16), Vec<SocketAddr>>,
    /// Listening sockets (0.0.0.0 or :: for a wildcard).
    listening: HashSet<(IpAddr, u16)>,
}

impl TcpSockets {
    /// Reads both tables; one that cannot be read (no IPv6, say) counts as empty.
    pub fn read() -> Self {
        let entries = [procfs::net::tcp(), procfs::net::tcp6()]
            .into_iter()
            .flat_map(Result::unwrap_or_default)
            .map(|e| (e.local_address, e.remote_address, e.state));
        Self::from_entries(entries)
    }

    fn from_entries(entries: impl Iterator<Item = (SocketAddr, SocketAddr, TcpState)>) -> Self {
        let mut out = Self::default();
        for (local, remote, state) in entries {
            let key = (local.ip().to_canonical(), local.port());
            match state {
                TcpState::Listen => {
                    out.listening.insert(key);
                }
                TcpState::Established => {
                    let peer = SocketAddr::new(remote.ip().to_canonical(), remote.port());
                    out.established.entry(key).or_default().push(peer);
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

    /// The peers of the established connections to `addr:port`.
    pub fn peers(&self, addr: IpAddr, port: u16) -> &[SocketAddr] {
        self.established
            .get(&(addr, port))
            .map_or(&[], Vec::as_slice)
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
        let peer = sock("198.18.0.9:40000");
        let any = sock("0.0.0.0:0");
        let s = TcpSockets::from_entries(
            [
                (sock("198.18.0.1:8001"), peer, TcpState::Established),
                // Half-open (a SYN that may be spoofed) and closed ones are not connections.
                (sock("198.18.0.1:8001"), peer, TcpState::SynRecv),
                (sock("198.18.0.1:8001"), peer, TcpState::TimeWait),
                // An IPv4 client of a dual-stack socket counts as IPv4.
                (
                    sock("[::ffff:198.18.0.1]:8001"),
                    sock("[::ffff:198.18.0.9]:40001"),
                    TcpState::Established,
                ),
                (
                    sock("[::1]:8002"),
                    sock("[::1]:40002"),
                    TcpState::Established,
                ),
                (sock("0.0.0.0:8001"), any, TcpState::Listen),
                (sock("[::]:8003"), any, TcpState::Listen),
            ]
            .into_iter(),
        );
        let v4: IpAddr = "198.18.0.1".parse().expect("v4");
        assert_eq!(
            s.peers(v4, 8001),
            &[peer, sock("198.18.0.9:40001")],
            "established only, IPv4-mapped peers as IPv4"
        );
        assert_eq!(s.peers(IpAddr::V6(Ipv6Addr::LOCALHOST), 8002).len(), 1);
        assert!(s.is_listening(v4, 8001), "an IPv4 wildcard");
        assert!(s.is_listening(v4, 8003), "a dual-stack wildcard");
        assert!(!s.is_listening(v4, 8002));
    }
}
