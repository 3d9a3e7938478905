//! Installs what building and testing gpulb needs, skipping what is present. Every step says
//! what it is doing. See DEVELOPERS.md for the recipe this automates.

use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

use crate::exec;

/// Debian's rustc 1.96 (LLVM 22) with rust-src builds the BPF crate; LLVM 22 for bpf-linker;
/// iproute2 and util-linux (nsenter) for the namespaces; curl for the demo's hint.
const APT_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "rust-web-src",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iproute2",
    "util-linux",
    "curl",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The rustup name under which /usr's toolchain is linked; lb-userspace/build.rs uses it.
const BPF_TOOLCHAIN: &str = "gpulb-bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

pub fn say(msg: &str) {
    println!("[setup] {msg}");
}

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

fn require_root(what: &str) -> anyhow::Result<()> {
    if !is_root() {
        bail!("{what} needs root: run cargo xtask as root (sudo -E cargo xtask ...)");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn apt_installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_some_and(|s| s.contains("install ok installed"))
}

/// nginx and HAProxy (the comparisons) and wrk (a load generator) for `cargo xtask bench`.
const BENCH_PACKAGES: &[&str] = &["nginx-light", "haproxy", "wrk"];

/// hping3: the conntrack flood test's SYN and ACK floods (one spoofed source per run, all in
/// 198.18.0.0/15); bpftool: the upgrade test makes an earlier version's conntrack map;
/// prometheus (with promtool): the monitoring test scrapes the daemon and loads the alert
/// rules; tmux: the `gpulb top` test reads its screen; systemd: `systemd-analyze verify` of
/// the packaged unit; man-db: the package test reads its man page.
const TEST_PACKAGES: &[&str] = &[
    "hping3",
    "bpftool",
    "prometheus",
    "tmux",
    "systemd",
    "man-db",
];

pub fn ensure_test_tools() -> anyhow::Result<()> {
    let fresh_prometheus = !apt_installed("prometheus");
    ensure_packages(TEST_PACKAGES)?;
    // The package may start its service; the test runs its own, in its namespace.
    if fresh_prometheus {
        say("stopping the prometheus service the package started");
        // Only the service's (it runs as the package's user), not another Prometheus.
        let _ = Command::new("pkill")
            .args(["-x", "-u", "prometheus", "prometheus"])
            .status();
    }
    Ok(())
}

fn ensure_apt() -> anyhow::Result<()> {
    ensure_packages(APT_PACKAGES)
}

pub fn ensure_bench_tools() -> anyhow::Result<()> {
    let fresh_nginx = !apt_installed("nginx-light");
    let fresh_haproxy = !apt_installed("haproxy");
    ensure_packages(BENCH_PACKAGES)?;
    // The packages start their services; the bench runs its own, in its namespaces.
    if fresh_nginx {
        say("stopping the nginx service the package started");
        let _ = Command::new("nginx").args(["-s", "quit"]).status();
    }
    if fresh_haproxy {
        say("stopping the haproxy service the package started");
        let _ = Command::new("pkill").args(["-x", "haproxy"]).status();
    }
    Ok(())
}

pub fn ensure_packages(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !apt_installed(p))
        .collect();
    if missing.is_empty() {
        say(&format!("apt packages present: {}", packages.join(" ")));
        return Ok(());
    }
    require_root("installing apt packages")?;
    say(&format!("installing apt packages: {}", missing.join(" ")));
    exec(Command::new("apt-get").args(["update", "-q"]))?;
    exec(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            // Kernel packages (the kernel matrix): qemu boots them without an initramfs of
            // Debian's (virtme-ng builds its own), so do not spend a minute making one.
            .env("INITRD", "No"),
    )
}

fn ensure_bpf_linker() -> anyhow::Result<()> {
    if output(Command::new("bpf-linker").arg("--version"))
        .is_some_and(|v| v.contains(BPF_LINKER_VERSION))
    {
        say(&format!("bpf-linker {BPF_LINKER_VERSION} present"));
        return Ok(());
    }
    say(&format!(
        "installing bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (a few minutes)"
    ));
    let path = format!(
        "/usr/lib/llvm-22/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    exec(
        crate::cargo()
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .env("PATH", path),
    )
}

fn ensure_toolchain_link() -> anyhow::Result<()> {
    let list = output(Command::new("rustup").args(["toolchain", "list"]))
        .context("running rustup toolchain list")?;
    if list.lines().any(|l| l.starts_with(BPF_TOOLCHAIN)) {
        say(&format!("rustup toolchain {BPF_TOOLCHAIN} present"));
        return Ok(());
    }
    if !Path::new("/usr/lib/rustlib/src/rust/library/core").exists() {
        bail!("/usr/lib/rustlib/src is missing: rust-web-src did not install");
    }
    say(&format!(
        "linking rustup toolchain {BPF_TOOLCHAIN} to /usr (Debian's rustc with rust-src)"
    ));
    exec(Command::new("rustup").args(["toolchain", "link", BPF_TOOLCHAIN, "/usr"]))
}

fn ensure_bpffs() -> anyhow::Result<()> {
    let root = Path::new("/sys/fs/bpf");
    if nix::sys::statfs::statfs(root).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC) {
        say("bpffs mounted at /sys/fs/bpf");
        return Ok(());
    }
    require_root("mounting bpffs")?;
    say("mounting bpffs at /sys/fs/bpf");
    exec(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

pub fn ensure_all() -> anyhow::Result<()> {
    ensure_apt()?;
    ensure_bpf_linker()?;
    ensure_toolchain_link()?;
    ensure_bpffs()
}
