//! `gpulb check-kernel`: what this kernel has of what gpulb needs, and whether gpulb's own
//! programs load on it (with the verifier's instruction count of each). Attaches nothing;
//! the maps it loads go under a temporary pin directory, removed before it returns.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use lb_common::maps::MapSizes;
use serde::Serialize;

use crate::{
    config::TcAttach,
    datapath::{Datapath, ErrorChain, is_bpffs, remove_pins},
    kernel::{self, Check, Release},
};

#[derive(Serialize)]
struct Report {
    /// `uname -r`.
    release: String,
    minimum: String,
    /// How `tc_attach = "auto"` attaches here.
    tc_attach: Option<kernel::TcPath>,
    checks: Vec<Check>,
    /// The verifier's processed instructions per program; empty if the object did not load.
    programs: Vec<Program>,
    /// Why the object did not load, if it did not.
    load_error: Option<String>,
    /// Why loading was not tried (no bpffs mounted, not root).
    load_skipped: Option<String>,
    /// Whether gpulb can run here.
    ok: bool,
}

#[derive(Serialize)]
struct Program {
    name: &'static str,
    verified_instructions: Option<u32>,
}

/// Prints the report; exit status 1 if gpulb cannot run here.
pub fn run(json: bool) -> anyhow::Result<bool> {
    let release = nix::sys::utsname::uname()
        .context("uname")?
        .release()
        .to_string_lossy()
        .into_owned();
    let tc_attach = Release::current()
        .ok()
        .and_then(|r| kernel::tc_path(r, TcAttach::Auto).ok());
    let checks = kernel::probe();
    let (programs, load_error, load_skipped) = match load_once() {
        Ok(programs) => (programs, None, None),
        Err(LoadOutcome::Skipped(why)) => (Vec::new(), None, Some(why)),
        Err(LoadOutcome::Failed(e)) => (Vec::new(), Some(e), None),
    };
    let required_ok = checks
        .iter()
        .filter(|c| c.without == "refuses to start")
        .all(|c| c.ok != Some(false));
    let report = Report {
        release,
        minimum: kernel::MINIMUM.to_string(),
        tc_attach,
        ok: required_ok && load_error.is_none() && tc_attach.is_some(),
        checks,
        programs,
        load_error,
        load_skipped,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&report);
    }
    Ok(report.ok)
}

fn print_text(r: &Report) {
    println!("kernel {} (gpulb needs {} or newer)", r.release, r.minimum);
    for c in &r.checks {
        let mark = match c.ok {
            Some(true) => "yes",
            Some(false) => "NO ",
            None => "?  ",
        };
        if c.ok == Some(true) {
            println!("  {mark}  {}", c.what);
        } else {
            println!("  {mark}  {}  (without it: {})", c.what, c.without);
        }
    }
    match r.tc_attach {
        Some(p) => println!("TC egress attaches through {}", p.describe()),
        None => println!("TC egress: none (kernel too old)"),
    }
    match (&r.load_error, &r.load_skipped) {
        (None, Some(why)) => println!("gpulb's programs not loaded: {why}"),
        (None, None) => {
            println!("gpulb's programs load; instructions the verifier processed:");
            for p in &r.programs {
                let n = p.verified_instructions.map_or_else(
                    || "(not reported before 5.16)".to_owned(),
                    |n| n.to_string(),
                );
                println!("  {:<20} {n}", p.name);
            }
        }
        (Some(e), _) => println!("gpulb's programs do NOT load: {e}"),
    }
    println!(
        "{}",
        if r.ok {
            "gpulb can run on this kernel"
        } else {
            "gpulb cannot run on this kernel"
        }
    );
}

/// Loads the object under a temporary pin directory, with small conntrack tables, and
/// removes it again.
enum LoadOutcome {
    Skipped(String),
    Failed(String),
}

fn load_once() -> Result<Vec<Program>, LoadOutcome> {
    let root = Path::new("/sys/fs/bpf");
    if !nix::unistd::Uid::effective().is_root() {
        return Err(LoadOutcome::Skipped(
            "not root (loading BPF programs needs root or CAP_BPF)".to_owned(),
        ));
    }
    if !is_bpffs(root) {
        return Err(LoadOutcome::Skipped(
            "no bpffs at /sys/fs/bpf (gpulb run mounts it; mount it to check the programs)"
                .to_owned(),
        ));
    }
    let dir: PathBuf = root.join(format!("gpulb-check-kernel-{}", std::process::id()));
    let sizes = MapSizes {
        v4: 1024,
        v6: 1024,
        ipv6: false,
    };
    let loaded = Datapath::load(&dir, sizes);
    let result = match &loaded {
        Ok(dp) => Ok(dp
            .verified_instructions()
            .into_iter()
            .map(|(name, verified_instructions)| Program {
                name,
                verified_instructions,
            })
            .collect()),
        Err(e) => Err(LoadOutcome::Failed(ErrorChain(e).to_string())),
    };
    drop(loaded);
    let _ = remove_pins(&dir);
    result
}
