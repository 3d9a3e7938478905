//! `gpulb run`: load (or take over) the data path, start and watch the model instances,
//! keep the tables true to what is ready, and answer the control socket.
//!
//! Signals: SIGINT/SIGTERM stop everything gracefully (drain, stop the instances, detach,
//! unpin). SIGHUP reloads the config. SIGUSR2 hands over: the daemon exits and leaves the
//! data path, its maps and the instances running for the next `gpulb run` to take over.

mod server;
pub mod state;

use std::{path::PathBuf, time::Instant};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::{
    config::Config,
    control::{Request, Response},
    datapath::Datapath,
    gpu::InstanceSpec,
};
use state::{Inherited, Persisted, State};

/// Installs the SIGINT and SIGTERM handlers now; the future resolves on the first signal.
pub fn shutdown_signal() -> anyhow::Result<impl Future<Output = &'static str>> {
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        }
    })
}

/// Requests from control-socket connections to the state task.
pub enum Control {
    Request(Request, tokio::sync::oneshot::Sender<Response>),
    /// The supervisor handle of an instance (rolling restarts).
    Instance(
        String,
        tokio::sync::oneshot::Sender<Option<mpsc::UnboundedSender<crate::supervisor::Command>>>,
    ),
}

pub async fn run(
    config: Config,
    config_path: PathBuf,
    specs: Vec<InstanceSpec>,
) -> anyhow::Result<()> {
    // Handlers first: a signal during set-up must still lead to a clean tear-down.
    let shutdown = shutdown_signal()?;
    tokio::pin!(shutdown);
    let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    let mut usr2 = signal(SignalKind::user_defined2()).context("installing SIGUSR2 handler")?;
    let socket = config.control_socket();
    let listener = server::bind(&socket)?;

    let datapath = Datapath::load(
        &config.pin_path,
        config.conntrack_size,
        config.conntrack_size_v6,
    )
    .with_context(|| {
        format!(
            "loading the data path (pin path {})",
            config.pin_path.display()
        )
    })?;
    let inherited = Inherited::read(&config, &datapath).context("reading the pinned maps")?;
    let persisted = Persisted::read(&config.state_dir);
    let (msgs, mut inbox) = mpsc::unbounded_channel();
    let cancel = CancellationToken::new();
    let (interface, xdp_mode) = (config.interface.clone(), config.xdp_mode);
    let socket_lb = config.socket_lb.clone();
    let (mut state, mut supervisor_events) =
        State::new(config, config_path, datapath, msgs, cancel.clone());
    state.start(specs, &inherited, &persisted);
    // Tables before the programs: a taken-over data path keeps its slots meanwhile.
    state.sync();
    let attached = state
        .datapath
        .attach(&interface, xdp_mode)
        .with_context(|| format!("attaching to {interface}"))?;
    let cgroup = state
        .datapath
        .attach_sockets(&socket_lb)
        .context("attaching the socket-level programs")?;
    state.persist();

    let (control, mut requests) = mpsc::channel(64);
    if let Some(listen) = state.config.metrics_listen {
        tokio::spawn(crate::metrics::serve(
            listen,
            state.metrics.clone(),
            state.config.pin_path.clone(),
            crate::metrics::status_source(control.clone()),
            cancel.clone(),
        ));
    }
    tokio::spawn(server::serve(
        listener,
        control,
        state.config.drain_timeout,
        cancel.clone(),
    ));
    info!(
        interface = %interface,
        xdp_mode = attached.describe(),
        vips = state.config.vips.len(),
        backends = state.backends.len(),
        inherited = inherited.in_table.len(),
        socket_lb = %cgroup.as_deref().map_or_else(|| "off".into(), |p| p.display().to_string()),
        pin_path = %state.config.pin_path.display(),
        socket = %socket.display(),
        "gpulb ready"
    );

    let handover = loop {
        tokio::select! {
            // Exits first (ejection), and a start before any probe of the new process.
            biased;
            Some(event) = supervisor_events.recv() => {
                if state.on_supervisor(event) {
                    state.sync();
                }
            }
            Some(msg) = inbox.recv() => {
                if state.handle(msg) {
                    state.sync();
                }
            }
            Some(control) = requests.recv() => match control {
                Control::Request(request, reply) => {
                    let _ = reply.send(answer(&mut state, request));
                }
                Control::Instance(name, reply) => {
                    let _ = reply.send(state.instance_commands(&name));
                }
            },
            _ = hup.recv() => {
                info!("SIGHUP: reloading the config");
                state.reload();
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
    datapath
        .unpin()
        .with_context(|| format!("removing pins under {}", config.pin_path.display()))?;
    state::remove_state_file(&config.state_dir);
    info!(pin_path = %config.pin_path.display(), took = ?started.elapsed(), "stopped, detached and unpinned");
    Ok(())
}

fn answer(state: &mut State, request: Request) -> Response {
    match request {
        Request::Status => Response {
            ok: true,
            backends: state.status(),
            ..Response::default()
        },
        Request::Drain { backend } => state.drain(&backend, true),
        Request::Undrain { backend } => state.drain(&backend, false),
        Request::Weight { backend, weight } => state.set_weight(&backend, weight),
        Request::Reload => state.reload(),
        Request::Restart { .. } => Response::error("restarts are run by the connection"),
    }
}
