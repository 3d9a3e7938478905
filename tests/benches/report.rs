//! `cargo xtask bench`: the end-to-end report. Every case runs in this bench's own network
//! namespaces against simulated GPU instances, in one run, so the figures compare: direct
//! access vs gpulb vs nginx (Debian's, configured as the reference deployment), 1 vs 4
//! instances, failover, and the control plane's costs. Writes `report.md` and SVG charts
//! to `GPULB_BENCH_OUT` (target/bench). `GPULB_BENCH_QUICK=1` shortens every case.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    path::PathBuf,
    thread,
    time::{Duration, Instant, SystemTime},
};

use gpulb::maps::Maps;
use gpulb_testbed::{
    LB_ADDR, Load, MODEL, NetNs, PinDir, Reply, Stack, chat, percentile, sim_port, vip_url,
};

#[path = "report/charts.rs"]
mod charts;
#[path = "report/control.rs"]
mod control;
#[path = "report/datapath.rs"]
mod datapath;
#[path = "report/steering.rs"]
mod steering;
#[path = "report/tools.rs"]
mod tools;

use charts::{bar_chart, line_chart};
use control::control_plane;
use datapath::datapath;
use tools::{nginx, sh_err, sh_out};

const NGINX_PORT: u16 = 8080;
/// HAProxy in `mode tcp` in the http case.
const HAPROXY_TCP_PORT: u16 = 8090;
const BACKENDS: usize = 4;

struct Opts {
    quick: bool,
    out: PathBuf,
}

/// A section of the report: its markdown.
#[derive(Default)]
struct Report {
    md: String,
}

impl Report {
    fn section(&mut self, title: &str, text: &str) {
        let _ = write!(self.md, "\n## {title}\n\n{text}\n");
    }
}

fn main() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the bench creates namespaces and loads BPF: run as root"
    );
    let opts = Opts {
        quick: std::env::var("GPULB_BENCH_QUICK").is_ok_and(|v| v == "1"),
        out: std::env::var("GPULB_BENCH_OUT")
            .map(PathBuf::from)
            .unwrap_or_else(|_| PathBuf::from("target/bench")),
    };
    fs::create_dir_all(&opts.out).expect("output directory");
    let started = Instant::now();
    let mut report = Report::default();
    let _ = writeln!(report.md, "# gpulb benchmark report\n\n{}", machine());
    if opts.quick {
        report
            .md
            .push_str("\n**Quick run** (`--quick`): shorter cases, fewer points.\n");
    }

    // One section alone (`cargo xtask bench steering | failover | http`), or everything.
    let only = std::env::var("GPULB_BENCH_ONLY").ok();
    let all = only.is_none();
    if all {
        datapath(&mut report);
    }
    if all || only.as_deref() == Some("failover") {
        eprintln!("[bench] control plane");
        control_plane(&opts, &mut report);
    }
    if all || only.as_deref() == Some("http") {
        eprintln!("[bench] http, streaming, saturation");
        traffic(&opts, &mut report);
    }
    if all || only.as_deref() == Some("failover") {
        eprintln!("[bench] failover");
        failover(&opts, &mut report);
    }
    if all || only.as_deref() == Some("steering") {
        eprintln!("[bench] steering");
        steering::steering(&opts, &mut report);
    }

    let _ = write!(
        report.md,
        "\n---\nWhole run: {:.0} s. Reproduce: `cargo xtask bench{}{}`.\n",
        started.elapsed().as_secs_f64(),
        if opts.quick { " --quick" } else { "" },
        only.as_deref().map(|o| format!(" {o}")).unwrap_or_default()
    );
    let path = opts.out.join(match &only {
        Some(o) => format!("{o}.md"),
        None => "report.md".to_owned(),
    });
    fs::write(&path, &report.md).expect("write report");
    println!("{}", report.md);
    eprintln!("[bench] wrote {}", path.display());
}

