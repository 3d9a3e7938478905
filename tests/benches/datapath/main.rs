//! `cargo xtask bench datapath`: ns/packet of gpulb_ingress under BPF_PROG_TEST_RUN.
//!
//! BPF_PROG_TEST_RUN with repeat > 1 does not restore the packet between iterations, and the
//! NAT rewrites it; so the NAT cases run through `gpulb_bench_wrap`, which writes the input
//! back (and, for new flows, a fresh source) and tail-calls gpulb_ingress. The wrapper's own
//! cost is measured by tail-calling `gpulb_noop` and subtracted. Each case checks from the
//! reason counters that every iteration took the intended path.
//!
//! With `GPULB_KATRAN_SRC` (`cargo xtask bench datapath --katran <tree>`), Katran's balancer
//! is built and measured the same way, and the two are compared case by case.

use std::{path::Path, time::Duration};

use aya::{
    EbpfLoader,
    maps::{Array, ProgramArray},
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use gpulb::{BENCH_OBJECT, config::Config, datapath::Datapath, plan};
use gpulb_testbed::PinDir;
use lb_common::Reason;

mod katran;

const PKT_LEN: usize = 80;
const REPEAT: u32 = 1_000_000;
/// New flows per run: below Katran's new-connection cap (125,000 per CPU and second), so
/// that both balancers insert every SYN, and far below the conntrack size (no eviction).
const NEW_FLOW_REPEAT: u32 = 120_000;
const CONNTRACK: u32 = 1 << 20;
/// The SYN flood case: this many distinct sources per run.
const FLOOD_REPEAT: u32 = 1_000_000;
const FLOOD_RUNS: usize = 3;

/// The bench's VIPs: `198.18.100.1` port 80 with 4 backends, port 81 with 64, port 82 with
/// 1024, all on the default scheduler (slots unknown, so every new flow weighs both hash
/// picks and the members: its most expensive path); `[2001:db8:1::1]:80` with 4.
fn config() -> String {
    let mut text = format!("interface = \"lo\"\nconntrack_size = {CONNTRACK}\n");
    text.push_str("[[vip]]\nname = \"vip6\"\naddress = \"2001:db8:1::1\"\nport = 80\n");
    for b in 0..4 {
        text.push_str(&format!(
            "[[vip.backend]]\naddress = \"2001:db8::1\"\nport = {}\n",
            20_000 + b
        ));
    }
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

/// Ethernet + IPv6 + TCP to the IPv6 VIP, padded to PKT_LEN.
fn packet6(sport: u16, syn: bool) -> [u8; PKT_LEN] {
    let mut out = Vec::new();
    let client = [0x20, 0x01, 0x0d, 0xb8, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    let vip = [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv6(client, vip, 64)
        .tcp(sport, 80, 1, 65535);
    let b = if syn { b.syn() } else { b.ack(1) };
    b.write(&mut out, &[]).expect("build packet");
    let mut pkt = [0u8; PKT_LEN];
    pkt[..out.len()].copy_from_slice(&out);
    pkt
}

/// Ethernet + IPv4 + TCP to the VIPs' address, port `dport`, with the given flags, padded
/// to PKT_LEN.
fn packet(sport: u16, dport: u16, syn: bool) -> [u8; PKT_LEN] {
    packet_to([198, 18, 100, 1], sport, dport, syn)
}

/// The same to another address.
fn packet_to(dst: [u8; 4], sport: u16, dport: u16, syn: bool) -> [u8; PKT_LEN] {
    let mut out = Vec::new();
    let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4([198, 18, 0, 2], dst, 64)
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

/// Runs a case `runs` times (the best skips scheduler noise), each after `before_each`, and
/// checks that `reason` counted exactly `repeat` packets per run.
fn measure(
    dp: &Datapath,
    prog: &Xdp,
    pkt: &[u8],
    repeat: u32,
    reason: Option<Reason>,
    runs: usize,
    before_each: &mut dyn FnMut(),
) -> f64 {
    let count = |r: Reason| dp.maps.reasons().expect("reasons")[r as usize].1;
    best(runs, || {
        before_each();
        let before = reason.map(count);
        let ns = run(prog, pkt, repeat).as_nanos() as f64;
        if let (Some(r), Some(b)) = (reason, before) {
            assert_eq!(
                count(r) - b,
                u64::from(repeat),
                "{}: every iteration must take this path",
                r.name()
            );
        }
        ns
    })
}

fn main() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the datapath bench loads BPF programs: run as root"
    );
    // One CPU for the whole run: the wrapper's fresh sources and both balancers' flow tables
    // and counters are per CPU, and a run that migrates would repeat sources.
    let mut cpu = nix::sched::CpuSet::new();
    let online = aya::util::online_cpus().expect("online CPUs");
    let last = *online.last().expect("a CPU is online");
    cpu.set(last as usize).expect("CPU set");
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpu).expect("pin to one CPU");
    let pins = PinDir::new("bench");
    let config = Config::parse(Path::new("bench.toml"), &config()).expect("bench config");
    // Sized as the daemon sizes them for this config (the IPv6 table at its default).
    let mut dp = Datapath::load(&pins.path, config.map_sizes).expect("load gpulb");
    let mut plan = plan::plan(&plan::static_backends(&config), &[], &[]).expect("plan");
    plan::apply(&mut dp.maps, &mut plan, None).expect("program maps");

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
    // Port 83: no VIP (80-82 are).
    let other = packet(40002, 83, true);
    // Port 80 of an address that is no VIP, mid-flow: the port filter lets it through to the
    // conntrack and service lookups, which both miss.
    let other_addr = packet_to([198, 18, 100, 9], 40003, 80, false);
    let mut nothing = || {};

    // Floor: a no-op XDP program alone.
    let floor = measure(&dp, noop, &syn, REPEAT, None, 5, &mut nothing);
    // The wrapper's cost: restore (+ fresh source) and tail call into the no-op.
    progs.set(0, &noop_fd, 0).expect("set noop");
    pkt_map.set(0, syn, 0).expect("set packet");
    cfg_map.set(0, 1, 0).expect("fresh sources");
    let wrap_fresh = measure(&dp, wrap, &syn, NEW_FLOW_REPEAT, None, 5, &mut nothing);
    cfg_map.set(0, 0, 0).expect("fixed source");
    let wrap_fixed = measure(&dp, wrap, &syn, REPEAT, None, 5, &mut nothing);

    progs.set(0, &ingress_fd, 0).expect("set ingress");
    // New flows: every iteration a fresh 5-tuple; conntrack emptied between runs.
    cfg_map.set(0, 1, 0).expect("fresh sources");
    // The pinned table, opened apart from `dp` so that a run's set-up can empty it.
    let mut conns: aya::maps::HashMap<_, lb_common::FlowKey, lb_common::Flow> =
        aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(
            aya::maps::MapData::from_pin(pins.path.join(lb_common::maps::CONNS.name))
                .expect("CONNS pinned"),
        ))
        .expect("CONNS");
    let mut conns_clear = || {
        let keys: Vec<_> = conns.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = conns.remove(&k);
        }
    };
    // The scheduler's cost must not grow with the backends behind the VIP.
    let mut new_flow = Vec::new();
    for (dport, backends) in [(80u16, 4usize), (81, 64), (82, 1024)] {
        pkt_map
            .set(0, packet(40000, dport, true), 0)
            .expect("set packet");
        let ns = measure(
            &dp,
            wrap,
            &syn,
            NEW_FLOW_REPEAT,
            Some(Reason::FwdNewFlow),
            3,
            &mut conns_clear,
        );
        new_flow.push((backends, ns - wrap_fresh));
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
        5,
        &mut nothing,
    ) - wrap_fixed;

    // IPv6 established: the same, through the IPv6 maps.
    pkt_map.set(0, packet6(40001, true), 0).expect("set packet");
    run(wrap, &syn, 1);
    let ack6 = packet6(40001, false);
    pkt_map.set(0, ack6, 0).expect("set packet");
    let established6 = measure(
        &dp,
        wrap,
        &ack6,
        REPEAT,
        Some(Reason::FwdEstablished),
        5,
        &mut nothing,
    ) - wrap_fixed;

    // SYN flood: a fresh source every iteration (1M of them), past the insert budget (the
    // daemon's default): each run starts with this second's budget spent, as Katran's case
    // starts over its cap, so every SYN goes by the consistent hash without state.
    dp.maps
        .set_ct_config(lb_common::CtConfig {
            inserts_per_cpu: lb_common::CT_INSERTS_PER_CPU_DEFAULT,
        })
        .expect("insert budget");
    cfg_map.set(0, 1, 0).expect("fresh sources");
    pkt_map
        .set(0, packet(40000, 80, true), 0)
        .expect("set packet");
    let flood = aya::maps::MapData::from_pin(pins.path.join(lb_common::maps::FLOOD.name))
        .expect("FLOOD pinned");
    let mut flood: aya::maps::PerCpuArray<_, lb_common::FloodState> =
        aya::maps::PerCpuArray::try_from(aya::maps::Map::PerCpuArray(flood)).expect("FLOOD");
    let stateless_count =
        |dp: &Datapath| dp.maps.reasons().expect("reasons")[Reason::FwdStateless as usize].1;
    let stateless_before = stateless_count(&dp);
    let syn_flood = measure(
        &dp,
        wrap,
        &syn,
        FLOOD_REPEAT,
        Some(Reason::FwdStateless),
        FLOOD_RUNS,
        &mut || {
            conns_clear();
            let spent = lb_common::FloodState {
                window_ns: katran::monotonic_ns(),
                inserts: lb_common::CT_INSERTS_PER_CPU_DEFAULT,
                flooded: 1,
                ..Default::default()
            };
            let cpus = aya::util::nr_cpus().expect("possible CPUs");
            let values = aya::maps::PerCpuValues::try_from(vec![spent; cpus]).expect("values");
            flood.set(0, values, 0).expect("spend the budget");
        },
    ) - wrap_fresh;
    let stateless_share = (stateless_count(&dp) - stateless_before) as f64
        / (f64::from(FLOOD_REPEAT) * FLOOD_RUNS as f64);
    let flood_entries = dp.maps.flows().expect("flows").len();
    dp.maps
        .set_ct_config(lb_common::CtConfig::default())
        .expect("no budget");
    cfg_map.set(0, 0, 0).expect("fixed source");

    // Non-VIP: not rewritten, so measured directly.
    let ingress: &Xdp = dp
        .ebpf
        .program(lb_common::programs::INGRESS)
        .expect("gpulb_ingress")
        .try_into()
        .expect("XDP");
    let non_vip = measure(
        &dp,
        ingress,
        &other,
        REPEAT,
        Some(Reason::PassNotVip),
        5,
        &mut nothing,
    );

    let non_vip_on_port = measure(
        &dp,
        ingress,
        &other_addr,
        REPEAT,
        Some(Reason::PassNotVip),
        5,
        &mut nothing,
    );

    let katran = std::env::var_os("GPULB_KATRAN_SRC").map(|src| {
        let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench/katran");
        let obj = katran::build(Path::new(&src), &out);
        let mut k = katran::Katran::load(&obj);
        let fd = k
            .program()
            .fd()
            .expect("Katran's fd")
            .try_clone()
            .expect("dup fd");
        progs.set(0, &fd, 0).expect("set Katran");
        let wrapper = Wrapper {
            prog: wrap,
            pkt: &mut pkt_map,
            cfg: &mut cfg_map,
            fixed: wrap_fixed,
            fresh: wrap_fresh,
        };
        katran_cases(&mut k, wrapper)
    });

    println!(
        "\ngpulb datapath, BPF_PROG_TEST_RUN, best of runs (ns/packet, whole ns from the kernel)"
    );
    println!("{:<34} {:>10} {:>12}", "case", "ns/packet", "x floor");
    let row = |name: &str, ns: f64| println!("{name:<34} {ns:>10.1} {:>11.2}x", ns / floor);
    row("no-op XDP (floor)", floor);
    row("non-VIP packet (pass)", non_vip);
    row("non-VIP address, VIP port (pass)", non_vip_on_port);
    row("established flow (NAT)", established);
    row("established IPv6 flow (NAT)", established6);
    row("SYN flood, 1M sources, flood mode", syn_flood);
    for (backends, ns) in &new_flow {
        row(&format!("new flow SYN, {backends} backends"), *ns);
    }
    println!(
        "\nwrapper cost subtracted: {wrap_fixed:.1} ns (fixed source), {wrap_fresh:.1} ns (fresh source); \
         repeat {REPEAT} ({NEW_FLOW_REPEAT} for new flows)"
    );
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!(
        "targets: new flow <= 8x floor: {}; established <= 4x: {}; non-VIP <= 2x: {}",
        verdict(new_flow[0].1 <= 8.0 * floor),
        verdict(established <= 4.0 * floor),
        verdict(non_vip <= 2.0 * floor),
    );
    println!(
        "SYN flood: {:.1}% of SYNs forwarded without state; {flood_entries} entries \
         made in the last run",
        stateless_share * 100.0
    );
    let spread = new_flow.iter().map(|f| f.1).fold(0.0, f64::max)
        / new_flow.iter().map(|f| f.1).fold(f64::MAX, f64::min);
    println!(
        "new flow at 1024 backends against 4: {:.2}x (the scheduler weighs a fixed number of \
         candidates)",
        new_flow[2].1 / new_flow[0].1
    );
    let gpulb = Cases {
        non_vip,
        established,
        new_flow: new_flow[0].1,
        syn_flood,
    };
    if let Some(k) = &katran {
        compare(&gpulb, k);
    }
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
            "non_vip_on_port": non_vip_on_port,
            "established": established,
            "established6": established6,
            "syn_flood": syn_flood,
            "syn_flood_stateless_share": stateless_share,
            "syn_flood_entries": flood_entries,
            "new_flow": new_flow[0].1,
            "new_flow_by_backends": new_flow,
            "new_flow_spread": spread,
            "wrap_fixed": wrap_fixed,
            "wrap_fresh": wrap_fresh,
            "verified_instructions": verified,
            "katran": katran.as_ref().map(|k| serde_json::json!({
                "non_vip": k.non_vip,
                "established": k.established,
                "new_flow": k.new_flow,
                "syn_flood": k.syn_flood,
            })),
        });
        std::fs::write(&path, json.to_string()).expect("write datapath JSON");
    }
    drop(progs);
    drop(bench);
    drop(dp);
    drop(pins);
}

