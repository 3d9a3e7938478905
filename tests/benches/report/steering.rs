//! The steering section: gpulb's scheduler against nginx (round-robin and `least_conn`),
//! HAProxy (`balance leastconn`), client-side round-robin and a client-side oracle with
//! perfect knowledge, each on the same four simulated instances, scenario by scenario, in
//! one run. Writes a table per scenario, a summary with the targets, and a chart.

use std::{fmt::Write as _, net::Ipv4Addr, time::Duration};

use gpulb_testbed::{
    Extra, Instance, LB_ADDR, NetNs, Outcome, Pattern, PinDir, Route, Stack, VIP, VIP_PORT, get,
    metric, run_workload, sim_port,
};

use super::{
    Opts, Report,
    charts::grouped_bars,
    tools::{haproxy, nginx_with},
};

const NGINX_RR: u16 = 8080;
const NGINX_LC: u16 = 8081;
const HAPROXY: u16 = 8082;
/// Sessions come from their own addresses: 198.18.0.100 and up, in the client namespace.
const SESSION_SOURCES: u8 = 50;
/// Each comparator's requests come from an address of its own, 198.18.0.20 and up: the
/// connections of one leave no TIME_WAIT that the next one's could run into at an instance.
const COMPARATOR_SOURCES: u8 = 20;

/// One simulated instance of a scenario.
#[derive(Clone, Copy)]
struct Sim {
    args: &'static [&'static str],
    weight: u32,
    slots: u32,
}

const DEFAULT: Sim = Sim {
    args: &[],
    weight: 1,
    slots: 4,
};

struct Scenario {
    name: &'static str,
    tag: &'static str,
    sims: [Sim; 4],
    pattern: Pattern,
    tokens: u32,
    /// Multi-turn sessions: also a sticky reference, and the prefix-cache hit rate.
    sessions: bool,
}

/// One comparator's run of a scenario.
struct Row {
    name: &'static str,
    out: Outcome,
    /// Prefix-cache hits over queried prompt tokens, all instances together.
    hit_rate: f64,
}