fn machine() -> String {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = thread::available_parallelism().map_or(0, |n| n.get());
    let mem = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024 / 1024);
    let uts = nix::sys::utsname::uname().expect("uname");
    let date = sh_out("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    format!(
        "| | |\n|---|---|\n| date | {} |\n| machine | {cpu}, {cores} cores, {mem} GiB |\n| kernel | {} {} |\n| nginx | {} |\n| HAProxy | {} |\n| load generator | {} (http), gpulb-testbed's Rust client (streaming) |\n",
        date.trim(),
        uts.sysname().to_string_lossy(),
        uts.release().to_string_lossy(),
        sh_err("nginx", &["-v"])
            .trim()
            .trim_start_matches("nginx version: "),
        tools::haproxy_version(),
        sh_out("wrk", &["--version"])
            .lines()
            .next()
            .unwrap_or("wrk")
            .split(" [")
            .next()
            .unwrap_or("wrk")
            .trim(),
    )
}

/// Streaming chats from the client namespace, `concurrency` at a time, cycling `urls`.
fn chats(
    ns: &NetNs,
    urls: &[String],
    count: usize,
    concurrency: usize,
    max_tokens: u32,
) -> (Vec<anyhow::Result<Reply>>, Duration) {
    let urls = urls.to_vec();
    ns.block_on(async move {
        use futures_util::StreamExt as _;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .pool_max_idle_per_host(0)
            .build()?;
        let start = Instant::now();
        let replies = futures_util::stream::iter(0..count)
            .map(|i| {
                let (client, url) = (client.clone(), urls[i % urls.len()].clone());
                async move { chat(&client, &url, true, max_tokens).await }
            })
            .buffer_unordered(concurrency)
            .collect::<Vec<_>>()
            .await;
        Ok((replies, start.elapsed()))
    })
    .expect("chats")
}

struct Streamed {
    ttft_p50: f64,
    ttft_p95: f64,
    total_p95: f64,
    tokens_per_s: f64,
    requests_per_s: f64,
    failed: usize,
}

fn summarize(replies: &[anyhow::Result<Reply>], wall: Duration, max_tokens: u32) -> Streamed {
    let ok: Vec<&Reply> = replies
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .filter(|r| r.done && r.tokens == max_tokens as usize)
        .collect();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let ttft: Vec<f64> = ok.iter().map(|r| ms(r.time_to_first_token)).collect();
    Streamed {
        ttft_p50: percentile(ttft.clone(), 0.5),
        ttft_p95: percentile(ttft, 0.95),
        total_p95: percentile(ok.iter().map(|r| ms(r.total)).collect(), 0.95),
        tokens_per_s: ok.iter().map(|r| r.tokens).sum::<usize>() as f64 / wall.as_secs_f64(),
        requests_per_s: ok.len() as f64 / wall.as_secs_f64(),
        failed: replies.len() - ok.len(),
    }
}

