//! `cargo xtask bench datapath`: ns/packet of gpulb_ingress under BPF_PROG_TEST_RUN.
//!
//! BPF_PROG_TEST_RUN with repeat > 1 does not restore the packet between iterations, and the
//! NAT rewrites it; so the NAT cases run through `gpulb_bench_wrap`, which writes the input
//! back (and, for new flows, a fresh source) and tail-calls gpulb_ingress. The wrapper's own
//! cost is measured by tail-calling `gpulb_noop` and subtracted. Each case checks from the
//! reason counters that every iteration took the intended path.

use std::{path::Path, time::Duration};

use aya::{
    EbpfLoader,
    maps::{Array, ProgramArray},
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use gpulb::{BENCH_OBJECT, config::Config, datapath::Datapath, plan};
use gpulb_testbed::PinDir;
use lb_common::Reason;

const PKT_LEN: usize = 64;
const REPEAT: u32 = 1_000_000;
/// New flows fill conntrack; stay below its size so that no case measures LRU eviction only.
const NEW_FLOW_REPEAT: u32 = 400_000;
const CONNTRACK: u32 = 1 << 20;

/// The bench's VIPs: `198.18.100.1` port 80 with 4 backends, port 81 with 64, port 82 with
/// 1024, all on the default scheduler (slots unknown, so every new flow weighs both hash
/// picks and the members: its most expensive path).
fn config() -> String {
    let mut text = String::from("interface = \"lo\"\n");
    for (port, backends) in [(80, 4), (81, 64), (82, 1024)] {
        text.push_str(&format!(
            "[[vip]]\nname = \"vip{backends}\"\naddress = \"198.18.100.1\"\nport = {port}\n"
        ));
        for b in 0..backends {
            text.push_str(&format!(
                "[[vip.backend]]\naddress = \"198.18.0.1\"\nport = {}\n",
                10_000 + (port - 80) * 2_000 + b
            ));
        }
    }
    text
}

/// Ethernet + IPv4 + TCP to `dport` with the given flags, padded to PKT_LEN.
fn packet(sport: u16, dport: u16, syn: bool) -> [u8; PKT_LEN] {
    let mut out = Vec::new();
    let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4([198, 18, 0, 2], [198, 18, 100, 1], 64)
        .tcp(sport, dport, 1, 65535);
    let b = if syn { b.syn() } else { b.ack(1) };
    b.write(&mut out, &[]).expect("build packet");
    let mut pkt = [0u8; PKT_LEN];
    pkt[..out.len()].copy_from_slice(&out);
    pkt
}

fn run(prog: &Xdp, pkt: &[u8], repeat: u32) -> Duration {
    let mut out = vec![0u8; pkt.len() + 64];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(pkt);
    opts.data_out = Some(&mut out);
    opts.repeat = repeat;
    prog.test_run(opts).expect("BPF_PROG_TEST_RUN").duration
}

/// Runs a case (best of 5 to skip scheduler noise) and checks that `reason` counted exactly
/// `repeat` packets per run.
fn measure(
    dp: &Datapath,
    prog: &Xdp,
    pkt: &[u8],
    repeat: u32,
    reason: Option<Reason>,
    before_each: &mut dyn FnMut(),
) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..5 {
        before_each();
        let count =
            |dp: &Datapath| reason.map(|r| dp.maps.reasons().expect("reasons")[r as usize].1);
        let before = count(dp);
        let ns = run(prog, pkt, repeat).as_nanos() as f64;
        if let (Some(r), Some(b), Some(a)) = (reason, before, count(dp)) {
            assert_eq!(
                a - b,
                u64::from(repeat),
                "{}: every iteration must take this path",
                r.name()
            );
        }
        best = best.min(ns);
    }
    best
}

