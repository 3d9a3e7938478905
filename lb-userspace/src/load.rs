//! Engine signals: what each backend's inference engine says of its load, read every
//! `signal_interval` over a kept-alive connection, as the numbers the scheduler weighs in
//! the kernel: requests running, requests waiting, KV-cache use, and (where the engine says)
//! its batch slots.

use std::{net::SocketAddr, time::Duration};

use crate::config::LoadSource;

/// One reading of an engine.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EngineSignal {
    /// Requests in the running batch.
    pub running: u32,
    /// Requests queued for a slot.
    pub waiting: u32,
    /// KV-cache use, 0-1.
    pub kv: f64,
    /// Batch slots, where the engine tells (llama.cpp's `/slots`).
    pub slots: Option<u32>,
}

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
        // TGI exports no KV-cache gauge: its queue tells when it is full.
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

/// The signal in the Prometheus text of `source` (vLLM, SGLang, TGI). Series of one gauge
/// (several data-parallel ranks, say) are summed; KV-cache fractions are averaged.
pub fn from_metrics(text: &str, source: LoadSource) -> Result<EngineSignal, String> {
    let g =
        gauges(source).ok_or_else(|| format!("{source:?} exports no Prometheus load gauges"))?;
    let (mut running, mut waiting, mut cache, mut ranks) = (None, 0.0, 0.0, 0usize);
    for line in text.lines() {
        // Only the gauges' own lines: skip comments, histograms and everything else cheaply.
        if line.starts_with('#')
            || !(line.starts_with(g.running)
                || line.starts_with(g.waiting)
                || g.cache.iter().any(|c| line.starts_with(c)))
        {
            continue;
        }
        let Some((series, v)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(v) = v.trim().parse::<f64>() else {
            continue;
        };
        let name = series.split('{').next().unwrap_or(series);
        if name == g.running {
            *running.get_or_insert(0.0) += v;
        } else if name == g.waiting {
            waiting += v;
        } else if g.cache.contains(&name) {
            cache += v;
            ranks += 1;
        }
    }
    let running = running.ok_or_else(|| format!("no {} in /metrics", g.running))?;
    Ok(EngineSignal {
        running: running.max(0.0).round() as u32,
        waiting: waiting.max(0.0).round() as u32,
        kv: (cache / ranks.max(1) as f64).clamp(0.0, 1.0),
        slots: None,
    })
}

/// llama.cpp's `/slots`: its slots, and how many process a request.
pub fn from_llamacpp_slots(body: &str) -> Result<EngineSignal, String> {
    let slots: Vec<serde_json::Value> =
        serde_json::from_str(body).map_err(|e| format!("/slots is not a JSON array: {e}"))?;
    if slots.is_empty() {
        return Err("/slots lists no slot".into());
    }
    let busy = slots
        .iter()
        .filter(|s| s["is_processing"].as_bool() == Some(true) || s["state"].as_i64() == Some(1))
        .count();
    Ok(EngineSignal {
        running: busy as u32,
        waiting: 0,
        kv: busy as f64 / slots.len() as f64,
        slots: Some(slots.len() as u32),
    })
}

/// Memory use above this share counts as KV pressure: an engine that preallocates its KV
/// cache (vLLM: 90% by default) sits at it while serving normally.
const MEMORY_PRESSURE_FROM: f64 = 0.9;

/// NVML's view, for servers that export no load of their own: no request counts, and the
/// GPUs' utilisation or the fullest GPU's memory past `MEMORY_PRESSURE_FROM`, whichever is
/// higher, as the KV-cache use.
pub fn from_gpu_usage(u: crate::gpu::GpuUsage) -> EngineSignal {
    let pressure = ((u.memory - MEMORY_PRESSURE_FROM) / (1.0 - MEMORY_PRESSURE_FROM)).max(0.0);
    EngineSignal {
        running: 0,
        waiting: 0,
        kv: u.utilization.max(pressure).clamp(0.0, 1.0),
        slots: None,
    }
}

/// One client for every engine: one kept-alive connection per engine (its requests come
/// every `signal_interval`; a new connection each time would cost more than the answer).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(1)
        .pool_idle_timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
        .build()
        .expect("a reqwest client without TLS or proxy always builds")
}

