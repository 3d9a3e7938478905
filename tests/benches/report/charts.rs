//! SVG charts of the report (plotters).

use std::{collections::BTreeMap, path::Path};

use plotters::prelude::*;

pub fn bar_chart(path: &Path, title: &str, bars: &[(String, f64)]) {
    let root = SVGBackend::new(path, (640, 360)).into_drawing_area();
    root.fill(&WHITE).expect("draw");
    let max = bars.iter().map(|b| b.1).fold(0.0, f64::max).max(1e-9) * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d((0..bars.len()).into_segmented(), 0.0..max)
        .expect("chart");
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) => bars.get(*i).map_or_else(String::new, |b| b.0.clone()),
            _ => String::new(),
        })
        .draw()
        .expect("mesh");
    chart
        .draw_series(bars.iter().enumerate().map(|(i, (_, v))| {
            let mut bar = Rectangle::new(
                [
                    (SegmentValue::Exact(i), 0.0),
                    (SegmentValue::Exact(i + 1), *v),
                ],
                Palette99::pick(i).filled(),
            );
            bar.set_margin(0, 0, 20, 20);
            bar
        }))
        .expect("bars");
    root.present().expect("write chart");
}

pub fn line_chart(path: &Path, title: &str, series: &BTreeMap<&str, Vec<(f64, f64)>>) {
    let root = SVGBackend::new(path, (640, 360)).into_drawing_area();
    root.fill(&WHITE).expect("draw");
    let max_x = series.values().flatten().map(|p| p.0).fold(1.0, f64::max);
    let max_y = series.values().flatten().map(|p| p.1).fold(0.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d((1.0..max_x).log_scale(), 0.0..max_y.max(1e-9))
        .expect("chart");
    chart
        .configure_mesh()
        .x_desc("concurrent clients")
        .draw()
        .expect("mesh");
    for (i, (name, points)) in series.iter().enumerate() {
        let color = Palette99::pick(i);
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))
            .expect("line")
            .label(*name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .expect("legend");
    root.present().expect("write chart");
}

/// Bars in groups: one group per label of `groups`, one bar per series in each, a legend.
pub fn grouped_bars(path: &Path, title: &str, groups: &[String], series: &[(String, Vec<f64>)]) {
    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE).expect("draw");
    let max = series
        .iter()
        .flat_map(|s| s.1.iter().copied())
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max)
        .max(1e-9)
        * 1.2;
    let n = series.len().max(1);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..groups.len() as f64, 0.0..max)
        .expect("chart");
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(groups.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 0.01 {
                groups.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .draw()
        .expect("mesh");
    let width = 0.8 / n as f64;
    for (k, (name, values)) in series.iter().enumerate() {
        let color = Palette99::pick(k);
        chart
            .draw_series(
                values
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| v.is_finite())
                    .map(|(g, v)| {
                        let x0 = g as f64 + 0.1 + k as f64 * width;
                        Rectangle::new([(x0, 0.0), (x0 + width * 0.9, *v)], color.filled())
                    }),
            )
            .expect("bars")
            .label(name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .expect("legend");
    root.present().expect("write chart");
}
