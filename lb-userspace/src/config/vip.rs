//! `[[vip]]`: an address, port and protocol clients connect to, its static backends, how
//! new flows are admitted and chosen.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use lb_common::{DEFAULT_CHOICES, MAGLEV_DEFAULT_SIZE, MAGLEV_MAX_SIZE, MAX_CHOICES};
use serde::{Deserialize, Serialize, de::IgnoredAny};

use super::{
    fields::{
        Cidr, FieldError, check_family, invalid, is_prime, parse_addr, parse_count,
        parse_max_flows, parse_ms, parse_port, parse_slots, parse_weight,
    },
    health::{CheckKind, HealthCheck, LoadSource, RawHealth},
};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::PROTO_TCP,
            Protocol::Udp => lb_common::PROTO_UDP,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            lb_common::PROTO_TCP => Some(Protocol::Tcp),
            lb_common::PROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// What a new flow's consistent hash is of: the scheduler keeps a flow on the hash's own
/// pick while that backend has a free slot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Affinity {
    /// The whole 5-tuple: every connection is placed on its own.
    None,
    /// The client address: a client's connections go to the same backend (and find its
    /// prefix cache) while that backend has room.
    #[default]
    Client,
}

/// How new flows are chosen (`[vip.scheduler]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheduler {
    /// Backends weighed per new flow: the hash's pick and the members after it.
    pub choices: u32,
    /// How often each engine is asked for its load.
    pub signal_interval: Duration,
    /// Engine numbers older than this are ignored: live flows alone count.
    pub signal_max_age: Duration,
    pub prefix_affinity: PrefixAffinity,
}

/// Whether a client's flows stay on its hash's picks while they have room (sticky), or
/// each goes to the least loaded candidate (balanced).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrefixAffinity {
    /// Sticky while the engines' prefix caches hit often enough to pay for it (they say
    /// so in their metrics), or when they do not say; balanced otherwise.
    #[default]
    Auto,
    /// Always sticky.
    On,
    /// Always balanced.
    Off,
}

/// How a refused new flow is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Refuse {
    /// A TCP RST, as a closed port would answer (TCP only).
    Rst,
    Drop,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vip {
    pub name: String,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub maglev_table_size: u32,
    /// `[[vip.backend]]`: processes gpulb does not start.
    pub backends: Vec<BackendConfig>,
    /// How those backends are checked.
    pub health: HealthCheck,
    pub affinity: Affinity,
    pub scheduler: Scheduler,
    pub admission: Admission,
}

impl Vip {
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.port)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Admission {
    pub rate: Option<RateLimit>,
    /// Refused SYNs are answered with a RST (else dropped).
    pub refuse_rst: bool,
    /// Allowed source prefixes; empty: all sources.
    pub allow: Vec<Cidr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// New flows per second per source.
    pub per_second: u32,
    pub burst: u32,
    /// IPv6 sources share a bucket per prefix of this length.
    pub ipv6_prefix: u8,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    pub address: IpAddr,
    pub port: u16,
    pub weight: u32,
    /// 0: no cap.
    pub max_flows: u16,
    /// Batch slots; 0: learned from its engine (if `load` names one).
    pub slots: u32,
    /// Where its engine reports its load; `None` by default (a server gpulb does not know).
    pub load: LoadSource,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawVip {
    name: String,
    address: String,
    port: i64,
    #[serde(default)]
    protocol: Protocol,
    maglev_table_size: Option<i64>,
    #[serde(default)]
    affinity: Affinity,
    #[serde(default)]
    scheduler: RawScheduler,
    /// Retired by the scheduler: each is refused with what to write instead.
    load_aware: Option<IgnoredAny>,
    load_bound: Option<IgnoredAny>,
    load_interval_ms: Option<IgnoredAny>,
    #[serde(default)]
    backend: Vec<RawBackend>,
    #[serde(default)]
    health: RawHealth,
    #[serde(default)]
    admission: RawAdmission,
}

/// `[vip.scheduler]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScheduler {
    choices: Option<i64>,
    signal_interval_ms: Option<i64>,
    signal_max_age_ms: Option<i64>,
    #[serde(default)]
    prefix_affinity: PrefixAffinity,
}

/// How often engines are asked, by default: the llm-d endpoint picker's 50 ms.
const DEFAULT_SIGNAL_INTERVAL_MS: i64 = 50;
/// Engine numbers this old are ignored, by default (ten missed answers).
const DEFAULT_SIGNAL_MAX_AGE_MS: i64 = 500;

