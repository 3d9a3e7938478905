//! CLI subcommands that read the pinned maps; one file each.

pub mod backends;
pub mod control;
pub mod flows;
pub mod kernel;
pub mod maglev;
pub mod stats;
pub mod top;
pub mod vips;

use std::path::Path;

use anyhow::Context as _;
use comfy_table::{Cell, CellAlignment, Table, presets::NOTHING};
use serde::Serialize;

use crate::maps::Maps;

/// A row of a CLI table: its column headers and cells; `--json` prints it with serde.
pub trait TableRow: Serialize {
    const HEADERS: &'static [&'static str];
    fn cells(&self) -> Vec<String>;
}

/// Prints rows as an aligned table (numbers right-aligned) or as a JSON array.
pub fn emit<R: TableRow>(rows: &[R], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(rows)?);
        return Ok(());
    }
    let mut table = Table::new();
    table.load_preset(NOTHING).set_header(R::HEADERS.to_vec());
    for row in rows {
        table.add_row(row.cells().into_iter().map(|c| {
            let numeric = c
                .trim_end_matches('%')
                .replace(['.', ','], "")
                .parse::<u64>()
                .is_ok();
            Cell::new(c).set_alignment(if numeric {
                CellAlignment::Right
            } else {
                CellAlignment::Left
            })
        }));
    }
    println!("{table}");
    Ok(())
}

pub fn open(pin_path: &Path) -> anyhow::Result<Maps> {
    Maps::open_pinned(pin_path)
        .with_context(|| format!("reading gpulb's maps under {}", pin_path.display()))
}

/// The VIP (`address:port`) of a service id, as the maps name it.
pub fn vip_of_service(services: &[(crate::maps::VipAddr, lb_common::Service)], id: u32) -> String {
    services
        .iter()
        .find(|(_, s)| s.id == id)
        .map_or_else(|| format!("(service {id})"), |(k, _)| k.to_string())
}

pub fn proto_label(proto: u8) -> String {
    crate::config::Protocol::from_number(proto).map_or_else(|| proto.to_string(), |p| p.to_string())
}

pub fn percent(part: usize, whole: usize) -> String {
    if whole == 0 {
        return "0.00%".into();
    }
    format!("{:.2}%", part as f64 * 100.0 / whole as f64)
}

/// A duration in milliseconds as people read it: `42.5ms`, `3.2s`.
pub fn millis(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.1}s", ms / 1000.0)
    } else {
        format!("{ms:.1}ms")
    }
}
