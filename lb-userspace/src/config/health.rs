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

#[derive(Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub kind: CheckKind,
    pub path: String,
    pub model: Option<String>,
    /// Sent with every HTTP probe, `${VAR}`s expanded from the daemon's environment.
    pub headers: Vec<ProbeHeader>,
    /// A model instance not ready this long after its start is killed and counted as a
    /// failed start (restarted with backoff; a crash loop after a few). `None`: waits.
    pub start_timeout: Option<Duration>,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes before a backend is ready.
    pub rise: u32,
    /// Consecutive failures before a ready backend is unhealthy.
    pub fall: u32,
}

/// One probe header: its name, the value as written (shown) and as sent (secret).
#[derive(Clone, PartialEq, Eq)]
pub struct ProbeHeader {
    pub name: String,
    pub template: String,
    pub value: String,
}

/// Never prints a header's expanded value: it is usually a key.
impl std::fmt::Debug for HealthCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthCheck")
            .field("kind", &self.kind)
            .field("path", &self.path)
            .field("model", &self.model)
            .field(
                "headers",
                &self
                    .headers
                    .iter()
                    .map(|h| (&h.name, &h.template))
                    .collect::<Vec<_>>(),
            )
            .field("start_timeout", &self.start_timeout)
            .field("interval", &self.interval)
            .field("timeout", &self.timeout)
            .field("rise", &self.rise)
            .field("fall", &self.fall)
            .finish()
    }
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
    /// HTTP headers of every probe (`Authorization = "Bearer ${VLLM_API_KEY}"`).
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    /// Models only: how long an instance may take to become ready after it starts.
    start_timeout_ms: Option<i64>,
}

impl RawHealth {
    /// `default_model`: what `/v1/models` must list when `model` is not given.
    /// `env`: looks up the `${VAR}`s of header values. `of_model`: `start_timeout_ms` is
    /// allowed (a `[[vip.backend]]` has no process to restart).
    pub(super) fn validate(
        self,
        field: &str,
        default_kind: CheckKind,
        default_model: Option<String>,
        of_model: bool,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<HealthCheck, FieldError> {
        let f = |name: &str| format!("{field}.{name}");
        let mut headers = Vec::with_capacity(self.headers.len());
        for (name, template) in self.headers {
            let field = f(&format!("headers.{name}"));
            if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(invalid(
                    field,
                    format!("{name:?} is not an HTTP header name"),
                ));
            }
            let value = expand(&field, &template, env)?;
            if reqwest::header::HeaderValue::from_str(&value).is_err() {
                return Err(invalid(
                    field,
                    "the value (once expanded) is not a valid HTTP header value".to_owned(),
                ));
            }
            headers.push(ProbeHeader {
                name,
                template,
                value,
            });
        }
        let start_timeout = match self.start_timeout_ms {
            None => None,
            Some(_) if !of_model => {
                return Err(invalid(
                    f("start_timeout_ms"),
                    "only a model's instances have a start to time out; a [[vip.backend]] is \
                     started by someone else"
                        .to_owned(),
                ));
            }
            Some(ms) => Some(parse_ms(&f("start_timeout_ms"), ms, 1000, 86_400_000)?),
        };
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
            headers,
            start_timeout,
            interval,
            timeout,
            rise: parse_count(&f("rise"), self.rise.unwrap_or(1), 100)?,
            fall: parse_count(&f("fall"), self.fall.unwrap_or(3), 100)?,
        })
    }
}

/// The daemon's environment variable `name`, if set to Unicode.
pub(super) fn daemon_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// `${NAME}` in `template` replaced by the variable's value; an unset variable is an error
/// naming it (a probe without its key would keep the instance "starting" for ever).
fn expand(
    field: &str,
    template: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, FieldError> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err(invalid(field, format!("unclosed \"${{\" in {template:?}")));
        };
        let name = &after[..end];
        let value = env(name).ok_or_else(|| {
            invalid(
                field,
                format!("environment variable {name} is not set (the daemon's environment, e.g. the unit's EnvironmentFile)"),
            )
        })?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_expand_variables_and_name_the_missing_one() {
        let env = |name: &str| (name == "KEY").then(|| "s3cret".to_owned());
        assert_eq!(
            expand("h", "Bearer ${KEY}", &env).expect("set"),
            "Bearer s3cret"
        );
        assert_eq!(expand("h", "plain", &env).expect("plain"), "plain");
        let e = expand("h", "Bearer ${NOPE}", &env).expect_err("unset");
        assert!(e.1.contains("NOPE is not set"), "{e:?}");
        assert!(expand("h", "Bearer ${KEY", &env).is_err());
    }
}
