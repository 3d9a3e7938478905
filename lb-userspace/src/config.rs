//! The TOML config: serde types, then `validate()`, which turns them into a checked
//! [`Config`]. Every error names the field and the value. Nothing here touches BPF.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use lb_common::{
    ALLOW_ENTRIES, MAGLEV_DEFAULT_SIZE, MAGLEV_MAX_SIZE, MAX_BACKENDS, MAX_CANDIDATES, MAX_SERVICES,
};
use serde::{Deserialize, Serialize};

pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/gpulb";
pub const DEFAULT_STATE_DIR: &str = "/run/gpulb";
pub const DEFAULT_LOG_DIR: &str = "/var/log/gpulb";
/// The control socket, under `state_dir`.
pub const CONTROL_SOCKET: &str = "control.sock";
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";
/// A `[[model]]`'s command when `gpus = "simulated:N"` names none.
pub const SIM_COMMAND: [&str; 7] = [
    "gpulb-sim",
    "--listen",
    "{listen}",
    "--name",
    "{name}",
    "--model",
    "{model}",
];

/// The cgroup v2 root, wherever it is mounted: every process on the host.
pub const DEFAULT_SOCKET_LB: &str = "auto";

/// Which processes' sockets to VIPs are balanced at connect().
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketLb {
    Off,
    /// The root of the cgroup v2 hierarchy (found in /proc/self/mounts; none: off, warned).
    Auto,
    Cgroup(PathBuf),
}
/// Smallest and largest conntrack size accepted (entries).
const CONNTRACK_MIN: u64 = 1024;
const CONNTRACK_MAX: u64 = 1 << 26;
pub const WEIGHT_MAX: i64 = 1_000_000;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    interface: String,
    #[serde(default)]
    xdp_mode: XdpMode,
    pin_path: Option<PathBuf>,
    conntrack_size: Option<i64>,
    conntrack_size_v6: Option<i64>,
    state_dir: Option<PathBuf>,
    log_dir: Option<PathBuf>,
    #[serde(default = "default_drain_timeout_ms")]
    drain_timeout_ms: i64,
    #[serde(default = "default_kill_timeout_ms")]
    kill_timeout_ms: i64,
    /// `host:port` of the Prometheus endpoint, or "off".
    metrics_listen: Option<String>,
    /// The cgroup (v2) whose processes' sockets to VIPs are balanced, or "off".
    socket_lb: Option<String>,
    #[serde(default)]
    vip: Vec<RawVip>,
    #[serde(default)]
    model: Vec<RawModel>,
}

fn default_drain_timeout_ms() -> i64 {
    30_000
}

fn default_kill_timeout_ms() -> i64 {
    10_000
}

/// `[[model]]`: a model server, one instance per GPU (or per `gpus_per_instance` GPUs).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    name: String,
    vip: String,
    #[serde(default)]
    command: Vec<String>,
    served_model: Option<String>,
    gpus: RawGpus,
    #[serde(default = "default_gpus_per_instance")]
    gpus_per_instance: i64,
    address: String,
    base_port: i64,
    #[serde(default = "default_weight")]
    weight: i64,
    /// Most concurrent TCP flows one instance takes (0: no cap).
    #[serde(default)]
    max_flows: i64,
    #[serde(default)]
    env: BTreeMap<String, String>,
    /// Where the instances report their load: "vllm", "sglang", "tgi" (`/metrics`), "llamacpp" (`/slots`),
    /// "nvml" (GPU utilisation and memory), "none".
    #[serde(default = "default_load_source")]
    load: String,
    #[serde(default = "default_restart_delay_ms")]
    restart_delay_ms: i64,
    #[serde(default = "default_restart_delay_max_ms")]
    restart_delay_max_ms: i64,
    #[serde(default = "default_stable_after_ms")]
    stable_after_ms: i64,
    #[serde(default)]
    health: RawHealth,
}

fn default_load_interval_ms() -> i64 {
    250
}

fn default_load_source() -> String {
    "vllm".into()
}

