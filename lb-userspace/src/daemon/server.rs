//! The control socket: root-only, one request per connection line. Rolling restarts run in
//! the connection's task and talk to the state task like any other client.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Control;
use crate::{
    control::{BackendStatus, Request, Response},
    supervisor::Command,
};

/// Longest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;
/// How long a restarted instance may take to become ready again.
const READY_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Binds the socket, refusing if another daemon answers on it.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        bail!(
            "another gpulb daemon answers on {}; stop it (or hand over with SIGUSR2) first",
            path.display()
        );
    }
    let dir = path.parent().context("socket path has a directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let _ = std::fs::remove_file(path);
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    // Root only: the socket drains and restarts production backends.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 600 {}", path.display()))?;
    Ok(listener)
}

pub fn remove(path: &Path) {
    let _ = std::fs::remove_file(path);
}

pub async fn serve(
    listener: UnixListener,
    control: mpsc::Sender<Control>,
    drain_timeout: Duration,
    cancel: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    warn!(error = %e, "control socket accept");
                    continue;
                }
            },
            () = cancel.cancelled() => return,
        };
        let control = control.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, control, drain_timeout).await {
                warn!(error = %format!("{e:#}"), "control connection");
            }
        });
    }
}

async fn connection(
    stream: UnixStream,
    control: mpsc::Sender<Control>,
    drain_timeout: Duration,
) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read.take(MAX_REQUEST))
        .read_line(&mut line)
        .await?;
    let response = match serde_json::from_str::<Request>(&line) {
        Err(e) => Response::error(format!("bad request {:?}: {e}", line.trim())),
        Ok(Request::Restart { model }) => {
            let handle = Handle(control);
            match rolling_restart(&handle, &model, drain_timeout).await {
                Ok(message) => Response::ok(message),
                Err(e) => Response::error(format!("restart of {model:?}: {e}")),
            }
        }
        Ok(request) => Handle(control).request(request).await,
    };
    let mut out = serde_json::to_string(&response)?;
    out.push('\n');
    write.write_all(out.as_bytes()).await?;
    Ok(())
}

struct Handle(mpsc::Sender<Control>);

impl Handle {
    async fn request(&self, request: Request) -> Response {
        let (tx, rx) = oneshot::channel();
        if self.0.send(Control::Request(request, tx)).await.is_err() {
            return Response::error("the daemon is shutting down");
        }
        rx.await
            .unwrap_or_else(|_| Response::error("the daemon is shutting down"))
    }

    async fn status(&self) -> Result<Vec<BackendStatus>, String> {
        let r = self.request(Request::Status).await;
        if r.ok {
            Ok(r.backends)
        } else {
            Err(r.error.unwrap_or_default())
        }
    }

    async fn instance(&self, name: &str) -> Result<BackendStatus, String> {
        self.status()
            .await?
            .into_iter()
            .find(|b| b.instance.as_deref() == Some(name))
            .ok_or_else(|| format!("instance {name} is gone"))
    }

    async fn ok(&self, request: Request) -> Result<(), String> {
        let r = self.request(request).await;
        if r.ok {
            Ok(())
        } else {
            Err(r.error.unwrap_or_default())
        }
    }
}

/// Drains, restarts and re-admits each instance of `model` in turn; the next one starts
/// only once the previous one is ready again, so the model never loses more than one
/// instance of capacity. Stops at the first instance that does not come back.
async fn rolling_restart(
    handle: &Handle,
    model: &str,
    drain_timeout: Duration,
) -> Result<String, String> {
    let mut instances: Vec<String> = handle
        .status()
        .await?
        .into_iter()
        .filter(|b| b.model.as_deref() == Some(model))
        .filter_map(|b| b.instance)
        .collect();
    if instances.is_empty() {
        return Err(format!("no model named {model:?}"));
    }
    instances.sort();
    let started = Instant::now();
    for name in &instances {
        let before = handle.instance(name).await?;
        handle
            .ok(Request::Drain {
                backend: name.clone(),
            })
            .await?;
        info!(instance = %name, live_flows = before.live_flows, "rolling restart: draining");
        let deadline = Instant::now() + drain_timeout;
        // Zero twice, 100 ms apart: a SYN NATed just before the table changed has landed.
        let mut zeros = 0;
        loop {
            let live = handle.instance(name).await?.live_flows;
            zeros = if live == 0 { zeros + 1 } else { 0 };
            if zeros == 2 {
                break;
            }
            if Instant::now() >= deadline {
                warn!(instance = %name, live, "rolling restart: drain timeout, restarting anyway");
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (tx, rx) = oneshot::channel();
        if handle
            .0
            .send(Control::Instance(name.clone(), tx))
            .await
            .is_err()
        {
            return Err("the daemon is shutting down".into());
        }
        let commands = rx
            .await
            .ok()
            .flatten()
            .ok_or_else(|| format!("instance {name} is gone"))?;
        let (done, stopped) = oneshot::channel();
        commands
            .send(Command::Restart(done))
            .map_err(|_| format!("instance {name} is not supervised"))?;
        let _ = stopped.await;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let now = handle.instance(name).await?;
            if now.healthy && now.pid.is_some() && now.pid != before.pid {
                break;
            }
            if now.state == "crash-looping" || Instant::now() >= deadline {
                return Err(format!(
                    "{name} did not become ready again ({}); left drained, later instances untouched",
                    now.last_error.unwrap_or(now.state)
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        handle
            .ok(Request::Undrain {
                backend: name.clone(),
            })
            .await?;
        info!(instance = %name, "rolling restart: instance back in service");
    }
    Ok(format!(
        "restarted {} instances of {model} in {:.1}s",
        instances.len(),
        started.elapsed().as_secs_f64()
    ))
}
