//! The control socket: root-only, one JSON request per connection line, answered by the
//! state task (a rolling restart's answer comes when it ends).

use std::{io, os::unix::fs::PermissionsExt as _, path::Path, path::PathBuf};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::Control;
use crate::control::{Request, Response};

/// Longest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(
        "another gpulb daemon answers on {}; stop it (or hand over with SIGUSR2) first",
        path.display()
    )]
    InUse { path: PathBuf },
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Binds the socket, refusing if another daemon answers on it.
pub fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(ServerError::InUse {
            path: path.to_owned(),
        });
    }
    let io = |what: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| ServerError::Io { what, path, source }
    };
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(io("binding", path))?;
    // Root only: the socket drains and restarts production backends.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io("chmod 600", path))?;
    Ok(listener)
}

pub fn remove(path: &Path) {
    let _ = std::fs::remove_file(path);
}

pub async fn serve(
    listener: UnixListener,
    control: mpsc::Sender<Control>,
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
            if let Err(e) = connection(stream, control).await {
                warn!(error = %e, "control connection");
            }
        });
    }
}

async fn connection(stream: UnixStream, control: mpsc::Sender<Control>) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read.take(MAX_REQUEST))
        .read_line(&mut line)
        .await?;
    let response = match serde_json::from_str::<Request>(&line) {
        Err(e) => Response::error(format!("bad request {:?}: {e}", line.trim())),
        Ok(request) => ask(&control, request).await,
    };
    let mut out = serde_json::to_string(&response).map_err(io::Error::other)?;
    out.push('\n');
    write.write_all(out.as_bytes()).await
}

/// Sends `request` to the state task and waits for its answer.
async fn ask(control: &mpsc::Sender<Control>, request: Request) -> Response {
    let gone = || Response::error("the daemon is shutting down");
    let (reply, answer) = oneshot::channel();
    if control.send(Control { request, reply }).await.is_err() {
        return gone();
    }
    answer.await.unwrap_or_else(|_| gone())
}
