//! Health and readiness probes of backends: HTTP (`/health` answers 2xx, and `/v1/models`
//! lists the model: vLLM answers `/health` long before its weights are loaded), TCP connect,
//! or none.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use crate::config::{CheckKind, HealthCheck};

/// One client for all probes. No connection pool: an idle probe connection would count as a
/// live flow of the backend and hold up its drain.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .build()
        .expect("a reqwest client without TLS or proxy always builds")
}

/// Probes `addr` once; `Ok` carries the probe's latency, `Err` says what failed.
pub async fn probe(
    client: &reqwest::Client,
    addr: SocketAddr,
    check: &HealthCheck,
) -> Result<Duration, String> {
    let start = Instant::now();
    match check.kind {
        CheckKind::None => Ok(Duration::ZERO),
        CheckKind::Tcp => {
            match tokio::time::timeout(check.timeout, tokio::net::TcpStream::connect(addr)).await {
                Ok(Ok(_)) => Ok(start.elapsed()),
                Ok(Err(e)) => Err(format!("connect: {e}")),
                Err(_) => Err(format!("connect: no answer within {:?}", check.timeout)),
            }
        }
        CheckKind::Http => {
            let get = |path: &str| {
                let mut request = client
                    .get(format!("http://{addr}{path}"))
                    .timeout(check.timeout);
                for h in &check.headers {
                    request = request.header(&h.name, &h.value);
                }
                request.send()
            };
            let resp = get(&check.path)
                .await
                .map_err(|e| describe(&check.path, &e))?;
            if !resp.status().is_success() {
                return Err(format!("GET {}: HTTP {}", check.path, resp.status()));
            }
            if let Some(model) = &check.model {
                let resp = get("/v1/models")
                    .await
                    .map_err(|e| describe("/v1/models", &e))?;
                if !resp.status().is_success() {
                    return Err(format!("GET /v1/models: HTTP {}", resp.status()));
                }
                let body: serde_json::Value = resp
                    .json()
                    .await
                    .map_err(|e| format!("GET /v1/models: not JSON: {e}"))?;
                let listed = body["data"]
                    .as_array()
                    .is_some_and(|d| d.iter().any(|m| m["id"].as_str() == Some(model)));
                if !listed {
                    return Err(format!(
                        "GET /v1/models: {model:?} not listed (still loading?)"
                    ));
                }
            }
            Ok(start.elapsed())
        }
    }
}

fn describe(path: &str, e: &reqwest::Error) -> String {
    use std::error::Error as _;
    let mut cause = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        cause = s.to_string();
        source = s.source();
    }
    if e.is_timeout() {
        format!("GET {path}: timed out")
    } else {
        format!("GET {path}: {cause}")
    }
}

/// Consecutive probe results against `rise`/`fall`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    pub up: bool,
    /// Was up since the process (re)started: "unhealthy" rather than "starting" when down.
    pub seen_up: bool,
    pub successes: u32,
    pub failures: u32,
    pub last_latency: Option<Duration>,
    pub last_error: Option<String>,
}

impl Health {
    /// Records one probe; returns true when `up` changed.
    pub fn record(&mut self, result: Result<Duration, String>, check: &HealthCheck) -> bool {
        let was = self.up;
        match result {
            Ok(latency) => {
                self.last_latency = Some(latency);
                self.last_error = None;
                self.failures = 0;
                self.successes = self.successes.saturating_add(1);
                if self.successes >= check.rise {
                    self.up = true;
                    self.seen_up = true;
                }
            }
            Err(e) => {
                self.last_error = Some(e);
                self.successes = 0;
                self.failures = self.failures.saturating_add(1);
                if self.failures >= check.fall {
                    self.up = false;
                }
            }
        }
        self.up != was
    }

    /// Already up (taken over from a running data path).
    pub fn inherited() -> Self {
        Self {
            up: true,
            seen_up: true,
            ..Self::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(rise: u32, fall: u32) -> HealthCheck {
        HealthCheck {
            kind: CheckKind::Http,
            path: "/health".into(),
            model: None,
            headers: Vec::new(),
            start_timeout: None,
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            rise,
            fall,
        }
    }

    #[test]
    fn rise_and_fall_thresholds() {
        let c = check(2, 3);
        let mut h = Health::default();
        let ok = || Ok(Duration::from_millis(1));
        let bad = || Err("refused".to_string());
        assert!(!h.record(ok(), &c), "one success is below rise = 2");
        assert!(h.record(ok(), &c) && h.up);
        assert!(
            !h.record(bad(), &c) && !h.record(bad(), &c),
            "two failures are below fall = 3"
        );
        assert!(h.up);
        assert!(h.record(bad(), &c) && !h.up && h.seen_up);
        // A success in between resets the failure count.
        let mut h = Health::inherited();
        h.record(bad(), &c);
        h.record(bad(), &c);
        h.record(ok(), &c);
        h.record(bad(), &c);
        assert!(h.up);
    }
}