impl RawScheduler {
    fn validate(self, field: &str) -> Result<Scheduler, FieldError> {
        let f = |name: &str| format!("{field}.{name}");
        let choices = match self.choices {
            None => DEFAULT_CHOICES,
            Some(n) => parse_count(&f("choices"), n, i64::from(MAX_CHOICES))?,
        };
        let interval_ms = self
            .signal_interval_ms
            .unwrap_or(DEFAULT_SIGNAL_INTERVAL_MS);
        let signal_interval = parse_ms(&f("signal_interval_ms"), interval_ms, 10, 60_000)?;
        let max_age_ms = self
            .signal_max_age_ms
            .unwrap_or(DEFAULT_SIGNAL_MAX_AGE_MS.max(10 * interval_ms));
        let signal_max_age = parse_ms(&f("signal_max_age_ms"), max_age_ms, 20, 600_000)?;
        if signal_max_age < 2 * signal_interval {
            return Err(invalid(
                f("signal_max_age_ms"),
                format!(
                    "{max_age_ms} is below twice signal_interval_ms ({interval_ms}): every \
                     signal would be stale before the next"
                ),
            ));
        }
        Ok(Scheduler {
            choices,
            signal_interval,
            signal_max_age,
            prefix_affinity: self.prefix_affinity,
        })
    }
}

/// `[vip.admission]`: which new flows the data path accepts.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmission {
    /// New flows per second per source address.
    rate: Option<i64>,
    /// New flows a source may open at once (default: `rate`).
    burst: Option<i64>,
    /// IPv6 VIPs: the prefix length whose addresses share one bucket (default 64).
    ipv6_prefix: Option<i64>,
    refuse: Option<Refuse>,
    /// Source CIDRs allowed to open flows (absent: all).
    allow: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: String,
    port: i64,
    #[serde(default = "default_weight")]
    weight: i64,
    #[serde(default)]
    max_flows: i64,
    #[serde(default)]
    slots: i64,
    #[serde(default = "default_backend_load")]
    load: LoadSource,
}

fn default_backend_load() -> LoadSource {
    LoadSource::None
}

pub(super) fn default_weight() -> i64 {
    1
}

impl RawVip {
    pub(super) fn validate(self, i: usize) -> Result<Vip, FieldError> {
        let f = |name: &str| format!("vip[{i}].{name}");
        if self.name.trim().is_empty() {
            return Err(invalid(f("name"), "must not be empty"));
        }
        let retired = [
            (
                "load_aware",
                self.load_aware.is_some(),
                "every VIP now schedules by live flows and the engines' load; delete this line",
            ),
            (
                "load_bound",
                self.load_bound.is_some(),
                "the scheduler keeps a client on its instance while it has a free slot and \
                 otherwise picks the least loaded; delete this line ([vip.scheduler] choices \
                 sets how many backends it weighs)",
            ),
            (
                "load_interval_ms",
                self.load_interval_ms.is_some(),
                "write [vip.scheduler] signal_interval_ms instead",
            ),
        ];
        if let Some((name, _, why)) = retired.iter().find(|(_, set, _)| *set) {
            return Err(invalid(f(name), format!("no longer exists: {why}")));
        }
        let address = parse_addr(&f("address"), &self.address)?;
        let port = parse_port(&f("port"), self.port)?;
        let protocol = self.protocol;
        // UDP services have no HTTP endpoint to probe.
        let default_check = match protocol {
            Protocol::Tcp => CheckKind::Http,
            Protocol::Udp => CheckKind::None,
        };
        let size = self.maglev_table_size.unwrap_or(MAGLEV_DEFAULT_SIZE as i64);
        let maglev_table_size = match u32::try_from(size) {
            Ok(n) if n <= MAGLEV_MAX_SIZE && is_prime(n) => n,
            _ => {
                return Err(invalid(
                    f("maglev_table_size"),
                    format!("{size} must be a prime no larger than {MAGLEV_MAX_SIZE}"),
                ));
            }
        };
        if self.backend.len() > maglev_table_size as usize {
            return Err(invalid(
                f("maglev_table_size"),
                format!(
                    "{maglev_table_size} is smaller than the number of backends ({})",
                    self.backend.len()
                ),
            ));
        }
        let mut backends: Vec<BackendConfig> = Vec::with_capacity(self.backend.len());
        for (j, raw) in self.backend.into_iter().enumerate() {
            let b = raw.validate(&format!("vip[{i}].backend[{j}]"), address, protocol)?;
            if let Some(prev) = backends
                .iter()
                .position(|o| o.address == b.address && o.port == b.port)
            {
                return Err(invalid(
                    format!("vip[{i}].backend[{j}]"),
                    format!(
                        "duplicate backend {} (also vip[{i}].backend[{prev}])",
                        SocketAddr::new(b.address, b.port)
                    ),
                ));
            }
            backends.push(b);
        }
        Ok(Vip {
            name: self.name,
            address,
            port,
            protocol,
            maglev_table_size,
            backends,
            health: self.health.validate(
                &f("health"),
                default_check,
                None,
                false,
                &super::health::daemon_env,
            )?,
            affinity: self.affinity,
            scheduler: self.scheduler.validate(&f("scheduler"))?,
            admission: self
                .admission
                .validate(&f("admission"), protocol, address)?,
        })
    }
}

