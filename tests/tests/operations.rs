//! What operators of a GPU host run into: drains that a metrics scraper cannot hold up,
//! reloads that replace a changed command one instance at a time, probes that send an API
//! key, a start timeout, instance logs kept across restarts, and `ip netns exec` explained.
//! In network namespaces; needs root.

mod common;

use std::{
    fs,
    io::{Read as _, Write as _},
    net::TcpStream,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use common::{FAST_PROBES, sim_command};
use gpulb_testbed::{
    LB_ADDR, Load, MODEL, NetNs, PinDir, Stack, backend_row as row, bin, metric, scrape, sim_port,
    unique, vip_url, wait_until,
};
use serde_json::Value;

fn pid_of(rows: &[Value], instance: &str) -> u64 {
    row(rows, instance)["daemon"]["pid"].as_u64().unwrap_or(0)
}

/// One GET on a kept-alive connection; the response's body.
fn get_on(stream: &mut TcpStream, path: &str) -> String {
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: scraper\r\nconnection: keep-alive\r\n\r\n"
    )
    .expect("send");
    // Headers, then exactly content-length bytes: the connection stays usable.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).expect("response head");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("a content-length: {head}"));
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).expect("body");
    String::from_utf8_lossy(&body).into_owned()
}

#[test]
fn a_drain_is_not_held_up_by_a_scraper_kept_alive_on_the_instance() {
    let stack = Stack::managed("scrape", 2, PinDir::new("scrape"), FAST_PROBES).expect("stack");
    stack.wait_ready(2, Duration::from_secs(30)).expect("ready");
    let instance = format!("{MODEL}-0");
    // Prometheus scraping the instance's own /metrics, on one kept-alive connection from the
    // host: ESTABLISHED on the backend's port, but not a flow through the VIP.
    let target = format!("{LB_ADDR}:{}", sim_port(0));
    let mut scraper = stack
        .topo
        .lb
        .run(move || TcpStream::connect(target))
        .expect("netns")
        .expect("connect to the instance");
    scraper
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    assert!(get_on(&mut scraper, "/metrics").contains("vllm:num_requests_running"));

    // Two reconcile rounds (one a second): the scrape connection is not counted.
    thread::sleep(Duration::from_millis(2500));
    let rows = stack.backends().expect("backends");
    assert_eq!(row(&rows, &instance)["live_flows"], 0, "{rows:#?}");

    let started = Instant::now();
    let out = stack
        .ctl(&["drain", &instance, "--wait", "20"])
        .expect("drain");
    let took = started.elapsed();
    assert!(out.trim_end().ends_with("drained"), "{out}");
    assert!(
        took < Duration::from_secs(5),
        "the drain waited {took:?} for connections that are not VIP flows:\n{out}"
    );
    // The scraper's connection was there all along and still works.
    assert!(get_on(&mut scraper, "/metrics").contains("vllm:num_requests_running"));
}

