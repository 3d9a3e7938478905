//! `cargo xtask`: set up the machine, build, test, run the demo, benchmark.
#![forbid(unsafe_code)]

mod bench;
mod demo;
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
    /// Set up, build, and run every test (unit, BPF packet fixtures, netns integration).
    Test,
    /// Set up, build, and start the demo: 4 simulated GPU instances behind gpulb.
    Run {
        /// Stop after this many seconds instead of waiting for Ctrl-C.
        #[arg(long)]
        duration: Option<u64>,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        case: bench::Case,
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

/// Builds the workspace's binaries (which builds the BPF object through build.rs).
pub fn build(release: bool) -> anyhow::Result<()> {
    let mut cmd = cargo();
    cmd.args(["build", "--workspace", "--bins"]);
    if release {
        cmd.arg("--release");
    }
    exec(&mut cmd)
}

fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Cmd::Setup => setup::ensure_all(),
        Cmd::Build { release } => {
            setup::ensure_all()?;
            build(release)
        }
        Cmd::Test => {
            setup::ensure_all()?;
            build(false)?;
            println!("[xtask] running all tests");
            exec(cargo().args(["test", "--workspace", "--no-fail-fast"]))
        }
        Cmd::Run { duration } => {
            setup::ensure_all()?;
            build(true)?;
            demo::run(duration)
        }
        Cmd::Bench { case } => {
            setup::ensure_all()?;
            bench::run(case)
        }
    }
}
