//! TC egress through netlink (what kernels before 6.6 get; `tc_attach = "netlink"` forces it
//! on any kernel): the filter on a clsact qdisc, the next daemon replacing its program, the
//! filter surviving a killed daemon, and a clean stop that leaves no filter, and no qdisc
//! unless someone else made it. Needs root.

use std::{fs, time::Duration};

use gpulb::kernel::Release;
use gpulb_testbed::{Extra, PinDir, Stack, burst, sh, vip_url};
use nix::sys::signal::Signal;

/// `tc -n <lb namespace> <args>`.
fn tc(stack: &Stack, args: &[&str]) -> String {
    let mut full = vec!["-n", stack.topo.lb.name.as_str()];
    full.extend_from_slice(args);
    sh("tc", &full).expect("tc")
}

/// The BPF program ids of gpulb's egress filters on the lb interface.
fn egress_filters(stack: &Stack) -> Vec<String> {
    let out = tc(
        stack,
        &["filter", "show", "dev", &stack.topo.lb_if, "egress"],
    );
    out.lines()
        .filter(|l| l.contains("gpulb_egress"))
        .map(|l| {
            assert!(l.contains("pref 18256"), "gpulb's fixed priority: {l}");
            assert!(l.contains("direct-action"), "{l}");
            l.split_whitespace()
                .skip_while(|w| *w != "id")
                .nth(1)
                .unwrap_or_else(|| panic!("no program id in {l}"))
                .to_owned()
        })
        .collect()
}

fn has_clsact(stack: &Stack) -> bool {
    tc(stack, &["qdisc", "show", "dev", &stack.topo.lb_if]).contains("qdisc clsact")
}

/// A stack of `backends` simulated instances with `tc_attach = "netlink"`.
fn netlink_stack(tag: &str, backends: usize) -> Stack {
    Stack::start_with(
        tag,
        backends,
        PinDir::new(tag),
        &[],
        Extra {
            top: "tc_attach = \"netlink\"",
            ..Extra::default()
        },
    )
    .expect("start stack")
}

/// Chats through the VIP: the replies come back only if egress turns their source into
/// the VIP again.
fn assert_served(stack: &Stack, when: &str) {
    let replies = burst(
        &stack.topo.client,
        &vip_url("/v1/chat/completions"),
        8,
        4,
        false,
        4,
    )
    .expect("burst");
    assert!(
        replies.iter().all(Result::is_ok),
        "{when}: requests through the VIP failed: {replies:?}"
    );
}

#[test]
fn netlink_filter_is_taken_over_and_removed_with_the_qdisc_gpulb_made() {
    let mut stack = netlink_stack("tcnl", 2);
    let log = stack.daemon.log_text();
    assert!(
        log.contains("tc=\"netlink\"") || log.contains("tc=netlink"),
        "{log}"
    );
    assert!(has_clsact(&stack), "gpulb creates the clsact qdisc");
    let first = egress_filters(&stack);
    assert_eq!(first.len(), 1, "one filter: {first:?}");
    assert!(
        stack
            .pins
            .path
            .join(format!("tc_clsact_{}", stack.topo.lb_if))
            .is_dir(),
        "the pin directory records that gpulb made the qdisc"
    );
    assert_served(&stack, "first daemon");

    // Handed over: the next daemon replaces the program in the same filter.
    let status = stack
        .daemon
        .stop_with(Signal::SIGUSR2, Duration::from_secs(5))
        .expect("hand-over exits");
    assert!(status.success(), "{status}");
    assert_eq!(
        egress_filters(&stack),
        first,
        "the filter outlives its daemon"
    );
    assert_served(&stack, "between daemons");
    stack.start_daemon().expect("second daemon");
    let second = egress_filters(&stack);
    assert_eq!(second.len(), 1, "replaced, not added: {second:?}");
    assert_ne!(second, first, "the new daemon's program runs");
    assert_served(&stack, "second daemon");

    // Killed: the filter stays and keeps serving; the next daemon takes it over.
    let _ = stack
        .daemon
        .stop_with(Signal::SIGKILL, Duration::from_secs(2));
    assert_eq!(egress_filters(&stack), second);
    assert_served(&stack, "daemon killed");
    stack.start_daemon().expect("third daemon");
    let third = egress_filters(&stack);
    assert_eq!(third.len(), 1, "replaced, not added: {third:?}");
    assert_ne!(third, second, "the third daemon's program runs");
    assert_served(&stack, "third daemon");

    // Clean stop: no filter, and the qdisc gpulb made goes too.
    let status = stack
        .daemon
        .stop_with(Signal::SIGTERM, Duration::from_secs(20))
        .expect("stop");
    assert!(status.success(), "{status}\n{}", stack.daemon.log_text());
    assert!(egress_filters(&stack).is_empty(), "filter left behind");
    assert!(!has_clsact(&stack), "the qdisc gpulb made is left behind");
    assert!(!stack.pins.path.exists(), "pins left behind");

    // A qdisc someone else made stays, with their filters.
    let lb_if = stack.topo.lb_if.clone();
    tc(&stack, &["qdisc", "add", "dev", &lb_if, "clsact"]);
    stack.start_daemon().expect("fourth daemon");
    assert_eq!(egress_filters(&stack).len(), 1);
    assert!(
        !stack.pins.path.join(format!("tc_clsact_{lb_if}")).exists(),
        "gpulb did not make this qdisc"
    );
    assert_served(&stack, "on a qdisc gpulb did not make");
    stack
        .daemon
        .stop_with(Signal::SIGTERM, Duration::from_secs(20))
        .expect("stop");
    assert!(egress_filters(&stack).is_empty(), "filter left behind");
    assert!(has_clsact(&stack), "removed a qdisc gpulb did not make");
}

#[test]
fn switching_to_tcx_removes_the_netlink_filter() {
    let release = Release::current().expect("kernel release");
    if release < gpulb::kernel::TCX {
        eprintln!("Linux {release} has no TCX: nothing to switch to");
        return;
    }
    let mut stack = netlink_stack("tcsw", 1);
    assert_eq!(egress_filters(&stack).len(), 1);
    let _ = stack
        .daemon
        .stop_with(Signal::SIGKILL, Duration::from_secs(2));
    let config = fs::read_to_string(&stack.config).expect("config");
    fs::write(
        &stack.config,
        config.replace("tc_attach = \"netlink\"", "tc_attach = \"tcx\""),
    )
    .expect("config");
    stack.start_daemon().expect("daemon on tcx");
    let log = stack.daemon.log_text();
    assert!(
        log.contains("tc=\"tcx\"") || log.contains("tc=tcx"),
        "{log}"
    );
    assert!(
        egress_filters(&stack).is_empty(),
        "the netlink filter stayed"
    );
    assert!(!has_clsact(&stack), "the qdisc gpulb made stayed");
    assert!(
        stack
            .pins
            .path
            .join(format!("link_tc_{}", stack.topo.lb_if))
            .exists(),
        "the TCX link is pinned"
    );
    assert_served(&stack, "after the switch");
}
