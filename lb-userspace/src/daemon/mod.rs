//! `gpulb run`: load (or take over) the data path, start and watch the model instances,
//! keep the tables true to what is ready, and answer the control socket.
//!
//! Signals: SIGINT/SIGTERM stop everything gracefully (drain, stop the instances, detach,
//! unpin). SIGHUP reloads the config. SIGUSR2 hands over: the daemon exits and leaves the
//! data path, its maps and the instances running for the next `gpulb run` to take over.
//!
//! | module | concern |
//! |---|---|
//! | `state` | the state task: the event handlers and `sync` (backends → maps) |
//! | `ops` | operators' requests: drain, weight, reload, rolling restarts |
//! | `backend` | a backend's spec (from the config) and runtime state |
//! | `reload` | a reload as a pure diff of old and new backends |
//! | `restart` | a rolling restart as a pure state machine |
//! | `persist` | `state.json`, and what takeover finds in the maps |
//! | `reconcile` | live-flow counts checked against the sockets |
//! | `tasks` | probe, load, supervisor and tick tasks |
//! | `server` | the control socket |

mod backend;
mod ops;
mod persist;
pub mod reconcile;
mod reload;
mod restart;
mod server;
mod state;
mod tasks;

use std::{io, path::PathBuf, time::Instant};

use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, oneshot},
};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::{
    config::Config,
    control::{Request, Response},
    datapath::{Datapath, DatapathError},
    gpu::InstanceSpec,
    kernel,
    maps::MapsError,
};
use persist::{Inherited, Persisted};
use state::State;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("installing the {0} handler")]
    Signal(&'static str, #[source] io::Error),
    #[error(transparent)]
    Control(#[from] server::ServerError),
    #[error("loading the data path (pin path {})", path.display())]
    Load {
        path: PathBuf,
        #[source]
        source: Box<DatapathError>,
    },
    #[error("reading the pinned maps")]
    Maps(#[from] MapsError),
    #[error("attaching to {interface}")]
    Attach {
        interface: String,
        #[source]
        source: Box<DatapathError>,
    },
    #[error(transparent)]
    Kernel(#[from] crate::kernel::KernelError),
    #[error("attaching the socket-level programs")]
    Sockets(#[source] Box<DatapathError>),
    #[error("removing pins under {}", path.display())]
    Unpin {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// An operator's request from a control-socket connection, and where its answer goes.
pub struct Control {
    pub request: Request,
    pub reply: oneshot::Sender<Response>,
}

/// Installs the SIGINT and SIGTERM handlers now; the future resolves on the first signal.
pub fn shutdown_signal() -> Result<impl Future<Output = &'static str>, DaemonError> {
    let mut int = signal(SignalKind::interrupt()).map_err(|e| DaemonError::Signal("SIGINT", e))?;
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| DaemonError::Signal("SIGTERM", e))?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        }
    })
}

pub async fn run(
    config: Config,
    config_path: PathBuf,
    instances: Vec<InstanceSpec>,
) -> Result<(), DaemonError> {
    // Handlers first: a signal during set-up must still lead to a clean tear-down.
    let shutdown = shutdown_signal()?;
    tokio::pin!(shutdown);
    let mut hup = signal(SignalKind::hangup()).map_err(|e| DaemonError::Signal("SIGHUP", e))?;
    let mut usr2 =
        signal(SignalKind::user_defined2()).map_err(|e| DaemonError::Signal("SIGUSR2", e))?;
    let socket = config.control_socket();
    let listener = server::bind(&socket)?;

    // Before anything is loaded: a kernel gpulb cannot run on changes nothing.
    let (release, tc_path) = kernel::at_start(config.tc_attach)?;
    let datapath =
        Datapath::load(&config.pin_path, config.map_sizes).map_err(|e| DaemonError::Load {
            path: config.pin_path.clone(),
            source: Box::new(e),
        })?;
    let inherited = Inherited::read(&config, &datapath)?;
    let persisted = Persisted::read(&config.state_dir);
    let (msgs, mut inbox) = mpsc::unbounded_channel();
    let cancel = CancellationToken::new();
    let (interface, xdp_mode) = (config.interface.clone(), config.xdp_mode);
    let socket_lb = config.socket_lb.clone();
    let (mut state, mut supervisor_events, snapshot) =
        State::new(config, config_path, datapath, msgs, cancel.clone());
    state.start(instances, &inherited, &persisted);
    // Tables before the programs: a taken-over data path keeps its slots meanwhile.
    state.sync();
    let attached = state
        .datapath
        .attach(&interface, xdp_mode, tc_path)
        .map_err(|e| DaemonError::Attach {
            interface: interface.clone(),
            source: Box::new(e),
        })?;
    // The old programs are gone now: the flows they opened since the load join the rest.
    state.datapath.finish_carry();
    let cgroup = state
        .datapath
        .attach_sockets(&socket_lb)
        .map_err(|e| DaemonError::Sockets(Box::new(e)))?;
    state.persist();
    state.publish();

    let (control, mut requests) = mpsc::channel(64);
    if let Some(listen) = state.config.metrics_listen {
        tokio::spawn(crate::metrics::serve(
            listen,
            state.metrics.clone(),
            state.datapath.maps.duplicate()?,
            snapshot,
            cancel.clone(),
        ));
    }
    tokio::spawn(server::serve(listener, control, cancel.clone()));
    info!(
        interface = %interface,
        xdp_mode = attached.describe(),
        tc = tc_path.describe(),
        kernel = %release.map_or_else(|| "unknown".to_owned(), |r| r.to_string()),
        vips = state.config.vips.len(),
        backends = state.backends.len(),
        inherited = inherited.in_table.len(),
        socket_lb = %cgroup.as_deref().map_or_else(|| "off".into(), |p| p.display().to_string()),
        pin_path = %state.config.pin_path.display(),
        socket = %socket.display(),
        "gpulb ready"
    );

    // Polled only while a rolling restart runs; a tick missed meanwhile fires once, not in a
    // burst (the drain's "zero twice" must be a tick apart).
    let mut restart_tick = tokio::time::interval(restart::TICK);
    restart_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let handover = loop {
        tokio::select! {
            // Exits first (ejection), and a start before any probe of the new process.
            biased;
            Some(event) = supervisor_events.recv() => {
                if state.on_supervisor(event) {
                    state.sync();
                }
                state.publish();
            }
            Some(msg) = inbox.recv() => {
                if state.handle(msg) {
                    state.sync();
                    state.publish();
                }
            }
            Some(Control { request, reply }) = requests.recv() => {
                state.control(request, reply);
                state.publish();
            }
            _ = restart_tick.tick(), if state.restarting() => state.step_restarts(),
            _ = hup.recv() => {
                info!("SIGHUP: reloading the config");
                state.reload();
                state.publish();
            }
            _ = usr2.recv() => break true,
            signal = &mut shutdown => {
                info!(signal, "shutting down: draining, then stopping instances");
                break false;
            }
        }
    };
    server::remove(&socket);
    if handover {
        // Everything stays: links and maps pinned, instances running, state file current.
        state.persist();
        cancel.cancel();
        info!("handed over: data path and instances left running for the next gpulb");
        return Ok(());
    }
    let started = Instant::now();
    state.shut_down().await;
    cancel.cancel();
    let State {
        config, datapath, ..
    } = state;
    datapath.unpin().map_err(|source| DaemonError::Unpin {
        path: config.pin_path.clone(),
        source,
    })?;
    Persisted::remove(&config.state_dir);
    info!(pin_path = %config.pin_path.display(), took = ?started.elapsed(), "stopped, detached and unpinned");
    Ok(())
}