/// Reads one backend's signal; `gpus` are the UUIDs of its GPUs (for NVML).
pub async fn scrape(
    client: &reqwest::Client,
    addr: SocketAddr,
    source: LoadSource,
    gpus: &[String],
    timeout: Duration,
) -> Result<EngineSignal, String> {
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
        LoadSource::None => return Err("no load source".into()),
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
        LoadSource::Llamacpp => from_llamacpp_slots(&body),
        _ => from_metrics(&body, source),
    }
}

/// What the daemon knows of a backend's engine: its last signal, when it came, and the
/// batch slots learned from it.
#[derive(Debug, Clone, Default)]
pub struct Engine {
    pub last: Option<EngineSignal>,
    /// `CLOCK_MONOTONIC` nanoseconds when `last` arrived.
    pub at_ns: u64,
    /// Slots as the engine shows them: what runs while requests wait (the batch is full),
    /// or more if more ever run; 0 until then.
    pub learned_slots: u32,
    pub error: Option<String>,
}

impl Engine {
    pub fn record(&mut self, signal: EngineSignal, at_ns: u64) {
        self.learned_slots = match signal.slots {
            Some(n) => n,
            None if signal.waiting > 0 && signal.running > 0 => signal.running,
            None if self.learned_slots > 0 => self.learned_slots.max(signal.running),
            None => 0,
        };
        self.last = Some(signal);
        self.at_ns = at_ns;
        self.error = None;
    }

    /// The backend's batch slots: `configured` if set, else learned; 0: unknown.
    pub fn slots(&self, configured: u32) -> u32 {
        if configured != 0 {
            configured
        } else {
            self.learned_slots
        }
    }

    /// The `BACKEND_LOAD` value for a backend with `configured` slots.
    pub fn to_map(&self, configured: u32) -> lb_common::EngineLoad {
        let s = self.last.unwrap_or(EngineSignal {
            running: 0,
            waiting: 0,
            kv: 0.0,
            slots: None,
        });
        lb_common::EngineLoad {
            updated_ns: if self.last.is_some() { self.at_ns } else { 0 },
            running: s.running,
            waiting: s.waiting,
            slots: self.slots(configured),
            kv_permille: (s.kv * 1000.0).round() as u32,
        }
    }
}

