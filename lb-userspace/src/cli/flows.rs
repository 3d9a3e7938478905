//! `gpulb flows`: the conntrack table, most recently active first.

use std::{collections::HashMap, path::Path};

use serde::Serialize;

use super::{TableRow, emit, open, proto_label};

#[derive(Serialize)]
pub struct FlowRow {
    pub protocol: String,
    pub client: String,
    pub vip: String,
    pub backend: String,
    pub backend_id: u32,
    /// Seconds since the flow's last packet.
    pub idle_seconds: f64,
}

impl TableRow for FlowRow {
    const HEADERS: &'static [&'static str] = &["PROTO", "CLIENT", "VIP", "BACKEND", "IDLE"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.protocol.clone(),
            self.client.clone(),
            self.vip.clone(),
            self.backend.clone(),
            format!("{:.1}s", self.idle_seconds),
        ]
    }
}

/// CLOCK_MONOTONIC in ns: what `bpf_ktime_get_ns` counts.
fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always readable");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

pub fn rows(pin_path: &Path, limit: usize) -> anyhow::Result<Vec<FlowRow>> {
    let maps = open(pin_path)?;
    let backends: HashMap<u32, String> = maps
        .backends()?
        .into_iter()
        .map(|(id, b)| (id, b.addr.to_string()))
        .collect();
    let now = monotonic_ns();
    let mut rows: Vec<FlowRow> = maps
        .flows()?
        .into_iter()
        .map(|(k, f)| FlowRow {
            protocol: proto_label(k.proto),
            client: k.client.to_string(),
            vip: k.vip.to_string(),
            backend: backends
                .get(&f.backend)
                .cloned()
                .unwrap_or_else(|| format!("(removed {})", f.backend)),
            backend_id: f.backend,
            idle_seconds: now.saturating_sub(f.last_seen_ns) as f64 / 1e9,
        })
        .collect();
    rows.sort_by(|a, b| a.idle_seconds.total_cmp(&b.idle_seconds));
    if limit > 0 {
        rows.truncate(limit);
    }
    Ok(rows)
}

pub fn run(pin_path: &Path, limit: usize, json: bool) -> anyhow::Result<()> {
    emit(&rows(pin_path, limit)?, json)
}
