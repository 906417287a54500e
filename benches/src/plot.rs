//! Pictures of `rmem perf` results as SVG: a latency run as the distribution (a CDF per message
//! size and per run), a bandwidth run as rate by message size (one line per run). Several runs
//! in one picture compare them (rmem against a peer, one provider against the other).

use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::Report;

/// Why a picture could not be drawn.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("nothing to plot: the runs hold no {0} results")]
    Empty(&'static str),
    #[error("drawing {path}: {why}")]
    Draw { path: String, why: String },
}

/// One run and its name in the legend.
pub struct Series<'a> {
    pub label: String,
    pub report: &'a Report,
}

const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// The operation all runs share, for the title ("" when they differ).
fn common_op(series: &[Series<'_>]) -> &'static str {
    let first = series.first().map(|s| s.report.op);
    if series.iter().all(|s| Some(s.report.op) == first) {
        first.map_or("", |o| o.as_str())
    } else {
        ""
    }
}

fn draw_err(path: &Path) -> impl Fn(String) -> PlotError + '_ {
    move |why| PlotError::Draw {
        path: path.display().to_string(),
        why,
    }
}

/// Draws the runs into `path`: CDFs when they hold latency results, else bandwidth by size.
pub fn plot(series: &[Series<'_>], path: &Path) -> Result<(), PlotError> {
    let has_lat = series
        .iter()
        .any(|s| s.report.results.iter().any(|r| r.lat.is_some()));
    if has_lat {
        latency_cdf(series, path)
    } else {
        bandwidth(series, path)
    }
}

/// A line chart's layout: axes, ranges, legend corner, whether points are marked.
struct Lines<'a> {
    title: String,
    x_desc: &'a str,
    y_desc: &'a str,
    x: std::ops::Range<f64>,
    y: std::ops::Range<f64>,
    x_label: &'a dyn Fn(&f64) -> String,
    legend: SeriesLabelPosition,
    points: bool,
}

/// Draws `lines` (name, points), one color each, with a legend.
fn draw_lines(
    path: &Path,
    l: Lines<'_>,
    lines: &[(String, Vec<(f64, f64)>)],
) -> Result<(), PlotError> {
    let e = draw_err(path);
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(&l.title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(l.x, l.y)
        .map_err(|x| e(x.to_string()))?;
    chart
        .configure_mesh()
        .x_desc(l.x_desc)
        .y_desc(l.y_desc)
        .x_label_formatter(l.x_label)
        .draw()
        .map_err(|x| e(x.to_string()))?;
    for (i, (name, pts)) in lines.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))
            .map_err(|x| e(x.to_string()))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], c.stroke_width(2)));
        if l.points {
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, c.filled())))
                .map_err(|x| e(x.to_string()))?;
        }
    }
    chart
        .configure_series_labels()
        .position(l.legend)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|x| e(x.to_string()))?;
    root.present().map_err(|x| e(x.to_string()))
}

