//! Load-aware weights: each backend's own load signals, scraped on a short interval,
//! normalised to one figure (1.0 = its batch is full, more = requests queue), smoothed, and
//! turned into a Maglev weight with hysteresis, so that new connections go where the GPU has
//! room while weights do not flap.

use std::{net::SocketAddr, time::Duration};

use crate::config::LoadSource;

/// The Prometheus gauges of an engine that exports them.
fn gauges(source: LoadSource) -> Option<Gauges> {
    match source {
        LoadSource::Vllm => Some(Gauges {
            running: "vllm:num_requests_running",
            waiting: "vllm:num_requests_waiting",
            // vLLM renamed the gauge; either is a 0-1 fraction.
            cache: &["vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc"],
        }),
        LoadSource::Sglang => Some(Gauges {
            running: "sglang:num_running_reqs",
            waiting: "sglang:num_queue_reqs",
            cache: &["sglang:token_usage"],
        }),
        // TGI exports no KV-cache or batch-capacity gauge: an instance counts as loaded
        // once requests queue.
        LoadSource::Tgi => Some(Gauges {
            running: "tgi_batch_current_size",
            waiting: "tgi_queue_size",
            cache: &[],
        }),
        LoadSource::Llamacpp | LoadSource::Nvml | LoadSource::None => None,
    }
}

/// Names of an engine's load gauges in its Prometheus text.
#[derive(Debug, Clone, Copy)]
struct Gauges {
    running: &'static str,
    waiting: &'static str,
    /// KV-cache use as a 0-1 fraction, under any of these names.
    cache: &'static [&'static str],
}

/// Weights are scaled by this in load-aware mode, so a busy backend can drop to a small
/// fraction of an idle one's weight and still hold slots.
pub const SCALE: u32 = 100;
/// The least share of its weight a busy backend keeps: it is never starved of new flows, so
/// its load keeps being measured against real traffic.
const MIN_FACTOR: f64 = 0.05;
/// How strongly load pulls a weight down: factor = 1 / (1 + K × load).
const K: f64 = 4.0;
/// A new weight replaces the programmed one only if it differs by more than this share.
const HYSTERESIS: f64 = 0.2;
/// Weight of the newest sample in the moving average.
const ALPHA: f64 = 0.5;

/// One load figure from vLLM-style metrics: KV-cache usage (how full the batch is) plus
/// the queue relative to what runs. Idle 0, full batch about 1, queueing above 1.
pub fn from_vllm_metrics(text: &str) -> Result<f64, String> {
    from_metrics(text, LoadSource::Vllm)
}

/// The same figure from the Prometheus text of `source` (vLLM, SGLang, TGI). Series of one
/// gauge (several data-parallel ranks, say) are summed.
pub fn from_metrics(text: &str, source: LoadSource) -> Result<f64, String> {
    let g =
        gauges(source).ok_or_else(|| format!("{source:?} exports no Prometheus load gauges"))?;
    let value = |names: &[&str]| -> Option<f64> {
        let mut found = None;
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (series, v) = line.rsplit_once(' ')?;
            let name = series.split('{').next().unwrap_or(series);
            if names.contains(&name) {
                *found.get_or_insert(0.0) += v.trim().parse::<f64>().ok()?;
            }
        }
        found
    };
    let running = value(&[g.running]).ok_or_else(|| format!("no {} in /metrics", g.running))?;
    let waiting = value(&[g.waiting]).unwrap_or(0.0);
    let cache = value(g.cache).unwrap_or(0.0);
    // Data-parallel ranks each report a fraction; their mean is the instance's.
    let ranks = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            g.cache
                .iter()
                .any(|c| l.split(['{', ' ']).next() == Some(c))
        })
        .count()
        .max(1) as f64;
    Ok((cache / ranks).clamp(0.0, 1.0) + waiting / running.max(1.0))
}

/// llama.cpp's `/slots`: the share of slots processing a request.
pub fn from_llamacpp_slots(body: &str) -> Result<f64, String> {
    let slots: Vec<serde_json::Value> =
        serde_json::from_str(body).map_err(|e| format!("/slots is not a JSON array: {e}"))?;
    if slots.is_empty() {
        return Err("/slots lists no slot".into());
    }
    let busy = slots
        .iter()
        .filter(|s| s["is_processing"].as_bool() == Some(true) || s["state"].as_i64() == Some(1))
        .count();
    Ok(busy as f64 / slots.len() as f64)
}

