//! `gpulb top`: a live view, redrawn four times a second. Per VIP its new flows and refusals
//! per second; per backend its state, live flows, the scheduler's inputs, a sparkline of its
//! new flows and its restarts; and the events seen since it started (ejections, drains,
//! restarts, backends a reload added or removed), found by comparing the daemon's answers.
//! Reads the pinned maps (never the conntrack table: it stays cheap at a million flows) and
//! asks the daemon for its status; `q`, Esc or Ctrl-C quits. The terminal is restored on
//! exit and on a panic.

use std::{
    collections::{HashMap, VecDeque},
    path::Path,
    time::{Duration, Instant},
};

use ratatui::{
    Frame,
    crossterm::event::{self, Event, KeyCode, KeyModifiers},
    layout::{Constraint, Layout},
    style::{Color, Modifier, Style},
    text::Line,
    widgets::{Block, Paragraph, Row, Table},
};

use super::open;
use crate::{
    control::{self, BackendState, BackendStatus, Request},
    maps::Maps,
};

/// How often the view is redrawn.
const TICK: Duration = Duration::from_millis(250);
/// Samples a sparkline shows (15 s at 4 a second).
const HISTORY: usize = 60;
/// Events kept on screen.
const EVENTS: usize = 12;

pub fn run(pin_path: &Path, socket: &Path) -> anyhow::Result<()> {
    let maps = open(pin_path)?;
    // Installs a panic hook that restores the terminal before the message prints.
    let mut terminal = ratatui::init();
    let mut view = View::default();
    let result = (|| -> anyhow::Result<()> {
        loop {
            let started = Instant::now();
            view.sample(&maps, socket);
            terminal.draw(|f| view.draw(f))?;
            let wait = TICK.saturating_sub(started.elapsed());
            if event::poll(wait)?
                && let Event::Key(key) = event::read()?
            {
                let ctrl_c =
                    key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL);
                if matches!(key.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c {
                    return Ok(());
                }
            }
        }
    })();
    ratatui::restore();
    result
}

/// Cumulative counters at the last sample, to turn into rates.
#[derive(Default, Clone, Copy)]
struct Totals {
    new_flows: u64,
    refused: u64,
}

#[derive(Default)]
struct VipLine {
    vip: String,
    new_per_s: f64,
    refused_per_s: f64,
    refused_total: u64,
}

#[derive(Default)]
struct BackendLine {
    id: u32,
    vip: String,
    backend: String,
    instance: String,
    state: String,
    live_flows: u64,
    max_flows: u16,
    running: u32,
    waiting: u32,
    kv_usage: f64,
    weight: u32,
    restarts: String,
    new_per_s: f64,
}

#[derive(Default)]
struct View {
    at: Option<Instant>,
    vip_totals: HashMap<u32, Totals>,
    backend_totals: HashMap<u32, u64>,
    history: HashMap<u32, VecDeque<f64>>,
    vips: Vec<VipLine>,
    backends: Vec<BackendLine>,
    /// The daemon's last answer, by (VIP, backend); `None` while it does not answer.
    last: Option<HashMap<(String, String), BackendStatus>>,
    events: VecDeque<String>,
    error: Option<String>,
}

impl View {
    fn sample(&mut self, maps: &Maps, socket: &Path) {
        let now = Instant::now();
        let secs = self
            .at
            .map_or(0.0, |at| now.duration_since(at).as_secs_f64());
        self.at = Some(now);
        let status = match control::call(socket, &Request::Status, Duration::from_secs(1)) {
            Ok(r) if r.ok => Some(r.backends),
            Ok(r) => {
                self.event(format!("daemon: {}", r.error.unwrap_or_default()));
                None
            }
            Err(e) => {
                if self.last.is_some() {
                    self.event(format!("daemon not answering: {e}"));
                }
                None
            }
        };
        if let Some(status) = &status {
            self.compare(status);
        }
        self.last = status.as_ref().map(|s| {
            s.iter()
                .map(|b| ((b.vip.clone(), b.backend.to_string()), b.clone()))
                .collect()
        });
        match self.read_maps(maps, status.as_deref().unwrap_or_default(), secs) {
            Ok(()) => self.error = None,
            Err(e) => self.error = Some(format!("reading the maps: {e}")),
        }
    }

