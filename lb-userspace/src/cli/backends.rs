//! `gpulb backends`: every backend, its weight, table share, traffic and tracked flows.

use std::{collections::HashMap, path::Path};

use lb_common::BACKEND_DRAINING;
use serde::Serialize;

use super::{TableRow, emit, open, percent, vip_label};
use crate::{maglev, maps::sock_of};

#[derive(Serialize)]
pub struct BackendRow {
    pub id: u32,
    pub vip: String,
    pub backend: String,
    pub weight: u32,
    pub state: &'static str,
    /// Maglev slots held / table size.
    pub share: String,
    pub slots: usize,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    /// Conntrack entries naming this backend.
    pub tracked_flows: usize,
}

impl TableRow for BackendRow {
    const HEADERS: &'static [&'static str] = &[
        "ID",
        "VIP",
        "BACKEND",
        "WEIGHT",
        "STATE",
        "SHARE",
        "PACKETS",
        "BYTES",
        "NEW_FLOWS",
        "FLOWS",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.id.to_string(),
            self.vip.clone(),
            self.backend.clone(),
            self.weight.to_string(),
            self.state.to_owned(),
            self.share.clone(),
            self.packets.to_string(),
            self.bytes.to_string(),
            self.new_flows.to_string(),
            self.tracked_flows.to_string(),
        ]
    }
}

pub fn rows(pin_path: &Path) -> anyhow::Result<Vec<BackendRow>> {
    let maps = open(pin_path)?;
    let services = maps.services()?;
    let mut slots: HashMap<u32, usize> = HashMap::new();
    let mut table_sizes: HashMap<u32, usize> = HashMap::new();
    for (_, s) in &services {
        slots.extend(maglev::slot_counts(&maps.maglev_table(s)?));
        table_sizes.insert(s.id, s.table_size as usize);
    }
    let mut tracked: HashMap<u32, usize> = HashMap::new();
    for (_, flow) in maps.flows()? {
        *tracked.entry(flow.backend).or_insert(0) += 1;
    }
    let mut rows = Vec::new();
    for (id, b) in maps.backends()? {
        let service = u32::from(b.service);
        let vip = services
            .iter()
            .find(|(_, s)| s.id == service)
            .map_or_else(|| format!("(service {service})"), |(k, _)| vip_label(k));
        let held = slots.get(&id).copied().unwrap_or(0);
        let c = maps.backend_counters(id)?;
        let state = match (b.flags & BACKEND_DRAINING != 0, b.weight) {
            (true, _) => "draining",
            (false, 0) => "standby",
            (false, _) => "active",
        };
        rows.push(BackendRow {
            id,
            vip,
            backend: sock_of(b.addr_be, b.port_be).to_string(),
            weight: b.weight,
            state,
            share: percent(held, table_sizes.get(&service).copied().unwrap_or(0)),
            slots: held,
            packets: c.packets,
            bytes: c.bytes,
            new_flows: c.new_flows,
            tracked_flows: tracked.get(&id).copied().unwrap_or(0),
        });
    }
    Ok(rows)
}

pub fn run(pin_path: &Path, json: bool) -> anyhow::Result<()> {
    emit(&rows(pin_path)?, json)
}
