//! Parsers of single fields: each error names the field and the value.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

/// `(field, message)`: what `Config::parse` reports as `ConfigError::Invalid`.
pub type FieldError = (String, String);

pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    (field.into(), message.into())
}

/// Largest weight a backend may have.
pub const WEIGHT_MAX: i64 = 1_000_000;

pub fn parse_port(field: &str, port: i64) -> Result<u16, FieldError> {
    match u16::try_from(port) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(invalid(field, format!("{port} is out of range 1-65535"))),
    }
}

/// A unicast address that the data path can translate to or from.
pub fn parse_addr(field: &str, addr: &str) -> Result<IpAddr, FieldError> {
    let ip: IpAddr = addr
        .parse()
        .map_err(|_| invalid(field, format!("{addr:?} is not an IPv4 or IPv6 address")))?;
    let not_unicast = match ip {
        IpAddr::V4(v4) => v4.is_broadcast(),
        IpAddr::V6(_) => false,
    };
    if ip.is_unspecified() || ip.is_multicast() || not_unicast {
        return Err(invalid(field, format!("{addr:?} is not a unicast address")));
    }
    if let IpAddr::V6(v6) = ip {
        if v6.to_ipv4_mapped().is_some() {
            return Err(invalid(
                field,
                format!("{addr:?} is an IPv4-mapped address: write the IPv4 address"),
            ));
        }
        if v6.is_unicast_link_local() {
            return Err(invalid(
                field,
                format!("{addr:?} is link-local, which needs an interface scope: not supported"),
            ));
        }
    }
    Ok(ip)
}

pub fn parse_ms(field: &str, ms: i64, min: i64, max: i64) -> Result<Duration, FieldError> {
    if !(min..=max).contains(&ms) {
        return Err(invalid(field, format!("{ms} is out of range {min}-{max}")));
    }
    Ok(Duration::from_millis(ms as u64))
}

pub fn parse_count(field: &str, n: i64, max: i64) -> Result<u32, FieldError> {
    if !(1..=max).contains(&n) {
        return Err(invalid(field, format!("{n} is out of range 1-{max}")));
    }
    Ok(n as u32)
}

pub fn parse_max_flows(field: &str, n: i64) -> Result<u16, FieldError> {
    u16::try_from(n).map_err(|_| invalid(field, format!("{n} is out of range 0 (no cap)-65535")))
}

/// Batch slots: 0 (learned from the engine) to 65535.
pub fn parse_slots(field: &str, n: i64) -> Result<u32, FieldError> {
    match u16::try_from(n) {
        Ok(n) => Ok(u32::from(n)),
        Err(_) => Err(invalid(
            field,
            format!("{n} is out of range 0 (learned from the engine)-65535"),
        )),
    }
}

pub fn parse_weight(field: &str, weight: i64) -> Result<u32, FieldError> {
    match u32::try_from(weight) {
        Ok(w) if i64::from(w) <= WEIGHT_MAX => Ok(w),
        _ => Err(invalid(
            field,
            format!("{weight} is out of range 0-{WEIGHT_MAX}"),
        )),
    }
}

pub fn is_prime(n: u32) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

/// The family of an address, for errors: "IPv4" or "IPv6".
fn family(addr: IpAddr) -> &'static str {
    if addr.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// A VIP's backends, models and allowed prefixes are of its own family: the data path
/// translates addresses, not families.
pub fn check_family(field: &str, addr: IpAddr, vip: IpAddr) -> Result<(), FieldError> {
    if addr.is_ipv4() == vip.is_ipv4() {
        return Ok(());
    }
    Err(invalid(
        field,
        format!(
            "{addr} is {}, but the VIP {vip} is {}",
            family(addr),
            family(vip)
        ),
    ))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl Cidr {
    /// `a.b.c.d/n` or `x:y::/n` with no host bits set, or a bare address (/32, /128).
    pub fn parse(field: &str, text: &str) -> Result<Self, FieldError> {
        let bad = |why: &str| invalid(field, format!("{text:?} {why}"));
        let (addr, len) = text.split_once('/').unwrap_or((text, ""));
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| bad("is not an IPv4 or IPv6 CIDR"))?;
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            "" => bits,
            l => l
                .parse::<u8>()
                .ok()
                .filter(|&l| l <= bits)
                .ok_or_else(|| bad(&format!("has no prefix length 0-{bits}")))?,
        };
        let network = Self::network(addr, len);
        if network != addr {
            return Err(bad(&format!(
                "has host bits set (the network is {network}/{len})"
            )));
        }
        Ok(Self { addr, len })
    }

    /// `addr` with the bits past `len` cleared.
    fn network(addr: IpAddr, len: u8) -> IpAddr {
        match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        }
    }
}
