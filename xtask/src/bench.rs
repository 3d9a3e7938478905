//! `cargo xtask bench [--quick] [datapath | steering | failover | http]`.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Subcommand;

use crate::{cargo, exec};

#[derive(Subcommand)]
pub enum Case {
    /// Only ns/packet of gpulb_ingress under BPF_PROG_TEST_RUN: new flow, established,
    /// non-VIP, SYN flood, against a no-op XDP program (and Katran's balancer with
    /// `--katran`).
    Datapath {
        /// A Katran source tree: build its XDP balancer (Debian's clang) and measure it
        /// beside gpulb, through the same wrapper.
        #[arg(long, value_name = "DIR")]
        katran: Option<PathBuf>,
    },
    /// Only the steering section of the report: gpulb's scheduler against nginx (round-robin,
    /// least_conn), HAProxy (leastconn), client-side round-robin and an oracle, in six
    /// scenarios; target/bench/steering.md.
    Steering,
    /// Only the failover section of the report (a killed instance, gpulb against nginx),
    /// with the control plane's table build times and map memory; target/bench/failover.md.
    Failover,
    /// Only the http, streaming and saturation sections (gpulb against client-side
    /// round-robin, nginx and HAProxy); target/bench/http.md.
    Http,
}

/// With no case: the whole report (datapath, control plane, http, streaming, saturation,
/// failover) in target/bench/report.md with SVG charts.
pub fn run(case: Option<Case>, quick: bool, katran: Option<PathBuf>) -> anyhow::Result<()> {
    let katran = match &case {
        Some(Case::Datapath { katran: tree }) => tree.clone().or(katran),
        None => katran,
        Some(_) if katran.is_some() => {
            anyhow::bail!("--katran: only the datapath bench and the full report measure Katran")
        }
        Some(_) => None,
    };
    let bench = |name: &str| {
        let mut cmd = cargo();
        cmd.args(["bench", "-p", "gpulb-testbed", "--bench", name]);
        cmd
    };
    let mut datapath_bench = bench("datapath");
    if let Some(tree) = &katran {
        // Katran's Makefile-bpf: clang to LLVM IR, llc to BPF.
        crate::setup::ensure_packages(&["clang-22", "llvm-22"])?;
        let tree = tree
            .canonicalize()
            .with_context(|| format!("--katran {}", tree.display()))?;
        datapath_bench.env("GPULB_KATRAN_SRC", tree);
    }
    if let Some(Case::Datapath { .. }) = case {
        return exec(&mut datapath_bench);
    }
    crate::setup::ensure_bench_tools()?;
    crate::build(true)?;
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out)?;
    let out = out.canonicalize()?;
    let datapath = out.join("datapath.json");
    let mut report = bench("report");
    report
        .env("GPULB_BENCH_OUT", &out)
        .env("GPULB_BENCH_QUICK", if quick { "1" } else { "0" });
    let only = match case {
        Some(Case::Steering) => Some("steering"),
        Some(Case::Failover) => Some("failover"),
        Some(Case::Http) => Some("http"),
        _ => None,
    };
    if let Some(name) = only {
        exec(report.env("GPULB_BENCH_ONLY", name))?;
        println!(
            "[bench] report: {}",
            out.join(format!("{name}.md")).display()
        );
        return Ok(());
    }
    println!("[bench] datapath");
    exec(datapath_bench.env("GPULB_BENCH_JSON", &datapath))?;
    println!("[bench] the verifier on Debian's kernels (qemu)");
    let kernels = crate::kernels::select("all")?;
    crate::kernels::ensure()?;
    let verifier = out.join("kernels.json");
    let gpulb = out.join("../release/gpulb");
    crate::kernels::check_all(&kernels, &gpulb, &verifier)?;
    println!("[bench] report cases");
    exec(
        report
            .env("GPULB_BENCH_DATAPATH", &datapath)
            .env("GPULB_BENCH_KERNELS", &verifier),
    )?;
    println!("[bench] report: {}", out.join("report.md").display());
    Ok(())
}