    fn read_maps(
        &mut self,
        maps: &Maps,
        status: &[BackendStatus],
        secs: f64,
    ) -> Result<(), crate::maps::MapsError> {
        let rate = |now: u64, before: Option<u64>| match before {
            Some(b) if secs > 0.0 => now.saturating_sub(b) as f64 / secs,
            _ => 0.0,
        };
        let services = maps.services()?;
        self.vips.clear();
        for (key, service) in &services {
            let c = maps.vip_counters(service.id)?;
            let a = maps.admit_counters(service.id)?;
            let refused = a.rate_limited + a.not_allowed + a.backends_full;
            let before = self.vip_totals.get(&service.id).copied();
            self.vips.push(VipLine {
                vip: key.to_string(),
                new_per_s: rate(c.new_flows, before.map(|t| t.new_flows)),
                refused_per_s: rate(refused, before.map(|t| t.refused)),
                refused_total: refused,
            });
            self.vip_totals.insert(
                service.id,
                Totals {
                    new_flows: c.new_flows,
                    refused,
                },
            );
        }
        self.backends.clear();
        for (id, b) in maps.backends()? {
            let service = u32::from(b.service);
            let vip = super::vip_of_service(&services, service);
            let c = maps.backend_counters(id)?;
            let new_per_s = rate(c.new_flows, self.backend_totals.get(&id).copied());
            self.backend_totals.insert(id, c.new_flows);
            let history = self.history.entry(id).or_default();
            history.push_back(new_per_s);
            while history.len() > HISTORY {
                history.pop_front();
            }
            let engine = maps.engine(id)?;
            let daemon = status.iter().find(|s| s.id == Some(id));
            self.backends.push(BackendLine {
                id,
                vip,
                backend: b.addr.to_string(),
                instance: daemon
                    .and_then(|d| d.instance.clone())
                    .unwrap_or_else(|| "-".into()),
                state: daemon.map_or_else(
                    || {
                        if b.is_draining() {
                            "draining".into()
                        } else if b.takes_new_flows() {
                            "active".into()
                        } else {
                            "out".into()
                        }
                    },
                    |d| d.state.to_string(),
                ),
                live_flows: maps.live_flows(id)?,
                max_flows: b.max_flows,
                running: engine.running,
                waiting: engine.waiting,
                kv_usage: f64::from(engine.kv_permille) / 1000.0,
                weight: daemon.map_or(b.weight, |d| d.weight),
                restarts: daemon.map_or_else(|| "-".into(), |d| d.restarts.to_string()),
                new_per_s,
            });
        }
        Ok(())
    }

    /// Events from what changed since the daemon's last answer.
    fn compare(&mut self, status: &[BackendStatus]) {
        let Some(last) = self.last.take() else {
            return;
        };
        let mut found = Vec::new();
        for b in status {
            let key = (b.vip.clone(), b.backend.to_string());
            let name = b.instance.clone().unwrap_or_else(|| key.1.clone());
            let Some(before) = last.get(&key) else {
                found.push(format!("{name}: added (reload)"));
                continue;
            };
            if b.restarts > before.restarts {
                found.push(format!("{name}: restarted ({} restarts)", b.restarts));
            }
            if b.state != before.state {
                let what = match b.state {
                    BackendState::Ejected => "ejected",
                    BackendState::CrashLooping => "ejected, crash-looping",
                    BackendState::Draining => "draining",
                    BackendState::Unhealthy => "unhealthy: out of the table",
                    BackendState::Ready if before.state == BackendState::Draining => "undrained",
                    BackendState::Ready => "ready",
                    BackendState::Starting => "starting",
                };
                let why = match (&b.last_error, b.state) {
                    (Some(e), BackendState::Ejected | BackendState::CrashLooping) => {
                        format!(" ({e})")
                    }
                    _ => String::new(),
                };
                found.push(format!("{name}: {what}{why}"));
            }
        }
        for (key, before) in &last {
            if !status
                .iter()
                .any(|b| b.vip == key.0 && b.backend.to_string() == key.1)
            {
                let name = before.instance.clone().unwrap_or_else(|| key.1.clone());
                found.push(format!("{name}: removed (reload)"));
            }
        }
        self.last = Some(last);
        for e in found {
            self.event(e);
        }
    }

    fn event(&mut self, text: String) {
        let stamp = time_of_day();
        self.events.push_front(format!("{stamp}  {text}"));
        self.events.truncate(EVENTS);
    }