/// Memory use above this share adds to the load: an engine that preallocates its KV cache
/// (vLLM: 90% by default) sits at it while serving normally.
const MEMORY_PRESSURE_FROM: f64 = 0.9;

/// One load figure from NVML: the GPUs' utilisation (0-1), plus up to 1 more as the fullest
/// GPU's memory goes from `MEMORY_PRESSURE_FROM` to full (an instance close to running out).
pub fn from_gpu_usage(u: crate::gpu::GpuUsage) -> f64 {
    let pressure = ((u.memory - MEMORY_PRESSURE_FROM) / (1.0 - MEMORY_PRESSURE_FROM)).max(0.0);
    u.utilization.clamp(0.0, 1.0) + pressure.min(1.0)
}

/// Scrapes one backend's load; `gpus` are the UUIDs of its GPUs (for NVML).
pub async fn scrape(
    client: &reqwest::Client,
    addr: SocketAddr,
    source: LoadSource,
    gpus: &[String],
    timeout: Duration,
) -> Result<f64, String> {
    let path = match source {
        LoadSource::Vllm | LoadSource::Sglang | LoadSource::Tgi => "/metrics",
        LoadSource::Llamacpp => "/slots",
        LoadSource::Nvml => {
            let uuids = gpus.to_vec();
            return tokio::task::spawn_blocking(move || crate::gpu::usage(&uuids))
                .await
                .map_err(|e| format!("NVML query: {e}"))?
                .map(from_gpu_usage);
        }
        LoadSource::None => return Ok(0.0),
    };
    let resp = client
        .get(format!("http://{addr}{path}"))
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| format!("GET {path}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("GET {path}: HTTP {}", resp.status()));
    }
    let body = resp.text().await.map_err(|e| format!("GET {path}: {e}"))?;
    match source {
        LoadSource::Vllm | LoadSource::Sglang | LoadSource::Tgi => from_metrics(&body, source),
        LoadSource::Llamacpp => from_llamacpp_slots(&body),
        LoadSource::Nvml | LoadSource::None => Ok(0.0),
    }
}

/// A backend's smoothed load and the weight factor it last programmed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Load {
    /// Exponential moving average of the samples.
    pub smoothed: f64,
    /// The factor in the table now (1.0 until the first sample).
    pub factor: f64,
}

impl Default for Load {
    fn default() -> Self {
        Self {
            smoothed: 0.0,
            factor: 1.0,
        }
    }
}

impl Load {
    /// Adds a sample; returns true when the weight factor changed enough to reprogram.
    pub fn record(&mut self, sample: f64) -> bool {
        self.smoothed = ALPHA * sample.max(0.0) + (1.0 - ALPHA) * self.smoothed;
        let target = factor(self.smoothed);
        let changed = (target - self.factor).abs() > HYSTERESIS * self.factor.max(target);
        if changed {
            self.factor = target;
        }
        changed
    }
}

/// Weight factor for a load: 1 when idle, falling as the batch fills and the queue grows.
pub fn factor(load: f64) -> f64 {
    (1.0 / (1.0 + K * load)).max(MIN_FACTOR)
}

/// The Maglev weight of a backend of `base` weight at `factor`; 0 stays 0, anything else is
/// at least 1.
pub fn weight(base: u32, factor: f64) -> u32 {
    if base == 0 {
        return 0;
    }
    ((f64::from(base) * f64::from(SCALE) * factor).round() as u32).max(1)
}

#[cfg(test)]
mod tests {
    #[test]
    fn nvml_load_is_utilisation_plus_memory_pressure() {
        let usage = |samples: &[(f64, f64)]| {
            from_gpu_usage(crate::gpu::combine_usage(samples).expect("GPUs"))
        };
        // Idle, memory preallocated as vLLM does: no load.
        assert_eq!(usage(&[(0.0, 0.9)]), 0.0);
        // Two GPUs of a tensor-parallel instance: the mean utilisation.
        assert!((usage(&[(1.0, 0.5), (0.5, 0.5)]) - 0.75).abs() < 1e-9);
        // The fullest GPU's memory past 90% adds up to 1.
        assert!((usage(&[(1.0, 0.95), (1.0, 0.2)]) - 1.5).abs() < 1e-9);
        assert!((usage(&[(1.0, 1.0)]) - 2.0).abs() < 1e-9);
        assert!(crate::gpu::combine_usage(&[]).is_none());
    }