fn latency_cdf(series: &[Series<'_>], path: &Path) -> Result<(), PlotError> {
    let mut lines: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for s in series {
        for r in &s.report.results {
            if let Some(l) = &r.lat {
                if !l.cdf.is_empty() {
                    let name = format!("{} {} B", s.label, r.bytes);
                    lines.push((name, l.cdf.iter().map(|p| (p[0], p[1])).collect()));
                }
            }
        }
    }
    if lines.is_empty() {
        return Err(PlotError::Empty("latency"));
    }
    // The tail decides how far the axis goes; the 99.9th percentile keeps one outlier from
    // flattening every curve against the left edge.
    let x_max = lines
        .iter()
        .flat_map(|(_, pts)| pts.iter().filter(|p| p.1 <= 0.999).map(|p| p.0))
        .fold(1.0f64, f64::max)
        * 1.1;
    let layout = Lines {
        title: format!("rmem perf: {} latency distribution", common_op(series)),
        x_desc: "latency (us)",
        y_desc: "share of operations at or below",
        x: 0.0..x_max,
        y: 0.0..1.0,
        x_label: &|x| format!("{x:.1}"),
        legend: SeriesLabelPosition::LowerRight,
        points: false,
    };
    draw_lines(path, layout, &lines)
}

fn bandwidth(series: &[Series<'_>], path: &Path) -> Result<(), PlotError> {
    let lines: Vec<(String, Vec<(f64, f64)>)> = series
        .iter()
        .map(|s| {
            let pts = s
                .report
                .results
                .iter()
                .filter_map(|r| {
                    r.bw.as_ref()
                        .map(|b| ((r.bytes as f64).log2(), b.mib_per_sec))
                })
                .collect();
            (s.label.clone(), pts)
        })
        .filter(|(_, p): &(String, Vec<(f64, f64)>)| !p.is_empty())
        .collect();
    if lines.is_empty() {
        return Err(PlotError::Empty("bandwidth"));
    }
    let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 1.0f64);
    for (_, pts) in &lines {
        for &(x, y) in pts {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y1 = y1.max(y);
        }
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let layout = Lines {
        title: format!("rmem perf: {} bandwidth by message size", common_op(series)),
        x_desc: "message size (bytes)",
        y_desc: "MiB/s",
        // Sizes are drawn on a log2 axis and labelled in binary units.
        x: x0 - 0.5..x1 + 0.5,
        y: 0.0..y1 * 1.1,
        x_label: &|x| human_bytes(2f64.powf(x.round())),
        legend: SeriesLabelPosition::UpperLeft,
        points: true,
    };
    draw_lines(path, layout, &lines)
}

fn human_bytes(b: f64) -> String {
    match b {
        b if b >= (1 << 20) as f64 => format!("{}M", (b / (1 << 20) as f64).round()),
        b if b >= 1024.0 => format!("{}K", (b / 1024.0).round()),
        b => format!("{}", b.round()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BwStats, LatStats, PerfMode, PerfOp, SizeResult};

    fn report(op: PerfOp, results: Vec<SizeResult>) -> Report {
        Report {
            provider: "tcp".into(),
            device: "loopback".into(),
            op,
            mode: PerfMode::Lat,
            busy_poll: false,
            tx_depth: 1,
            clock: crate::ClockKind::Os,
            tsc_mhz: None,
            results,
            verified: None,
        }
    }

    fn lat(bytes: usize, base: f64) -> SizeResult {
        SizeResult {
            bytes,
            iters: 100,
            lat: Some(LatStats {
                min_us: base,
                max_us: base * 9.0,
                typical_us: base * 1.2,
                avg_us: base * 1.3,
                stdev_us: 1.0,
                p50_us: base * 1.2,
                p99_us: base * 3.0,
                p999_us: base * 5.0,
                cdf: vec![
                    [base, 0.0],
                    [base * 1.2, 0.5],
                    [base * 3.0, 0.99],
                    [base * 9.0, 1.0],
                ],
            }),
            bw: None,
        }
    }

    fn bw(bytes: usize, mib: f64) -> SizeResult {
        SizeResult {
            bytes,
            iters: 100,
            lat: None,
            bw: Some(BwStats {
                bytes_per_sec: mib * 1048576.0,
                mib_per_sec: mib,
                gbit_per_sec: mib * 8.0 / 1000.0,
                msg_rate_mpps: 0.1,
            }),
        }
    }

    #[test]
    fn latency_runs_draw_one_cdf_per_size_and_run_and_bandwidth_one_line_per_run() {
        let dir = std::env::temp_dir().join(format!("rmem-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = report(PerfOp::Read, vec![lat(8, 5.0), lat(4096, 8.0)]);
        let b = report(PerfOp::Read, vec![lat(8, 7.0)]);
        let path = dir.join("lat.svg");
        plot(
            &[
                Series {
                    label: "tcp".into(),
                    report: &a,
                },
                Series {
                    label: "verbs".into(),
                    report: &b,
                },
            ],
            &path,
        )
        .unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        for label in [
            "tcp 8 B",
            "tcp 4096 B",
            "verbs 8 B",
            "read latency distribution",
        ] {
            assert!(svg.contains(label), "{label} missing");
        }
        // Three curves in the first three colors, no fourth.
        for c in ["#1F77B4", "#FF7F0E", "#2CA02C"] {
            assert!(svg.contains(c), "no curve in {c}");
        }
        assert!(!svg.contains("#D62728"), "a fourth curve");

        let w = report(PerfOp::Write, vec![bw(4096, 900.0), bw(65536, 4000.0)]);
        let path = dir.join("bw.svg");
        plot(
            &[Series {
                label: "rmem".into(),
                report: &w,
            }],
            &path,
        )
        .unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("write bandwidth by message size"));
        assert!(svg.contains("64K"), "sizes labelled in binary units");

        let empty = report(PerfOp::Read, vec![]);
        assert!(matches!(
            plot(
                &[Series {
                    label: "x".into(),
                    report: &empty
                }],
                &dir.join("e.svg")
            ),
            Err(PlotError::Empty(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// A comparison of single figures: groups (one measure each) of bars (one tool each), as the
/// `benches/compare-*.sh` scripts write it for `rmem perf plot --bars`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Bars {
    pub title: String,
    pub groups: Vec<BarGroup>,
}

/// One measure: its name, unit, and each tool's figure (absent where a tool has none).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BarGroup {
    pub measure: String,
    pub unit: String,
    pub bars: Vec<(String, Option<f64>)>,
}

/// Draws one panel per measure, side by side, each with its own scale.
pub fn bars(b: &Bars, path: &Path) -> Result<(), PlotError> {
    if b.groups.is_empty() || b.groups.iter().all(|g| g.bars.is_empty()) {
        return Err(PlotError::Empty("figures"));
    }
    let e = draw_err(path);
    // Panels wide enough for every bar's label under it, at most three to a row.
    let most = b.groups.iter().map(|g| g.bars.len()).max().unwrap_or(1) as u32;
    let panel = (90 * most).max(420);
    let n = b.groups.len();
    let cols = if most > 4 { n.min(2) } else { n.min(3) };
    let rows = n.div_ceil(cols);
    let root =
        SVGBackend::new(path, (panel * cols as u32, 40 + 440 * rows as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let root = root
        .titled(&b.title, ("sans-serif", 22))
        .map_err(|x| e(x.to_string()))?;
    let panels = root.split_evenly((rows, cols));
    // One color per tool across panels, in order of first appearance.
    let mut tools: Vec<&str> = Vec::new();
    for g in &b.groups {
        for (t, _) in &g.bars {
            if !tools.contains(&t.as_str()) {
                tools.push(t);
            }
        }
    }
    for (g, area) in b.groups.iter().zip(&panels) {
        let top = g
            .bars
            .iter()
            .filter_map(|(_, v)| *v)
            .fold(0.0f64, f64::max)
            .max(1e-9)
            * 1.15;
        let n = g.bars.len().max(1);
        let mut chart = ChartBuilder::on(area)
            .caption(&g.measure, ("sans-serif", 15))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(72)
            .build_cartesian_2d((0..n).into_segmented(), 0.0..top)
            .map_err(|x| e(x.to_string()))?;
        let names: Vec<String> = g.bars.iter().map(|(t, _)| t.clone()).collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n)
            .x_label_formatter(&|x| match x {
                SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
                _ => String::new(),
            })
            .y_desc(g.unit.as_str())
            .y_label_formatter(&|y| {
                if top >= 100.0 {
                    format!("{y:.0}")
                } else if top >= 2.0 {
                    format!("{y:.1}")
                } else {
                    format!("{y:.2}")
                }
            })
            .draw()
            .map_err(|x| e(x.to_string()))?;
        for (i, (tool, v)) in g.bars.iter().enumerate() {
            let Some(v) = v else { continue };
            let k = tools.iter().position(|t| t == tool).unwrap_or(0);
            let c = COLORS[k % COLORS.len()];
            let mut bar = Rectangle::new(
                [
                    (SegmentValue::Exact(i), 0.0),
                    (SegmentValue::Exact(i + 1), *v),
                ],
                c.filled(),
            );
            bar.set_margin(0, 0, 12, 12);
            chart
                .draw_series(std::iter::once(bar))
                .map_err(|x| e(x.to_string()))?;
            chart
                .draw_series(std::iter::once(Text::new(
                    format!("{v:.2}"),
                    (SegmentValue::CenterOf(i), *v + top * 0.04),
                    TextStyle::from(("sans-serif", 13).into_font())
                        .pos(Pos::new(HPos::Center, VPos::Bottom)),
                )))
                .map_err(|x| e(x.to_string()))?;
        }
    }
    root.present().map_err(|x| e(x.to_string()))
}

#[cfg(test)]
mod bar_tests {
    use super::*;

    #[test]
    fn one_panel_per_measure_one_bar_per_tool_with_its_figure() {
        let path = std::env::temp_dir().join(format!("rmem-bars-{}.svg", std::process::id()));
        let b = Bars {
            title: "rmem against qperf".into(),
            groups: vec![
                BarGroup {
                    measure: "4 KiB READ p50".into(),
                    unit: "us".into(),
                    bars: vec![("rmem".into(), Some(9.25)), ("qperf".into(), Some(12.5))],
                },
                BarGroup {
                    measure: "64 KiB WRITE".into(),
                    unit: "GB/s".into(),
                    bars: vec![("rmem".into(), Some(4.1)), ("qperf".into(), None)],
                },
            ],
        };
        bars(&b, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        for t in [
            "rmem against qperf",
            "4 KiB READ p50",
            "64 KiB WRITE",
            "9.25",
            "12.50",
            "4.10",
        ] {
            assert!(svg.contains(t), "{t} missing");
        }
        let _ = std::fs::remove_file(&path);
        let none = Bars {
            title: "x".into(),
            groups: vec![],
        };
        assert!(matches!(bars(&none, &path), Err(PlotError::Empty(_))));
    }
}