#[test]
fn a_reload_replaces_a_changed_command_one_instance_at_a_time_without_failing_requests() {
    let base = format!(
        "{}{FAST_PROBES}",
        sim_command(&["--tokens-per-second", "40", "--load-delay-ms", "300"])
    );
    let stack = Stack::managed("rollcmd", 3, PinDir::new("rollcmd"), &base).expect("stack");
    stack.wait_ready(3, Duration::from_secs(30)).expect("ready");
    let rows = stack.backends().expect("backends");
    let names: Vec<String> = (0..3).map(|i| format!("{MODEL}-{i}")).collect();
    let before: Vec<u64> = names.iter().map(|n| pid_of(&rows, n)).collect();

    let url = vip_url("/v1/chat/completions");
    let load = Load::start(&stack.topo.client, &url, 6, 16, Duration::from_secs(90)).expect("load");
    thread::sleep(Duration::from_millis(500));
    // A new command (a different simulated speed) for every instance.
    let text = fs::read_to_string(&stack.config).expect("config");
    let changed = text.replace("\"40\"", "\"50\"");
    assert_ne!(changed, text, "the command changed");
    fs::write(&stack.config, changed).expect("write config");
    let out = stack.ctl(&["reload"]).expect("reload");
    assert!(out.contains("3 to be replaced one at a time"), "{out}");

    // Never more than one instance out at a time, until all three run the new command.
    let mut most_out = 0;
    let replaced = wait_until(Duration::from_secs(60), || {
        let Ok(rows) = stack.backends() else {
            return false;
        };
        let out = rows.iter().filter(|r| r["state"] != "ready").count();
        most_out = most_out.max(out);
        let pids: Vec<u64> = names.iter().map(|n| pid_of(&rows, n)).collect();
        out == 0 && pids.iter().zip(&before).all(|(p, b)| *p != 0 && p != b)
    });
    thread::sleep(Duration::from_millis(500));
    let results = load.stop();
    assert!(replaced, "{}", stack.daemon.log_text());
    assert_eq!(most_out, 1, "one instance at a time");
    let failed: Vec<_> = results.iter().filter(|r| !r.complete(16)).collect();
    eprintln!(
        "{} streaming requests across the rolling replacement, {} failed",
        results.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "failed requests: {failed:#?}");
    assert!(results.len() > 30, "load kept going: {}", results.len());
    for pid in stack.instance_pids() {
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        if args.iter().any(|a| *a == b"--tokens-per-second") {
            assert!(
                args.iter().any(|a| *a == b"50"),
                "every instance runs the new command"
            );
        }
    }
    let log = stack.daemon.log_text();
    assert!(log.contains("rolling restart done"), "{log}");

    // A change reverted by the next reload, before the replacement reached most instances:
    // those keep running (the first one, already in its turn, restarts with the reverted
    // command), and every instance ends up with the config's command.
    let rows = stack.backends().expect("backends");
    let before: Vec<u64> = names.iter().map(|n| pid_of(&rows, n)).collect();
    let text = fs::read_to_string(&stack.config).expect("config");
    fs::write(&stack.config, text.replace("\"50\"", "\"60\"")).expect("write config");
    stack.ctl(&["reload"]).expect("reload to 60");
    fs::write(&stack.config, &text).expect("write config");
    let out = stack.ctl(&["reload"]).expect("reload back to 50");
    assert!(out.contains("0 to be replaced"), "{out}");
    let done = wait_until(Duration::from_secs(30), || {
        stack
            .daemon
            .log_text()
            .matches("rolling restart done")
            .count()
            >= 2
            && stack
                .backends()
                .is_ok_and(|rows| rows.iter().all(|r| r["state"] == "ready"))
    });
    assert!(done, "{}", stack.daemon.log_text());
    let rows = stack.backends().expect("backends");
    let restarted = names
        .iter()
        .zip(&before)
        .filter(|(n, b)| pid_of(&rows, n) != **b)
        .count();
    assert!(
        restarted <= 1,
        "{restarted} instances restarted for a reverted change"
    );
    for pid in stack.instance_pids() {
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert!(
            !cmdline.split(|&b| b == 0).any(|a| a == b"60"),
            "no instance runs the reverted command"
        );
    }
}

