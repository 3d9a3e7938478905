//! Conntrack that floods cannot game, packet by packet through BPF_PROG_TEST_RUN: state only
//! from packets that open a flow, a SYN always admitted and chosen anew, flows counted at the
//! end of their handshake, an insert budget per CPU, ids that do not hand flows on, counts
//! that heal both ways, IPv6 rate-limit prefixes. Needs root (BPF).

#[path = "packets/frames.rs"]
#[expect(dead_code, reason = "shared with packets.rs, which uses the rest")]
mod frames;
#[path = "packets/harness.rs"]
#[expect(dead_code, reason = "shared with packets.rs, which uses the rest")]
mod harness;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::Path,
};

use etherparse::PacketBuilder;
use frames::*;
use gpulb::{
    config::Config,
    daemon::reconcile::Reconciler,
    datapath::Datapath,
    maps::{Maps, VipAddr},
    plan::{self, Plan},
};
use gpulb_testbed::PinDir;
use harness::*;
use lb_common::{CtConfig, PROTO_TCP, PROTO_UDP, Reason};

const CONFIG: &str = r#"
interface = "lo"
conntrack_size = 4096

[[vip]]
name = "capped"
address = "198.18.100.7"
port = 80
maglev_table_size = 251
[vip.admission]
refuse = "drop"
[[vip.backend]]
address = "198.18.0.1"
port = 8401
max_flows = 1
[[vip.backend]]
address = "198.18.0.1"
port = 8402
max_flows = 1

[[vip]]
name = "guarded"
address = "198.18.100.8"
port = 80
maglev_table_size = 251
[vip.scheduler]
prefix_affinity = "off"
[vip.admission]
refuse = "rst"
allow = ["198.18.0.0/24"]
[[vip.backend]]
address = "198.18.0.1"
port = 8501
[[vip.backend]]
address = "198.18.0.1"
port = 8502
"#;

const CAPPED: [u8; 4] = [198, 18, 100, 7];
const GUARDED: [u8; 4] = [198, 18, 100, 8];

fn as_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test loads BPF programs: run it as root (cargo xtask test)"
    );
}

/// Loads the programs with `text`'s VIPs programmed, every backend with room to spare.
fn load(tag: &str, text: &str) -> (PinDir, Datapath, Plan) {
    let pins = PinDir::new(tag);
    let config = Config::parse(Path::new("conntrack.toml"), text).expect("config");
    let mut dp = Datapath::load(&pins.path, config.map_sizes).expect("load BPF object");
    let mut plan = plan::plan(&plan::static_backends(&config), &[], &[]).expect("plan");
    plan::apply(&mut dp.maps, &mut plan, None).expect("program maps");
    with_slots(&mut dp, &plan, 100);
    (pins, dp, plan)
}

/// The backend id with this port.
fn id_of(plan: &Plan, port: u16) -> u32 {
    plan.services
        .iter()
        .flat_map(|s| &s.backends)
        .find(|(_, b)| b.addr.port() == port)
        .expect("backend")
        .0
}

fn live(dp: &Datapath, plan: &Plan, port: u16) -> u64 {
    dp.maps.live_flows(id_of(plan, port)).expect("live flows")
}

/// Keeps this thread on one CPU: the insert budget is per CPU.
fn pin_to_one_cpu() {
    let mut set = nix::sched::CpuSet::new();
    set.set(0).expect("cpu 0");
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).expect("pin to CPU 0");
}

/// Spoofed SYNs, which never complete a handshake, fill no cap: a real client still gets in.
#[test]
fn spoofed_syns_fill_no_cap() {
    as_root();
    let (pins, mut dp, plan) = load("ct-spoof", CONFIG);
    for i in 0..20u8 {
        let (action, _, reason) = run(
            &mut dp,
            "spoofed SYN",
            &tcp_flags([198, 18, 7, i], CAPPED, 30000, true, false),
        );
        assert_eq!((action, reason), (XDP_PASS, Reason::FwdNewFlow), "SYN {i}");
    }
    assert_eq!(
        (live(&dp, &plan, 8401), live(&dp, &plan, 8402)),
        (0, 0),
        "half-open flows count nowhere"
    );
    let (action, a, reason) = connect(&mut dp, "real client", CLIENT, CAPPED, 31000);
    assert_eq!((action, reason), (XDP_PASS, Reason::FwdNewFlow));
    let (_, b, reason) = connect(&mut dp, "second real client", CLIENT, CAPPED, 31001);
    assert_eq!(reason, Reason::FwdNewFlow);
    assert_ne!(
        nat_port(&a),
        nat_port(&b),
        "a completed handshake takes the cap"
    );
    assert_eq!((live(&dp, &plan, 8401), live(&dp, &plan, 8402)), (1, 1));
    let (action, _, reason) = connect(&mut dp, "third", CLIENT, CAPPED, 31002);
    assert_eq!(
        (action, reason),
        (XDP_DROP, Reason::RefuseDrop),
        "both caps full now"
    );
    drop(dp);
    drop(pins);
}

