//! Workloads for the steering benchmark: how requests reach the instances (through a
//! balancer, or routed by the client itself), how they arrive (closed loop, a pooled
//! client's kept-alive connections, open-loop Poisson with bursts, multi-turn sessions from
//! their own addresses), and what each got. Every loop is bounded in count and time.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::StreamExt as _;

use crate::{NetNs, Reply, chat_with, percentile};

/// How a request finds an instance.
#[derive(Debug, Clone)]
pub enum Route {
    /// Through one address: a balancer (its base URL, `http://host:port`).
    Via(String),
    /// The client spreads requests round-robin over the instances' base URLs.
    RoundRobin(Vec<String>),
    /// The client sends each request to the instance with the fewest outstanding requests
    /// per batch slot, knowing them exactly: the best any balancer can do. (URL, slots).
    Oracle(Vec<(String, usize)>),
    /// Every request of a session to the same instance (a session's index modulo the
    /// instances): what strict per-session stickiness gets from the prefix cache.
    Sticky(Vec<String>),
}

/// How requests arrive.
#[derive(Debug, Clone)]
pub enum Pattern {
    /// `requests` in all, `concurrency` at a time, a new connection each.
    Closed { requests: usize, concurrency: usize },
    /// `requests` over `connections` kept-alive connections, as an SDK's pooled client.
    Pooled { requests: usize, connections: usize },
    /// Open loop: Poisson arrivals at `rate` per second for `duration`, plus `burst` at
    /// once every `burst_every`; a new connection each.
    Poisson {
        rate: f64,
        duration: Duration,
        burst: usize,
        burst_every: Duration,
    },
    /// `sessions` conversations of `turns` turns, `concurrency` at a time, each from its
    /// own source address (round the `sources`); each turn is a new connection carrying the
    /// conversation so far (a user message of `words` words per turn, and the replies).
    Sessions {
        sessions: usize,
        turns: usize,
        concurrency: usize,
        words: usize,
        sources: Vec<Ipv4Addr>,
    },
}

/// What one workload got.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Time to first token of each request that completed, in milliseconds.
    pub ttft_ms: Vec<f64>,
    pub requests: usize,
    /// Errors, cut streams, short replies.
    pub failed: usize,
    pub wall: Duration,
    /// Completed requests per instance (`x-sim-instance`).
    pub per_instance: BTreeMap<String, usize>,
}

impl Outcome {
    pub fn ttft(&self, p: f64) -> f64 {
        percentile(self.ttft_ms.clone(), p)
    }

    fn add(&mut self, result: anyhow::Result<Reply>, max_tokens: u32) {
        self.requests += 1;
        match result {
            Ok(r) if r.done && r.tokens == max_tokens as usize => {
                self.ttft_ms
                    .push(r.time_to_first_token.as_secs_f64() * 1000.0);
                *self.per_instance.entry(r.instance).or_insert(0) += 1;
            }
            _ => self.failed += 1,
        }
    }
}

/// Picks instances for a route; the oracle's outstanding counts live here.
struct Router {
    route: Route,
    next: AtomicUsize,
    outstanding: Vec<AtomicUsize>,
}

impl Router {
    fn new(route: Route) -> Arc<Self> {
        let n = match &route {
            Route::Oracle(u) => u.len(),
            _ => 0,
        };
        Arc::new(Self {
            route,
            next: AtomicUsize::new(0),
            outstanding: (0..n).map(|_| AtomicUsize::new(0)).collect(),
        })
    }

    /// The base URL for a request of `session`, and the oracle's slot to release after.
    fn pick(&self, session: usize) -> (String, Option<usize>) {
        match &self.route {
            Route::Via(url) => (url.clone(), None),
            Route::RoundRobin(urls) => {
                let i = self.next.fetch_add(1, Ordering::Relaxed) % urls.len();
                (urls[i].clone(), None)
            }
            Route::Sticky(urls) => (urls[session % urls.len()].clone(), None),
            Route::Oracle(urls) => {
                // Ties rotate, so equal instances share them.
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                let n = urls.len();
                let i = (0..n)
                    .map(|k| (start + k) % n)
                    .min_by_key(|&i| {
                        self.outstanding[i].load(Ordering::Relaxed) * 1000 / urls[i].1.max(1)
                    })
                    .expect("instances");
                self.outstanding[i].fetch_add(1, Ordering::Relaxed);
                (urls[i].0.clone(), Some(i))
            }
        }
    }

    fn done(&self, slot: Option<usize>) {
        if let Some(i) = slot {
            self.outstanding[i].fetch_sub(1, Ordering::Relaxed);
        }
    }
}

const PATH: &str = "/v1/chat/completions";
/// No request may take longer than this; the whole workload is bounded by its count.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

fn client(pool: usize, source: Option<Ipv4Addr>) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .pool_max_idle_per_host(pool)
        .local_address(source.map(IpAddr::V4))
        .no_proxy()
        .build()
        .expect("a reqwest client without TLS or proxy builds")
}

/// One request through `router`, with `messages`.
async fn one(
    router: &Router,
    client: &reqwest::Client,
    session: usize,
    messages: &serde_json::Value,
    max_tokens: u32,
) -> anyhow::Result<Reply> {
    let (base, slot) = router.pick(session);
    let reply = chat_with(client, &format!("{base}{PATH}"), messages, true, max_tokens).await;
    router.done(slot);
    reply
}

fn hello(tag: &str, i: usize) -> serde_json::Value {
    serde_json::json!([{"role": "user", "content": format!("{tag} request {i}: say hello.")}])
}

