//! Clients on the gpulb host itself: their sockets never cross the NIC's XDP hook, so the
//! cgroup connect4/sendmsg4/getpeername4/recvmsg4 programs balance them with the same
//! tables. Needs root.

use std::{
    collections::BTreeSet,
    net::{SocketAddr, SocketAddrV4, UdpSocket},
    time::Duration,
};

use gpulb_testbed::{Extra, LB_ADDR, PinDir, Stack, VIP, VIP_PORT, burst, vip_url};

#[test]
fn host_clients_are_balanced_at_the_socket() {
    let stack = Stack::start("socklb", 4, PinDir::new("socklb"), &[]).expect("stack");
    let url = vip_url("/v1/chat/completions");

    // A client across the veth goes through XDP, not the socket programs.
    let (xdp_before, sock_before) = (stack.reason("fwd_new_flow"), stack.reason("sock_balanced"));
    let replies = burst(&stack.topo.client, &url, 4, 1, false, 4).expect("remote requests");
    assert!(replies.iter().all(Result::is_ok), "{replies:?}");
    assert_eq!(
        stack.reason("sock_balanced"),
        sock_before,
        "remote client not socket-balanced"
    );
    assert!(
        stack.reason("fwd_new_flow") >= xdp_before + 4,
        "remote client balanced by XDP"
    );

    // The host side (where gpulb and the instances run) has no route to the VIP at all: only
    // the socket programs get its requests anywhere.
    const N: usize = 24;
    let replies = burst(&stack.topo.lb, &url, N, 1, false, 4).expect("host requests");
    let instances: BTreeSet<String> = replies
        .into_iter()
        .map(|r| r.expect("a host request is answered").instance)
        .collect();
    assert!(
        instances.len() > 1,
        "host connections spread over instances: {instances:?}"
    );
    assert!(
        stack.reason("sock_balanced") >= sock_before + N as u64,
        "each host connection balanced at connect()"
    );

    // getpeername() shows the VIP the application connected to, not the backend.
    let peer = stack
        .topo
        .lb
        .run(|| {
            let s = std::net::TcpStream::connect_timeout(
                &SocketAddrV4::new(VIP, VIP_PORT).into(),
                Duration::from_secs(2),
            )?;
            s.peer_addr()
        })
        .expect("thread")
        .expect("connect from the host side");
    assert_eq!(peer, SocketAddrV4::new(VIP, VIP_PORT).into());
}

#[test]
fn socket_balancing_can_be_turned_off() {
    let stack = Stack::start_with(
        "socklb-off",
        2,
        PinDir::new("socklb-off"),
        &[],
        Extra {
            top: "socket_lb = \"off\"",
            ..Extra::default()
        },
    )
    .expect("stack");
    let connect = stack
        .topo
        .lb
        .run(|| {
            std::net::TcpStream::connect_timeout(
                &SocketAddrV4::new(VIP, VIP_PORT).into(),
                Duration::from_secs(1),
            )
        })
        .expect("thread");
    assert!(
        connect.is_err(),
        "no socket balancing: the host has no route to the VIP"
    );
    assert_eq!(stack.reason("sock_balanced"), 0);
}

#[test]
fn host_udp_sockets_are_balanced_and_see_the_vip_as_the_sender() {
    // A UDP "backend" the test owns: it echoes each datagram back to its sender.
    const DNS_VIP_PORT: u16 = 53;
    const ECHO_PORT: u16 = 5353;
    let stack = Stack::start_with(
        "socklb-udp",
        1,
        PinDir::new("socklb-udp"),
        &[],
        Extra {
            tail: &format!(
                "\n[[vip]]\nname = \"dns\"\naddress = \"{VIP}\"\nport = {DNS_VIP_PORT}\n\
                 protocol = \"udp\"\n[[vip.backend]]\naddress = \"{LB_ADDR}\"\nport = {ECHO_PORT}\n"
            ),
            ..Extra::default()
        },
    )
    .expect("stack");
    // Bound before anything is sent (a socket stays in the namespace it was made in).
    let socket = stack
        .topo
        .lb
        .run(|| UdpSocket::bind(SocketAddrV4::new(LB_ADDR, ECHO_PORT)))
        .expect("thread")
        .expect("echo socket");
    let echo = std::thread::spawn(move || -> std::io::Result<usize> {
        socket.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut buf = [0u8; 64];
        for served in 0..2 {
            let Ok((n, from)) = socket.recv_from(&mut buf) else {
                return Ok(served);
            };
            socket.send_to(&buf[..n], from)?;
        }
        Ok(2)
    });
    let vip = SocketAddrV4::new(VIP, DNS_VIP_PORT);
    let seen = stack
        .topo
        .lb
        .run(move || -> std::io::Result<(SocketAddr, SocketAddr)> {
            let mut buf = [0u8; 64];
            // Unconnected: sendmsg4 picks the backend, recvmsg4 shows the VIP as the sender.
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.send_to(b"ping", vip)?;
            let (n, from) = s.recv_from(&mut buf)?;
            assert_eq!(&buf[..n], b"ping");
            // Connected: connect4 picks it, getpeername4 shows the VIP.
            let c = UdpSocket::bind("0.0.0.0:0")?;
            c.set_read_timeout(Some(Duration::from_secs(5)))?;
            c.connect(vip)?;
            c.send(b"pong")?;
            let n = c.recv(&mut buf)?;
            assert_eq!(&buf[..n], b"pong");
            Ok((from, c.peer_addr()?))
        })
        .expect("thread")
        .expect("UDP through the VIP from the host side");
    assert_eq!(
        seen,
        (vip.into(), vip.into()),
        "the VIP is the peer both ways"
    );
    let served = echo.join().expect("echo thread").expect("echo");
    assert_eq!(served, 2, "both datagrams reached the backend");
}
