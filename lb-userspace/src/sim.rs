//! The simulated GPU instance: an OpenAI-compatible server whose latency behaves like one
//! batched model process on one GPU, where it matters to a load balancer.
//!
//! - It runs `slots` sequences at most (the batch); further requests wait in a queue.
//! - Each running sequence holds its prompt and its tokens in the KV cache (`kv_tokens`); a
//!   request is admitted only when its prompt plus `max_tokens` fit, so long prompts run
//!   fewer at once than the slots allow.
//! - Prefill takes `ttft_ms` plus `prefill_ms_per_ktok` per thousand prompt tokens (about
//!   four characters a token). The prefix cache holds the message prefixes of the chats
//!   this instance served (an LRU of `prefix_cache` of them): a chat pays
//!   `prefix_hit_factor` of the prefill of its longest cached prefix of earlier messages,
//!   as vLLM's block cache would.
//! - Tokens follow at `tokens_per_second`, slowed by `batch_slowdown` for each other
//!   running sequence (decode steps get longer as the batch grows).
//!
//! `/metrics` reports what vLLM reports: running and waiting requests, KV-cache use, and
//! the prefix cache's queried and hit tokens.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderName, HeaderValue, StatusCode, header},
    response::{
        IntoResponse, Response,
        sse::{Event, Sse},
    },
    routing::{get, post},
};
use prometheus::{Encoder as _, IntCounter, IntGauge, Opts, Registry, TextEncoder};
use serde_json::{Value, json};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tracing::info;

/// Response header naming the instance that answered (tests and the demo count the split).
pub const INSTANCE_HEADER: &str = "x-sim-instance";

#[derive(Debug, Clone, clap::Args)]
pub struct SimConfig {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    /// Instance name, returned in `x-sim-instance` and `system_fingerprint`.
    #[arg(long, default_value = "sim-0")]
    pub name: String,
    /// Model id served (listed by /v1/models).
    #[arg(long, default_value = "sim-llm")]
    pub model: String,
    /// Sequences decoded at once (the batch size).
    #[arg(long, default_value_t = 4)]
    pub slots: usize,
    /// Requests allowed to wait for a slot; beyond that, 503.
    #[arg(long, default_value_t = 256)]
    pub max_waiting: usize,
    /// Prefill time before the first token.
    #[arg(long, default_value_t = 40)]
    pub ttft_ms: u64,
    /// Decode rate of one sequence alone in the batch.
    #[arg(long, default_value_t = 200.0)]
    pub tokens_per_second: f64,
    /// Extra decode time per token for each other running sequence (0.05 = 5%).
    #[arg(long, default_value_t = 0.05)]
    pub batch_slowdown: f64,
    /// `max_tokens` when the request names none.
    #[arg(long, default_value_t = 16)]
    pub default_max_tokens: u32,
    /// Time to "load the weights": /health answers at once, /v1/models lists the model and
    /// completions are served only after this.
    #[arg(long, default_value_t = 0)]
    pub load_delay_ms: u64,
    /// Prefill time per thousand prompt tokens not found in the prefix cache.
    #[arg(long, default_value_t = 40.0)]
    pub prefill_ms_per_ktok: f64,
    /// KV-cache capacity in tokens: running sequences hold their prompt and `max_tokens`.
    #[arg(long, default_value_t = 65536)]
    pub kv_tokens: usize,
    /// Message prefixes the prefix cache holds (LRU); 0: no prefix cache.
    #[arg(long, default_value_t = 4096)]
    pub prefix_cache: usize,
    /// Share of the prefill time that cached prefix tokens still cost (0-1).
    #[arg(long, default_value_t = 0.1)]
    pub prefix_hit_factor: f64,
    /// As vLLM's `--api-key`: `/v1/*` answers 401 without `Authorization: Bearer <key>`
    /// (`/health` and `/metrics` stay open).
    #[arg(long)]
    pub api_key: Option<String>,
}

