//! SVG plots: latency by percentile and, for sweeps, latency against
//! throughput.
//!
//! Each plot is a grid of panels, one per workload (rows) and load level
//! (columns: closed loop first, then open-loop rates in increasing order),
//! so only runs under the same load share axes. A system (a run's label)
//! keeps one colour in every panel, and a single legend sits beside the
//! grid, never over a curve.
//!
//! The percentile axis is in "nines": x = -log10(1 - p), so 90%, 99%, 99.9%
//! are evenly spaced and the tail gets as much room as the median. Latency
//! is on a log axis so an echo floor of tens of microseconds and a server's
//! milliseconds fit in one panel.

use crate::report::{RunReport, SweepPoint};
use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

/// Colours that stay apart for most kinds of colour vision (the "tab10"
/// set, then two more). Systems past the last one repeat them dashed.
const COLORS: [RGBColor; 12] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
    RGBColor(0, 0, 0),
    RGBColor(255, 187, 120),
];

const PANEL_W: u32 = 520;
const PANEL_H: u32 = 360;
const LEGEND_W: u32 = 250;
const TITLE_H: u32 = 40;
/// Longest system name the legend shows whole.
const LEGEND_CHARS: usize = 30;

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

/// A log axis from a round number (1, 2 or 5 times a power of ten) at or
/// below `lo` to one at or above `hi`, so its labels are round too.
fn log_bounds(lo: f64, hi: f64) -> (f64, f64) {
    let lo = lo.max(0.1);
    let hi = hi.max(lo * 1.01);
    let round = |v: f64, up: bool| {
        let p = 10f64.powf(v.log10().floor());
        let steps = [1.0, 2.0, 5.0, 10.0];
        if up {
            steps.iter().map(|s| s * p).find(|&x| x >= v * (1.0 - 1e-9)).unwrap_or(10.0 * p)
        } else {
            steps.iter().rev().map(|s| s * p).find(|&x| x <= v * (1.0 + 1e-9)).unwrap_or(p)
        }
    };
    (round(lo, false), round(hi, true))
}

fn us_label(y: &f64) -> String {
    if *y >= 10.0 {
        format!("{y:.0}")
    } else {
        format!("{y:.1}")
    }
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing the plot: {e:?}")
}

/// How system `i` is drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Look {
    color: RGBColor,
    dashed: bool,
}

fn look(i: usize) -> Look {
    Look { color: COLORS[i % COLORS.len()], dashed: i >= COLORS.len() }
}

/// The systems of `reports` (their labels), in order of first appearance:
/// a system's index is its colour.
fn systems(reports: &[&RunReport]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in reports {
        if !out.contains(&r.label) {
            out.push(r.label.clone());
        }
    }
    out
}

/// The load level a run was measured at: its panel's column.
#[derive(Debug, Clone, PartialEq, PartialOrd)]
enum Load {
    Closed,
    Open(f64),
    Sweep,
}

impl Load {
    fn of(r: &RunReport) -> Load {
        match (r.mode.as_str(), r.rate) {
            ("sweep", _) => Load::Sweep,
            (_, Some(rate)) => Load::Open(rate.round()),
            _ => Load::Closed,
        }
    }

    fn describe(&self) -> String {
        match self {
            Load::Closed => "closed loop".into(),
            Load::Open(rate) => format!("open loop at {rate:.0} ops/s"),
            Load::Sweep => "sweep (last rate)".into(),
        }
    }
}

/// One panel: one workload at one load level.
#[derive(Debug)]
struct Panel<'a> {
    workload: String,
    load: Load,
    runs: Vec<&'a RunReport>,
}

/// Groups runs into panels, rows by workload in order of first appearance,
/// columns by load (closed loop, then rising open-loop rates).
fn panels<'a>(reports: &[&'a RunReport], by_load: bool) -> Vec<Vec<Panel<'a>>> {
    let mut rows: Vec<Vec<Panel<'a>>> = Vec::new();
    for &r in reports {
        let load = if by_load { Load::of(r) } else { Load::Sweep };
        let row = match rows.iter().position(|row| row[0].workload == r.workload) {
            Some(i) => &mut rows[i],
            None => {
                rows.push(Vec::new());
                rows.last_mut().expect("just pushed")
            }
        };
        match row.iter_mut().find(|p| p.load == load) {
            Some(p) => p.runs.push(r),
            None => row.push(Panel { workload: r.workload.clone(), load, runs: vec![r] }),
        }
    }
    for row in &mut rows {
        row.sort_by(|a, b| a.load.partial_cmp(&b.load).unwrap_or(std::cmp::Ordering::Equal));
    }
    rows
}

