//! Admission control in the data path, end to end: a SYN flood from one source against the
//! per-source rate limit, the allow-list, and per-backend flow caps. Needs root.

use std::{
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use gpulb::maps::Maps;
use gpulb_testbed::{
    CLIENT_ADDR, CLIENT_ADDR2, CLIENT_ADDR3, Connect, Extra, PinDir, Stack, VIP, VIP_PORT,
    XDP_TX_MODE, connects, http_get_on, metric, scrape, wait_until,
};

fn vip() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, VIP_PORT)
}

fn count(results: &[Connect]) -> (usize, usize, usize) {
    let open = results.iter().filter(|c| c.is_open()).count();
    let refused = results
        .iter()
        .filter(|c| matches!(c, Connect::Refused))
        .count();
    (open, refused, results.len() - open - refused)
}

fn vip_row(stack: &Stack) -> serde_json::Value {
    let rows = stack.read(&["vips"]).expect("gpulb vips");
    rows.into_iter().next().expect("one VIP")
}

#[test]
fn syn_flood_from_one_source_is_rate_limited_and_other_sources_get_through() {
    const RATE: usize = 5;
    const BURST: usize = 10;
    const FLOOD: usize = 200;
    let stack = Stack::start_with(
        "flood",
        2,
        PinDir::new("flood"),
        &[],
        Extra {
            top: XDP_TX_MODE,
            vip: &format!(
                "[vip.admission]\nrate = {RATE}\nburst = {BURST}\nrefuse = \"rst\"\n\
                 allow = [\"198.18.0.2/31\"]\n"
            ),
            ..Extra::default()
        },
    )
    .expect("stack");

    // An established connection of the flooding source, opened before the flood.
    let mut before = connects(
        &stack.topo.client,
        Some(CLIENT_ADDR),
        vip(),
        1,
        Duration::from_secs(2),
    )
    .expect("connect");
    let Some(Connect::Open(mut established)) = before.pop() else {
        panic!("the first connection opens: {before:?}");
    };

    let started = Instant::now();
    let flood = connects(
        &stack.topo.client,
        Some(CLIENT_ADDR),
        vip(),
        FLOOD,
        Duration::from_secs(2),
    )
    .expect("flood");
    let took = started.elapsed();
    let (open, refused, other) = count(&flood);
    // The burst (less the one connection above) plus what the rate refills meanwhile.
    let allowed = BURST + (took.as_secs_f64() * RATE as f64).ceil() as usize + 1;
    assert!(
        open <= allowed,
        "{open} of {FLOOD} SYNs got through in {took:?}; the limit allows {allowed}"
    );
    assert!(open >= BURST - 1, "the burst gets through: {open} opened");
    assert_eq!(
        other, 0,
        "every refused SYN gets a RST, none times out: {flood:?}"
    );
    assert_eq!(open + refused, FLOOD);

    // Another source goes through while the first is limited.
    let other_source = connects(
        &stack.topo.client,
        Some(CLIENT_ADDR2),
        vip(),
        3,
        Duration::from_secs(2),
    )
    .expect("connect from another source");
    assert_eq!(
        count(&other_source).0,
        3,
        "another source is not limited: {other_source:?}"
    );
    // The flooding source's established flow still works.
    let status = http_get_on(&mut established, "/health").expect("request on the established flow");
    assert!(
        status.starts_with("HTTP/1.1 200"),
        "established flow answered: {status}"
    );

    // A source outside the allow-list (198.18.0.2/31 = .2 and .3) is refused.
    let outsider = connects(
        &stack.topo.client,
        Some(CLIENT_ADDR3),
        vip(),
        3,
        Duration::from_secs(2),
    )
    .expect("connect from outside the allow-list");
    assert_eq!(count(&outsider).1, 3, "refused with RSTs: {outsider:?}");

    let row = vip_row(&stack);
    assert_eq!(
        row["rate_limited"].as_u64(),
        Some(refused as u64),
        "{row:#}"
    );
    assert_eq!(row["not_allowed"].as_u64(), Some(3), "{row:#}");
    let metrics = scrape(&stack.topo.lb).expect("metrics");
    let vip_label = format!("vip=\"{VIP}:{VIP_PORT}\"");
    assert_eq!(
        metric(
            &metrics,
            "gpulb_vip_refused_total",
            &[&vip_label, "cause=\"rate_limited\""]
        ),
        Some(refused as f64)
    );
    drop(flood);
}

