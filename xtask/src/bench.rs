//! `cargo xtask bench <case>`.

use clap::Subcommand;

use crate::{cargo, exec};

#[derive(Subcommand)]
pub enum Case {
    /// ns/packet of gpulb_ingress under BPF_PROG_TEST_RUN: new flow, established, non-VIP,
    /// against a no-op XDP program.
    Datapath,
}

pub fn run(case: Case) -> anyhow::Result<()> {
    match case {
        Case::Datapath => {
            exec(cargo().args(["bench", "-p", "gpulb-testbed", "--bench", "datapath"]))
        }
    }
}
