//! Loading the BPF object with its maps pinned, attaching it, and taking it down again.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::MapData,
    programs::{ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode},
};
use lb_common::{maps as names, programs};
use tracing::{info, warn};

use crate::{config, maps::Maps};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("{} is not on a bpf filesystem and could not be mounted", path.display())]
    BpfFs {
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
    #[error("attaching TC egress to {interface}")]
    AttachTc {
        interface: String,
        #[source]
        source: ProgramError,
    },
    #[error(transparent)]
    Maps(#[from] crate::maps::MapsError),
}

/// Mounts bpffs at /sys/fs/bpf if `pin_path` lies there and nothing is mounted.
pub fn ensure_bpffs(pin_path: &Path) -> Result<(), DatapathError> {
    let root = Path::new("/sys/fs/bpf");
    if !pin_path.starts_with(root) {
        return Ok(());
    }
    let is_bpffs = |p: &Path| {
        nix::sys::statfs::statfs(p).is_ok_and(|s| s.filesystem_type().0 as i64 == BPF_FS_MAGIC)
    };
    if is_bpffs(root) {
        return Ok(());
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

/// Key size, value size and max entries each pinned map must have.
fn expected_layout(conntrack_size: u32) -> [(&'static str, u32, u32, Option<u32>); 8] {
    use std::mem::size_of;

    use lb_common::*;
    let s = |n: usize| n as u32;
    [
        (
            names::SERVICES,
            s(size_of::<VipKey>()),
            s(size_of::<Service>()),
            Some(MAX_SERVICES),
        ),
        (
            names::BACKENDS,
            4,
            s(size_of::<Backend>()),
            Some(MAX_BACKENDS),
        ),
        (names::MAGLEV, 4, 4, Some(MAGLEV_ENTRIES)),
        (
            names::CONNS,
            s(size_of::<FlowKey>()),
            s(size_of::<Flow>()),
            Some(conntrack_size),
        ),
        (
            names::REVNAT,
            s(size_of::<FlowKey>()),
            s(size_of::<RevNat>()),
            Some(conntrack_size),
        ),
        (
            names::VIP_STATS,
            4,
            s(size_of::<Counters>()),
            Some(MAX_SERVICES),
        ),
        (
            names::BACKEND_STATS,
            4,
            s(size_of::<Counters>()),
            Some(MAX_BACKENDS),
        ),
        (names::REASONS, 4, 8, None),
    ]
}

/// Refuses to reuse pinned maps whose layout differs from this build's (aya would reuse
/// them blindly).
fn check_pinned(pin_path: &Path, conntrack_size: u32) -> Result<(), DatapathError> {
    for (name, key, value, entries) in expected_layout(conntrack_size) {
        let path = pin_path.join(name);
        let Ok(map) = MapData::from_pin(&path) else {
            continue;
        };
        let info = map.info().map_err(|e| crate::maps::MapsError::Op {
            op: "inspecting",
            name,
            source: e,
        })?;
        let mut checks = vec![
            ("key size", info.key_size(), key),
            ("value size", info.value_size(), value),
        ];
        if let Some(entries) = entries {
            checks.push(("max_entries", info.max_entries(), entries));
        }
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
}

impl Datapath {
    /// Loads the object and pins (or reuses) its maps under `pin_path`; attaches nothing.
    pub fn load(pin_path: &Path, conntrack_size: u32) -> Result<Self, DatapathError> {
        ensure_bpffs(pin_path)?;
        fs::create_dir_all(pin_path).map_err(|source| DatapathError::PinDir {
            path: pin_path.to_owned(),
            source,
        })?;
        check_pinned(pin_path, conntrack_size)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_path)
            .map_max_entries(names::CONNS, conntrack_size)
            .map_max_entries(names::REVNAT, conntrack_size)
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
        let maps = Maps::from_ebpf(&mut ebpf)?;
        Ok(Self {
            ebpf,
            maps,
            pin_path: pin_path.to_owned(),
        })
    }

    pub fn ingress(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(programs::INGRESS)
            .expect("object has gpulb_ingress")
            .try_into()
            .expect("gpulb_ingress is XDP")
    }

    fn egress(&mut self) -> &mut SchedClassifier {
        self.ebpf
            .program_mut(programs::EGRESS)
            .expect("object has gpulb_egress")
            .try_into()
            .expect("gpulb_egress is TC")
    }

    /// Attaches ingress (XDP, in `mode`) and egress (TC) to `interface`; returns the XDP
    /// mode in use. Both detach when `self` is dropped.
    pub fn attach(
        &mut self,
        interface: &str,
        mode: config::XdpMode,
    ) -> Result<&'static str, DatapathError> {
        let used = match mode {
            config::XdpMode::Native => self.attach_xdp(interface, XdpMode::Driver, "native")?,
            config::XdpMode::Generic => self.attach_xdp(interface, XdpMode::Skb, "generic")?,
            config::XdpMode::Auto => match self.attach_xdp(interface, XdpMode::Driver, "native") {
                Ok(used) => used,
                Err(e) => {
                    warn!(interface, error = %ErrorChain(&e), "native XDP failed; falling back to generic (slower)");
                    self.attach_xdp(interface, XdpMode::Skb, "generic")?
                }
            },
        };
        self.egress()
            .attach(interface, TcAttachType::Egress)
            .map_err(|source| DatapathError::AttachTc {
                interface: interface.to_owned(),
                source,
            })?;
        Ok(used)
    }

    fn attach_xdp(
        &mut self,
        interface: &str,
        mode: XdpMode,
        name: &'static str,
    ) -> Result<&'static str, DatapathError> {
        self.ingress()
            .attach(interface, mode)
            .map(|_| name)
            .map_err(|source| DatapathError::AttachXdp {
                interface: interface.to_owned(),
                mode: name,
                source,
            })
    }

    /// Detaches everything and removes the pinned maps and their directory.
    pub fn unpin(self) -> io::Result<()> {
        let Self {
            ebpf,
            maps,
            pin_path,
        } = self;
        drop(maps);
        drop(ebpf);
        remove_pins(&pin_path)
    }
}

/// Removes gpulb's pinned maps under `pin_path`, then the directory if it is empty.
pub fn remove_pins(pin_path: &Path) -> io::Result<()> {
    for name in names::ALL {
        match fs::remove_file(pin_path.join(name)) {
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
