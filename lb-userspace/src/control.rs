//! The daemon's control socket: one JSON request per line, one JSON response per line.
//! Used by `gpulb drain | undrain | weight | restart | reload | backends`.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// `backend`: an instance name (`qwen-0`), `address:port`, or `vip/address:port`.
    Drain {
        backend: String,
    },
    Undrain {
        backend: String,
    },
    Weight {
        backend: String,
        weight: u32,
    },
    /// Rolling restart: drain, restart and re-admit the model's instances one at a time.
    Restart {
        model: String,
    },
    /// Re-read the config file (as SIGHUP).
    Reload,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendStatus>,
    /// With a drain: how long the daemon gives connections to end before a stop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_timeout_ms: Option<u64>,
}

impl Response {
    pub fn ok(message: impl Into<String>) -> Self {
        Self {
            ok: true,
            message: Some(message.into()),
            ..Self::default()
        }
    }

    pub fn error(error: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(error.into()),
            ..Self::default()
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuStatus {
    pub index: u32,
    pub uuid: String,
    pub name: String,
}

/// The daemon's view of one backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub vip: String,
    /// `address:port` of the VIP.
    pub vip_address: String,
    /// `address:port`.
    pub backend: String,
    pub model: Option<String>,
    pub instance: Option<String>,
    pub gpus: Vec<GpuStatus>,
    pub pid: Option<u32>,
    /// starting, ready, unhealthy, draining, ejected, crash-looping, stopped.
    pub state: String,
    /// Passing its health checks (whatever the drain state).
    pub healthy: bool,
    /// Takes new flows.
    pub in_table: bool,
    pub restarts: u32,
    pub last_probe_ms: Option<f64>,
    pub last_error: Option<String>,
    /// Established TCP connections to the backend right now.
    pub live_flows: usize,
    /// Maglev weight in the table (scaled by load when its VIP is load-aware).
    pub weight: u32,
    /// Smoothed load (1 ≈ full batch, more = queueing), when its VIP is load-aware.
    pub load: Option<f64>,
    pub load_error: Option<String>,
    /// CPUs the instance is pinned to (empty: not pinned).
    pub cpus: Vec<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to the daemon at {}: is `gpulb run` running?", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the daemon at {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the daemon sent an unreadable answer: {0}")]
    Decode(String),
}

/// Sends one request and waits up to `timeout` for the answer.
pub fn call(socket: &Path, request: &Request, timeout: Duration) -> Result<Response, ClientError> {
    let io = |source| ClientError::Io {
        path: socket.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.to_owned(),
        source,
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_string(request).expect("requests serialize");
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).map_err(io)?;
    serde_json::from_str(&answer).map_err(|e| ClientError::Decode(format!("{e}: {answer:?}")))
}
