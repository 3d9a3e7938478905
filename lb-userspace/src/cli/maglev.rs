//! `gpulb maglev`: each backend's share of its VIP's Maglev table against its weight.

use std::path::Path;

use serde::Serialize;

use super::{TableRow, emit, open, percent};
use crate::maglev;

#[derive(Serialize)]
pub struct ShareRow {
    pub vip: String,
    pub backend: String,
    pub weight: u32,
    pub slots: usize,
    pub table_size: u32,
    /// Slots held / table size.
    pub share: String,
    /// Weight / total weight of the VIP.
    pub expected: String,
}

impl TableRow for ShareRow {
    const HEADERS: &'static [&'static str] =
        &["VIP", "BACKEND", "WEIGHT", "SLOTS", "SHARE", "EXPECTED"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.vip.clone(),
            self.backend.clone(),
            self.weight.to_string(),
            self.slots.to_string(),
            self.share.clone(),
            self.expected.clone(),
        ]
    }
}

pub fn rows(pin_path: &Path) -> anyhow::Result<Vec<ShareRow>> {
    let maps = open(pin_path)?;
    let backends = maps.backends()?;
    let mut services = maps.services()?;
    services.sort_by_key(|(_, s)| s.id);
    let mut rows = Vec::new();
    for (key, service) in services {
        let counts = maglev::slot_counts(&maps.maglev_table(&service)?);
        let members: Vec<_> = backends
            .iter()
            .filter(|(_, b)| u32::from(b.service) == service.id)
            .collect();
        let total_weight: u64 = members.iter().map(|(_, b)| u64::from(b.weight)).sum();
        for (id, b) in members {
            let slots = counts.get(id).copied().unwrap_or(0);
            rows.push(ShareRow {
                vip: key.to_string(),
                backend: b.addr.to_string(),
                weight: b.weight,
                slots,
                table_size: service.table_size,
                share: percent(slots, service.table_size as usize),
                expected: percent(b.weight as usize, total_weight as usize),
            });
        }
    }
    Ok(rows)
}

pub fn run(pin_path: &Path, json: bool) -> anyhow::Result<()> {
    emit(&rows(pin_path)?, json)
}
