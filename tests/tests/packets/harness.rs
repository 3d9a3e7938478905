//! Running packets through the loaded programs (BPF_PROG_TEST_RUN) and building the TCP
//! packets the conntrack and admission tests send. Shared by the packet test files.

use aya::programs::{TestRun as _, TestRunOptions};
use etherparse::PacketBuilder;
use gpulb::{datapath::Datapath, plan};
use lb_common::Reason;

use super::frames::{MAC_A, MAC_B, flow_of};

pub const XDP_TX: u32 = 3;

/// A TCP packet with explicit flags (`syn`, `fin`), ACK set unless it is a SYN.
pub fn tcp_flags(src: [u8; 4], dst: [u8; 4], sport: u16, syn: bool, fin: bool) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(src, dst, 64)
        .tcp(sport, 80, 1000, 65535);
    let b = if syn { b.syn() } else { b.ack(5000) };
    let b = if fin { b.fin() } else { b };
    let mut out = Vec::new();
    b.write(&mut out, b"GET / HTTP/1.1\r\n\r\n").expect("build");
    out
}

/// Runs one packet through the XDP program: (action, output, the one reason it counted).
pub fn run(dp: &mut Datapath, name: &str, packet: &[u8]) -> (u32, Vec<u8>, Reason) {
    let before = dp.maps.reasons().expect("reasons");
    let mut out = vec![0u8; packet.len() + 64];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(packet);
    opts.data_out = Some(&mut out);
    let result = dp
        .ingress()
        .test_run(opts)
        .unwrap_or_else(|e| panic!("{name}: test run: {e}"));
    out.truncate(result.data_size_out as usize);
    let after = dp.maps.reasons().expect("reasons");
    let counted: Vec<Reason> = reason_deltas(&before, &after)
        .into_iter()
        .map(|(reason, _)| reason)
        .collect();
    assert_eq!(
        counted.len(),
        1,
        "{name}: one reason per packet: {counted:?}"
    );
    (result.return_value, out, counted[0])
}

/// The reasons counted between two readings of the counters, with how often each.
pub fn reason_deltas(before: &[(Reason, u64)], after: &[(Reason, u64)]) -> Vec<(Reason, u64)> {
    after
        .iter()
        .zip(before)
        .filter(|(a, b)| a.1 != b.1)
        .map(|(a, b)| (a.0, a.1 - b.1))
        .collect()
}

/// Runs one packet through the XDP program and returns only its action, without reading
/// the reason counters (for packets that must follow each other closely).
pub fn run_bare(dp: &mut Datapath, packet: &[u8]) -> u32 {
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(packet);
    dp.ingress()
        .test_run(opts)
        .unwrap_or_else(|e| panic!("test run: {e}"))
        .return_value
}

/// Opens a TCP flow: its SYN, then (if forwarded) the client's ACK that completes the
/// handshake, from when the flow counts against its backend. The SYN's verdict and output.
pub fn connect(
    dp: &mut Datapath,
    name: &str,
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
) -> (u32, Vec<u8>, Reason) {
    let (action, out, reason) = run(dp, name, &tcp_flags(src, dst, sport, true, false));
    if reason == Reason::FwdNewFlow {
        let (_, ack, ack_reason) = run(dp, name, &tcp_flags(src, dst, sport, false, false));
        assert_eq!(
            ack_reason,
            Reason::FwdEstablished,
            "{name}: the handshake's ACK"
        );
        assert_eq!(
            nat_port(&ack),
            nat_port(&out),
            "{name}: the ACK follows the SYN"
        );
    }
    (action, out, reason)
}

/// Gives every planned backend `slots` batch slots (what the daemon writes from the config).
pub fn with_slots(dp: &mut Datapath, plan: &plan::Plan, slots: u32) {
    for (id, _) in plan.services.iter().flat_map(|s| &s.backends) {
        let load = lb_common::EngineLoad {
            slots,
            ..lb_common::EngineLoad::default()
        };
        dp.maps.set_engine(*id, load).expect("engine load");
    }
}

/// The backend port a NATed packet went to.
pub fn nat_port(out: &[u8]) -> u16 {
    u16::from_be(flow_of(out).dport_be)
}

/// A reply through TC egress: (return value, output).
pub fn run_egress(dp: &mut Datapath, packet: &[u8]) -> (i32, Vec<u8>) {
    let mut out = vec![0u8; packet.len() + 64];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(packet);
    opts.data_out = Some(&mut out);
    let result = dp.egress().test_run(opts).expect("egress test run");
    out.truncate(result.data_size_out as usize);
    (result.return_value as i32, out)
}

/// A backend's RST from `backend_port` to the client's `client_port`, with this sequence
/// number (0: what a host sends to refuse a SYN).
pub fn backend_rst(backend_port: u16, client: [u8; 4], client_port: u16, seq: u32) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(MAC_B, MAC_A)
        .ipv4([198, 18, 0, 1], client, 64)
        .tcp(backend_port, client_port, seq, 0)
        .rst()
        .ack(1001)
        .write(&mut out, &[])
        .expect("build");
    out
}