struct Metrics {
    registry: Registry,
    running: IntGauge,
    waiting: IntGauge,
    cache_usage: prometheus::Gauge,
    generated: IntCounter,
    succeeded: IntCounter,
    prefix_queries: IntCounter,
    prefix_hits: IntCounter,
}

impl Metrics {
    fn new() -> Self {
        let registry = Registry::new();
        let running = IntGauge::new(
            "vllm:num_requests_running",
            "Requests in the running batch.",
        )
        .expect("valid metric");
        let waiting = IntGauge::new("vllm:num_requests_waiting", "Requests waiting for a slot.")
            .expect("valid metric");
        let cache_usage = prometheus::Gauge::with_opts(Opts::new(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage, 1 = full (tokens held by running sequences / kv_tokens).",
        ))
        .expect("valid metric");
        let prefix_queries = IntCounter::new(
            "vllm:prefix_cache_queries_total",
            "Prompt tokens looked up in the prefix cache.",
        )
        .expect("valid metric");
        let prefix_hits = IntCounter::new(
            "vllm:prefix_cache_hits_total",
            "Prompt tokens found in the prefix cache.",
        )
        .expect("valid metric");
        let generated = IntCounter::new("vllm:generation_tokens_total", "Tokens generated.")
            .expect("valid metric");
        let succeeded = IntCounter::new("vllm:request_success_total", "Requests completed.")
            .expect("valid metric");
        for m in [
            Box::new(running.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(waiting.clone()),
            Box::new(cache_usage.clone()),
            Box::new(generated.clone()),
            Box::new(succeeded.clone()),
            Box::new(prefix_queries.clone()),
            Box::new(prefix_hits.clone()),
        ] {
            registry.register(m).expect("unique metric");
        }
        Self {
            registry,
            running,
            waiting,
            cache_usage,
            generated,
            succeeded,
            prefix_queries,
            prefix_hits,
        }
    }
}

struct Sim {
    cfg: SimConfig,
    slots: Arc<Semaphore>,
    /// KV-cache tokens held by admitted sequences.
    kv_used: Mutex<usize>,
    kv_freed: Notify,
    running: AtomicUsize,
    waiting: AtomicUsize,
    ready_at: Instant,
    next_id: AtomicU64,
    /// Message prefixes (hashes) whose KV blocks the cache still holds, least recently used
    /// first.
    prefixes: Mutex<VecDeque<u64>>,
    metrics: Metrics,
}

/// Counts a request in `counter` while alive (also when the client goes away mid-wait).
struct Counted<'a>(&'a AtomicUsize);

impl<'a> Counted<'a> {
    fn new(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A sequence in the batch: its slot and its KV-cache tokens, given back on drop.
struct Admitted {
    sim: Arc<Sim>,
    _slot: OwnedSemaphorePermit,
    kv: usize,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        *self.sim.kv_used.lock().expect("kv lock") -= self.kv;
        self.sim.kv_freed.notify_waiters();
    }
}

/// What a completion request asks for.
struct Request {
    chat: bool,
    stream: bool,
    max_tokens: u32,
    /// Tokens of the prompt (about four characters each).
    prompt_tokens: usize,
    /// Each prefix of the messages before the last (the conversation so far), longest
    /// first: its hash and its tokens.
    prefixes: Vec<(u64, usize)>,
    /// Every prefix of the conversation once this request's reply is added to it: what the
    /// cache holds after.
    after: Vec<u64>,
}

/// Tokens of a text, about four characters each (at least one).
fn tokens(text: &str) -> usize {
    text.len().div_ceil(4).max(1)
}

/// The hash of each prefix of `messages` (one message, two, ...), in order.
fn prefix_hashes<'a>(messages: impl Iterator<Item = (&'a str, &'a str)>) -> Vec<u64> {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    messages
        .map(|(role, content)| {
            role.hash(&mut h);
            content.hash(&mut h);
            h.finish()
        })
        .collect()
}

