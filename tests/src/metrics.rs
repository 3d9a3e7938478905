//! Reading the daemon's Prometheus metrics, and percentiles.

use anyhow::ensure;

use crate::{NetNs, get};

/// The daemon's Prometheus endpoint (default `metrics_listen`), scraped inside `ns`.
pub fn scrape(ns: &NetNs) -> anyhow::Result<String> {
    let (status, body) = get(ns, "http://127.0.0.1:9464/metrics")?;
    ensure!(status == 200, "GET /metrics: HTTP {status}: {body}");
    Ok(body)
}

/// The sum of the samples of `name` whose labels contain every one of `labels`
/// (`key="value"` strings); `None` if there is no such sample.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (metric_name, label_text) = series.split_once('{').unwrap_or((series, ""));
        if metric_name != name || !labels.iter().all(|l| label_text.contains(l)) {
            continue;
        }
        let v: f64 = value.parse().ok()?;
        *found.get_or_insert(0.0) += v;
    }
    found
}

/// The `p` quantile (0 to 1) of `v`, nearest rank; NaN for no values.
pub fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}
