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
pub mod maglev;
pub mod maps;
pub mod plan;
pub mod sim;
pub mod supervisor;

/// The data path programs (`lb-ebpf`, built by build.rs).
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gpulb-ebpf"));

/// The benchmark wrapper and no-op programs (`lb-ebpf/src/bin/bench.rs`).
pub static BENCH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gpulb-bench"));

/// Exit code for a bad config or bad arguments (sysexits EX_USAGE).
pub const EXIT_USAGE: i32 = 64;