#[test]
fn capped_backends_refuse_new_flows_fast_when_all_are_full() {
    const CAP: usize = 2;
    let stack = Stack::start_with(
        "caps",
        2,
        PinDir::new("caps"),
        &[],
        Extra {
            top: XDP_TX_MODE,
            vip: "[vip.admission]\nrefuse = \"rst\"\n",
            backend: &format!("max_flows = {CAP}"),
            ..Extra::default()
        },
    )
    .expect("stack");
    let client = &stack.topo.client;
    let mut held = connects(client, None, vip(), 2 * CAP, Duration::from_secs(2)).expect("connect");
    assert_eq!(
        count(&held).0,
        2 * CAP,
        "room for {CAP} flows on each backend: {held:?}"
    );

    let started = Instant::now();
    let full = connects(client, None, vip(), 3, Duration::from_secs(2)).expect("connect");
    assert_eq!(
        count(&full).1,
        3,
        "every backend at its cap: refused: {full:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refused fast, not queued: {:?}",
        started.elapsed()
    );

    let rows = stack.backends().expect("backends");
    for r in &rows {
        assert_eq!(r["live_flows"].as_u64(), Some(CAP as u64), "{r:#}");
        assert_eq!(r["max_flows"].as_u64(), Some(CAP as u64), "{r:#}");
    }
    let row = vip_row(&stack);
    assert_eq!(row["backends_full"].as_u64(), Some(3), "{row:#}");
    // Closing one held connection (a FIN) frees its slot.
    held.pop();
    assert!(
        wait_until(Duration::from_secs(5), || {
            connects(client, None, vip(), 1, Duration::from_secs(2))
                .map(|c| c.first().is_some_and(Connect::is_open))
                .unwrap_or(false)
        }),
        "a freed slot takes a new flow"
    );

    // A count the data path can no longer lower (a client that vanished without FIN or RST)
    // is corrected down to the backend's VIP connections by the daemon (the data path's own
    // counter stays as it is; the daemon's correction takes the difference).
    drop(held);
    let mut maps = Maps::open_pinned(&stack.pins.path).expect("pinned maps");
    let ids: Vec<u32> = maps
        .backends()
        .expect("backends")
        .iter()
        .map(|(id, _)| *id)
        .collect();
    for &id in &ids {
        let counted = maps.live_flows.get(&id, 0).expect("count");
        maps.live_flows
            .set(id, counted + 50, 0)
            .expect("fake 50 leaked flows");
    }
    assert!(
        wait_until(Duration::from_secs(10), || ids
            .iter()
            .all(|&id| maps.live_flows(id).is_ok_and(|n| n <= 1))),
        "leaked counts set down to the connections: {:?}",
        ids.iter()
            .map(|&id| maps.live_flows(id))
            .collect::<Vec<_>>()
    );
    let after = connects(client, None, vip(), CAP, Duration::from_secs(2)).expect("connect");
    assert_eq!(
        count(&after).0,
        CAP,
        "room again after reconciliation: {after:?}"
    );
}

#[test]
fn admission_limits_change_by_reload_and_a_rejected_one_changes_nothing() {
    let stack = Stack::start_with(
        "admit-reload",
        2,
        PinDir::new("admit-reload"),
        &[],
        Extra {
            top: XDP_TX_MODE,
            vip: "[vip.admission]\nallow = [\"198.18.0.2/32\"]\n",
            ..Extra::default()
        },
    )
    .expect("stack");
    let client = &stack.topo.client;
    let from = |src| {
        let c = connects(client, Some(src), vip(), 1, Duration::from_secs(2)).expect("connect");
        count(&c).0 == 1
    };
    assert!(from(CLIENT_ADDR), "allowed source");
    assert!(!from(CLIENT_ADDR2), "source outside the allow-list");

    // An invalid allow-list is rejected whole: the running one stays.
    let text = std::fs::read_to_string(&stack.config).expect("config");
    std::fs::write(
        &stack.config,
        text.replace("198.18.0.2/32", "198.18.0.3/24"),
    )
    .expect("write");
    let e = stack.ctl(&["reload"]).expect_err("host bits set");
    assert!(e.to_string().contains("has host bits set"), "{e:#}");
    assert!(from(CLIENT_ADDR) && !from(CLIENT_ADDR2), "nothing changed");

    // A valid one is applied as a diff: the new prefix in, the old one out.
    std::fs::write(
        &stack.config,
        text.replace("198.18.0.2/32", "198.18.0.3/32"),
    )
    .expect("write");
    stack.ctl(&["reload"]).expect("reload");
    assert!(from(CLIENT_ADDR2), "newly allowed source");
    assert!(!from(CLIENT_ADDR), "no longer allowed source");
    let row = vip_row(&stack);
    assert_eq!(
        row["allow"],
        serde_json::json!(["198.18.0.3/32"]),
        "{row:#}"
    );
}