/// A SYN on a tuple conntrack knows is a new flow: admitted again (refused once its source
/// leaves the allow-list, and nothing of the old flow forwards then) and chosen again (not
/// sent to a drained backend). The old flow's count ends.
#[test]
fn a_replayed_syn_is_admitted_and_chosen_again() {
    as_root();
    // The insert budget spent below is per CPU.
    pin_to_one_cpu();
    let (pins, mut dp, plan) = load("ct-replay", CONFIG);
    let guarded = &plan.services[1];
    let sid = guarded.service.id;
    let (_, first, reason) = connect(&mut dp, "flow", CLIENT, GUARDED, 32000);
    assert_eq!(reason, Reason::FwdNewFlow);
    let port = nat_port(&first);
    assert_eq!(live(&dp, &plan, port), 1);

    // The source leaves the allow-list: the replayed SYN is refused, and so is the rest.
    let net = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 0));
    dp.maps.remove_prefix(sid, net, 24).expect("remove prefix");
    let (action, _, reason) = run(
        &mut dp,
        "replayed SYN",
        &tcp_flags(CLIENT, GUARDED, 32000, true, false),
    );
    assert_eq!(
        (action, reason),
        (XDP_TX, Reason::RefuseReset),
        "re-admitted, refused"
    );
    let (_, _, reason) = run(
        &mut dp,
        "ACK after the refused SYN",
        &tcp_flags(CLIENT, GUARDED, 32000, false, false),
    );
    assert_eq!(reason, Reason::RefuseDrop, "no entry forwards it");
    assert_eq!(
        live(&dp, &plan, port),
        0,
        "the replaced flow no longer counts"
    );

    // Allowed again, the flow's backend drained: the replayed SYN goes to the other one.
    dp.maps.allow_prefix(sid, net, 24).expect("allow prefix");
    let (_, again, _) = connect(&mut dp, "flow again", CLIENT, GUARDED, 32001);
    let drained = nat_port(&again);
    let config = Config::parse(Path::new("conntrack.toml"), CONFIG).expect("config");
    let mut desired = plan::static_backends(&config);
    for b in &mut desired[1].backends {
        if b.port == drained {
            b.in_table = false;
            b.flags |= lb_common::BACKEND_DRAINING;
        }
    }
    let current = (
        dp.maps.services().expect("services"),
        dp.maps.backends().expect("backends"),
    );
    let mut drained_plan = plan::plan(&desired, &current.0, &current.1).expect("plan");
    plan::apply(&mut dp.maps, &mut drained_plan, None).expect("drain");
    let (_, est, reason) = run(
        &mut dp,
        "established on the drained backend",
        &tcp_flags(CLIENT, GUARDED, 32001, false, false),
    );
    assert_eq!(
        (reason, nat_port(&est)),
        (Reason::FwdEstablished, drained),
        "a drain keeps established flows"
    );
    let (_, replay, reason) = connect(&mut dp, "replayed SYN", CLIENT, GUARDED, 32001);
    assert_eq!(reason, Reason::FwdNewFlow);
    let chosen = nat_port(&replay);
    assert_ne!(chosen, drained, "chosen again: not the drained backend");
    assert_eq!(
        live(&dp, &plan, drained),
        0,
        "the replaced flow's count ended"
    );
    assert_eq!(live(&dp, &plan, chosen), 1, "the new flow counts");

    // Past the insert budget the replayed SYN goes without state, and the old entry goes
    // with it: the old flow's packets no longer find it.
    dp.maps
        .set_ct_config(CtConfig { inserts_per_cpu: 1 })
        .expect("budget");
    let spent = (0..4u16).any(|i| {
        let syn = tcp_flags(CLIENT, GUARDED, 32100 + i, true, false);
        run(&mut dp, "SYN spending the budget", &syn).2 == Reason::FwdStateless
    });
    assert!(spent, "a budget of 1 is spent within 4 SYNs");
    let (_, _, reason) = run(
        &mut dp,
        "replayed SYN in flood mode",
        &tcp_flags(CLIENT, GUARDED, 32001, true, false),
    );
    assert_eq!(reason, Reason::FwdStateless);
    let vip = VipAddr {
        addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::from(GUARDED)), 80),
        proto: PROTO_TCP,
    };
    let client = SocketAddr::new(IpAddr::V4(Ipv4Addr::from(CLIENT)), 32001);
    assert!(
        dp.maps.flow(client, &vip).expect("flow").is_none(),
        "the replaced entry is gone"
    );
    assert_eq!(live(&dp, &plan, chosen), 0, "and its count ended");
    drop(dp);
    drop(pins);
}

/// Past the CPU's insert budget, packets without an entry are forwarded by the consistent
/// hash and leave no state: an ACK flood cannot evict live flows or fill caps. The replies
/// of a flow opened then still leave as the VIP; a direct connection's do not.
#[test]
fn a_flood_past_the_insert_budget_leaves_no_state() {
    as_root();
    pin_to_one_cpu();
    let (pins, mut dp, plan) = load("ct-flood", CONFIG);
    let capped = &plan.services[0];
    let entries = |dp: &Datapath| dp.maps.flows().expect("flows").len();
    // Without a budget an entry lost mid-flow is made again, uncounted.
    let (_, _, reason) = run(
        &mut dp,
        "mid-flow ACK",
        &tcp_flags([198, 18, 8, 1], CAPPED, 33000, false, false),
    );
    assert_eq!(reason, Reason::FwdRehashed);
    assert_eq!(entries(&dp), 1);

    dp.maps
        .set_ct_config(CtConfig { inserts_per_cpu: 8 })
        .expect("budget");
    let mut reasons = Vec::new();
    for i in 0..100u16 {
        let src = [198, 18, 9, (i % 250) as u8];
        let (action, out, reason) = run(
            &mut dp,
            "flooding ACK",
            &tcp_flags(src, CAPPED, 34000 + i, false, false),
        );
        assert_eq!(action, XDP_PASS, "forwarded");
        let key = flow_of(&tcp_flags(src, CAPPED, 34000 + i, false, false));
        let pick =
            capped.table[(lb_common::affinity_hash(&key) % capped.service.table_size) as usize];
        assert_eq!(
            nat_port(&out),
            port_of(&plan, pick),
            "by the consistent hash"
        );
        reasons.push(reason);
    }
    let made = reasons
        .iter()
        .filter(|r| **r == Reason::FwdRehashed)
        .count();
    let stateless = reasons
        .iter()
        .filter(|r| **r == Reason::FwdStateless)
        .count();
    assert!(made <= 8, "at most the budget makes entries: {made}");
    assert_eq!(made + stateless, 100, "{reasons:?}");
    assert!(
        entries(&dp) <= 9,
        "no state past the budget: {}",
        entries(&dp)
    );
    assert_eq!(
        (live(&dp, &plan, 8401), live(&dp, &plan, 8402)),
        (0, 0),
        "mid-flow entries never count"
    );
    let flood = dp.maps.flood().expect("flood counters");
    assert!(flood.flood_seconds >= 1, "{flood:?}");
    assert!(flood.stateless >= stateless as u64, "{flood:?}");

    // A new flow in flood mode: the consistent hash, no entry; its reply still leaves as
    // the VIP (the hash sends that flow to the replying backend)... The budget is spent again
    // first, in case its one-second window turned over meanwhile.
    let mut syn_out = None;
    for attempt in 0..3u16 {
        for i in 0..10u16 {
            let src = [198, 18, 10, i as u8];
            run(
                &mut dp,
                "spend",
                &tcp_flags(src, CAPPED, 38000 + attempt * 10 + i, false, false),
            );
        }
        let (_, out, reason) = run(
            &mut dp,
            "SYN in flood mode",
            &tcp_flags(CLIENT, CAPPED, 35000, true, false),
        );
        if reason == Reason::FwdStateless {
            syn_out = Some(out);
            break;
        }
    }
    let syn_out = syn_out.expect("a SYN in flood mode within three windows");
    let backend = nat_port(&syn_out);
    let (_, reply) = run_egress(&mut dp, &backend_ack(backend, CLIENT, 35000));
    assert_eq!(
        &reply[26..30],
        &CAPPED,
        "a stateless flow's reply: from the VIP"
    );
    // ...and a direct connection to the other backend keeps its addresses.
    let other = [8401, 8402]
        .into_iter()
        .find(|p| *p != backend)
        .expect("other");
    let direct = backend_ack(other, CLIENT, 35000);
    let (_, out) = run_egress(&mut dp, &direct);
    assert_eq!(out, direct, "not a VIP flow: untouched");
    drop(dp);
    drop(pins);
}

