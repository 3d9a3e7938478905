//! What the running kernel can do for gpulb: the minimum it refuses below, the features it
//! degrades without, and the probes `gpulb check-kernel` reports.
//!
//! What each piece needs (the kernel release that added it):
//!
//! | feature | needs |
//! |---|---|
//! | XDP attached through a BPF link (pinned: the data path outlives the daemon) | 5.9 |
//! | `bpf_ktime_get_coarse_ns` (the ingress path's times, no TSC read) | 5.11 |
//! | BPF global functions (the scheduler, verified once), bounded loops | 5.6 |
//! | cgroup `sock_addr` hooks with links; `getpeername`/`recvmsg` (the VIP shown back) | 5.8 |
//! | `SO_NETNS_COOKIE` (socket-level balancing only in gpulb's namespace) | 5.14 |
//! | TC through TCX (a BPF link); otherwise a netlink `clsact` filter, any kernel | 6.6 |
//! | LRU hash maps, per-CPU arrays, LPM tries, plain atomic adds | older than 5.9 |
//! | the verifier's instruction count in program info (reported only) | 5.16 |
//!
//! Tested: Debian's 6.1 and 6.12 under qemu (`cargo xtask test`), 6.18 on the development
//! host. Older kernels at or above the minimum are expected to work but are not tested here.

use std::{fmt, io, path::Path};

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
    util::KernelVersion,
};
use serde::Serialize;

use crate::config::TcAttach;

/// A kernel release as major.minor.patch, comparable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Release {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl Release {
    pub const fn new(major: u32, minor: u32, patch: u32) -> Self {
        Self {
            major,
            minor,
            patch,
        }
    }

    /// The running kernel's (`uname -r`, as aya reads it; Debian's and Ubuntu's version
    /// signatures are understood).
    pub fn current() -> Result<Self, KernelError> {
        let v = KernelVersion::current().map_err(|e| KernelError::Version(e.to_string()))?;
        let code = v.code();
        Ok(Self::new(code >> 16, (code >> 8) & 0xff, code & 0xff))
    }
}

impl fmt::Display for Release {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Below this gpulb refuses to start: XDP through a pinned BPF link (5.9) is what keeps the
/// data path running across daemon restarts, and the coarse clock (5.11) gives the ingress
/// path its times without reading the TSC (a fifth of an established packet's cost,
/// measured).
pub const MINIMUM: Release = Release::new(5, 11, 0);
/// TC through TCX links.
pub const TCX: Release = Release::new(6, 6, 0);
/// `SO_NETNS_COOKIE`, which the socket programs need to balance only gpulb's namespace.
pub const NETNS_COOKIE: Release = Release::new(5, 14, 0);

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("reading the kernel version: {0}")]
    Version(String),
    #[error(
        "Linux {found} is too old: gpulb needs {MINIMUM} or newer (the coarse clock helper, \
         5.11; XDP through a pinned BPF link, 5.9; BPF global functions, 5.6); `gpulb \
         check-kernel` lists what this kernel has"
    )]
    TooOld { found: Release },
    #[error(
        "tc_attach = \"tcx\": TCX needs Linux {TCX} or newer, this is {found}; use \"netlink\" or \"auto\""
    )]
    NoTcx { found: Release },
}

/// How the egress program is attached on this kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TcPath {
    Tcx,
    Netlink,
}

impl TcPath {
    pub fn describe(self) -> &'static str {
        match self {
            TcPath::Tcx => "tcx",
            TcPath::Netlink => "netlink",
        }
    }
}

/// What gpulb runs with on `release`, or why it cannot: the kernel check at start.
pub fn tc_path(release: Release, setting: TcAttach) -> Result<TcPath, KernelError> {
    if release < MINIMUM {
        return Err(KernelError::TooOld { found: release });
    }
    let has_tcx = release >= TCX;
    match setting {
        TcAttach::Auto if has_tcx => Ok(TcPath::Tcx),
        TcAttach::Auto | TcAttach::Netlink => Ok(TcPath::Netlink),
        TcAttach::Tcx if has_tcx => Ok(TcPath::Tcx),
        TcAttach::Tcx => Err(KernelError::NoTcx { found: release }),
    }
}

/// The check at start: the release (if it reads) and the TC path. A release that does not
/// parse (an unusual version string) is not refused: gpulb warns and attaches TC through
/// netlink, which every kernel has.
pub fn at_start(setting: TcAttach) -> Result<(Option<Release>, TcPath), KernelError> {
    match Release::current() {
        Ok(release) => Ok((Some(release), tc_path(release, setting)?)),
        Err(e) => {
            tracing::warn!(error = %e, "cannot tell the kernel's version; attaching TC through netlink");
            Ok((None, TcPath::Netlink))
        }
    }
}

/// One line of `gpulb check-kernel`.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub what: String,
    /// `None`: could not be probed.
    pub ok: Option<bool>,
    /// What gpulb does without it.
    pub without: &'static str,
}