    fn draw(&self, f: &mut Frame<'_>) {
        let [head, vips, backends, events] = Layout::vertical([
            Constraint::Length(1),
            Constraint::Length(self.vips.len() as u16 + 3),
            Constraint::Min(self.backends.len() as u16 + 3),
            Constraint::Length(EVENTS as u16 + 2),
        ])
        .areas(f.area());
        let title = match (&self.error, &self.last) {
            (Some(e), _) => format!("gpulb top — {e}"),
            (None, None) => "gpulb top — daemon not answering: maps only".to_owned(),
            (None, Some(_)) => "gpulb top — q quits".to_owned(),
        };
        f.render_widget(
            Paragraph::new(title).style(Style::new().add_modifier(Modifier::BOLD)),
            head,
        );
        let bold = Style::new().add_modifier(Modifier::BOLD);
        let vip_rows = self.vips.iter().map(|v| {
            Row::new(vec![
                v.vip.clone(),
                format!("{:.1}", v.new_per_s),
                format!("{:.1}", v.refused_per_s),
                v.refused_total.to_string(),
            ])
        });
        f.render_widget(
            Table::new(
                vip_rows,
                [
                    Constraint::Length(24),
                    Constraint::Length(12),
                    Constraint::Length(12),
                    Constraint::Length(12),
                ],
            )
            .header(Row::new(["VIP", "NEW/S", "REFUSED/S", "REFUSED"]).style(bold))
            .block(Block::bordered().title("VIPs")),
            vips,
        );
        let backend_rows = self.backends.iter().map(|b| {
            let color = match b.state.as_str() {
                "ready" | "active" => Color::Green,
                "draining" | "starting" => Color::Yellow,
                _ => Color::Red,
            };
            let flows = match b.max_flows {
                0 => b.live_flows.to_string(),
                cap => format!("{}/{cap}", b.live_flows),
            };
            Row::new(vec![
                b.id.to_string(),
                b.vip.clone(),
                b.backend.clone(),
                b.instance.clone(),
                b.state.clone(),
                flows,
                format!("{}+{} kv {:.0}%", b.running, b.waiting, b.kv_usage * 100.0),
                b.weight.to_string(),
                format!("{:.1}", b.new_per_s),
                sparkline(self.history.get(&b.id)),
                b.restarts.clone(),
            ])
            .style(Style::new().fg(color))
        });
        f.render_widget(
            Table::new(
                backend_rows,
                [
                    Constraint::Length(3),
                    Constraint::Length(22),
                    Constraint::Length(22),
                    Constraint::Length(14),
                    Constraint::Length(14),
                    Constraint::Length(9),
                    Constraint::Length(14),
                    Constraint::Length(6),
                    Constraint::Length(7),
                    Constraint::Length(HISTORY as u16 / 2),
                    Constraint::Length(8),
                ],
            )
            .header(
                Row::new([
                    "ID",
                    "VIP",
                    "BACKEND",
                    "INSTANCE",
                    "STATE",
                    "FLOWS",
                    "ENGINE",
                    "WEIGHT",
                    "NEW/S",
                    "NEW FLOWS (15 s)",
                    "RESTARTS",
                ])
                .style(bold),
            )
            .block(Block::bordered().title("backends")),
            backends,
        );
        let lines: Vec<Line<'_>> = self.events.iter().map(|e| Line::from(e.as_str())).collect();
        f.render_widget(
            Paragraph::new(lines).block(Block::bordered().title("events")),
            events,
        );
    }
}

/// The last samples as a line of block characters, scaled to their own maximum; two
/// samples per character.
fn sparkline(history: Option<&VecDeque<f64>>) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let Some(h) = history else {
        return String::new();
    };
    let pairs: Vec<f64> = h
        .iter()
        .copied()
        .collect::<Vec<_>>()
        .chunks(2)
        .map(|c| c.iter().copied().fold(0.0, f64::max))
        .collect();
    let max = pairs.iter().copied().fold(0.0, f64::max);
    pairs
        .iter()
        .map(|&v| {
            if max <= 0.0 {
                ' '
            } else {
                BARS[((v / max) * 7.0).round() as usize]
            }
        })
        .collect()
}

/// Wall-clock time of day, UTC, as `HH:MM:SS`.
fn time_of_day() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let day = secs % 86_400;
    format!("{:02}:{:02}:{:02}", day / 3600, day % 3600 / 60, day % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparkline_scales_to_its_maximum() {
        let h: VecDeque<f64> = [0.0, 0.0, 4.0, 8.0, 2.0, 2.0].into_iter().collect();
        assert_eq!(sparkline(Some(&h)), "▁█▃");
        let idle: VecDeque<f64> = [0.0; 4].into_iter().collect();
        assert_eq!(sparkline(Some(&idle)), "  ");
    }
}
