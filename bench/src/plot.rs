//! SVG plots: latency by percentile (several runs overlaid) and, for sweeps,
//! latency against throughput.
//!
//! The percentile axis is in "nines": x = -log10(1 - p), so 90%, 99%, 99.9%
//! are evenly spaced and the tail gets as much room as the median. Latency
//! is on a log axis so an echo floor of tens of microseconds and a server's
//! milliseconds fit on one plot.

use crate::report::{RunReport, SweepPoint};
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

fn nines(percentile: f64) -> f64 {
    let rest = (1.0 - percentile / 100.0).max(1e-9);
    -rest.log10()
}

fn nines_label(x: &f64) -> String {
    if *x < 0.5 {
        return "0%".into();
    }
    let p = 100.0 * (1.0 - 10f64.powf(-x));
    let digits = (x.round() as usize).saturating_sub(2);
    format!("{p:.digits$}%")
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing the plot: {e:?}")
}

/// (label, points) of one curve.
type Series = (String, Vec<(f64, f64)>);

/// Latency-by-percentile curves of `op` ("all" for all operations) of each
/// report, overlaid.
pub fn distribution_plot(reports: &[RunReport], op: &str, out: &Path) -> Result<()> {
    let series: Vec<Series> = reports
        .iter()
        .filter_map(|r| {
            let o = if op == "all" { Some(&r.all) } else { r.ops.get(op) }?;
            let pts: Vec<(f64, f64)> = o.distribution.iter().map(|&(p, us)| (nines(p), us.max(0.1))).collect();
            (!pts.is_empty()).then(|| (format!("{} ({} {:.0} ops/s)", r.label, r.workload, r.ops_per_sec), pts))
        })
        .collect();
    if series.is_empty() {
        return Err(anyhow!("no '{op}' latencies in the given results"));
    }
    let x_max = series.iter().flat_map(|(_, p)| p.iter().map(|q| q.0)).fold(1.0f64, f64::max).ceil();
    let y_min = series.iter().flat_map(|(_, p)| p.iter().map(|q| q.1)).fold(f64::MAX, f64::min) * 0.8;
    let y_max = series.iter().flat_map(|(_, p)| p.iter().map(|q| q.1)).fold(0.0f64, f64::max) * 1.3;
    let root = SVGBackend::new(out, (1000, 620)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("Latency by percentile ({op})"), ("sans-serif", 22))
        .margin(15)
        .margin_right(45)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max, (y_min.max(0.1)..y_max.max(1.0)).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (us)")
        .x_labels(x_max as usize + 1)
        .x_label_formatter(&nines_label)
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()
        .map_err(err)?;
    for (i, (label, pts)) in series.into_iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(err)?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// Latency (p50, p99, p99.9) against achieved throughput for each report's
/// sweep.
pub fn sweep_plot(reports: &[RunReport], out: &Path) -> Result<()> {
    let runs: Vec<&RunReport> = reports.iter().filter(|r| !r.sweep.is_empty()).collect();
    if runs.is_empty() {
        return Err(anyhow!("no sweep in the given results"));
    }
    let pts = runs.iter().flat_map(|r| r.sweep.iter());
    let x_max = pts.clone().map(|p| p.ops_per_sec).fold(1.0f64, f64::max) * 1.05;
    let y_min = pts.clone().map(|p| p.p50_us).fold(f64::MAX, f64::min).max(0.1) * 0.8;
    let y_max = pts.map(|p| p.p999_us).fold(1.0f64, f64::max) * 1.3;
    let root = SVGBackend::new(out, (1000, 620)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Latency against throughput (open loop)", ("sans-serif", 22))
        .margin(15)
        .margin_right(45)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max, (y_min..y_max).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("achieved ops/s")
        .y_desc("latency (us)")
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()
        .map_err(err)?;
    for (i, r) in runs.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        for (name, width) in [("p50", 1), ("p99", 2), ("p99.9", 3)] {
            let f = |p: &SweepPoint| match width {
                1 => p.p50_us,
                2 => p.p99_us,
                _ => p.p999_us,
            };
            let line: Vec<(f64, f64)> = r.sweep.iter().map(|p| (p.ops_per_sec, f(p).max(0.1))).collect();
            chart
                .draw_series(LineSeries::new(line.clone(), color.stroke_width(width)))
                .map_err(err)?
                .label(format!("{} {name}", r.label))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(width)));
            chart.draw_series(line.into_iter().map(|p| Circle::new(p, 2 + width, color.filled()))).map_err(err)?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::OpReport;

    #[test]
    fn nines_axis() {
        assert!((nines(90.0) - 1.0).abs() < 1e-9);
        assert!((nines(99.9) - 3.0).abs() < 1e-9);
        assert_eq!(nines_label(&0.0), "0%");
        assert_eq!(nines_label(&2.0), "99%");
        assert_eq!(nines_label(&4.0), "99.99%");
    }

    #[test]
    fn plots_are_written_as_svg() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = RunReport { label: "echo".into(), workload: "c".into(), ..Default::default() };
        a.all = OpReport {
            distribution: vec![(0.0, 10.0), (90.0, 15.0), (99.0, 30.0), (99.9, 80.0)],
            ..Default::default()
        };
        let mut b = a.clone();
        b.label = "ringkv".into();
        b.all.distribution = vec![(0.0, 40.0), (90.0, 60.0), (99.0, 200.0)];
        b.sweep = vec![
            SweepPoint {
                target_ops_per_sec: 100.0,
                ops_per_sec: 99.0,
                p50_us: 40.0,
                p99_us: 90.0,
                p999_us: 150.0,
                max_us: 200.0,
                errors: 0,
            },
            SweepPoint {
                target_ops_per_sec: 200.0,
                ops_per_sec: 198.0,
                p50_us: 45.0,
                p99_us: 120.0,
                p999_us: 400.0,
                max_us: 500.0,
                errors: 0,
            },
        ];
        let p = dir.path().join("d.svg");
        distribution_plot(&[a.clone(), b.clone()], "all", &p).unwrap();
        let svg = std::fs::read_to_string(&p).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("ringkv (c") && svg.contains("99.9%"), "{}", &svg[..200]);
        let p = dir.path().join("s.svg");
        sweep_plot(&[a, b], &p).unwrap();
        assert!(std::fs::read_to_string(&p).unwrap().contains("ringkv p99.9"));
        assert!(distribution_plot(&[], "all", &p).is_err());
    }
}