/// The drawing areas of a grid of panels and the legend beside it.
struct Canvas<'a> {
    cells: Vec<Vec<DrawingArea<SVGBackend<'a>, Shift>>>,
    legend: DrawingArea<SVGBackend<'a>, Shift>,
}

fn canvas<'a>(root: &DrawingArea<SVGBackend<'a>, Shift>, title: &str, rows: &[Vec<Panel<'_>>]) -> Result<Canvas<'a>> {
    root.fill(&WHITE).map_err(err)?;
    let (top, body) = root.split_vertically(TITLE_H);
    top.draw(&Text::new(title.to_string(), (15, 10), ("sans-serif", 22))).map_err(err)?;
    let cols = rows.iter().map(Vec::len).max().unwrap_or(1);
    let (grid, legend) = body.split_horizontally(cols as u32 * PANEL_W);
    let row_areas = grid.split_evenly((rows.len(), 1));
    let cells = row_areas
        .iter()
        .zip(rows)
        .map(|(area, row)| area.split_evenly((1, cols)).into_iter().take(row.len()).collect())
        .collect();
    Ok(Canvas { cells, legend })
}

fn canvas_size(rows: &[Vec<Panel<'_>>]) -> (u32, u32) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(1) as u32;
    (cols * PANEL_W + LEGEND_W, TITLE_H + rows.len() as u32 * PANEL_H)
}

/// A line of `look`'s style through `pts`.
fn line<DB: DrawingBackend, X, Y>(
    chart: &mut ChartContext<'_, DB, Cartesian2d<X, Y>>,
    pts: Vec<(f64, f64)>,
    look: Look,
    width: u32,
) -> Result<()>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    let style = look.color.stroke_width(width);
    if look.dashed {
        chart.draw_series(DashedLineSeries::new(pts, 8, 5, style)).map_err(err)?;
    } else {
        chart.draw_series(LineSeries::new(pts, style)).map_err(err)?;
    }
    Ok(())
}

fn short(name: &str) -> String {
    if name.chars().count() <= LEGEND_CHARS {
        return name.to_string();
    }
    let mut s: String = name.chars().take(LEGEND_CHARS - 1).collect();
    s.push('~');
    s
}

/// The legend: one entry per system, then `notes` (what line widths mean).
fn legend(area: &DrawingArea<SVGBackend<'_>, Shift>, systems: &[String], notes: &[(&str, u32)]) -> Result<()> {
    let text = ("sans-serif", 14);
    area.draw(&Text::new("systems", (10, 10), ("sans-serif", 16))).map_err(err)?;
    let mut y = 40;
    for (i, name) in systems.iter().enumerate() {
        let l = look(i);
        let style = l.color.stroke_width(3);
        if l.dashed {
            area.draw(&PathElement::new(vec![(10, y), (20, y)], style)).map_err(err)?;
            area.draw(&PathElement::new(vec![(26, y), (36, y)], style)).map_err(err)?;
        } else {
            area.draw(&PathElement::new(vec![(10, y), (36, y)], style)).map_err(err)?;
        }
        area.draw(&Text::new(short(name), (44, y - 8), text)).map_err(err)?;
        y += 22;
    }
    y += 12;
    for (note, width) in notes {
        area.draw(&PathElement::new(vec![(10, y), (36, y)], BLACK.stroke_width(*width))).map_err(err)?;
        area.draw(&Text::new(note.to_string(), (44, y - 8), text)).map_err(err)?;
        y += 22;
    }
    Ok(())
}

/// Latency-by-percentile curves of `op` ("all" for all operations), a
/// panel per workload and load level.
pub fn distribution_plot(reports: &[RunReport], op: &str, out: &Path) -> Result<()> {
    let curve = |r: &RunReport| -> Option<Vec<(f64, f64)>> {
        let o = if op == "all" { Some(&r.all) } else { r.ops.get(op) }?;
        let pts: Vec<(f64, f64)> = o.distribution.iter().map(|&(p, us)| (nines(p), us.max(0.1))).collect();
        (!pts.is_empty()).then_some(pts)
    };
    let with_data: Vec<&RunReport> = reports.iter().filter(|r| curve(r).is_some()).collect();
    if with_data.is_empty() {
        return Err(anyhow!("no '{op}' latencies in the given results"));
    }
    let systems = systems(&with_data);
    let rows = panels(&with_data, true);
    // One percentile axis for all panels, so their tails line up.
    let x_max = with_data.iter().filter_map(|r| curve(r)).flatten().map(|q| q.0).fold(1.0f64, f64::max);
    let x_max = (x_max - 1e-6).ceil();
    let root = SVGBackend::new(out, canvas_size(&rows)).into_drawing_area();
    let c = canvas(&root, &format!("Latency by percentile ({op} operations)"), &rows)?;
    for (row, cells) in rows.iter().zip(&c.cells) {
        for (panel, cell) in row.iter().zip(cells) {
            let curves: Vec<(usize, Vec<(f64, f64)>)> = panel
                .runs
                .iter()
                .filter_map(|r| Some((systems.iter().position(|s| *s == r.label)?, curve(r)?)))
                .collect();
            let ys = curves.iter().flat_map(|(_, p)| p.iter().map(|q| q.1));
            let (y_min, y_max) = log_bounds(ys.clone().fold(f64::MAX, f64::min), ys.fold(0.0f64, f64::max));
            let mut chart = ChartBuilder::on(cell)
                .caption(format!("workload {}, {}", panel.workload, panel.load.describe()), ("sans-serif", 16))
                .margin(10)
                .x_label_area_size(38)
                .y_label_area_size(60)
                .build_cartesian_2d(0f64..x_max, (y_min..y_max).log_scale())
                .map_err(err)?;
            chart
                .configure_mesh()
                .x_desc("percentile")
                .y_desc("latency (us)")
                .x_labels(x_max as usize + 1)
                .x_label_formatter(&nines_label)
                .y_label_formatter(&us_label)
                .draw()
                .map_err(err)?;
            for (system, pts) in curves {
                line(&mut chart, pts, look(system), 2)?;
            }
        }
    }
    legend(&c.legend, &systems, &[])?;
    root.present().map_err(err)?;
    Ok(())
}

/// Latency (p50, p99, p99.9) against achieved throughput of each report's
/// sweep, a panel per workload.
pub fn sweep_plot(reports: &[RunReport], out: &Path) -> Result<()> {
    let runs: Vec<&RunReport> = reports.iter().filter(|r| !r.sweep.is_empty()).collect();
    if runs.is_empty() {
        return Err(anyhow!("no sweep in the given results"));
    }
    let systems = systems(&runs);
    let rows = panels(&runs, false);
    let root = SVGBackend::new(out, canvas_size(&rows)).into_drawing_area();
    let c = canvas(&root, "Latency against throughput (open loop)", &rows)?;
    let pick = |p: &SweepPoint, width: u32| match width {
        1 => p.p50_us,
        2 => p.p99_us,
        _ => p.p999_us,
    };
    for (row, cells) in rows.iter().zip(&c.cells) {
        for (panel, cell) in row.iter().zip(cells) {
            let pts = panel.runs.iter().flat_map(|r| r.sweep.iter());
            let x_max = pts.clone().map(|p| p.ops_per_sec).fold(1.0f64, f64::max) * 1.05;
            let (y_min, y_max) = log_bounds(
                pts.clone().map(|p| p.p50_us).fold(f64::MAX, f64::min),
                pts.map(|p| p.p999_us).fold(0.0f64, f64::max),
            );
            let mut chart = ChartBuilder::on(cell)
                .caption(format!("workload {}", panel.workload), ("sans-serif", 16))
                .margin(10)
                .margin_right(25)
                .x_label_area_size(38)
                .y_label_area_size(60)
                .build_cartesian_2d(0f64..x_max, (y_min..y_max).log_scale())
                .map_err(err)?;
            chart
                .configure_mesh()
                .x_desc("achieved ops/s")
                .y_desc("latency (us)")
                .x_labels(6)
                .y_label_formatter(&us_label)
                .draw()
                .map_err(err)?;
            for r in &panel.runs {
                let Some(system) = systems.iter().position(|s| *s == r.label) else { continue };
                let l = look(system);
                for width in [1, 2, 3] {
                    let pts: Vec<(f64, f64)> =
                        r.sweep.iter().map(|p| (p.ops_per_sec, pick(p, width).max(0.1))).collect();
                    line(&mut chart, pts.clone(), l, width)?;
                    chart
                        .draw_series(pts.into_iter().map(|p| Circle::new(p, 1 + width, l.color.filled())))
                        .map_err(err)?;
                }
            }
        }
    }
    legend(&c.legend, &systems, &[("p50", 1), ("p99", 2), ("p99.9", 3)])?;
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
        assert_eq!(log_bounds(32.0, 416.0), (20.0, 500.0));
        assert_eq!(log_bounds(10.0, 80.0), (10.0, 100.0));
        assert_eq!(log_bounds(0.01, 0.05), (0.1, 0.2), "never below 0.1 us");
        assert_eq!(log_bounds(7.0, 7.0).0, 5.0);
        assert_eq!(us_label(&2.0), "2.0");
        assert_eq!(us_label(&2000.0), "2000");
    }

    fn run(label: &str, workload: &str, rate: Option<f64>, base_us: f64) -> RunReport {
        let mut r = RunReport {
            label: label.into(),
            workload: workload.into(),
            mode: if rate.is_some() { "open".into() } else { "closed".into() },
            rate,
            ..Default::default()
        };
        r.all = OpReport {
            distribution: vec![(0.0, base_us), (90.0, base_us * 1.5), (99.0, base_us * 3.0), (99.9, base_us * 8.0)],
            ..Default::default()
        };
        r
    }

    #[test]
    fn panels_split_by_workload_and_load_and_colours_follow_systems() {
        let rs = [
            run("echo", "a", None, 10.0),
            run("ringkv", "a", None, 40.0),
            run("echo", "a", Some(3000.0), 12.0),
            run("ringkv", "a", Some(3000.0), 50.0),
            run("ringkv", "c", Some(800.0), 30.0),
            run("redis", "c", None, 20.0),
        ];
        let refs: Vec<&RunReport> = rs.iter().collect();
        let rows = panels(&refs, true);
        assert_eq!(rows.len(), 2, "a row per workload");
        assert_eq!(rows[0].iter().map(|p| p.load.clone()).collect::<Vec<_>>(), vec![Load::Closed, Load::Open(3000.0)]);
        assert_eq!(rows[0][1].runs.len(), 2);
        assert_eq!(rows[1].iter().map(|p| p.load.clone()).collect::<Vec<_>>(), vec![Load::Closed, Load::Open(800.0)]);
        assert_eq!(systems(&refs), vec!["echo", "ringkv", "redis"], "one colour each, in order of appearance");
        assert_ne!(look(0), look(1));
        assert_eq!(look(12).color, look(0).color);
        assert!(look(12).dashed && !look(11).dashed, "colours repeat only dashed");
        assert_eq!(short("a-rather-long-system-name-for-the-legend"), "a-rather-long-system-name-for~");
    }

    #[test]
    fn plots_are_written_as_svg() {
        let dir = tempfile::tempdir().unwrap();
        let a = run("echo", "c", None, 10.0);
        let mut b = run("ringkv", "c", Some(500.0), 40.0);
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
        assert!(svg.starts_with("<svg") && svg.contains("99.9%"), "{}", &svg[..200]);
        assert!(svg.contains("workload c, closed loop") && svg.contains("workload c, open loop at 500 ops/s"));
        assert!(svg.contains("\nringkv\n") && svg.contains("\necho\n"), "both systems in the legend");
        let p = dir.path().join("s.svg");
        sweep_plot(&[a, b], &p).unwrap();
        let svg = std::fs::read_to_string(&p).unwrap();
        assert!(svg.contains("\np99.9\n") && svg.contains("\nringkv\n"));
        assert!(distribution_plot(&[], "all", &p).is_err());
    }
}
