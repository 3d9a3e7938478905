//! Config errors name the field and the value; good configs parse with their defaults.

use super::*;

const GOOD: &str = r#"
interface = "lo"
conntrack_size = 65536

[[vip]]
name = "chat"
address = "198.18.100.1"
port = 80

[[vip.backend]]
address = "198.18.0.1"
port = 8001
weight = 2

[[vip.backend]]
address = "198.18.0.1"
port = 8002
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new("test.toml"), text)
}

/// The error message for `GOOD` with `from` replaced by `to`.
fn error_for(from: &str, to: &str) -> String {
    assert!(GOOD.contains(from), "fixture lacks {from:?}");
    parse(&GOOD.replacen(from, to, 1))
        .expect_err("config should be rejected")
        .to_string()
}

const VIP_LINE: &str = "port = 80\n";

#[test]
fn admission_and_affinity_parse() {
    let c = parse(&GOOD.replacen(
        VIP_LINE,
        "port = 80\naffinity = \"none\"\n[vip.scheduler]\nchoices = 2\nprefix_affinity = \"off\"\n\
         [vip.admission]\nrate = 10\nallow = [\"198.18.0.0/15\", \"10.1.2.3\"]\n",
        1,
    ))
    .expect("valid config");
    let v = &c.vips[0];
    assert_eq!(v.affinity, Affinity::None);
    assert_eq!(v.scheduler.choices, 2);
    assert_eq!(v.scheduler.prefix_affinity, PrefixAffinity::Off);
    let rate = v.admission.rate.expect("rate");
    assert_eq!(
        (rate.per_second, rate.burst),
        (10, 10),
        "burst defaults to the rate"
    );
    assert!(
        v.admission.refuse_rst,
        "TCP VIPs refuse with a RST by default"
    );
    assert_eq!(
        v.admission
            .allow
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["198.18.0.0/15", "10.1.2.3/32"]
    );
}

const GOOD6: &str = r#"
interface = "lo"

[[vip]]
name = "chat6"
address = "2001:db8:1::1"
port = 80
[vip.admission]
allow = ["2001:db8::/48"]

[[vip.backend]]
address = "2001:db8::10"
port = 8001

[[model]]
name = "sim"
vip = "chat6"
gpus = "simulated:2"
address = "2001:db8::20"
base_port = 9000
"#;

#[test]
fn ipv6_vips_backends_and_prefixes_parse() {
    let c = parse(GOOD6).expect("valid IPv6 config");
    let v = &c.vips[0];
    assert_eq!(v.address, "2001:db8:1::1".parse::<IpAddr>().expect("v6"));
    assert_eq!(v.backends[0].address.to_string(), "2001:db8::10");
    assert_eq!(v.admission.allow[0].to_string(), "2001:db8::/48");
    assert_eq!(
        c.models[0].address,
        "2001:db8::20".parse::<IpAddr>().expect("v6")
    );
    assert_eq!(c.map_sizes.v6, lb_common::CONNTRACK6_DEFAULT_SIZE);
}

#[test]
fn ipv6_errors_name_field_and_value() {
    let error6 = |from: &str, to: &str| {
        assert!(GOOD6.contains(from), "fixture lacks {from:?}");
        parse(&GOOD6.replacen(from, to, 1))
            .expect_err("config should be rejected")
            .to_string()
    };
    let cases = [
        (
            "address = \"2001:db8::10\"",
            "address = \"198.18.0.1\"",
            "vip[0].backend[0].address: 198.18.0.1 is IPv4, but the VIP 2001:db8:1::1 is IPv6",
        ),
        (
            "address = \"2001:db8::20\"",
            "address = \"198.18.0.2\"",
            "model[0].address: 198.18.0.2 is IPv4, but the VIP 2001:db8:1::1 is IPv6",
        ),
        (
            "\"2001:db8::/48\"",
            "\"198.18.0.0/15\"",
            "vip[0].admission.allow[0]: 198.18.0.0 is IPv4, but the VIP 2001:db8:1::1 is IPv6",
        ),
        (
            "\"2001:db8::/48\"",
            "\"2001:db8::1/48\"",
            "vip[0].admission.allow[0]: \"2001:db8::1/48\" has host bits set (the network is 2001:db8::/48)",
        ),
        (
            "\"2001:db8::/48\"",
            "\"2001:db8::/129\"",
            "vip[0].admission.allow[0]: \"2001:db8::/129\" has no prefix length 0-128",
        ),
        (
            "address = \"2001:db8:1::1\"",
            "address = \"::ffff:198.18.100.1\"",
            "vip[0].address: \"::ffff:198.18.100.1\" is an IPv4-mapped address",
        ),
        (
            "address = \"2001:db8::10\"",
            "address = \"fe80::1\"",
            "vip[0].backend[0].address: \"fe80::1\" is link-local",
        ),
        (
            "address = \"2001:db8:1::1\"",
            "address = \"ff02::1\"",
            "vip[0].address: \"ff02::1\" is not a unicast address",
        ),
        (
            "interface = \"lo\"",
            "interface = \"lo\"\nconntrack_size_v6 = 10",
            "conntrack_size_v6: 10 is out of range",
        ),
    ];
    for (from, to, want) in cases {
        let got = error6(from, to);
        assert!(got.contains(want), "{to:?}: {got}");
    }
}

