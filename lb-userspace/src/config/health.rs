//! `health` of a model or a VIP (for its `[[vip.backend]]`s): how a backend is probed.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::fields::{FieldError, invalid, parse_count, parse_ms};

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