    use super::*;

    const VLLM: &str = "# HELP vllm:num_requests_running Running.\n\
        # TYPE vllm:num_requests_running gauge\n\
        vllm:num_requests_running{model_name=\"m\"} 4\n\
        vllm:num_requests_waiting{model_name=\"m\"} 2\n\
        vllm:gpu_cache_usage_perc{model_name=\"m\"} 0.75\n";

    #[test]
    fn vllm_load_is_cache_plus_queue() {
        let load = from_vllm_metrics(VLLM).expect("parses");
        assert!((load - 1.25).abs() < 1e-9, "{load}");
        let newer = VLLM.replace("gpu_cache_usage_perc", "kv_cache_usage_perc");
        assert!((from_vllm_metrics(&newer).expect("parses") - 1.25).abs() < 1e-9);
        let e = from_vllm_metrics("up 1\n").expect_err("not vLLM");
        assert!(e.contains("vllm:num_requests_running"), "{e}");
    }

    #[test]
    fn sglang_and_tgi_loads_use_their_own_gauges() {
        // As SGLang serves them with --enable-metrics; two data-parallel ranks.
        let sglang = "# HELP sglang:token_usage The token usage.\n\
            sglang:token_usage{model_name=\"q\",dp_rank=\"0\"} 0.6\n\
            sglang:token_usage{model_name=\"q\",dp_rank=\"1\"} 0.4\n\
            sglang:num_running_reqs{model_name=\"q\",dp_rank=\"0\"} 4\n\
            sglang:num_running_reqs{model_name=\"q\",dp_rank=\"1\"} 4\n\
            sglang:num_queue_reqs{model_name=\"q\",dp_rank=\"0\"} 2\n\
            sglang:num_queue_reqs{model_name=\"q\",dp_rank=\"1\"} 2\n";
        let load = from_metrics(sglang, LoadSource::Sglang).expect("parses");
        assert!(
            (load - 1.0).abs() < 1e-9,
            "mean usage 0.5 + queue 4 / running 8: {load}"
        );
        let tgi = "# TYPE tgi_queue_size gauge\ntgi_queue_size 6\ntgi_batch_current_size 3\n";
        let load = from_metrics(tgi, LoadSource::Tgi).expect("parses");
        assert!((load - 2.0).abs() < 1e-9, "queue 6 / batch 3: {load}");
        let e = from_metrics(VLLM, LoadSource::Tgi).expect_err("not TGI");
        assert!(e.contains("tgi_batch_current_size"), "{e}");
    }

    #[test]
    fn llamacpp_load_is_busy_slots() {
        let body = r#"[{"id":0,"is_processing":true},{"id":1,"is_processing":false},
                      {"id":2,"is_processing":true},{"id":3,"is_processing":false}]"#;
        assert_eq!(from_llamacpp_slots(body), Ok(0.5));
        assert!(from_llamacpp_slots("[]").is_err());
    }

    #[test]
    fn weight_falls_with_load_but_never_to_zero() {
        assert_eq!(weight(1, factor(0.0)), 100);
        assert_eq!(weight(1, factor(1.0)), 20);
        assert_eq!(weight(2, factor(1.0)), 40);
        assert_eq!(weight(1, factor(1000.0)), 5, "the minimum share");
        assert_eq!(weight(0, factor(0.0)), 0, "weight 0 stays out");
    }

    #[test]
    fn hysteresis_ignores_small_changes() {
        let mut l = Load::default();
        assert!(!l.record(0.02), "idle noise does not reprogram");
        assert_eq!(l.factor, 1.0);
        // A full batch reprograms (after smoothing, within two samples).
        let changed = l.record(1.0) | l.record(1.0);
        assert!(changed && l.factor < 0.4, "{l:?}");
        let f = l.factor;
        // Small wobble around the same load keeps the weight.
        assert!(!l.record(1.05) && !l.record(0.95));
        assert_eq!(l.factor, f);
        // Back to idle restores it.
        for _ in 0..8 {
            l.record(0.0);
        }
        assert!(l.factor > 0.8, "{l:?}");
    }
}
