//! How a backend is watched: `health` of a model or a VIP (for its `[[vip.backend]]`s), how
//! it is probed; and `load`, where its engine's numbers are read.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::fields::{FieldError, invalid, parse_count, parse_ms};

/// Where a backend's load comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoadSource {
    /// Prometheus `/metrics` with vLLM's names (also gpulb-sim):
    /// `vllm:num_requests_running`, `vllm:num_requests_waiting`, KV-cache usage.
    #[default]
    Vllm,
    /// SGLang's Prometheus `/metrics` (`--enable-metrics`): `sglang:num_running_reqs`,
    /// `sglang:num_queue_reqs`, `sglang:token_usage`.
    Sglang,
    /// Text Generation Inference's `/metrics`: `tgi_batch_current_size`, `tgi_queue_size`.
    Tgi,
    /// llama.cpp server `/slots`: the share of slots processing.
    Llamacpp,
    /// NVML: the instance's GPUs' utilisation and memory, for servers that export no load
    /// of their own (real GPUs only).
    Nvml,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// GET `path` answers 2xx, and `/v1/models` lists the model if one is named.
    Http,
    /// A TCP connect succeeds.
    Tcp,
    /// Always healthy (the process being alive is enough).
    None,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub kind: CheckKind,
    pub path: String,
    pub model: Option<String>,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes before a backend is ready.
    pub rise: u32,
    /// Consecutive failures before a ready backend is unhealthy.
    pub fall: u32,
}

/// `health` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealth {
    check: Option<CheckKind>,
    path: Option<String>,
    /// External backends: the model `/v1/models` must list (none: not checked).
    model: Option<String>,
    interval_ms: Option<i64>,
    timeout_ms: Option<i64>,
    rise: Option<i64>,
    fall: Option<i64>,
}

impl RawHealth {
    /// `default_model`: what `/v1/models` must list when `model` is not given.
    pub(super) fn validate(
        self,
        field: &str,
        default_kind: CheckKind,
        default_model: Option<String>,
    ) -> Result<HealthCheck, FieldError> {
        let f = |name: &str| format!("{field}.{name}");
        let path = self.path.unwrap_or_else(|| "/health".into());
        if !path.starts_with('/') {
            return Err(invalid(f("path"), format!("{path:?} must start with '/'")));
        }
        let interval = parse_ms(
            &f("interval_ms"),
            self.interval_ms.unwrap_or(1000),
            10,
            3_600_000,
        )?;
        let timeout = parse_ms(
            &f("timeout_ms"),
            self.timeout_ms.unwrap_or(1000),
            10,
            600_000,
        )?;
        Ok(HealthCheck {
            kind: self.check.unwrap_or(default_kind),
            path,
            model: self.model.or(default_model),
            interval,
            timeout,
            rise: parse_count(&f("rise"), self.rise.unwrap_or(1), 100)?,
            fall: parse_count(&f("fall"), self.fall.unwrap_or(3), 100)?,
        })
    }
}