pub fn steering(opts: &Opts, report: &mut Report) {
    let scale = |n: usize| if opts.quick { n / 2 } else { n };
    let secs = |s: u64| Duration::from_secs(if opts.quick { s / 2 } else { s });
    // Equal instances: 4 slots, 40 ms prefill, 200 tokens/s per sequence, 5% slower per
    // other sequence in the batch. At a full batch a 32-token request takes about
    // 40 + 32 × 1.15 / 200 s = 224 ms, so four instances serve about 71 requests/s.
    let capacity = 16.0 / (0.040 + 32.0 * 1.15 / 200.0);
    let poisson = |load: f64| Pattern::Poisson {
        rate: capacity * load,
        duration: secs(20),
        burst: 8,
        burst_every: Duration::from_secs(2),
    };
    let slow = Sim {
        args: &["--slots", "1", "--tokens-per-second", "50"],
        weight: 1,
        slots: 1,
    };
    let half = Sim {
        args: &["--tokens-per-second", "100", "--ttft-ms", "80"],
        weight: 1,
        slots: 4,
    };
    let fast = Sim {
        weight: 2,
        ..DEFAULT
    };
    // Sessions: prompts that grow by about 160 tokens a turn, and a prefill that costs 200 ms
    // per thousand tokens the prefix cache does not hold.
    let prefix: &'static [&'static str] = &["--prefill-ms-per-ktok", "200"];
    let with_prefix = || Sim {
        args: prefix,
        ..DEFAULT
    };
    let scenarios = [
        Scenario {
            name: "1. 4 equal instances, a new connection per request",
            tag: "eq",
            sims: [DEFAULT, DEFAULT, DEFAULT, DEFAULT],
            pattern: Pattern::Closed {
                requests: scale(320),
                concurrency: 16,
            },
            tokens: 32,
            sessions: false,
        },
        Scenario {
            name: "2. 4 equal instances, 16 pooled keep-alive connections",
            tag: "pool",
            sims: [DEFAULT, DEFAULT, DEFAULT, DEFAULT],
            pattern: Pattern::Pooled {
                requests: scale(320),
                connections: 16,
            },
            tokens: 32,
            sessions: false,
        },
        Scenario {
            name: "3a. 3 normal + 1 slow instance (1 slot, 50 tokens/s), 12 streams (the fleet has 13 slots)",
            tag: "slow12",
            sims: [DEFAULT, DEFAULT, DEFAULT, slow],
            pattern: Pattern::Closed {
                requests: scale(320),
                concurrency: 12,
            },
            tokens: 24,
            sessions: false,
        },
        Scenario {
            name: "3b. the same, 16 streams (more than the slots: some must wait)",
            tag: "slow16",
            sims: [DEFAULT, DEFAULT, DEFAULT, slow],
            pattern: Pattern::Closed {
                requests: scale(320),
                concurrency: 16,
            },
            tokens: 24,
            sessions: false,
        },
        Scenario {
            name: "4. 2 fast + 2 half-speed instances, weights 2:1",
            tag: "mixed",
            sims: [
                fast,
                Sim {
                    weight: 2,
                    ..DEFAULT
                },
                half,
                Sim { ..half },
            ],
            pattern: Pattern::Closed {
                requests: scale(320),
                concurrency: 16,
            },
            tokens: 32,
            sessions: false,
        },
        Scenario {
            name: "5a. open loop, Poisson at 70% of capacity, bursts of 8 every 2 s",
            tag: "p70",
            sims: [DEFAULT, DEFAULT, DEFAULT, DEFAULT],
            pattern: poisson(0.70),
            tokens: 32,
            sessions: false,
        },
        Scenario {
            name: "5b. open loop, Poisson at 95% of capacity, bursts of 8 every 2 s",
            tag: "p95",
            sims: [DEFAULT, DEFAULT, DEFAULT, DEFAULT],
            pattern: poisson(0.95),
            tokens: 32,
            sessions: false,
        },
        Scenario {
            name: "6. multi-turn sessions: 50 conversations × 6 turns, 12 at a time, each from its own address",
            tag: "sess",
            sims: [with_prefix(), with_prefix(), with_prefix(), with_prefix()],
            pattern: Pattern::Sessions {
                sessions: 50,
                turns: if opts.quick { 3 } else { 6 },
                concurrency: 12,
                words: 80,
                sources: (0..SESSION_SOURCES)
                    .map(|i| Ipv4Addr::new(198, 18, 0, 100 + i))
                    .collect(),
            },
            tokens: 24,
            sessions: true,
        },
    ];

    let mut md = String::from(
        "Each scenario runs against the same 4 simulated instances for every comparator, in \
         this run: gpulb (default config; the instances' batch slots and weights as below, \
         engine numbers read every 50 ms); nginx round-robin (the seed deployment) and \
         `least_conn`; HAProxy `balance leastconn` (HTTP mode); *client RR* spreads requests \
         round-robin from the client; the *oracle* sends each request to the instance with \
         the fewest outstanding requests per batch slot, knowing them exactly. Streaming \
         chats; TTFT in ms; failed = errors, cut or short streams.\n",
    );
    let mut summary = String::from(
        "\n### Summary\n\nTargets: gpulb's TTFT p95 ≤ the best of nginx and HAProxy, and ≤ 1.15 × \
         the oracle's; 0 failed; with sessions, a prefix-cache hit rate ≥ 90% of strict \
         per-session stickiness.\n\n\
         | scenario | gpulb p95 | best nginx/HAProxy p95 | oracle p95 | gpulb / best | gpulb / oracle | failed | targets |\n\
         |---|---:|---:|---:|---:|---:|---:|---|\n",
    );
    // GPULB_BENCH_SCENARIOS=p70,p95 runs only those (by tag), for development.
    let only: Option<Vec<String>> = std::env::var("GPULB_BENCH_SCENARIOS")
        .ok()
        .map(|v| v.split(',').map(str::to_owned).collect());
    let mut groups = Vec::new();
    let names = [
        "gpulb",
        "nginx RR",
        "nginx least_conn",
        "HAProxy leastconn",
        "client RR",
    ];
    let mut chart: Vec<(String, Vec<f64>)> =
        names.iter().map(|n| (n.to_string(), Vec::new())).collect();
    for sc in scenarios
        .iter()
        .filter(|sc| only.as_ref().is_none_or(|o| o.iter().any(|t| t == sc.tag)))
    {
        eprintln!("[bench] steering: {}", sc.name);
        let rows = run_scenario(sc);
        let _ = write!(md, "\n### {}\n\n", sc.name);
        md.push_str(&table(&rows, sc.sessions));
        let p95 = |name: &str| {
            rows.iter()
                .find(|r| r.name == name)
                .map_or(f64::NAN, |r| r.out.ttft(0.95))
        };
        let (gpulb, oracle) = (p95("gpulb"), p95("oracle"));
        let best = ["nginx RR", "nginx least_conn", "HAProxy leastconn"]
            .iter()
            .map(|n| p95(n))
            .fold(f64::INFINITY, f64::min);
        let failed = rows
            .iter()
            .find(|r| r.name == "gpulb")
            .map_or(0, |r| r.out.failed);
        let mut misses = Vec::new();
        if gpulb > best {
            misses.push(format!(
                "{:.0}% over the best balancer",
                (gpulb / best - 1.0) * 100.0
            ));
        }
        if gpulb > 1.15 * oracle {
            misses.push(format!("{:.2}× the oracle", gpulb / oracle));
        }
        if failed > 0 {
            misses.push(format!("{failed} failed"));
        }
        if sc.sessions {
            let hit = |name: &str| {
                rows.iter()
                    .find(|r| r.name == name)
                    .map_or(0.0, |r| r.hit_rate)
            };
            let (g, s) = (hit("gpulb"), hit("sticky"));
            if g < 0.9 * s {
                misses.push(format!("hit rate {:.0}% of sticky's", g / s * 100.0));
            }
        }
        let _ = writeln!(
            summary,
            "| {} | {gpulb:.1} | {best:.1} | {oracle:.1} | {:.2} | {:.2} | {failed} | {} |",
            sc.tag,
            gpulb / best,
            gpulb / oracle,
            if misses.is_empty() {
                "met".to_owned()
            } else {
                format!("missed: {}", misses.join(", "))
            }
        );
        groups.push(sc.tag.to_owned());
        for (name, values) in &mut chart {
            values.push(p95(name) / oracle);
        }
    }
    grouped_bars(
        &opts.out.join("steering.svg"),
        "TTFT p95 relative to the oracle (lower is better)",
        &groups,
        &chart,
    );
    md.push_str(&summary);
    md.push_str("\n![TTFT p95 / oracle](steering.svg)\n");
    report.section(
        "steering: the scheduler against nginx, HAProxy and an oracle",
        &md,
    );
}

