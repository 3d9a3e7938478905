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
    Link as _, ProgramError, SchedClassifier, TcAttachType,
    tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NetlinkBuffer,
    NetlinkHeader, NetlinkMessage, NetlinkPayload,
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
        Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {
            // An `ingress` qdisc holds the same handle and answers EEXIST too; filters meant
            // for egress would not run there.
            let index = if_index(interface).map_err(tc_io)?;
            if !has_clsact(index).map_err(tc_io)? {
                return Err(tc_io(io::Error::other(format!(
                    "{interface} has an ingress qdisc, not clsact: TC egress needs clsact \
                     (tc qdisc del dev {interface} ingress, or tc_attach = \"tcx\" on Linux 6.6+)"
                ))));
            }
        }
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
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(tc_io(e)),
        _ => Ok(()),
    }
}

fn tc_io(e: io::Error) -> ProgramError {
    ProgramError::TcError(TcError::IoError(e))
}

fn if_index(interface: &str) -> io::Result<i32> {
    Ok(nix::net::if_::if_nametoindex(interface).map_err(io::Error::from)? as i32)
}

/// The interfaces gpulb has a netlink filter or a qdisc of its own on, by its markers under
/// `pin_path`.
pub fn attached_interfaces(pin_path: &Path) -> Vec<String> {
    fs::read_dir(pin_path)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_owned();
            name.strip_prefix("tc_netlink_")
                .or_else(|| name.strip_prefix("tc_clsact_"))
                .map(str::to_owned)
        })
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Removes gpulb's filter from `interface` and, if gpulb created it and nothing else is
/// on it, the clsact qdisc; then the markers. An interface that is gone has neither; a
/// qdisc someone removed meanwhile took the filter with it.
pub fn detach(pin_path: &Path, interface: &str) -> io::Result<()> {
    let qdisc_ours = qdisc_marker(pin_path, interface).exists();
    if !qdisc_ours && !filter_marker(pin_path, interface).exists() {
        return Ok(());
    }
    if let Ok(index) = if_index(interface) {
        // gpulb's own filter, by its priority and handle (not by name: another gpulb with
        // another pin path may have one of the same name).
        let ours =
            SchedClassifierLink::attached(interface, TcAttachType::Egress, PRIORITY, HANDLE, None)?;
        match ours.detach() {
            Ok(()) => info!(interface, "removed the TC egress filter"),
            Err(ProgramError::NetlinkError(e))
                if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EINVAL)) => {}
            Err(e) => return Err(io::Error::other(e)),
        }
        if qdisc_ours && has_clsact(index)? {
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

/// Drops the markers of `interface` (after a `detach` that failed: the caller has said what
/// may be left).
pub fn forget(pin_path: &Path, interface: &str) {
    let _ = fs::remove_dir(filter_marker(pin_path, interface));
    let _ = fs::remove_dir(qdisc_marker(pin_path, interface));
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
        .filter(|(kind, _)| *kind == RTM_NEWTFILTER)
        .count();
    }
    Ok(n)
}

/// Whether interface `index` has a clsact qdisc.
pub fn has_clsact(index: i32) -> io::Result<bool> {
    let qdiscs = request(
        RouteNetlinkMessage::GetQueueDiscipline(TcMessage::with_index(0)),
        NLM_F_REQUEST | NLM_F_DUMP,
    )?;
    Ok(qdiscs
        .iter()
        .filter(|(kind, _)| *kind == RTM_NEWQDISC)
        .filter_map(|(_, bytes)| {
            // Other qdiscs' options may not decode; only the header and kind matter.
            match NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes)
                .ok()?
                .payload
            {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewQueueDiscipline(q)) => Some(q),
                _ => None,
            }
        })
        .any(|q| {
            q.header.index == index
                && q.attributes
                    .iter()
                    .any(|a| matches!(a, TcAttribute::Kind(k) if k == "clsact"))
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

/// rtnetlink message types this module reads.
const RTM_NEWQDISC: u16 = 36;
const RTM_NEWTFILTER: u16 = 44;

/// Sends one rtnetlink request and returns its answer's messages (type and whole message,
/// undecoded), up to its ACK or the end of its dump. An error answer, an error at the end of
/// a dump, or a dump the kernel interrupted (it changed meanwhile) is an error.
fn request(message: RouteNetlinkMessage, flags: u16) -> io::Result<Vec<(u16, Vec<u8>)>> {
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

    let invalid =
        |e: netlink_packet_core::DecodeError| io::Error::new(io::ErrorKind::InvalidData, e);
    let mut answer = Vec::new();
    let mut received = vec![0; 1 << 16];
    loop {
        let size = socket.recv(&mut &mut received[..], 0)?;
        let mut offset = 0;
        while offset < size {
            let bytes = &received[offset..size];
            let header = NetlinkBuffer::new_checked(bytes).map_err(invalid)?;
            let len = header.length() as usize;
            if len == 0 || len > bytes.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "netlink: bad length",
                ));
            }
            if header.flags() & NLM_F_DUMP_INTR != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::Interrupted,
                    "netlink dump interrupted: the table changed meanwhile",
                ));
            }
            match header.message_type() {
                NLMSG_DONE => {
                    let msg: NetlinkMessage<RouteNetlinkMessage> =
                        NetlinkMessage::deserialize(&bytes[..len]).map_err(invalid)?;
                    if let NetlinkPayload::Done(d) = msg.payload
                        && d.code != 0
                    {
                        return Err(io::Error::from_raw_os_error(-d.code));
                    }
                    return Ok(answer);
                }
                NLMSG_ERROR => {
                    let msg: NetlinkMessage<RouteNetlinkMessage> =
                        NetlinkMessage::deserialize(&bytes[..len]).map_err(invalid)?;
                    return match msg.payload {
                        NetlinkPayload::Error(e) if e.code.is_some() => Err(e.to_io()),
                        _ => Ok(answer),
                    };
                }
                kind => answer.push((kind, bytes[..len].to_vec())),
            }
            offset += len;
        }
    }
}
