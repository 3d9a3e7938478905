//! The state task: the one owner of every backend's state and of the maps. Every change
//! arrives as a message (a probe or load result, a supervisor event, an operator request, a
//! reload, a restart tick); each handler changes the backends, and `sync` rewrites only the
//! table slots that changed. A snapshot of the backends goes to the metrics after each.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use lb_common::BACKEND_DRAINING;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{
    backend::{self, Backend, Phase},
    persist::{Inherited, Persisted},
    reconcile::Reconciler,
    restart::RollingRestart,
    tasks::{Msg, SuperviseContext, Tasks},
};
use crate::{
    config::{Config, PrefixAffinity, Vip},
    control::{BackendKey, BackendStatus, Response},
    datapath::{Datapath, ErrorChain},
    gpu::InstanceSpec,
    health::Health,
    load,
    metrics::{self, DaemonMetrics, Snapshot},
    plan::{self, DesiredBackend, DesiredService, Plan},
    supervisor::{self, Command, InstanceRecord},
};

/// A rolling restart and the operator waiting for its outcome.
pub(super) struct Restart {
    pub(super) machine: RollingRestart,
    pub(super) reply: oneshot::Sender<Response>,
    /// Instances an operator had drained before their turn: left drained after it.
    pub(super) kept_drained: Vec<String>,
}

pub struct State {
    pub config: Config,
    pub(super) config_path: PathBuf,
    pub datapath: Datapath,
    pub backends: Vec<Backend>,
    /// The plan last written to the maps (`None`: unknown, read them back).
    pub(super) applied: Option<Plan>,
    pub(super) tasks: Tasks,
    pub metrics: Arc<DaemonMetrics>,
    reconciler: Reconciler,
    pub(super) restarts: Vec<Restart>,
    /// Under `prefix_affinity = "auto"`: whether each VIP (by name) is sticky now.
    sticky: HashMap<String, bool>,
    snapshot: watch::Sender<Snapshot>,
}

impl State {
    /// Also returns the receiver of the supervisors' events, which the state task must
    /// read before its other messages (an instance's `Started` is sent before the process
    /// can answer a probe, and must be handled before that probe's result), and the
    /// snapshots for the metrics.
    pub fn new(
        config: Config,
        config_path: PathBuf,
        datapath: Datapath,
        msgs: mpsc::UnboundedSender<Msg>,
        cancel: CancellationToken,
    ) -> (
        Self,
        mpsc::UnboundedReceiver<supervisor::Event>,
        watch::Receiver<Snapshot>,
    ) {
        let (events, events_rx) = mpsc::unbounded_channel();
        let (snapshot, snapshot_rx) = watch::channel(Snapshot::default());
        let state = Self {
            config,
            config_path,
            datapath,
            backends: Vec::new(),
            applied: None,
            tasks: Tasks::new(msgs, events, cancel),
            metrics: DaemonMetrics::new(),
            reconciler: Reconciler::default(),
            restarts: Vec::new(),
            sticky: HashMap::new(),
            snapshot,
        };
        (state, events_rx, snapshot_rx)
    }

    /// Builds the backends of the config, starting (or adopting) instances and probes.
    pub fn start(
        &mut self,
        instances: Vec<InstanceSpec>,
        inherited: &Inherited,
        persisted: &Persisted,
    ) {
        for spec in backend::specs(&self.config, instances) {
            let mut b = Backend::new(spec);
            if inherited.in_table.contains(b.key()) {
                b.health = Health::inherited();
            }
            b.draining =
                inherited.draining.contains(b.key()) || persisted.drained.contains(b.key());
            b.weight_override = persisted.weights.get(b.key()).copied();
            self.add(b, &persisted.instances);
        }
        self.write_ct_config();
        self.tasks.start_reconcile();
    }

    /// The conntrack insert budget of the config, into `CT_CONFIG`.
    pub(super) fn write_ct_config(&mut self) {
        let config = lb_common::CtConfig {
            inserts_per_cpu: self.config.conntrack_inserts_per_cpu,
        };
        if let Err(e) = self.datapath.maps.set_ct_config(config) {
            error!(error = %ErrorChain(&e), "writing the conntrack insert budget");
        }
    }

