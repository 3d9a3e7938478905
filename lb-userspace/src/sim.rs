//! The simulated GPU instance: an OpenAI-compatible server whose latency behaves like one
//! batched model process on one GPU. It has `slots` sequences in flight at most (the batch);
//! further requests wait in a queue. A request spends `ttft_ms` in prefill, then produces
//! tokens at `tokens_per_second`, slowed by `batch_slowdown` for each other running sequence
//! (decode steps get longer as the batch grows). `/metrics` reports what vLLM reports.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
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
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
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
}

struct Metrics {
    registry: Registry,
    running: IntGauge,
    waiting: IntGauge,
    cache_usage: prometheus::Gauge,
    generated: IntCounter,
    succeeded: IntCounter,
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
            "vllm:gpu_cache_usage_perc",
            "KV-cache usage, 1 = full (here: running / slots).",
        ))
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
        }
    }
}

struct Sim {
    cfg: SimConfig,
    slots: Arc<Semaphore>,
    running: AtomicUsize,
    waiting: AtomicUsize,
    ready_at: Instant,
    next_id: AtomicU64,
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

/// What a completion request asks for.
struct Request {
    chat: bool,
    stream: bool,
    max_tokens: u32,
}

impl Sim {
    fn is_ready(&self) -> bool {
        Instant::now() >= self.ready_at
    }

    /// Waits for a batch slot, then for prefill. The permit is the slot.
    async fn admit(self: &Arc<Self>) -> Result<OwnedSemaphorePermit, Response> {
        if self.waiting.load(Ordering::Relaxed) >= self.cfg.max_waiting {
            return Err(error(StatusCode::SERVICE_UNAVAILABLE, "queue full"));
        }
        let permit = {
            let _waiting = Counted::new(&self.waiting);
            self.slots
                .clone()
                .acquire_owned()
                .await
                .expect("semaphore never closed")
        };
        tokio::time::sleep(Duration::from_millis(self.cfg.ttft_ms)).await;
        Ok(permit)
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
    m.cache_usage.set(running as f64 / sim.cfg.slots as f64);
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
    let max_tokens = body
        .get("max_tokens")
        .and_then(Value::as_u64)
        .map_or(sim.cfg.default_max_tokens, |n| n.clamp(1, 4096) as u32);
    let req = Request {
        chat,
        stream: body.get("stream").and_then(Value::as_bool).unwrap_or(false),
        max_tokens,
    };
    let id = format!(
        "{}-{}-{}",
        if chat { "chatcmpl" } else { "cmpl" },
        sim.cfg.name,
        sim.next_id.fetch_add(1, Ordering::Relaxed)
    );

    if !req.stream {
        let _slot = match sim.admit().await {
            Ok(p) => p,
            Err(r) => return r,
        };
        let _running = Counted::new(&sim.running);
        let mut text = String::new();
        for i in 0..req.max_tokens {
            tokio::time::sleep(sim.token_interval()).await;
            text.push_str(&format!("tok{i} "));
            sim.metrics.generated.inc();
        }
        sim.metrics.succeeded.inc();
        let choice = if chat {
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"})
        } else {
            json!({"index": 0, "text": text, "finish_reason": "length"})
        };
        return Json(json!({
            "id": id,
            "object": if chat { "chat.completion" } else { "text_completion" },
            "created": unix_now(),
            "model": sim.cfg.model,
            "system_fingerprint": sim.cfg.name,
            "choices": [choice],
            "usage": {"prompt_tokens": 8, "completion_tokens": req.max_tokens, "total_tokens": 8 + req.max_tokens},
        }))
        .into_response();
    }

    // Streaming: headers go out at once (as vLLM does); tokens follow as they are decoded.
    // When the client goes away the channel closes and the task frees its slot.
    let (tx, rx) = mpsc::channel::<Result<Event, std::convert::Infallible>>(4);
    tokio::spawn(async move {
        let _slot = match sim.admit().await {
            Ok(p) => p,
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
        running: AtomicUsize::new(0),
        waiting: AtomicUsize::new(0),
        ready_at: Instant::now() + Duration::from_millis(cfg.load_delay_ms),
        next_id: AtomicU64::new(0),
        metrics: Metrics::new(),
        cfg,
    });
    let app = Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .with_state(sim);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