/// Probes the running kernel for what gpulb uses. Loads only the kernel's own probe
/// programs; attaches nothing.
pub fn probe() -> Vec<Check> {
    let mut checks = Vec::new();
    let mut push = |what: &str, ok: Option<bool>, without: &'static str| {
        checks.push(Check {
            what: what.to_owned(),
            ok,
            without,
        });
    };
    let release = Release::current().ok();
    push(
        &format!("Linux {MINIMUM} or newer"),
        release.map(|r| r >= MINIMUM),
        "refuses to start",
    );
    push(
        "BTF of the kernel (/sys/kernel/btf/vmlinux)",
        Some(Path::new("/sys/kernel/btf/vmlinux").exists()),
        "nothing: gpulb's object carries its own BTF (reported for bpftool and debugging)",
    );
    push(
        "bpffs mounted at /sys/fs/bpf",
        Some(crate::datapath::is_bpffs(Path::new("/sys/fs/bpf"))),
        "mounts it at start",
    );
    for (name, kind, without) in [
        ("program type xdp", ProgramType::Xdp, "refuses to start"),
        (
            "program type sched_cls (TC)",
            ProgramType::SchedClassifier,
            "refuses to start",
        ),
        (
            "program type cgroup_sock_addr",
            ProgramType::CgroupSockAddr,
            "socket-level balancing fails to attach (set socket_lb = \"off\")",
        ),
    ] {
        push(name, is_program_supported(kind).ok(), without);
    }
    for (name, kind) in [
        ("map type lru_hash", MapType::LruHash),
        ("map type percpu_array", MapType::PerCpuArray),
        ("map type lpm_trie", MapType::LpmTrie),
    ] {
        push(name, is_map_supported(kind).ok(), "refuses to start");
    }
    for (name, kind, helper, without) in [
        (
            "helper ktime_get_ns in xdp",
            ProgramType::Xdp,
            BpfHelper::BPF_FUNC_ktime_get_ns,
            "refuses to start",
        ),
        (
            "helper ktime_get_coarse_ns in xdp",
            ProgramType::Xdp,
            BpfHelper::BPF_FUNC_ktime_get_coarse_ns,
            "refuses to start",
        ),
        (
            "helper xdp_adjust_tail in xdp",
            ProgramType::Xdp,
            BpfHelper::BPF_FUNC_xdp_adjust_tail,
            "refuses to start",
        ),
        (
            "helper l4_csum_replace in sched_cls",
            ProgramType::SchedClassifier,
            BpfHelper::BPF_FUNC_l4_csum_replace,
            "refuses to start",
        ),
        (
            "helper get_netns_cookie in cgroup_sock_addr",
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_get_netns_cookie,
            "socket-level balancing fails to load",
        ),
        (
            "helper get_socket_cookie in cgroup_sock_addr",
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_get_socket_cookie,
            "socket-level balancing fails to load",
        ),
    ] {
        push(name, is_helper_supported(kind, helper).ok(), without);
    }
    push(
        "XDP through BPF links (Linux 5.9)",
        release.map(|r| r >= Release::new(5, 9, 0)),
        "refuses to start",
    );
    push(
        &format!("TC through TCX links (Linux {TCX})"),
        release.map(|r| r >= TCX),
        "attaches TC through a netlink clsact filter instead",
    );
    push(
        &format!("SO_NETNS_COOKIE (Linux {NETNS_COOKIE})"),
        Some(has_netns_cookie()),
        "socket-level balancing off, with a warning",
    );
    checks
}

/// Whether `getsockopt(SO_NETNS_COOKIE)` works here.
pub fn has_netns_cookie() -> bool {
    crate::datapath::netns_cookie().is_ok()
}

/// Whether `SO_NETNS_COOKIE` is missing (rather than failing for another reason).
pub fn is_missing_netns_cookie(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOPROTOOPT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_kernels_below_the_minimum() {
        let err = tc_path(Release::new(5, 10, 0), TcAttach::Auto).unwrap_err();
        assert!(
            err.to_string()
                .contains("Linux 5.10 is too old: gpulb needs 5.11"),
            "{err}"
        );
        assert!(tc_path(Release::new(5, 11, 0), TcAttach::Auto).is_ok());
    }

    #[test]
    fn auto_uses_tcx_from_6_6_and_netlink_before() {
        assert_eq!(
            tc_path(Release::new(6, 1, 0), TcAttach::Auto).unwrap(),
            TcPath::Netlink
        );
        assert_eq!(
            tc_path(Release::new(5, 15, 0), TcAttach::Auto).unwrap(),
            TcPath::Netlink
        );
        assert_eq!(
            tc_path(Release::new(6, 6, 0), TcAttach::Auto).unwrap(),
            TcPath::Tcx
        );
        assert_eq!(
            tc_path(Release::new(6, 18, 0), TcAttach::Auto).unwrap(),
            TcPath::Tcx
        );
    }

    #[test]
    fn a_forced_path_is_used_or_refused_by_name() {
        assert_eq!(
            tc_path(Release::new(6, 18, 0), TcAttach::Netlink).unwrap(),
            TcPath::Netlink
        );
        let err = tc_path(Release::new(6, 1, 0), TcAttach::Tcx).unwrap_err();
        assert_eq!(
            err.to_string(),
            "tc_attach = \"tcx\": TCX needs Linux 6.6 or newer, this is 6.1; use \"netlink\" or \"auto\""
        );
    }

    #[test]
    fn releases_compare_by_number_not_text() {
        assert!(Release::new(6, 12, 0) > Release::new(6, 6, 0));
        assert!(Release::new(5, 15, 0) > Release::new(5, 9, 0));
    }
}
