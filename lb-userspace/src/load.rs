//! Engine signals: what each backend's inference engine says of its load, read every
//! `signal_interval` over a kept-alive connection, as the numbers the scheduler weighs in
//! the kernel: requests running, requests waiting, KV-cache use, and (where the engine says)
//! its batch slots.

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use crate::config::{LoadSource, PrefixAffinity};

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
    /// Its prefix cache's hits, where the engine tells.
    pub prefix: Option<PrefixCache>,
}

/// What an engine says of its prefix cache.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PrefixCache {
    /// Prompt tokens looked up and found, since it started (vLLM's counters).
    Counters { queries: f64, hits: f64 },
    /// The share of prompt tokens found, recently (SGLang's gauge), 0-1.
    HitRate(f64),
}

/// The Prometheus gauges of an engine that exports them.
fn gauges(source: LoadSource) -> Option<Gauges> {
    match source {
        LoadSource::Vllm => Some(Gauges {
            running: "vllm:num_requests_running",
            waiting: "vllm:num_requests_waiting",
            // vLLM renamed the gauge; either is a 0-1 fraction.
            cache: &["vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc"],
            prefix: Prefix::Counters {
                queries: "vllm:prefix_cache_queries_total",
                hits: "vllm:prefix_cache_hits_total",
            },
        }),
        LoadSource::Sglang => Some(Gauges {
            running: "sglang:num_running_reqs",
            waiting: "sglang:num_queue_reqs",
            cache: &["sglang:token_usage"],
            prefix: Prefix::HitRate("sglang:cache_hit_rate"),
        }),
        // TGI exports no KV-cache gauge: its queue tells when it is full.
        LoadSource::Tgi => Some(Gauges {
            running: "tgi_batch_current_size",
            waiting: "tgi_queue_size",
            cache: &[],
            prefix: Prefix::None,
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
    prefix: Prefix,
}

/// Where an engine's Prometheus text tells of its prefix cache.
#[derive(Debug, Clone, Copy)]
enum Prefix {
    Counters {
        queries: &'static str,
        hits: &'static str,
    },
    HitRate(&'static str),
    None,
}

impl Prefix {
    fn has(&self, name: &str) -> bool {
        match *self {
            Prefix::Counters { queries, hits } => name == queries || name == hits,
            Prefix::HitRate(rate) => name == rate,
            Prefix::None => false,
        }
    }
}

/// The signal in the Prometheus text of `source` (vLLM, SGLang, TGI). Series of one name
/// (several data-parallel ranks, say) are summed; KV-cache fractions and hit rates are
/// averaged.
pub fn from_metrics(text: &str, source: LoadSource) -> Result<EngineSignal, String> {
    let g =
        gauges(source).ok_or_else(|| format!("{source:?} exports no Prometheus load gauges"))?;
    // name -> (sum, series)
    let mut sums: HashMap<&str, (f64, usize)> = HashMap::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        // `name{labels} value [timestamp]` or `name value [timestamp]`.
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..end];
        if !(name == g.running
            || name == g.waiting
            || g.cache.contains(&name)
            || g.prefix.has(name))
        {
            continue;
        }
        let rest = match line[end..].strip_prefix('{') {
            Some(labelled) => labelled.split_once('}').map_or("", |(_, r)| r),
            None => &line[end..],
        };
        let Some(Ok(v)) = rest.split_whitespace().next().map(str::parse::<f64>) else {
            continue;
        };
        if !v.is_finite() {
            continue;
        }
        let e = sums.entry(name).or_default();
        e.0 += v;
        e.1 += 1;
    }
    let sum = |name: &str| sums.get(name).map(|(v, _)| *v);
    let mean = |name: &str| sums.get(name).map(|(v, n)| v / *n as f64);
    let running = sum(g.running).ok_or_else(|| format!("no {} in /metrics", g.running))?;
    let prefix = match g.prefix {
        Prefix::Counters { queries, hits } => match (sum(queries), sum(hits)) {
            (Some(queries), Some(hits)) => Some(PrefixCache::Counters { queries, hits }),
            _ => None,
        },
        Prefix::HitRate(rate) => mean(rate).map(|r| PrefixCache::HitRate(r.clamp(0.0, 1.0))),
        Prefix::None => None,
    };
    Ok(EngineSignal {
        running: running.max(0.0).round() as u32,
        waiting: sum(g.waiting).unwrap_or(0.0).max(0.0).round() as u32,
        kv: g
            .cache
            .iter()
            .find_map(|c| mean(c))
            .unwrap_or(0.0)
            .clamp(0.0, 1.0),
        slots: None,
        prefix,
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
        prefix: None,
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
        prefix: None,
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
    /// The backend's live flows (the data path's count) when `last` arrived.
    pub live_at: u32,
    /// Slots as the engine shows them: what runs while requests wait (the batch is full),
    /// or more if more ever run; 0 until then.
    pub learned_slots: u32,
    /// Its prefix cache's recent hit rate, where it tells.
    pub prefix: PrefixWindow,
    pub error: Option<String>,
}

impl Engine {
    pub fn record(&mut self, signal: EngineSignal, at_ns: u64, live: u32) {
        self.live_at = live;
        self.learned_slots = match signal.slots {
            Some(n) => n,
            None if signal.waiting > 0 && signal.running > 0 => signal.running,
            None if self.learned_slots > 0 => self.learned_slots.max(signal.running),
            None => 0,
        };
        if let Some(p) = signal.prefix {
            self.prefix.record(p, at_ns);
        }
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
            prefix: None,
        });
        lb_common::EngineLoad {
            updated_ns: if self.last.is_some() { self.at_ns } else { 0 },
            running: s.running,
            waiting: s.waiting,
            slots: self.slots(configured),
            kv_permille: (s.kv * 1000.0).round() as u32,
            live_at_signal: self.live_at,
            _pad: 0,
        }
    }
}

/// How fast old prefix-cache readings fade: each weighs e^-1 after this long.
const PREFIX_WINDOW_NS: f64 = 30e9;

/// An engine's prefix-cache hit rate over about the last `PREFIX_WINDOW_NS`: the prompt
/// tokens looked up and found since each reading of its counters, or its own rate, older
/// readings weighing exponentially less.
#[derive(Debug, Clone, Default)]
pub struct PrefixWindow {
    /// The counters at the last reading.
    counters: Option<(f64, f64)>,
    /// The first reading.
    pub since_ns: u64,
    at_ns: u64,
    queries: f64,
    hits: f64,
}

impl PrefixWindow {
    pub fn record(&mut self, reading: PrefixCache, at_ns: u64) {
        let first = self.at_ns == 0;
        if first {
            self.since_ns = at_ns;
        }
        let fade = if first {
            0.0
        } else {
            (-(at_ns.saturating_sub(self.at_ns) as f64) / PREFIX_WINDOW_NS).exp()
        };
        self.queries *= fade;
        self.hits *= fade;
        match reading {
            PrefixCache::Counters { queries, hits } => {
                // Lower than before: the engine restarted, its counters start again here.
                if let Some((q0, h0)) = self.counters
                    && queries >= q0
                    && hits >= h0
                {
                    self.queries += queries - q0;
                    self.hits += hits - h0;
                }
                self.counters = Some((queries, hits));
            }
            PrefixCache::HitRate(rate) => {
                let weight = 1.0 - fade;
                self.queries += weight;
                self.hits += rate * weight;
            }
        }
        self.at_ns = at_ns;
    }

    /// The recent share of prompt tokens found in the cache; `None` before any was looked up.
    pub fn hit_rate(&self) -> Option<f64> {
        (self.queries > 0.0).then(|| (self.hits / self.queries).clamp(0.0, 1.0))
    }
}

/// A VIP becomes sticky when its engines' mean prefix-cache hit rate reaches this...
pub const STICKY_FROM: f64 = 0.10;
/// ...and balanced again when it falls below this (apart, so it does not flap)...
pub const BALANCED_BELOW: f64 = 0.05;
/// ...once its engines have been read this long: conversations that just began miss
/// before they hit, and stickiness is what keeps them hitting.
pub const BALANCED_AFTER_NS: u64 = 10_000_000_000;

/// Whether a VIP's flows stay on their hash's picks while those have room: `mode` as
/// configured, `was` what it is now, `rates` its engines' recent prefix-cache hit rates,
/// `observed_ns` how long the longest read of them has been read. Under `auto`, engines
/// that tell nothing of a prefix cache leave it sticky: a cache they keep quiet about
/// (llama.cpp's slots, TGI's) is found again, at no cost while there is room.
pub fn sticky(
    mode: PrefixAffinity,
    was: bool,
    rates: impl IntoIterator<Item = f64>,
    observed_ns: u64,
) -> bool {
    match mode {
        PrefixAffinity::On => true,
        PrefixAffinity::Off => false,
        PrefixAffinity::Auto => {
            let (sum, n) = rates
                .into_iter()
                .fold((0.0, 0usize), |(sum, n), r| (sum + r, n + 1));
            if n == 0 {
                return true;
            }
            let rate = sum / n as f64;
            if was {
                rate >= BALANCED_BELOW || observed_ns < BALANCED_AFTER_NS
            } else {
                rate >= STICKY_FROM
            }
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
            prefix: None,
        }
    }

    #[test]
    fn prefix_hit_rates_come_from_counters_or_the_engines_rate() {
        let text = |queries: u64, hits: u64| {
            format!(
                "{VLLM}vllm:prefix_cache_queries_total{{model_name=\"m\"}} {queries}\n\
                 vllm:prefix_cache_hits_total{{model_name=\"m\"}} {hits} 1700000000000\n"
            )
        };
        let read = |q, h| {
            from_metrics(&text(q, h), LoadSource::Vllm)
                .expect("parses")
                .prefix
                .expect("vLLM tells its prefix cache")
        };
        assert_eq!(
            read(100, 40),
            PrefixCache::Counters {
                queries: 100.0,
                hits: 40.0
            },
            "a sample's timestamp is not its value"
        );
        let mut w = PrefixWindow::default();
        w.record(read(1000, 900), 1);
        assert_eq!(w.hit_rate(), None, "since it started is not recent");
        w.record(read(2000, 1000), 1_000_000_000);
        assert!((w.hit_rate().unwrap() - 0.1).abs() < 1e-9, "{w:?}");
        // A restart: counters start again, and nothing is counted for that reading.
        w.record(read(50, 50), 2_000_000_000);
        assert!((w.hit_rate().unwrap() - 0.1).abs() < 1e-9, "{w:?}");
        w.record(read(1050, 1050), 3_000_000_000);
        let r = w.hit_rate().unwrap();
        assert!(
            r > 0.5 && r < 0.6,
            "the newer thousand weighs a bit more: {r}"
        );
        // Long after, the new hits are all that count.
        w.record(read(2050, 2050), 600_000_000_000);
        assert!(w.hit_rate().unwrap() > 0.99);

        let sglang = "sglang:num_running_reqs 1\nsglang:cache_hit_rate{dp_rank=\"0\"} 0.5\n\
                      sglang:cache_hit_rate{dp_rank=\"1\"} 0.7\n";
        let p = from_metrics(sglang, LoadSource::Sglang)
            .expect("parses")
            .prefix;
        let Some(PrefixCache::HitRate(r)) = p else {
            panic!("{p:?}")
        };
        assert!((r - 0.6).abs() < 1e-9, "the ranks' mean: {r}");
        assert_eq!(from_metrics(VLLM, LoadSource::Vllm).unwrap().prefix, None);
    }

    #[test]
    fn auto_affinity_is_sticky_while_prefix_caches_hit() {
        use PrefixAffinity::*;
        let long = BALANCED_AFTER_NS;
        assert!(sticky(On, false, [0.0], long));
        assert!(!sticky(Off, true, [0.9], long));
        assert!(
            sticky(Auto, false, [], long),
            "engines that do not tell: sticky"
        );
        assert!(!sticky(Auto, true, [0.0, 0.04], long), "mean 2%: balanced");
        assert!(
            sticky(Auto, true, [0.0, 0.04], long - 1),
            "not before the engines were read for long enough"
        );
        assert!(
            sticky(Auto, false, [0.3, 0.0], 0),
            "mean 15%: sticky at once"
        );
        assert!(
            !sticky(Auto, false, [0.08], long),
            "8% does not make it sticky..."
        );
        assert!(
            sticky(Auto, true, [0.08], long),
            "...nor balanced once sticky"
        );
    }

    #[test]
    fn slots_are_learned_when_requests_wait_and_the_config_wins() {
        let mut e = Engine::default();
        e.record(signal(3, 0), 1, 3);
        assert_eq!(e.slots(0), 0, "no queue yet: the batch may hold more");
        e.record(signal(4, 2), 2, 6);
        assert_eq!(e.slots(0), 4, "requests wait: the batch is full at 4");
        e.record(signal(2, 0), 3, 2);
        assert_eq!(e.slots(0), 4, "kept while the batch is not full");
        e.record(signal(6, 0), 4, 6);
        assert_eq!(e.slots(0), 6, "more ran than learned: at least that many");
        e.record(signal(3, 1), 5, 4);
        assert_eq!(e.slots(0), 3, "long prompts fill the KV cache: fewer fit");
        assert_eq!(e.slots(8), 8, "the config's slots win");
        let m = e.to_map(0);
        assert_eq!(
            (
                m.updated_ns,
                m.running,
                m.waiting,
                m.slots,
                m.live_at_signal
            ),
            (5, 3, 1, 3, 4)
        );
        assert_eq!(
            Engine::default().to_map(4).updated_ns,
            0,
            "never answered: not fresh"
        );
    }
}