fn run_scenario(sc: &Scenario) -> Vec<Row> {
    let backends: Vec<String> = sc
        .sims
        .iter()
        .map(|s| {
            format!(
                "weight = {}\nslots = {}\nload = \"vllm\"\n",
                s.weight, s.slots
            )
        })
        .collect();
    let instances: Vec<Instance<'_>> = sc
        .sims
        .iter()
        .zip(&backends)
        .map(|(s, b)| Instance {
            args: s.args,
            backend: b,
        })
        .collect();
    let tag = format!("st{}", sc.tag);
    let stack = Stack::start_instances(&tag, &instances, PinDir::new(&tag), Extra::default())
        .expect("stack");
    let sources = (0..8)
        .map(|k| COMPARATOR_SOURCES + k)
        .chain(if sc.sessions {
            100..100 + SESSION_SOURCES
        } else {
            0..0
        });
    for last in sources {
        stack
            .topo
            .client
            .ip(&[
                "addr",
                "add",
                &format!("198.18.0.{last}/24"),
                "dev",
                &stack.topo.client_if,
            ])
            .expect("source address");
    }
    let servers: Vec<(u16, u32)> = sc
        .sims
        .iter()
        .enumerate()
        .map(|(i, s)| (sim_port(i), s.weight))
        .collect();
    let (lb, dir) = (&stack.topo.lb, &stack.dir.path);
    let _nginx_rr = nginx_with(lb, dir, "nginx-rr", NGINX_RR, &servers, false);
    let _nginx_lc = nginx_with(lb, dir, "nginx-lc", NGINX_LC, &servers, true);
    let _haproxy = haproxy(lb, dir, HAPROXY, &servers);
    let url = |port: u16| format!("http://{LB_ADDR}:{port}");
    let direct: Vec<String> = (0..sc.sims.len()).map(|i| url(sim_port(i))).collect();
    let oracle: Vec<(String, usize)> = direct
        .iter()
        .zip(&sc.sims)
        .map(|(u, s)| (u.clone(), s.slots as usize))
        .collect();
    let mut routes: Vec<(&'static str, Route)> = vec![
        ("gpulb", Route::Via(format!("http://{VIP}:{VIP_PORT}"))),
        ("nginx RR", Route::Via(url(NGINX_RR))),
        ("nginx least_conn", Route::Via(url(NGINX_LC))),
        ("HAProxy leastconn", Route::Via(url(HAPROXY))),
        ("client RR", Route::RoundRobin(direct.clone())),
        ("oracle", Route::Oracle(oracle)),
    ];
    if sc.sessions {
        routes.push(("sticky", Route::Sticky(direct)));
    }
    let mut rows = Vec::new();
    for (k, (name, route)) in routes.into_iter().enumerate() {
        let before = prefix_counters(lb, sc.sims.len());
        let out = run_workload(
            &stack.topo.client,
            route,
            sc.pattern.clone(),
            sc.tokens,
            &format!("{}-{k}", sc.tag),
            Some(Ipv4Addr::new(198, 18, 0, COMPARATOR_SOURCES + k as u8)),
        )
        .expect("workload");
        let after = prefix_counters(lb, sc.sims.len());
        let queries = after.1 - before.1;
        rows.push(Row {
            name,
            out,
            hit_rate: if queries > 0.0 {
                (after.0 - before.0) / queries
            } else {
                0.0
            },
        });
    }
    rows
}

