//! The XDP program on a table of packets, through BPF_PROG_TEST_RUN: verdict, reason counter,
//! and output bytes (rewritten with checksums verified by recomputation, or untouched).
//! Needs root (BPF).

#[path = "packets/fixtures.rs"]
mod fixtures;
#[path = "packets/frames.rs"]
mod frames;
#[path = "packets/harness.rs"]
mod harness;

use std::path::Path;

use aya::programs::{TestRun as _, TestRunOptions};
use frames::*;
use gpulb::{config::Config, datapath::Datapath, plan};
use gpulb_testbed::PinDir;
use harness::*;
use lb_common::{Reason, addr6_of};

const CONFIG: &str = r#"
interface = "lo"
conntrack_size = 4096

[[vip]]
name = "chat"
address = "198.18.100.1"
port = 80
maglev_table_size = 1021
affinity = "none"

[[vip.backend]]
address = "198.18.0.1"
port = 8001
[[vip.backend]]
address = "198.18.0.1"
port = 8002
[[vip.backend]]
address = "198.18.0.1"
port = 8003
weight = 2

[[vip]]
name = "dns"
address = "198.18.100.1"
port = 53
protocol = "udp"
maglev_table_size = 251
affinity = "none"

[[vip.backend]]
address = "198.18.0.1"
port = 5353

[[vip]]
name = "empty"
address = "198.18.100.2"
port = 80

[[vip.backend]]
address = "198.18.0.1"
port = 9000
weight = 1

[[vip]]
name = "chat6"
address = "2001:db8:1::1"
port = 80
maglev_table_size = 1021
affinity = "none"

[[vip.backend]]
address = "2001:db8::1"
port = 8001
[[vip.backend]]
address = "2001:db8::1"
port = 8002
[[vip.backend]]
address = "2001:db8::1"
port = 8003
weight = 2

[[vip]]
name = "dns6"
address = "2001:db8:1::1"
port = 53
protocol = "udp"
maglev_table_size = 251
affinity = "none"

[[vip.backend]]
address = "2001:db8::1"
port = 5353
"#;

