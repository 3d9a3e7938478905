//! `gpulb stats`: packets by verdict reason (pass/forward/drop), summed over CPUs, then
//! conntrack's flood mode: the seconds CPUs spent in it (its packets are `fwd_stateless`).

use std::path::Path;

use serde::Serialize;

use super::{TableRow, emit, open};

#[derive(Serialize)]
pub struct StatRow {
    pub counter: &'static str,
    pub value: u64,
}

impl TableRow for StatRow {
    const HEADERS: &'static [&'static str] = &["COUNTER", "VALUE"];
    fn cells(&self) -> Vec<String> {
        vec![self.counter.to_owned(), self.value.to_string()]
    }
}

pub fn rows(pin_path: &Path) -> anyhow::Result<Vec<StatRow>> {
    let maps = open(pin_path)?;
    let mut rows: Vec<StatRow> = maps
        .reasons()?
        .into_iter()
        .map(|(reason, packets)| StatRow {
            counter: reason.name(),
            value: packets,
        })
        .collect();
    rows.push(StatRow {
        counter: "flood_cpu_seconds",
        value: maps.flood()?.flood_seconds,
    });
    Ok(rows)
}

pub fn run(pin_path: &Path, json: bool) -> anyhow::Result<()> {
    emit(&rows(pin_path)?, json)
}
