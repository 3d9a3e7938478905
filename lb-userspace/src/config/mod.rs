//! The TOML config: serde types per section, then `validate()`, which turns them into a
//! checked [`Config`]. Every error names the field and the value. Nothing here touches BPF.
//!
//! `vip.rs`, `model.rs` and `health.rs` hold their sections; `fields.rs` the parsers of
//! single fields; this module the file, the top-level keys and the checks across sections.

mod fields;
mod health;
mod model;
mod print;
mod vip;

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

pub use fields::{Cidr, WEIGHT_MAX};
use fields::{FieldError, invalid, parse_ms};
pub use health::{CheckKind, HealthCheck, LoadSource};
use lb_common::{
    ALLOW_ENTRIES, CONNTRACK_DEFAULT_SIZE, CONNTRACK6_DEFAULT_SIZE, CONNTRACK6_IDLE_SIZE,
    CT_INSERTS_PER_CPU_DEFAULT, MAX_BACKENDS, MAX_SERVICES, maps::MapSizes,
};
pub use model::{GpuRef, GpuSelection, Model, SIM_COMMAND};
use model::{RawModel, validate_models};
use serde::{Deserialize, Serialize};
use vip::RawVip;
pub use vip::{
    Admission, Affinity, BackendConfig, PrefixAffinity, Protocol, RateLimit, Scheduler, Vip,
};

pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/gpulb";
pub const DEFAULT_STATE_DIR: &str = "/run/gpulb";
pub const DEFAULT_LOG_DIR: &str = "/var/log/gpulb";
/// The control socket, under `state_dir`.
pub const CONTROL_SOCKET: &str = "control.sock";
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";
/// Smallest and largest conntrack size accepted (entries).
const CONNTRACK_MIN: u64 = 1024;
const CONNTRACK_MAX: u64 = 1 << 26;

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

/// How the TC egress program is attached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TcAttach {
    /// TCX (a BPF link, Linux 6.6 and newer) where the kernel has it, else netlink.
    #[default]
    Auto,
    Tcx,
    /// A `cls_bpf` filter on a `clsact` qdisc (created when missing), any kernel.
    Netlink,
}

/// Which processes' sockets to VIPs are balanced at connect(): `"off"`, `"auto"` or a path.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum SocketLb {
    Off,
    /// The root of the cgroup v2 hierarchy (found in /proc/self/mounts; none: off, warned).
    #[default]
    Auto,
    Cgroup(PathBuf),
}

impl FromStr for SocketLb {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Self::Off),
            "auto" => Ok(Self::Auto),
            path if Path::new(path).is_absolute() => Ok(Self::Cgroup(PathBuf::from(path))),
            path => Err(format!(
                "{path:?} is not \"auto\", \"off\" or an absolute cgroup v2 path"
            )),
        }
    }
}

impl TryFrom<String> for SocketLb {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    interface: String,
    #[serde(default)]
    xdp_mode: XdpMode,
    #[serde(default)]
    tc_attach: TcAttach,
    pin_path: Option<PathBuf>,
    conntrack_size: Option<i64>,
    conntrack_size_v6: Option<i64>,
    /// Conntrack entries one CPU may insert per second before flood mode; 0: no limit.
    conntrack_inserts_per_cpu: Option<i64>,
    state_dir: Option<PathBuf>,
    log_dir: Option<PathBuf>,
    #[serde(default = "default_drain_timeout_ms")]
    drain_timeout_ms: i64,
    #[serde(default = "default_kill_timeout_ms")]
    kill_timeout_ms: i64,
    /// `host:port` of the Prometheus endpoint, or "off".
    metrics_listen: Option<String>,
    /// The cgroup (v2) whose processes' sockets to VIPs are balanced, or "off".
    #[serde(default)]
    socket_lb: SocketLb,
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

/// A validated config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub interface: String,
    pub xdp_mode: XdpMode,
    pub tc_attach: TcAttach,
    pub pin_path: PathBuf,
    /// Control socket and the record of running instances (for takeover).
    pub state_dir: PathBuf,
    /// One output file per model instance.
    pub log_dir: PathBuf,
    /// Entries of the IPv4 and IPv6 conntrack tables, and whether the other IPv6 maps get
    /// their full size (some VIP is IPv6).
    pub map_sizes: MapSizes,
    /// `conntrack_size_v6` was set (else it follows whether any VIP is IPv6).
    pub conntrack_v6_set: bool,
    /// Conntrack entries one CPU may insert per second; past that it is in flood mode (new
    /// flows by the consistent hash, no state) until the second is over. 0: no limit.
    pub conntrack_inserts_per_cpu: u64,
    /// How long a drain waits for a backend's connections to end.
    pub drain_timeout: Duration,
    /// How long a stopping instance gets between SIGTERM and SIGKILL.
    pub kill_timeout: Duration,
    /// Where `/metrics` is served; `None`: nowhere.
    pub metrics_listen: Option<SocketAddr>,
    /// The cgroup whose processes (in gpulb's network namespace) have their connects to a VIP
    /// balanced at the socket.
    pub socket_lb: SocketLb,
    pub vips: Vec<Vip>,
    pub models: Vec<Model>,
}

