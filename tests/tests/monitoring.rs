//! Monitoring in a real Prometheus (Debian's): the shipped scrape config and alert rules
//! pass `promtool`, a Prometheus in the test namespace scrapes the daemon, loads the rules
//! and answers a query for one backend by its `backend_instance` label. Needs root.

use std::{fs, process::Command, time::Duration};

use gpulb_testbed::{MODEL, PinDir, Proc, Stack, burst, get, metric, scrape, vip_url, wait_until};
use serde_json::Value;

const DOCS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs");

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .output()
        .expect("promtool (cargo xtask test installs Debian's prometheus)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

/// A PromQL query, percent-encoded for a URL.
fn encode(query: &str) -> String {
    query
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn prometheus_scrapes_the_daemon_loads_the_rules_and_finds_a_backend_by_label() {
    // The files operators copy: syntax and rules. (Only checked: the shipped scrape config
    // names example hosts this test must not send to.)
    let rules = format!("{DOCS}/alerts.yml");
    let out = promtool(&["check", "rules", &rules]);
    assert!(out.contains("SUCCESS: 8 rules found"), "{out}");
    promtool(&["check", "config", &format!("{DOCS}/prometheus.yml")]);

    let stack = Stack::managed(
        "prom",
        2,
        PinDir::new("prom"),
        "[model.health]\ninterval_ms = 100\n",
    )
    .expect("stack");
    stack.wait_ready(2, Duration::from_secs(30)).expect("ready");
    // Some traffic, both ways.
    let url = vip_url("/v1/chat/completions");
    for r in burst(&stack.topo.client, &url, 8, 4, true, 4).expect("burst") {
        r.expect("request through the VIP");
    }
    let text = scrape(&stack.topo.lb).expect("metrics");
    for (name, what) in [
        ("gpulb_backend_bytes_total", "to backends"),
        ("gpulb_backend_egress_bytes_total", "back to clients"),
    ] {
        let bytes = metric(&text, name, &[]).unwrap_or(0.0);
        assert!(bytes > 0.0, "bytes {what}: {name} = {bytes}\n{text}");
    }
    assert!(
        !text.contains(" instance=") && !text.contains("{instance="),
        "no label named `instance` (Prometheus would rename it)"
    );
    let capacity = metric(&text, "gpulb_conntrack_capacity", &["family=\"ipv4\""]);
    assert_eq!(capacity, Some(65536.0), "{text}");
    let entries = metric(&text, "gpulb_conntrack_entries", &["family=\"ipv4\""]).unwrap_or(0.0);
    assert!(entries >= 8.0, "the burst's flows are tracked: {entries}");
    assert_eq!(
        metric(&text, "gpulb_ejections_total", &["cause=\"exit\""]),
        Some(0.0),
        "every backend has its ejection series at 0 before any ejection"
    );
    let exit_series = text
        .lines()
        .filter(|l| l.starts_with("gpulb_ejections_total{") && l.contains("cause=\"exit\""))
        .count();
    assert_eq!(exit_series, 2, "{text}");

    // A Prometheus of its own in the namespace, scraping every second.
    let config = stack.dir.path.join("prometheus.yml");
    fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: gpulb\n    static_configs:\n      - targets: [\"127.0.0.1:9464\"]\n"
        ),
    )
    .expect("prometheus.yml");
    promtool(&["check", "config", config.to_str().expect("UTF-8")]);
    let data = stack.dir.path.join("prometheus-data");
    let _prometheus = Proc::spawn(
        "prometheus",
        &stack.topo.lb,
        std::path::Path::new("/usr/bin/prometheus"),
        &[
            &format!("--config.file={}", config.display()),
            &format!("--storage.tsdb.path={}", data.display()),
            "--web.listen-address=127.0.0.1:19090",
        ],
        &stack.dir.path,
    )
    .expect("start prometheus");
    let api = |path: &str| -> Option<Value> {
        let (status, body) = get(&stack.topo.lb, &format!("http://127.0.0.1:19090{path}")).ok()?;
        (status == 200).then(|| serde_json::from_str(&body).ok())?
    };

    // One backend's series, selected by its backend label.
    let instance = format!("{MODEL}-1");
    let query = encode(&format!(
        "gpulb_backend_in_table{{backend_instance=\"{instance}\"}}"
    ));
    let mut last = Value::Null;
    let found = wait_until(Duration::from_secs(30), || {
        let Some(v) = api(&format!("/api/v1/query?query={query}")) else {
            return false;
        };
        last = v.clone();
        v["data"]["result"]
            .as_array()
            .is_some_and(|r| r.len() == 1 && r[0]["value"][1] == "1")
    });
    assert!(found, "query by backend_instance: {last:#}");
    let series = &last["data"]["result"][0]["metric"];
    assert_eq!(series["backend_instance"], instance.as_str());
    // Prometheus's own `instance` label is the scrape target, not renamed away.
    assert_eq!(series["instance"], "127.0.0.1:9464");

    // The rules load and evaluate without errors.
    let ok = wait_until(Duration::from_secs(20), || {
        let Some(v) = api("/api/v1/rules") else {
            return false;
        };
        last = v.clone();
        let rules: Vec<&Value> = v["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .collect();
        rules.len() == 8 && rules.iter().all(|r| r["health"] == "ok")
    });
    assert!(ok, "alert rules not all evaluated ok: {last:#}");
    // The no-backend rule's expression sees the VIP with both backends in the table (so a
    // misspelled expression, which would see nothing, fails here), and does not fire.
    let query = encode("sum by (job, vip) (gpulb_backend_in_table)");
    let v = api(&format!("/api/v1/query?query={query}")).expect("query");
    let result = v["data"]["result"].as_array().expect("result");
    assert!(result.len() == 1 && result[0]["value"][1] == "2", "{v:#}");
    let alerts = api("/api/v1/alerts").expect("alerts");
    let firing: Vec<&Value> = alerts["data"]["alerts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["labels"]["alertname"] == "GpulbVipNoBackend")
        .collect();
    assert!(firing.is_empty(), "{alerts:#}");
}
