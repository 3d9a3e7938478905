//! Load generators: steady streaming load, and the four-instance scenario with a slow one.

use std::{
    sync::atomic::Ordering,
    thread,
    time::{Duration, Instant},
};

use crate::{
    LB_ADDR, MODEL, NetNs, PinDir, Reply, Stack, burst, chat, metric, percentile, vip_url,
};

/// One request of a `Load`.
#[derive(Debug)]
pub struct LoadResult {
    pub started: Instant,
    pub result: Result<Reply, String>,
}

impl LoadResult {
    /// Succeeded with every token and `[DONE]`.
    pub fn complete(&self, max_tokens: u32) -> bool {
        matches!(&self.result, Ok(r) if r.done && r.tokens == max_tokens as usize)
    }
}

/// Steady streaming load from a namespace: `concurrency` clients, each sending one request
/// after another (a new connection each) until stopped, or `limit` passes.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<thread::JoinHandle<anyhow::Result<anyhow::Result<Vec<LoadResult>>>>>,
}

impl Load {
    pub fn start(
        ns: &NetNs,
        url: &str,
        concurrency: usize,
        max_tokens: u32,
        limit: Duration,
    ) -> anyhow::Result<Self> {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let url = url.to_owned();
        let handle = ns.spawn(move || -> anyhow::Result<Vec<LoadResult>> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let client = reqwest::Client::builder()
                    .timeout(Duration::from_secs(60))
                    .pool_max_idle_per_host(0)
                    .build()?;
                let deadline = Instant::now() + limit;
                let workers = (0..concurrency).map(|_| {
                    let (client, url, flag) = (client.clone(), url.clone(), flag.clone());
                    async move {
                        let mut out = Vec::new();
                        while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                            let started = Instant::now();
                            let result = chat(&client, &url, true, max_tokens)
                                .await
                                .map_err(|e| format!("{e:#}"));
                            out.push(LoadResult { started, result });
                        }
                        out
                    }
                });
                let all = futures_util::future::join_all(workers).await;
                Ok(all.into_iter().flatten().collect())
            })
        })?;
        Ok(Self {
            stop,
            handle: Some(handle),
        })
    }

    /// Stops sending; waits for the requests in flight and returns every result.
    pub fn stop(mut self) -> Vec<LoadResult> {
        self.stop.store(true, Ordering::Relaxed);
        let handle = self.handle.take().expect("stopped once");
        handle
            .join()
            .expect("load thread panicked")
            .and_then(|r| r)
            .expect("load thread")
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// What one run of the slow-instance scenario measured.
#[derive(Debug, Clone)]
pub struct SlowScenario {
    pub ttft_p50_ms: f64,
    pub ttft_p95_ms: f64,
    pub requests: usize,
    pub failed: usize,
    /// Requests the fourth (slow) instance served.
    pub to_slow: usize,
    /// Requests each instance served, by name.
    pub per_instance: std::collections::BTreeMap<String, usize>,
    /// Mean of the fourth instance's `vllm:num_requests_waiting`, sampled every 100 ms.
    pub slow_queue_mean: f64,
}

/// The simulator flags that make the fourth instance of `four_instance_scenario` slow.
pub const SLOW: &[&str] = &["--slots", "1", "--tokens-per-second", "50"];

/// Three default simulated instances and a fourth run with `fourth` extra simulator flags
/// (`SLOW`, or none for four equal instances) behind one VIP with `vip` lines in its table
/// (e.g. `load_aware = true`); `requests` streaming chats, `concurrency` at a time.
pub fn four_instance_scenario(
    tag: &str,
    vip: &str,
    fourth: &[&str],
    requests: usize,
    concurrency: usize,
    tokens: u32,
) -> anyhow::Result<SlowScenario> {
    let slow_port = 8101;
    let flags: String = fourth.iter().map(|f| format!(", {f:?}")).collect();
    let slow = format!(
        "[model.health]\ninterval_ms = 100\n\n[[model]]\nname = \"slow\"\nvip = \"chat\"\n\
         served_model = \"{MODEL}\"\ngpus = \"simulated:1\"\naddress = \"{LB_ADDR}\"\n\
         base_port = {slow_port}\nenv = {{ GPULB_TEST_MARKER = \"{{marker}}\" }}\n\
         command = [\"gpulb-sim\", \"--listen\", \"{{address}}:{{port}}\", \"--name\", \"{{name}}\", \
         \"--model\", \"{{model}}\"{flags}]\n\
         [model.health]\ninterval_ms = 100\n"
    );
    let stack = Stack::managed_with(tag, 3, PinDir::new(tag), vip, &slow)?;
    stack.wait_ready(4, Duration::from_secs(30))?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let sampler = stack.topo.lb.spawn(move || -> Vec<f64> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let client = reqwest::Client::new();
        let url = format!("http://{LB_ADDR}:{slow_port}/metrics");
        let mut samples = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
            let text = rt.block_on(async { client.get(&url).send().await.ok()?.text().await.ok() });
            if let Some(v) = text
                .as_deref()
                .and_then(|t| metric(t, "vllm:num_requests_waiting", &[]))
            {
                samples.push(v);
            }
            thread::sleep(Duration::from_millis(100));
        }
        samples
    })?;
    let replies = burst(
        &stack.topo.client,
        &vip_url("/v1/chat/completions"),
        requests,
        concurrency,
        true,
        tokens,
    )?;
    stop.store(true, Ordering::Relaxed);
    let samples = sampler
        .join()
        .map_err(|_| anyhow::anyhow!("sampler panicked"))??;
    let ok: Vec<&Reply> = replies
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .filter(|r| r.done && r.tokens == tokens as usize)
        .collect();
    let ttft: Vec<f64> = ok
        .iter()
        .map(|r| r.time_to_first_token.as_secs_f64() * 1000.0)
        .collect();
    Ok(SlowScenario {
        ttft_p50_ms: percentile(ttft.clone(), 0.5),
        ttft_p95_ms: percentile(ttft, 0.95),
        requests,
        failed: requests - ok.len(),
        to_slow: ok.iter().filter(|r| r.instance == "slow-0").count(),
        per_instance: ok.iter().fold(Default::default(), |mut m, r| {
            *m.entry(r.instance.clone()).or_insert(0) += 1;
            m
        }),
        slow_queue_mean: samples.iter().sum::<f64>() / samples.len().max(1) as f64,
    })
}
