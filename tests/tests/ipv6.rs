//! IPv6 end to end: a VIP and model instances on the loopback of a test namespace (the only
//! IPv6 addresses the test bench may use), with generic XDP and TC egress on `lo`. The
//! client's SYN to [::1]:80 passes lo's XDP hook, is NATed to an instance on [::1]:800x,
//! and the instance's replies get [::1]:80 back at TC egress. Needs root.

use std::{
    collections::BTreeSet,
    net::{Ipv6Addr, SocketAddr, TcpStream},
    time::Duration,
};

use gpulb_testbed::{
    NetNs, PinDir, Proc, TempDir, bin, burst, read_pinned, reason_count, stop_daemon_and_instances,
    wait_until,
};

const VIP6: SocketAddr = SocketAddr::new(std::net::IpAddr::V6(Ipv6Addr::LOCALHOST), 80);
const URL: &str = "http://[::1]:80/v1/chat/completions";

/// A daemon on `lo` in its own namespace, running two simulated instances on [::1]. Drops
/// in field order: the daemon (stopping its instances), then pins, scratch files, namespace.
struct Lo6 {
    daemon: Proc,
    marker: String,
    pins: PinDir,
    dir: TempDir,
    ns: NetNs,
}

impl Lo6 {
    fn start(tag: &str, socket_lb: &str) -> Self {
        let ns = NetNs::new(&format!("gpulb-{tag}-{}", std::process::id())).expect("netns");
        let dir = TempDir::new(tag).expect("scratch dir");
        let pins = PinDir::new(tag);
        let marker = dir.path.display().to_string();
        let config = format!(
            "interface = \"lo\"\nxdp_mode = \"generic\"\nsocket_lb = \"{socket_lb}\"\n\
             pin_path = \"{pins}\"\nstate_dir = \"{dir}/state\"\nlog_dir = \"{dir}/instances\"\n\
             conntrack_size = 4096\nconntrack_size_v6 = 4096\n\
             drain_timeout_ms = 1000\nkill_timeout_ms = 2000\n\n\
             [[vip]]\nname = \"chat6\"\naddress = \"::1\"\nport = 80\nmaglev_table_size = 251\n\
             affinity = \"none\"\n\
             [vip.health]\ninterval_ms = 200\n\n\
             [[model]]\nname = \"sim-llm\"\nvip = \"chat6\"\ngpus = \"simulated:2\"\n\
             address = \"::1\"\nbase_port = 8001\n\
             env = {{ GPULB_TEST_MARKER = \"{marker}\" }}\n",
            pins = pins.path.display(),
            dir = dir.path.display(),
        );
        let path = dir.path.join("gpulb.toml");
        std::fs::write(&path, config).expect("write config");
        let mut daemon = Proc::spawn(
            "gpulb",
            &ns,
            &bin("gpulb"),
            &["run", "--config", path.to_str().expect("UTF-8 path")],
            &dir.path,
        )
        .expect("start gpulb");
        daemon
            .wait_for_log("gpulb ready", Duration::from_secs(30))
            .expect("daemon up");
        let lo = Self {
            daemon,
            marker,
            pins,
            dir,
            ns,
        };
        let socket = lo.dir.path.join("state/control.sock");
        let ready = wait_until(Duration::from_secs(30), || {
            let Ok(rows) = lo.read(&["backends", "--socket", socket.to_str().expect("UTF-8")])
            else {
                return false;
            };
            rows.iter().filter(|r| r["state"] == "ready").count() == 2
        });
        assert!(ready, "instances not ready:\n{}", lo.daemon.log_text());
        lo
    }

    /// `gpulb <args> --json` on this daemon's pins.
    fn read(&self, args: &[&str]) -> anyhow::Result<Vec<serde_json::Value>> {
        read_pinned(&self.pins.path, args)
    }

    fn reason(&self, name: &str) -> u64 {
        reason_count(&self.pins.path, name)
    }

    /// The peer a client connected to [::1]:80 sees.
    fn peer_of_a_connection(&self) -> SocketAddr {
        self.ns
            .run(|| {
                TcpStream::connect_timeout(&VIP6, Duration::from_secs(2))
                    .and_then(|s| s.peer_addr())
            })
            .expect("thread in netns")
            .expect("connect to [::1]:80")
    }

    /// Chat completions to the VIP; the instances that answered.
    fn instances_answering(&self, n: usize) -> BTreeSet<String> {
        burst(&self.ns, URL, n, 1, false, 4)
            .expect("requests")
            .into_iter()
            .map(|r| r.expect("a request to [::1]:80 is answered").instance)
            .collect()
    }
}

impl Drop for Lo6 {
    fn drop(&mut self) {
        stop_daemon_and_instances(&mut self.daemon, &self.marker);
    }
}

#[test]
fn ipv6_clients_are_balanced_by_xdp_and_see_the_vip() {
    let lo = Lo6::start("v6xdp", "off");
    let before = lo.reason("fwd_new_flow");

    const N: usize = 24;
    let instances = lo.instances_answering(N);
    assert_eq!(
        instances.len(),
        2,
        "IPv6 connections spread over both instances: {instances:?}"
    );
    assert!(
        lo.reason("fwd_new_flow") >= before + N as u64,
        "each connection balanced by XDP"
    );
    assert!(lo.reason("egress_revnat") > 0, "replies rewritten at TC");
    assert_eq!(lo.reason("sock_balanced"), 0, "socket programs off");
    assert_eq!(lo.peer_of_a_connection(), VIP6, "the client sees the VIP");

    // The CLI reads IPv6 entries from the IPv6 maps.
    let flows = lo.read(&["flows"]).expect("gpulb flows");
    let to_vip: Vec<_> = flows.iter().filter(|f| f["vip"] == "[::1]:80").collect();
    assert!(to_vip.len() >= N, "IPv6 conntrack entries: {flows:?}");
    let backends: BTreeSet<&str> = to_vip
        .iter()
        .filter_map(|f| f["backend"].as_str())
        .collect();
    assert_eq!(
        backends,
        BTreeSet::from(["[::1]:8001", "[::1]:8002"]),
        "{flows:?}"
    );
    let vips = lo.read(&["vips"]).expect("gpulb vips");
    assert_eq!(vips.len(), 1, "{vips:?}");
    assert_eq!(vips[0]["vip"], "[::1]:80", "{vips:?}");
}

#[test]
fn ipv6_host_clients_are_balanced_at_the_socket() {
    let lo = Lo6::start("v6sock", "auto");
    let (xdp_before, sock_before) = (lo.reason("fwd_new_flow"), lo.reason("sock_balanced"));

    const N: usize = 24;
    let instances = lo.instances_answering(N);
    assert_eq!(instances.len(), 2, "{instances:?}");
    assert!(
        lo.reason("sock_balanced") >= sock_before + N as u64,
        "each connection balanced at connect() (connect6)"
    );
    assert_eq!(
        lo.reason("fwd_new_flow"),
        xdp_before,
        "the socket already points at an instance: XDP has nothing to do"
    );
    assert_eq!(
        lo.peer_of_a_connection(),
        VIP6,
        "getpeername() shows the VIP (getpeername6)"
    );
}
