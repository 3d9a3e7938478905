//! Prometheus metrics on their own listener (`metrics_listen`, 127.0.0.1:9464 by default).
//!
//! Two kinds: events the state task counts as they happen (ejections, Maglev rebuilds), kept
//! in a long-lived registry; and what is read at scrape time, put in a fresh registry each
//! scrape: per-CPU BPF counters summed (through the daemon's own map handles) and the
//! backends' status from the snapshot the state task publishes, joined by backend id. No
//! client address is ever a label.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use prometheus::{
    Encoder as _, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    control::{BackendState, BackendStatus},
    maps::{ConntrackFill, Maps, MapsError},
};

/// `gpulb_ejections_total`'s causes: every backend has a series for each from the start, so
/// that `increase()` sees its first ejection.
pub const EJECTION_CAUSES: [&str; 2] = ["exit", "unhealthy"];

/// `vip`, `backend`, `backend_instance`, `cause` as `gpulb_ejections_total` has them (the VIP
/// and backend as `address:port`, like the map-derived metrics).
pub fn ejection_labels(
    vip: SocketAddr,
    backend: SocketAddr,
    instance: Option<&str>,
    cause: &str,
) -> [String; 4] {
    [
        vip.to_string(),
        backend.to_string(),
        instance.unwrap_or_default().to_owned(),
        cause.to_owned(),
    ]
}

/// How long a conntrack fill reading is reused: counting walks every entry.
const FILL_MAX_AGE: Duration = Duration::from_secs(10);

/// The last conntrack fill reading and when it was taken.
type FillCache = Mutex<Option<(Instant, [ConntrackFill; 2])>>;

/// What the state task counts.
pub struct DaemonMetrics {
    registry: Registry,
    /// Backends taken out of the table other than by an operator: `cause` = exit | unhealthy.
    pub ejections: IntCounterVec,
    pub rebuilds: IntCounter,
    pub rebuild_seconds: Histogram,
}

impl DaemonMetrics {
    pub fn new() -> Arc<Self> {
        let registry = Registry::new();
        let ejections = IntCounterVec::new(
            Opts::new(
                "gpulb_ejections_total",
                "Backends taken out of the table because their process exited or they failed probes.",
            ),
            &["vip", "backend", "backend_instance", "cause"],
        )
        .expect("valid metric");
        let rebuilds = IntCounter::new(
            "gpulb_maglev_rebuilds_total",
            "Maglev table rebuilds that changed the maps.",
        )
        .expect("valid metric");
        let rebuild_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "gpulb_maglev_rebuild_seconds",
                "Time to rebuild the tables and write the changed slots.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            ]),
        )
        .expect("valid metric");
        for c in [
            Box::new(ejections.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(rebuilds.clone()),
            Box::new(rebuild_seconds.clone()),
        ] {
            registry.register(c).expect("unique metric");
        }
        Arc::new(Self {
            registry,
            ejections,
            rebuilds,
            rebuild_seconds,
        })
    }
}

/// The backends as the state task last published them.
#[derive(Debug, Clone, Default)]
pub struct Snapshot(pub Arc<Vec<BackendStatus>>);

impl Snapshot {
    pub fn new(backends: Vec<BackendStatus>) -> Self {
        Self(Arc::new(backends))
    }
}

#[derive(Clone)]
struct Scrape {
    daemon: Arc<DaemonMetrics>,
    maps: Arc<Maps>,
    snapshot: watch::Receiver<Snapshot>,
    fill: Arc<FillCache>,
}

/// Serves `/metrics` on `listen` until `cancel`; `maps` are handles of the daemon's maps.
pub async fn serve(
    listen: SocketAddr,
    daemon: Arc<DaemonMetrics>,
    maps: Maps,
    snapshot: watch::Receiver<Snapshot>,
    cancel: CancellationToken,
) {
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            warn!(%listen, error = %e, "metrics listener failed; serving no metrics");
            return;
        }
    };
    info!(%listen, "metrics at /metrics");
    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(Scrape {
            daemon,
            maps: Arc::new(maps),
            snapshot,
            fill: Arc::default(),
        });
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await;
}

async fn metrics(State(scrape): State<Scrape>) -> impl IntoResponse {
    let snapshot = scrape.snapshot.borrow().clone();
    for s in snapshot.0.iter() {
        for cause in EJECTION_CAUSES {
            let labels = ejection_labels(s.vip_address, s.backend, s.instance.as_deref(), cause);
            scrape.daemon.ejections.with_label_values(&labels);
        }
    }
    let maps = scrape.maps.clone();
    let fill = scrape.fill.clone();
    let maps_part = tokio::task::spawn_blocking(move || {
        let fill = conntrack_fill(&maps, &fill)?;
        scrape_maps(&maps, &snapshot.0, fill)
    })
    .await;
    let mut text = match maps_part {
        Ok(Ok(text)) => text,
        Ok(Err(e)) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reading the maps: {}\n", crate::datapath::ErrorChain(&e)),
            );
        }
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    };
    text.push_str(&encode(&scrape.daemon.registry));
    (StatusCode::OK, text)
}