/// A backend id handed to a new backend does not take the flows of the one before: they
/// are chosen again, and neither their SYN nor their end counts down the new one.
#[test]
fn a_reused_id_does_not_inherit_flows() {
    as_root();
    let (pins, mut dp, plan) = load("ct-reuse", CONFIG);
    // Four flows on "guarded" (balanced: two on each backend); then 8501 is replaced by
    // 8503, which gets its id.
    let gone = 8501;
    let mut on_gone = Vec::new();
    for port in 36000..36004 {
        let (_, out, reason) = connect(&mut dp, "flow", CLIENT, GUARDED, port);
        assert_eq!(reason, Reason::FwdNewFlow);
        if nat_port(&out) == gone {
            on_gone.push(port);
        }
    }
    assert_eq!(on_gone.len(), 2, "balanced over both backends");
    let old_id = id_of(&plan, gone);
    let text = CONFIG.replacen("port = 8501", "port = 8503", 1);
    let config = Config::parse(Path::new("conntrack.toml"), &text).expect("config");
    let desired = plan::static_backends(&config);
    let current = (
        dp.maps.services().expect("services"),
        dp.maps.backends().expect("backends"),
    );
    // Removal first (as a reload that removes one backend), then the addition.
    let mut without = desired.clone();
    without[1].backends.retain(|b| b.port != 8503);
    let mut removed = plan::plan(&without, &current.0, &current.1).expect("plan");
    plan::apply(&mut dp.maps, &mut removed, None).expect("remove");
    let current = (
        dp.maps.services().expect("services"),
        dp.maps.backends().expect("backends"),
    );
    let mut added = plan::plan(&desired, &current.0, &current.1).expect("plan");
    plan::apply(&mut dp.maps, &mut added, None).expect("add");
    assert_eq!(id_of(&added, 8503), old_id, "the id was handed on");
    with_slots(&mut dp, &added, 100);
    let fresh = dp.maps.live_count(old_id).expect("count");
    assert_eq!(fresh.effective(), 0, "the new backend starts with no flows");

    // A SYN reusing the first old flow's 5-tuple: its stale (counted) entry is not counted
    // down against the id's new holder.
    run(
        &mut dp,
        "SYN on a stale entry",
        &tcp_flags(CLIENT, GUARDED, on_gone[0], true, false),
    );
    assert_eq!(
        dp.maps.live_count(old_id).expect("count"),
        fresh,
        "no count down"
    );
    // The second old flow's next packet: chosen again, and its FIN counts nothing down.
    let (_, out, reason) = run(
        &mut dp,
        "old flow's packet",
        &tcp_flags(CLIENT, GUARDED, on_gone[1], false, false),
    );
    assert_eq!(
        reason,
        Reason::FwdRehashed,
        "its entry is stale: chosen again"
    );
    run(
        &mut dp,
        "old flow's FIN",
        &tcp_flags(CLIENT, GUARDED, on_gone[1], false, true),
    );
    assert_eq!(
        dp.maps.live_count(old_id).expect("count"),
        fresh,
        "the old flow's end does not count down the new backend ({})",
        nat_port(&out)
    );
    drop(dp);
    drop(pins);
}