/// The reply the simulator generates for `max_tokens` (what a client that concatenates the
/// stream's deltas ends up with).
pub fn reply_text(max_tokens: u32) -> String {
    (0..max_tokens).map(|i| format!("tok{i} ")).collect()
}

impl Request {
    fn parse(body: &Value, chat: bool, default_max_tokens: u32) -> Self {
        let max_tokens = body
            .get("max_tokens")
            .and_then(Value::as_u64)
            .map_or(default_max_tokens, |n| n.clamp(1, 4096) as u32);
        let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
        let messages: Vec<(&str, &str)> = body
            .get("messages")
            .and_then(Value::as_array)
            .map(|m| {
                m.iter()
                    .map(|m| {
                        (
                            m["role"].as_str().unwrap_or(""),
                            m["content"].as_str().unwrap_or(""),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let prompt = body.get("prompt").and_then(Value::as_str).unwrap_or("");
        let prompt_tokens = tokens(prompt).max(messages.iter().map(|(_, c)| tokens(c)).sum());
        let before = &messages[..messages.len().saturating_sub(1)];
        let mut sum = 0;
        let mut prefixes: Vec<(u64, usize)> = prefix_hashes(before.iter().copied())
            .into_iter()
            .zip(before)
            .map(|(h, (_, c))| {
                sum += tokens(c);
                (h, sum)
            })
            .collect();
        prefixes.reverse();
        let reply = reply_text(max_tokens);
        let after = prefix_hashes(
            messages
                .iter()
                .copied()
                .chain(std::iter::once(("assistant", reply.as_str()))),
        );
        Self {
            chat,
            stream,
            max_tokens,
            prompt_tokens,
            prefixes,
            after,
        }
    }
}

impl Sim {
    fn is_ready(&self) -> bool {
        Instant::now() >= self.ready_at
    }

    /// Waits for a batch slot and for room in the KV cache, then for prefill.
    async fn admit(self: &Arc<Self>, req: &Request) -> Result<Admitted, Response> {
        if self.waiting.load(Ordering::Relaxed) >= self.cfg.max_waiting {
            return Err(error(StatusCode::SERVICE_UNAVAILABLE, "queue full"));
        }
        let need = (req.prompt_tokens + req.max_tokens as usize).min(self.cfg.kv_tokens);
        let admitted = {
            let _waiting = Counted::new(&self.waiting);
            let slot = self
                .slots
                .clone()
                .acquire_owned()
                .await
                .expect("semaphore never closed");
            loop {
                let freed = self.kv_freed.notified();
                {
                    let mut used = self.kv_used.lock().expect("kv lock");
                    if *used + need <= self.cfg.kv_tokens {
                        *used += need;
                        break Admitted {
                            sim: self.clone(),
                            _slot: slot,
                            kv: need,
                        };
                    }
                }
                freed.await;
            }
        };
        tokio::time::sleep(self.prefill(req)).await;
        Ok(admitted)
    }

    /// Prefill time: the fixed part, then each prompt token, a cached one at the hit factor.
    fn prefill(&self, req: &Request) -> Duration {
        let cached = req
            .prefixes
            .iter()
            .find(|(hash, _)| self.cached(*hash))
            .map_or(0, |(_, n)| *n);
        self.metrics.prefix_queries.inc_by(req.prompt_tokens as u64);
        self.metrics.prefix_hits.inc_by(cached as u64);
        let fresh = req.prompt_tokens.saturating_sub(cached) as f64;
        let weighted = fresh + self.cfg.prefix_hit_factor * cached as f64;
        Duration::from_millis(self.cfg.ttft_ms)
            + Duration::from_secs_f64(weighted * self.cfg.prefill_ms_per_ktok / 1e6)
    }

    /// Whether the cache holds this conversation (and marks it used).
    fn cached(&self, hash: u64) -> bool {
        let mut lru = self.prefixes.lock().expect("prefix lock");
        let Some(i) = lru.iter().position(|h| *h == hash) else {
            return false;
        };
        lru.remove(i);
        lru.push_back(hash);
        true
    }

    /// Keeps a finished conversation's prefixes in the prefix cache, evicting the oldest.
    fn remember(&self, hashes: &[u64]) {
        if self.cfg.prefix_cache == 0 {
            return;
        }
        let mut lru = self.prefixes.lock().expect("prefix lock");
        lru.retain(|h| !hashes.contains(h));
        for hash in hashes {
            if lru.len() >= self.cfg.prefix_cache {
                lru.pop_front();
            }
            lru.push_back(*hash);
        }
    }

    /// Time to decode one token with the batch as it is now.
    fn token_interval(&self) -> Duration {
        let others = self.running.load(Ordering::Relaxed).saturating_sub(1) as f64;
        Duration::from_secs_f64(
            (1.0 + self.cfg.batch_slowdown * others) / self.cfg.tokens_per_second,
        )
    }

    fn chunk(&self, req: &Request, id: &str, index: u32, last: bool) -> Value {
        let text = format!("tok{index} ");
        let finish = if last { json!("length") } else { Value::Null };
        let choice = if req.chat {
            json!({"index": 0, "delta": {"content": text}, "finish_reason": finish})
        } else {
            json!({"index": 0, "text": text, "finish_reason": finish})
        };
        json!({
            "id": id,
            "object": if req.chat { "chat.completion.chunk" } else { "text_completion" },
            "created": unix_now(),
            "model": self.cfg.model,
            "system_fingerprint": self.cfg.name,
            "choices": [choice],
        })
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn error(status: StatusCode, message: &str) -> Response {
    (
        status,
        Json(json!({"error": {"message": message, "code": status.as_u16()}})),
    )
        .into_response()
}

fn with_instance(mut response: Response, name: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(name) {
        response
            .headers_mut()
            .insert(HeaderName::from_static(INSTANCE_HEADER), v);
    }
    response
}

async fn health() -> &'static str {
    "ok"
}

/// `--api-key`: a `/v1` request without the key gets vLLM's 401.
async fn require_key(
    State(sim): State<Arc<Sim>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(key) = &sim.cfg.api_key {
        let sent = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if sent != Some(format!("Bearer {key}").as_str()) {
            return (
                StatusCode::UNAUTHORIZED,
                Json(json!({"error": "Unauthorized"})),
            )
                .into_response();
        }
    }
    next.run(request).await
}

async fn models(State(sim): State<Arc<Sim>>) -> Json<Value> {
    let data = if sim.is_ready() {
        json!([{"id": sim.cfg.model, "object": "model", "owned_by": "gpulb-sim", "max_model_len": 4096}])
    } else {
        json!([])
    };
    Json(json!({"object": "list", "data": data}))
}

async fn metrics(State(sim): State<Arc<Sim>>) -> Response {
    let m = &sim.metrics;
    let running = sim.running.load(Ordering::Relaxed);
    m.running.set(running as i64);
    m.waiting.set(sim.waiting.load(Ordering::Relaxed) as i64);
    let kv = *sim.kv_used.lock().expect("kv lock");
    m.cache_usage
        .set(kv as f64 / sim.cfg.kv_tokens.max(1) as f64);
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&m.registry.gather(), &mut out)
        .expect("text encoding");
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

async fn chat(State(sim): State<Arc<Sim>>, body: Json<Value>) -> Response {
    complete(sim, body.0, true).await
}

async fn completions(State(sim): State<Arc<Sim>>, body: Json<Value>) -> Response {
    complete(sim, body.0, false).await
}

async fn complete(sim: Arc<Sim>, body: Value, chat: bool) -> Response {
    let name = sim.cfg.name.clone();
    with_instance(generate(sim, body, chat).await, &name)
}

async fn generate(sim: Arc<Sim>, body: Value, chat: bool) -> Response {
    if !sim.is_ready() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "model is loading");
    }
    if let Some(model) = body.get("model").and_then(Value::as_str)
        && model != sim.cfg.model
    {
        return error(
            StatusCode::NOT_FOUND,
            &format!("The model `{model}` does not exist."),
        );
    }
    let req = Request::parse(&body, chat, sim.cfg.default_max_tokens);
    let id = format!(
        "{}-{}-{}",
        if chat { "chatcmpl" } else { "cmpl" },
        sim.cfg.name,
        sim.next_id.fetch_add(1, Ordering::Relaxed)
    );

    if !req.stream {
        let _admitted = match sim.admit(&req).await {
            Ok(a) => a,
            Err(r) => return r,
        };
        let _running = Counted::new(&sim.running);
        for _ in 0..req.max_tokens {
            tokio::time::sleep(sim.token_interval()).await;
            sim.metrics.generated.inc();
        }
        let text = reply_text(req.max_tokens);
        sim.remember(&req.after);
        sim.metrics.succeeded.inc();
        let choice = if chat {
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"})
        } else {
            json!({"index": 0, "text": text, "finish_reason": "length"})
        };
        let prompt = req.prompt_tokens as u32;
        return Json(json!({
            "id": id,
            "object": if chat { "chat.completion" } else { "text_completion" },
            "created": unix_now(),
            "model": sim.cfg.model,
            "system_fingerprint": sim.cfg.name,
            "choices": [choice],
            "usage": {"prompt_tokens": prompt, "completion_tokens": req.max_tokens, "total_tokens": prompt + req.max_tokens},
        }))
        .into_response();
    }

    // Streaming: headers go out at once (as vLLM does); tokens follow as they are decoded.
    // When the client goes away the channel closes and the task frees its slot.
    let (tx, rx) = mpsc::channel::<Result<Event, std::convert::Infallible>>(4);
    tokio::spawn(async move {
        let _admitted = match sim.admit(&req).await {
            Ok(a) => a,
            Err(_) => {
                let _ = tx
                    .send(Ok(Event::default().data(r#"{"error":"queue full"}"#)))
                    .await;
                return;
            }
        };
        let _running = Counted::new(&sim.running);
        for i in 0..req.max_tokens {
            if i > 0 {
                tokio::time::sleep(sim.token_interval()).await;
            }
            let chunk = sim.chunk(&req, &id, i, i + 1 == req.max_tokens);
            if tx
                .send(Ok(Event::default().data(chunk.to_string())))
                .await
                .is_err()
            {
                return;
            }
            sim.metrics.generated.inc();
        }
        sim.remember(&req.after);
        if tx.send(Ok(Event::default().data("[DONE]"))).await.is_ok() {
            sim.metrics.succeeded.inc();
        }
    });
    Sse::new(ReceiverStream::new(rx)).into_response()
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    cfg: SimConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
    info!(listen = %cfg.listen, name = %cfg.name, slots = cfg.slots, "simulated GPU instance serving");
    let sim = Arc::new(Sim {
        slots: Arc::new(Semaphore::new(cfg.slots.max(1))),
        kv_used: Mutex::new(0),
        kv_freed: Notify::new(),
        prefixes: Mutex::new(VecDeque::new()),
        running: AtomicUsize::new(0),
        waiting: AtomicUsize::new(0),
        ready_at: Instant::now() + Duration::from_millis(cfg.load_delay_ms),
        next_id: AtomicU64::new(0),
        metrics: Metrics::new(),
        cfg,
    });
    let v1 = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route_layer(axum::middleware::from_fn_with_state(
            sim.clone(),
            require_key,
        ));
    let app = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .merge(v1)
        .with_state(sim);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(clap::Parser)]
    struct Args {
        #[command(flatten)]
        sim: SimConfig,
    }

    fn sim(args: &[&str]) -> Arc<Sim> {
        let cfg = Args::parse_from(std::iter::once("sim").chain(args.iter().copied())).sim;
        Arc::new(Sim {
            slots: Arc::new(Semaphore::new(cfg.slots)),
            kv_used: Mutex::new(0),
            kv_freed: Notify::new(),
            prefixes: Mutex::new(VecDeque::new()),
            running: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            ready_at: Instant::now(),
            next_id: AtomicU64::new(0),
            metrics: Metrics::new(),
            cfg,
        })
    }

    fn chat(messages: &[(&str, &str)], max_tokens: u32) -> Request {
        let messages: Vec<Value> = messages
            .iter()
            .map(|(r, c)| json!({"role": r, "content": c}))
            .collect();
        Request::parse(
            &json!({"messages": messages, "max_tokens": max_tokens}),
            true,
            16,
        )
    }

    #[test]
    fn a_conversation_served_here_before_prefills_faster_and_counts_as_a_hit() {
        let s = sim(&["--ttft-ms", "10", "--prefill-ms-per-ktok", "100"]);
        let question = "x".repeat(4000); // 1000 tokens
        let first = chat(&[("user", &question)], 4);
        assert_eq!(s.prefill(&first), Duration::from_millis(110));
        s.remember(&first.after);
        // The next turn: the first exchange, then a new question.
        let reply = reply_text(4);
        let second = chat(
            &[("user", &question), ("assistant", &reply), ("user", "and?")],
            4,
        );
        let cached = second.prefixes[0].1;
        assert_eq!(cached, 1000 + tokens(&reply));
        let got = s.prefill(&second).as_secs_f64() * 1000.0;
        let want = 10.0 + (1.0 + 0.1 * cached as f64) * 100.0 / 1000.0;
        assert!((got - want).abs() < 0.01, "{got} ms, want {want}");
        assert_eq!(s.metrics.prefix_hits.get(), cached as u64);
        assert_eq!(
            s.metrics.prefix_queries.get(),
            (1000 + second.prompt_tokens) as u64
        );
        // Another instance, or one that forgot it, pays the whole prefill.
        let other = sim(&[
            "--ttft-ms",
            "10",
            "--prefill-ms-per-ktok",
            "100",
            "--prefix-cache",
            "0",
        ]);
        other.remember(&first.after);
        assert!(other.prefill(&second) > Duration::from_millis(110));
        // One that served only the first question holds that much of the prefix.
        let partial = sim(&["--ttft-ms", "10", "--prefill-ms-per-ktok", "100"]);
        partial.remember(&first.after[..1]);
        let got = partial.prefill(&second).as_secs_f64() * 1000.0;
        let fresh = (second.prompt_tokens - 1000) as f64;
        let want = 10.0 + (fresh + 0.1 * 1000.0) * 100.0 / 1000.0;
        assert!(
            (got - want).abs() < 0.01,
            "a cached first message: {got} ms, want {want}"
        );
    }

    #[tokio::test]
    async fn a_full_kv_cache_holds_a_request_back_while_slots_are_free() {
        let s = sim(&["--slots", "4", "--kv-tokens", "1000", "--ttft-ms", "0"]);
        let long = chat(&[("user", &"x".repeat(2400))], 100); // 600 + 100 tokens
        let first = s.admit(&long).await.expect("fits");
        let second = tokio::spawn({
            let s = s.clone();
            async move { s.admit(&long).await.map(|a| a.kv) }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!second.is_finished(), "700 + 700 tokens exceed the cache");
        assert_eq!(s.waiting.load(Ordering::Relaxed), 1);
        drop(first);
        let kv = tokio::time::timeout(Duration::from_secs(1), second)
            .await
            .expect("admitted once the first left")
            .expect("task")
            .expect("admitted");
        assert_eq!(kv, 700);
    }
}
