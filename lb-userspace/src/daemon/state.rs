//! The daemon's view of every backend (health, process, drain, weight) and the one place
//! that turns it into map contents. Owned by a single task: every change arrives as a
//! message, and each change that moves a backend in or out of a table rewrites only the
//! slots that changed.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use lb_common::BACKEND_DRAINING;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::{
    config::{Config, HealthCheck, Vip},
    control::{BackendStatus, GpuStatus, Response},
    datapath::{Datapath, ErrorChain},
    gpu::{self, InstanceSpec, Inventory},
    health::{self, Health},
    load::{self, Load, LoadSource},
    maglev,
    metrics::DaemonMetrics,
    plan::{self, DesiredBackend, DesiredService, Plan},
    supervisor::{self, Command, InstanceRecord, RestartPolicy},
};

/// `state_dir/state.json`: what a restarted daemon needs to carry on.
const STATE_FILE: &str = "state.json";

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Persisted {
    pub instances: Vec<InstanceRecord>,
    /// Operator weights (`gpulb weight`), by `vip/address:port`.
    pub weights: BTreeMap<String, u32>,
    /// Drained backends (`gpulb drain`), by `vip/address:port`.
    pub drained: Vec<String>,
}

impl Persisted {
    pub fn read(state_dir: &Path) -> Self {
        let path = state_dir.join(STATE_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).unwrap_or_else(|e| {
                warn!(path = %path.display(), error = %e, "ignoring unreadable state file");
                Self::default()
            }),
            Err(_) => Self::default(),
        }
    }
}

pub fn remove_state_file(state_dir: &Path) {
    let _ = std::fs::remove_file(state_dir.join(STATE_FILE));
}

/// Probe and load results, to the state task.
#[derive(Debug)]
pub enum Msg {
    Probe {
        key: String,
        generation: u64,
        result: Result<Duration, String>,
    },
    Load {
        key: String,
        generation: u64,
        result: Result<f64, String>,
    },
    /// Time to check the data path's live-flow counts against the sockets.
    Reconcile,
}

/// How often the live-flow counts are checked (`State::reconcile_live_flows`).
const RECONCILE_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Running,
    /// Exited, waiting for its restart.
    Exited {
        crash_loop: bool,
    },
}

pub struct Instance {
    pub spec: InstanceSpec,
    pub pid: Option<u32>,
    pub start_time: u64,
    pub restarts: u32,
    pub phase: Phase,
    pub commands: mpsc::UnboundedSender<Command>,
}

pub struct Backend {
    pub vip: String,
    /// The VIP's `address:port`.
    pub vip_address: String,
    pub address: IpAddr,
    pub port: u16,
    pub config_weight: u32,
    pub weight_override: Option<u32>,
    /// Concurrent TCP flow cap, enforced by the data path; 0: none.
    pub max_flows: u16,
    pub draining: bool,
    pub health: Health,
    pub check: HealthCheck,
    pub instance: Option<Instance>,
    /// Where its load comes from, and whether its VIP steers by it.
    pub load_source: LoadSource,
    pub load_aware: bool,
    pub load_interval: Duration,
    pub load: Load,
    pub load_error: Option<String>,
    /// Probe and load results from older tasks are dropped.
    probe_generation: u64,
    probe_cancel: CancellationToken,
}

impl Backend {
    /// `vip/address:port`: unique, and stable across restarts.
    pub fn key(&self) -> String {
        format!("{}/{}", self.vip, self.addr())
    }

    /// `address:port` (an IPv6 address in brackets).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.port)
    }

    /// The Maglev weight: the configured (or operator's) weight, scaled by load in
    /// load-aware mode.
    pub fn weight(&self) -> u32 {
        let base = self.weight_override.unwrap_or(self.config_weight);
        if self.steers_by_load() {
            load::weight(base, self.load.factor)
        } else {
            base
        }
    }

    fn steers_by_load(&self) -> bool {
        self.load_aware && self.load_source != LoadSource::None
    }

    fn running(&self) -> bool {
        self.instance
            .as_ref()
            .is_none_or(|i| i.phase == Phase::Running)
    }

    /// Takes new flows.
    pub fn in_table(&self) -> bool {
        self.running() && self.health.up && !self.draining && self.weight() > 0
    }

    pub fn state(&self) -> &'static str {
        match self.instance.as_ref().map(|i| i.phase) {
            Some(Phase::Exited { crash_loop: true }) => "crash-looping",
            Some(Phase::Exited { crash_loop: false }) => "ejected",
            _ if self.draining => "draining",
            _ if self.health.up => "ready",
            _ if self.health.seen_up => "unhealthy",
            _ => "starting",
        }
    }

    fn matches(&self, selector: &str) -> bool {
        selector == self.addr().to_string()
            || selector == self.key()
            || self
                .instance
                .as_ref()
                .is_some_and(|i| i.spec.name == selector)
    }
}

