//! `[[model]]`: a model server gpulb starts and supervises, one instance per GPU (or per
//! `gpus_per_instance` GPUs), whose instances are the backends of its VIP.

use std::{collections::BTreeMap, fmt, net::IpAddr, net::SocketAddr, time::Duration};

use serde::Deserialize;

use super::{
    fields::{
        FieldError, check_family, invalid, parse_addr, parse_count, parse_max_flows, parse_ms,
        parse_port, parse_slots, parse_weight,
    },
    health::{CheckKind, HealthCheck, LoadSource, RawHealth},
    vip::{Protocol, Vip, default_weight},
};

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
    /// Batch slots of an instance (the engine's `max_num_seqs`); 0: learned from the engine.
    pub slots: u32,
    pub env: BTreeMap<String, String>,
    pub load: LoadSource,
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

/// `[[model]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawModel {
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
    slots: i64,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    load: LoadSource,
    #[serde(default = "default_restart_delay_ms")]
    restart_delay_ms: i64,
    #[serde(default = "default_restart_delay_max_ms")]
    restart_delay_max_ms: i64,
    #[serde(default = "default_stable_after_ms")]
    stable_after_ms: i64,
    #[serde(default)]
    health: RawHealth,
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

pub(super) fn validate_models(raw: Vec<RawModel>, vips: &[Vip]) -> Result<Vec<Model>, FieldError> {
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
    pub(super) fn validate(self, i: usize, vips: &[Vip]) -> Result<Model, FieldError> {
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
        let load = self.load;
        if load == LoadSource::Nvml && matches!(gpus, GpuSelection::Simulated(_)) {
            return Err(invalid(
                f("load"),
                "\"nvml\" needs real GPUs; simulated ones have no NVML readings",
            ));
        }
        Ok(Model {
            load,
            weight: parse_weight(&f("weight"), self.weight)?,
            max_flows: parse_max_flows(&f("max_flows"), self.max_flows)?,
            slots: parse_slots(&f("slots"), self.slots)?,
            health: self.health.validate(
                &f("health"),
                CheckKind::Http,
                Some(served_model.clone()),
                true,
                &super::health::daemon_env,
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