#[test]
fn admission_errors_name_field_and_value() {
    let cases = [
        (
            "affinity = \"cookie\"\n",
            "vip[0].affinity: unknown variant `cookie`, expected `none` or `client`",
        ),
        (
            "load_bound = 1.25\n",
            "vip[0].load_bound: no longer exists: the scheduler keeps a client on its instance",
        ),
        (
            "load_aware = true\n",
            "vip[0].load_aware: no longer exists: every VIP now schedules by live flows and the engines' load; delete this line",
        ),
        (
            "load_interval_ms = 100\n",
            "vip[0].load_interval_ms: no longer exists: write [vip.scheduler] signal_interval_ms instead",
        ),
        (
            "[vip.scheduler]\nprefix_affinity = \"always\"\n",
            "vip[0].scheduler.prefix_affinity: unknown variant `always`, expected one of `auto`, `on`, `off`",
        ),
        (
            "[vip.scheduler]\nchoices = 9\n",
            "vip[0].scheduler.choices: 9 is out of range 1-8",
        ),
        (
            "[vip.scheduler]\nsignal_interval_ms = 100\nsignal_max_age_ms = 150\n",
            "vip[0].scheduler.signal_max_age_ms: 150 is below twice signal_interval_ms (100)",
        ),
        (
            "[vip.scheduler]\nchoise = 2\n",
            "vip[0].scheduler.choise: unknown field `choise`, expected one of `choices`",
        ),
        (
            "[vip.admission]\nburst = 5\n",
            "vip[0].admission.burst: needs a rate",
        ),
        (
            "[vip.admission]\nrate = 0\n",
            "vip[0].admission.rate: 0 is out of range",
        ),
        (
            "[vip.admission]\nrefuse = \"reject\"\n",
            "vip[0].admission.refuse: unknown variant `reject`",
        ),
        (
            "[vip.admission]\nallow = []\n",
            "vip[0].admission.allow: is empty",
        ),
        (
            "[vip.admission]\nallow = [\"198.18.0.1/24\"]\n",
            "vip[0].admission.allow[0]: \"198.18.0.1/24\" has host bits set (the network is 198.18.0.0/24)",
        ),
        (
            "[vip.admission]\nallow = [\"198.18.0.0/33\"]\n",
            "vip[0].admission.allow[0]: \"198.18.0.0/33\" has no prefix length 0-32",
        ),
    ];
    for (extra, want) in cases {
        let got = error_for(VIP_LINE, &format!("port = 80\n{extra}"));
        assert!(got.contains(want), "{extra:?}: {got}");
    }
    let got = error_for("port = 8002\n", "port = 8002\nslots = -1\n");
    assert!(
        got.contains(
            "vip[0].backend[1].slots: -1 is out of range 0 (learned from the engine)-65535"
        ),
        "{got}"
    );
    let got = error_for("port = 8002\n", "port = 8002\nmax_flows = 70000\n");
    assert!(
        got.contains("vip[0].backend[1].max_flows: 70000 is out of range"),
        "{got}"
    );
}