fn default_gpus_per_instance() -> i64 {
    1
}
fn default_restart_delay_ms() -> i64 {
    1_000
}
fn default_restart_delay_max_ms() -> i64 {
    60_000
}
fn default_stable_after_ms() -> i64 {
    60_000
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawGpus {
    /// `"all"` or `"simulated:N"`.
    Named(String),
    List(Vec<RawGpuRef>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawGpuRef {
    Index(i64),
    Uuid(String),
}

/// `health` of a model or a VIP (for its `[[vip.backend]]`s).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    check: Option<String>,
    path: Option<String>,
    /// External backends: the model `/v1/models` must list (none: not checked).
    model: Option<String>,
    interval_ms: Option<i64>,
    timeout_ms: Option<i64>,
    rise: Option<i64>,
    fall: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVip {
    name: String,
    address: String,
    port: i64,
    #[serde(default = "default_protocol")]
    protocol: String,
    maglev_table_size: Option<i64>,
    /// Steer new flows by the backends' reported load (models with a `load` source).
    #[serde(default)]
    load_aware: bool,
    #[serde(default = "default_load_interval_ms")]
    load_interval_ms: i64,
    /// "client": every connection of a client address goes to the same backend.
    #[serde(default = "default_affinity")]
    affinity: String,
    /// Bounded load: a backend takes a new flow only below this multiple of its weighted
    /// share of the VIP's live flows (0: off).
    #[serde(default)]
    load_bound: f64,
    #[serde(default)]
    backend: Vec<RawBackend>,
    #[serde(default)]
    health: RawHealth,
    #[serde(default)]
    admission: RawAdmission,
}

/// `[vip.admission]`: which new flows the data path accepts.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmission {
    /// New flows per second per source address.
    rate: Option<i64>,
    /// New flows a source may open at once (default: `rate`).
    burst: Option<i64>,
    /// "rst" or "drop".
    refuse: Option<String>,
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
}

fn default_affinity() -> String {
    "none".into()
}

fn default_protocol() -> String {
    "tcp".into()
}

fn default_weight() -> i64 {
    1
}

/// How the XDP program is attached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Native (driver) mode, falling back to generic with a warning.
    #[default]
    Auto,
    Native,
    Generic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
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

/// A validated config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub interface: String,
    pub xdp_mode: XdpMode,
    pub pin_path: PathBuf,
    /// Control socket and the record of running instances (for takeover).
    pub state_dir: PathBuf,
    /// One output file per model instance.
    pub log_dir: PathBuf,
    pub conntrack_size: u32,
    /// Entries of the IPv6 conntrack (a table of its own).
    pub conntrack_size_v6: u32,
    /// How long a drain waits for a backend's connections to end.
    pub drain_timeout: Duration,
    /// How long a stopping instance gets between SIGTERM and SIGKILL.
    pub kill_timeout: Duration,
    /// Where `/metrics` is served; `None`: nowhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The cgroup whose processes (in gpulb's network namespace) have their connects to a VIP
    /// balanced at the socket.
    pub socket_lb: SocketLb,
    pub vips: Vec<Vip>,
    pub models: Vec<Model>,
}

impl Config {
    pub fn control_socket(&self) -> PathBuf {
        self.state_dir.join(CONTROL_SOCKET)
    }
}

/// A model server: its instances are the backends of `vip`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Model {
    pub name: String,
    pub vip: String,
    /// argv with `{port}`, `{address}`, `{listen}` (address:port, an IPv6 address in
    /// brackets), `{name}`, `{model}`, `{gpus}`, `{tp}` placeholders.
    pub command: Vec<String>,
    /// What `/v1/models` must list before an instance is ready.
    pub served_model: String,
    pub gpus: GpuSelection,
    pub gpus_per_instance: u32,
    pub address: IpAddr,
    pub base_port: u16,
    pub weight: u32,
    /// Per instance; 0: no cap.
    pub max_flows: u16,
    pub env: BTreeMap<String, String>,
    pub load: crate::load::LoadSource,
    pub restart_delay: Duration,
    pub restart_delay_max: Duration,
    /// An instance up this long has its restart delay reset.
    pub stable_after: Duration,
    pub health: HealthCheck,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuSelection {
    /// Every GPU NVML finds.
    All,
    List(Vec<GpuRef>),
    /// N simulated GPUs: instances run `gpulb-sim` unless `command` says otherwise.
    Simulated(u32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuRef {
    Index(u32),
    Uuid(String),
}

impl fmt::Display for GpuRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GpuRef::Index(i) => write!(f, "{i}"),
            GpuRef::Uuid(u) => f.write_str(u),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// GET `path` answers 2xx, and `/v1/models` lists the model if one is named.
    Http,
    /// A TCP connect succeeds.
    Tcp,
    /// Always healthy (the process being alive is enough).
    None,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub kind: CheckKind,
    pub path: String,
    pub model: Option<String>,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes before a backend is ready.
    pub rise: u32,
    /// Consecutive failures before a ready backend is unhealthy.
    pub fall: u32,
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
    /// New flows steered by load (weights follow the backends' reported load).
    pub load_aware: bool,
    pub load_interval: Duration,
    /// Hash the client address only.
    pub affinity: bool,
    /// Bounded load in percent of a backend's share (125 for 1.25); 0: off.
    pub load_bound_pct: u32,
    pub admission: Admission,
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

/// The family of an address, for errors: "IPv4" or "IPv6".
fn family(addr: IpAddr) -> &'static str {
    if addr.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// A VIP's backends, models and allowed prefixes are of its own family: the data path
/// translates addresses, not families.
fn check_family(field: &str, addr: IpAddr, vip: IpAddr) -> Result<(), FieldError> {
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    pub address: IpAddr,
    pub port: u16,
    pub weight: u32,
    /// 0: no cap.
    pub max_flows: u16,
}

impl Config {
    /// Read, parse, validate, and check that the interface exists in this network namespace.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config = Self::parse(path, &text)?;
        if nix::net::if_::if_nametoindex(config.interface.as_str()).is_err() {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                field: "interface".into(),
                message: format!("no network interface named {:?}", config.interface),
            });
        }
        Ok(config)
    }

    /// Parse and validate text; `path` only names the source in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        raw.validate()
            .map_err(|(field, message)| ConfigError::Invalid {
                path: path.to_owned(),
                field,
                message,
            })
    }
}

type FieldError = (String, String);

fn invalid(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    (field.into(), message.into())
}

fn parse_port(field: &str, port: i64) -> Result<u16, FieldError> {
    match u16::try_from(port) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(invalid(field, format!("{port} is out of range 1-65535"))),
    }
}

