//! The tasks that feed the state task: one probe task per backend (with its load scrapes,
//! where its VIP steers by load), a supervisor per model instance, and the periodic tick of
//! the live-flow reconciliation. Each sends its results to the state task as messages.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::backend::{Backend, ProbeTask};
use crate::{
    config::Model,
    control::BackendKey,
    gpu::InstanceSpec,
    health, load,
    supervisor::{self, Command, InstanceRecord, RestartPolicy},
};

/// Probe and load results, and ticks, to the state task.
#[derive(Debug)]
pub enum Msg {
    Probe {
        key: BackendKey,
        generation: u64,
        result: Result<Duration, String>,
    },
    /// A reading of the backend's engine, and when it arrived (`CLOCK_MONOTONIC` ns).
    Load {
        key: BackendKey,
        generation: u64,
        result: Result<load::EngineSignal, String>,
        at_ns: u64,
    },
    /// Time to check the data path's live-flow counts against the sockets.
    Reconcile,
}

/// How often the live-flow counts are checked.
pub const RECONCILE_INTERVAL: Duration = Duration::from_secs(1);

/// Starts the tasks of the state task's backends.
pub struct Tasks {
    msgs: mpsc::UnboundedSender<Msg>,
    supervisor_events: mpsc::UnboundedSender<supervisor::Event>,
    cancel: CancellationToken,
    probe_client: reqwest::Client,
    load_client: reqwest::Client,
    next_generation: u64,
}

impl Tasks {
    pub fn new(
        msgs: mpsc::UnboundedSender<Msg>,
        supervisor_events: mpsc::UnboundedSender<supervisor::Event>,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            msgs,
            supervisor_events,
            cancel,
            probe_client: health::client(),
            load_client: load::client(),
            next_generation: 0,
        }
    }

    /// The reconciliation tick, until the daemon stops.
    pub fn start_reconcile(&self) {
        spawn_periodic(
            RECONCILE_INTERVAL,
            self.cancel.clone(),
            self.msgs.clone(),
            || async { Msg::Reconcile },
        );
    }

    /// (Re)starts `b`'s probe task, and the readings of its engine if it has one; the old
    /// tasks stop.
    pub fn start_probe(&mut self, b: &mut Backend) {
        b.probe.stop();
        self.next_generation += 1;
        b.probe = ProbeTask {
            generation: self.next_generation,
            cancel: self.cancel.child_token(),
        };
        let (key, generation) = (b.key().clone(), b.probe.generation);
        if b.reports_load() {
            self.start_load(b);
        }
        let (addr, check, client) = (b.addr(), b.spec.check.clone(), self.probe_client.clone());
        spawn_periodic(
            check.interval,
            b.probe.cancel.clone(),
            self.msgs.clone(),
            move || {
                let (key, check, client) = (key.clone(), check.clone(), client.clone());
                async move {
                    let result = health::probe(&client, addr, &check).await;
                    Msg::Probe {
                        key,
                        generation,
                        result,
                    }
                }
            },
        );
    }

    /// Reads the backend's engine every `signal_interval` (stops with its probe task).
    fn start_load(&self, b: &Backend) {
        let (key, generation) = (b.key().clone(), b.probe.generation);
        let (addr, settings, client) = (b.addr(), b.spec.engine, self.load_client.clone());
        let gpus: Vec<String> = b
            .spec
            .instance
            .iter()
            .flat_map(|i| i.gpus.iter().map(|g| g.uuid.clone()))
            .collect();
        spawn_periodic(
            settings.interval,
            b.probe.cancel.clone(),
            self.msgs.clone(),
            move || {
                let (key, client, gpus) = (key.clone(), client.clone(), gpus.clone());
                async move {
                    let result =
                        load::scrape(&client, addr, settings.source, &gpus, settings.timeout).await;
                    Msg::Load {
                        key,
                        generation,
                        result,
                        at_ns: load::monotonic_ns(),
                    }
                }
            },
        );
    }

    /// Starts the supervisor of `spec` once `before` is done (adopting `record`'s process
    /// if it is still running); returns its command channel.
    pub fn supervise(
        &self,
        spec: InstanceSpec,
        model: &Model,
        record: Option<InstanceRecord>,
        ctx: SuperviseContext,
        before: impl Future<Output = ()> + Send + 'static,
    ) -> mpsc::UnboundedSender<Command> {
        let (tx, rx) = mpsc::unbounded_channel();
        let ctx = supervisor::Context {
            log_dir: ctx.log_dir,
            kill_timeout: ctx.kill_timeout,
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
}

/// Where a supervisor writes, and how long it waits for a process to stop.
pub struct SuperviseContext {
    pub log_dir: std::path::PathBuf,
    pub kill_timeout: Duration,
}

/// Waits until `addr` can be bound (its previous process let go of it), at most `limit`.
pub async fn port_free(addr: SocketAddr, limit: Duration) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline && std::net::TcpListener::bind(addr).is_err() {
        tokio::time::sleep(Duration::from_millis(50)).await;
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