/// Replies find their VIP after the backends move between VIPs (the old id's clean-up keeps
/// the new holder's entry) and after the maps are read back (a takeover or an upgrade from a
/// version without `VIP_OF`: every backend's entry is written again).
#[test]
fn replies_find_their_vip_after_moves_and_takeovers() {
    as_root();
    let (pins, mut dp, _plan) = load("ct-vipof", CONFIG);
    // 8402 moves from "capped" to "guarded" (in place of 8502) in one reload.
    let text =
        CONFIG
            .replacen("port = 8402", "port = 8403", 1)
            .replacen("port = 8502", "port = 8402", 1);
    let config = Config::parse(Path::new("conntrack.toml"), &text).expect("config");
    let current = (
        dp.maps.services().expect("services"),
        dp.maps.backends().expect("backends"),
    );
    let mut moved =
        plan::plan(&plan::static_backends(&config), &current.0, &current.1).expect("plan");
    plan::apply(&mut dp.maps, &mut moved, None).expect("move");
    with_slots(&mut dp, &moved, 100);
    let reply_is_from = |dp: &mut Datapath, client_port: u16| -> Option<[u8; 4]> {
        let (_, out, reason) = connect(dp, "flow", CLIENT, GUARDED, client_port);
        assert_eq!(reason, Reason::FwdNewFlow);
        let (_, reply) = run_egress(dp, &backend_ack(nat_port(&out), CLIENT, client_port));
        (nat_port(&out) == 8402).then(|| reply[26..30].try_into().expect("4 bytes"))
    };
    let from = (37000..37010)
        .find_map(|p| reply_is_from(&mut dp, p))
        .expect("a flow on the moved backend");
    assert_eq!(
        from, GUARDED,
        "the moved backend's replies come from its new VIP"
    );

    // Read back: the same plan applied to maps whose VIP_OF is empty.
    let backends = dp.maps.backends().expect("backends");
    for (id, b) in &backends {
        dp.maps.remove_vip_of(b.addr, *id).expect("forget");
    }
    let current = (dp.maps.services().expect("services"), backends);
    let mut again =
        plan::plan(&plan::static_backends(&config), &current.0, &current.1).expect("plan");
    plan::apply(&mut dp.maps, &mut again, None).expect("apply");
    let from = (37010..37020)
        .find_map(|p| reply_is_from(&mut dp, p))
        .expect("a flow on the moved backend");
    assert_eq!(from, GUARDED, "VIP_OF written again");
    drop(dp);
    drop(pins);
}

/// A VIP's new Maglev table is written into its other block while the data path reads the
/// old one, untouched, and the service's entry then switches to it in one write.
#[test]
fn a_new_table_is_switched_to_whole() {
    as_root();
    let (pins, mut dp, plan) = load("ct-swap", CONFIG);
    let first = plan.services[1].clone();
    let config = Config::parse(Path::new("conntrack.toml"), CONFIG).expect("config");
    let replan = |dp: &mut Datapath, out_of_table: Option<u16>| {
        let mut desired = plan::static_backends(&config);
        for b in &mut desired[1].backends {
            b.in_table = Some(b.port) != out_of_table;
        }
        let current = (
            dp.maps.services().expect("services"),
            dp.maps.backends().expect("backends"),
        );
        let mut p = plan::plan(&desired, &current.0, &current.1).expect("plan");
        plan::apply(&mut dp.maps, &mut p, None).expect("apply");
        p.services[1].clone()
    };
    let service_now = |dp: &Datapath| {
        dp.maps
            .services()
            .expect("services")
            .into_iter()
            .find(|(k, _)| *k == first.key)
            .expect("guarded")
            .1
    };
    // 8502 leaves the table: the new table in the other block, the old one as it was.
    let second = replan(&mut dp, Some(8502));
    assert_ne!(second.table, first.table);
    assert_eq!(
        second.service.block,
        lb_common::Service::other_block(first.service.block)
    );
    assert_eq!(
        service_now(&dp),
        second.service,
        "the entry names the new block"
    );
    assert_eq!(
        dp.maps.maglev_table(&first.service).expect("old block"),
        first.table,
        "the block in use until the switch was never written"
    );
    assert_eq!(
        dp.maps.maglev_table(&second.service).expect("new block"),
        second.table
    );
    for port in 39000..39010 {
        let (_, out, _) = connect(&mut dp, "flow", CLIENT, GUARDED, port);
        assert_ne!(nat_port(&out), 8502, "new flows by the new table");
    }
    // Back in: the first block again, now with the third table; the second one untouched.
    let third = replan(&mut dp, None);
    assert_eq!(third.service.block, first.service.block);
    assert_eq!(service_now(&dp), third.service);
    assert_eq!(
        dp.maps.maglev_table(&third.service).expect("block"),
        third.table
    );
    assert_eq!(
        dp.maps.maglev_table(&second.service).expect("block"),
        second.table
    );
    // Nothing changed: no write, the same block.
    let fourth = replan(&mut dp, None);
    assert_eq!(fourth.service, third.service);
    drop(dp);
    drop(pins);
}

/// A full-size table (65537 slots, several batches each way) is written and read back
/// whole, a change in every batch is read back from a second handle, and a read past the
/// end of the map is an error, not slots from its start.
#[test]
fn a_full_size_table_is_written_and_read_in_batches() {
    as_root();
    let full = CONFIG.replacen("maglev_table_size = 251\n", "", 1);
    let (pins, mut dp, plan) = load("ct-batch", &full);
    let service = plan.services[0].service;
    assert_eq!(service.table_size, 65537);
    assert_eq!(
        dp.maps.maglev_table(&service).expect("read"),
        plan.services[0].table,
        "the plan's table, read back"
    );
    let spare = lb_common::Service {
        block: lb_common::Service::other_block(service.block),
        ..service
    };
    let first: Vec<u32> = (0..65537).map(|i| i % 7 + 1).collect();
    dp.maps.write_table(spare.block, &first).expect("write");
    let mut second = first.clone();
    for slot in (0..65537).step_by(1000) {
        second[slot] = 9;
    }
    dp.maps.write_table(spare.block, &second).expect("write");
    let fresh = dp.maps.duplicate().expect("second handle");
    assert_eq!(fresh.maglev_table(&spare).expect("read"), second);
    assert_eq!(
        fresh.maglev_table(&service).expect("read"),
        plan.services[0].table,
        "the block in use untouched"
    );
    let last = lb_common::Service {
        block: lb_common::MAGLEV_ENTRIES / lb_common::MAGLEV_MAX_SIZE - 1,
        ..service
    };
    assert_eq!(
        fresh.maglev_table(&last).expect("the last block").len(),
        65537
    );
    let past = lb_common::Service {
        table_size: lb_common::MAGLEV_MAX_SIZE + 1,
        ..last
    };
    let err = fresh
        .maglev_table(&past)
        .expect_err("one slot past the end of MAGLEV");
    assert!(format!("{err:?}").contains("Short"), "{err:?}");
    drop(fresh);
    drop(dp);
    drop(pins);
}