#[test]
fn xdp_fixture_table() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test loads BPF programs: run it as root (cargo xtask test)"
    );
    let pins = PinDir::new("packets");
    let config = Config::parse(Path::new("fixture.toml"), CONFIG).expect("fixture config");
    let mut dp = Datapath::load(&pins.path, config.map_sizes).expect("load BPF object");
    let mut plan = plan::plan(&plan::static_backends(&config), &[], &[]).expect("plan");
    plan::apply(&mut dp.maps, &mut plan, None).expect("program maps");
    // The "empty" VIP keeps its service but loses its table and members: a VIP with no
    // backend.
    let empty = &plan.services[2];
    let cleared: Vec<(u32, u32)> = (0..empty.service.table_size).map(|s| (s, 0)).collect();
    dp.maps
        .write_slots(empty.service.block, &cleared)
        .expect("clear table");
    dp.maps
        .set_members(empty.service.id, &[])
        .expect("clear members");
    // Room for every flow on its hash's own pick: these fixtures are about parsing and NAT.
    with_slots(&mut dp, &plan, 1000);

    let fixtures = fixtures::table();
    let mut outputs: Vec<(&str, Vec<u8>)> = Vec::new();
    for f in &fixtures {
        let before = dp.maps.reasons().expect("reasons");
        let mut out = vec![0u8; f.packet.len() + 64];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(&f.packet);
        opts.data_out = Some(&mut out);
        let result = dp
            .ingress()
            .test_run(opts)
            .unwrap_or_else(|e| panic!("{}: test run: {e}", f.name));
        out.truncate(result.data_size_out as usize);
        assert_eq!(result.return_value, f.action, "{}: XDP action", f.name);

        let after = dp.maps.reasons().expect("reasons");
        let deltas = reason_deltas(&before, &after);
        assert_eq!(deltas, vec![(f.reason, 1)], "{}: reason counters", f.name);

        match f.expect {
            Expect::Untouched => assert_eq!(out, f.packet, "{}: packet must be untouched", f.name),
            Expect::Nat | Expect::NatSameAs(_) => {
                let key = frame_of(&f.packet);
                let svc = plan
                    .services
                    .iter()
                    .find(|s| s.key.addr == key.dst && s.key.proto == key.proto)
                    .expect("fixture targets a VIP");
                let backend_id = match f.expect {
                    Expect::NatSameAs(prev) => {
                        let prev_out = &outputs
                            .iter()
                            .find(|(n, _)| *n == prev)
                            .expect("earlier fixture")
                            .1;
                        let pf = frame_of(prev_out);
                        svc.backends
                            .iter()
                            .find(|(_, b)| b.addr == pf.dst)
                            .expect("known backend")
                            .0
                    }
                    _ => svc.table[(hash_of(&f.packet) % svc.service.table_size) as usize],
                };
                let backend = svc
                    .backends
                    .iter()
                    .find(|(id, _)| *id == backend_id)
                    .expect("backend in plan")
                    .1;
                let got = frame_of(&out);
                assert_eq!(got.dst, backend.addr, "{}: rewritten destination", f.name);
                assert_eq!(got.src, key.src, "{}: source untouched", f.name);
                assert_checksums_valid(f.name, &out);
                // Only the destination and the checksums differ from the input.
                let (l3, l4) = (got.l3, got.l4);
                let check_at = if key.proto == 6 { l4 + 16 } else { l4 + 6 };
                let changed: Vec<usize> =
                    (0..out.len()).filter(|&i| out[i] != f.packet[i]).collect();
                let allowed = |i: usize| {
                    let address = if got.v6 {
                        (l3 + 24..l3 + 40).contains(&i)
                    } else {
                        (l3 + 10..l3 + 12).contains(&i) || (l3 + 16..l3 + 20).contains(&i)
                    };
                    address
                        || (l4 + 2..l4 + 4).contains(&i)
                        || (check_at..check_at + 2).contains(&i)
                };
                assert!(
                    changed.iter().all(|&i| allowed(i)),
                    "{}: unexpected bytes changed: {changed:?}",
                    f.name
                );
                if f.name.contains("no checksum") {
                    assert_eq!(
                        out[check_at..check_at + 2],
                        [0, 0],
                        "{}: a zero UDP checksum stays zero",
                        f.name
                    );
                }
            }
        }
        outputs.push((f.name, out));
    }

    // Conntrack and reverse NAT hold the NATed flows.
    let flows = dp.maps.flows().expect("flows");
    assert_eq!(
        flows.len(),
        10,
        "one conntrack entry per NATed flow: {flows:?}"
    );
    let v6 = flows.iter().filter(|(k, _)| k.client.is_ipv6()).count();
    assert_eq!(v6, 4, "IPv6 flows in CONNS6: {flows:?}");
    drop(dp);
    drop(pins);
}

const ADMISSION_CONFIG: &str = r#"
interface = "lo"
conntrack_size = 4096

[[vip]]
name = "limited"
address = "198.18.100.3"
port = 80
maglev_table_size = 251
[vip.admission]
rate = 1
burst = 2
refuse = "rst"
allow = ["198.18.0.0/24"]
[[vip.backend]]
address = "198.18.0.1"
port = 8001

[[vip]]
name = "capped"
address = "198.18.100.4"
port = 80
maglev_table_size = 251
[vip.admission]
refuse = "drop"
[[vip.backend]]
address = "198.18.0.1"
port = 8101
max_flows = 1
[[vip.backend]]
address = "198.18.0.1"
port = 8102
max_flows = 1