/// What takeover found in the maps: backends holding slots, and the drain flags.
#[derive(Debug, Default)]
pub struct Inherited {
    pub in_table: Vec<String>,
    pub draining: Vec<String>,
}

impl Inherited {
    pub fn read(config: &Config, datapath: &Datapath) -> Result<Self, crate::maps::MapsError> {
        let maps = &datapath.maps;
        let mut out = Self::default();
        let backends = maps.backends()?;
        for (key, service) in maps.services()? {
            let Some(vip) = config.vips.iter().find(|v| plan::vip_key(v) == key) else {
                continue;
            };
            let held = maglev::slot_counts(&maps.maglev_table(&service)?);
            for (id, b) in backends
                .iter()
                .filter(|(_, b)| u32::from(b.service) == service.id)
            {
                let name = format!("{}/{}", vip.name, b.addr);
                if held.get(id).copied().unwrap_or(0) > 0 {
                    out.in_table.push(name.clone());
                }
                if b.flags & BACKEND_DRAINING != 0 {
                    out.draining.push(name);
                }
            }
        }
        Ok(out)
    }
}

pub struct State {
    pub config: Config,
    config_path: PathBuf,
    pub datapath: Datapath,
    pub backends: Vec<Backend>,
    applied: Option<Plan>,
    msgs: mpsc::UnboundedSender<Msg>,
    supervisor_events: mpsc::UnboundedSender<supervisor::Event>,
    cancel: CancellationToken,
    probe_client: reqwest::Client,
    next_generation: u64,
    pub metrics: Arc<DaemonMetrics>,
    /// Backend ids whose live-flow count was above their socket count at the last check.
    overcounted: HashSet<u32>,
}

impl State {
    /// Also returns the receiver of the supervisors' events, which the state task must
    /// read before its other messages: an instance's `Started` is sent before the process
    /// can answer a probe, and must be handled before that probe's result.
    pub fn new(
        config: Config,
        config_path: PathBuf,
        datapath: Datapath,
        msgs: mpsc::UnboundedSender<Msg>,
        cancel: CancellationToken,
    ) -> (Self, mpsc::UnboundedReceiver<supervisor::Event>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let state = Self {
            config,
            config_path,
            datapath,
            backends: Vec::new(),
            applied: None,
            msgs,
            supervisor_events: tx,
            cancel,
            probe_client: health::client(),
            next_generation: 0,
            metrics: DaemonMetrics::new(),
            overcounted: HashSet::new(),
        };
        (state, rx)
    }

    /// Builds the backends of `config`, starting (or adopting) instances and probes.
    pub fn start(
        &mut self,
        specs: Vec<InstanceSpec>,
        inherited: &Inherited,
        persisted: &Persisted,
    ) {
        let backends = build_backends(&self.config, specs);
        for mut b in backends {
            let key = b.key();
            if inherited.in_table.contains(&key) {
                b.health = Health::inherited();
            }
            b.draining = inherited.draining.contains(&key) || persisted.drained.contains(&key);
            b.weight_override = persisted.weights.get(&key).copied();
            self.add(b, &persisted.instances);
        }
        spawn_periodic(
            RECONCILE_INTERVAL,
            self.cancel.clone(),
            self.msgs.clone(),
            || async { Msg::Reconcile },
        );
    }

    fn add(&mut self, mut b: Backend, records: &[InstanceRecord]) {
        if let Some(inst) = &mut b.instance {
            let record = records
                .iter()
                .find(|r| r.name == inst.spec.name && r.port == inst.spec.port)
                .cloned();
            inst.restarts = record.as_ref().map_or(0, |r| r.restarts);
            inst.pid = record.as_ref().map(|r| r.pid);
            inst.commands = self.spawn_supervisor(inst.spec.clone(), record, async {});
        }
        self.start_probe(&mut b);
        self.backends.push(b);
    }