#[test]
fn good_config_parses_with_defaults() {
    let c = parse(GOOD).expect("valid config");
    assert_eq!(c.pin_path, PathBuf::from(DEFAULT_PIN_PATH));
    assert_eq!(c.xdp_mode, XdpMode::Auto);
    assert_eq!(c.map_sizes.v4, 65536);
    let vip = &c.vips[0];
    assert_eq!(vip.protocol, Protocol::Tcp);
    assert_eq!(
        vip.affinity,
        Affinity::Client,
        "a client keeps its instance by default"
    );
    assert_eq!(
        vip.scheduler,
        Scheduler {
            choices: lb_common::DEFAULT_CHOICES,
            signal_interval: Duration::from_millis(50),
            signal_max_age: Duration::from_millis(500),
            prefix_affinity: PrefixAffinity::Auto,
        }
    );
    assert_eq!(
        vip.backends[0].load,
        LoadSource::None,
        "static backends report no load"
    );
    assert_eq!(vip.maglev_table_size, 65537);
    assert_eq!(vip.backends[0].weight, 2);
    assert_eq!(vip.backends[1].weight, 1);
}

#[test]
fn duplicate_backend_is_named() {
    let e = error_for("port = 8002", "port = 8001");
    assert!(
        e.contains("vip[0].backend[1]") && e.contains("duplicate backend 198.18.0.1:8001"),
        "{e}"
    );
}

#[test]
fn weight_zero_on_only_backend() {
    let text = GOOD.replace(
        "\n[[vip.backend]]\naddress = \"198.18.0.1\"\nport = 8002\n",
        "",
    );
    let e = error_for_text(&text.replace("weight = 2", "weight = 0"));
    assert!(
        e.contains("vip[0].backend[0].weight: 0 on the only backend"),
        "{e}"
    );
}

fn error_for_text(text: &str) -> String {
    parse(text)
        .expect_err("config should be rejected")
        .to_string()
}

#[test]
fn all_weights_zero() {
    let text = GOOD
        .replace("weight = 2", "weight = 0")
        .replace("port = 8002\n", "port = 8002\nweight = 0\n");
    let e = error_for_text(&text);
    assert!(
        e.contains("vip[0].backend: every backend has weight 0"),
        "{e}"
    );
}

#[test]
fn port_out_of_range() {
    let e = error_for("port = 8001", "port = 70000");
    assert!(
        e.contains("vip[0].backend[0].port: 70000 is out of range 1-65535"),
        "{e}"
    );
    let e = error_for("port = 80", "port = 0");
    assert!(e.contains("vip[0].port: 0 is out of range"), "{e}");
}

#[test]
fn negative_weight() {
    let e = error_for("weight = 2", "weight = -1");
    assert!(
        e.contains("vip[0].backend[0].weight: -1 is out of range"),
        "{e}"
    );
}

#[test]
fn bad_address() {
    let e = error_for("198.18.100.1", "198.18.300.1");
    assert!(
        e.contains("vip[0].address: \"198.18.300.1\" is not an IPv4 or IPv6 address"),
        "{e}"
    );
    let e = error_for("198.18.100.1", "0.0.0.0");
    assert!(
        e.contains("vip[0].address: \"0.0.0.0\" is not a unicast"),
        "{e}"
    );
}

#[test]
fn bad_protocol() {
    let e = error_for("port = 80\n", "port = 80\nprotocol = \"sctp\"\n");
    assert!(
        e.contains("vip[0].protocol: unknown variant `sctp`, expected `tcp` or `udp`"),
        "{e}"
    );
}

#[test]
fn table_size_must_be_prime_and_bounded() {
    let e = error_for("port = 80\n", "port = 80\nmaglev_table_size = 65536\n");
    assert!(
        e.contains("vip[0].maglev_table_size: 65536 must be a prime"),
        "{e}"
    );
    let e = error_for("port = 80\n", "port = 80\nmaglev_table_size = 131071\n");
    assert!(e.contains("no larger than 65537"), "{e}");
    let ok = parse(&GOOD.replace("port = 80\n", "port = 80\nmaglev_table_size = 251\n"));
    assert_eq!(ok.expect("251 is prime").vips[0].maglev_table_size, 251);
}

#[test]
fn unknown_field_is_named() {
    let e = error_for("weight = 2", "wieght = 2");
    assert!(e.contains("unknown field `wieght`"), "{e}");
}

