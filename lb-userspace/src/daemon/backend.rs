//! A backend: what the config declares of it (`BackendSpec`, compared by reloads) and what
//! the daemon learns of it while it runs (health, process, drain, operator weight, load).

use std::{net::SocketAddr, time::Duration};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    config::{Config, HealthCheck, LoadSource, Vip},
    control::{BackendKey, BackendState, BackendStatus, EngineStatus, GpuStatus},
    gpu::InstanceSpec,
    health::Health,
    load::Engine,
    supervisor::Command,
};

/// How a backend's engine is read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EngineSettings {
    pub source: LoadSource,
    /// How often (the VIP's `signal_interval_ms`).
    pub interval: Duration,
    /// How long one reading may take (the VIP's `signal_max_age_ms`: older is stale anyway).
    pub timeout: Duration,
    /// Batch slots from the config; 0: learned from the engine.
    pub slots: u32,
}

/// A backend as the config declares it.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendSpec {
    pub key: BackendKey,
    /// The VIP's address and port.
    pub vip_address: SocketAddr,
    /// The configured Maglev weight.
    pub weight: u32,
    /// Concurrent TCP flow cap, enforced by the data path; 0: none.
    pub max_flows: u16,
    pub check: HealthCheck,
    pub engine: EngineSettings,
    /// The process that serves it, for a model instance; `None` for a `[[vip.backend]]`.
    pub instance: Option<InstanceSpec>,
}

impl BackendSpec {
    fn new(
        vip: &Vip,
        addr: SocketAddr,
        weight: u32,
        max_flows: u16,
        check: &HealthCheck,
        engine: (LoadSource, u32),
    ) -> Self {
        Self {
            key: BackendKey {
                vip: vip.name.clone(),
                addr,
            },
            vip_address: vip.socket_addr(),
            weight,
            max_flows,
            check: check.clone(),
            engine: EngineSettings {
                source: engine.0,
                interval: vip.scheduler.signal_interval,
                timeout: vip.scheduler.signal_max_age,
                slots: engine.1,
            },
            instance: None,
        }
    }
}

/// The backends `config` declares: `[[vip.backend]]`s, then model instances.
pub fn specs(config: &Config, instances: Vec<InstanceSpec>) -> Vec<BackendSpec> {
    let mut out = Vec::new();
    for vip in &config.vips {
        for b in &vip.backends {
            let addr = SocketAddr::new(b.address, b.port);
            out.push(BackendSpec::new(
                vip,
                addr,
                b.weight,
                b.max_flows,
                &vip.health,
                (b.load, b.slots),
            ));
        }
    }
    for instance in instances {
        let model = config
            .models
            .iter()
            .find(|m| m.name == instance.model)
            .expect("instances come from the config's models");
        let vip = config
            .vips
            .iter()
            .find(|v| v.name == instance.vip)
            .expect("a model's VIP is checked by the config");
        let addr = SocketAddr::new(instance.address, instance.port);
        let mut spec = BackendSpec::new(
            vip,
            addr,
            model.weight,
            model.max_flows,
            &model.health,
            (model.load, model.slots),
        );
        spec.instance = Some(instance);
        out.push(spec);
    }
    out
}

/// A backend's probe task: its generation tells its results from an older task's.
#[derive(Debug, Default)]
pub struct ProbeTask {
    pub generation: u64,
    pub(super) cancel: CancellationToken,
}

impl ProbeTask {
    pub fn stop(&self) {
        self.cancel.cancel();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Running,
    /// Exited, waiting for its restart.
    Exited {
        crash_loop: bool,
    },
}

/// The process of a model instance, as its supervisor last reported it.
pub struct Process {
    pub pid: Option<u32>,
    pub start_time: u64,
    pub restarts: u32,
    pub phase: Phase,
    pub commands: mpsc::UnboundedSender<Command>,
    /// When this daemon saw it start, until it is ready or its start timed out (an adopted
    /// process has none: it was started long ago).
    pub starting_since: Option<std::time::Instant>,
}

pub struct Backend {
    pub spec: BackendSpec,
    /// `gpulb weight`, kept until set back to the configured weight.
    pub weight_override: Option<u32>,
    pub draining: bool,
    pub health: Health,
    /// `Some` for a model instance.
    pub process: Option<Process>,
    pub engine: Engine,
    /// Its probe (and load) task; results of older tasks are dropped.
    pub probe: ProbeTask,
    /// What a reload changed its command, environment or GPUs to: started at its turn of
    /// the reload's rolling replacement.
    pub replacement: Option<BackendSpec>,
}

impl Backend {
    pub fn new(spec: BackendSpec) -> Self {
        let process = spec.instance.as_ref().map(|_| {
            let (commands, _) = mpsc::unbounded_channel();
            Process {
                pid: None,
                start_time: 0,
                restarts: 0,
                // Until the supervisor reports: an adopted process keeps its slots meanwhile.
                phase: Phase::Running,
                commands,
                starting_since: None,
            }
        });
        Self {
            spec,
            weight_override: None,
            draining: false,
            health: Health::default(),
            process,
            engine: Engine::default(),
            probe: ProbeTask::default(),
            replacement: None,
        }
    }