[[vip]]
name = "sticky"
address = "198.18.100.5"
port = 80
maglev_table_size = 251
affinity = "client"
[[vip.backend]]
address = "198.18.0.1"
port = 8201
[[vip.backend]]
address = "198.18.0.1"
port = 8202
[[vip.backend]]
address = "198.18.0.1"
port = 8203

[[vip]]
name = "limited6"
address = "2001:db8:1::3"
port = 80
maglev_table_size = 251
[vip.admission]
rate = 1
burst = 1
refuse = "rst"
allow = ["2001:db8::/48"]
[[vip.backend]]
address = "2001:db8::1"
port = 8001
"#;

#[test]
fn xdp_admission_control() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test loads BPF programs: run it as root (cargo xtask test)"
    );
    let pins = PinDir::new("admission");
    let config = Config::parse(Path::new("admission.toml"), ADMISSION_CONFIG).expect("config");
    let mut dp = Datapath::load(&pins.path, config.map_sizes).expect("load BPF object");
    let mut plan = plan::plan(&plan::static_backends(&config), &[], &[]).expect("plan");
    plan::apply(&mut dp.maps, &mut plan, None).expect("program maps");
    let limited = [198, 18, 100, 3];
    let (capped, sticky) = ([198, 18, 100, 4], [198, 18, 100, 5]);
    let id = |name: &str| {
        plan.services
            .iter()
            .find(|s| s.name == name)
            .expect("planned")
            .service
            .id
    };

    // Rate limit: 1/s with a burst of 2. Two SYNs pass, the third gets a RST.
    for port in [41000, 41001] {
        let (action, _, reason) = run(
            &mut dp,
            "SYN within burst",
            &tcp_flags(CLIENT, limited, port, true, false),
        );
        assert_eq!(
            (action, reason),
            (XDP_PASS, Reason::FwdNewFlow),
            "SYN {port} within the burst"
        );
    }
    let syn = tcp_flags(CLIENT, limited, 41002, true, false);
    let (action, rst, reason) = run(&mut dp, "SYN over the rate", &syn);
    assert_eq!(
        (action, reason),
        (XDP_TX, Reason::RefuseReset),
        "third SYN refused"
    );
    assert_eq!(rst.len(), 14 + 40, "RST cut to its headers");
    assert_eq!(rst[..6], syn[6..12], "back to the sender's MAC");
    assert_eq!(rst[6..12], syn[..6]);
    let f = flow_of(&rst);
    assert_eq!(
        (
            f.src_be.to_ne_bytes(),
            f.dst_be.to_ne_bytes(),
            u16::from_be(f.sport_be),
            u16::from_be(f.dport_be)
        ),
        (limited, CLIENT, 80, 41002),
        "from the VIP to the client"
    );
    assert_eq!(rst[14 + 20 + 13], 0x14, "RST|ACK");
    assert_eq!(
        rst[14 + 28..14 + 32],
        1001u32.to_be_bytes(),
        "acks the SYN's seq 1000"
    );
    assert_checksums_valid("RST", &rst);

    // A SYN with IPv4 options gets the same 54-byte answer (no options).
    let opts = with_ip_options(tcp_flags(CLIENT, limited, 41003, true, false));
    let (action, rst, reason) = run(&mut dp, "SYN with options over the rate", &opts);
    assert_eq!((action, reason), (XDP_TX, Reason::RefuseReset));
    assert_eq!(rst.len(), 14 + 40, "options dropped from the answer");
    assert_eq!(u16::from_be(flow_of(&rst).dport_be), 41003);
    assert_checksums_valid("RST to a SYN with options", &rst);

    // The established flow of a rate-limited source is untouched.
    let (action, _, reason) = run(
        &mut dp,
        "established",
        &tcp_flags(CLIENT, limited, 41000, false, false),
    );
    assert_eq!(
        (action, reason),
        (XDP_PASS, Reason::FwdEstablished),
        "established flow of a limited source"
    );
    // Another source still gets through.
    let (action, _, reason) = run(
        &mut dp,
        "other source",
        &tcp_flags([198, 18, 0, 3], limited, 41000, true, false),
    );
    assert_eq!(
        (action, reason),
        (XDP_PASS, Reason::FwdNewFlow),
        "another source is not limited"
    );
    // Outside the allow-list: refused.
    let (action, _, reason) = run(
        &mut dp,
        "not allowed",
        &tcp_flags([198, 18, 1, 5], limited, 41000, true, false),
    );
    assert_eq!(
        (action, reason),
        (XDP_TX, Reason::RefuseReset),
        "source outside allow-list"
    );
    let c = dp
        .maps
        .admit_counters(id("limited"))
        .expect("admission counters");
    assert_eq!(
        (c.rate_limited, c.not_allowed, c.backends_full),
        (2, 1, 0),
        "{c:?}"
    );

    // Caps: two backends, one flow each. The second flow goes to the other backend
    // whatever Maglev picked; the third is refused (dropped); a FIN frees a slot.
    let (_, a, reason) = connect(&mut dp, "first capped", CLIENT, capped, 42000);
    assert_eq!(reason, Reason::FwdNewFlow);
    let (_, b, reason) = connect(&mut dp, "second capped", CLIENT, capped, 42001);
    assert_eq!(reason, Reason::FwdNewFlow);
    assert_ne!(
        nat_port(&a),
        nat_port(&b),
        "second flow on the backend with room"
    );
    let third = tcp_flags(CLIENT, capped, 42002, true, false);
    let (action, out, reason) = run(&mut dp, "third capped", &third);
    assert_eq!(
        (action, reason),
        (XDP_DROP, Reason::RefuseDrop),
        "every backend at its cap"
    );
    assert_eq!(out, third, "a dropped SYN is untouched");
    let live = |dp: &Datapath, port: u16| {
        let (bid, _) = plan
            .services
            .iter()
            .flat_map(|s| s.backends.iter())
            .find(|(_, b)| b.addr.port() == port)
            .expect("backend");
        dp.maps.live_flows(*bid).expect("live flows")
    };
    assert_eq!((live(&dp, 8101), live(&dp, 8102)), (1, 1));
    let (_, _, reason) = run(
        &mut dp,
        "FIN",
        &tcp_flags(CLIENT, capped, 42000, false, true),
    );
    assert_eq!(reason, Reason::FwdEstablished, "a FIN is forwarded");
    assert_eq!(live(&dp, nat_port(&a)), 0, "the FIN ended the flow's count");
    let (_, d, reason) = run(
        &mut dp,
        "after FIN",
        &tcp_flags(CLIENT, capped, 42003, true, false),
    );
    assert_eq!(reason, Reason::FwdNewFlow, "a freed slot takes a new flow");
    assert_eq!(nat_port(&d), nat_port(&a));
    let c = dp
        .maps
        .admit_counters(id("capped"))
        .expect("admission counters");
    assert_eq!(c.backends_full, 1, "{c:?}");

    // Affinity: every port of one client lands on one backend, the one the address hash
    // picks, while it has room.
    with_slots(&mut dp, &plan, 100);
    let svc = plan
        .services
        .iter()
        .find(|s| s.name == "sticky")
        .expect("planned");
    let key = flow_of(&tcp_flags(CLIENT, sticky, 1, true, false));
    let want_id = svc.table[(lb_common::affinity_hash(&key) % svc.service.table_size) as usize];
    let want = svc
        .backends
        .iter()
        .find(|(id, _)| *id == want_id)
        .expect("backend")
        .1;
    let mut ports = std::collections::BTreeSet::new();
    for port in 43000..43016 {
        let (_, out, reason) = run(
            &mut dp,
            "sticky",
            &tcp_flags(CLIENT, sticky, port, true, false),
        );
        assert_eq!(reason, Reason::FwdNewFlow);
        ports.insert(nat_port(&out));
    }
    assert_eq!(
        ports.into_iter().collect::<Vec<_>>(),
        vec![want.addr.port()],
        "one backend for all ports"
    );

    // IPv6: the rate limit buckets a source's /64, the answer is an IPv6 RST without the
    // SYN's extension headers, and the allow-list is matched on the IPv6 source.
    let vip6 = [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3];
    let host = |net: u16, last: u8| {
        let mut a = CLIENT6;
        a[6..8].copy_from_slice(&net.to_be_bytes());
        a[15] = last;
        a
    };
    let (_, _, reason) = run(
        &mut dp,
        "IPv6 SYN within burst",
        &tcp6_packet(host(0, 2), vip6, 44000, true),
    );
    assert_eq!(reason, Reason::FwdNewFlow, "IPv6 SYN within the burst");
    let syn6 = with_ext_headers(tcp6_packet(host(0, 3), vip6, 44001, true), &[HOP_BY_HOP]);
    let (action, rst, reason) = run(&mut dp, "IPv6 SYN of the same /64", &syn6);
    assert_eq!(
        (action, reason),
        (XDP_TX, Reason::RefuseReset),
        "another address of the same /64 shares its bucket"
    );
    assert_eq!(rst.len(), 14 + 60, "RST cut to its IPv6 and TCP headers");
    assert_eq!(rst[..6], syn6[6..12], "back to the sender's MAC");
    let want = lb_common::reset_headers6(
        &addr6_of(host(0, 3).into()),
        &addr6_of(vip6.into()),
        44001u16.to_be(),
        80u16.to_be(),
        1000,
    );
    assert_eq!(rst[14..], want, "the IPv6 RST answering the SYN");
    assert_checksums_valid("IPv6 RST", &rst);
    let (_, _, reason) = run(
        &mut dp,
        "IPv6 SYN of another /64",
        &tcp6_packet(host(1, 2), vip6, 44002, true),
    );
    assert_eq!(reason, Reason::FwdNewFlow, "another /64 has its own bucket");
    let outside = [0x20, 0x01, 0x0d, 0xb8, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    let (action, _, reason) = run(
        &mut dp,
        "IPv6 SYN outside the allow-list",
        &tcp6_packet(outside, vip6, 44003, true),
    );
    assert_eq!(
        (action, reason),
        (XDP_TX, Reason::RefuseReset),
        "IPv6 source outside 2001:db8::/48"
    );
    let c = dp
        .maps
        .admit_counters(id("limited6"))
        .expect("admission counters");
    assert_eq!((c.rate_limited, c.not_allowed), (1, 1), "{c:?}");
    drop(dp);
    drop(pins);
}

