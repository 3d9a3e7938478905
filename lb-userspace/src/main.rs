//! `gpulb`: the daemon (`gpulb run`) and the CLI that reads its pinned maps.
#![forbid(unsafe_code)]

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use gpulb::{
    EXIT_USAGE, cli,
    config::{Config, DEFAULT_PIN_PATH},
    datapath::ErrorChain,
};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "gpulb",
    version,
    about = "XDP layer-4 load balancer for GPU inference hosts"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct Read {
    /// Where the daemon pinned its maps (`pin_path` in the config).
    #[arg(long, env = "GPULB_PIN_PATH", default_value = DEFAULT_PIN_PATH)]
    pin_path: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Load and attach the data path and program it from the config; runs until SIGINT/SIGTERM.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config without touching the kernel (exit 64 if invalid).
    CheckConfig { file: PathBuf },
    /// VIPs and their traffic.
    Vips(Read),
    /// Backends: weight, state, Maglev share, traffic, tracked flows.
    Backends(Read),
    /// Tracked flows (conntrack), most recently active first.
    Flows {
        #[command(flatten)]
        read: Read,
        /// Show at most this many flows (0: all).
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Each backend's share of its VIP's Maglev table.
    Maglev(Read),
    /// Packets by verdict reason.
    Stats(Read),
}

fn load_config(path: &PathBuf) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("gpulb: invalid config: {}", ErrorChain(&e));
        ExitCode::from(EXIT_USAGE as u8)
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();

    let result = match args.command {
        Command::Run { config } => {
            let config = match load_config(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(gpulb::daemon::run(config)))
        }
        Command::CheckConfig { file } => match load_config(&file) {
            Ok(c) => {
                println!(
                    "{}: ok ({} VIPs, {} backends)",
                    file.display(),
                    c.vips.len(),
                    c.vips.iter().map(|v| v.backends.len()).sum::<usize>()
                );
                Ok(())
            }
            Err(code) => return code,
        },
        Command::Vips(r) => cli::vips::run(&r.pin_path, r.json),
        Command::Backends(r) => cli::backends::run(&r.pin_path, r.json),
        Command::Flows { read, limit } => cli::flows::run(&read.pin_path, limit, read.json),
        Command::Maglev(r) => cli::maglev::run(&r.pin_path, r.json),
        Command::Stats(r) => cli::stats::run(&r.pin_path, r.json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpulb: {e:#}");
            ExitCode::FAILURE
        }
    }
}
