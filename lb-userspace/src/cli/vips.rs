//! `gpulb vips`: configured VIPs and their traffic.

use std::path::Path;

use serde::Serialize;

use super::{TableRow, emit, open, proto_label, vip_label};

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
        ]
    }
}

pub fn rows(pin_path: &Path) -> anyhow::Result<Vec<VipRow>> {
    let maps = open(pin_path)?;
    let backends = maps.backends()?;
    let mut rows = Vec::new();
    for (key, service) in maps.services()? {
        let c = maps.vip_counters(service.id)?;
        rows.push(VipRow {
            id: service.id,
            vip: vip_label(&key),
            protocol: proto_label(key.proto),
            table_size: service.table_size,
            backends: backends
                .iter()
                .filter(|(_, b)| u32::from(b.service) == service.id)
                .count(),
            packets: c.packets,
            bytes: c.bytes,
            new_flows: c.new_flows,
        });
    }
    rows.sort_by_key(|r| r.id);
    Ok(rows)
}

pub fn run(pin_path: &Path, json: bool) -> anyhow::Result<()> {
    emit(&rows(pin_path)?, json)
}