#[test]
fn probes_send_the_api_key_and_a_start_timeout_fails_a_stuck_start() {
    // The key reaches the probe through the daemon's environment, as from the unit's
    // EnvironmentFile; the instance is started with it, as vLLM with --api-key.
    let key = unique("key");
    let model = format!(
        "{}[model.health]\ninterval_ms = 100\nheaders = {{ Authorization = \"Bearer ${{GPULB_TEST_API_KEY}}\" }}\n\n\
         [[model]]\nname = \"stuck\"\nvip = \"chat\"\ngpus = \"simulated:1\"\n\
         address = \"{LB_ADDR}\"\nbase_port = {}\nrestart_delay_ms = 200\n\
         env = {{ GPULB_TEST_MARKER = \"{{marker}}\" }}\n{}\
         [model.health]\ninterval_ms = 100\nstart_timeout_ms = 1500\n",
        sim_command(&["--api-key", &key]),
        sim_port(5),
        sim_command(&["--load-delay-ms", "600000"]),
    );
    let stack = Stack::managed_env(
        "probes",
        1,
        PinDir::new("probes"),
        "",
        &model,
        vec![("GPULB_TEST_API_KEY".to_owned(), key.clone())],
    )
    .expect("stack");
    // The keyed instance answers /v1/models only with the key: ready means the probe sent it.
    stack.wait_ready(1, Duration::from_secs(30)).expect("ready");
    let rows = stack.backends().expect("backends");
    assert_eq!(row(&rows, &format!("{MODEL}-0"))["state"], "ready");

    // The stuck one: killed after 1.5 s without being ready, as a failed start, and
    // restarted; its last error says why, in the table too.
    let stuck = "stuck-0";
    let mut last = Value::Null;
    let failed = wait_until(Duration::from_secs(20), || {
        let Ok(rows) = stack.backends() else {
            return false;
        };
        last = row(&rows, stuck).clone();
        last["daemon"]["restarts"].as_u64().unwrap_or(0) >= 1
    });
    assert!(failed, "{last:#}\n{}", stack.daemon.log_text());
    let log = stack.daemon.log_text();
    assert!(
        log.contains("instance failed to start") && log.contains("start_timeout_ms"),
        "{log}"
    );
    // While starting, the probe's reason is logged once per change, not every 100 ms.
    let not_ready = log
        .lines()
        .filter(|l| l.contains("backend not ready yet") && l.contains(&format!(":{}", sim_port(5))))
        .count();
    assert!(
        (1..=6).contains(&not_ready),
        "{not_ready} 'not ready yet' lines:\n{log}"
    );
    // The restarted process starts with no error of its own until its first probe fails
    // (100 ms): the table is read until its row has one.
    let mut table = String::new();
    let says_why = |table: &str| {
        table
            .lines()
            .find(|l| l.contains(stuck))
            .is_some_and(|line| {
                line.contains("not ready") || line.contains("/v1/models") || line.contains("exited")
            })
    };
    let shown = wait_until(Duration::from_secs(5), || {
        table = stack
            .ctl(&["backends", "--pin-path", &stack.pin_arg()])
            .expect("backends table");
        says_why(&table)
    });
    assert!(table.contains("LAST_ERROR"), "{table}");
    assert!(shown, "{table}");

    // The instance log is appended to across restarts, not truncated.
    let instance_log = stack.dir.path.join(format!("instances/{stuck}.log"));
    let mut text = String::new();
    let both = wait_until(Duration::from_secs(10), || {
        text = fs::read_to_string(&instance_log).unwrap_or_default();
        text.matches("simulated GPU instance serving").count() >= 2
    });
    assert!(both, "both processes' output is kept:\n{text}");
    let text = scrape(&stack.topo.lb).expect("metrics");
    // Every backend has its ejection series from the start.
    assert_eq!(
        metric(
            &text,
            "gpulb_ejections_total",
            &[
                &format!("backend_instance=\"{MODEL}-0\""),
                "cause=\"unhealthy\""
            ]
        ),
        Some(0.0),
        "{text}"
    );
}

#[test]
fn run_under_ip_netns_exec_is_refused_with_the_nsenter_command() {
    let ns = NetNs::new(&unique("nsexec")).expect("netns");
    ns.ip(&["link", "set", "lo", "up"]).expect("lo up");
    let dir = std::env::temp_dir().join(unique("nsexec"));
    fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("gpulb.toml");
    fs::write(
        &config,
        format!(
            "interface = \"lo\"\npin_path = \"/sys/fs/bpf/{}\"\nstate_dir = \"{}/state\"\n\
             [[vip]]\nname = \"chat\"\naddress = \"198.18.100.1\"\nport = 80\n\
             [[vip.backend]]\naddress = \"198.18.0.1\"\nport = 8001\n",
            unique("nsexec"),
            dir.display()
        ),
    )
    .expect("config");
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(bin("gpulb"))
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .expect("ip netns exec");
    let _ = fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("ip netns exec")
            && stderr.contains(&format!("nsenter --net=/run/netns/{}", ns.name)),
        "{stderr}"
    );
}