    /// Starts the supervisor of `spec` once `before` is done (adopting `record`'s process
    /// if it is still running).
    fn spawn_supervisor(
        &self,
        spec: InstanceSpec,
        record: Option<InstanceRecord>,
        before: impl Future<Output = ()> + Send + 'static,
    ) -> mpsc::UnboundedSender<Command> {
        let model = self
            .config
            .models
            .iter()
            .find(|m| m.name == spec.model)
            .expect("instances come from the config's models");
        let (tx, rx) = mpsc::unbounded_channel();
        let ctx = supervisor::Context {
            log_dir: self.config.log_dir.clone(),
            kill_timeout: self.config.kill_timeout,
            events: self.supervisor_events.clone(),
            cancel: self.cancel.clone(),
        };
        let policy = RestartPolicy::of(model);
        tokio::spawn(async move {
            before.await;
            supervisor::supervise(spec, policy, record, ctx, rx).await;
        });
        tx
    }

    fn start_probe(&mut self, b: &mut Backend) {
        b.probe_cancel.cancel();
        b.probe_cancel = self.cancel.child_token();
        self.next_generation += 1;
        b.probe_generation = self.next_generation;
        let (key, generation, cancel) = (b.key(), b.probe_generation, b.probe_cancel.clone());
        if b.steers_by_load() {
            self.start_load(b);
        }
        let (addr, check, client) = (b.addr(), b.check.clone(), self.probe_client.clone());
        spawn_periodic(check.interval, cancel, self.msgs.clone(), move || {
            let (key, check, client) = (key.clone(), check.clone(), client.clone());
            async move {
                let result = health::probe(&client, addr, &check).await;
                Msg::Probe {
                    key,
                    generation,
                    result,
                }
            }
        });
    }

    /// Scrapes the backend's load every `load_interval` (stops with its probe task).
    fn start_load(&self, b: &Backend) {
        let (key, generation, cancel) = (b.key(), b.probe_generation, b.probe_cancel.clone());
        let (addr, source, interval, client) = (
            b.addr(),
            b.load_source,
            b.load_interval,
            self.probe_client.clone(),
        );
        let gpus: Vec<String> = b
            .instance
            .iter()
            .flat_map(|i| i.spec.gpus.iter().map(|g| g.uuid.clone()))
            .collect();
        let timeout = interval.max(Duration::from_millis(200));
        spawn_periodic(interval, cancel, self.msgs.clone(), move || {
            let (key, client, gpus) = (key.clone(), client.clone(), gpus.clone());
            async move {
                let result = load::scrape(&client, addr, source, &gpus, timeout).await;
                Msg::Load {
                    key,
                    generation,
                    result,
                }
            }
        });
    }

    /// Handles one probe result; returns true if the tables may need rewriting.
    pub fn handle(&mut self, msg: Msg) -> bool {
        match msg {
            Msg::Probe {
                key,
                generation,
                result,
            } => {
                let Some(b) = current(&mut self.backends, &key, generation) else {
                    return false;
                };
                let error = result.as_ref().err().cloned();
                let was_in = b.in_table();
                let changed = b.health.record(result, &b.check);
                if was_in && !b.in_table() {
                    self.metrics
                        .ejections
                        .with_label_values(&ejection_labels(b, "unhealthy"))
                        .inc();
                }
                if changed && b.health.up {
                    info!(backend = %key, latency = ?b.health.last_latency, "backend ready");
                } else if changed {
                    warn!(backend = %key, error = error.as_deref().unwrap_or(""), "backend unhealthy");
                }
                changed
            }
            Msg::Load {
                key,
                generation,
                result,
            } => {
                let Some(b) = current(&mut self.backends, &key, generation) else {
                    return false;
                };
                match result {
                    Ok(sample) => {
                        b.load_error = None;
                        // Only what is in the table moves it.
                        b.load.record(sample) && b.in_table()
                    }
                    Err(e) => {
                        b.load_error = Some(e);
                        false
                    }
                }
            }
            Msg::Reconcile => {
                self.reconcile_live_flows();
                false
            }
        }
    }