/// One balancer's figures, each measured as gpulb's are (NAT cases through the wrapper, its
/// cost subtracted; non-VIP directly).
struct Cases {
    non_vip: f64,
    established: f64,
    /// Every SYN a new flow, recorded in the flow table.
    new_flow: f64,
    /// Fresh sources past the flow table's insert limit: forwarded without state.
    syn_flood: f64,
}

/// The restore-and-tail-call wrapper, with the program under test in `BENCH_PROGS[0]`.
struct Wrapper<'a> {
    prog: &'a Xdp,
    pkt: &'a mut Array<aya::maps::MapData, [u8; PKT_LEN]>,
    cfg: &'a mut Array<aya::maps::MapData, u32>,
    /// Its cost with a fixed and with a fresh source per iteration.
    fixed: f64,
    fresh: f64,
}

/// The least of `runs` measurements.
fn best(runs: usize, mut f: impl FnMut() -> f64) -> f64 {
    (0..runs).map(|_| f()).fold(f64::MAX, f64::min)
}

/// Katran's cases, each checked from its own counters and flow table to take the path it
/// is named for.
fn katran_cases(k: &mut katran::Katran, w: Wrapper<'_>) -> Cases {
    let ns = |d: Duration| d.as_nanos() as f64;
    // Established: a SYN makes the flow's LRU entry, then its ACK is repeated, every one an
    // LRU hit.
    w.cfg.set(0, 0, 0).expect("fixed source");
    k.fresh_lru();
    k.set_conn_rate(0, 0);
    let syn = packet(40001, 80, true);
    w.pkt.set(0, syn, 0).expect("set packet");
    run(w.prog, &syn, 1);
    assert_eq!(k.lru_entries(), 1, "Katran recorded the SYN's flow");
    let ack = packet(40001, 80, false);
    w.pkt.set(0, ack, 0).expect("set packet");
    let established = best(5, || {
        let (misses, tx) = (k.lru_misses(), k.tx());
        let t = ns(run(w.prog, &ack, REPEAT));
        assert_eq!(k.lru_misses(), misses, "every ACK finds Katran's LRU entry");
        assert_eq!(k.tx() - tx, u64::from(REPEAT), "Katran forwards every ACK");
        t
    }) - w.fixed;

    // New flows: a fresh source every iteration, a fresh LRU and rate window every run.
    w.cfg.set(0, 1, 0).expect("fresh sources");
    let syn = packet(40000, 80, true);
    w.pkt.set(0, syn, 0).expect("set packet");
    let new_flow = best(3, || {
        k.fresh_lru();
        k.set_conn_rate(0, 0);
        let tx = k.tx();
        let t = ns(run(w.prog, &syn, NEW_FLOW_REPEAT));
        assert_eq!(
            k.tx() - tx,
            u64::from(NEW_FLOW_REPEAT),
            "Katran forwards every SYN"
        );
        assert_eq!(
            k.lru_entries(),
            NEW_FLOW_REPEAT as usize,
            "Katran inserts every SYN below its cap of {} per second",
            katran::MAX_CONN_RATE
        );
        t
    }) - w.fresh;

    // Past its new-connection cap: forwarded by the consistent hash, nothing inserted.
    let syn_flood = best(3, || {
        k.fresh_lru();
        k.set_conn_rate(1 << 62, katran::monotonic_ns());
        let tx = k.tx();
        let t = ns(run(w.prog, &syn, FLOOD_REPEAT));
        assert_eq!(
            k.tx() - tx,
            u64::from(FLOOD_REPEAT),
            "Katran forwards every SYN"
        );
        assert_eq!(k.lru_entries(), 0, "over its cap Katran inserts nothing");
        t
    }) - w.fresh;
    w.cfg.set(0, 0, 0).expect("fixed source");

    // Non-VIP (port 83, as gpulb's case): passed untouched, so run directly.
    let other = packet(40002, 83, true);
    let non_vip = best(5, || {
        let passed = k.passed();
        let t = ns(run(k.program(), &other, REPEAT));
        assert_eq!(
            k.passed() - passed,
            u64::from(REPEAT),
            "Katran passes every non-VIP packet"
        );
        t
    });
    Cases {
        non_vip,
        established,
        new_flow,
        syn_flood,
    }
}