#[test]
fn duplicate_vip_and_name() {
    let second = "\n[[vip]]\nname = \"chat2\"\naddress = \"198.18.100.1\"\nport = 80\n\
                  [[vip.backend]]\naddress = \"198.18.0.1\"\nport = 9000\n";
    let e = error_for_text(&format!("{GOOD}{second}"));
    assert!(
        e.contains("vip[1]: 198.18.100.1:80/tcp already defined by vip[0] (\"chat\")"),
        "{e}"
    );
    let e = error_for_text(&format!(
        "{GOOD}{}",
        second
            .replace("chat2", "chat")
            .replace("port = 80\n", "port = 81\n")
    ));
    assert!(
        e.contains("vip[1].name: \"chat\" already used by vip[0]"),
        "{e}"
    );
}

#[test]
fn no_backends() {
    let text = "interface = \"lo\"\n[[vip]]\nname = \"x\"\naddress = \"198.18.100.1\"\nport = 80\n";
    let e = error_for_text(text);
    assert!(
        e.contains("vip[0].backend: a VIP needs at least one backend"),
        "{e}"
    );
}

#[test]
fn conntrack_size_bounds() {
    let e = error_for("conntrack_size = 65536", "conntrack_size = 10");
    assert!(e.contains("conntrack_size: 10 is out of range"), "{e}");
}

#[test]
fn relative_pin_path() {
    let e = error_for("conntrack_size", "pin_path = \"gpulb\"\nconntrack_size");
    assert!(e.contains("pin_path: gpulb is not an absolute path"), "{e}");
}