/// A restart with another `conntrack_size` makes new tables and carries the flows over
/// (the config's size, the same entries), instead of refusing the pinned maps.
#[test]
fn a_resized_conntrack_keeps_its_flows() {
    as_root();
    let (pins, mut dp, _plan) = load("ct-resize", CONFIG);
    for port in 40000..40010 {
        connect(&mut dp, "flow", CLIENT, GUARDED, port);
    }
    let before: Vec<_> = dp
        .maps
        .flows()
        .expect("flows")
        .into_iter()
        .map(|(k, f)| (k, f.backend))
        .collect();
    assert_eq!(before.len(), 10);
    drop(dp);
    let bigger = CONFIG.replacen("conntrack_size = 4096", "conntrack_size = 8192", 1);
    let config = Config::parse(Path::new("conntrack.toml"), &bigger).expect("config");
    let mut dp = Datapath::load(&pins.path, config.map_sizes).expect("load with a new size");
    // What the old programs open between the load and the takeover joins too: a flow put
    // into the old table now (as its programs would) is carried by the second pass.
    let old = std::fs::read_dir(&pins.path)
        .expect("pins")
        .flatten()
        .find(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{}_RESIZED", lb_common::maps::CONNS.name))
        })
        .expect("the old table is kept until the takeover")
        .path();
    let data = aya::maps::MapData::from_pin(&old).expect("old table");
    let mut old_table: aya::maps::HashMap<_, lb_common::FlowKey, lb_common::Flow> =
        aya::maps::HashMap::try_from(aya::maps::Map::from_map_data(data).expect("map"))
            .expect("typed");
    let late = frames::flow_of(&tcp_flags(CLIENT, GUARDED, 40099, false, false));
    let late_flow = lb_common::Flow {
        backend: before[0].1,
        service: 1,
        generation: 1,
        flags: 0,
        last_seen_ns: 0,
    };
    old_table.insert(late, late_flow, 0).expect("a late flow");
    dp.finish_carry();
    let late_addr: SocketAddr = "198.18.0.2:40099".parse().expect("addr");
    assert!(
        dp.maps
            .flows()
            .expect("flows")
            .iter()
            .any(|(k, f)| k.client == late_addr && f.backend == before[0].1),
        "the flow opened after the load was carried too"
    );
    let mut after: Vec<_> = dp
        .maps
        .flows()
        .expect("flows")
        .into_iter()
        .map(|(k, f)| (k, f.backend))
        .collect();
    let mut before = before;
    before.sort_by_key(|(k, _)| k.client);
    after.sort_by_key(|(k, _)| k.client);
    after.retain(|(k, _)| k.client != late_addr);
    assert_eq!(after, before, "every flow carried over, on its backend");
    let info = aya::maps::MapData::from_pin(pins.path.join(lb_common::maps::CONNS.name))
        .expect("pinned")
        .info()
        .expect("info");
    assert!(
        info.max_entries() >= 8192,
        "the new size: {}",
        info.max_entries()
    );
    assert!(
        !std::fs::read_dir(&pins.path)
            .expect("pins")
            .flatten()
            .any(|e| e.file_name().to_string_lossy().contains("RESIZED")),
        "the old table is gone"
    );
    drop(dp);
    drop(pins);
}

/// A TCP socket pair on loopback: the backend's end and the client's.
struct Connection {
    _listener: TcpListener,
    _server: TcpStream,
    client: TcpStream,
}

/// Reconciliation repairs a count both ways (never writing the data path's counter): too
/// high (a flow that vanished without FIN), too low (a count driven below zero, a flow
/// whose entry was made mid-flow). Probes and direct connections never count.
#[test]
fn counts_heal_both_ways() {
    as_root();
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let backend = listener.local_addr().expect("addr");
    let client = TcpStream::connect(backend).expect("connect");
    let (server, _) = listener.accept().expect("accept");
    // A direct connection to the backend: not a VIP flow.
    let _direct = TcpStream::connect(backend).expect("direct connect");
    let conn = Connection {
        _listener: listener,
        _server: server,
        client,
    };
    let cport = conn.client.local_addr().expect("client addr").port();
    let text = format!(
        "interface = \"lo\"\nconntrack_size = 4096\n[[vip]]\nname = \"heal\"\n\
         address = \"198.18.100.9\"\nport = 80\nmaglev_table_size = 251\n\
         [[vip.backend]]\naddress = \"127.0.0.1\"\nport = {}\n",
        backend.port()
    );
    let (pins, mut dp, plan) = load("ct-heal", &text);
    let id = plan.services[0].backends[0].0;
    let vip = [198, 18, 100, 9];
    let lo = [127, 0, 0, 1];
    // The real connection's flow through the VIP, and a phantom one that vanished.
    connect(&mut dp, "real", lo, vip, cport);
    // Port 9 (discard): no socket here has it.
    connect(&mut dp, "phantom", lo, vip, 9);
    let effective = |dp: &Datapath| dp.maps.live_count(id).expect("count").effective();
    assert_eq!(effective(&dp), 2);
    let mut r = Reconciler::default();
    r.check(&plan, &mut dp.maps);
    assert_eq!(effective(&dp), 2, "one check is not enough");
    r.check(&plan, &mut dp.maps);
    assert_eq!(effective(&dp), 1, "down to the one established VIP flow");
    let counted = dp.maps.live_count(id).expect("count").counted;
    assert_eq!(counted, 2, "the data path's counter is never written");

    // Below zero: the data path reads 0, the daemon repairs it.
    dp.maps.set_live_fix(id, -5).expect("fix");
    assert_eq!(dp.maps.live_flows(id).expect("live"), 0, "read as 0");
    r.check(&plan, &mut dp.maps);
    r.check(&plan, &mut dp.maps);
    assert_eq!(effective(&dp), 1, "up to the truth again");

    // Too low (as after a FIN counted twice by two CPUs racing): it heals up.
    run(&mut dp, "FIN", &tcp_flags(lo, vip, cport, false, true));
    assert_eq!(effective(&dp), 0);
    let vip_addr = VipAddr {
        addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::from(vip)), 80),
        proto: PROTO_TCP,
    };
    assert!(
        dp.maps
            .flow(conn.client.local_addr().expect("addr"), &vip_addr)
            .expect("flow")
            .is_some()
    );
    r.check(&plan, &mut dp.maps);
    r.check(&plan, &mut dp.maps);
    assert_eq!(effective(&dp), 1, "the socket is still established");
    drop(dp);
    drop(pins);
}

