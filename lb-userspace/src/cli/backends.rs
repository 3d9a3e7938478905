//! `gpulb backends`: every backend with the daemon's view (model, GPU, pid, state, restarts,
//! probe latency) and the maps' (live flows and cap, weight, table share, traffic).

use std::{collections::HashMap, path::Path, time::Duration};

use serde::Serialize;

use super::{TableRow, emit, open, percent};
use crate::{
    control::{self, BackendStatus, Request},
    maglev,
};

#[derive(Serialize)]
pub struct BackendRow {
    pub id: u32,
    pub vip: String,
    pub backend: String,
    /// The daemon's state (starting, ready, unhealthy, draining, ejected, crash-looping), or
    /// from the maps alone: active, draining, standby, out of table.
    pub state: String,
    pub weight: u32,
    /// Maglev slots held / table size.
    pub share: String,
    pub slots: usize,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    /// Conntrack entries naming this backend (closed flows stay until evicted).
    pub tracked_flows: usize,
    /// Live TCP flows the data path counts (what `max_flows` and `load_bound` check).
    pub live_flows: u64,
    /// Concurrent TCP flow cap; 0: none.
    pub max_flows: u16,
    /// The scheduler's inputs beside the live flows: what the engine last reported
    /// (running and waiting requests, KV-cache use), the batch slots it counts with (0:
    /// unknown), and how old the reading is (`None`: never; past `signal_max_age_ms` the
    /// scheduler ignores it: `signal_fresh` false).
    pub running: u32,
    pub waiting: u32,
    pub kv_usage: f64,
    pub batch_slots: u32,
    pub signal_age_ms: Option<f64>,
    pub signal_fresh: bool,
    /// What the daemon says of it (model, GPUs, pid, probes, live flows); `None` if the
    /// daemon did not answer.
    pub daemon: Option<BackendStatus>,
}

fn dash<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

impl TableRow for BackendRow {
    const HEADERS: &'static [&'static str] = &[
        "ID",
        "VIP",
        "BACKEND",
        "INSTANCE",
        "GPU",
        "PID",
        "STATE",
        "RESTARTS",
        "PROBE",
        "FLOWS",
        "ENGINE",
        "SLOTS",
        "SIGNAL",
        "WEIGHT",
        "SHARE",
        "NEW_FLOWS",
        "LAST_ERROR",
    ];
    fn cells(&self) -> Vec<String> {
        let d = self.daemon.as_ref();
        let gpus = d.map(|d| d.gpus.as_slice()).unwrap_or_default();
        let gpu = if gpus.is_empty() {
            "-".into()
        } else {
            gpus.iter()
                .map(|g| {
                    let short: String = g.uuid.chars().take(12).collect();
                    format!("{} {short} ({})", g.index, g.name)
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        vec![
            self.id.to_string(),
            self.vip.clone(),
            self.backend.clone(),
            dash(d.and_then(|d| d.instance.as_ref())),
            gpu,
            dash(d.and_then(|d| d.pid)),
            self.state.clone(),
            dash(d.map(|d| d.restarts)),
            dash(
                d.and_then(|d| d.last_probe_ms)
                    .map(|ms| format!("{ms:.1}ms")),
            ),
            match self.max_flows {
                0 => self.live_flows.to_string(),
                cap => format!("{}/{cap}", self.live_flows),
            },
            match self.signal_age_ms {
                Some(_) => format!(
                    "{}+{} kv {:.0}%",
                    self.running,
                    self.waiting,
                    self.kv_usage * 100.0
                ),
                None => "-".into(),
            },
            match self.batch_slots {
                0 => "-".into(),
                n => n.to_string(),
            },
            match self.signal_age_ms {
                None => "-".into(),
                Some(ms) if self.signal_fresh => super::millis(ms),
                Some(ms) => format!("stale {}", super::millis(ms)),
            },
            self.weight.to_string(),
            self.share.clone(),
            self.new_flows.to_string(),
            dash(d.and_then(|d| d.last_error.as_deref()).map(|e| {
                // The table stays readable; `--json` has it whole.
                if e.chars().count() > 60 {
                    format!("{}…", e.chars().take(59).collect::<String>())
                } else {
                    e.to_owned()
                }
            })),
        ]
    }
}

/// The daemon's status, or `None` (with a note on stderr) if it does not answer.
fn daemon_status(socket: &Path) -> Option<Vec<BackendStatus>> {
    match control::call(socket, &Request::Status, Duration::from_secs(5)) {
        Ok(r) if r.ok => Some(r.backends),
        Ok(r) => {
            eprintln!("gpulb: daemon: {}", r.error.unwrap_or_default());
            None
        }
        Err(e) => {
            eprintln!(
                "gpulb: {}; showing what the maps hold",
                crate::datapath::ErrorChain(&e)
            );
            None
        }
    }
}

pub fn rows(pin_path: &Path, socket: &Path) -> anyhow::Result<Vec<BackendRow>> {
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
    let daemon = daemon_status(socket);
    let now = crate::load::monotonic_ns();
    let mut rows = Vec::new();
    for (id, b) in maps.backends()? {
        let service = u32::from(b.service);
        let vip = super::vip_of_service(&services, service);
        let held = slots.get(&id).copied().unwrap_or(0);
        let c = maps.backend_counters(id)?;
        let engine = maps.engine(id)?;
        let max_age = maps.sched(service)?.max_age_ns;
        let age_ns = now.saturating_sub(engine.updated_ns);
        let status = daemon.iter().flatten().find(|s| s.id == Some(id));
        let state = match (status, b.is_draining(), b.weight) {
            (Some(s), _, _) => s.state.to_string(),
            (None, true, _) => "draining".into(),
            (None, false, 0) => "standby".into(),
            (None, false, _) if held > 0 => "active".into(),
            (None, false, _) => "out of table".into(),
        };
        rows.push(BackendRow {
            id,
            vip,
            backend: b.addr.to_string(),
            state,
            weight: status.map_or(b.weight, |s| s.weight),
            share: percent(held, table_sizes.get(&service).copied().unwrap_or(0)),
            slots: held,
            packets: c.packets,
            bytes: c.bytes,
            new_flows: c.new_flows,
            tracked_flows: tracked.get(&id).copied().unwrap_or(0),
            live_flows: maps.live_flows(id)?,
            max_flows: b.max_flows,
            running: engine.running,
            waiting: engine.waiting,
            kv_usage: f64::from(engine.kv_permille) / 1000.0,
            batch_slots: engine.slots,
            signal_age_ms: (engine.updated_ns != 0).then(|| age_ns as f64 / 1e6),
            signal_fresh: engine.updated_ns != 0 && age_ns <= max_age,
            daemon: status.cloned(),
        });
    }
    Ok(rows)
}

pub fn run(pin_path: &Path, socket: &Path, json: bool) -> anyhow::Result<()> {
    emit(&rows(pin_path, socket)?, json)
}