#[test]
fn unknown_interface_is_named() {
    let dir = std::env::temp_dir().join(format!("gpulb-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("bad-if.toml");
    std::fs::write(&path, GOOD.replace("\"lo\"", "\"gpulb-nosuch0\"")).expect("write");
    let e = Config::load(&path)
        .expect_err("unknown interface")
        .to_string();
    std::fs::remove_dir_all(&dir).expect("clean temp dir");
    assert!(
        e.contains("interface: no network interface named \"gpulb-nosuch0\""),
        "{e}"
    );
}

const MODEL: &str = r#"
[[model]]
name = "qwen"
vip = "chat"
command = ["vllm", "serve", "Qwen/Qwen2.5-7B-Instruct", "--port", "{port}"]
served_model = "Qwen/Qwen2.5-7B-Instruct"
gpus = [0, 1]
address = "198.18.0.1"
base_port = 9001
"#;

fn model_error(from: &str, to: &str) -> String {
    assert!(MODEL.contains(from), "fixture lacks {from:?}");
    error_for_text(&format!("{GOOD}{}", MODEL.replacen(from, to, 1)))
}

#[test]
fn model_parses_with_defaults() {
    let c = parse(&format!("{GOOD}{MODEL}")).expect("valid config");
    let m = &c.models[0];
    assert_eq!(
        m.gpus,
        GpuSelection::List(vec![GpuRef::Index(0), GpuRef::Index(1)])
    );
    assert_eq!(m.gpus_per_instance, 1);
    assert_eq!(m.instance_count(), Some(2));
    assert_eq!(m.health.kind, CheckKind::Http);
    assert_eq!(m.health.model.as_deref(), Some("Qwen/Qwen2.5-7B-Instruct"));
    assert_eq!(m.restart_delay, Duration::from_secs(1));
    assert_eq!(c.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
    assert_eq!(c.drain_timeout, Duration::from_secs(30));
    assert_eq!(
        c.metrics_listen,
        Some("127.0.0.1:9464".parse().expect("addr"))
    );
    let e = error_for(
        "conntrack_size",
        "metrics_listen = \"localhost\"\nconntrack_size",
    );
    assert!(
        e.contains("metrics_listen: \"localhost\" is not an address:port"),
        "{e}"
    );
    let off = parse(&GOOD.replace("conntrack_size", "metrics_listen = \"off\"\nconntrack_size"));
    assert_eq!(off.expect("off is valid").metrics_listen, None);
}

#[test]
fn a_model_alone_can_serve_a_vip() {
    let text = format!(
        "interface = \"lo\"\n[[vip]]\nname = \"chat\"\naddress = \"198.18.100.1\"\nport = 80\n{}",
        MODEL.replace("gpus = [0, 1]", "gpus = \"simulated:2\"")
    );
    let c = parse(&text).expect("a VIP served by a model needs no static backend");
    assert_eq!(c.models[0].gpus, GpuSelection::Simulated(2));
}

#[test]
fn model_errors_name_field_and_value() {
    let cases = [
        (
            "vip = \"chat\"",
            "vip = \"chta\"",
            "model[0].vip: no [[vip]] named \"chta\"",
        ),
        (
            "gpus = [0, 1]",
            "gpus = \"most\"",
            "model[0].gpus: \"most\" is not \"all\"",
        ),
        (
            "gpus = [0, 1]",
            "gpus = [0, 0]",
            "model[0].gpus[1]: gpu 0 is listed twice",
        ),
        (
            "gpus = [0, 1]",
            "gpus = [\"H100\"]",
            "model[0].gpus[0]: \"H100\" is not a GPU UUID",
        ),
        (
            "gpus = [0, 1]",
            "gpus = []",
            "model[0].gpus: must name at least one GPU",
        ),
        (
            "gpus = [0, 1]",
            "gpus = [0, 1, 2]\ngpus_per_instance = 2",
            "model[0].gpus_per_instance: 2 does not divide the 3 GPUs",
        ),
        (
            "\"{port}\"]",
            "\"{prot}\"]",
            "model[0].command[4]: unknown placeholder {prot}",
        ),
        (
            "command = [\"vllm\", \"serve\", \"Qwen/Qwen2.5-7B-Instruct\", \"--port\", \"{port}\"]\n",
            "",
            "model[0].command: must give the server's argv",
        ),
        (
            "base_port = 9001",
            "base_port = 8002",
            "model[0].base_port: instance 0 would listen on 198.18.0.1:8002, already vip[0].backend[1]",
        ),
        (
            "base_port = 9001",
            "base_port = 65535",
            "runs past port 65535",
        ),
        (
            "name = \"qwen\"",
            "name = \"a b\"",
            "model[0].name: \"a b\" must be non-empty",
        ),
        (
            "base_port = 9001",
            "base_port = 9001\n[model.health]\ncheck = \"icmp\"",
            "model[0].health.check: unknown variant `icmp`",
        ),
        (
            "base_port = 9001",
            "base_port = 9001\n[model.health]\nrise = 0",
            "model[0].health.rise: 0 is out of range 1-100",
        ),
        (
            "base_port = 9001",
            "base_port = 9001\nload = \"sglng\"",
            "model[0].load: unknown variant `sglng`, expected one of `vllm`, `sglang`, `tgi`, `llamacpp`, `nvml`, `none`",
        ),
        (
            "gpus = [0, 1]",
            "gpus = \"simulated:2\"\nload = \"nvml\"",
            "model[0].load: \"nvml\" needs real GPUs",
        ),
        (
            "base_port = 9001",
            "base_port = 9001\nrestart_delay_ms = 5000\nrestart_delay_max_ms = 1000",
            "model[0].restart_delay_max_ms: 1000 is below restart_delay_ms (5000)",
        ),
    ];
    for (from, to, want) in cases {
        let e = model_error(from, to);
        assert!(e.contains(want), "{from:?} -> {to:?}: got {e}");
    }
}

#[test]
fn a_gpu_serves_one_model() {
    let second = MODEL
        .replace("name = \"qwen\"", "name = \"llama\"")
        .replace("gpus = [0, 1]", "gpus = [1]")
        .replace("base_port = 9001", "base_port = 9101");
    let e = error_for_text(&format!("{GOOD}{MODEL}{second}"));
    assert!(
        e.contains("model[1].gpus: gpu 1 already used by \"qwen\""),
        "{e}"
    );
    let e = error_for_text(&format!(
        "{GOOD}{MODEL}{}",
        second
            .replace("base_port = 9101", "base_port = 9002")
            .replace("[1]", "[3]")
    ));
    assert!(
        e.contains("model[1].base_port: instance 0 would listen on 198.18.0.1:9002, already used by \"qwen\""),
        "{e}"
    );
}

#[test]
fn udp_vip_cannot_take_a_model() {
    let text = GOOD.replace("port = 80\n", "port = 80\nprotocol = \"udp\"\n");
    let e = error_for_text(&format!("{text}{MODEL}"));
    assert!(e.contains("model[0].vip: \"chat\" is a UDP VIP"), "{e}");
}

#[test]
fn socket_lb_is_auto_off_or_a_path() {
    assert_eq!(parse(GOOD).expect("valid").socket_lb, SocketLb::Auto);
    let c = parse(&GOOD.replace(
        "conntrack_size",
        "socket_lb = \"/sys/fs/cgroup/x\"\nconntrack_size",
    ));
    assert_eq!(
        c.expect("a path is valid").socket_lb,
        SocketLb::Cgroup(PathBuf::from("/sys/fs/cgroup/x"))
    );
    let e = error_for("conntrack_size", "socket_lb = \"cgroup\"\nconntrack_size");
    assert!(
        e.contains("socket_lb: \"cgroup\" is not \"auto\", \"off\" or an absolute cgroup v2 path"),
        "{e}"
    );
}

#[test]
fn conntrack_defaults_follow_the_vips() {
    let c = parse(GOOD).expect("valid config");
    assert_eq!(
        c.map_sizes.v6,
        lb_common::CONNTRACK6_IDLE_SIZE,
        "no IPv6 VIP: a small IPv6 table"
    );
    assert_eq!(
        c.conntrack_inserts_per_cpu,
        lb_common::CT_INSERTS_PER_CPU_DEFAULT
    );
    let c = parse(&GOOD.replacen(
        "conntrack_size = 65536",
        "conntrack_size = 65536\nconntrack_inserts_per_cpu = 0",
        1,
    ))
    .expect("valid config");
    assert_eq!(c.conntrack_inserts_per_cpu, 0, "0: no limit");
    let e = error_for("conntrack_size = 65536", "conntrack_inserts_per_cpu = -1");
    assert!(
        e.contains("conntrack_inserts_per_cpu: -1 is out of range 0-100000000"),
        "{e}"
    );
}

#[test]
fn a_backend_shared_by_two_vips_is_refused() {
    let second = "\n[[vip]]\nname = \"embed\"\naddress = \"198.18.100.2\"\nport = 80\n\
                  [[vip.backend]]\naddress = \"198.18.0.1\"\nport = 8002\n";
    let e = error_for_text(&format!("{GOOD}{second}"));
    assert!(
        e.contains("vip[1].backend[0]: 198.18.0.1:8002 is already vip[0].backend[1], a backend of vip[0]: a backend serves one VIP"),
        "{e}"
    );
    // The same address for a UDP VIP is another backend (replies are told apart by protocol).
    let udp = second.replace("port = 80\n", "port = 80\nprotocol = \"udp\"\n");
    parse(&format!("{GOOD}{udp}")).expect("TCP and UDP VIPs may share an address");
}

#[test]
fn ipv6_rate_prefix_errors_name_field_and_value() {
    let cases = [
        (
            "rate = 10\nipv6_prefix = 0\n",
            "vip[0].admission.ipv6_prefix: 0 is out of range 1-128",
        ),
        (
            "ipv6_prefix = 48\n",
            "vip[0].admission.ipv6_prefix: needs a rate",
        ),
    ];
    for (lines, want) in cases {
        let text = GOOD6.replacen("[vip.admission]\n", &format!("[vip.admission]\n{lines}"), 1);
        let got = error_for_text(&text);
        assert!(got.contains(want), "{lines:?}: {got}");
    }
    let text = GOOD.replacen(
        "port = 80\n",
        "port = 80\n[vip.admission]\nrate = 10\nipv6_prefix = 48\n",
        1,
    );
    let got = error_for_text(&text);
    assert!(
        got.contains("vip[0].admission.ipv6_prefix: applies to IPv6 VIPs only"),
        "{got}"
    );
    let text = GOOD6.replacen(
        "[vip.admission]\n",
        "[vip.admission]\nrate = 10\nipv6_prefix = 56\n",
        1,
    );
    let c = parse(&text).expect("valid");
    assert_eq!(c.vips[0].admission.rate.expect("rate").ipv6_prefix, 56);
}

#[test]
fn loopback_backends_are_refused_except_behind_lo() {
    let on = |interface: &str, from: &str, to: &str| {
        let text = GOOD6
            .replacen(
                "interface = \"lo\"",
                &format!("interface = \"{interface}\""),
                1,
            )
            .replacen(from, to, 1);
        parse(&text)
    };
    for (from, field) in [
        ("address = \"2001:db8::20\"", "model[0].address"),
        ("address = \"2001:db8::10\"", "vip[0].backend[0].address"),
    ] {
        let e = on("eth0", from, "address = \"::1\"")
            .expect_err("loopback behind eth0")
            .to_string();
        assert!(
            e.contains(&format!("{field}: \"::1\" is a loopback address"))
                && e.contains("martians"),
            "{e}"
        );
        on("lo", from, "address = \"::1\"").expect("behind lo, loopback is where packets go");
    }
}