impl Config {
    /// The config with every default filled in, as TOML (`gpulb check-config --print`).
    pub fn effective(&self) -> String {
        print::effective(self)
    }

    pub fn control_socket(&self) -> PathBuf {
        self.state_dir.join(CONTROL_SOCKET)
    }

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
        let raw: RawConfig = serde_path_to_error::deserialize(toml::Deserializer::new(text))
            .map_err(|e| {
                let field = e.path().to_string();
                if field == "." {
                    // Not inside a field: a syntax error, with toml's pointer into the text.
                    return ConfigError::Parse {
                        path: path.to_owned(),
                        message: e.into_inner().to_string().trim_end().to_owned(),
                    };
                }
                ConfigError::Invalid {
                    path: path.to_owned(),
                    field,
                    message: e.inner().message().trim_end().to_owned(),
                }
            })?;
        raw.validate()
            .map_err(|(field, message)| ConfigError::Invalid {
                path: path.to_owned(),
                field,
                message,
            })
    }
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

fn absolute_dir(field: &str, dir: Option<PathBuf>, default: &str) -> Result<PathBuf, FieldError> {
    let dir = dir.unwrap_or_else(|| default.into());
    if !dir.is_absolute() {
        return Err(invalid(
            field,
            format!("{} is not an absolute path", dir.display()),
        ));
    }
    Ok(dir)
}

impl RawConfig {
    fn validate(self) -> Result<Config, FieldError> {
        if self.interface.trim().is_empty() {
            return Err(invalid("interface", "must name a network interface"));
        }
        let vips = validate_vips(self.vip)?;
        // IPv6 maps of full size would take memory for nothing on a host without IPv6 VIPs.
        let ipv6 = vips.iter().any(|v| v.address.is_ipv6());
        let v6_default = if ipv6 {
            CONNTRACK6_DEFAULT_SIZE
        } else {
            CONNTRACK6_IDLE_SIZE
        };
        let map_sizes = MapSizes {
            v4: parse_conntrack(
                "conntrack_size",
                self.conntrack_size,
                CONNTRACK_DEFAULT_SIZE,
            )?,
            v6: parse_conntrack("conntrack_size_v6", self.conntrack_size_v6, v6_default)?,
            ipv6,
        };
        let conntrack_inserts_per_cpu = match self.conntrack_inserts_per_cpu {
            None => CT_INSERTS_PER_CPU_DEFAULT,
            Some(n) if (0..=100_000_000).contains(&n) => n as u64,
            Some(n) => {
                return Err(invalid(
                    "conntrack_inserts_per_cpu",
                    format!("{n} is out of range 0-100000000 (0: no limit)"),
                ));
            }
        };
        let models = validate_models(self.model, &vips)?;
        check_capacity(&vips, &models)?;
        check_backends_unshared(&vips, &models)?;
        check_no_loopback_backend(&self.interface, &vips, &models)?;
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
        Ok(Config {
            pin_path: absolute_dir("pin_path", self.pin_path, DEFAULT_PIN_PATH)?,
            state_dir: absolute_dir("state_dir", self.state_dir, DEFAULT_STATE_DIR)?,
            log_dir: absolute_dir("log_dir", self.log_dir, DEFAULT_LOG_DIR)?,
            metrics_listen,
            socket_lb: self.socket_lb,
            interface: self.interface,
            xdp_mode: self.xdp_mode,
            tc_attach: self.tc_attach,
            map_sizes,
            conntrack_v6_set: self.conntrack_size_v6.is_some(),
            conntrack_inserts_per_cpu,
            drain_timeout: parse_ms("drain_timeout_ms", self.drain_timeout_ms, 0, 3_600_000)?,
            kill_timeout: parse_ms("kill_timeout_ms", self.kill_timeout_ms, 0, 600_000)?,
            vips,
            models,
        })
    }
}