    /// The data path counts a TCP flow from its SYN to its first FIN or RST. A flow that ends
    /// with neither (a client that vanished, a conntrack entry evicted) stays counted and
    /// would hold a slot of a capped backend for good. For a backend whose listening socket
    /// is in this namespace, the kernel's sockets are the truth: a count above the number of
    /// its connections at two checks in a row is set down to that number. (The map is read
    /// before the sockets, so a flow being opened meanwhile is never mistaken for a leak.)
    fn reconcile_live_flows(&mut self) {
        let Some(plan) = &self.applied else {
            return;
        };
        // Read before the sockets: see above.
        let counted: Result<Vec<_>, _> = plan
            .services
            .iter()
            .flat_map(|s| &s.backends)
            .map(|&(id, b)| {
                let n = self.datapath.maps.live_flows(id)?;
                Ok::<_, crate::maps::MapsError>((id, b.addr, n))
            })
            .collect();
        let counted = match counted {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %ErrorChain(&e), "reading live flows");
                return;
            }
        };
        let sockets = tcp_sockets();
        let mut over = HashSet::new();
        for (id, backend, n) in counted {
            let (addr, port) = (backend.ip(), backend.port());
            if !sockets.is_listening(addr, port) {
                continue;
            }
            let actual = sockets.connections(addr, port) as u64;
            if n <= actual {
                continue;
            }
            if self.overcounted.contains(&id) {
                info!(%backend, counted = n, connections = actual, "live-flow count set down to the backend's connections");
                if let Err(e) = self.datapath.maps.set_live_flows(id, actual) {
                    warn!(error = %ErrorChain(&e), "writing live flows");
                }
            } else {
                over.insert(id);
            }
        }
        self.overcounted = over;
    }

    /// Handles one supervisor event; returns true if the tables may need rewriting.
    pub fn on_supervisor(&mut self, ev: supervisor::Event) -> bool {
        match ev {
            supervisor::Event::Started {
                instance,
                pid,
                start_time,
                restarts,
                adopted,
            } => {
                let Some(b) = self.instance_mut(&instance) else {
                    return false;
                };
                let inst = b.instance.as_mut().expect("instance_mut");
                inst.pid = Some(pid);
                inst.start_time = start_time;
                inst.restarts = restarts;
                inst.phase = Phase::Running;
                if !adopted {
                    // A new process must prove itself ready again.
                    b.health = Health::default();
                }
                self.persist();
                true
            }
            supervisor::Event::Exited {
                instance,
                at,
                status,
                restarts,
                crash_loop,
                restart_in: _,
            } => {
                let Some(b) = self.instance_mut(&instance) else {
                    return false;
                };
                let key = b.key();
                let was_in = b.in_table();
                let labels = ejection_labels(b, "exit");
                let inst = b.instance.as_mut().expect("instance_mut");
                inst.phase = Phase::Exited { crash_loop };
                inst.restarts = restarts;
                inst.pid = None;
                b.health = Health::default();
                if was_in {
                    self.metrics.ejections.with_label_values(&labels).inc();
                    // Rewrite the table now, and say how long that took from the exit.
                    self.sync();
                    info!(
                        backend = %key,
                        instance = %instance,
                        %status,
                        ejected_in_us = at.elapsed().as_micros() as u64,
                        "backend ejected"
                    );
                }
                self.persist();
                !was_in
            }
        }
    }

    fn instance_mut(&mut self, name: &str) -> Option<&mut Backend> {
        self.backends
            .iter_mut()
            .find(|b| b.instance.as_ref().is_some_and(|i| i.spec.name == name))
    }

    /// The desired table contents: per VIP in config order.
    fn desired(&self) -> Vec<DesiredService<'_>> {
        desired(&self.config.vips, &self.backends)
    }

    /// Rewrites the maps to match the backends' states (only what changed).
    pub fn sync(&mut self) {
        let started = Instant::now();
        let (services, backends) = match &self.applied {
            Some(p) => p.current(),
            None => match (self.datapath.maps.services(), self.datapath.maps.backends()) {
                (Ok(s), Ok(b)) => (s, b),
                (Err(e), _) | (_, Err(e)) => {
                    error!(error = %ErrorChain(&e), "reading the maps");
                    return;
                }
            },
        };
        let plan = match plan::plan(&self.desired(), &services, &backends) {
            Ok(p) => p,
            Err(e) => {
                error!(error = %e, "planning the tables");
                return;
            }
        };
        if self.applied.as_ref() == Some(&plan) {
            return;
        }
        match plan::apply(&mut self.datapath.maps, &plan, self.applied.as_ref()) {
            Ok(applied) if applied.slots_written > 0 => {
                self.metrics.rebuilds.inc();
                self.metrics
                    .rebuild_seconds
                    .observe(started.elapsed().as_secs_f64());
                let in_table = self.backends.iter().filter(|b| b.in_table()).count();
                info!(
                    slots_written = applied.slots_written,
                    in_table, "tables updated"
                );
                self.applied = Some(plan);
            }
            Ok(_) => self.applied = Some(plan),
            Err(e) => {
                // Unknown what was written: read the maps back next time.
                self.applied = None;
                error!(error = %ErrorChain(&e), "writing the maps");
            }
        }
    }

    /// Writes `state_dir/state.json`; a SIGKILLed daemon leaves it current.
    pub fn persist(&self) {
        let persisted = Persisted {
            instances: self
                .backends
                .iter()
                .filter_map(|b| {
                    let inst = b.instance.as_ref()?;
                    Some(InstanceRecord {
                        name: inst.spec.name.clone(),
                        pid: inst.pid?,
                        start_time: inst.start_time,
                        port: inst.spec.port,
                        restarts: inst.restarts,
                    })
                })
                .collect(),
            weights: self
                .backends
                .iter()
                .filter_map(|b| Some((b.key(), b.weight_override?)))
                .collect(),
            drained: self
                .backends
                .iter()
                .filter(|b| b.draining)
                .map(Backend::key)
                .collect(),
        };
        let dir = &self.config.state_dir;
        let result = std::fs::create_dir_all(dir).and_then(|()| {
            let tmp = dir.join("state.json.tmp");
            std::fs::write(
                &tmp,
                serde_json::to_vec_pretty(&persisted).map_err(std::io::Error::other)?,
            )?;
            std::fs::rename(tmp, dir.join(STATE_FILE))
        });
        if let Err(e) = result {
            warn!(dir = %dir.display(), error = %e, "writing the state file");
        }
    }

    fn select(&mut self, selector: &str) -> Result<&mut Backend, String> {
        let matching: Vec<usize> = (0..self.backends.len())
            .filter(|&i| self.backends[i].matches(selector))
            .collect();
        match matching[..] {
            [i] => Ok(&mut self.backends[i]),
            [] => Err(format!(
                "no backend {selector:?} (give an instance name, address:port or vip/address:port)"
            )),
            _ => Err(format!(
                "{selector:?} names {} backends; say which VIP: {}",
                matching.len(),
                matching
                    .iter()
                    .map(|&i| self.backends[i].key())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }

    pub fn drain(&mut self, selector: &str, on: bool) -> Response {
        let b = match self.select(selector) {
            Ok(b) => b,
            Err(e) => return Response::error(e),
        };
        let key = b.key();
        let changed = b.draining != on;
        b.draining = on;
        if changed {
            info!(backend = %key, "{}", if on { "draining" } else { "drain ended" });
            self.sync();
            self.persist();
        }
        Response {
            drain_timeout_ms: Some(self.config.drain_timeout.as_millis() as u64),
            // Which backend the selector named, for the CLI to follow.
            backends: self
                .status()
                .into_iter()
                .filter(|s| format!("{}/{}", s.vip, s.backend) == key)
                .collect(),
            ..Response::ok(format!(
                "{key}: {}",
                if on { "draining" } else { "taking new flows" }
            ))
        }
    }

    pub fn set_weight(&mut self, selector: &str, weight: u32) -> Response {
        if i64::from(weight) > crate::config::WEIGHT_MAX {
            return Response::error(format!(
                "weight {weight} is out of range 0-{}",
                crate::config::WEIGHT_MAX
            ));
        }
        let b = match self.select(selector) {
            Ok(b) => b,
            Err(e) => return Response::error(e),
        };
        let key = b.key();
        b.weight_override = (weight != b.config_weight).then_some(weight);
        info!(backend = %key, weight, "weight set");
        self.sync();
        self.persist();
        Response::ok(format!("{key}: weight {weight}"))
    }

    /// The supervisor handle of an instance, for restarts.
    pub fn instance_commands(&self, name: &str) -> Option<mpsc::UnboundedSender<Command>> {
        self.backends
            .iter()
            .find_map(|b| b.instance.as_ref().filter(|i| i.spec.name == name))
            .map(|i| i.commands.clone())
    }

    pub fn status(&self) -> Vec<BackendStatus> {
        let live = live_connections();
        self.backends
            .iter()
            .map(|b| {
                let vip = self.config.vips.iter().find(|v| v.name == b.vip);
                let inst = b.instance.as_ref();
                BackendStatus {
                    vip: b.vip.clone(),
                    vip_address: vip.map_or_else(String::new, |v| {
                        SocketAddr::new(v.address, v.port).to_string()
                    }),
                    backend: b.addr().to_string(),
                    model: inst.map(|i| i.spec.model.clone()),
                    instance: inst.map(|i| i.spec.name.clone()),
                    gpus: inst.map_or_else(Vec::new, |i| {
                        i.spec
                            .gpus
                            .iter()
                            .map(|g| GpuStatus {
                                index: g.index,
                                uuid: g.uuid.clone(),
                                name: g.name.clone(),
                            })
                            .collect()
                    }),
                    pid: inst.and_then(|i| i.pid),
                    state: b.state().into(),
                    healthy: b.running() && b.health.up,
                    in_table: b.in_table(),
                    restarts: inst.map_or(0, |i| i.restarts),
                    last_probe_ms: b.health.last_latency.map(|d| d.as_secs_f64() * 1000.0),
                    last_error: b.health.last_error.clone(),
                    live_flows: live.get(&(b.address, b.port)).copied().unwrap_or(0),
                    weight: b.weight(),
                    load: b.steers_by_load().then_some(b.load.smoothed),
                    load_error: b.load_error.clone(),
                    cpus: inst.map_or_else(Vec::new, |i| i.spec.cpus.clone()),
                }
            })
            .collect()
    }

    /// SIGHUP: a valid config is applied as a diff; an invalid one changes nothing.
    pub fn reload(&mut self) -> Response {
        let new = match Config::load(&self.config_path) {
            Ok(c) => c,
            Err(e) => return reload_rejected(ErrorChain(&e).to_string()),
        };
        let old = &self.config;
        let fixed: [(&str, bool); 7] = [
            ("interface", new.interface != old.interface),
            ("xdp_mode", new.xdp_mode != old.xdp_mode),
            ("pin_path", new.pin_path != old.pin_path),
            ("state_dir", new.state_dir != old.state_dir),
            ("conntrack_size", new.conntrack_size != old.conntrack_size),
            (
                "conntrack_size_v6",
                new.conntrack_size_v6 != old.conntrack_size_v6,
            ),
            ("socket_lb", new.socket_lb != old.socket_lb),
        ];
        if let Some((field, _)) = fixed.iter().find(|(_, changed)| *changed) {
            return reload_rejected(format!(
                "{}: {field}: changed; this takes a restart of gpulb, not a reload",
                self.config_path.display()
            ));
        }
        let specs = match Inventory::discover(&new).and_then(|inv| gpu::instances(&new, &inv)) {
            Ok(s) => s,
            Err(e) => return reload_rejected(ErrorChain(&e).to_string()),
        };
        let mut incoming = build_backends(&new, specs);
        // Dry run: ids must be allocatable before anything changes.
        let (services, backends) = match &self.applied {
            Some(p) => p.current(),
            None => (Vec::new(), Vec::new()),
        };
        if let Err(e) = plan::plan(&desired(&new.vips, &incoming), &services, &backends) {
            return reload_rejected(e.to_string());
        }

        let (mut added, mut removed, mut replaced) = (0, 0, 0);
        let old_backends = std::mem::take(&mut self.backends);
        let mut kept: HashMap<String, Backend> = HashMap::new();
        for b in old_backends {
            let key = b.key();
            if incoming.iter().any(|n| n.key() == key) {
                kept.insert(key, b);
            } else {
                removed += 1;
                info!(backend = %key, "backend removed by reload");
                b.probe_cancel.cancel();
                if let Some(inst) = b.instance {
                    let (done, _) = tokio::sync::oneshot::channel();
                    let _ = inst.commands.send(Command::Stop(done));
                }
            }
        }
        self.config = new;
        for mut n in incoming.drain(..) {
            match kept.remove(&n.key()) {
                Some(mut b) => {
                    b.config_weight = n.config_weight;
                    b.max_flows = n.max_flows;
                    b.check = n.check;
                    b.load_source = n.load_source;
                    b.load_aware = n.load_aware;
                    b.load_interval = n.load_interval;
                    // A weight change alone does not restart the process.
                    let same_spec = match (&b.instance, &n.instance) {
                        (Some(a), Some(c)) => {
                            InstanceSpec {
                                weight: 0,
                                ..a.spec.clone()
                            } == InstanceSpec {
                                weight: 0,
                                ..c.spec.clone()
                            }
                        }
                        (None, None) => true,
                        _ => false,
                    };
                    if let (Some(a), Some(c)) = (&mut b.instance, &n.instance) {
                        a.spec.weight = c.spec.weight;
                    }
                    if !same_spec {
                        replaced += 1;
                        if let Some(inst) = b.instance.take() {
                            let (done, _) = tokio::sync::oneshot::channel();
                            let _ = inst.commands.send(Command::Stop(done));
                        }
                        b.instance = n.instance.take();
                        if let Some(inst) = &mut b.instance {
                            // The old process is stopped first: it holds the port.
                            inst.commands = self.spawn_replacement(inst.spec.clone());
                        }
                        b.health = Health::default();
                    }
                    self.start_probe(&mut b);
                    self.backends.push(b);
                }
                None => {
                    added += 1;
                    info!(backend = %n.key(), "backend added by reload");
                    self.add(n, &[]);
                }
            }
        }
        self.sync();
        self.persist();
        let message = format!(
            "config reloaded: {added} backends added, {removed} removed, {replaced} restarted with a new command"
        );
        info!(added, removed, replaced, "config reloaded");
        Response::ok(message)
    }

    /// A supervisor for an instance whose previous process is being stopped: it waits for
    /// the port to be free before starting.
    fn spawn_replacement(&self, spec: InstanceSpec) -> mpsc::UnboundedSender<Command> {
        let addr = SocketAddr::new(spec.address, spec.port);
        let deadline = Instant::now() + self.config.kill_timeout + Duration::from_secs(1);
        self.spawn_supervisor(spec, None, async move {
            while Instant::now() < deadline && std::net::TcpListener::bind(addr).is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    }

    /// Full stop: no new flows, wait for connections to end (up to the drain timeout),
    /// then stop every instance.
    pub async fn shut_down(&mut self) {
        for b in &mut self.backends {
            b.draining = true;
        }
        self.sync();
        let deadline = Instant::now() + self.config.drain_timeout;
        loop {
            let live: usize = self.status().iter().map(|s| s.live_flows).sum();
            if live == 0 {
                break;
            }
            if Instant::now() >= deadline {
                warn!(live, timeout = ?self.config.drain_timeout, "drain timeout; stopping with connections open");
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut waits = Vec::new();
        for b in &self.backends {
            b.probe_cancel.cancel();
            if let Some(inst) = &b.instance {
                let (done, wait) = tokio::sync::oneshot::channel();
                if inst.commands.send(Command::Stop(done)).is_ok() {
                    waits.push(wait);
                }
            }
        }
        for wait in waits {
            let _ =
                tokio::time::timeout(self.config.kill_timeout + Duration::from_secs(5), wait).await;
        }
    }
}

/// Runs `step` every `interval` (the first at once) and sends its message to the state
/// task, until `cancel` or until the state task is gone.
fn spawn_periodic<F, Fut>(
    interval: Duration,
    cancel: CancellationToken,
    msgs: mpsc::UnboundedSender<Msg>,
    mut step: F,
) where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = Msg> + Send,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = cancel.cancelled() => return,
            }
            if msgs.send(step().await).is_err() {
                return;
            }
        }
    });
}

/// The backend a probe or load result is for, unless the result comes from a task that has
/// since been replaced (a restart or reload started a new one).
fn current<'a>(backends: &'a mut [Backend], key: &str, generation: u64) -> Option<&'a mut Backend> {
    backends
        .iter_mut()
        .find(|b| b.key() == key)
        .filter(|b| b.probe_generation == generation)
}