/// `CLOCK_MONOTONIC` now, in nanoseconds: the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always there");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const VLLM: &str = "# HELP vllm:num_requests_running Running.\n\
        # TYPE vllm:num_requests_running gauge\n\
        vllm:num_requests_running{model_name=\"m\"} 4\n\
        vllm:num_requests_waiting{model_name=\"m\"} 2\n\
        vllm:gpu_cache_usage_perc{model_name=\"m\"} 0.75\n\
        vllm:time_to_first_token_seconds_bucket{le=\"0.1\"} 9\n";

    #[test]
    fn vllm_signals_are_running_waiting_and_cache() {
        let s = from_metrics(VLLM, LoadSource::Vllm).expect("parses");
        assert_eq!((s.running, s.waiting, s.slots), (4, 2, None));
        assert!((s.kv - 0.75).abs() < 1e-9, "{s:?}");
        let newer = VLLM.replace("gpu_cache_usage_perc", "kv_cache_usage_perc");
        assert_eq!(
            from_metrics(&newer, LoadSource::Vllm).expect("parses").kv,
            0.75
        );
        let e = from_metrics("up 1\n", LoadSource::Vllm).expect_err("not vLLM");
        assert!(e.contains("vllm:num_requests_running"), "{e}");
    }

    #[test]
    fn sglang_and_tgi_signals_use_their_own_gauges() {
        // As SGLang serves them with --enable-metrics; two data-parallel ranks.
        let sglang = "# HELP sglang:token_usage The token usage.\n\
            sglang:token_usage{model_name=\"q\",dp_rank=\"0\"} 0.6\n\
            sglang:token_usage{model_name=\"q\",dp_rank=\"1\"} 0.4\n\
            sglang:num_running_reqs{model_name=\"q\",dp_rank=\"0\"} 4\n\
            sglang:num_running_reqs{model_name=\"q\",dp_rank=\"1\"} 4\n\
            sglang:num_queue_reqs{model_name=\"q\",dp_rank=\"0\"} 2\n\
            sglang:num_queue_reqs{model_name=\"q\",dp_rank=\"1\"} 2\n";
        let s = from_metrics(sglang, LoadSource::Sglang).expect("parses");
        assert_eq!((s.running, s.waiting), (8, 4), "summed over ranks");
        assert!((s.kv - 0.5).abs() < 1e-9, "the ranks' mean: {s:?}");
        let tgi = "# TYPE tgi_queue_size gauge\ntgi_queue_size 6\ntgi_batch_current_size 3\n";
        let s = from_metrics(tgi, LoadSource::Tgi).expect("parses");
        assert_eq!((s.running, s.waiting, s.kv), (3, 6, 0.0));
        let e = from_metrics(VLLM, LoadSource::Tgi).expect_err("not TGI");
        assert!(e.contains("tgi_batch_current_size"), "{e}");
    }

    #[test]
    fn llamacpp_signal_is_busy_slots_of_all() {
        let body = r#"[{"id":0,"is_processing":true},{"id":1,"is_processing":false},
                      {"id":2,"is_processing":true},{"id":3,"is_processing":false}]"#;
        let s = from_llamacpp_slots(body).expect("parses");
        assert_eq!((s.running, s.waiting, s.slots), (2, 0, Some(4)));
        assert!(from_llamacpp_slots("[]").is_err());
    }

    #[test]
    fn nvml_signal_is_utilisation_or_memory_pressure() {
        let usage = |samples: &[(f64, f64)]| {
            from_gpu_usage(crate::gpu::combine_usage(samples).expect("GPUs")).kv
        };
        // Idle, memory preallocated as vLLM does: nothing.
        assert_eq!(usage(&[(0.0, 0.9)]), 0.0);
        // Two GPUs of a tensor-parallel instance: the mean utilisation.
        assert!((usage(&[(1.0, 0.5), (0.5, 0.5)]) - 0.75).abs() < 1e-9);
        // The fullest GPU's memory past 90%.
        assert!((usage(&[(0.2, 0.95), (0.2, 0.2)]) - 0.5).abs() < 1e-9);
        assert!(crate::gpu::combine_usage(&[]).is_none());
    }

    fn signal(running: u32, waiting: u32) -> EngineSignal {
        EngineSignal {
            running,
            waiting,
            kv: 0.0,
            slots: None,
        }
    }

    #[test]
    fn slots_are_learned_when_requests_wait_and_the_config_wins() {
        let mut e = Engine::default();
        e.record(signal(3, 0), 1);
        assert_eq!(e.slots(0), 0, "no queue yet: the batch may hold more");
        e.record(signal(4, 2), 2);
        assert_eq!(e.slots(0), 4, "requests wait: the batch is full at 4");
        e.record(signal(2, 0), 3);
        assert_eq!(e.slots(0), 4, "kept while the batch is not full");
        e.record(signal(6, 0), 4);
        assert_eq!(e.slots(0), 6, "more ran than learned: at least that many");
        e.record(signal(3, 1), 5);
        assert_eq!(e.slots(0), 3, "long prompts fill the KV cache: fewer fit");
        assert_eq!(e.slots(8), 8, "the config's slots win");
        let m = e.to_map(0);
        assert_eq!((m.updated_ns, m.running, m.waiting, m.slots), (5, 3, 1, 3));
        assert_eq!(
            Engine::default().to_map(4).updated_ns,
            0,
            "never answered: not fresh"
        );
    }
}
