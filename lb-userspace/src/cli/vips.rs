//! `gpulb vips`: configured VIPs and their traffic.

use std::path::Path;

use lb_common::ServiceLimits;
use serde::Serialize;

use super::{TableRow, emit, open, proto_label};

#[derive(Serialize)]
pub struct VipRow {
    pub id: u32,
    pub vip: String,
    pub protocol: String,
    pub table_size: u32,
    pub backends: usize,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    /// What the data path enforces for new flows, e.g. "rate 10/s burst 20, allow 2, rst".
    pub limits: String,
    /// Allowed source prefixes (empty: all).
    pub allow: Vec<String>,
    /// New flows refused: rate limited, source not allowed, every backend full.
    pub rate_limited: u64,
    pub not_allowed: u64,
    pub backends_full: u64,
    /// New flows the scheduler sent elsewhere than the consistent hash's own pick.
    pub redirected: u64,
    /// New flows stay on their hash's picks while those have room (else: least loaded).
    pub sticky: bool,
    /// How new flows are chosen, e.g. "sticky (client), 4 choices, signals ≤ 500ms".
    pub scheduler: String,
}

impl TableRow for VipRow {
    const HEADERS: &'static [&'static str] = &[
        "ID",
        "VIP",
        "PROTO",
        "TABLE",
        "BACKENDS",
        "PACKETS",
        "BYTES",
        "NEW_FLOWS",
        "REFUSED",
        "MOVED",
        "SCHEDULER",
        "LIMITS",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.id.to_string(),
            self.vip.clone(),
            self.protocol.clone(),
            self.table_size.to_string(),
            self.backends.to_string(),
            self.packets.to_string(),
            self.bytes.to_string(),
            self.new_flows.to_string(),
            (self.rate_limited + self.not_allowed + self.backends_full).to_string(),
            self.redirected.to_string(),
            self.scheduler.clone(),
            self.limits.clone(),
        ]
    }
}

pub fn rows(pin_path: &Path) -> anyhow::Result<Vec<VipRow>> {
    let maps = open(pin_path)?;
    let backends = maps.backends()?;
    // One walk of the allow-list trie for all VIPs.
    let prefixes = maps.allowed()?;
    let mut rows = Vec::new();
    for (key, service) in maps.services()? {
        let c = maps.vip_counters(service.id)?;
        let a = maps.admit_counters(service.id)?;
        let limits = maps.limits(service.id)?;
        let sched = maps.sched(service.id)?;
        let allow: Vec<String> = prefixes
            .iter()
            .filter(|(id, _, _)| *id == service.id)
            .map(|(_, addr, len)| format!("{addr}/{len}"))
            .collect();
        rows.push(VipRow {
            id: service.id,
            vip: key.to_string(),
            protocol: proto_label(key.proto),
            table_size: service.table_size,
            backends: backends
                .iter()
                .filter(|(_, b)| u32::from(b.service) == service.id)
                .count(),
            packets: c.packets,
            bytes: c.bytes,
            new_flows: c.new_flows,
            limits: describe(&limits, allow.len()),
            allow,
            rate_limited: a.rate_limited,
            not_allowed: a.not_allowed,
            backends_full: a.backends_full,
            redirected: a.redirected,
            sticky: sched.is_sticky(),
            scheduler: format!(
                "{} ({}), {} choices, signals ≤ {}ms",
                if sched.is_sticky() {
                    "sticky"
                } else {
                    "balanced"
                },
                if limits.has_affinity() {
                    "client"
                } else {
                    "5-tuple"
                },
                sched.choices,
                sched.max_age_ns / 1_000_000
            ),
        });
    }
    rows.sort_by_key(|r| r.id);
    Ok(rows)
}

/// One line for the LIMITS column; "-" when the VIP has none.
fn describe(l: &ServiceLimits, allowed: usize) -> String {
    let mut parts = Vec::new();
    if l.interval_ns != 0 {
        let rate = 1e9 / l.interval_ns as f64;
        parts.push(format!(
            "rate {rate:.0}/s burst {}",
            l.burst_ns / l.interval_ns
        ));
    }
    if l.has_allowlist() {
        parts.push(format!("allow {allowed}"));
    }
    if parts.is_empty() {
        return "-".into();
    }
    parts.push(if l.refuses_with_rst() { "rst" } else { "drop" }.into());
    parts.join(", ")
}

pub fn run(pin_path: &Path, json: bool) -> anyhow::Result<()> {
    emit(&rows(pin_path)?, json)
}