/// Each `[[vip]]`, and that no two share a name or an address, port and protocol.
fn validate_vips(raw: Vec<RawVip>) -> Result<Vec<Vip>, FieldError> {
    if raw.len() > MAX_SERVICES as usize {
        return Err(invalid(
            "vip",
            format!("{} VIPs, at most {MAX_SERVICES} are supported", raw.len()),
        ));
    }
    let mut vips: Vec<Vip> = Vec::with_capacity(raw.len());
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut keys: HashMap<(IpAddr, u16, Protocol), usize> = HashMap::new();
    for (i, raw) in raw.into_iter().enumerate() {
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
                    vip.socket_addr(),
                    vip.protocol,
                    vips[prev].name
                ),
            ));
        }
        vips.push(vip);
    }
    Ok(vips)
}

/// No backend address serves two VIPs of one protocol: the egress program finds a reply's
/// VIP by the backend's address, port and protocol (`VIP_OF`), so a shared one would answer
/// every client as one of the VIPs.
/// Backends and model instances on a loopback address only behind the loopback interface:
/// packets from any other NIC NATed to 127.0.0.0/8 or ::1 are dropped by the kernel as
/// martians, so such a backend would pass its probes and never get a flow.
fn check_no_loopback_backend(
    interface: &str,
    vips: &[Vip],
    models: &[Model],
) -> Result<(), FieldError> {
    if interface == "lo" {
        return Ok(());
    }
    let statics = vips.iter().enumerate().flat_map(|(i, v)| {
        v.backends
            .iter()
            .enumerate()
            .map(move |(j, b)| (format!("vip[{i}].backend[{j}].address"), b.address))
    });
    let instances = models
        .iter()
        .enumerate()
        .map(|(k, m)| (format!("model[{k}].address"), m.address));
    match statics
        .chain(instances)
        .find(|(_, addr)| addr.is_loopback())
    {
        Some((field, addr)) => Err(invalid(
            field,
            format!(
                "\"{addr}\" is a loopback address: packets from {interface:?} NATed to it are \
                 dropped as martians; use an address of the host (docs/deploy.md)"
            ),
        )),
        None => Ok(()),
    }
}

fn check_backends_unshared(vips: &[Vip], models: &[Model]) -> Result<(), FieldError> {
    let mut owners: HashMap<(SocketAddr, Protocol), (usize, String)> = HashMap::new();
    let statics = vips.iter().enumerate().flat_map(|(i, v)| {
        v.backends.iter().enumerate().map(move |(j, b)| {
            let addr = SocketAddr::new(b.address, b.port);
            (i, format!("vip[{i}].backend[{j}]"), addr)
        })
    });
    let instances = models.iter().enumerate().flat_map(|(k, m)| {
        let vip = vips.iter().position(|v| v.name == m.vip).unwrap_or(0);
        (0..m.instance_count().unwrap_or(1)).map(move |n| {
            let addr = SocketAddr::new(m.address, (u32::from(m.base_port) + n) as u16);
            (vip, format!("model[{k}] instance {n}"), addr)
        })
    });
    for (vip, field, addr) in statics.chain(instances) {
        let key = (addr, vips[vip].protocol);
        match owners.get(&key) {
            Some((other, first)) if *other != vip => {
                return Err(invalid(
                    field,
                    format!(
                        "{addr} is already {first}, a backend of vip[{other}]: a backend serves one \
                         VIP, since its replies are matched to their VIP by its address and \
                         port; run another instance on a port of its own"
                    ),
                ));
            }
            Some(_) => {}
            None => {
                owners.insert(key, (vip, field));
            }
        }
    }
    Ok(())
}

/// What the data path can hold: a serving backend per VIP, backend ids, allowed prefixes.
fn check_capacity(vips: &[Vip], models: &[Model]) -> Result<(), FieldError> {
    let instances_of = |vip: &Vip| -> usize {
        models
            .iter()
            .filter(|m| m.vip == vip.name)
            .map(|m| m.instance_count().unwrap_or(0) as usize)
            .sum()
    };
    for (i, vip) in vips.iter().enumerate() {
        check_vip_can_serve(i, vip, models.iter().any(|m| m.vip == vip.name))?;
    }
    // Backend id 0 is reserved.
    let total: usize = vips
        .iter()
        .map(|v| v.backends.len() + instances_of(v))
        .sum();
    if total >= MAX_BACKENDS as usize {
        return Err(invalid(
            "vip",
            format!(
                "{total} backends in all, at most {} are supported",
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
    Ok(())
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

#[cfg(test)]
mod reference_tests;
#[cfg(test)]
mod tests;