/// `vip`, `backend`, `instance`, `cause` as `gpulb_ejections_total` has them (the VIP and
/// backend as `address:port`, like the map-derived metrics).
fn ejection_labels(b: &Backend, cause: &'static str) -> [String; 4] {
    [
        b.vip_address.clone(),
        b.addr().to_string(),
        b.instance
            .as_ref()
            .map_or_else(String::new, |i| i.spec.name.clone()),
        cause.to_owned(),
    ]
}

fn reload_rejected(error: String) -> Response {
    error!(error = %error, "config reload rejected; nothing changed");
    Response::error(format!("reload rejected, nothing changed: {error}"))
}

fn desired<'a>(vips: &'a [Vip], backends: &[Backend]) -> Vec<DesiredService<'a>> {
    vips.iter()
        .map(|vip| DesiredService {
            vip,
            backends: backends
                .iter()
                .filter(|b| b.vip == vip.name)
                .map(|b| DesiredBackend {
                    address: b.address,
                    port: b.port,
                    weight: b.weight(),
                    max_flows: b.max_flows,
                    flags: if b.draining { BACKEND_DRAINING } else { 0 },
                    in_table: b.in_table(),
                })
                .collect(),
        })
        .collect()
}

/// The backends `config` declares: `[[vip.backend]]`s, then model instances.
fn build_backends(config: &Config, specs: Vec<InstanceSpec>) -> Vec<Backend> {
    let mut out = Vec::new();
    let blank = |vip: &Vip, address, port, weight, max_flows, check: &HealthCheck| Backend {
        vip: vip.name.clone(),
        vip_address: SocketAddr::new(vip.address, vip.port).to_string(),
        address,
        port,
        config_weight: weight,
        weight_override: None,
        max_flows,
        draining: false,
        health: Health::default(),
        check: check.clone(),
        instance: None,
        load_source: LoadSource::None,
        load_aware: vip.load_aware,
        load_interval: vip.load_interval,
        load: Load::default(),
        load_error: None,
        probe_generation: 0,
        probe_cancel: CancellationToken::new(),
    };
    for vip in &config.vips {
        for b in &vip.backends {
            out.push(blank(
                vip,
                b.address,
                b.port,
                b.weight,
                b.max_flows,
                &vip.health,
            ));
        }
    }
    for spec in specs {
        let model = config
            .models
            .iter()
            .find(|m| m.name == spec.model)
            .expect("instances come from the config's models");
        let vip = config
            .vips
            .iter()
            .find(|v| v.name == spec.vip)
            .expect("a model's VIP is checked by the config");
        let mut b = blank(
            vip,
            spec.address,
            spec.port,
            spec.weight,
            model.max_flows,
            &model.health,
        );
        b.load_source = model.load;
        let (commands, _) = mpsc::unbounded_channel();
        b.instance = Some(Instance {
            spec,
            pid: None,
            start_time: 0,
            restarts: 0,
            // Until the supervisor reports: an adopted process keeps its slots meanwhile.
            phase: Phase::Running,
            commands,
        });
        out.push(b);
    }
    out
}