fn encode(registry: &Registry) -> String {
    let mut buf = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut buf)
        .expect("text encoding does not fail");
    String::from_utf8(buf).expect("metrics text is UTF-8")
}

/// The conntrack tables' fill, counted at most every `FILL_MAX_AGE`.
fn conntrack_fill(maps: &Maps, cache: &FillCache) -> Result<[ConntrackFill; 2], MapsError> {
    let mut cache = cache.lock().expect("no panic while holding the fill cache");
    if let Some((at, fill)) = *cache
        && at.elapsed() < FILL_MAX_AGE
    {
        return Ok(fill);
    }
    let fill = maps.conntrack_fill()?;
    *cache = Some((Instant::now(), fill));
    Ok(fill)
}

/// Builds the scrape-time metrics from the maps and the daemon's status.
fn scrape_maps(
    maps: &Maps,
    status: &[BackendStatus],
    fill: [ConntrackFill; 2],
) -> Result<String, MapsError> {
    let r = Registry::new();
    let counter = |name: &str, help: &str, labels: &[&str]| {
        let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
        r.register(Box::new(c.clone())).expect("unique metric");
        c
    };
    let gauge = |name: &str, help: &str, labels: &[&str]| {
        let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
        r.register(Box::new(g.clone())).expect("unique metric");
        g
    };

    let reasons = counter(
        "gpulb_packets_total",
        "Packets by verdict: pass_* untouched, fwd_* NATed, drop_* dropped, egress_* on TC.",
        &["reason"],
    );
    for (reason, n) in maps.reasons()? {
        reasons.with_label_values(&[reason.name()]).inc_by(n);
    }
    let flood = counter(
        "gpulb_conntrack_flood_seconds_total",
        "Seconds CPUs spent in flood mode (their conntrack insert budget spent: new flows by the consistent hash, no state; one per CPU and second).",
        &[],
    );
    flood
        .with_label_values(&[] as &[&str])
        .inc_by(maps.flood()?.flood_seconds);

    let entries = gauge(
        "gpulb_conntrack_entries",
        "Entries in the conntrack table (counted at most every 10 s). Near capacity, the LRU evicts the least recently active flows.",
        &["family"],
    );
    let capacity = gauge(
        "gpulb_conntrack_capacity",
        "Entries the conntrack table holds (conntrack_size, conntrack_size_v6).",
        &["family"],
    );
    for (family, f) in ["ipv4", "ipv6"].into_iter().zip(fill) {
        entries.with_label_values(&[family]).set(f.entries as i64);
        capacity.with_label_values(&[family]).set(f.capacity as i64);
    }

    let vip_labels = ["vip"];
    let vip_packets = counter(
        "gpulb_vip_packets_total",
        "Packets to the VIP.",
        &vip_labels,
    );
    let vip_bytes = counter("gpulb_vip_bytes_total", "Bytes to the VIP.", &vip_labels);
    let vip_new = counter(
        "gpulb_vip_new_flows_total",
        "New flows to the VIP.",
        &vip_labels,
    );
    let refused = counter(
        "gpulb_vip_refused_total",
        "New flows refused by admission control (RST or drop), by cause.",
        &["vip", "cause"],
    );
    let sticky = gauge(
        "gpulb_vip_sticky",
        "1 while the VIP keeps clients on their hash's picks (prefix affinity), 0 while it balances by load.",
        &vip_labels,
    );
    let redirected = counter(
        "gpulb_vip_redirected_total",
        "New flows sent past a full (capped or over-bound) Maglev pick to another backend.",
        &vip_labels,
    );
    let services = maps.services()?;
    for (key, service) in &services {
        let vip = key.to_string();
        let c = maps.vip_counters(service.id)?;
        vip_packets.with_label_values(&[&vip]).inc_by(c.packets);
        vip_bytes.with_label_values(&[&vip]).inc_by(c.bytes);
        vip_new.with_label_values(&[&vip]).inc_by(c.new_flows);
        let a = maps.admit_counters(service.id)?;
        for (cause, n) in [
            ("rate_limited", a.rate_limited),
            ("not_allowed", a.not_allowed),
            ("backends_full", a.backends_full),
        ] {
            refused.with_label_values(&[&vip, cause]).inc_by(n);
        }
        redirected.with_label_values(&[&vip]).inc_by(a.redirected);
        sticky
            .with_label_values(&[&vip])
            .set(i64::from(maps.sched(service.id)?.is_sticky()));
    }

    let labels = ["vip", "backend", "backend_instance"];
    let packets = counter(
        "gpulb_backend_packets_total",
        "Packets NATed to the backend.",
        &labels,
    );
    let bytes = counter(
        "gpulb_backend_bytes_total",
        "Bytes NATed to the backend.",
        &labels,
    );
    let egress_packets = counter(
        "gpulb_backend_egress_packets_total",
        "Replies from the backend NATed back to clients as the VIP.",
        &labels,
    );
    let egress_bytes = counter(
        "gpulb_backend_egress_bytes_total",
        "Bytes of replies from the backend NATed back to clients as the VIP.",
        &labels,
    );
    let new_flows = counter(
        "gpulb_backend_new_flows_total",
        "New flows sent to the backend.",
        &labels,
    );
    let live = gauge(
        "gpulb_backend_live_flows",
        "Live flows through the VIP to the backend (the data path's count; what drains wait for).",
        &labels,
    );
    let counted = gauge(
        "gpulb_backend_counted_flows",
        "Live TCP flows the data path counts for the backend (what max_flows and the scheduler use).",
        &labels,
    );
    let max_flows = gauge(
        "gpulb_backend_max_flows",
        "The backend's cap on concurrent TCP flows (0: none).",
        &labels,
    );
    let in_table = gauge(
        "gpulb_backend_in_table",
        "1 if the backend takes new flows.",
        &labels,
    );
    let weight = gauge("gpulb_backend_weight", "Maglev weight.", &labels);
    let restarts = counter(
        "gpulb_backend_restarts_total",
        "Restarts of the backend's process after it exited.",
        &labels,
    );
    let state = gauge(
        "gpulb_backend_state",
        "1 for the backend's current state, 0 for the others.",
        &["vip", "backend", "backend_instance", "state"],
    );
    let probe = GaugeVec::new(
        Opts::new(
            "gpulb_backend_probe_latency_seconds",
            "Latency of the last successful health probe.",
        ),
        &labels,
    )
    .expect("valid metric");
    r.register(Box::new(probe.clone())).expect("unique metric");
    let running = gauge(
        "gpulb_backend_engine_running",
        "Requests the backend's engine last reported running (a scheduler input).",
        &labels,
    );
    let waiting = gauge(
        "gpulb_backend_engine_waiting",
        "Requests the backend's engine last reported waiting (a scheduler input).",
        &labels,
    );
    let slots = gauge(
        "gpulb_backend_slots",
        "Batch slots the scheduler counts with: configured, or learned from the engine (0: unknown).",
        &labels,
    );
    let float = |name: &str, help: &str| {
        let g = GaugeVec::new(Opts::new(name, help), &labels).expect("valid metric");
        r.register(Box::new(g.clone())).expect("unique metric");
        g
    };
    let kv = float(
        "gpulb_backend_engine_kv_usage",
        "KV-cache use the backend's engine last reported, 0-1.",
    );
    let age = float(
        "gpulb_backend_signal_age_seconds",
        "Age of the engine's last reading; past the VIP's signal_max_age_ms it is ignored.",
    );
    let prefix = float(
        "gpulb_backend_prefix_hit_ratio",
        "The engine's prefix-cache hit rate over about the last 30 s (what prefix_affinity = auto weighs).",
    );
    let info = gauge(
        "gpulb_backend_info",
        "The backend's model and GPUs (always 1).",
        &[
            "vip",
            "backend",
            "backend_instance",
            "model",
            "gpu_index",
            "gpu_uuid",
            "gpu_name",
        ],
    );

    for s in status {
        let Some(id) = s.id else {
            continue;
        };
        let (vip, backend) = (s.vip_address.to_string(), s.backend.to_string());
        let instance = s.instance.clone().unwrap_or_default();
        let l = [vip.as_str(), backend.as_str(), instance.as_str()];
        let c = maps.backend_counters(id)?;
        packets.with_label_values(&l).inc_by(c.packets);
        bytes.with_label_values(&l).inc_by(c.bytes);
        let e = maps.backend_egress(id)?;
        egress_packets.with_label_values(&l).inc_by(e.packets);
        egress_bytes.with_label_values(&l).inc_by(e.bytes);
        new_flows.with_label_values(&l).inc_by(c.new_flows);
        counted
            .with_label_values(&l)
            .set(maps.live_flows(id)? as i64);
        max_flows
            .with_label_values(&l)
            .set(i64::from(maps.backend(id)?.max_flows));
        weight.with_label_values(&l).set(i64::from(s.weight));
        live.with_label_values(&l).set(s.live_flows as i64);
        in_table.with_label_values(&l).set(i64::from(s.in_table));
        restarts.with_label_values(&l).inc_by(u64::from(s.restarts));
        for st in BackendState::ALL {
            state
                .with_label_values(&[l[0], l[1], l[2], st.name()])
                .set(i64::from(s.state == st));
        }
        slots.with_label_values(&l).set(i64::from(s.slots));
        if let Some(e) = s.engine {
            running.with_label_values(&l).set(i64::from(e.running));
            waiting.with_label_values(&l).set(i64::from(e.waiting));
            kv.with_label_values(&l).set(e.kv_usage);
            age.with_label_values(&l).set(e.age_ms / 1000.0);
            if let Some(rate) = e.prefix_hit_rate {
                prefix.with_label_values(&l).set(rate);
            }
        }
        if let Some(ms) = s.last_probe_ms {
            probe.with_label_values(&l).set(ms / 1000.0);
        }
        for g in &s.gpus {
            info.with_label_values(&[
                l[0],
                l[1],
                l[2],
                s.model.as_deref().unwrap_or(""),
                &g.index.to_string(),
                &g.uuid,
                &g.name,
            ])
            .set(1);
        }
    }
    Ok(encode(&r))
}
