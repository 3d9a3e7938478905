//! The report's datapath section: the datapath bench's figures (its JSON), Katran's beside
//! them when it was measured, and the verifier counts per kernel.

use std::{fmt::Write as _, fs};

use super::Report;

fn uname_release() -> String {
    nix::sys::utsname::uname()
        .expect("uname")
        .release()
        .to_string_lossy()
        .into_owned()
}

/// The datapath bench's figures, written by `cargo bench --bench datapath` just before.
pub fn datapath(report: &mut Report) {
    let path = std::env::var("GPULB_BENCH_DATAPATH").unwrap_or_default();
    let Ok(text) = fs::read_to_string(&path) else {
        report.section("datapath", "Not run (no `GPULB_BENCH_DATAPATH` results).");
        return;
    };
    let v: serde_json::Value = serde_json::from_str(&text).expect("datapath JSON");
    let floor = v["floor"].as_f64().expect("floor");
    let mut t = String::from(
        "ns/packet of `gpulb_ingress` under `BPF_PROG_TEST_RUN` (best of runs; NAT cases through \
         the restore-and-tail-call wrapper, its cost subtracted; every iteration checked to take \
         the intended path).\n\n| case | ns/packet | × no-op |\n|---|---:|---:|\n",
    );
    for (key, name) in [
        ("floor", "no-op XDP program (floor)"),
        ("non_vip", "non-VIP packet (passed)"),
        (
            "non_vip_on_port",
            "non-VIP address on a VIP's port, mid-flow (passed)",
        ),
        ("established", "established flow (NAT)"),
        ("established6", "established IPv6 flow (NAT)"),
        ("syn_flood", "SYN flood, 1M sources, flood mode (no state)"),
    ] {
        let ns = v[key].as_f64().expect("case");
        let _ = writeln!(t, "| {name} | {ns:.0} | {:.2} |", ns / floor);
    }
    for case in v["new_flow_by_backends"].as_array().into_iter().flatten() {
        let (backends, ns) = (
            case[0].as_u64().unwrap_or(0),
            case[1].as_f64().unwrap_or(0.0),
        );
        let _ = writeln!(
            t,
            "| new flow SYN, scheduler, {backends} backends behind the VIP | {ns:.0} | {:.2} |",
            ns / floor
        );
    }
    let ratio = |key: &str| v[key].as_f64().unwrap_or(f64::NAN) / floor;
    let verdict = |r: f64, max: f64| if r <= max { "met" } else { "NOT met" };
    let (new_flow, established, non_vip) =
        (ratio("new_flow"), ratio("established"), ratio("non_vip"));
    let _ = writeln!(
        t,
        "\nTargets (× the no-op floor): new flow (4 backends) {new_flow:.2} ≤ 8: {}; established \
         {established:.2} ≤ 4: {}; non-VIP {non_vip:.2} ≤ 2: {}. SYN flood: {:.1}% of 1M SYNs \
         from distinct sources forwarded without state (each run starts with the CPU's budget of \
         {} inserts for the second spent).",
        verdict(new_flow, 8.0),
        verdict(established, 4.0),
        verdict(non_vip, 2.0),
        v["syn_flood_stateless_share"].as_f64().unwrap_or(0.0) * 100.0,
        lb_common::CT_INSERTS_PER_CPU_DEFAULT,
    );
    if let Some(k) = v["katran"].as_object() {
        t.push_str(
            "\nAgainst Katran's balancer (`balancer.bpf.c`, default build, Debian's clang), built \
             and measured in the same run through the same wrapper (`--katran`). New flow: gpulb's \
             scheduler over 4 backends against Katran's consistent hash and LRU insert on every \
             SYN; SYN flood: gpulb in flood mode against Katran over its new-connection cap.\n\n\
             | case | gpulb | Katran | gpulb ÷ Katran | target |\n|---|---:|---:|---:|---|\n",
        );
        for (key, name, target) in [
            ("established", "established flow", Some(0.8)),
            ("new_flow", "new flow", Some(1.2)),
            ("syn_flood", "SYN flood, no state", None),
            ("non_vip", "non-VIP packet", None),
        ] {
            let (g, kn) = (
                v[key].as_f64().unwrap_or(f64::NAN),
                k.get(key).and_then(|x| x.as_f64()).unwrap_or(f64::NAN),
            );
            let ratio = g / kn;
            let target = target.map_or_else(String::new, |max: f64| {
                format!("≤ {max}: {}", verdict(ratio, max))
            });
            let _ = writeln!(t, "| {name} | {g:.0} | {kn:.0} | {ratio:.2} | {target} |");
        }
    }
    // The verifier per program: this kernel (the datapath bench's load) and Debian's kernels
    // under qemu (`gpulb check-kernel`), each kernel a column.
    let mut columns: Vec<(String, serde_json::Value)> = vec![(
        format!("this kernel ({})", uname_release()),
        serde_json::Value::Array(
            v["verified_instructions"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| serde_json::json!({"name": p[0], "verified_instructions": p[1]}))
                .collect(),
        ),
    )];
    let kernels = std::env::var("GPULB_BENCH_KERNELS")
        .ok()
        .and_then(|p| fs::read_to_string(p).ok())
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok());
    if let Some(kernels) = kernels.as_ref().and_then(|k| k.as_object()) {
        for (label, check) in kernels {
            columns.push((
                format!(
                    "Debian {label} ({})",
                    check["release"].as_str().unwrap_or("?")
                ),
                check["programs"].clone(),
            ));
        }
    }
    t.push_str(
        "\nVerifier: instructions processed when each program loaded, per kernel (Debian's \
         kernels booted under qemu, `gpulb check-kernel`); the verifier's limit is 1,000,000 per \
         program.\n\n| program |",
    );
    for (name, _) in &columns {
        let _ = write!(t, " {name} |");
    }
    t.push_str("\n|---|");
    t.push_str(&"---:|".repeat(columns.len()));
    t.push('\n');
    let names: Vec<String> = columns[0]
        .1
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["name"].as_str().map(str::to_owned))
        .collect();
    for name in names {
        let _ = write!(t, "| `{name}` |");
        for (_, programs) in &columns {
            let n = programs
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["name"] == name.as_str())
                .and_then(|p| p["verified_instructions"].as_u64());
            let _ = write!(t, " {} |", n.map_or_else(|| "-".into(), |n| n.to_string()));
        }
        t.push('\n');
    }
    report.section("datapath", &t);
}