const SCHEDULER_CONFIG: &str = r#"
interface = "lo"
conntrack_size = 4096

[[vip]]
name = "sched"
address = "198.18.100.6"
port = 80
maglev_table_size = 251
[[vip.backend]]
address = "198.18.0.1"
port = 8301
[[vip.backend]]
address = "198.18.0.1"
port = 8302
[[vip.backend]]
address = "198.18.0.1"
port = 8303
[[vip.backend]]
address = "198.18.0.1"
port = 8304
"#;

/// A rate limit of 500 new flows a second with a burst of one lets a source open a flow
/// every 2 ms, however the kernel's tick falls: the GCRA reads the exact clock (on the
/// coarse one, which stands still for a tick of 4 ms at HZ=250, it would refuse about a
/// quarter of these).
#[test]
fn a_rate_limit_admits_its_rate_with_a_burst_of_one() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test loads BPF programs: run it as root (cargo xtask test)"
    );
    let text = "interface = \"lo\"\n[[vip]]\nname = \"paced\"\naddress = \"198.18.100.6\"\nport = 80\nmaglev_table_size = 251\n[vip.admission]\nrate = 500\nburst = 1\nrefuse = \"drop\"\n[[vip.backend]]\naddress = \"198.18.0.1\"\nport = 8001\n";
    let pins = PinDir::new("paced");
    let config = Config::parse(Path::new("paced.toml"), text).expect("config");
    let mut dp = Datapath::load(&pins.path, config.map_sizes).expect("load BPF object");
    let mut plan = plan::plan(&plan::static_backends(&config), &[], &[]).expect("plan");
    plan::apply(&mut dp.maps, &mut plan, None).expect("program maps");
    let paced = [198, 18, 100, 6];
    for port in 41000..41010 {
        let syn = tcp_flags(CLIENT, paced, port, true, false);
        let (_, _, reason) = run(&mut dp, "SYN at the rate", &syn);
        assert_eq!(
            reason,
            Reason::FwdNewFlow,
            "SYN {port}, 3 ms after the last"
        );
        std::thread::sleep(std::time::Duration::from_millis(3));
    }
    // The limit holds: a SYN less than 2 ms after an admitted one is refused. The pair runs
    // back to back, with the reason counters read only around it (reading them is slow under
    // qemu without KVM), and is tried again while a slow host spaces it wider than 2 ms.
    let mut refused = None;
    for port in (41010..41070).step_by(2) {
        std::thread::sleep(std::time::Duration::from_millis(3));
        let pair = [port, port + 1].map(|p| tcp_flags(CLIENT, paced, p, true, false));
        let before = dp.maps.reasons().expect("reasons");
        let start = std::time::Instant::now();
        let first = run_bare(&mut dp, &pair[0]);
        let second = run_bare(&mut dp, &pair[1]);
        let elapsed = start.elapsed();
        let after = dp.maps.reasons().expect("reasons");
        if first != XDP_DROP && elapsed < std::time::Duration::from_millis(2) {
            refused = Some((second, reason_deltas(&before, &after)));
            break;
        }
    }
    assert_eq!(
        refused,
        Some((
            XDP_DROP,
            vec![(Reason::FwdNewFlow, 1), (Reason::RefuseDrop, 1)]
        )),
        "a SYN right after an admitted one: its action and the pair's reasons"
    );
    drop(dp);
    drop(pins);
}

