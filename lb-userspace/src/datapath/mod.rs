//! Loading the BPF object with its maps pinned, attaching it, and taking it down again.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::MapData,
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError, SchedClassifier, TcAttachType, Xdp,
        XdpMode,
        links::{FdLink, LinkError, LinkOrder, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
    },
};
use lb_common::{
    maps::{self as names, MapSizes, MapSpec},
    programs,
};
use tracing::{info, warn};

use crate::{config, kernel::TcPath, maps::Maps, tc};

mod carry;

use carry::{
    carry_conntrack, drop_resized_ipv6, mark_vip_ports, migrate_tables, set_aside_resized,
    tables_to_carry,
};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "running under `ip netns exec {0}`, which mounts a fresh /sys for the command: \
         /sys/fs/bpf there is not the host's bpffs, so gpulb would not find its pinned maps \
         and links (attaching fails with \"File exists\") and would leave the data path \
         unreachable to the CLI. Run it as `nsenter --net=/run/netns/{0} gpulb run ...`, which \
         enters only the network namespace"
    )]
    NetnsExec(String),
    #[error("{} is not on a bpf filesystem and could not be mounted", path.display())]
    BpfFs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("moving the resized conntrack map aside to {}", path.display())]
    SetAside {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("creating pin directory {}", path.display())]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "pinned map {} has {what} {found}, this gpulb needs {want}: it was made by another \
         gpulb version or config; stop that daemon, or remove the directory if none runs",
        path.display()
    )]
    Incompatible {
        path: PathBuf,
        what: &'static str,
        found: u32,
        want: u32,
    },
    #[error("loading the BPF object")]
    Load(#[source] aya::EbpfError),
    #[error("program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("attaching XDP to {interface} in {mode} mode")]
    AttachXdp {
        interface: String,
        mode: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("attaching {program} to cgroup {}", cgroup.display())]
    AttachCgroup {
        program: &'static str,
        cgroup: PathBuf,
        #[source]
        source: ProgramError,
    },
    #[error("opening cgroup {}", path.display())]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading this network namespace's cookie (SO_NETNS_COOKIE, Linux 5.14)")]
    NetnsCookie(#[source] io::Error),
    #[error("attaching TC egress to {interface}")]
    AttachTc {
        interface: String,
        #[source]
        source: ProgramError,
    },
    #[error("pinning the {what} link at {}", path.display())]
    PinLink {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("taking over the pinned {what} link at {}", path.display())]
    TakeOver {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(transparent)]
    Maps(#[from] crate::maps::MapsError),
}

/// Pinned links are named for their interface: a config naming another interface leaves the
/// old ones to be removed.
fn link_pin(pin_path: &Path, what: &str, interface: &str) -> PathBuf {
    pin_path.join(format!("link_{what}_{interface}"))
}

/// How `attach` found the interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attached {
    /// Fresh attach, in this XDP mode.
    New(&'static str),
    /// A previous daemon's pinned links now run this daemon's programs.
    TakenOver,
}

impl Attached {
    pub fn describe(self) -> &'static str {
        match self {
            Attached::New(mode) => mode,
            Attached::TakenOver => "taken over",
        }
    }
}

/// Mounts bpffs at /sys/fs/bpf if `pin_path` lies there and nothing is mounted.
pub fn ensure_bpffs(pin_path: &Path) -> Result<(), DatapathError> {
    let root = Path::new("/sys/fs/bpf");
    if !pin_path.starts_with(root) {
        return Ok(());
    }
    if is_bpffs(root) {
        return Ok(());
    }
    if let Some(name) = named_netns() {
        return Err(DatapathError::NetnsExec(name));
    }
    info!(path = %root.display(), "mounting bpffs");
    fs::create_dir_all(root)
        .and_then(|()| {
            nix::mount::mount(
                Some("bpf"),
                root,
                Some("bpf"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .map_err(io::Error::from)
        })
        .map_err(|source| DatapathError::BpfFs {
            path: root.to_owned(),
            source,
        })
}

/// The name under /run/netns of this process's network namespace, if it has one and this
/// process is in a mount namespace of its own: with no bpffs at /sys/fs/bpf that is
/// `ip netns exec` (which unshares the mounts and remounts /sys), not `nsenter --net`.
fn named_netns() -> Option<String> {
    use std::os::unix::fs::MetadataExt as _;
    let same = |a: &fs::Metadata, b: &fs::Metadata| a.dev() == b.dev() && a.ino() == b.ino();
    let mounts = fs::metadata("/proc/self/ns/mnt").ok()?;
    if fs::metadata("/proc/1/ns/mnt").is_ok_and(|init| same(&init, &mounts)) {
        return None;
    }
    let own = fs::metadata("/proc/self/ns/net").ok()?;
    fs::read_dir("/run/netns")
        .ok()?
        .flatten()
        .find(|e| fs::metadata(e.path()).is_ok_and(|m| same(&m, &own)))
        .map(|e| e.file_name().to_string_lossy().into_owned())
}

/// Whether a bpf filesystem is mounted at (or holds) `path`.
pub fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
}

/// Refuses to reuse pinned maps whose layout differs from this build's schema (aya would
/// reuse them blindly).
fn check_pinned(pin_path: &Path, sizes: &MapSizes) -> Result<(), DatapathError> {
    for spec in names::ALL {
        let path = pin_path.join(spec.name);
        let Ok(map) = MapData::from_pin(&path) else {
            continue;
        };
        let info = map.info().map_err(|e| crate::maps::MapsError::Op {
            op: "inspecting",
            name: spec.name,
            source: e,
        })?;
        let kind = info.map_type().map_or(0, |t| t as u32);
        let checks = [
            ("type", kind, spec.kind as u32),
            ("key size", info.key_size(), spec.key_size),
            ("value size", info.value_size(), spec.value_size),
            ("max_entries", info.max_entries(), spec.max_entries(sizes)),
        ];
        if let Some((what, found, want)) = checks.into_iter().find(|(_, f, w)| f != w) {
            return Err(DatapathError::Incompatible {
                path,
                what,
                found,
                want,
            });
        }
    }
    Ok(())
}

/// The loaded programs and their maps, pinned under `pin_path`.
pub struct Datapath {
    pub ebpf: Ebpf,
    pub maps: Maps,
    pin_path: PathBuf,
    /// Links this process pinned (taken-over links live in the programs' link sets).
    links: Vec<PinnedLink>,
    /// Conntrack tables carried over at load, copied once more and removed by `finish_carry`.
    carry: Vec<(PathBuf, MapSpec)>,
}

impl Datapath {
    /// Loads the object and pins (or reuses) its maps under `pin_path`, sized by `sizes` (the
    /// conntrack tables, and the IPv6 maps, whose pins of another size are made anew);
    /// attaches nothing. Reused maps keep their contents: conntrack survives a daemon restart
    /// or upgrade.
    pub fn load(pin_path: &Path, sizes: MapSizes) -> Result<Self, DatapathError> {
        ensure_bpffs(pin_path)?;
        fs::create_dir_all(pin_path).map_err(|source| DatapathError::PinDir {
            path: pin_path.to_owned(),
            source,
        })?;
        set_aside_resized(pin_path, &sizes)?;
        drop_resized_ipv6(pin_path, &sizes);
        check_pinned(pin_path, &sizes)?;
        // Maps of older versions that nothing reads any more.
        for name in names::RETIRED {
            let _ = fs::remove_file(pin_path.join(name));
        }
        let mut loader = EbpfLoader::new();
        for spec in names::ALL {
            // BTF maps name no pinning of their own: each is pinned (or its pin reused, as
            // the pin of a version without BTF is) at its name.
            loader.map_pin_path(spec.name, pin_path.join(spec.name));
            if spec.max_entries(&sizes) != spec.default_entries() {
                loader.map_max_entries(spec.name, spec.max_entries(&sizes));
            }
        }
        let mut ebpf = loader
            .load(crate::EBPF_OBJECT)
            .map_err(DatapathError::Load)?;
        let prog = |name| move |source| DatapathError::Program { name, source };
        let ingress: &mut Xdp = ebpf
            .program_mut(programs::INGRESS)
            .expect("object has gpulb_ingress")
            .try_into()
            .map_err(prog(programs::INGRESS))?;
        ingress.load().map_err(prog(programs::INGRESS))?;
        let egress: &mut SchedClassifier = ebpf
            .program_mut(programs::EGRESS)
            .expect("object has gpulb_egress")
            .try_into()
            .map_err(prog(programs::EGRESS))?;
        egress.load().map_err(prog(programs::EGRESS))?;
        for name in SOCKET_PROGRAMS {
            let p: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .expect("object has the socket programs")
                .try_into()
                .map_err(prog(name))?;
            p.load().map_err(prog(name))?;
        }
        let mut maps = Maps::from_ebpf(&mut ebpf)?;
        migrate_tables(pin_path, &mut maps);
        mark_vip_ports(&mut maps);
        let carry = tables_to_carry(pin_path);
        carry_conntrack(&mut maps, &carry, false);
        Ok(Self {
            ebpf,
            maps,
            pin_path: pin_path.to_owned(),
            links: Vec::new(),
            carry,
        })
    }

    /// Once this version's programs run: copies the flows the old programs opened since the
    /// load (only keys this table lacks), then removes the old tables.
    pub fn finish_carry(&mut self) {
        let carry = std::mem::take(&mut self.carry);
        if carry.is_empty() {
            return;
        }
        carry_conntrack(&mut self.maps, &carry, true);
        for (path, _) in carry {
            let _ = fs::remove_file(path);
        }
    }

    /// Instructions the verifier processed for each program when it loaded (the kernel's
    /// `verified_insns`, 5.16 and later; `None` where the kernel does not say): how close a
    /// program is to the verifier's limit, tracked per kernel by `cargo xtask bench`.
    pub fn verified_instructions(&self) -> Vec<(&'static str, Option<u32>)> {
        [programs::INGRESS, programs::EGRESS]
            .into_iter()
            .chain(SOCKET_PROGRAMS)
            .map(|name| {
                let count = self
                    .ebpf
                    .program(name)
                    .and_then(|p| p.info().ok())
                    .and_then(|i| i.verified_instruction_count());
                (name, count)
            })
            .collect()
    }

    pub fn ingress(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(programs::INGRESS)
            .expect("object has gpulb_ingress")
            .try_into()
            .expect("gpulb_ingress is XDP")
    }

    pub fn egress(&mut self) -> &mut SchedClassifier {
        self.ebpf
            .program_mut(programs::EGRESS)
            .expect("object has gpulb_egress")
            .try_into()
            .expect("gpulb_egress is TC")
    }

    /// Attaches ingress (XDP, in `mode`) and egress (TC) to `interface` through links pinned
    /// next to the maps, so that the data path outlives this process. Where a previous
    /// daemon's links are pinned, swaps this daemon's programs into them instead
    /// (`bpf_link_update`: atomic, no packet sees no program).
    pub fn attach(
        &mut self,
        interface: &str,
        mode: config::XdpMode,
        tc: TcPath,
    ) -> Result<Attached, DatapathError> {
        self.remove_foreign_links(interface);
        let xdp_pin = link_pin(&self.pin_path, "xdp", interface);
        let tc_pin = link_pin(&self.pin_path, "tc", interface);
        let took_over = xdp_pin.exists();
        let attached = if took_over {
            let link = take_over::<XdpLink>(&xdp_pin, "XDP")?;
            self.ingress()
                .attach_to_link(link)
                .map_err(|source| DatapathError::Program {
                    name: programs::INGRESS,
                    source,
                })?;
            Attached::TakenOver
        } else {
            let used = match mode {
                config::XdpMode::Native => self.attach_xdp(interface, XdpMode::Driver, "native")?,
                config::XdpMode::Generic => self.attach_xdp(interface, XdpMode::Skb, "generic")?,
                config::XdpMode::Auto => {
                    match self.attach_xdp(interface, XdpMode::Driver, "native") {
                        Ok(used) => used,
                        Err(e) => {
                            warn!(interface, error = %ErrorChain(&e), "native XDP failed; falling back to generic (slower)");
                            self.attach_xdp(interface, XdpMode::Skb, "generic")?
                        }
                    }
                }
            };
            Attached::New(used)
        };
        match tc {
            TcPath::Tcx => {
                self.attach_tcx(interface, &tc_pin)?;
                // A netlink filter of an earlier daemon (another tc_attach, or an older
                // kernel) goes once the link runs. Left behind, it would see only replies
                // the link already rewrote, and pass them.
                if let Err(e) = tc::detach(&self.pin_path, interface) {
                    warn!(interface, error = %e, "could not remove gpulb's netlink TC filter of an earlier daemon");
                }
            }
            TcPath::Netlink => {
                let pin_path = self.pin_path.clone();
                tc::attach(self.egress(), &pin_path, interface).map_err(|source| {
                    DatapathError::AttachTc {
                        interface: interface.to_owned(),
                        source,
                    }
                })?;
                // A TCX link of an earlier daemon detaches once its pin is gone.
                let _ = fs::remove_file(&tc_pin);
            }
        }
        Ok(attached)
    }

    /// Balances the sockets of `cgroup`'s processes in this network namespace (connect and
    /// sendmsg, and getpeername/recvmsg to show the VIP again; IPv4 and IPv6), or detaches that when
    /// `None`. The links are pinned like the interface's; a previous daemon's are replaced
    /// after this daemon's are attached, so no connect goes unbalanced in between.
    /// Returns the cgroup, if any.
    pub fn attach_sockets(
        &mut self,
        socket_lb: &config::SocketLb,
    ) -> Result<Option<PathBuf>, DatapathError> {
        let cgroup = match socket_lb {
            config::SocketLb::Off => None,
            config::SocketLb::Cgroup(path) => Some(path.clone()),
            config::SocketLb::Auto => {
                let found = cgroup2_root();
                if found.is_none() {
                    warn!("no cgroup v2 mount: clients on this host are not balanced");
                }
                found
            }
        };
        let Some(cgroup) = cgroup.as_deref() else {
            for name in SOCKET_PROGRAMS {
                let _ = fs::remove_file(link_pin(&self.pin_path, "cgroup", name));
            }
            return Ok(None);
        };
        let cookie = match netns_cookie() {
            Ok(cookie) => cookie,
            Err(e)
                if *socket_lb == config::SocketLb::Auto
                    && crate::kernel::is_missing_netns_cookie(&e) =>
            {
                warn!(
                    "socket-level balancing off: this kernel has no SO_NETNS_COOKIE (Linux {} \
                     or newer); clients on this host reach VIPs only through the interface",
                    crate::kernel::NETNS_COOKIE
                );
                return Ok(None);
            }
            Err(e) => return Err(DatapathError::NetnsCookie(e)),
        };
        self.maps.set_sock_netns(cookie)?;
        let dir = fs::File::open(cgroup).map_err(|source| DatapathError::Cgroup {
            path: cgroup.to_owned(),
            source,
        })?;
        for name in SOCKET_PROGRAMS {
            let err = |source| DatapathError::AttachCgroup {
                program: name,
                cgroup: cgroup.to_owned(),
                source,
            };
            let program: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .expect("object has the socket programs")
                .try_into()
                .map_err(err)?;
            // A bpf_link (kernel ≥ 5.7) takes no attach flags ("Single" is 0) and always
            // stacks: other tools' programs on the cgroup stay, and so does the previous
            // daemon's until its pin is replaced.
            let id = program
                .attach(&dir, CgroupAttachMode::Single)
                .map_err(err)?;
            let link = program.take_link(id).map_err(err)?;
            let path = link_pin(&self.pin_path, "cgroup", name);
            let fd = FdLink::try_from(link).map_err(|e| DatapathError::TakeOver {
                what: "cgroup",
                path: path.clone(),
                source: Box::new(e),
            })?;
            self.links.push(pin_link(fd, &path, "cgroup")?);
        }
        Ok(Some(cgroup.to_owned()))
    }

    /// TC egress through a TCX link pinned at `pin`, or the program swapped into the link
    /// already pinned there.
    fn attach_tcx(&mut self, interface: &str, pin: &Path) -> Result<(), DatapathError> {
        let err = |source| DatapathError::AttachTc {
            interface: interface.to_owned(),
            source,
        };
        if pin.exists() {
            let link = take_over::<SchedClassifierLink>(pin, "TC")?;
            self.egress().attach_to_link(link).map_err(err)?;
            return Ok(());
        }
        let egress = self.egress();
        let id = egress
            .attach_with_options(
                interface,
                TcAttachType::Egress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(err)?;
        let link = egress.take_link(id).map_err(err)?;
        let fd = FdLink::try_from(link).map_err(|e| DatapathError::TakeOver {
            what: "TC",
            path: pin.to_owned(),
            source: Box::new(e),
        })?;
        self.links.push(pin_link(fd, pin, "TC")?);
        Ok(())
    }

    /// Removes the pinned links of interfaces other than `interface` (they detach once
    /// nothing holds them), and gpulb's netlink filters there.
    fn remove_foreign_links(&self, interface: &str) {
        let Ok(entries) = fs::read_dir(&self.pin_path) else {
            return;
        };
        let ours = [
            link_pin(&self.pin_path, "xdp", interface),
            link_pin(&self.pin_path, "tc", interface),
        ];
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_link = name.starts_with("link_") && !name.starts_with("link_cgroup_");
            if is_link && !ours.contains(&path) {
                info!(link = %path.display(), "removing a pinned link of another interface");
                let _ = fs::remove_file(path);
            }
        }
        for other in tc::attached_interfaces(&self.pin_path) {
            if other != interface
                && let Err(e) = tc::detach(&self.pin_path, &other)
            {
                warn!(interface = %other, error = %e, "removing the TC filter of another interface");
            }
        }
    }

    fn attach_xdp(
        &mut self,
        interface: &str,
        mode: XdpMode,
        name: &'static str,
    ) -> Result<&'static str, DatapathError> {
        let err = |source| DatapathError::AttachXdp {
            interface: interface.to_owned(),
            mode: name,
            source,
        };
        let ingress = self.ingress();
        let id = ingress.attach(interface, mode).map_err(err)?;
        let link = ingress.take_link(id).map_err(err)?;
        let path = link_pin(&self.pin_path, "xdp", interface);
        let fd = FdLink::try_from(link).map_err(|e| DatapathError::TakeOver {
            what: "XDP",
            path: path.clone(),
            source: Box::new(e),
        })?;
        self.links.push(pin_link(fd, &path, "XDP")?);
        Ok(name)
    }

    /// Detaches everything and removes the pinned maps and links and their directory.
    pub fn unpin(self) -> io::Result<()> {
        // The tables still to carry are pinned files `remove_pins` finds.
        let Self {
            ebpf,
            maps,
            pin_path,
            links,
            carry: _,
        } = self;
        // Links detach when the pin is gone and the last fd is closed.
        remove_pins(&pin_path)?;
        drop(links);
        drop(maps);
        drop(ebpf);
        Ok(())
    }
}

/// Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified on
/// hybrid hosts).
fn cgroup2_root() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut f = line.split_whitespace();
        let (_, point, kind) = (f.next()?, f.next()?, f.next()?);
        (kind == "cgroup2").then(|| PathBuf::from(point))
    })
}