    pub fn key(&self) -> &BackendKey {
        &self.spec.key
    }

    /// `address:port` (an IPv6 address in brackets).
    pub fn addr(&self) -> SocketAddr {
        self.spec.key.addr
    }

    /// The instance's name (`<model>-<n>`), for a model instance.
    pub fn instance_name(&self) -> Option<&str> {
        self.spec.instance.as_ref().map(|i| i.name.as_str())
    }

    /// The configured (or operator's) weight.
    pub fn weight(&self) -> u32 {
        self.weight_override.unwrap_or(self.spec.weight)
    }

    /// Its engine is read (it has a load source).
    pub fn reports_load(&self) -> bool {
        self.spec.engine.source != LoadSource::None
    }

    pub fn running(&self) -> bool {
        self.process
            .as_ref()
            .is_none_or(|p| p.phase == Phase::Running)
    }

    /// Takes new flows.
    pub fn in_table(&self) -> bool {
        self.running() && self.health.up && !self.draining && self.weight() > 0
    }

    pub fn state(&self) -> BackendState {
        match self.process.as_ref().map(|p| p.phase) {
            Some(Phase::Exited { crash_loop: true }) => BackendState::CrashLooping,
            Some(Phase::Exited { crash_loop: false }) => BackendState::Ejected,
            _ if self.draining => BackendState::Draining,
            _ if self.health.up => BackendState::Ready,
            _ if self.health.seen_up => BackendState::Unhealthy,
            _ => BackendState::Starting,
        }
    }

    /// Named by `selector`: its instance name, `address:port` or `vip/address:port`.
    pub fn matches(&self, selector: &str) -> bool {
        selector == self.addr().to_string()
            || selector == self.key().to_string()
            || self.instance_name() == Some(selector)
    }

    /// What `gpulb backends` and the metrics show of it; `id` is its id in the maps, `live`
    /// its live flows as the data path counts them, `now_ns` `CLOCK_MONOTONIC`.
    pub fn status(&self, id: Option<u32>, live: usize, now_ns: u64) -> BackendStatus {
        let instance = self.spec.instance.as_ref();
        let process = self.process.as_ref();
        BackendStatus {
            id,
            vip: self.spec.key.vip.clone(),
            vip_address: self.spec.vip_address,
            backend: self.addr(),
            model: instance.map(|i| i.model.clone()),
            instance: instance.map(|i| i.name.clone()),
            gpus: instance.map_or_else(Vec::new, |i| {
                i.gpus
                    .iter()
                    .map(|g| GpuStatus {
                        index: g.index,
                        uuid: g.uuid.clone(),
                        name: g.name.clone(),
                    })
                    .collect()
            }),
            pid: process.and_then(|p| p.pid),
            state: self.state(),
            healthy: self.running() && self.health.up,
            in_table: self.in_table(),
            restarts: process.map_or(0, |p| p.restarts),
            last_probe_ms: self.health.last_latency.map(|d| d.as_secs_f64() * 1000.0),
            last_error: self.health.last_error.clone(),
            live_flows: live,
            weight: self.weight(),
            slots: self.engine.slots(self.spec.engine.slots),
            engine: self.engine.last.map(|s| EngineStatus {
                running: s.running,
                waiting: s.waiting,
                kv_usage: s.kv,
                age_ms: now_ns.saturating_sub(self.engine.at_ns) as f64 / 1e6,
                prefix_hit_rate: self.engine.prefix.hit_rate(),
            }),
            load_error: self.engine.error.clone(),
            cpus: instance.map_or_else(Vec::new, |i| i.cpus.clone()),
        }
    }
}