/// The scheduler's choices, one SYN at a time: the hash's own pick while it has a free slot,
/// elsewhere when it has none (by its live flows, or by what its engine reports when that is
/// fresh), live flows alone when the engine's numbers are stale, and never a backend out of
/// the table.
#[test]
fn xdp_scheduler() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test loads BPF programs: run it as root (cargo xtask test)"
    );
    let pins = PinDir::new("sched");
    let config = Config::parse(Path::new("sched.toml"), SCHEDULER_CONFIG).expect("config");
    let mut dp = Datapath::load(&pins.path, config.map_sizes).expect("load BPF object");
    let mut plan = plan::plan(&plan::static_backends(&config), &[], &[]).expect("plan");
    plan::apply(&mut dp.maps, &mut plan, None).expect("program maps");
    let svc = &plan.services[0];
    let vip = [198, 18, 100, 6];
    let port_of_id = |id: u32| {
        svc.backends
            .iter()
            .find(|(i, _)| *i == id)
            .expect("backend")
            .1
            .addr
            .port()
    };
    let id_of_port = |port: u16| {
        svc.backends
            .iter()
            .find(|(_, b)| b.addr.port() == port)
            .expect("backend")
            .0
    };
    // The backend the client address's consistent hash picks (affinity is the default).
    let primary = |client: [u8; 4]| {
        let key = flow_of(&tcp_flags(client, vip, 1, true, false));
        port_of_id(svc.table[(lb_common::affinity_hash(&key) % svc.service.table_size) as usize])
    };
    let syn = |dp: &mut Datapath, client: [u8; 4], port: u16| {
        let (_, out, reason) = connect(dp, "scheduled SYN", client, vip, port);
        assert_eq!(reason, Reason::FwdNewFlow);
        nat_port(&out)
    };
    let moved = |dp: &Datapath| {
        dp.maps
            .admit_counters(svc.service.id)
            .expect("counters")
            .redirected
    };

    // Two slots each: a client's first two flows stay on its hash's pick, the third moves.
    with_slots(&mut dp, &plan, 2);
    let a = [198, 18, 1, 1];
    let home = primary(a);
    assert_eq!(syn(&mut dp, a, 50000), home, "the hash's own pick first");
    assert_eq!(syn(&mut dp, a, 50001), home, "it still has a free slot");
    let third = syn(&mut dp, a, 50002);
    assert_ne!(third, home, "no free slot left: moved");
    assert_eq!(moved(&dp), 1, "counted as moved");

    // A fresh engine reading that says the pick is busy moves a new client's flow away...
    let b = (2..=250u8)
        .map(|x| [198, 18, 2, x])
        .find(|c| primary(*c) != home && primary(*c) != third)
        .expect("a client whose pick is idle");
    let busy = primary(b);
    let now = gpulb::load::monotonic_ns();
    let engine = |updated_ns| lb_common::EngineLoad {
        updated_ns,
        running: 2,
        waiting: 3,
        slots: 2,
        kv_permille: 0,
        live_at_signal: 0,
        _pad: 0,
    };
    dp.maps
        .set_engine(id_of_port(busy), engine(now))
        .expect("engine load");
    let away = syn(&mut dp, b, 51000);
    assert_ne!(away, busy, "its engine reports a full batch and a queue");
    // ...and once that reading is stale (older than signal_max_age_ms, 500 ms by default),
    // live flows alone count: the pick has none, so it takes the flow.
    dp.maps
        .set_engine(id_of_port(busy), engine(now - 10_000_000_000))
        .expect("engine load");
    assert_eq!(syn(&mut dp, b, 51001), busy, "a stale reading is ignored");

    // A backend flagged out of the table takes no new flow, even as the hash's pick (before
    // the daemon has rewritten the table).
    let c = (2..=250u8)
        .map(|x| [198, 18, 3, x])
        .find(|c| primary(*c) != home && primary(*c) != busy)
        .expect("a client whose pick has room");
    let out = primary(c);
    let (out_id, mut entry) = *svc
        .backends
        .iter()
        .find(|(_, b)| b.addr.port() == out)
        .expect("backend");
    entry.flags |= lb_common::BACKEND_OUT;
    dp.maps.set_backend(out_id, &entry).expect("flag out");
    for port in 52000..52004 {
        assert_ne!(
            syn(&mut dp, c, port),
            out,
            "never to a backend out of the table"
        );
    }
    drop(dp);
    drop(pins);
}