/// IPv6 sources share a rate-limit bucket per prefix of the configured length.
#[test]
fn ipv6_rate_limit_prefix_is_configurable() {
    as_root();
    let text = |prefix: &str| {
        format!(
            "interface = \"lo\"\n[[vip]]\nname = \"v6\"\naddress = \"2001:db8:1::7\"\nport = 80\n\
             maglev_table_size = 251\n[vip.admission]\nrate = 1\nburst = 1\nrefuse = \"drop\"\n{prefix}\
             [[vip.backend]]\naddress = \"2001:db8::1\"\nport = 8601\n"
        )
    };
    let vip: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];
    // Two hosts in one /48, in different /64s.
    let host = |subnet: u8| -> [u8; 16] {
        [
            0x20, 0x01, 0x0d, 0xb8, 0, 2, 0, subnet, 0, 0, 0, 0, 0, 0, 0, 2,
        ]
    };
    for (prefix, second) in [
        ("", Reason::FwdNewFlow),
        ("ipv6_prefix = 48\n", Reason::RefuseDrop),
    ] {
        let (pins, mut dp, _plan) = load("ct-v6prefix", &text(prefix));
        let (_, _, first) = run(
            &mut dp,
            "first /64",
            &tcp6_packet(host(1), vip, 37000, true),
        );
        assert_eq!(first, Reason::FwdNewFlow);
        let (_, _, got) = run(
            &mut dp,
            "second /64",
            &tcp6_packet(host(2), vip, 37000, true),
        );
        assert_eq!(got, second, "prefix setting {prefix:?}");
        drop(dp);
        drop(pins);
    }
}

