//! What operators ask of the state task: drain, weight, reload (the diff from `reload.rs`
//! carried out) and rolling restarts (the machine from `restart.rs` driven on its ticks).

use std::{
    collections::HashMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use tokio::sync::oneshot;
use tracing::{error, info, warn};

use super::{
    backend::{self, Backend, Process},
    reload::{self, Change, ReloadPlan},
    restart::{self, Action, RollingRestart},
    state::{Restart, State},
    tasks::port_free,
};
use crate::{
    config::{Config, Vip},
    control::{BackendKey, Request, Response},
    datapath::ErrorChain,
    gpu::{self, Inventory},
    health::Health,
    plan::{self, DesiredBackend, DesiredService, Plan},
    supervisor::Command,
};

impl State {
    /// An operator's request; the answer goes to `reply` (a rolling restart's when it ends).
    pub fn control(&mut self, request: Request, reply: oneshot::Sender<Response>) {
        let response = match request {
            Request::Status => Response {
                ok: true,
                backends: self.status(),
                ..Response::default()
            },
            Request::Drain { backend } => self.drain(&backend, true),
            Request::Undrain { backend } => self.drain(&backend, false),
            Request::Weight { backend, weight } => self.set_weight(&backend, weight),
            Request::Reload => self.reload(),
            Request::Restart { model } => return self.start_restart(&model, reply),
        };
        let _ = reply.send(response);
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
                    .map(|&i| self.backends[i].key().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }

    pub(super) fn drain(&mut self, selector: &str, on: bool) -> Response {
        let b = match self.select(selector) {
            Ok(b) => b,
            Err(e) => return Response::error(e),
        };
        let key = b.key().clone();
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
                .filter(|s| s.key() == key)
                .collect(),
            ..Response::ok(format!(
                "{key}: {}",
                if on { "draining" } else { "taking new flows" }
            ))
        }
    }

    pub(super) fn set_weight(&mut self, selector: &str, weight: u32) -> Response {
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
        let key = b.key().clone();
        b.weight_override = (weight != b.spec.weight).then_some(weight);
        info!(backend = %key, weight, "weight set");
        self.sync();
        self.persist();
        Response::ok(format!("{key}: weight {weight}"))
    }

    pub(super) fn start_restart(&mut self, model: &str, reply: oneshot::Sender<Response>) {
        // One rolling restart at a time: two would take two instances out at once and undrain
        // each other's.
        if let Some(running) = self.restarts.first() {
            let _ = reply.send(Response::error(format!(
                "restart of {model:?}: a rolling restart ({}) is running; wait for it to end",
                running.machine.model
            )));
            return;
        }
        let instances = self
            .backends
            .iter()
            .filter(|b| b.spec.instance.as_ref().is_some_and(|i| i.model == model))
            .filter_map(|b| b.instance_name().map(str::to_owned))
            .collect();
        self.start_rolling(model, instances, false, reply);
    }

    /// Starts a rolling restart of `instances` (selectors: names or keys); `model` names it
    /// in messages. `skip_gone`: an instance removed meanwhile is skipped, not an error.
    fn start_rolling(
        &mut self,
        model: &str,
        instances: Vec<String>,
        skip_gone: bool,
        reply: oneshot::Sender<Response>,
    ) {
        let (machine, first) = match RollingRestart::start(
            model,
            instances,
            self.config.drain_timeout,
            skip_gone,
            Instant::now(),
        ) {
            Ok(started) => started,
            Err(e) => {
                let _ = reply.send(Response::error(format!("restart of {model:?}: {e}")));
                return;
            }
        };
        info!(model, "rolling restart: one instance at a time");
        let mut restart = Restart {
            machine,
            reply,
            kept_drained: Vec::new(),
        };
        if let Some(done) = self.carry_out(&mut restart, vec![first]) {
            let _ = restart.reply.send(done);
            return;
        }
        self.restarts.push(restart);
    }

    /// Whether a rolling restart runs (and `step_restarts` is due every `restart::TICK`).
    pub fn restarting(&self) -> bool {
        !self.restarts.is_empty()
    }

    /// One tick of every rolling restart.
    pub fn step_restarts(&mut self) {
        let now = Instant::now();
        for mut r in std::mem::take(&mut self.restarts) {
            let name = r.machine.instance().to_owned();
            let view = self
                .backends
                .iter()
                .find(|b| b.matches(&name))
                .map(|b| restart::View {
                    live_flows: self.live_flows(b.key()),
                    healthy: b.running() && b.health.up,
                    pid: b.process.as_ref().and_then(|p| p.pid),
                    state: b.state(),
                    last_error: b.health.last_error.clone(),
                });
            if let Some(v) = &view
                && r.machine.drain_timed_out(v, now)
            {
                warn!(instance = %name, live = v.live_flows, "rolling restart: drain timeout, restarting anyway");
            }
            let actions = r.machine.step(view.as_ref(), now);
            match self.carry_out(&mut r, actions) {
                Some(done) => {
                    match &done.error {
                        None => {
                            info!(model = %r.machine.model, message = done.message.as_deref().unwrap_or(""), "rolling restart done")
                        }
                        Some(e) => {
                            warn!(model = %r.machine.model, error = %e, "rolling restart stopped")
                        }
                    }
                    let _ = r.reply.send(done);
                }
                None => self.restarts.push(r),
            }
        }
    }

    /// Carries out a restart's actions; `Some` with the operator's answer once it is over.
    fn carry_out(&mut self, r: &mut Restart, actions: Vec<Action>) -> Option<Response> {
        for action in actions {
            match action {
                Action::Drain(name) => {
                    // Drained by an operator before: it stays drained after its restart.
                    if self.backends.iter().any(|b| b.matches(&name) && b.draining) {
                        r.kept_drained.push(name.clone());
                    }
                    if let Err(e) = self.drain(&name, true).error.map_or(Ok(()), Err) {
                        return Some(Response::error(format!(
                            "restart of {:?}: {e}",
                            r.machine.model
                        )));
                    }
                    info!(instance = %name, "rolling restart: draining");
                }
                Action::Restart(name) => {
                    if self.replace(&name) {
                        info!(instance = %name, "rolling restart: started with the reloaded command");
                        continue;
                    }
                    let sent = self
                        .backends
                        .iter()
                        .find(|b| b.matches(&name))
                        .and_then(|b| b.process.as_ref())
                        .is_some_and(|p| {
                            let (done, _) = oneshot::channel();
                            p.commands.send(Command::Restart(done)).is_ok()
                        });
                    if !sent {
                        return Some(Response::error(format!(
                            "restart of {:?}: instance {name} is not supervised",
                            r.machine.model
                        )));
                    }
                }
                Action::Undrain(name) if r.kept_drained.contains(&name) => {
                    info!(instance = %name, "rolling restart: instance back, left drained as it was");
                }
                Action::Undrain(name) => {
                    self.drain(&name, false);
                    info!(instance = %name, "rolling restart: instance back in service");
                }
                Action::Finish(Ok(message)) => return Some(Response::ok(message)),
                Action::Finish(Err(e)) => {
                    return Some(Response::error(format!(
                        "restart of {:?}: {e}",
                        r.machine.model
                    )));
                }
            }
        }
        None
    }

    /// SIGHUP: a valid config is applied as a diff; an invalid one changes nothing.
    pub fn reload(&mut self) -> Response {
        let new = match Config::load(&self.config_path) {
            Ok(c) => c,
            Err(e) => return reload_rejected(ErrorChain(&e).to_string()),
        };
        let instances = match Inventory::discover(&new).and_then(|inv| gpu::instances(&new, &inv)) {
            Ok(s) => s,
            Err(e) => return reload_rejected(ErrorChain(&e).to_string()),
        };
        // What each backend runs, or will once its pending replacement is done.
        let current: Vec<_> = self
            .backends
            .iter()
            .map(|b| b.replacement.as_ref().unwrap_or(&b.spec))
            .collect();
        let incoming = backend::specs(&new, instances);
        let plan = match reload::diff(&self.config, &new, &current, incoming) {
            Ok(p) => p,
            Err(e) => return reload_rejected(format!("{}: {e}", self.config_path.display())),
        };
        // Dry run: ids must be allocatable before anything changes.
        let (services, backends) = self.applied.as_ref().map(Plan::current).unwrap_or_default();
        if let Err(e) = plan::plan(&dry_run(&new.vips, &plan), &services, &backends) {
            return reload_rejected(e.to_string());
        }
        self.apply_reload(new, plan)
    }

    fn apply_reload(&mut self, new: Config, plan: ReloadPlan) -> Response {
        let mut old: HashMap<BackendKey, Backend> = std::mem::take(&mut self.backends)
            .into_iter()
            .map(|b| (b.key().clone(), b))
            .collect();
        for key in &plan.removed {
            let Some(b) = old.remove(key) else { continue };
            info!(backend = %key, "backend removed by reload");
            b.probe.stop();
            stop(b.process.as_ref());
        }
        // The maps keep the sizes they were made with (a change of them was refused above;
        // a default that shrank with the last IPv6 VIP applies at the next restart).
        let mut new = new;
        new.map_sizes = self.config.map_sizes;
        self.config = new;
        self.write_ct_config();
        let added = plan.count(Change::Added);
        // Instances to be replaced (a command changed back by this reload is not one).
        let mut replaced = 0;
        let mut rolling = Vec::new();
        for (spec, change) in plan.backends {
            let Some(mut b) = old.remove(&spec.key) else {
                info!(backend = %spec.key, "backend added by reload");
                self.add(Backend::new(spec), &[]);
                continue;
            };
            if b.process.is_some() {
                match change {
                    // Back to what it runs (a reverted config): nothing to replace.
                    Change::Replaced if spec.instance == b.spec.instance => {
                        b.replacement = None;
                        let (id, name) = (b.key().to_string(), b.instance_name());
                        for r in &mut self.restarts {
                            r.machine.forget(&id);
                            name.inspect(|n| r.machine.forget(n));
                        }
                    }
                    // Replaced in turn, like `gpulb restart`: the model never loses more than
                    // one instance, and each is drained first. Until its turn it runs as it
                    // was. (Named by its key: a reload may rename its model.)
                    Change::Replaced => {
                        let id = b.key().to_string();
                        let name = b.instance_name().unwrap_or_default().to_owned();
                        info!(backend = %spec.key, "reload: command changed, replaced in turn");
                        b.replacement = Some(spec);
                        replaced += 1;
                        let queued = |r: &Restart| {
                            r.machine.will_restart(&id) || r.machine.will_restart(&name)
                        };
                        if !self.restarts.iter().any(queued) {
                            rolling.push(id);
                        }
                        self.backends.push(b);
                        continue;
                    }
                    // Still waiting for its turn, with what this config says.
                    Change::Kept if b.replacement.is_some() => {
                        b.replacement = Some(spec);
                        self.backends.push(b);
                        continue;
                    }
                    _ => {}
                }
            }
            b.spec = spec;
            self.tasks.start_probe(&mut b);
            self.backends.push(b);
        }
        self.sync();
        self.persist();
        if !rolling.is_empty() {
            match self.restarts.first_mut() {
                // One rolling restart at a time: the running one takes these on after its own.
                Some(running) => running.machine.extend(rolling),
                None => {
                    let (reply, _) = oneshot::channel();
                    self.start_rolling(RELOAD, rolling, true, reply);
                }
            }
        }
        let removed = plan.removed.len();
        info!(added, removed, replaced, "config reloaded");
        Response::ok(format!(
            "config reloaded: {added} backends added, {removed} removed, {replaced} to be \
             replaced one at a time with their new command (drain, restart, ready, undrain)"
        ))
    }

    /// Stops a backend's process and starts its replacement spec's (a reload changed its
    /// command, environment or GPUs); the backend keeps its drain and its table slots.
    fn replace(&mut self, name: &str) -> bool {
        let Some(index) = self
            .backends
            .iter()
            .position(|b| b.matches(name) && b.replacement.is_some())
        else {
            return false;
        };
        let b = &mut self.backends[index];
        let spec = b.replacement.take().expect("found with a replacement");
        let stopped = stop(b.process.take().as_ref());
        let mut process = Backend::new(spec.clone()).process;
        if let (Some(instance), Some(process)) = (&spec.instance, &mut process) {
            // The old process is stopped first: it holds the port and the GPUs, and its exit
            // must reach the state task before the new one's start does.
            let addr = SocketAddr::new(instance.address, instance.port);
            let limit = self.config.kill_timeout + Duration::from_secs(1);
            let before = async move {
                let _ = stopped.await;
                port_free(addr, limit).await;
            };
            process.commands = self.supervise(instance.clone(), None, before);
        }
        let b = &mut self.backends[index];
        b.process = process;
        b.health = Health::default();
        b.spec = spec;
        self.tasks.start_probe(b);
        self.sync();
        true
    }
}

/// The "model" a reload's rolling replacement names in its messages.
const RELOAD: &str = "the reload";

/// Stops a process for good, without waiting; the receiver is told once it is stopped (and
/// its exit sent to the state task), or dropped if there was no process.
fn stop(process: Option<&Process>) -> oneshot::Receiver<()> {
    let (done, stopped) = oneshot::channel();
    if let Some(p) = process {
        let _ = p.commands.send(Command::Stop(done));
    }
    stopped
}

fn reload_rejected(error: String) -> Response {
    error!(error = %error, "config reload rejected; nothing changed");
    Response::error(format!("reload rejected, nothing changed: {error}"))
}

/// The tables a reload would need, with none of its backends in them yet: whether their
/// ids can be allocated.
fn dry_run<'a>(vips: &'a [Vip], plan: &ReloadPlan) -> Vec<DesiredService<'a>> {
    vips.iter()
        .map(|vip| DesiredService {
            vip,
            backends: plan
                .backends
                .iter()
                .filter(|(s, _)| s.key.vip == vip.name)
                .map(|(s, _)| DesiredBackend {
                    address: s.key.addr.ip(),
                    port: s.key.addr.port(),
                    weight: s.weight,
                    max_flows: s.max_flows,
                    flags: 0,
                    in_table: false,
                })
                .collect(),
            sticky: false,
        })
        .collect()
}