/// The scheduler fixture's four backends with 4 slots each, balanced (`prefix_affinity`
/// off), programmed into a loaded data path pinned under a directory of `tag`.
fn balanced(tag: &str) -> (PinDir, Datapath, plan::Plan) {
    let pins = PinDir::new(tag);
    let text = SCHEDULER_CONFIG.replace(
        "maglev_table_size = 251\n",
        "maglev_table_size = 251\n[vip.scheduler]\nprefix_affinity = \"off\"\n",
    );
    let config = Config::parse(Path::new("sched.toml"), &text).expect("config");
    let mut dp = Datapath::load(&pins.path, config.map_sizes).expect("load BPF object");
    let mut plan = plan::plan(&plan::static_backends(&config), &[], &[]).expect("plan");
    plan::apply(&mut dp.maps, &mut plan, None).expect("program maps");
    with_slots(&mut dp, &plan, 4);
    (pins, dp, plan)
}

/// Balanced (`prefix_affinity` off, or auto while the prefix caches miss): each new flow
/// goes to the least loaded backend, so one client's flows spread over all of them, while
/// sticky keeps them on its hash's pick as long as that is within its slack of the rest.
#[test]
fn xdp_scheduler_balanced() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test loads BPF programs: run it as root (cargo xtask test)"
    );
    let (pins, mut dp, plan) = balanced("balanced");
    let svc = &plan.services[0];
    let sid = svc.service.id;
    assert!(!dp.maps.sched(sid).expect("sched").is_sticky());
    let vip = [198, 18, 100, 6];
    let client = [198, 18, 1, 1];
    let key = flow_of(&tcp_flags(client, vip, 1, true, false));
    let home_id = svc.table[(lb_common::affinity_hash(&key) % svc.service.table_size) as usize];
    let home = svc
        .backends
        .iter()
        .find(|(i, _)| *i == home_id)
        .expect("backend")
        .1
        .addr
        .port();
    let syn = |dp: &mut Datapath, port: u16| {
        let (_, out, reason) = connect(dp, "balanced SYN", client, vip, port);
        assert_eq!(reason, Reason::FwdNewFlow);
        nat_port(&out)
    };
    let mut seen: Vec<u16> = (50000..50004).map(|p| syn(&mut dp, p)).collect();
    seen.sort_unstable();
    assert_eq!(
        seen,
        [8301, 8302, 8303, 8304],
        "each flow to the least loaded: one on each"
    );
    // The same loads, sticky: the client's next flow stays on its pick (it has room).
    let sched = dp.maps.sched(sid).expect("sched");
    dp.maps
        .set_sched(
            sid,
            lb_common::Sched {
                flags: lb_common::SCHED_STICKY,
                ..sched
            },
        )
        .expect("sched");
    assert_eq!(syn(&mut dp, 50004), home, "sticky keeps it on its pick");
    assert_eq!(
        syn(&mut dp, 50005),
        home,
        "2 flows there, 1 elsewhere: still"
    );
    assert_ne!(
        syn(&mut dp, 50006),
        home,
        "3 there, 1 elsewhere: past its slack (a quarter of its 4 slots, one flow)"
    );
    drop(dp);
    drop(pins);
}