/// http, streaming and saturation on one stack: 4 instances, gpulb, and nginx beside it.
fn traffic(opts: &Opts, report: &mut Report) {
    let stack = Stack::start("bench", BACKENDS, PinDir::new("bench"), &[]).expect("stack");
    let ports: Vec<u16> = (0..BACKENDS).map(sim_port).collect();
    let _nginx = nginx(&stack.topo.lb, &stack.dir.path, &ports);
    let weighted: Vec<(u16, u32)> = ports.iter().map(|p| (*p, 1)).collect();
    let _haproxy = tools::haproxy_tcp(&stack.topo.lb, &stack.dir.path, HAPROXY_TCP_PORT, &weighted);
    let client = &stack.topo.client;
    let direct = |path: &str, i: usize| format!("http://{LB_ADDR}:{}{path}", sim_port(i));
    let via_nginx = |path: &str| format!("http://{LB_ADDR}:{NGINX_PORT}{path}");

    // http: short requests (GET /v1/models), 32 keep-alive connections, the paths taking
    // turns so that drift on a shared machine falls on all of them alike.
    let (secs, rounds) = if opts.quick { (3, 1) } else { (5, 5) };
    let clients = tools::WRK_CLIENTS;
    let mut t = format!(
        "Short requests (`GET /v1/models`) from the client namespace: {clients} wrk clients at \
         once (one process, thread and keep-alive connection each), {secs} s a run, the paths \
         taking turns for {rounds} rounds (odd rounds in reverse order); each path's median round (p50 the clients' median, \
         p99 the worst client's). *direct* is client-side round-robin over the same 4 \
         instances (client k on instance k mod 4); *HAProxy (tcp)* is HAProxy in `mode tcp`, \
         `leastconn`.\n\n\
         | path | requests/s | p50 | p99 | errors (all rounds) |\n|---|---:|---:|---:|---:|\n"
    );
    let direct_urls: Vec<String> = (0..BACKENDS).map(|i| direct("/v1/models", i)).collect();
    let paths: [(&str, Vec<String>); 4] = [
        ("direct", direct_urls),
        ("gpulb", vec![vip_url("/v1/models")]),
        ("nginx", vec![via_nginx("/v1/models")]),
        (
            "HAProxy (tcp)",
            vec![format!("http://{LB_ADDR}:{HAPROXY_TCP_PORT}/v1/models")],
        ),
    ];
    // Odd rounds run the paths in reverse (ABBA), so no path always follows the same one.
    let runs: Vec<Vec<tools::Wrk>> = (0..rounds)
        .map(|round| {
            let mut order: Vec<usize> = (0..paths.len()).collect();
            if round % 2 == 1 {
                order.reverse();
            }
            let mut got = vec![None; paths.len()];
            for p in order {
                got[p] = Some(tools::wrk_clients(client, &paths[p].1, secs));
            }
            got.into_iter()
                .map(|w| w.expect("every path ran"))
                .collect()
        })
        .collect();
    let mut bars = Vec::new();
    for (p, (name, _)) in paths.iter().enumerate() {
        let mut mine: Vec<tools::Wrk> = runs.iter().map(|r| r[p]).collect();
        mine.sort_by(|a, b| a.rps.total_cmp(&b.rps));
        let w = mine[mine.len() / 2];
        let _ = writeln!(
            t,
            "| {name} | {:.0} | {:.2} ms | {:.2} ms | {} |",
            w.rps,
            w.p50_ms,
            w.p99_ms,
            mine.iter().map(|w| w.errors).sum::<u64>()
        );
        bars.push(((*name).to_owned(), w.rps));
    }
    // Shares from each round's own runs, so drift between rounds cancels; the median round.
    let share_of = |a: usize, b: usize| -> (f64, Vec<String>) {
        let shares: Vec<f64> = runs.iter().map(|r| r[a].rps / r[b].rps).collect();
        let by_round = shares
            .iter()
            .map(|s| format!("{:.1}%", s * 100.0))
            .collect();
        (percentile(shares, 0.5), by_round)
    };
    let (share, per_round) = share_of(1, 0);
    let (over_haproxy, _) = share_of(1, 3);
    let below = runs.iter().filter(|r| r[1].rps < 0.97 * r[0].rps).count();
    let _ = writeln!(
        t,
        "\ngpulb: {:.1}% of direct's requests/s, the median round (target ≥ 97%: {}; by round: \
         {}, {below} of {rounds} below 97%); {:.2}× HAProxy (tcp)'s, the median round. The \
         table's rows are each path's own median round. The {clients} clients and the 4 \
         instances share the machine's CPUs on every path.",
        share * 100.0,
        if share >= 0.97 { "met" } else { "NOT met" },
        per_round.join(", "),
        over_haproxy
    );
    bar_chart(
        &opts.out.join("http.svg"),
        "short requests/s (higher is better)",
        &bars,
    );
    t.push_str("\n![requests per second](http.svg)\n");
    report.section("http", &t);

    // streaming: SSE chats against the 4 instances.
    let (count, conc, tokens) = if opts.quick {
        (48, 16, 32)
    } else {
        (160, 16, 32)
    };
    let mut t = format!(
        "{count} streaming chat completions ({tokens} tokens each), {conc} at a time, against 4 \
         simulated instances (4 slots each, 40 ms prefill, 200 tokens/s per sequence). *direct* \
         spreads the requests round-robin over the 4 instances in the client.\n\n\
         | path | TTFT p50 | TTFT p95 | total p95 | tokens/s | failed |\n|---|---:|---:|---:|---:|---:|\n"
    );
    let mut ttft_bars = Vec::new();
    let all_direct: Vec<String> = (0..BACKENDS)
        .map(|i| direct("/v1/chat/completions", i))
        .collect();
    for (name, urls) in [
        ("direct", all_direct),
        ("gpulb", vec![vip_url("/v1/chat/completions")]),
        ("nginx", vec![via_nginx("/v1/chat/completions")]),
    ] {
        let (replies, wall) = chats(client, &urls, count, conc, tokens);
        let s = summarize(&replies, wall, tokens);
        let _ = writeln!(
            t,
            "| {name} | {:.1} ms | {:.1} ms | {:.0} ms | {:.0} | {} |",
            s.ttft_p50, s.ttft_p95, s.total_p95, s.tokens_per_s, s.failed
        );
        ttft_bars.push((name.to_owned(), s.ttft_p95));
    }
    bar_chart(
        &opts.out.join("streaming.svg"),
        "time to first token p95, ms (lower is better)",
        &ttft_bars,
    );
    t.push_str("\n![TTFT p95](streaming.svg)\n");
    report.section("streaming", &t);

    // saturation: 1 instance (others weighted 0) vs 4, rising concurrency.
    let levels: &[usize] = if opts.quick {
        &[1, 4, 16, 64]
    } else {
        &[1, 2, 4, 8, 16, 32, 64]
    };
    let tokens = 16;
    let mut t = format!(
        "Streaming chats ({tokens} tokens) through gpulb at rising concurrency, with 1 instance \
         (the other three at weight 0 through `gpulb weight`) and with 4. Each level sends \
         2 × concurrency requests (at least 16).\n\n\
         | concurrency | 1 instance: req/s | p95 | 4 instances: req/s | p95 |\n|---:|---:|---:|---:|---:|\n"
    );
    let mut series: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    let mut rows: BTreeMap<usize, Vec<(f64, f64)>> = BTreeMap::new();
    for (name, weights) in [("1 instance", [1, 0, 0, 0]), ("4 instances", [1, 1, 1, 1])] {
        for (i, w) in weights.iter().enumerate() {
            stack
                .ctl(&[
                    "weight",
                    &format!("{LB_ADDR}:{}", sim_port(i)),
                    &w.to_string(),
                ])
                .expect("set weight");
        }
        for &c in levels {
            let (replies, wall) = chats(
                client,
                &[vip_url("/v1/chat/completions")],
                (2 * c).max(16),
                c,
                tokens,
            );
            let s = summarize(&replies, wall, tokens);
            series
                .entry(name)
                .or_default()
                .push((c as f64, s.requests_per_s));
            rows.entry(c)
                .or_default()
                .push((s.requests_per_s, s.total_p95));
        }
    }
    for (c, v) in &rows {
        let _ = writeln!(
            t,
            "| {c} | {:.1} | {:.0} ms | {:.1} | {:.0} ms |",
            v[0].0, v[0].1, v[1].0, v[1].1
        );
    }
    line_chart(
        &opts.out.join("saturation.svg"),
        "completed requests/s vs concurrency",
        &series,
    );
    t.push_str("\n![saturation](saturation.svg)\n");
    report.section("saturation", &t);
}