/// Prefix-cache hit and queried tokens, summed over the instances.
fn prefix_counters(lb: &NetNs, instances: usize) -> (f64, f64) {
    (0..instances)
        .map(|i| {
            let (_, text) = get(lb, &format!("http://{LB_ADDR}:{}/metrics", sim_port(i)))
                .expect("instance metrics");
            (
                metric(&text, "vllm:prefix_cache_hits_total", &[]).unwrap_or(0.0),
                metric(&text, "vllm:prefix_cache_queries_total", &[]).unwrap_or(0.0),
            )
        })
        .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1))
}

fn table(rows: &[Row], sessions: bool) -> String {
    let mut t = String::from(if sessions {
        "| comparator | TTFT p50 | TTFT p95 | TTFT p99 | req/s | failed | prefix-cache hits | requests per instance |\n\
         |---|---:|---:|---:|---:|---:|---:|---|\n"
    } else {
        "| comparator | TTFT p50 | TTFT p95 | TTFT p99 | req/s | failed | requests per instance |\n\
         |---|---:|---:|---:|---:|---:|---|\n"
    });
    for r in rows {
        let split: Vec<String> = r
            .out
            .per_instance
            .values()
            .map(ToString::to_string)
            .collect();
        let rate = r.out.ttft_ms.len() as f64 / r.out.wall.as_secs_f64();
        let hits = if sessions {
            format!(" {:.0}% |", r.hit_rate * 100.0)
        } else {
            String::new()
        };
        let _ = writeln!(
            t,
            "| {} | {:.1} | {:.1} | {:.1} | {rate:.1} | {} |{hits} {} |",
            r.name,
            r.out.ttft(0.5),
            r.out.ttft(0.95),
            r.out.ttft(0.99),
            r.out.failed,
            split.join(" / ")
        );
    }
    t
}