fn parse_addr(field: &str, addr: &str) -> Result<IpAddr, FieldError> {
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

fn parse_conntrack(field: &str, size: Option<i64>, default: u32) -> Result<u32, FieldError> {
    match size {
        None => Ok(default),
        Some(n) if (CONNTRACK_MIN as i64..=CONNTRACK_MAX as i64).contains(&n) => Ok(n as u32),
        Some(n) => Err(invalid(
            field,
            format!("{n} is out of range {CONNTRACK_MIN}-{CONNTRACK_MAX}"),
        )),
    }
}

fn is_prime(n: u32) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

impl RawConfig {
    fn validate(self) -> Result<Config, FieldError> {
        if self.interface.trim().is_empty() {
            return Err(invalid("interface", "must name a network interface"));
        }
        let pin_path = self.pin_path.unwrap_or_else(|| DEFAULT_PIN_PATH.into());
        if !pin_path.is_absolute() {
            return Err(invalid(
                "pin_path",
                format!("{} is not an absolute path", pin_path.display()),
            ));
        }
        let conntrack_size = parse_conntrack(
            "conntrack_size",
            self.conntrack_size,
            lb_common::CONNTRACK_DEFAULT_SIZE,
        )?;
        let conntrack_size_v6 = parse_conntrack(
            "conntrack_size_v6",
            self.conntrack_size_v6,
            lb_common::CONNTRACK6_DEFAULT_SIZE,
        )?;
        if self.vip.len() > MAX_SERVICES as usize {
            return Err(invalid(
                "vip",
                format!(
                    "{} VIPs, at most {MAX_SERVICES} are supported",
                    self.vip.len()
                ),
            ));
        }

        let mut vips: Vec<Vip> = Vec::with_capacity(self.vip.len());
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut keys: HashMap<(IpAddr, u16, Protocol), usize> = HashMap::new();
        let mut total_backends = 0usize;
        for (i, raw) in self.vip.into_iter().enumerate() {
            let vip = raw.validate(i)?;
            if let Some(prev) = names.insert(vip.name.clone(), i) {
                return Err(invalid(
                    format!("vip[{i}].name"),
                    format!("{:?} already used by vip[{prev}]", vip.name),
                ));
            }
            if let Some(prev) = keys.insert((vip.address, vip.port, vip.protocol), i) {
                return Err(invalid(
                    format!("vip[{i}]"),
                    format!(
                        "{}/{} already defined by vip[{prev}] ({:?})",
                        SocketAddr::new(vip.address, vip.port),
                        vip.protocol,
                        vips[prev].name
                    ),
                ));
            }
            total_backends += vip.backends.len();
            vips.push(vip);
        }
        let models = validate_models(self.model, &vips)?;
        for (i, vip) in vips.iter().enumerate() {
            check_vip_can_serve(i, vip, models.iter().any(|m| m.vip == vip.name))?;
        }
        // Backend id 0 is reserved.
        let model_instances: usize = models
            .iter()
            .map(|m| m.instance_count().unwrap_or(0) as usize)
            .sum();
        if total_backends + model_instances >= MAX_BACKENDS as usize {
            return Err(invalid(
                "vip",
                format!(
                    "{} backends in all, at most {} are supported",
                    total_backends + model_instances,
                    MAX_BACKENDS - 1
                ),
            ));
        }
        let allowed: usize = vips.iter().map(|v| v.admission.allow.len()).sum();
        if allowed > ALLOW_ENTRIES as usize {
            return Err(invalid(
                "vip",
                format!(
                    "{allowed} admission.allow prefixes in all, at most {ALLOW_ENTRIES} are supported"
                ),
            ));
        }
        // Caps and bounded load choose among at most MAX_CANDIDATES backends per VIP.
        for (i, vip) in vips.iter().enumerate() {
            let instances: usize = models
                .iter()
                .filter(|m| m.vip == vip.name)
                .map(|m| m.instance_count().unwrap_or(0) as usize)
                .sum();
            let n = vip.backends.len() + instances;
            let checks_load = vip.load_bound_pct != 0
                || vip.backends.iter().any(|b| b.max_flows != 0)
                || models.iter().any(|m| m.vip == vip.name && m.max_flows != 0);
            if checks_load && n > MAX_CANDIDATES {
                return Err(invalid(
                    format!("vip[{i}]"),
                    format!(
                        "{n} backends with max_flows or load_bound; at most {MAX_CANDIDATES} are supported"
                    ),
                ));
            }
        }
        let state_dir = self.state_dir.unwrap_or_else(|| DEFAULT_STATE_DIR.into());
        let log_dir = self.log_dir.unwrap_or_else(|| DEFAULT_LOG_DIR.into());
        for (field, dir) in [("state_dir", &state_dir), ("log_dir", &log_dir)] {
            if !dir.is_absolute() {
                return Err(invalid(
                    field,
                    format!("{} is not an absolute path", dir.display()),
                ));
            }
        }
        let metrics_listen = match self
            .metrics_listen
            .as_deref()
            .unwrap_or(DEFAULT_METRICS_LISTEN)
        {
            "off" => None,
            addr => Some(addr.parse().map_err(|_| {
                invalid(
                    "metrics_listen",
                    format!("{addr:?} is not an address:port (or \"off\")"),
                )
            })?),
        };
        let socket_lb = match self.socket_lb.as_deref().unwrap_or(DEFAULT_SOCKET_LB) {
            "off" => SocketLb::Off,
            "auto" => SocketLb::Auto,
            path if Path::new(path).is_absolute() => SocketLb::Cgroup(PathBuf::from(path)),
            path => {
                return Err(invalid(
                    "socket_lb",
                    format!("{path:?} is not \"auto\", \"off\" or an absolute cgroup v2 path"),
                ));
            }
        };
        Ok(Config {
            metrics_listen,
            socket_lb,
            interface: self.interface,
            xdp_mode: self.xdp_mode,
            pin_path,
            state_dir,
            log_dir,
            conntrack_size,
            conntrack_size_v6,
            drain_timeout: parse_ms("drain_timeout_ms", self.drain_timeout_ms, 0, 3_600_000)?,
            kill_timeout: parse_ms("kill_timeout_ms", self.kill_timeout_ms, 0, 600_000)?,
            vips,
            models,
        })
    }
}

/// A VIP must be able to serve: a model, or a static backend of non-zero weight.
fn check_vip_can_serve(i: usize, vip: &Vip, has_model: bool) -> Result<(), FieldError> {
    if has_model {
        return Ok(());
    }
    let backends = &vip.backends;
    if backends.is_empty() {
        return Err(invalid(
            format!("vip[{i}].backend"),
            "a VIP needs at least one backend or a [[model]] that serves it",
        ));
    }
    if backends.iter().all(|b| b.weight == 0) {
        return Err(if backends.len() == 1 {
            invalid(
                format!("vip[{i}].backend[0].weight"),
                "0 on the only backend: the VIP could serve no connection",
            )
        } else {
            invalid(
                format!("vip[{i}].backend"),
                "every backend has weight 0: the VIP could serve no connection",
            )
        });
    }
    Ok(())
}

fn parse_ms(field: &str, ms: i64, min: i64, max: i64) -> Result<Duration, FieldError> {
    if !(min..=max).contains(&ms) {
        return Err(invalid(field, format!("{ms} is out of range {min}-{max}")));
    }
    Ok(Duration::from_millis(ms as u64))
}

fn parse_count(field: &str, n: i64, max: i64) -> Result<u32, FieldError> {
    if !(1..=max).contains(&n) {
        return Err(invalid(field, format!("{n} is out of range 1-{max}")));
    }
    Ok(n as u32)
}

fn parse_max_flows(field: &str, n: i64) -> Result<u16, FieldError> {
    u16::try_from(n).map_err(|_| invalid(field, format!("{n} is out of range 0 (no cap)-65535")))
}

fn parse_weight(field: &str, weight: i64) -> Result<u32, FieldError> {
    match u32::try_from(weight) {
        Ok(w) if i64::from(w) <= WEIGHT_MAX => Ok(w),
        _ => Err(invalid(
            field,
            format!("{weight} is out of range 0-{WEIGHT_MAX}"),
        )),
    }
}

impl RawHealth {
    /// `default_model`: what `/v1/models` must list when `model` is not given.
    fn validate(
        self,
        field: &str,
        default_kind: CheckKind,
        default_model: Option<String>,
    ) -> Result<HealthCheck, FieldError> {
        let f = |name: &str| format!("{field}.{name}");
        let kind = match self.check.as_deref() {
            None => default_kind,
            Some("http") => CheckKind::Http,
            Some("tcp") => CheckKind::Tcp,
            Some("none") => CheckKind::None,
            Some(other) => {
                return Err(invalid(
                    f("check"),
                    format!("{other:?} is not \"http\", \"tcp\" or \"none\""),
                ));
            }
        };
        let path = self.path.unwrap_or_else(|| "/health".into());
        if !path.starts_with('/') {
            return Err(invalid(f("path"), format!("{path:?} must start with '/'")));
        }
        let interval = parse_ms(
            &f("interval_ms"),
            self.interval_ms.unwrap_or(1000),
            10,
            3_600_000,
        )?;
        let timeout = parse_ms(
            &f("timeout_ms"),
            self.timeout_ms.unwrap_or(1000),
            10,
            600_000,
        )?;
        Ok(HealthCheck {
            kind,
            path,
            model: self.model.or(default_model),
            interval,
            timeout,
            rise: parse_count(&f("rise"), self.rise.unwrap_or(1), 100)?,
            fall: parse_count(&f("fall"), self.fall.unwrap_or(3), 100)?,
        })
    }
}

impl Model {
    /// Instances this model runs; `None` for `gpus = "all"` (known after GPU discovery).
    pub fn instance_count(&self) -> Option<u32> {
        let gpus = match &self.gpus {
            GpuSelection::All => return None,
            GpuSelection::List(l) => l.len() as u32,
            GpuSelection::Simulated(n) => *n,
        };
        Some(gpus / self.gpus_per_instance)
    }
}

fn validate_models(raw: Vec<RawModel>, vips: &[Vip]) -> Result<Vec<Model>, FieldError> {
    let mut models: Vec<Model> = Vec::with_capacity(raw.len());
    for (i, raw) in raw.into_iter().enumerate() {
        let model = raw.validate(i, vips)?;
        if let Some(prev) = models.iter().position(|m| m.name == model.name) {
            return Err(invalid(
                format!("model[{i}].name"),
                format!("{:?} already used by model[{prev}]", model.name),
            ));
        }
        if let GpuSelection::List(gpus) = &model.gpus {
            for gpu in gpus {
                let other = models.iter().find(|m| match &m.gpus {
                    GpuSelection::List(l) => l.contains(gpu),
                    GpuSelection::All => true,
                    GpuSelection::Simulated(_) => false,
                });
                if let Some(other) = other {
                    return Err(invalid(
                        format!("model[{i}].gpus"),
                        format!("gpu {gpu} already used by {:?}", other.name),
                    ));
                }
            }
        }
        if model.gpus == GpuSelection::All
            && let Some(other) = models
                .iter()
                .find(|m| !matches!(m.gpus, GpuSelection::Simulated(_)))
        {
            return Err(invalid(
                format!("model[{i}].gpus"),
                format!("\"all\" overlaps the GPUs of {:?}", other.name),
            ));
        }
        // Instance ports must not collide with each other or with static backends.
        let vip = vips.iter().find(|v| v.name == model.vip).expect("checked");
        let count = model.instance_count().unwrap_or(1);
        for n in 0..count {
            let port = model.base_port as u32 + n;
            let clash = vip
                .backends
                .iter()
                .position(|b| b.address == model.address && u32::from(b.port) == port);
            if let Some(j) = clash {
                return Err(invalid(
                    format!("model[{i}].base_port"),
                    format!(
                        "instance {n} would listen on {}, already vip[{}].backend[{j}]",
                        SocketAddr::new(model.address, port as u16),
                        vips.iter()
                            .position(|v| v.name == model.vip)
                            .expect("checked")
                    ),
                ));
            }
            let other = models.iter().find(|m| {
                m.address == model.address
                    && (u32::from(m.base_port)
                        ..u32::from(m.base_port) + m.instance_count().unwrap_or(1))
                        .contains(&port)
            });
            if let Some(other) = other {
                return Err(invalid(
                    format!("model[{i}].base_port"),
                    format!(
                        "instance {n} would listen on {}, already used by {:?}",
                        SocketAddr::new(model.address, port as u16),
                        other.name
                    ),
                ));
            }
        }
        models.push(model);
    }
    Ok(models)
}

impl RawModel {
    fn validate(self, i: usize, vips: &[Vip]) -> Result<Model, FieldError> {
        let f = |name: &str| format!("model[{i}].{name}");
        if self.name.trim().is_empty() || self.name.contains(['/', ' ']) {
            return Err(invalid(
                f("name"),
                format!("{:?} must be non-empty, without '/' or spaces", self.name),
            ));
        }
        let Some(vip) = vips.iter().find(|v| v.name == self.vip) else {
            return Err(invalid(
                f("vip"),
                format!("no [[vip]] named {:?}", self.vip),
            ));
        };
        if vip.protocol != Protocol::Tcp {
            return Err(invalid(
                f("vip"),
                format!(
                    "{:?} is a UDP VIP; model servers speak HTTP over TCP",
                    self.vip
                ),
            ));
        }
        let gpus = match self.gpus {
            RawGpus::Named(s) if s == "all" => GpuSelection::All,
            RawGpus::Named(s) => match s.strip_prefix("simulated:").map(str::parse::<u32>) {
                Some(Ok(n)) if (1..=256).contains(&n) => GpuSelection::Simulated(n),
                _ => {
                    return Err(invalid(
                        f("gpus"),
                        format!(
                            "{s:?} is not \"all\", \"simulated:N\" (N 1-256) or a list of GPU \
                             indexes and UUIDs"
                        ),
                    ));
                }
            },
            RawGpus::List(list) => {
                if list.is_empty() {
                    return Err(invalid(f("gpus"), "must name at least one GPU"));
                }
                let mut gpus = Vec::with_capacity(list.len());
                for (k, g) in list.into_iter().enumerate() {
                    let gpu = match g {
                        RawGpuRef::Index(n) => match u32::try_from(n) {
                            Ok(n) if n < 1024 => GpuRef::Index(n),
                            _ => {
                                return Err(invalid(
                                    format!("model[{i}].gpus[{k}]"),
                                    format!("{n} is not a GPU index"),
                                ));
                            }
                        },
                        RawGpuRef::Uuid(u) if u.starts_with("GPU-") || u.starts_with("MIG-") => {
                            GpuRef::Uuid(u)
                        }
                        RawGpuRef::Uuid(u) => {
                            return Err(invalid(
                                format!("model[{i}].gpus[{k}]"),
                                format!("{u:?} is not a GPU UUID (GPU-... or MIG-...)"),
                            ));
                        }
                    };
                    if gpus.contains(&gpu) {
                        return Err(invalid(
                            format!("model[{i}].gpus[{k}]"),
                            format!("gpu {gpu} is listed twice"),
                        ));
                    }
                    gpus.push(gpu);
                }
                GpuSelection::List(gpus)
            }
        };
        let gpus_per_instance = parse_count(&f("gpus_per_instance"), self.gpus_per_instance, 64)?;
        let listed = match &gpus {
            GpuSelection::List(l) => Some(l.len() as u32),
            GpuSelection::Simulated(n) => Some(*n),
            GpuSelection::All => None,
        };
        if let Some(n) = listed
            && n % gpus_per_instance != 0
        {
            return Err(invalid(
                f("gpus_per_instance"),
                format!("{gpus_per_instance} does not divide the {n} GPUs"),
            ));
        }
        let command = if self.command.is_empty() {
            if !matches!(gpus, GpuSelection::Simulated(_)) {
                return Err(invalid(
                    f("command"),
                    "must give the server's argv, e.g. [\"vllm\", \"serve\", \"<model>\", \
                     \"--port\", \"{port}\"]",
                ));
            }
            SIM_COMMAND.map(String::from).to_vec()
        } else {
            self.command
        };
        for (k, arg) in command.iter().enumerate() {
            if let Some(bad) = unknown_placeholder(arg) {
                return Err(invalid(
                    format!("model[{i}].command[{k}]"),
                    format!(
                        "unknown placeholder {{{bad}}} (known: {{port}} {{address}} {{listen}} {{name}} \
                         {{model}} {{gpus}} {{tp}})"
                    ),
                ));
            }
        }
        let address = parse_addr(&f("address"), &self.address)?;
        check_family(&f("address"), address, vip.address)?;
        let base_port = parse_port(&f("base_port"), self.base_port)?;
        if let Some(n) = listed
            && u32::from(base_port) + n / gpus_per_instance - 1 > 65535
        {
            return Err(invalid(
                f("base_port"),
                format!(
                    "{base_port} + {} instances runs past port 65535",
                    n / gpus_per_instance
                ),
            ));
        }
        let served_model = self.served_model.unwrap_or_else(|| self.name.clone());
        let restart_delay = parse_ms(&f("restart_delay_ms"), self.restart_delay_ms, 0, 3_600_000)?;
        let restart_delay_max = parse_ms(
            &f("restart_delay_max_ms"),
            self.restart_delay_max_ms,
            0,
            3_600_000,
        )?;
        if restart_delay_max < restart_delay {
            return Err(invalid(
                f("restart_delay_max_ms"),
                format!(
                    "{} is below restart_delay_ms ({})",
                    self.restart_delay_max_ms, self.restart_delay_ms
                ),
            ));
        }
        let load = crate::load::LoadSource::parse(&self.load).ok_or_else(|| {
            invalid(
                f("load"),
                format!(
                    "{:?} is not \"vllm\", \"sglang\", \"tgi\", \"llamacpp\", \"nvml\" or \"none\"",
                    self.load
                ),
            )
        })?;
        if load == crate::load::LoadSource::Nvml && matches!(gpus, GpuSelection::Simulated(_)) {
            return Err(invalid(
                f("load"),
                "\"nvml\" needs real GPUs; simulated ones have no NVML readings",
            ));
        }
        Ok(Model {
            load,
            weight: parse_weight(&f("weight"), self.weight)?,
            max_flows: parse_max_flows(&f("max_flows"), self.max_flows)?,
            health: self.health.validate(
                &f("health"),
                CheckKind::Http,
                Some(served_model.clone()),
            )?,
            name: self.name,
            vip: self.vip,
            command,
            served_model,
            gpus,
            gpus_per_instance,
            address,
            base_port,
            env: self.env,
            restart_delay,
            restart_delay_max,
            stable_after: parse_ms(&f("stable_after_ms"), self.stable_after_ms, 0, 86_400_000)?,
        })
    }
}

/// The first `{...}` in `arg` that is not a known placeholder.
fn unknown_placeholder(arg: &str) -> Option<&str> {
    const KNOWN: [&str; 7] = ["port", "address", "listen", "name", "model", "gpus", "tp"];
    let mut rest = arg;
    while let Some(start) = rest.find('{') {
        let after = &rest[start + 1..];
        let end = after.find('}')?;
        let name = &after[..end];
        if !KNOWN.contains(&name) {
            return Some(name);
        }
        rest = &after[end + 1..];
    }
    None
}

impl RawVip {
    fn validate(self, i: usize) -> Result<Vip, FieldError> {
        let f = |name: &str| format!("vip[{i}].{name}");
        if self.name.trim().is_empty() {
            return Err(invalid(f("name"), "must not be empty"));
        }
        let address = parse_addr(&f("address"), &self.address)?;
        let vip_address = address;
        let port = parse_port(&f("port"), self.port)?;
        let protocol = match self.protocol.as_str() {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            other => {
                return Err(invalid(
                    f("protocol"),
                    format!("{other:?} is not \"tcp\" or \"udp\""),
                ));
            }
        };
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
            let bf = |name: &str| format!("vip[{i}].backend[{j}].{name}");
            let address = parse_addr(&bf("address"), &raw.address)?;
            check_family(&bf("address"), address, vip_address)?;
            let port = parse_port(&bf("port"), raw.port)?;
            let weight = parse_weight(&bf("weight"), raw.weight)?;
            let max_flows = parse_max_flows(&bf("max_flows"), raw.max_flows)?;
            // Only TCP flows are counted (a FIN or RST ends them); UDP has no end to count.
            if max_flows != 0 && protocol == Protocol::Udp {
                return Err(invalid(bf("max_flows"), "needs a TCP VIP"));
            }
            if let Some(prev) = backends
                .iter()
                .position(|b| b.address == address && b.port == port)
            {
                return Err(invalid(
                    format!("vip[{i}].backend[{j}]"),
                    format!(
                        "duplicate backend {} (also vip[{i}].backend[{prev}])",
                        SocketAddr::new(address, port)
                    ),
                ));
            }
            backends.push(BackendConfig {
                address,
                port,
                weight,
                max_flows,
            });
        }
        Ok(Vip {
            name: self.name,
            address,
            port,
            protocol,
            maglev_table_size,
            backends,
            health: self.health.validate(&f("health"), default_check, None)?,
            load_aware: self.load_aware,
            load_interval: parse_ms(&f("load_interval_ms"), self.load_interval_ms, 50, 60_000)?,
            affinity: match self.affinity.as_str() {
                "none" => false,
                "client" => true,
                other => {
                    return Err(invalid(
                        f("affinity"),
                        format!("{other:?} is not \"none\" or \"client\""),
                    ));
                }
            },
            load_bound_pct: match self.load_bound {
                0.0 => 0,
                _ if protocol == Protocol::Udp => {
                    return Err(invalid(f("load_bound"), "needs a TCP VIP"));
                }
                b if (1.0..=10.0).contains(&b) => (b * 100.0).round() as u32,
                b => {
                    return Err(invalid(
                        f("load_bound"),
                        format!("{b} is not 0 (off) or 1.0-10.0"),
                    ));
                }
            },
            admission: self
                .admission
                .validate(&f("admission"), protocol, vip_address)?,
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
        let rate = match (self.rate, self.burst) {
            (None, None) => None,
            (None, Some(_)) => return Err(invalid(f("burst"), "needs a rate")),
            (Some(rate), burst) => {
                let per_second = parse_count(&f("rate"), rate, 1_000_000)?;
                let burst = parse_count(&f("burst"), burst.unwrap_or(rate), 1_000_000)?;
                Some(RateLimit { per_second, burst })
            }
        };
        let refuse_rst = match self.refuse.as_deref() {
            None => protocol == Protocol::Tcp,
            Some("rst") if protocol == Protocol::Tcp => true,
            Some("rst") => return Err(invalid(f("refuse"), "\"rst\" needs a TCP VIP")),
            Some("drop") => false,
            Some(other) => {
                return Err(invalid(
                    f("refuse"),
                    format!("{other:?} is not \"rst\" or \"drop\""),
                ));
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
interface = "lo"
conntrack_size = 65536

[[vip]]
name = "chat"
address = "198.18.100.1"
port = 80

[[vip.backend]]
address = "198.18.0.1"
port = 8001
weight = 2

[[vip.backend]]
address = "198.18.0.1"
port = 8002
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("test.toml"), text)
    }

    /// The error message for `GOOD` with `from` replaced by `to`.
    fn error_for(from: &str, to: &str) -> String {
        assert!(GOOD.contains(from), "fixture lacks {from:?}");
        parse(&GOOD.replacen(from, to, 1))
            .expect_err("config should be rejected")
            .to_string()
    }

    const VIP_LINE: &str = "port = 80\n";

    #[test]
    fn admission_and_affinity_parse() {
        let c = parse(&GOOD.replacen(
            VIP_LINE,
            "port = 80\naffinity = \"client\"\nload_bound = 1.25\n\
             [vip.admission]\nrate = 10\nallow = [\"198.18.0.0/15\", \"10.1.2.3\"]\n",
            1,
        ))
        .expect("valid config");
        let v = &c.vips[0];
        assert!(v.affinity);
        assert_eq!(v.load_bound_pct, 125);
        let rate = v.admission.rate.expect("rate");
        assert_eq!(
            (rate.per_second, rate.burst),
            (10, 10),
            "burst defaults to the rate"
        );
        assert!(
            v.admission.refuse_rst,
            "TCP VIPs refuse with a RST by default"
        );
        assert_eq!(
            v.admission
                .allow
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["198.18.0.0/15", "10.1.2.3/32"]
        );
    }

    const GOOD6: &str = r#"
interface = "lo"

[[vip]]
name = "chat6"
address = "2001:db8:1::1"
port = 80
[vip.admission]
allow = ["2001:db8::/48"]

[[vip.backend]]
address = "2001:db8::10"
port = 8001

[[model]]
name = "sim"
vip = "chat6"
gpus = "simulated:2"
address = "::1"
base_port = 9000
"#;

    #[test]
    fn ipv6_vips_backends_and_prefixes_parse() {
        let c = parse(GOOD6).expect("valid IPv6 config");
        let v = &c.vips[0];
        assert_eq!(v.address, "2001:db8:1::1".parse::<IpAddr>().expect("v6"));
        assert_eq!(v.backends[0].address.to_string(), "2001:db8::10");
        assert_eq!(v.admission.allow[0].to_string(), "2001:db8::/48");
        assert_eq!(c.models[0].address, IpAddr::V6(Ipv6Addr::LOCALHOST));
        assert_eq!(c.conntrack_size_v6, lb_common::CONNTRACK6_DEFAULT_SIZE);
    }

    #[test]
    fn ipv6_errors_name_field_and_value() {
        let error6 = |from: &str, to: &str| {
            assert!(GOOD6.contains(from), "fixture lacks {from:?}");
            parse(&GOOD6.replacen(from, to, 1))
                .expect_err("config should be rejected")
                .to_string()
        };
        let cases = [
            (
                "address = \"2001:db8::10\"",
                "address = \"198.18.0.1\"",
                "vip[0].backend[0].address: 198.18.0.1 is IPv4, but the VIP 2001:db8:1::1 is IPv6",
            ),
            (
                "address = \"::1\"",
                "address = \"127.0.0.1\"",
                "model[0].address: 127.0.0.1 is IPv4, but the VIP 2001:db8:1::1 is IPv6",
            ),
            (
                "\"2001:db8::/48\"",
                "\"198.18.0.0/15\"",
                "vip[0].admission.allow[0]: 198.18.0.0 is IPv4, but the VIP 2001:db8:1::1 is IPv6",
            ),
            (
                "\"2001:db8::/48\"",
                "\"2001:db8::1/48\"",
                "vip[0].admission.allow[0]: \"2001:db8::1/48\" has host bits set (the network is 2001:db8::/48)",
            ),
            (
                "\"2001:db8::/48\"",
                "\"2001:db8::/129\"",
                "vip[0].admission.allow[0]: \"2001:db8::/129\" has no prefix length 0-128",
            ),
            (
                "address = \"2001:db8:1::1\"",
                "address = \"::ffff:198.18.100.1\"",
                "vip[0].address: \"::ffff:198.18.100.1\" is an IPv4-mapped address",
            ),
            (
                "address = \"2001:db8::10\"",
                "address = \"fe80::1\"",
                "vip[0].backend[0].address: \"fe80::1\" is link-local",
            ),
            (
                "address = \"2001:db8:1::1\"",
                "address = \"ff02::1\"",
                "vip[0].address: \"ff02::1\" is not a unicast address",
            ),
            (
                "interface = \"lo\"",
                "interface = \"lo\"\nconntrack_size_v6 = 10",
                "conntrack_size_v6: 10 is out of range",
            ),
        ];
        for (from, to, want) in cases {
            let got = error6(from, to);
            assert!(got.contains(want), "{to:?}: {got}");
        }
    }

    #[test]
    fn admission_errors_name_field_and_value() {
        let cases = [
            (
                "affinity = \"cookie\"\n",
                "vip[0].affinity: \"cookie\" is not",
            ),
            (
                "load_bound = 0.5\n",
                "vip[0].load_bound: 0.5 is not 0 (off) or 1.0-10.0",
            ),
            (
                "[vip.admission]\nburst = 5\n",
                "vip[0].admission.burst: needs a rate",
            ),
            (
                "[vip.admission]\nrate = 0\n",
                "vip[0].admission.rate: 0 is out of range",
            ),
            (
                "[vip.admission]\nrefuse = \"reject\"\n",
                "vip[0].admission.refuse: \"reject\"",
            ),
            (
                "[vip.admission]\nallow = []\n",
                "vip[0].admission.allow: is empty",
            ),
            (
                "[vip.admission]\nallow = [\"198.18.0.1/24\"]\n",
                "vip[0].admission.allow[0]: \"198.18.0.1/24\" has host bits set (the network is 198.18.0.0/24)",
            ),
            (
                "[vip.admission]\nallow = [\"198.18.0.0/33\"]\n",
                "vip[0].admission.allow[0]: \"198.18.0.0/33\" has no prefix length 0-32",
            ),
        ];
        for (extra, want) in cases {
            let got = error_for(VIP_LINE, &format!("port = 80\n{extra}"));
            assert!(got.contains(want), "{extra:?}: {got}");
        }
        let udp = error_for(
            VIP_LINE,
            "port = 80\nprotocol = \"udp\"\nload_bound = 1.5\n",
        );
        assert!(udp.contains("vip[0].load_bound: needs a TCP VIP"), "{udp}");
        let got = error_for("port = 8002\n", "port = 8002\nmax_flows = 70000\n");
        assert!(
            got.contains("vip[0].backend[1].max_flows: 70000 is out of range"),
            "{got}"
        );
    }

    #[test]
    fn good_config_parses_with_defaults() {
        let c = parse(GOOD).expect("valid config");
        assert_eq!(c.pin_path, PathBuf::from(DEFAULT_PIN_PATH));
        assert_eq!(c.xdp_mode, XdpMode::Auto);
        assert_eq!(c.conntrack_size, 65536);
        let vip = &c.vips[0];
        assert_eq!(vip.protocol, Protocol::Tcp);
        assert_eq!(vip.maglev_table_size, 65537);
        assert_eq!(vip.backends[0].weight, 2);
        assert_eq!(vip.backends[1].weight, 1);
    }

    #[test]
    fn duplicate_backend_is_named() {
        let e = error_for("port = 8002", "port = 8001");
        assert!(
            e.contains("vip[0].backend[1]") && e.contains("duplicate backend 198.18.0.1:8001"),
            "{e}"
        );
    }

    #[test]
    fn weight_zero_on_only_backend() {
        let text = GOOD.replace(
            "\n[[vip.backend]]\naddress = \"198.18.0.1\"\nport = 8002\n",
            "",
        );
        let e = error_for_text(&text.replace("weight = 2", "weight = 0"));
        assert!(
            e.contains("vip[0].backend[0].weight: 0 on the only backend"),
            "{e}"
        );
    }

    fn error_for_text(text: &str) -> String {
        parse(text)
            .expect_err("config should be rejected")
            .to_string()
    }

    #[test]
    fn all_weights_zero() {
        let text = GOOD
            .replace("weight = 2", "weight = 0")
            .replace("port = 8002\n", "port = 8002\nweight = 0\n");
        let e = error_for_text(&text);
        assert!(
            e.contains("vip[0].backend: every backend has weight 0"),
            "{e}"
        );
    }

    #[test]
    fn port_out_of_range() {
        let e = error_for("port = 8001", "port = 70000");
        assert!(
            e.contains("vip[0].backend[0].port: 70000 is out of range 1-65535"),
            "{e}"
        );
        let e = error_for("port = 80", "port = 0");
        assert!(e.contains("vip[0].port: 0 is out of range"), "{e}");
    }

    #[test]
    fn negative_weight() {
        let e = error_for("weight = 2", "weight = -1");
        assert!(
            e.contains("vip[0].backend[0].weight: -1 is out of range"),
            "{e}"
        );
    }

    #[test]
    fn bad_address() {
        let e = error_for("198.18.100.1", "198.18.300.1");
        assert!(
            e.contains("vip[0].address: \"198.18.300.1\" is not an IPv4 or IPv6 address"),
            "{e}"
        );
        let e = error_for("198.18.100.1", "0.0.0.0");
        assert!(
            e.contains("vip[0].address: \"0.0.0.0\" is not a unicast"),
            "{e}"
        );
    }

    #[test]
    fn bad_protocol() {
        let e = error_for("port = 80\n", "port = 80\nprotocol = \"sctp\"\n");
        assert!(e.contains("vip[0].protocol: \"sctp\""), "{e}");
    }

    #[test]
    fn table_size_must_be_prime_and_bounded() {
        let e = error_for("port = 80\n", "port = 80\nmaglev_table_size = 65536\n");
        assert!(
            e.contains("vip[0].maglev_table_size: 65536 must be a prime"),
            "{e}"
        );
        let e = error_for("port = 80\n", "port = 80\nmaglev_table_size = 131071\n");
        assert!(e.contains("no larger than 65537"), "{e}");
        let ok = parse(&GOOD.replace("port = 80\n", "port = 80\nmaglev_table_size = 251\n"));
        assert_eq!(ok.expect("251 is prime").vips[0].maglev_table_size, 251);
    }

    #[test]
    fn unknown_field_is_named() {
        let e = error_for("weight = 2", "wieght = 2");
        assert!(e.contains("unknown field `wieght`"), "{e}");
    }

    #[test]
    fn duplicate_vip_and_name() {
        let second = "\n[[vip]]\nname = \"chat2\"\naddress = \"198.18.100.1\"\nport = 80\n\
                      [[vip.backend]]\naddress = \"198.18.0.1\"\nport = 9000\n";
        let e = error_for_text(&format!("{GOOD}{second}"));
        assert!(
            e.contains("vip[1]: 198.18.100.1:80/tcp already defined by vip[0] (\"chat\")"),
            "{e}"
        );
        let e = error_for_text(&format!(
            "{GOOD}{}",
            second
                .replace("chat2", "chat")
                .replace("port = 80\n", "port = 81\n")
        ));
        assert!(
            e.contains("vip[1].name: \"chat\" already used by vip[0]"),
            "{e}"
        );
    }

    #[test]
    fn no_backends() {
        let text =
            "interface = \"lo\"\n[[vip]]\nname = \"x\"\naddress = \"198.18.100.1\"\nport = 80\n";
        let e = error_for_text(text);
        assert!(
            e.contains("vip[0].backend: a VIP needs at least one backend"),
            "{e}"
        );
    }

    #[test]
    fn conntrack_size_bounds() {
        let e = error_for("conntrack_size = 65536", "conntrack_size = 10");
        assert!(e.contains("conntrack_size: 10 is out of range"), "{e}");
    }

    #[test]
    fn relative_pin_path() {
        let e = error_for("conntrack_size", "pin_path = \"gpulb\"\nconntrack_size");
        assert!(e.contains("pin_path: gpulb is not an absolute path"), "{e}");
    }

    #[test]
    fn unknown_interface_is_named() {
        let dir = std::env::temp_dir().join(format!("gpulb-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("bad-if.toml");
        std::fs::write(&path, GOOD.replace("\"lo\"", "\"gpulb-nosuch0\"")).expect("write");
        let e = Config::load(&path)
            .expect_err("unknown interface")
            .to_string();
        std::fs::remove_dir_all(&dir).expect("clean temp dir");
        assert!(
            e.contains("interface: no network interface named \"gpulb-nosuch0\""),
            "{e}"
        );
    }

    const MODEL: &str = r#"
[[model]]
name = "qwen"
vip = "chat"
command = ["vllm", "serve", "Qwen/Qwen2.5-7B-Instruct", "--port", "{port}"]
served_model = "Qwen/Qwen2.5-7B-Instruct"
gpus = [0, 1]
address = "198.18.0.1"
base_port = 9001
"#;

    fn model_error(from: &str, to: &str) -> String {
        assert!(MODEL.contains(from), "fixture lacks {from:?}");
        error_for_text(&format!("{GOOD}{}", MODEL.replacen(from, to, 1)))
    }

    #[test]
    fn model_parses_with_defaults() {
        let c = parse(&format!("{GOOD}{MODEL}")).expect("valid config");
        let m = &c.models[0];
        assert_eq!(
            m.gpus,
            GpuSelection::List(vec![GpuRef::Index(0), GpuRef::Index(1)])
        );
        assert_eq!(m.gpus_per_instance, 1);
        assert_eq!(m.instance_count(), Some(2));
        assert_eq!(m.health.kind, CheckKind::Http);
        assert_eq!(m.health.model.as_deref(), Some("Qwen/Qwen2.5-7B-Instruct"));
        assert_eq!(m.restart_delay, Duration::from_secs(1));
        assert_eq!(c.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(c.drain_timeout, Duration::from_secs(30));
        assert_eq!(
            c.metrics_listen,
            Some("127.0.0.1:9464".parse().expect("addr"))
        );
        let e = error_for(
            "conntrack_size",
            "metrics_listen = \"localhost\"\nconntrack_size",
        );
        assert!(
            e.contains("metrics_listen: \"localhost\" is not an address:port"),
            "{e}"
        );
        let off =
            parse(&GOOD.replace("conntrack_size", "metrics_listen = \"off\"\nconntrack_size"));
        assert_eq!(off.expect("off is valid").metrics_listen, None);
    }

    #[test]
    fn a_model_alone_can_serve_a_vip() {
        let text = format!(
            "interface = \"lo\"\n[[vip]]\nname = \"chat\"\naddress = \"198.18.100.1\"\nport = 80\n{}",
            MODEL.replace("gpus = [0, 1]", "gpus = \"simulated:2\"")
        );
        let c = parse(&text).expect("a VIP served by a model needs no static backend");
        assert_eq!(c.models[0].gpus, GpuSelection::Simulated(2));
    }

    #[test]
    fn model_errors_name_field_and_value() {
        let cases = [
            (
                "vip = \"chat\"",
                "vip = \"chta\"",
                "model[0].vip: no [[vip]] named \"chta\"",
            ),
            (
                "gpus = [0, 1]",
                "gpus = \"most\"",
                "model[0].gpus: \"most\" is not \"all\"",
            ),
            (
                "gpus = [0, 1]",
                "gpus = [0, 0]",
                "model[0].gpus[1]: gpu 0 is listed twice",
            ),
            (
                "gpus = [0, 1]",
                "gpus = [\"H100\"]",
                "model[0].gpus[0]: \"H100\" is not a GPU UUID",
            ),
            (
                "gpus = [0, 1]",
                "gpus = []",
                "model[0].gpus: must name at least one GPU",
            ),
            (
                "gpus = [0, 1]",
                "gpus = [0, 1, 2]\ngpus_per_instance = 2",
                "model[0].gpus_per_instance: 2 does not divide the 3 GPUs",
            ),
            (
                "\"{port}\"]",
                "\"{prot}\"]",
                "model[0].command[4]: unknown placeholder {prot}",
            ),
            (
                "command = [\"vllm\", \"serve\", \"Qwen/Qwen2.5-7B-Instruct\", \"--port\", \"{port}\"]\n",
                "",
                "model[0].command: must give the server's argv",
            ),
            (
                "base_port = 9001",
                "base_port = 8002",
                "model[0].base_port: instance 0 would listen on 198.18.0.1:8002, already vip[0].backend[1]",
            ),
            (
                "base_port = 9001",
                "base_port = 65535",
                "runs past port 65535",
            ),
            (
                "name = \"qwen\"",
                "name = \"a b\"",
                "model[0].name: \"a b\" must be non-empty",
            ),
            (
                "base_port = 9001",
                "base_port = 9001\n[model.health]\ncheck = \"icmp\"",
                "model[0].health.check: \"icmp\" is not",
            ),
            (
                "base_port = 9001",
                "base_port = 9001\n[model.health]\nrise = 0",
                "model[0].health.rise: 0 is out of range 1-100",
            ),
            (
                "base_port = 9001",
                "base_port = 9001\nload = \"sglng\"",
                "model[0].load: \"sglng\" is not \"vllm\", \"sglang\", \"tgi\", \"llamacpp\", \"nvml\" or \"none\"",
            ),
            (
                "gpus = [0, 1]",
                "gpus = \"simulated:2\"\nload = \"nvml\"",
                "model[0].load: \"nvml\" needs real GPUs",
            ),
            (
                "base_port = 9001",
                "base_port = 9001\nrestart_delay_ms = 5000\nrestart_delay_max_ms = 1000",
                "model[0].restart_delay_max_ms: 1000 is below restart_delay_ms (5000)",
            ),
        ];
        for (from, to, want) in cases {
            let e = model_error(from, to);
            assert!(e.contains(want), "{from:?} -> {to:?}: got {e}");
        }
    }

    #[test]
    fn a_gpu_serves_one_model() {
        let second = MODEL
            .replace("name = \"qwen\"", "name = \"llama\"")
            .replace("gpus = [0, 1]", "gpus = [1]")
            .replace("base_port = 9001", "base_port = 9101");
        let e = error_for_text(&format!("{GOOD}{MODEL}{second}"));
        assert!(
            e.contains("model[1].gpus: gpu 1 already used by \"qwen\""),
            "{e}"
        );
        let e = error_for_text(&format!(
            "{GOOD}{MODEL}{}",
            second
                .replace("base_port = 9101", "base_port = 9002")
                .replace("[1]", "[3]")
        ));
        assert!(
            e.contains("model[1].base_port: instance 0 would listen on 198.18.0.1:9002, already used by \"qwen\""),
            "{e}"
        );
    }

    #[test]
    fn udp_vip_cannot_take_a_model() {
        let text = GOOD.replace("port = 80\n", "port = 80\nprotocol = \"udp\"\n");
        let e = error_for_text(&format!("{text}{MODEL}"));
        assert!(e.contains("model[0].vip: \"chat\" is a UDP VIP"), "{e}");
    }
}
