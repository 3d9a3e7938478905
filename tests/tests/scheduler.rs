//! The scheduler end to end, in network namespaces: how new connections spread over the
//! instances, how a slow one is spared, how a client keeps its instance while it has room,
//! how the engines' prefix-cache hit rate turns that stickiness on and off, and how an
//! engine that stops answering is shown stale. (The kernel's decision itself,
//! stale signals included, is checked packet by packet in `packets.rs`.) Needs root.

use std::{collections::BTreeMap, net::SocketAddrV4, time::Duration};

use gpulb_testbed::{
    Connect, Extra, LB_ADDR, Pattern, PinDir, Route, Stack, VIP, VIP_PORT, completion_on, connects,
    run_workload, vip_url, wait_until,
};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

fn vip() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, VIP_PORT)
}

/// Live flows per backend (`address:port`) as the data path counts them.
fn live(stack: &Stack) -> BTreeMap<String, u64> {
    stack
        .backends()
        .expect("backends")
        .iter()
        .map(|r| {
            (
                r["backend"].as_str().unwrap_or("").to_owned(),
                r["live_flows"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

#[test]
fn sixty_four_connections_spread_evenly_over_four_equal_instances() {
    // One client, default config: every connection's hash picks the same instance, and
    // the scheduler spreads them by live flows (each held open).
    let stack = Stack::start("spread", 4, PinDir::new("spread"), &[]).expect("stack");
    const HELD: usize = 64;
    let held = connects(
        &stack.topo.client,
        None,
        vip(),
        HELD,
        Duration::from_secs(2),
    )
    .expect("connect");
    assert!(held.iter().all(Connect::is_open), "{held:?}");
    let flows = live(&stack);
    assert_eq!(flows.values().sum::<u64>(), HELD as u64, "{flows:?}");
    let max = *flows.values().max().expect("backends") as f64;
    let mean = HELD as f64 / flows.len() as f64;
    assert!(
        max / mean <= 1.25,
        "max/mean live flows {:.2} > 1.25: {flows:?}",
        max / mean
    );
    drop(held);
}

#[test]
fn a_slow_instance_gets_fewer_new_flows_than_its_peers() {
    // Three default instances and a slow one (1 slot, 50 tokens/s against 4 slots, 200
    // tokens/s), 16 streams at a time, the default scheduler.
    let run =
        gpulb_testbed::four_instance_scenario("slowpeer", "", gpulb_testbed::SLOW, 64, 16, 24)
            .expect("scenario");
    eprintln!("{run:?}");
    assert_eq!(run.failed, 0, "{run:?}");
    let peers: Vec<usize> = run
        .per_instance
        .iter()
        .filter(|(name, _)| name.as_str() != "slow-0")
        .map(|(_, n)| *n)
        .collect();
    assert_eq!(peers.len(), 3, "three peers served: {run:?}");
    assert!(
        peers.iter().all(|&n| run.to_slow < n),
        "the slow instance got fewer requests than each peer: {run:?}"
    );
}

#[test]
fn an_affine_client_stays_on_its_instance_while_it_has_room_and_moves_when_not() {
    let stack = Stack::start_with(
        "affine",
        4,
        PinDir::new("affine"),
        &[],
        Extra {
            backend: "slots = 3\n",
            ..Extra::default()
        },
    )
    .expect("stack");
    let client = &stack.topo.client;
    // One connection at a time, each ended before the next opens: its instance always has
    // a free slot, so every one lands there.
    let instances: Vec<String> = (0..12)
        .map(|_| {
            let mut c = connects(client, None, vip(), 1, Duration::from_secs(2)).expect("connect");
            let Some(Connect::Open(mut stream)) = c.pop() else {
                panic!("connection opens: {c:?}");
            };
            let instance = completion_on(&mut stream).expect("completion");
            drop(stream);
            assert!(
                wait_until(Duration::from_secs(5), || live(&stack)
                    .values()
                    .sum::<u64>()
                    == 0),
                "the closed connection's flow ended"
            );
            instance
        })
        .collect();
    let first = instances[0].clone();
    assert!(
        instances.iter().all(|i| *i == first),
        "every connection of the client on {first}: {instances:?}"
    );
    // Held at once, the client's connections fill its instance's 3 slots and then go to
    // the others, which have room.
    const HELD: usize = 12;
    let held = connects(client, None, vip(), HELD, Duration::from_secs(2)).expect("connect");
    assert!(held.iter().all(Connect::is_open), "{held:?}");
    let flows = live(&stack);
    let k: u16 = first
        .trim_start_matches("sim-")
        .parse()
        .expect("instance name sim-<k>");
    let home = format!("{LB_ADDR}:{}", 8000 + k);
    assert_eq!(flows.get(&home), Some(&3), "its instance full: {flows:?}");
    assert!(
        flows.values().all(|&n| n == 3),
        "the rest on the others, each within its slots: {flows:?}"
    );
    drop(held);
}

#[test]
fn an_engine_that_stops_answering_is_shown_stale() {
    let stack = Stack::managed("stale", 2, PinDir::new("stale"), "").expect("stack");
    stack.wait_ready(2, Duration::from_secs(30)).expect("ready");
    let row = |stack: &Stack, instance: &str| {
        stack
            .backends()
            .expect("backends")
            .into_iter()
            .find(|r| r["daemon"]["instance"] == instance)
            .expect("instance row")
    };
    assert!(
        wait_until(
            Duration::from_secs(5),
            || row(&stack, "sim-llm-0")["signal_fresh"] == true
        ),
        "the engine's numbers arrive every 50 ms: {}",
        row(&stack, "sim-llm-0")
    );
    let pid = row(&stack, "sim-llm-0")["daemon"]["pid"]
        .as_u64()
        .expect("pid") as i32;
    kill(Pid::from_raw(pid), Signal::SIGSTOP).expect("SIGSTOP");
    let stale = wait_until(Duration::from_secs(5), || {
        let r = row(&stack, "sim-llm-0");
        r["signal_fresh"] == false && r["signal_age_ms"].as_f64().unwrap_or(0.0) > 500.0
    });
    let shown = row(&stack, "sim-llm-0");
    kill(Pid::from_raw(pid), Signal::SIGCONT).expect("SIGCONT");
    assert!(stale, "stale after signal_max_age_ms: {shown}");
    assert_eq!(
        row(&stack, "sim-llm-1")["signal_fresh"],
        true,
        "the other engine still answers"
    );
}

#[test]
fn auto_affinity_follows_the_engines_prefix_cache_hit_rate() {
    // Two vLLM-like instances whose /metrics the daemon reads every 50 ms.
    let stack = Stack::start_with(
        "prefix",
        2,
        PinDir::new("prefix"),
        &[],
        Extra {
            backend: "slots = 4\nload = \"vllm\"\n",
            ..Extra::default()
        },
    )
    .expect("stack");
    let sticky = |stack: &Stack| {
        stack.read(&["vips"]).expect("vips")[0]["sticky"]
            .as_bool()
            .expect("sticky")
    };
    assert!(sticky(&stack), "no prefix cache readings yet: sticky");
    let base = vip_url("");
    // Prompts that share nothing: the caches miss, so affinity buys nothing.
    let misses = run_workload(
        &stack.topo.client,
        Route::Via(base.clone()),
        Pattern::Closed {
            requests: 16,
            concurrency: 4,
        },
        4,
        "misses",
        None,
    )
    .expect("workload");
    assert_eq!(misses.failed, 0, "{misses:?}");
    // Balanced once the engines have been read for 10 s.
    assert!(
        wait_until(Duration::from_secs(20), || !sticky(&stack)),
        "every prompt missed: balanced"
    );
    // Conversations: each turn resends the ones before, which the instance that served
    // them has cached.
    let chats = run_workload(
        &stack.topo.client,
        Route::Via(base),
        Pattern::Sessions {
            sessions: 4,
            turns: 5,
            concurrency: 2,
            words: 50,
            sources: Vec::new(),
        },
        4,
        "chats",
        None,
    )
    .expect("workload");
    assert_eq!(chats.failed, 0, "{chats:?}");
    assert!(
        wait_until(Duration::from_secs(5), || sticky(&stack)),
        "the caches hit: sticky again"
    );
}