/// gpulb against Katran, case by case, with the targets where it sets one.
fn compare(gpulb: &Cases, katran: &Cases) {
    println!("\ngpulb against Katran's balancer (same run, same wrapper; ns/packet)");
    println!(
        "{:<44} {:>8} {:>8} {:>8}  target",
        "case", "gpulb", "Katran", "ratio"
    );
    let row = |name: &str, g: f64, k: f64, target: Option<f64>| {
        let ratio = g / k;
        let target = target.map_or_else(String::new, |t| {
            format!("<= {t}x: {}", if ratio <= t { "met" } else { "NOT met" })
        });
        println!("{name:<44} {g:>8.1} {k:>8.1} {ratio:>7.2}x  {target}");
    };
    row(
        "established flow",
        gpulb.established,
        katran.established,
        Some(0.8),
    );
    row("new flow", gpulb.new_flow, katran.new_flow, Some(1.2));
    row(
        "SYN flood, no state",
        gpulb.syn_flood,
        katran.syn_flood,
        None,
    );
    row("non-VIP packet", gpulb.non_vip, katran.non_vip, None);
    println!(
        "new flow: gpulb's scheduler over 4 backends, Katran's consistent hash and LRU insert; \
         SYN flood: gpulb in flood mode (its insert budget spent), Katran over its \
         new-connection cap; both forward by the consistent hash without state"
    );
}
