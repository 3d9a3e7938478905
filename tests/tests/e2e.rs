//! Real HTTP clients in a client namespace, through gpulb's XDP program, to four simulated
//! GPU instances. Needs root (namespaces, BPF).

use std::{collections::BTreeMap, time::Duration};

use gpulb_testbed::{
    CLIENT_ADDR, LB_ADDR, PinDir, Stack, burst, get, gpulb_cli, metric, pid_alive, scrape,
    sim_port, vip_url,
};

/// Requests per case; with 4 backends the chance that one gets none is (3/4)^40 ≈ 1e-5.
const REQUESTS: usize = 40;
const MAX_TOKENS: u32 = 8;

fn json(args: &[&str]) -> serde_json::Value {
    let out = gpulb_cli(args).expect("gpulb CLI");
    serde_json::from_str(&out).expect("CLI prints JSON")
}

#[test]
fn http_through_xdp_to_four_backends_and_clean_exit() {
    let mut stack = Stack::start("e2e", 4, PinDir::new("e2e"), &[]).expect("start stack");
    let pin = stack.pin_arg();
    let url = vip_url("/v1/chat/completions");

    // Non-streaming and streaming requests through the VIP: every one succeeds.
    let mut split: BTreeMap<String, usize> = BTreeMap::new();
    for stream in [false, true] {
        let replies =
            burst(&stack.topo.client, &url, REQUESTS, 8, stream, MAX_TOKENS).expect("burst");
        for (i, r) in replies.into_iter().enumerate() {
            let r = r.unwrap_or_else(|e| panic!("request {i} (stream={stream}) failed: {e:#}"));
            assert_eq!(
                r.tokens, MAX_TOKENS as usize,
                "request {i} (stream={stream}): {r:?}"
            );
            assert!(r.done, "stream {i} ended without [DONE]: {r:?}");
            *split.entry(r.instance).or_insert(0) += 1;
        }
    }
    eprintln!("per-backend split: {split:?}");
    assert_eq!(split.len(), 4, "every backend gets a share: {split:?}");
    assert!(
        !split.contains_key("?"),
        "a reply without instance header: {split:?}"
    );

    // The kernel's view agrees: 80 new flows over 4 backends, each with some.
    let backends = json(&["backends", "--json", "--pin-path", &pin]);
    let rows = backends.as_array().expect("array");
    assert_eq!(rows.len(), 4);
    let new_flows: Vec<u64> = rows
        .iter()
        .map(|r| r["new_flows"].as_u64().expect("new_flows"))
        .collect();
    assert_eq!(
        new_flows.iter().sum::<u64>(),
        2 * REQUESTS as u64,
        "{backends}"
    );
    assert!(new_flows.iter().all(|&n| n > 0), "{backends}");
    for r in rows {
        let share = r["slots"].as_u64().expect("slots") as f64 / 65537.0;
        assert!((share - 0.25).abs() < 0.01, "maglev share {share} for {r}");
    }

    // Prometheus sees the same: per-CPU counters summed, states from the daemon.
    let text = scrape(&stack.topo.lb).expect("scrape /metrics");
    let sum = |name, labels: &[&str]| {
        metric(&text, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?} in\n{text}"))
    };
    let flows = 2.0 * REQUESTS as f64;
    assert_eq!(sum("gpulb_backend_new_flows_total", &[]), flows);
    assert_eq!(
        sum("gpulb_vip_new_flows_total", &["vip=\"198.18.100.1:80\""]),
        flows
    );
    assert_eq!(
        sum("gpulb_packets_total", &["reason=\"fwd_new_flow\""]),
        flows
    );
    assert_eq!(sum("gpulb_backend_state", &["state=\"ready\""]), 4.0);
    assert_eq!(sum("gpulb_backend_in_table", &[]), 4.0);
    assert!(sum("gpulb_backend_probe_latency_seconds", &[]) > 0.0);
    assert!(sum("gpulb_maglev_rebuilds_total", &[]) >= 1.0);
    assert!(
        !text.contains(&CLIENT_ADDR.to_string()),
        "no client address in labels"
    );

    // A client that connects straight to a backend port sees its traffic untouched: the
    // reply comes from the backend's own address (else the TCP handshake would fail), and
    // no conntrack entry is made for it.
    let reasons_before = json(&["stats", "--json", "--pin-path", &pin]);
    let direct = format!("http://{LB_ADDR}:{}/v1/models", sim_port(0));
    let (status, body) = get(&stack.topo.client, &direct).expect("direct request");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("sim-llm"), "{body}");
    let flows = json(&["flows", "--json", "--limit", "0", "--pin-path", &pin]);
    let flows = flows.as_array().expect("array");
    assert_eq!(flows.len(), 2 * REQUESTS, "only VIP flows are tracked");
    assert!(flows.iter().all(|f| f["vip"] == "198.18.100.1:80"));
    assert!(flows.iter().all(|f| {
        f["client"]
            .as_str()
            .expect("client")
            .starts_with(&CLIENT_ADDR.to_string())
    }));
    let reasons_after = json(&["stats", "--json", "--pin-path", &pin]);
    let count = |v: &serde_json::Value, name: &str| {
        v.as_array()
            .expect("array")
            .iter()
            .find(|r| r["counter"] == name)
            .and_then(|r| r["value"].as_u64())
            .expect("reason present")
    };
    assert!(count(&reasons_after, "pass_not_vip") > count(&reasons_before, "pass_not_vip"));
    assert!(count(&reasons_after, "egress_pass") > count(&reasons_before, "egress_pass"));
    assert_eq!(
        count(&reasons_after, "egress_revnat"),
        count(&reasons_before, "egress_revnat")
    );

    // SIGTERM: the daemon exits 0, detaches and unpins.
    let status = stack.daemon.stop().expect("daemon stops on SIGTERM");
    assert!(
        status.success(),
        "daemon exit: {status}\n{}",
        stack.daemon.log_text()
    );
    assert!(!stack.pins.path.exists(), "pinned maps left behind");
    let link = stack
        .topo
        .lb
        .ip(&["-d", "link", "show", "dev", &stack.topo.lb_if])
        .expect("link");
    assert!(!link.contains("xdp"), "XDP still attached: {link}");
    assert!(stack.daemon.log_text().contains("detached and unpinned"));
    // With gpulb gone the VIP is unreachable, and a backend port still works.
    let (status, _) = get(&stack.topo.client, &direct).expect("direct after stop");
    assert_eq!(status, 200);
    assert!(
        get(&stack.topo.client, &vip_url("/health")).is_err(),
        "VIP answered without gpulb"
    );

    // Dropping the stack removes the namespaces and stops every process.
    let pids: Vec<u32> = stack.sims.iter().map(|s| s.pid()).collect();
    let names = [stack.topo.client.name.clone(), stack.topo.lb.name.clone()];
    drop(stack);
    let netns = gpulb_testbed::sh("ip", &["netns", "list"]).expect("ip netns list");
    for name in names {
        assert!(!netns.contains(&name), "namespace {name} left behind");
    }
    assert!(
        gpulb_testbed::wait_until(Duration::from_secs(5), || pids
            .iter()
            .all(|&p| !pid_alive(p))),
        "simulated instances left running"
    );
}

#[test]
fn bad_config_exits_64_naming_the_field() {
    let dir = gpulb_testbed::TempDir::new("badcfg").expect("temp dir");
    let path = dir.path.join("bad.toml");
    std::fs::write(
        &path,
        "interface = \"lo\"\n[[vip]]\nname = \"x\"\naddress = \"198.18.100.1\"\nport = 80\n\
         [[vip.backend]]\naddress = \"198.18.0.1\"\nport = 8001\n\
         [[vip.backend]]\naddress = \"198.18.0.1\"\nport = 8001\n",
    )
    .expect("write config");
    let path = path.to_str().expect("UTF-8");
    for args in [vec!["check-config", path], vec!["run", "--config", path]] {
        let out = std::process::Command::new(gpulb_testbed::bin("gpulb"))
            .args(&args)
            .output()
            .expect("run gpulb");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(
            stderr.contains("vip[0].backend[1]: duplicate backend 198.18.0.1:8001"),
            "{stderr}"
        );
    }
}