/// Kill one of 4 instances under steady streaming load, behind nginx and behind gpulb.
fn failover(opts: &Opts, report: &mut Report) {
    // The killed instance stays dead for the measurement window: restart after 15 s.
    let stack = Stack::managed(
        "bench-fo",
        BACKENDS,
        PinDir::new("bench-fo"),
        "restart_delay_ms = 15000\n[model.health]\ninterval_ms = 1000\n",
    )
    .expect("managed stack");
    stack
        .wait_ready(BACKENDS, Duration::from_secs(30))
        .expect("instances ready");
    let ports: Vec<u16> = (0..BACKENDS).map(sim_port).collect();
    let _nginx = nginx(&stack.topo.lb, &stack.dir.path, &ports);
    let (before, after) = if opts.quick { (1.5, 3.0) } else { (3.0, 10.0) };
    let tokens = 8;
    let pid_of = |instance: &str| -> u32 {
        stack
            .backends()
            .expect("backends")
            .iter()
            .find(|r| r["daemon"]["instance"] == instance)
            .and_then(|r| r["daemon"]["pid"].as_u64())
            .expect("pid") as u32
    };
    let mut t = format!(
        "4 managed instances under 8 concurrent streaming clients ({tokens} tokens each); \
         {before} s after the start one instance is SIGKILLed; load continues {after} s. nginx: \
         `max_fails=2 fail_timeout=10s`, default `proxy_next_upstream error timeout`. Failed = \
         the client saw an error or a cut stream.\n\n\
         | balancer | requests | failed | new connections to the dead instance | out of rotation after |\n|---|---:|---:|---:|---:|\n"
    );

    // nginx: its error log names each connection attempt to the dead upstream.
    let nginx_errors;
    let nginx_failures;
    {
        let victim = format!("{MODEL}-2");
        let url = format!("http://{LB_ADDR}:{NGINX_PORT}/v1/chat/completions");
        let load = Load::start(&stack.topo.client, &url, 8, tokens, Duration::from_secs(60))
            .expect("load");
        thread::sleep(Duration::from_secs_f64(before));
        let killed_at = SystemTime::now();
        kill(pid_of(&victim));
        thread::sleep(Duration::from_secs_f64(after));
        let results = load.stop();
        let failed = results.iter().filter(|r| !r.complete(tokens)).count();
        let log = fs::read_to_string(stack.dir.path.join("nginx-error.log")).unwrap_or_default();
        let dead = format!("{LB_ADDR}:{}", sim_port(2));
        let attempts: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("connect() failed") && l.contains(&dead))
            .collect();
        // nginx logs whole seconds: "within N s" rounds up.
        let killed_secs = killed_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let last = attempts.last().and_then(|l| nginx_time(l)).map(|t| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .expect("clock")
                .as_secs()
                .saturating_sub(killed_secs)
                + 1
        });
        let errors = error_kinds(&log);
        nginx_failures = failure_kinds(&results, tokens);

        let _ = writeln!(
            t,
            "| nginx | {} | {failed} | {} connect() attempts (retried on another upstream) | {} |",
            results.len(),
            attempts.len(),
            last.map_or_else(
                || "no attempt logged".to_owned(),
                |s| format!("within {s} s (log has 1 s resolution); tried again every 10 s")
            )
        );
        nginx_errors = errors;
    }
    let gpulb_failures;
    // Let the victim come back before gpulb's turn.
    stack
        .wait_ready(BACKENDS, Duration::from_secs(40))
        .expect("victim restarted");

    // gpulb: the data path sends the victim no new flow once its entry is flagged out of the
    // table (the scheduler never chooses such a backend); its VIP then switches to a table
    // without it.
    let gpulb_window;
    {
        let victim = format!("{MODEL}-1");
        let rows = stack.backends().expect("backends");
        let id = rows
            .iter()
            .find(|r| r["daemon"]["instance"] == victim.as_str())
            .and_then(|r| r["id"].as_u64())
            .expect("victim id") as u32;
        let maps = Maps::open_pinned(&stack.pins.path).expect("maps");
        let (vip, service) = maps.services().expect("services")[0];
        let load = Load::start(
            &stack.topo.client,
            &vip_url("/v1/chat/completions"),
            8,
            tokens,
            Duration::from_secs(60),
        )
        .expect("load");
        let pid = pid_of(&victim);
        thread::sleep(Duration::from_secs_f64(before));
        let killed = Instant::now();
        kill(pid);
        while maps.backend(id).expect("backend").takes_new_flows() {
            assert!(killed.elapsed() < Duration::from_secs(5), "not ejected");
            thread::sleep(Duration::from_micros(100));
        }
        let out_at = Instant::now();
        let switched = loop {
            let now = maps
                .services()
                .expect("services")
                .into_iter()
                .find(|(k, _)| *k == vip)
                .map(|(_, s)| s);
            if now.is_some_and(|s| s.block != service.block) {
                break killed.elapsed();
            }
            assert!(
                killed.elapsed() < Duration::from_secs(5),
                "table not switched"
            );
            thread::sleep(Duration::from_micros(100));
        };
        thread::sleep(Duration::from_secs_f64(after));
        let results = load.stop();
        let failed: Vec<_> = results.iter().filter(|r| !r.complete(tokens)).collect();
        gpulb_failures = failure_kinds(&results, tokens);
        let in_flight = failed.iter().filter(|r| r.started < killed).count();
        let in_window = failed
            .iter()
            .filter(|r| r.started >= killed && r.started < out_at)
            .count();
        let after_out = failed.len() - in_flight - in_window;
        gpulb_window = (in_flight, in_window, after_out);
        let late = results
            .iter()
            .filter(|r| r.started > out_at)
            .filter(|r| r.result.as_ref().is_ok_and(|r| r.instance == victim))
            .count();
        // The daemon's own clock: from the pidfd's wake-up to the flag written.
        let log = stack.daemon.log_text();
        let logged = |field: &str| -> f64 {
            log.lines()
                .rev()
                .filter(|l| l.contains("backend ejected"))
                .filter_map(|l| l.split(&format!("{field}=")).nth(1))
                .find_map(|v| v.split_whitespace().next()?.parse::<f64>().ok())
                .unwrap_or(f64::NAN)
                / 1000.0
        };
        let pidfd_to_flag = logged("flagged_out_in_us");
        let _ = writeln!(
            t,
            "| gpulb | {} | {} | {late} after the ejection | {:.2} ms pidfd → flagged out (no \
             new flow from then; target ≤ 2 ms: {}), {:.2} ms SIGKILL → flagged out seen, table \
             switched {:.1} ms after the SIGKILL |",
            results.len(),
            failed.len(),
            pidfd_to_flag,
            if pidfd_to_flag <= 2.0 {
                "met"
            } else {
                "NOT met"
            },
            (out_at - killed).as_secs_f64() * 1000.0,
            switched.as_secs_f64() * 1000.0,
        );
    }
    let _ = write!(
        t,
        "\nnginx's error log during the nginx run, by kind: {}. A POST already sent on a \
         kept-alive upstream connection is not retried (non-idempotent), so the client gets \
         a 502 or a cut stream.\n",
        if nginx_errors.is_empty() {
            "none".to_owned()
        } else {
            nginx_errors
                .iter()
                .map(|(k, n)| format!("{n} × \"{k}\""))
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    let (in_flight, in_window, after_out) = gpulb_window;
    let _ = write!(
        t,
        "\ngpulb's failed requests by when they started: {in_flight} in flight on the killed \
         instance (their streams were cut), {in_window} in the ejection window (between the \
         SIGKILL and the flag: connection refused), {after_out} after it.\n"
    );
    for (name, kinds) in [("nginx", nginx_failures), ("gpulb", gpulb_failures)] {
        let _ = write!(t, "\nWhat the {name} clients saw fail: {kinds}.\n");
    }
    report.section("failover", &t);
}

/// The failed requests of a load run, counted by what the client saw.
fn failure_kinds(results: &[gpulb_testbed::LoadResult], tokens: u32) -> String {
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for r in results.iter().filter(|r| !r.complete(tokens)) {
        let kind = match &r.result {
            Ok(reply) if !reply.done => format!("stream cut after {} tokens", reply.tokens),
            Ok(reply) => format!("{} tokens", reply.tokens),
            // The error chain's last part is the cause; the first names the URL.
            Err(e) => e.rsplit(": ").next().unwrap_or(e).to_owned(),
        };
        *kinds.entry(kind).or_insert(0) += 1;
    }
    if kinds.is_empty() {
        return "nothing".into();
    }
    let mut kinds: Vec<(String, usize)> = kinds.into_iter().collect();
    kinds.sort_by_key(|k| std::cmp::Reverse(k.1));
    kinds
        .iter()
        .take(4)
        .map(|(k, n)| format!("{n} × {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `[error]` lines of an nginx error log, counted by their message (up to " while ").
fn error_kinds(log: &str) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for line in log.lines().filter(|l| l.contains("[error]")) {
        let msg = line
            .split_once(": ")
            .map_or(line, |(_, m)| m)
            .trim_start_matches(|c: char| c == '*' || c.is_ascii_digit() || c == ' ');
        let msg = msg.split(" while ").next().unwrap_or(msg);
        *out.entry(msg.to_owned()).or_insert(0) += 1;
    }
    out
}

fn kill(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill instance");
}

/// The time of an nginx error log line (`2026/11/23 14:30:01 [error] ...`, local time).
fn nginx_time(line: &str) -> Option<SystemTime> {
    let stamp = line.get(..19)?;
    let out = sh_out("date", &["-d", &stamp.replace('/', "-"), "+%s"]);
    let secs: u64 = out.trim().parse().ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}
