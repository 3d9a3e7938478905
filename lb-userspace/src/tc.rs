//! TC egress through netlink, for kernels without TCX (before 6.6) or when the config asks
//! for it: a `cls_bpf` filter (direct action) on the interface's `clsact` qdisc.
//!
//! A netlink filter is not a BPF link: it outlives the daemon by itself, with no pin. gpulb
//! puts it at a fixed priority and handle, so that the next daemon finds it there and
//! replaces its program atomically (a filter change in place, no packet without one), and
//! records in the pin directory (as empty directories, which bpffs allows) that it has a
//! filter on the interface and whether it created the `clsact` qdisc. Clean-up removes the
//! filter, and the qdisc only if gpulb created it and no other filter is left on it.

use std::{fs, io, path::Path};

use aya::programs::{
    ProgramError, SchedClassifier, TcAttachType,
    tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
};
use lb_common::programs;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    RouteNetlinkMessage,
    tc::{TcAttribute, TcHandle as NlHandle, TcMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use tracing::info;

/// gpulb's filter priority on the egress hook ("GP"). Fixed, so that a later daemon finds
/// the filter; lower numbers run first, and gpulb's only rewrites replies of its own flows.
pub const PRIORITY: u16 = 0x4750;
/// gpulb's filter handle at `PRIORITY`.
pub const HANDLE: TcHandle = TcHandle::new(0, 1);

/// Marks that gpulb has its filter on `interface`.
fn filter_marker(pin_path: &Path, interface: &str) -> std::path::PathBuf {
    pin_path.join(format!("tc_netlink_{interface}"))
}

/// Marks that gpulb created `interface`'s clsact qdisc.
fn qdisc_marker(pin_path: &Path, interface: &str) -> std::path::PathBuf {
    pin_path.join(format!("tc_clsact_{interface}"))
}

/// Attaches `program` to `interface`'s egress through netlink, or, where a previous daemon's
/// filter is, replaces its program. Returns whether it replaced one.
pub fn attach(
    program: &mut SchedClassifier,
    pin_path: &Path,
    interface: &str,
) -> Result<bool, ProgramError> {
    match tc::qdisc_add_clsact(interface) {
        Ok(()) => {
            mark(&qdisc_marker(pin_path, interface))?;
            info!(interface, "created the clsact qdisc for TC egress");
        }
        Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(e) => return Err(e.into()),
    }
    let options = || {
        TcAttachOptions::Netlink(NlOptions {
            priority: PRIORITY,
            handle: HANDLE,
            classid: None,
        })
    };
    let (id, replaced) =
        match program.attach_with_options(interface, TcAttachType::Egress, options()) {
            Ok(id) => (id, false),
            Err(ProgramError::TcError(TcError::NetlinkError(e)))
                if e.raw_os_error() == Some(libc::EEXIST) =>
            {
                let link = SchedClassifierLink::attached(
                    interface,
                    TcAttachType::Egress,
                    PRIORITY,
                    HANDLE,
                    None,
                )
                .map_err(|e| ProgramError::TcError(TcError::IoError(e)))?;
                (program.attach_to_link(link)?, true)
            }
            Err(e) => return Err(e),
        };
    // Dropping the link would detach the filter; it is meant to outlive this process.
    std::mem::forget(program.take_link(id)?);
    mark(&filter_marker(pin_path, interface))?;
    Ok(replaced)
}

fn mark(path: &Path) -> Result<(), ProgramError> {
    match fs::create_dir(path) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
            Err(ProgramError::TcError(TcError::IoError(e)))
        }
        _ => Ok(()),
    }
}

/// The interfaces gpulb has a netlink filter on, by its markers under `pin_path`.
pub fn attached_interfaces(pin_path: &Path) -> Vec<String> {
    fs::read_dir(pin_path)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("tc_netlink_")
                .map(str::to_owned)
        })
        .collect()
}