/// An upgrade from the versions before keeps its flows and its VIP tables: the conntrack
/// entries of `CONNS`, of `CONNS_V2` (a list per CPU) and of a `CONNS_V2` table set aside for a
/// resize are copied into the current table,
/// each VIP's table into its first block of `MAGLEV_V2` with its `SERVICES_V2` entry, and the
/// old maps are removed.
#[test]
fn an_upgrade_carries_conntrack_and_tables_over() {
    as_root();
    let pins = PinDir::new("ct-upgrade");
    std::fs::create_dir_all(&pins.path).expect("pin dir");
    let old = pins.path.join("CONNS");
    let old = old.to_str().expect("UTF-8 path");
    let bpftool = |args: &[&str]| {
        let out = std::process::Command::new("bpftool")
            .args(args)
            .output()
            .expect("bpftool (cargo xtask test installs it)");
        assert!(
            out.status.success(),
            "bpftool {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    bpftool(&[
        "map", "create", old, "type", "lru_hash", "key", "16", "value", "16", "entries", "4096",
        "name", "CONNS",
    ]);
    let put = |map: &str, key: &str, value: &str| {
        let mut args = vec!["map", "update", "pinned", map, "key", "hex"];
        args.extend(key.split(' '));
        args.extend(["value", "hex"]);
        args.extend(value.split(' '));
        bpftool(&args);
    };
    // 198.18.0.2:1234 → 198.18.100.7:80 TCP on backend 1, counted, as the old layout wrote it.
    let key = "c6 12 00 02 c6 12 64 07 04 d2 00 50 06 00 00 00";
    let value = "01 00 00 00 00 00 01 00 00 00 00 00 00 00 00 00";
    put(old, key, value);
    // 198.18.0.4:1234 on backend 2, not counted: that version counted from the SYN, so this
    // flow has ended.
    let key = "c6 12 00 04 c6 12 64 07 04 d2 00 50 06 00 00 00";
    let value = "02 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00";
    put(old, key, value);
    // The next version's table (`BPF_F_NO_COMMON_LRU`): 198.18.0.3:1234 on backend 2, not yet
    // counted (generation 0, service 0).
    let v2_table = |path: &str| {
        bpftool(&[
            "map", "create", path, "type", "lru_hash", "key", "16", "value", "16", "entries",
            "4096", "name", "CONNS_V2", "flags", "2",
        ]);
    };
    let v2 = pins.path.join("CONNS_V2");
    let v2 = v2.to_str().expect("UTF-8 path");
    v2_table(v2);
    let key = "c6 12 00 03 c6 12 64 07 04 d2 00 50 06 00 00 00";
    let value = "02 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00";
    put(v2, key, value);
    // A table that version set aside for a resize and never finished copying: 198.18.0.5:1234
    // on backend 1, counted.
    let aside = pins.path.join("CONNS_V2_RESIZED_1");
    let aside = aside.to_str().expect("UTF-8 path");
    v2_table(aside);
    let key = "c6 12 00 05 c6 12 64 07 04 d2 00 50 06 00 00 00";
    let value = "01 00 00 00 00 00 01 00 00 00 00 00 00 00 00 00";
    put(aside, key, value);

    // Its VIP table: 198.18.100.7:80/TCP is service 0, table size 251, in MAGLEV block 0
    // (slots 0-2 set here).
    let services = pins.path.join("SERVICES");
    let services = services.to_str().expect("UTF-8 path");
    let maglev = pins.path.join("MAGLEV");
    let maglev = maglev.to_str().expect("UTF-8 path");
    bpftool(&[
        "map", "create", services, "type", "hash", "key", "8", "value", "8", "entries", "32",
        "name", "SERVICES",
    ]);
    bpftool(&[
        "map", "update", "pinned", services, "key", "hex", "c6", "12", "64", "07", "00", "50",
        "06", "00", "value", "hex", "00", "00", "00", "00", "fb", "00", "00", "00",
    ]);
    let maglev_entries = lb_common::MAGLEV_MAX_SIZE.to_string();
    bpftool(&[
        "map",
        "create",
        maglev,
        "type",
        "array",
        "key",
        "4",
        "value",
        "4",
        "entries",
        &maglev_entries,
        "name",
        "MAGLEV",
    ]);
    for (slot, id) in [("00", "01"), ("01", "02"), ("02", "01")] {
        bpftool(&[
            "map", "update", "pinned", maglev, "key", "hex", slot, "00", "00", "00", "value",
            "hex", id, "00", "00", "00",
        ]);
    }

    let config = Config::parse(Path::new("conntrack.toml"), CONFIG).expect("config");
    let mut dp = Datapath::load(&pins.path, config.map_sizes).expect("load BPF object");
    // The carried VIP's port is marked at the load, before any plan: the old version had no
    // `VIP_PORTS`, and without it the new program would pass the VIP's packets untouched.
    let (word, bit) = lb_common::vip_port_bit(PROTO_TCP, 80);
    assert_ne!(dp.maps.vip_port_word(word).expect("VIP_PORTS") & bit, 0);
    dp.finish_carry();
    let carried = dp.maps.services().expect("services");
    assert_eq!(carried.len(), 1, "{carried:?}");
    let service = carried[0].1;
    assert_eq!((service.id, service.table_size, service.block), (0, 251, 0));
    let table = dp.maps.block_table(service.block, 251).expect("table");
    assert_eq!(
        &table[..4],
        &[1, 2, 1, 0],
        "the table carried into its first block"
    );
    assert!(!Path::new(services).exists() && !Path::new(maglev).exists());
    let mut flows = dp.maps.flows().expect("flows");
    flows.sort_by_key(|(addrs, _)| addrs.client);
    assert_eq!(flows.len(), 4, "{flows:?}");
    let vip = "198.18.100.7:80".parse::<SocketAddr>().expect("addr");
    let (addrs, flow) = &flows[0];
    assert_eq!(
        (addrs.client, addrs.vip),
        ("198.18.0.2:1234".parse().expect("addr"), vip)
    );
    assert_eq!((flow.backend, flow.is_counted()), (1, true));
    // Not counted yet by `CONNS_V2`, which counts from the handshake as this version does:
    // still to be counted at its next client packet (a flow of the first version, which
    // counted from the SYN, would be marked done).
    let (addrs, flow) = &flows[1];
    assert_eq!(addrs.client, "198.18.0.3:1234".parse().expect("addr"));
    assert_eq!((flow.backend, flow.flags), (2, 0));
    let (addrs, flow) = &flows[2];
    assert_eq!(addrs.client, "198.18.0.4:1234".parse().expect("addr"));
    assert_eq!(
        (flow.backend, flow.flags),
        (2, lb_common::FLOW_DONE),
        "an ended flow of the first version is never counted"
    );
    let (addrs, flow) = &flows[3];
    assert_eq!(addrs.client, "198.18.0.5:1234".parse().expect("addr"));
    assert_eq!(
        (flow.backend, flow.is_counted()),
        (1, true),
        "carried from the set-aside table"
    );
    for gone in [old, v2, aside] {
        assert!(!Path::new(gone).exists(), "{gone} is removed");
    }
    drop(dp);
    drop(pins);
}

/// Without an IPv6 VIP the preallocated IPv6 maps hold `IPV6_IDLE_ENTRIES` each; a start
/// with one (same pins) makes them anew at full size, and a start without one shrinks them
/// again, never refusing the pins as another layout.
#[test]
fn ipv6_maps_follow_the_first_ipv6_vip() {
    as_root();
    let pins = PinDir::new("ct-v6-sizes");
    let entries = |name: &str| {
        aya::maps::MapData::from_pin(pins.path.join(name))
            .expect("pinned map")
            .info()
            .expect("map info")
            .max_entries()
    };
    let sized = [
        lb_common::maps::VIP_OF6,
        lb_common::maps::RATE_LIMIT6,
        lb_common::maps::SOCK_REVNAT6,
    ];
    let without = Config::parse(Path::new("conntrack.toml"), CONFIG).expect("config");
    let with = format!(
        "{CONFIG}[[vip]]\nname = \"chat6\"\naddress = \"2001:db8:1::1\"\nport = 80\n\
         [[vip.backend]]\naddress = \"2001:db8::1\"\nport = 9000\n"
    );
    let with = Config::parse(Path::new("conntrack.toml"), &with).expect("IPv6 config");
    for (config, ipv6) in [(&without, false), (&with, true), (&without, false)] {
        let dp = Datapath::load(&pins.path, config.map_sizes).expect("load: no layout error");
        for map in sized {
            let want = if ipv6 {
                map.default_entries()
            } else {
                lb_common::IPV6_IDLE_ENTRIES
            };
            assert_eq!(entries(map.name), want, "{} with ipv6 = {ipv6}", map.name);
        }
        drop(dp);
    }
    drop(pins);
}

