//! CLI commands that ask the daemon, through its control socket.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::control::{self, Request, Response};

/// Short requests; a rolling restart gets as long as it takes.
const TIMEOUT: Duration = Duration::from_secs(30);

fn call(socket: &Path, request: &Request, timeout: Duration) -> anyhow::Result<Response> {
    let r = control::call(socket, request, timeout)?;
    if !r.ok {
        bail!("{}", r.error.unwrap_or_else(|| "failed".into()));
    }
    Ok(r)
}

/// Sends `request` and prints the daemon's answer.
pub fn simple(socket: &Path, request: Request) -> anyhow::Result<()> {
    let r = call(socket, &request, TIMEOUT)?;
    println!("{}", r.message.unwrap_or_default());
    Ok(())
}

/// Drains, then shows the backend's live flows until none are left or `wait` seconds (default:
/// the daemon's drain timeout) pass.
pub fn drain(socket: &Path, backend: &str, wait: Option<u64>) -> anyhow::Result<()> {
    let r = call(
        socket,
        &Request::Drain {
            backend: backend.to_owned(),
        },
        TIMEOUT,
    )?;
    println!("{}", r.message.unwrap_or_default());
    let drained = r
        .backends
        .first()
        .cloned()
        .context("the daemon named no backend")?;
    let wait = wait.map_or_else(
        || Duration::from_millis(r.drain_timeout_ms.unwrap_or(0)),
        Duration::from_secs,
    );
    if wait.is_zero() {
        return Ok(());
    }
    let deadline = Instant::now() + wait;
    let mut last = None;
    loop {
        let status = call(socket, &Request::Status, TIMEOUT)?;
        let Some(b) = status
            .backends
            .iter()
            .find(|b| b.vip == drained.vip && b.backend == drained.backend)
        else {
            bail!("backend {backend} is gone");
        };
        if last != Some(b.live_flows) {
            println!("{}: {} live flows", b.backend, b.live_flows);
            last = Some(b.live_flows);
        }
        if b.live_flows == 0 {
            println!("{}: drained", b.backend);
            return Ok(());
        }
        if Instant::now() >= deadline {
            println!(
                "{}: still {} live flows after {wait:?}; they continue, no new flows arrive",
                b.backend, b.live_flows
            );
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

pub fn restart(socket: &Path, model: String) -> anyhow::Result<()> {
    println!("rolling restart of {model}: one instance at a time (drain, restart, ready, undrain)");
    // Each instance may take its drain timeout plus model loading time.
    let r = call(
        socket,
        &Request::Restart { model },
        Duration::from_secs(24 * 3600),
    )?;
    println!("{}", r.message.unwrap_or_default());
    Ok(())
}