/// Runs a workload from inside `ns`; `tag` makes its prompts its own (no prefix shared with
/// another workload's).
/// `source`: the address the requests come from (the route's default when `None`; sessions
/// use their own).
pub fn run_workload(
    ns: &NetNs,
    route: Route,
    pattern: Pattern,
    max_tokens: u32,
    tag: &str,
    source: Option<Ipv4Addr>,
) -> anyhow::Result<Outcome> {
    let tag = tag.to_owned();
    ns.block_on(async move {
        let router = Router::new(route);
        let start = Instant::now();
        let mut out = Outcome::default();
        match pattern {
            Pattern::Closed {
                requests,
                concurrency,
            } => {
                let c = client(0, source);
                let results = futures_util::stream::iter(0..requests)
                    .map(|i| {
                        let (router, c, tag) = (&router, &c, &tag);
                        async move { one(router, c, i, &hello(tag, i), max_tokens).await }
                    })
                    .buffer_unordered(concurrency.max(1))
                    .collect::<Vec<_>>()
                    .await;
                for r in results {
                    out.add(r, max_tokens);
                }
            }
            Pattern::Pooled {
                requests,
                connections,
            } => {
                let c = client(connections, source);
                let left = AtomicUsize::new(requests);
                let workers = (0..connections).map(|_| {
                    let (router, c, tag, left) = (&router, &c, &tag, &left);
                    async move {
                        let mut mine = Vec::new();
                        while let Ok(i) =
                            left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                                n.checked_sub(1)
                            })
                        {
                            mine.push(one(router, c, i, &hello(tag, i), max_tokens).await);
                        }
                        mine
                    }
                });
                for r in futures_util::future::join_all(workers)
                    .await
                    .into_iter()
                    .flatten()
                {
                    out.add(r, max_tokens);
                }
            }
            Pattern::Poisson {
                rate,
                duration,
                burst,
                burst_every,
            } => {
                let c = client(0, source);
                let arrivals = poisson_arrivals(rate, duration, burst, burst_every);
                let tasks = arrivals.into_iter().enumerate().map(|(i, at)| {
                    let (router, c, tag) = (&router, &c, &tag);
                    async move {
                        tokio::time::sleep_until((start + at).into()).await;
                        one(router, c, i, &hello(tag, i), max_tokens).await
                    }
                });
                for r in futures_util::future::join_all(tasks).await {
                    out.add(r, max_tokens);
                }
            }
            Pattern::Sessions {
                sessions,
                turns,
                concurrency,
                words,
                sources,
            } => {
                let results = futures_util::stream::iter(0..sessions)
                    .map(|s| {
                        let (router, tag) = (&router, &tag);
                        let source = sources.get(s % sources.len().max(1)).copied();
                        async move {
                            let c = client(0, source);
                            let mut messages = Vec::new();
                            let mut got = Vec::new();
                            for t in 0..turns {
                                let filler = vec!["context"; words].join(" ");
                                messages.push(serde_json::json!({"role": "user",
                                    "content": format!("{tag} session {s} turn {t}: {filler}")}));
                                let r = one(
                                    router,
                                    &c,
                                    s,
                                    &serde_json::Value::Array(messages.clone()),
                                    max_tokens,
                                )
                                .await;
                                match &r {
                                    Ok(reply) => messages.push(serde_json::json!(
                                        {"role": "assistant", "content": reply.text})),
                                    Err(_) => {
                                        got.push(r);
                                        break;
                                    }
                                }
                                got.push(r);
                            }
                            got
                        }
                    })
                    .buffer_unordered(concurrency.max(1))
                    .collect::<Vec<_>>()
                    .await;
                for r in results.into_iter().flatten() {
                    out.add(r, max_tokens);
                }
            }
        }
        out.wall = start.elapsed();
        Ok(out)
    })
}

/// Arrival times from the start: exponential gaps at `rate`, and `burst` more at once every
/// `burst_every`, within `duration`. A fixed seed: every comparator gets the same arrivals.
pub fn poisson_arrivals(
    rate: f64,
    duration: Duration,
    burst: usize,
    burst_every: Duration,
) -> Vec<Duration> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut uniform = move || {
        // xorshift64*: enough for arrival times.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut out = Vec::new();
    let mut t = 0.0;
    loop {
        t += -(1.0 - uniform()).ln() / rate;
        if t >= duration.as_secs_f64() {
            break;
        }
        out.push(Duration::from_secs_f64(t));
    }
    if burst > 0 && !burst_every.is_zero() {
        let mut b = burst_every;
        while b < duration {
            out.extend(std::iter::repeat_n(b, burst));
            b += burst_every;
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poisson_arrivals_keep_their_rate_and_bursts() {
        let a = poisson_arrivals(100.0, Duration::from_secs(20), 5, Duration::from_secs(2));
        let bursts = 9 * 5;
        let poisson = a.len() - bursts;
        assert!(
            (1800..2200).contains(&poisson),
            "{poisson} arrivals at 100/s for 20 s"
        );
        assert!(a.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(
            a,
            poisson_arrivals(100.0, Duration::from_secs(20), 5, Duration::from_secs(2))
        );
    }

    #[test]
    fn the_oracle_sends_to_the_fewest_outstanding_per_slot() {
        let r = Router::new(Route::Oracle(vec![("a".into(), 4), ("b".into(), 1)]));
        let picks: Vec<String> = (0..5).map(|_| r.pick(0).0).collect();
        // a takes 4 (0/4..3/4 of its slots) before b's 1/1 is the lowest... b's first at 0.
        assert_eq!(picks.iter().filter(|p| *p == "b").count(), 1, "{picks:?}");
        assert_eq!(picks.iter().filter(|p| *p == "a").count(), 4, "{picks:?}");
    }
}