impl RawBackend {
    fn validate(
        self,
        field: &str,
        vip: IpAddr,
        protocol: Protocol,
    ) -> Result<BackendConfig, FieldError> {
        let bf = |name: &str| format!("{field}.{name}");
        let address = parse_addr(&bf("address"), &self.address)?;
        check_family(&bf("address"), address, vip)?;
        let port = parse_port(&bf("port"), self.port)?;
        let weight = parse_weight(&bf("weight"), self.weight)?;
        let max_flows = parse_max_flows(&bf("max_flows"), self.max_flows)?;
        // Only TCP flows are counted (a FIN or RST ends them); UDP has no end to count.
        if max_flows != 0 && protocol == Protocol::Udp {
            return Err(invalid(bf("max_flows"), "needs a TCP VIP"));
        }
        Ok(BackendConfig {
            address,
            port,
            weight,
            max_flows,
            slots: parse_slots(&bf("slots"), self.slots)?,
            load: self.load,
        })
    }
}

impl RawAdmission {
    fn validate(
        self,
        field: &str,
        protocol: Protocol,
        vip: IpAddr,
    ) -> Result<Admission, FieldError> {
        let f = |name: &str| format!("{field}.{name}");
        let ipv6_prefix = match self.ipv6_prefix {
            None => lb_common::RATE_V6_PREFIX_DEFAULT as u8,
            Some(_) if self.rate.is_none() => {
                return Err(invalid(f("ipv6_prefix"), "needs a rate"));
            }
            Some(_) if vip.is_ipv4() => {
                return Err(invalid(f("ipv6_prefix"), "applies to IPv6 VIPs only"));
            }
            Some(n) if (1..=128).contains(&n) => n as u8,
            Some(n) => {
                return Err(invalid(
                    f("ipv6_prefix"),
                    format!("{n} is out of range 1-128"),
                ));
            }
        };
        let rate = match (self.rate, self.burst) {
            (None, None) => None,
            (None, Some(_)) => return Err(invalid(f("burst"), "needs a rate")),
            (Some(rate), burst) => {
                let per_second = parse_count(&f("rate"), rate, 1_000_000)?;
                let burst = parse_count(&f("burst"), burst.unwrap_or(rate), 1_000_000)?;
                Some(RateLimit {
                    per_second,
                    burst,
                    ipv6_prefix,
                })
            }
        };
        let refuse_rst = match self.refuse {
            None => protocol == Protocol::Tcp,
            Some(Refuse::Rst) if protocol == Protocol::Tcp => true,
            Some(Refuse::Rst) => return Err(invalid(f("refuse"), "\"rst\" needs a TCP VIP")),
            Some(Refuse::Drop) => false,
        };
        let mut allow: Vec<Cidr> = Vec::new();
        for (k, text) in self.allow.iter().flatten().enumerate() {
            let cidr = Cidr::parse(&format!("{field}.allow[{k}]"), text)?;
            check_family(&format!("{field}.allow[{k}]"), cidr.addr, vip)?;
            if !allow.contains(&cidr) {
                allow.push(cidr);
            }
        }
        if self.allow.is_some_and(|a| a.is_empty()) {
            return Err(invalid(
                f("allow"),
                "is empty, which would refuse every client; leave it out to allow all",
            ));
        }
        Ok(Admission {
            rate,
            refuse_rst,
            allow,
        })
    }
}