/// Established (or being established) TCP connections by local address and port, from
/// /proc/net/tcp and tcp6 of this network namespace (the backends are local).
pub fn live_connections() -> HashMap<(IpAddr, u16), usize> {
    tcp_sockets().established
}

/// The TCP sockets of this network namespace, from /proc/net/tcp and /proc/net/tcp6.
/// IPv4-mapped addresses (IPv4 clients of a dual-stack socket) are counted as IPv4.
#[derive(Debug, Default)]
pub struct TcpSockets {
    /// ESTABLISHED or SYN_RECV, by local address and port.
    pub established: HashMap<(IpAddr, u16), usize>,
    /// Listening sockets (0.0.0.0 or :: for a wildcard).
    pub listening: HashSet<(IpAddr, u16)>,
}

impl TcpSockets {
    /// A socket listens on this address: its own, or the wildcard of its family, or `::`
    /// (dual-stack: it takes IPv4 too).
    pub fn is_listening(&self, addr: IpAddr, port: u16) -> bool {
        let wildcard = match addr {
            IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        [addr, wildcard, IpAddr::V6(Ipv6Addr::UNSPECIFIED)]
            .iter()
            .any(|a| self.listening.contains(&(*a, port)))
    }

    pub fn connections(&self, addr: IpAddr, port: u16) -> usize {
        self.established.get(&(addr, port)).copied().unwrap_or(0)
    }
}

pub fn tcp_sockets() -> TcpSockets {
    let mut out = TcpSockets::default();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let mut fields = line.split_whitespace();
            let (Some(local), Some(_remote), Some(state)) =
                (fields.nth(1), fields.next(), fields.next())
            else {
                continue;
            };
            // ESTABLISHED, or SYN_RECV: a handshake the data path already sent here.
            // 0A: LISTEN.
            if !matches!(state, "01" | "03" | "0A") {
                continue;
            }
            let Some(key) = proc_net_address(local) else {
                continue;
            };
            if state == "0A" {
                out.listening.insert(key);
            } else {
                *out.established.entry(key).or_insert(0) += 1;
            }
        }
    }
    out
}

