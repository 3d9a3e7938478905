//! The daemon's control socket: one JSON request per line, one JSON response per line.
//! Used by `gpulb drain | undrain | weight | restart | reload | backends`.

use std::{
    fmt,
    io::{BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    str::FromStr,
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

/// A backend's identity: its VIP (by name) and its address. Stable across daemon restarts
/// and reloads; written `vip/address:port` (`chat/198.18.0.1:8001`, `chat/[::1]:8001`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct BackendKey {
    pub vip: String,
    pub addr: SocketAddr,
}

impl fmt::Display for BackendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.vip, self.addr)
    }
}

impl FromStr for BackendKey {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not vip/address:port");
        let (vip, addr) = s.rsplit_once('/').ok_or_else(bad)?;
        Ok(Self {
            vip: vip.to_owned(),
            addr: addr.parse().map_err(|_| bad())?,
        })
    }
}

impl From<BackendKey> for String {
    fn from(key: BackendKey) -> Self {
        key.to_string()
    }
}

impl TryFrom<String> for BackendKey {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

/// Where a backend stands, as the daemon sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendState {
    /// Not yet passing its probes since its process (re)started.
    Starting,
    Ready,
    /// Was ready, now failing its probes.
    Unhealthy,
    /// Takes no new flows by an operator's (or a rolling restart's) request.
    Draining,
    /// Its process exited; restarting.
    Ejected,
    /// Exited again and again soon after starting; restarts back off.
    CrashLooping,
}

impl BackendState {
    pub const ALL: [BackendState; 6] = [
        BackendState::Starting,
        BackendState::Ready,
        BackendState::Unhealthy,
        BackendState::Draining,
        BackendState::Ejected,
        BackendState::CrashLooping,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            BackendState::Starting => "starting",
            BackendState::Ready => "ready",
            BackendState::Unhealthy => "unhealthy",
            BackendState::Draining => "draining",
            BackendState::Ejected => "ejected",
            BackendState::CrashLooping => "crash-looping",
        }
    }
}

impl fmt::Display for BackendState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The daemon's view of one backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    /// Its id in the maps (`BACKENDS`), once the tables hold it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u32>,
    pub vip: String,
    /// The VIP's address and port.
    pub vip_address: SocketAddr,
    pub backend: SocketAddr,
    pub model: Option<String>,
    pub instance: Option<String>,
    pub gpus: Vec<GpuStatus>,
    pub pid: Option<u32>,
    pub state: BackendState,
    /// Passing its health checks (whatever the drain state).
    pub healthy: bool,
    /// Takes new flows.
    pub in_table: bool,
    pub restarts: u32,
    pub last_probe_ms: Option<f64>,
    pub last_error: Option<String>,
    /// Live flows through the VIP, as the data path counts them (what drains wait for; not
    /// probes, scrapes or direct connections).
    pub live_flows: usize,
    /// Weight: its share of the consistent hash, and a multiplier of its capacity.
    pub weight: u32,
    /// Batch slots the scheduler counts with (configured, or learned from the engine); 0:
    /// unknown.
    pub slots: u32,
    /// What its engine last reported, and how long ago.
    pub engine: Option<EngineStatus>,
    /// Why the last reading of its engine failed.
    pub load_error: Option<String>,
    /// CPUs the instance is pinned to (empty: not pinned).
    pub cpus: Vec<usize>,
}

/// A backend's engine as the scheduler last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EngineStatus {
    pub running: u32,
    pub waiting: u32,
    /// KV-cache use, 0-1.
    pub kv_usage: f64,
    /// Age of the reading; past the VIP's `signal_max_age_ms` the scheduler ignores it.
    pub age_ms: f64,
    /// Its prefix cache's recent hit rate, 0-1, where the engine tells.
    #[serde(default)]
    pub prefix_hit_rate: Option<f64>,
}

impl BackendStatus {
    pub fn key(&self) -> BackendKey {
        BackendKey {
            vip: self.vip.clone(),
            addr: self.backend,
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_keys_round_trip_as_strings() {
        for text in ["chat/198.18.0.1:8001", "chat6/[2001:db8::10]:80"] {
            let key: BackendKey = text.parse().expect("a key");
            assert_eq!(key.to_string(), text);
            let json = serde_json::to_string(&key).expect("serializes");
            assert_eq!(json, format!("{text:?}"));
            assert_eq!(
                serde_json::from_str::<BackendKey>(&json).expect("parses"),
                key
            );
        }
        assert!(
            "198.18.0.1:8001".parse::<BackendKey>().is_err(),
            "needs the VIP"
        );
    }

    #[test]
    fn states_serialize_as_the_cli_prints_them() {
        for state in BackendState::ALL {
            let json = serde_json::to_string(&state).expect("serializes");
            assert_eq!(json, format!("{:?}", state.name()));
        }
    }
}