/// Removes gpulb's filter from `interface` and, if gpulb created it and nothing else is
/// on it, the clsact qdisc; then the markers. An interface that is gone has neither.
pub fn detach(pin_path: &Path, interface: &str) -> io::Result<()> {
    let qdisc_ours = qdisc_marker(pin_path, interface).exists();
    if !qdisc_ours && !filter_marker(pin_path, interface).exists() {
        return Ok(());
    }
    let gone = nix::net::if_::if_nametoindex(interface).is_err();
    if !gone {
        match tc::qdisc_detach_program(interface, TcAttachType::Egress, programs::EGRESS) {
            Ok(()) => info!(interface, "removed the TC egress filter"),
            Err(TcError::IoError(e)) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io::Error::other(e)),
        }
        if qdisc_ours {
            let index = nix::net::if_::if_nametoindex(interface).map_err(io::Error::from)? as i32;
            if filters(index)? == 0 {
                delete_clsact(index)?;
                info!(interface, "removed the clsact qdisc gpulb created");
            } else {
                info!(
                    interface,
                    "left the clsact qdisc gpulb created: other filters use it"
                );
            }
        }
    }
    for marker in [
        filter_marker(pin_path, interface),
        qdisc_marker(pin_path, interface),
    ] {
        match fs::remove_dir(marker) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// Ingress and egress filters on interface `index`'s clsact qdisc, counted.
pub fn filters(index: i32) -> io::Result<usize> {
    let mut n = 0;
    for minor in [NlHandle::MIN_INGRESS, NlHandle::MIN_EGRESS] {
        let mut msg = TcMessage::with_index(index);
        msg.header.parent = NlHandle {
            major: u16::MAX,
            minor,
        };
        n += request(
            RouteNetlinkMessage::GetTrafficFilter(msg),
            NLM_F_REQUEST | NLM_F_DUMP,
        )?
        .iter()
        .filter(|m| matches!(m, RouteNetlinkMessage::NewTrafficFilter(_)))
        .count();
    }
    Ok(n)
}

/// Whether interface `index` has a clsact qdisc.
pub fn has_clsact(index: i32) -> io::Result<bool> {
    let mut msg = TcMessage::with_index(index);
    msg.header.parent = NlHandle::UNSPEC;
    let qdiscs = request(
        RouteNetlinkMessage::GetQueueDiscipline(msg),
        NLM_F_REQUEST | NLM_F_DUMP,
    )?;
    Ok(qdiscs.iter().any(|m| match m {
        RouteNetlinkMessage::NewQueueDiscipline(q) => {
            q.header.index == index
                && q.attributes
                    .iter()
                    .any(|a| matches!(a, TcAttribute::Kind(k) if k == "clsact"))
        }
        _ => false,
    }))
}

fn delete_clsact(index: i32) -> io::Result<()> {
    let mut msg = TcMessage::with_index(index);
    msg.header.parent = NlHandle::CLSACT;
    msg.header.handle = NlHandle {
        major: u16::MAX,
        minor: 0,
    };
    msg.attributes.push(TcAttribute::Kind("clsact".to_owned()));
    request(
        RouteNetlinkMessage::DelQueueDiscipline(msg),
        NLM_F_REQUEST | NLM_F_ACK,
    )?;
    Ok(())
}

/// Sends one rtnetlink request and returns the messages of its answer, up to its ACK or the
/// end of its dump; an error answer is returned as the error.
fn request(message: RouteNetlinkMessage, flags: u16) -> io::Result<Vec<RouteNetlinkMessage>> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut packet = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(message));
    packet.header.flags = flags;
    packet.header.sequence_number = 1;
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0)?;

    let mut answer = Vec::new();
    let mut received = vec![0; 1 << 16];
    loop {
        let size = socket.recv(&mut &mut received[..], 0)?;
        let mut offset = 0;
        while offset < size {
            let msg: NetlinkMessage<RouteNetlinkMessage> =
                NetlinkMessage::deserialize(&received[offset..size])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok(answer),
                NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                NetlinkPayload::Error(_) => return Ok(answer),
                NetlinkPayload::InnerMessage(m) => answer.push(m),
                _ => {}
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
}