/// `0100007F:1F90` (tcp) or 32 hex digits and a port (tcp6). The kernel prints each
/// network-order 32-bit word of the address as a host integer.
fn proc_net_address(text: &str) -> Option<(IpAddr, u16)> {
    let (addr, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut bytes = Vec::with_capacity(16);
    for k in (0..addr.len()).step_by(8) {
        let word = u32::from_str_radix(addr.get(k..k + 8)?, 16).ok()?;
        bytes.extend_from_slice(&word.to_ne_bytes());
    }
    let ip = match bytes.len() {
        4 => IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
        16 => IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?).to_canonical(),
        _ => return None,
    };
    Some((ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_addresses_of_both_families() {
        // 127.0.0.1:8080 as /proc/net/tcp prints it (little-endian host).
        assert_eq!(
            proc_net_address("0100007F:1F90"),
            Some((IpAddr::from([127, 0, 0, 1]), 8080))
        );
        // [::1]:8001 in /proc/net/tcp6: four words, each the network-order word read as a
        // host integer.
        assert_eq!(
            proc_net_address("00000000000000000000000001000000:1F41"),
            Some((IpAddr::V6(Ipv6Addr::LOCALHOST), 8001))
        );
        // An IPv4 client of a dual-stack socket: ::ffff:198.18.0.1 counts as IPv4.
        assert_eq!(
            proc_net_address("0000000000000000FFFF0000010012C6:1F41"),
            Some((IpAddr::from([198, 18, 0, 1]), 8001))
        );
        assert_eq!(proc_net_address("0100007F"), None);
    }
}
