//! `gpulb run`: load and attach the data path, program it from the config, serve until
//! SIGINT/SIGTERM, then detach and unpin.

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

use crate::{config::Config, datapath::Datapath, plan};

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

pub async fn run(config: Config) -> anyhow::Result<()> {
    // Handlers first: a signal during set-up must still lead to a clean tear-down.
    let shutdown = shutdown_signal()?;
    let mut datapath =
        Datapath::load(&config.pin_path, config.conntrack_size).with_context(|| {
            format!(
                "loading the data path (pin path {})",
                config.pin_path.display()
            )
        })?;
    let result = serve(&config, &mut datapath, shutdown).await;
    let pin_path = config.pin_path.display().to_string();
    datapath
        .unpin()
        .with_context(|| format!("removing pinned maps under {pin_path}"))?;
    info!(pin_path, "detached and unpinned");
    result
}

async fn serve(
    config: &Config,
    datapath: &mut Datapath,
    shutdown: impl Future<Output = &'static str>,
) -> anyhow::Result<()> {
    let current_services = datapath.maps.services()?;
    let current_backends = datapath.maps.backends()?;
    let plan = plan::plan(config, &current_services, &current_backends)?;
    let applied = plan::apply(&mut datapath.maps, &plan).context("programming the maps")?;
    for s in &plan.services {
        info!(
            vip = %format_args!("{}:{}", crate::maps::ip_of(s.key.addr_be), crate::maps::port_of(s.key.port_be)),
            name = %s.name,
            backends = s.backends.len(),
            table_size = s.service.table_size,
            "VIP programmed"
        );
    }
    let mode = datapath
        .attach(&config.interface, config.xdp_mode)
        .with_context(|| format!("attaching to {}", config.interface))?;
    info!(
        interface = %config.interface,
        xdp_mode = mode,
        vips = plan.services.len(),
        slots_written = applied.slots_written,
        pin_path = %config.pin_path.display(),
        "gpulb ready"
    );
    let signal = shutdown.await;
    info!(signal, "shutting down");
    Ok(())
}
