//! `gpulb stats`: packets by verdict reason (pass/forward/drop), summed over CPUs.

use std::path::Path;

use serde::Serialize;

use super::{TableRow, emit, open};

#[derive(Serialize)]
pub struct ReasonRow {
    pub reason: &'static str,
    pub packets: u64,
}

impl TableRow for ReasonRow {
    const HEADERS: &'static [&'static str] = &["REASON", "PACKETS"];
    fn cells(&self) -> Vec<String> {
        vec![self.reason.to_owned(), self.packets.to_string()]
    }
}

pub fn rows(pin_path: &Path) -> anyhow::Result<Vec<ReasonRow>> {
    Ok(open(pin_path)?
        .reasons()?
        .into_iter()
        .map(|(reason, packets)| ReasonRow {
            reason: reason.name(),
            packets,
        })
        .collect())
}

pub fn run(pin_path: &Path, json: bool) -> anyhow::Result<()> {
    emit(&rows(pin_path)?, json)
}