fn main() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the datapath bench loads BPF programs: run as root"
    );
    let pins = PinDir::new("bench");
    let config = Config::parse(Path::new("bench.toml"), &config()).expect("bench config");
    let mut dp = Datapath::load(
        &pins.path,
        lb_common::maps::ConntrackSizes {
            v4: CONNTRACK,
            v6: CONNTRACK,
        },
    )
    .expect("load gpulb");
    let plan = plan::plan(&plan::static_backends(&config), &[], &[]).expect("plan");
    plan::apply(&mut dp.maps, &plan, None).expect("program maps");

    let mut bench = EbpfLoader::new()
        .load(BENCH_OBJECT)
        .expect("load bench object");
    for name in ["gpulb_noop", "gpulb_bench_wrap"] {
        let p: &mut Xdp = bench
            .program_mut(name)
            .expect("bench program")
            .try_into()
            .expect("XDP");
        p.load().expect("verifier accepts bench program");
    }
    let mut progs = ProgramArray::try_from(bench.take_map("BENCH_PROGS").expect("BENCH_PROGS"))
        .expect("prog array");
    let mut pkt_map: Array<_, [u8; PKT_LEN]> =
        Array::try_from(bench.take_map("BENCH_PKT").expect("BENCH_PKT")).expect("array");
    let mut cfg_map: Array<_, u32> =
        Array::try_from(bench.take_map("BENCH_CFG").expect("BENCH_CFG")).expect("array");
    let noop: &Xdp = bench
        .program("gpulb_noop")
        .expect("noop")
        .try_into()
        .expect("XDP");
    let wrap: &Xdp = bench
        .program("gpulb_bench_wrap")
        .expect("wrap")
        .try_into()
        .expect("XDP");
    let noop_fd = noop.fd().expect("noop fd").try_clone().expect("dup fd");
    let ingress_fd = dp
        .ingress()
        .fd()
        .expect("ingress fd")
        .try_clone()
        .expect("dup fd");

    let syn = packet(40000, 80, true);
    let ack = packet(40001, 80, false);
    let other = packet(40002, 81, true);
    let mut nothing = || {};

    // Floor: a no-op XDP program alone.
    let floor = measure(&dp, noop, &syn, REPEAT, None, &mut nothing);
    // The wrapper's cost: restore (+ fresh source) and tail call into the no-op.
    progs.set(0, &noop_fd, 0).expect("set noop");
    pkt_map.set(0, syn, 0).expect("set packet");
    cfg_map.set(0, 1, 0).expect("fresh sources");
    let wrap_fresh = measure(&dp, wrap, &syn, NEW_FLOW_REPEAT, None, &mut nothing);
    cfg_map.set(0, 0, 0).expect("fixed source");
    let wrap_fixed = measure(&dp, wrap, &syn, REPEAT, None, &mut nothing);

    progs.set(0, &ingress_fd, 0).expect("set ingress");
    // New flows: every iteration a fresh 5-tuple; conntrack emptied between runs.
    cfg_map.set(0, 1, 0).expect("fresh sources");
    let conns_clear = |dp: &mut Datapath| {
        let keys: Vec<_> = dp.maps.conns.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = dp.maps.conns.remove(&k);
        }
        let keys: Vec<_> = dp.maps.revnat.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = dp.maps.revnat.remove(&k);
        }
    };
    // The scheduler's cost must not grow with the backends behind the VIP.
    let mut new_flow = Vec::new();
    for (dport, backends) in [(80u16, 4usize), (81, 64), (82, 1024)] {
        pkt_map
            .set(0, packet(40000, dport, true), 0)
            .expect("set packet");
        let mut runs = Vec::new();
        for _ in 0..3 {
            conns_clear(&mut dp);
            let before = dp.maps.reasons().expect("reasons")[Reason::FwdNewFlow as usize].1;
            let ns = run(wrap, &syn, NEW_FLOW_REPEAT).as_nanos() as f64;
            let after = dp.maps.reasons().expect("reasons")[Reason::FwdNewFlow as usize].1;
            assert_eq!(
                after - before,
                u64::from(NEW_FLOW_REPEAT),
                "every iteration must be a new flow"
            );
            runs.push(ns);
        }
        new_flow.push((
            backends,
            runs.iter().copied().fold(f64::MAX, f64::min) - wrap_fresh,
        ));
    }

    // Established: one SYN creates the flow, then its ACK is repeated.
    cfg_map.set(0, 0, 0).expect("fixed source");
    pkt_map
        .set(0, packet(40001, 80, true), 0)
        .expect("set packet");
    run(wrap, &syn, 1);
    pkt_map.set(0, ack, 0).expect("set packet");
    let established = measure(
        &dp,
        wrap,
        &ack,
        REPEAT,
        Some(Reason::FwdEstablished),
        &mut nothing,
    ) - wrap_fixed;

    // Non-VIP: not rewritten, so measured directly.
    let ingress = dp.ingress();
    let ingress: &Xdp = ingress;
    let non_vip = {
        let mut best = f64::MAX;
        for _ in 0..5 {
            best = best.min(run(ingress, &other, REPEAT).as_nanos() as f64);
        }
        best
    };

    println!(
        "\ngpulb datapath, BPF_PROG_TEST_RUN, best of runs (ns/packet, whole ns from the kernel)"
    );
    println!("{:<34} {:>10} {:>12}", "case", "ns/packet", "x floor");
    let row = |name: &str, ns: f64| println!("{name:<34} {ns:>10.1} {:>11.2}x", ns / floor);
    row("no-op XDP (floor)", floor);
    row("non-VIP packet (pass)", non_vip);
    row("established flow (NAT)", established);
    for (backends, ns) in &new_flow {
        row(&format!("new flow SYN, {backends} backends"), *ns);
    }
    println!(
        "\nwrapper cost subtracted: {wrap_fixed:.1} ns (fixed source), {wrap_fresh:.1} ns (fresh source); \
         repeat {REPEAT} ({NEW_FLOW_REPEAT} for new flows)"
    );
    println!(
        "target: established <= 6x floor: {}",
        if established <= 6.0 * floor {
            "met"
        } else {
            "NOT met"
        }
    );
    let spread = new_flow.iter().map(|f| f.1).fold(0.0, f64::max)
        / new_flow.iter().map(|f| f.1).fold(f64::MAX, f64::min);
    println!(
        "new flow at 1024 backends against 4: {:.2}x (the scheduler weighs a fixed number of \
         candidates)",
        new_flow[2].1 / new_flow[0].1
    );
    let verified = dp.verified_instructions();
    println!("\nverifier, instructions processed at load:");
    for (name, n) in &verified {
        println!(
            "  {name:<20} {}",
            n.map_or_else(|| "(not reported)".into(), |n| n.to_string())
        );
    }
    // For `cargo xtask bench`'s report.
    if let Ok(path) = std::env::var("GPULB_BENCH_JSON") {
        let json = serde_json::json!({
            "floor": floor,
            "non_vip": non_vip,
            "established": established,
            "new_flow": new_flow[0].1,
            "new_flow_by_backends": new_flow,
            "new_flow_spread": spread,
            "wrap_fixed": wrap_fixed,
            "wrap_fresh": wrap_fresh,
            "verified_instructions": verified,
        });
        std::fs::write(&path, json.to_string()).expect("write datapath JSON");
    }
    drop(progs);
    drop(bench);
    drop(dp);
    drop(pins);
}
