//! `cargo xtask`: set up the machine, build, test, run the demo, benchmark.
#![forbid(unsafe_code)]

mod bench;
mod demo;
mod dist;
mod kernels;
mod setup;

use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing (apt packages, bpf-linker, the BPF toolchain link, bpffs).
    Setup,
    /// Set up, then build every binary (BPF programs included).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Set up, build, and run every test (unit, BPF packet fixtures, netns integration), then
    /// the kernel matrix: the packet fixtures, TC through netlink, the end-to-end takeover
    /// test and a virtio-net NIC in native XDP mode, in Debian's kernels under qemu.
    Test {
        /// Kernels of the matrix: "all" (6.1 and 6.12), "none", or labels ("6.1,6.12").
        #[arg(long, default_value = "all")]
        kernels: String,
    },
    /// Set up, build, and run only the kernel matrix (what `test` runs after the host's tests).
    Kernels {
        /// "all" (6.1 and 6.12), or labels ("6.1,6.12").
        #[arg(long, default_value = "all")]
        kernels: String,
    },
    /// Set up, build release binaries, and package them as a .deb in target/dist/.
    Dist,
    /// Set up, build, and start the demo: 4 simulated GPU instances behind gpulb.
    Run {
        /// Stop after this many seconds instead of waiting for Ctrl-C.
        #[arg(long)]
        duration: Option<u64>,
    },
    /// Set up, build, and benchmark: the whole report (target/bench/report.md), or one case.
    Bench {
        /// Shorter cases and fewer points (about 3 minutes).
        #[arg(long)]
        quick: bool,
        /// A Katran source tree: build its XDP balancer (Debian's clang) and measure it in
        /// the report's datapath section beside gpulb, through the same wrapper.
        #[arg(long, value_name = "DIR")]
        katran: Option<std::path::PathBuf>,
        #[command(subcommand)]
        case: Option<bench::Case>,
    },
}

/// Runs a command, inheriting stdio; the error names the command.
pub fn exec(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

pub fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Builds the binaries of the default members (lb-userspace's build.rs builds the BPF
/// object; lb-ebpf itself only builds for the BPF target, so never `--workspace`).
pub fn build(release: bool) -> anyhow::Result<()> {
    let mut cmd = cargo();
    cmd.args(["build", "--bins"]);
    if release {
        cmd.arg("--release");
    }
    exec(&mut cmd)
}

/// Runs `cargo test` over the default members, echoing its output, and ends with one
/// summary line over every test binary ("N passed, N failed"), which it also returns.
/// `deb`: the package the package test installs (`GPULB_TEST_DEB`).
fn test(deb: &std::path::Path) -> anyhow::Result<String> {
    use std::io::{BufRead as _, BufReader};
    let mut child = cargo()
        .args(["test", "--no-fail-fast"])
        .env("GPULB_TEST_DEB", deb)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("spawning cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(child.stdout.take().context("cargo test stdout")?).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| {
                rest.split(';')
                    .find_map(|part| {
                        part.trim()
                            .strip_suffix(word)?
                            .trim()
                            .rsplit(' ')
                            .next()?
                            .parse::<u64>()
                            .ok()
                    })
                    .unwrap_or(0)
            };
            passed += count(" passed");
            failed += count(" failed");
        }
    }
    let status = child.wait()?;
    println!("\ntests: {passed} passed, {failed} failed");
    if !status.success() || failed > 0 {
        bail!("cargo test failed ({status}): {passed} passed, {failed} failed");
    }
    Ok(format!("host tests: {passed} passed, {failed} failed"))
}

/// The kernel matrix over `kernels` (none: nothing).
fn matrix(kernels: &[&kernels::Kernel]) -> anyhow::Result<()> {
    if kernels.is_empty() {
        return Ok(());
    }
    println!("[xtask] kernel matrix");
    kernels::ensure()?;
    let bins = kernels::TestBins::build()?;
    kernels::run(kernels, &bins).map(drop)
}

fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Cmd::Setup => setup::ensure_all(),
        Cmd::Build { release } => {
            setup::ensure_all()?;
            build(release)
        }
        Cmd::Test { kernels } => {
            let kernels = kernels::select(&kernels)?;
            setup::ensure_all()?;
            setup::ensure_test_tools()?;
            build(false)?;
            // The package test installs a package of the debug binaries just built.
            let root = dist::workspace_root();
            let deb = dist::package(
                &root.join("target/debug"),
                &root.join("target/dist-test"),
                false,
            )?;
            println!("[xtask] running all tests");
            let host = test(&deb);
            let matrix = matrix(&kernels);
            // Again at the end, after the matrix's long output.
            match &host {
                Ok(summary) => println!("[xtask] {summary}"),
                Err(e) => println!("[xtask] {e:#}"),
            }
            host.and(matrix)
        }
        Cmd::Kernels { kernels } => {
            let kernels = kernels::select(&kernels)?;
            setup::ensure_all()?;
            build(false)?;
            matrix(&kernels)
        }
        Cmd::Dist => {
            setup::ensure_all()?;
            dist::run().map(drop)
        }
        Cmd::Run { duration } => {
            setup::ensure_all()?;
            build(true)?;
            demo::run(duration)
        }
        Cmd::Bench {
            quick,
            katran,
            case,
        } => {
            setup::ensure_all()?;
            bench::run(case, quick, katran)
        }
    }
}