/// An instance that died refuses connections until it is ejected; with no flows left it
/// looks least loaded, so without a signal every new connection would go to it. Its RST to a
/// SYN, seen at TC egress, puts it last for a while; a RST of an established flow does not.
#[test]
fn a_backend_that_refuses_a_syn_comes_last() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test loads BPF programs: run it as root (cargo xtask test)"
    );
    let (pins, mut dp, _plan) = balanced("refused");
    let (vip, client) = ([198, 18, 100, 6], [198, 18, 1, 1]);
    let syn = |dp: &mut Datapath, port: u16| {
        let (_, out, reason) = run(dp, "SYN", &tcp_flags(client, vip, port, true, false));
        assert_eq!(reason, Reason::FwdNewFlow);
        nat_port(&out)
    };

    // An established flow's RST (sequence number not 0) is no refusal.
    let reset = syn(&mut dp, 40000);
    let (action, out) = run_egress(&mut dp, &backend_rst(reset, client, 40000, 777));
    assert_eq!(action, -1, "TC_ACT_UNSPEC: on to the next filter");
    assert_eq!(&out[26..30], &vip, "the reply's source is the VIP again");
    let mut after_reset: Vec<u16> = (40001..40005).map(|p| syn(&mut dp, p)).collect();
    after_reset.sort_unstable();
    assert_eq!(
        after_reset,
        [8301, 8302, 8303, 8304],
        "all four still chosen"
    );

    // A refusal: the next connections go to the other three, although it has the fewest.
    let refused = syn(&mut dp, 41000);
    let (action, _) = run_egress(&mut dp, &backend_rst(refused, client, 41000, 0));
    assert_eq!(action, -1, "TC_ACT_UNSPEC");
    let next: Vec<u16> = (41001..41007).map(|p| syn(&mut dp, p)).collect();
    assert!(
        !next.contains(&refused),
        "{refused} refused a SYN and still got new flows: {next:?}"
    );
    drop(dp);
    drop(pins);
}