/// The cgroup sock_addr programs, by kernel name.
const SOCKET_PROGRAMS: [&str; 8] = [
    programs::CONNECT4,
    programs::SENDMSG4,
    programs::GETPEERNAME4,
    programs::RECVMSG4,
    programs::CONNECT6,
    programs::SENDMSG6,
    programs::GETPEERNAME6,
    programs::RECVMSG6,
];

/// This process's network namespace cookie: what `bpf_get_netns_cookie` returns for the
/// sockets of its namespace.
#[expect(
    unsafe_code,
    reason = "getsockopt(SO_NETNS_COOKIE) has no safe wrapper"
)]
pub fn netns_cookie() -> io::Result<u64> {
    use std::os::fd::AsRawFd as _;
    let socket = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket fd; `cookie` and `len` are a writable u64 and its size.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

fn pin_link(fd: FdLink, path: &Path, what: &'static str) -> Result<PinnedLink, DatapathError> {
    let _ = fs::remove_file(path);
    fd.pin(path).map_err(|source| DatapathError::PinLink {
        what,
        path: path.to_owned(),
        source,
    })
}

/// Opens a pinned link as the program-specific link type (`XdpLink`, `SchedClassifierLink`).
fn take_over<L>(path: &Path, what: &'static str) -> Result<L, DatapathError>
where
    L: TryFrom<FdLink, Error = LinkError>,
{
    let err = |source: Box<dyn std::error::Error + Send + Sync>| DatapathError::TakeOver {
        what,
        path: path.to_owned(),
        source,
    };
    let pinned = PinnedLink::from_pin(path).map_err(|e| err(Box::new(e)))?;
    L::try_from(FdLink::from(pinned)).map_err(|e| err(Box::new(e)))
}

/// Removes gpulb's pinned maps and links under `pin_path`, then the directory if it is
/// empty.
pub fn remove_pins(pin_path: &Path) -> io::Result<()> {
    for interface in tc::attached_interfaces(pin_path) {
        if let Err(e) = tc::detach(pin_path, &interface) {
            warn!(interface, error = %e, "could not remove gpulb's TC filter (or its clsact qdisc); see `tc filter show dev <interface> egress`");
            tc::forget(pin_path, &interface);
        }
    }
    let links = fs::read_dir(pin_path)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("link_"))
        .map(|e| e.path());
    let maps = names::ALL
        .iter()
        .map(|spec| spec.name)
        .chain(names::RETIRED)
        .chain(names::MIGRATED.iter().map(|(old, _)| *old))
        .chain(names::MIGRATED_TABLES)
        .map(|name| pin_path.join(name))
        .chain(
            tables_to_carry(pin_path)
                .into_iter()
                .map(|(path, _)| path)
                .collect::<Vec<_>>(),
        );
    for path in links.collect::<Vec<_>>().into_iter().chain(maps) {
        match fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    match fs::remove_dir(pin_path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Displays an error with its sources: "a: b: c".
pub struct ErrorChain<'a>(pub &'a dyn std::error::Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use lb_common::maps::{ALL, Entries};

    /// The schema in lb-common is what the compiled BPF object declares: every map, its type,
    /// key and value sizes, default entries and flags, and no map beside them.
    #[test]
    fn the_object_declares_the_schema() {
        let object = aya_obj::Object::parse(crate::EBPF_OBJECT).expect("the BPF object parses");
        for spec in ALL {
            let map = object
                .maps
                .get(spec.name)
                .unwrap_or_else(|| panic!("the object has no map {}", spec.name));
            let got = (
                map.map_type(),
                map.key_size(),
                map.value_size(),
                map.max_entries(),
                map.map_flags(),
            );
            let want = (
                spec.kind as u32,
                spec.key_size,
                spec.value_size,
                spec.default_entries(),
                spec.flags,
            );
            assert_eq!(
                got, want,
                "map {} (type, key, value, entries, flags)",
                spec.name
            );
            if let Entries::Fixed(n) = spec.entries {
                assert_eq!(map.max_entries(), n, "{}", spec.name);
            }
        }
        // Data sections (.rodata, .bss) are maps to the loader, not ours.
        for name in object.maps.keys().filter(|n| !n.starts_with('.')) {
            assert!(
                ALL.iter().any(|s| s.name == name.as_str()),
                "map {name} is in the object but not in lb_common::maps::ALL"
            );
        }
    }
}