#[test]
fn a_removed_vips_flows_pass_and_its_port_is_cleared() {
    as_root();
    // "guarded" shares TCP port 80 with "capped"; "dns" alone serves UDP port 53.
    let dns = "\n[[vip]]\nname = \"dns\"\naddress = \"198.18.100.1\"\nport = 53\nprotocol = \"udp\"\nmaglev_table_size = 251\n[[vip.backend]]\naddress = \"198.18.0.1\"\nport = 5353\n";
    let (_pins, mut dp, _) = load("ct-ports", &format!("{CONFIG}{dns}"));
    let marked = |dp: &Datapath, proto: u8, port: u16| {
        let (word, bit) = lb_common::vip_port_bit(proto, port);
        dp.maps.vip_port_word(word).expect("VIP_PORTS") & bit != 0
    };
    assert!(marked(&dp, PROTO_TCP, 80) && marked(&dp, PROTO_UDP, 53));
    for (proto, port) in [(PROTO_UDP, 80), (PROTO_TCP, 53), (PROTO_TCP, 81)] {
        assert!(!marked(&dp, proto, port), "{proto}/{port} serves no VIP");
    }
    // An established flow on each of the two VIPs about to go.
    let (_, _, reason) = connect(&mut dp, "guarded", CLIENT, GUARDED, 37000);
    assert_eq!(reason, Reason::FwdNewFlow);
    let query = udp_packet(53, false);
    assert_eq!(run(&mut dp, "dns", &query).2, Reason::FwdNewFlow);
    assert_eq!(run(&mut dp, "dns again", &query).2, Reason::FwdEstablished);

    // A reload without them: their backends are cleared, so their entries are stale.
    let kept = &CONFIG[..CONFIG.find("[[vip]]\nname = \"guarded\"").expect("guarded")];
    let config = Config::parse(Path::new("conntrack.toml"), kept).expect("config");
    let current = (
        dp.maps.services().expect("services"),
        dp.maps.backends().expect("backends"),
    );
    let mut removed =
        plan::plan(&plan::static_backends(&config), &current.0, &current.1).expect("plan");
    plan::apply(&mut dp.maps, &mut removed, None).expect("remove");
    assert!(
        marked(&dp, PROTO_TCP, 80),
        "\"capped\" still serves TCP port 80"
    );
    assert!(!marked(&dp, PROTO_UDP, 53), "no VIP serves UDP port 53");

    // Their packets pass to the stack untouched; the other VIP on the port still balances.
    let ack = tcp_flags(CLIENT, GUARDED, 37000, false, false);
    let (action, out, reason) = run(&mut dp, "guarded, removed", &ack);
    assert_eq!((action, reason), (XDP_PASS, Reason::PassNotVip));
    assert_eq!(out, ack, "untouched");
    let (action, out, reason) = run(&mut dp, "dns, removed", &query);
    assert_eq!((action, reason), (XDP_PASS, Reason::PassNotVip));
    assert_eq!(out, query, "untouched");
    let (_, _, reason) = connect(&mut dp, "capped", CLIENT, CAPPED, 37001);
    assert_eq!(reason, Reason::FwdNewFlow);
}

/// A start brings every `VIP_PORTS` word to its plan's: a bit an earlier process left set
/// (an apply cut short between its two writes) is cleared, though no VIP it knows used it.
#[test]
fn a_start_clears_ports_no_vip_serves() {
    as_root();
    let (_pins, mut dp, plan) = load("ct-stray", CONFIG);
    let marked = |dp: &Datapath, proto: u8, port: u16| {
        let (word, bit) = lb_common::vip_port_bit(proto, port);
        dp.maps.vip_port_word(word).expect("VIP_PORTS") & bit != 0
    };
    let (word, bit) = lb_common::vip_port_bit(PROTO_TCP, 9999);
    dp.maps.set_vip_port_word(word, bit).expect("stray bit");
    assert!(marked(&dp, PROTO_TCP, 9999), "the stray bit is set");
    let mut start = plan;
    plan::apply(&mut dp.maps, &mut start, None).expect("start");
    assert!(!marked(&dp, PROTO_TCP, 9999), "no VIP serves TCP port 9999");
    assert!(marked(&dp, PROTO_TCP, 80), "the VIPs' port kept");
}

/// A command that finds a map it needs not pinned beside the daemon's others (a daemon of
/// another version, or one still starting) says so, instead of asking whether a daemon runs
/// at all; with nothing pinned it asks that.
#[test]
fn a_map_missing_beside_the_others_is_named_as_version_skew() {
    as_root();
    let (pins, dp, _) = load("ct-skew", CONFIG);
    drop(dp);
    Maps::open_pinned(&pins.path).expect("all maps pinned");
    std::fs::remove_file(pins.path.join(lb_common::maps::VIP_PORTS.name)).expect("unpin");
    let err = Maps::open_pinned(&pins.path)
        .err()
        .expect("a map is missing")
        .to_string();
    assert!(
        err.contains("VIP_PORTS") && err.contains("another gpulb version"),
        "{err}"
    );
    let empty = PinDir::new("ct-skew-none");
    std::fs::create_dir_all(&empty.path).expect("an empty pin directory");
    let err = Maps::open_pinned(&empty.path)
        .err()
        .expect("nothing pinned")
        .to_string();
    assert!(err.contains("is `gpulb run` running"), "{err}");
}

/// The backend's ACK from `backend_port` to the client (198.18.0.1 is every backend here).
fn backend_ack(backend_port: u16, client: [u8; 4], client_port: u16) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(MAC_B, MAC_A)
        .ipv4([198, 18, 0, 1], client, 64)
        .tcp(backend_port, client_port, 5000, 65535)
        .ack(1001)
        .write(&mut out, b"HTTP/1.1 200 OK\r\n\r\n")
        .expect("build");
    out
}

fn port_of(plan: &Plan, id: u32) -> u16 {
    plan.services
        .iter()
        .flat_map(|s| &s.backends)
        .find(|(i, _)| *i == id)
        .expect("backend")
        .1
        .addr
        .port()
}
