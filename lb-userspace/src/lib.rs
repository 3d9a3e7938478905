//! gpulb userspace: the daemon (`gpulb run`), the CLI, and the simulated GPU instance.
// Unsafe only where the style guide allows it (CPU affinity in `pre_exec`).
#![deny(unsafe_code)]

pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod datapath;
pub mod gpu;
pub mod health;
pub mod kernel;
pub mod load;
pub mod maglev;
pub mod maps;
pub mod metrics;
pub mod plan;
pub mod sim;
pub mod sockets;
pub mod supervisor;
pub mod tc;

/// The data path programs (`lb-ebpf`, built by build.rs).
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gpulb-ebpf"));

/// The benchmark wrapper and no-op programs (`lb-ebpf/src/bin/bench.rs`).
pub static BENCH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gpulb-bench"));

/// Exit code for a bad config or bad arguments (sysexits EX_USAGE).
pub const EXIT_USAGE: i32 = 64;

/// How the daemon's log lines look.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One line of text per event (colours only on a terminal).
    #[default]
    Text,
    /// One JSON object per line, for log shippers: `timestamp`, `level`, `fields`
    /// (`message` and the event's fields), `target`, `span`.
    Json,
}

/// Logs to stderr at `RUST_LOG` (default info); colours only on a terminal, so that log
/// files (an instance's output, the daemon under systemd) stay plain text.
pub fn init_logging(format: LogFormat) {
    use std::io::IsTerminal as _;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().init(),
    }
}