    pub(super) fn add(&mut self, mut b: Backend, records: &[InstanceRecord]) {
        if let (Some(spec), Some(process)) = (&b.spec.instance, &mut b.process) {
            let record = records
                .iter()
                .find(|r| r.name == spec.name && r.port == spec.port)
                .cloned();
            process.restarts = record.as_ref().map_or(0, |r| r.restarts);
            process.pid = record.as_ref().map(|r| r.pid);
            process.commands = self.supervise(spec.clone(), record, async {});
        }
        self.tasks.start_probe(&mut b);
        self.backends.push(b);
    }

    /// Starts the supervisor of `spec` once `before` is done.
    pub(super) fn supervise(
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
        let ctx = SuperviseContext {
            log_dir: self.config.log_dir.clone(),
            kill_timeout: self.config.kill_timeout,
        };
        self.tasks.supervise(spec, model, record, ctx, before)
    }

    /// Handles a probe or load result, or a tick; returns true if the tables may need
    /// rewriting.
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
                let error_before = b.health.last_error.clone();
                let changed = b.health.record(result, &b.spec.check);
                if !b.health.seen_up && error.is_some() && error != error_before {
                    // Starting: say why it is not ready yet, once per new reason.
                    info!(backend = %key, error = error.as_deref().unwrap_or(""), "backend not ready yet");
                }
                check_start_timeout(b);
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
                at_ns,
            } => {
                let Some(i) = self
                    .backends
                    .iter()
                    .position(|b| b.key() == &key && b.probe.generation == generation)
                else {
                    return false;
                };
                // The live flows now, as near the engine's answer as the state task gets.
                let live = self.live_flows(&key) as u32;
                let b = &mut self.backends[i];
                match result {
                    Ok(signal) => b.engine.record(signal, at_ns, live),
                    Err(e) => {
                        if b.engine.error.as_ref() != Some(&e) {
                            warn!(backend = %key, error = %e, "reading the engine's load");
                        }
                        b.engine.error = Some(e);
                        return false;
                    }
                }
                self.write_engine(i);
                self.update_sticky(&key.vip)
            }
            Msg::Reconcile => {
                if let Some(plan) = &self.applied {
                    self.reconciler.check(plan, &mut self.datapath.maps);
                }
                // Each VIP's spare table block up to date, so the next change writes only
                // what it changes.
                if let Err(e) = self.datapath.maps.catch_up_all() {
                    warn!(error = %ErrorChain(&e), "updating the spare table blocks");
                }
                self.publish();
                false
            }
        }
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
                let process = b.process.as_mut().expect("an instance has a process");
                process.pid = Some(pid);
                process.start_time = start_time;
                process.restarts = restarts;
                process.phase = Phase::Running;
                process.starting_since = (!adopted).then(Instant::now);
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
                let key = b.key().clone();
                let was_in = b.in_table();
                let labels = ejection_labels(b, "exit");
                let process = b.process.as_mut().expect("an instance has a process");
                process.phase = Phase::Exited { crash_loop };
                process.restarts = restarts;
                process.pid = None;
                process.starting_since = None;
                b.health = Health {
                    last_error: Some(format!("exited: {status}")),
                    ..Health::default()
                };
                if was_in {
                    self.metrics.ejections.with_label_values(&labels).inc();
                    // One write first: from it on the scheduler chooses the backend for no
                    // new flow, before the table is even planned.
                    self.flag_out(&key);
                    let flagged_out_in_us = at.elapsed().as_micros() as u64;
                    // Rewrite the table now, and say how long each took from the exit.
                    self.sync();
                    info!(
                        backend = %key,
                        instance = %instance,
                        %status,
                        flagged_out_in_us,
                        ejected_in_us = at.elapsed().as_micros() as u64,
                        "backend ejected"
                    );
                }
                self.persist();
                !was_in
            }
        }
    }

    /// Flags a backend out of its table in `BACKENDS` (its established flows continue), the
    /// one write an ejection needs before the table is rebuilt.
    fn flag_out(&mut self, key: &BackendKey) {
        let Some(id) = self.id_of(key) else { return };
        let maps = &mut self.datapath.maps;
        let flagged = maps.backend(id).and_then(|mut b| {
            b.flags |= lb_common::BACKEND_OUT;
            maps.set_backend(id, &b)
        });
        if let Err(e) = flagged {
            error!(backend = %key, error = %ErrorChain(&e), "flagging an ejected backend out");
            return;
        }
        // The applied plan says what the maps hold: so it does, should the next sync not
        // get to write (its backend entry then differs and is written when it returns).
        let planned = self
            .applied
            .iter_mut()
            .flat_map(|p| p.services.iter_mut())
            .flat_map(|s| s.backends.iter_mut())
            .find(|(i, _)| *i == id);
        if let Some((_, b)) = planned {
            b.flags |= lb_common::BACKEND_OUT;
        }
    }

    pub(super) fn instance_mut(&mut self, name: &str) -> Option<&mut Backend> {
        self.backends
            .iter_mut()
            .find(|b| b.instance_name() == Some(name))
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
        let desired = desired(&self.config.vips, &self.backends, &self.sticky);
        let mut plan = match plan::plan(&desired, &services, &backends) {
            Ok(p) => p,
            Err(e) => {
                error!(error = %e, "planning the tables");
                return;
            }
        };
        if self.applied.as_ref() == Some(&plan) {
            return;
        }
        match plan::apply(&mut self.datapath.maps, &mut plan, self.applied.as_ref()) {
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
                return;
            }
        }
        // Ids may be new: every backend's capacity and engine numbers under its id.
        for i in 0..self.backends.len() {
            self.write_engine(i);
        }
    }

    /// Decides again whether VIP `name` is sticky, from its engines' prefix-cache hit
    /// rates; true if that changed (the tables need rewriting).
    fn update_sticky(&mut self, name: &str) -> bool {
        let Some(vip) = self.config.vips.iter().find(|v| v.name == name) else {
            return false;
        };
        let was = self.sticky.get(name).copied().unwrap_or(true);
        let engines: Vec<_> = self
            .backends
            .iter()
            .filter(|b| b.key().vip == name)
            .map(|b| &b.engine.prefix)
            .collect();
        let at = load::monotonic_ns();
        let observed = engines
            .iter()
            .filter(|p| p.since_ns != 0)
            .map(|p| at.saturating_sub(p.since_ns))
            .max()
            .unwrap_or(0);
        let rates = engines.iter().filter_map(|p| p.hit_rate());
        let now = load::sticky(vip.scheduler.prefix_affinity, was, rates, observed);
        self.sticky.insert(name.to_owned(), now);
        if now != was && vip.scheduler.prefix_affinity == PrefixAffinity::Auto {
            info!(
                vip = name,
                mode = if now { "sticky" } else { "balanced" },
                "prefix-cache hit rate changed the scheduling mode"
            );
            return true;
        }
        false
    }

    /// Writes backend `i`'s engine numbers and capacity (`BACKEND_LOAD`) under its id.
    fn write_engine(&mut self, i: usize) {
        let b = &self.backends[i];
        let Some(id) = self.id_of(b.key()) else {
            return;
        };
        let load = b.engine.to_map(b.spec.engine.slots);
        if let Err(e) = self.datapath.maps.set_engine(id, load) {
            warn!(backend = %b.key(), error = %ErrorChain(&e), "writing the engine's load");
        }
    }

    /// A backend's id in the maps, as last written.
    pub(super) fn id_of(&self, key: &BackendKey) -> Option<u32> {
        let service = self
            .applied
            .as_ref()?
            .services
            .iter()
            .find(|s| s.name == key.vip)?;
        service
            .backends
            .iter()
            .find(|(_, b)| b.addr == key.addr)
            .map(|(id, _)| *id)
    }

    /// A backend's live flows as the data path counts them (0 before it has an id).
    pub(super) fn live_flows(&self, key: &BackendKey) -> usize {
        self.id_of(key)
            .and_then(|id| self.datapath.maps.live_flows(id).ok())
            .unwrap_or(0) as usize
    }

    /// Writes `state_dir/state.json`.
    pub fn persist(&self) {
        Persisted::of(self.backends.iter()).write(&self.config.state_dir);
    }

    /// Sends the metrics what the backends are now.
    pub fn publish(&self) {
        self.snapshot.send_replace(Snapshot::new(self.status()));
    }

    /// Every backend as `gpulb backends` shows it.
    pub fn status(&self) -> Vec<BackendStatus> {
        let ids = self.ids();
        let now = load::monotonic_ns();
        self.backends
            .iter()
            .map(|b| {
                let id = ids.get(b.key()).copied();
                let live = id
                    .and_then(|id| self.datapath.maps.live_flows(id).ok())
                    .unwrap_or(0);
                b.status(id, live as usize, now)
            })
            .collect()
    }

    /// The backends' ids in the maps, as last written.
    fn ids(&self) -> HashMap<BackendKey, u32> {
        self.applied
            .iter()
            .flat_map(|p| &p.services)
            .flat_map(|s| {
                s.backends.iter().map(|(id, b)| {
                    let key = BackendKey {
                        vip: s.name.clone(),
                        addr: b.addr,
                    };
                    (key, *id)
                })
            })
            .collect()
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
            let live: usize = self.backends.iter().map(|b| self.live_flows(b.key())).sum();
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
            b.probe.stop();
            if let Some(p) = &b.process {
                let (done, wait) = oneshot::channel();
                if p.commands.send(Command::Stop(done)).is_ok() {
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

/// The backend a probe or load result is for, unless the result comes from a task that has
/// since been replaced (a restart or reload started a new one).
fn current<'a>(
    backends: &'a mut [Backend],
    key: &BackendKey,
    generation: u64,
) -> Option<&'a mut Backend> {
    backends
        .iter_mut()
        .find(|b| b.key() == key)
        .filter(|b| b.probe.generation == generation)
}

/// A model instance still not ready `start_timeout` after its start is failed: its
/// supervisor stops it and counts a failed start.
fn check_start_timeout(b: &mut Backend) {
    let (Some(limit), Some(process)) = (b.spec.check.start_timeout, b.process.as_mut()) else {
        return;
    };
    if b.health.up {
        process.starting_since = None;
        return;
    }
    let Some(since) = process.starting_since else {
        return;
    };
    if since.elapsed() < limit {
        return;
    }
    process.starting_since = None;
    let Some(pid) = process.pid else {
        return;
    };
    let why = format!(
        "not ready {limit:?} after its start (start_timeout_ms): {}",
        b.health
            .last_error
            .as_deref()
            .unwrap_or("no probe succeeded")
    );
    let _ = process.commands.send(Command::FailStart { pid, why });
}

/// `gpulb_ejections_total`'s labels for `b`.
fn ejection_labels(b: &Backend, cause: &'static str) -> [String; 4] {
    metrics::ejection_labels(b.spec.vip_address, b.addr(), b.instance_name(), cause)
}

/// The desired table contents: per VIP in config order.
fn desired<'a>(
    vips: &'a [Vip],
    backends: &[Backend],
    sticky: &HashMap<String, bool>,
) -> Vec<DesiredService<'a>> {
    vips.iter()
        .map(|vip| DesiredService {
            sticky: match vip.scheduler.prefix_affinity {
                PrefixAffinity::On => true,
                PrefixAffinity::Off => false,
                PrefixAffinity::Auto => sticky.get(&vip.name).copied().unwrap_or(true),
            },
            vip,
            backends: backends
                .iter()
                .filter(|b| b.key().vip == vip.name)
                .map(|b| DesiredBackend {
                    address: b.addr().ip(),
                    port: b.addr().port(),
                    weight: b.weight(),
                    max_flows: b.spec.max_flows,
                    flags: if b.draining { BACKEND_DRAINING } else { 0 },
                    in_table: b.in_table(),
                })
                .collect(),
        })
        .collect()
}
