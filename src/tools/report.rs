//! The `pgdelta bench --report` page: one self-contained HTML file with inline SVG charts drawn
//! by plotters, readable offline.

use plotters::prelude::*;

use super::bench::BenchReport;

const COLORS: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
];

type Series = (String, Vec<(f32, f32)>);

/// A line chart of several series as an SVG string.
fn line_chart(title: &str, x_desc: &str, y_desc: &str, series: &[Series]) -> String {
    let mut svg = String::new();
    let max_x = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.0))
        .fold(0.0f32, f32::max)
        .max(0.001);
    let max_y = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.1))
        .fold(0.0f32, f32::max)
        .max(0.001);
    let draw = |svg: &mut String| -> Option<()> {
        let root = SVGBackend::with_string(svg, (760, 340)).into_drawing_area();
        root.fill(&WHITE).ok()?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(70)
            .build_cartesian_2d(0f32..max_x * 1.02, 0f32..max_y * 1.08)
            .ok()?;
        let _ = chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .light_line_style(RGBColor(235, 235, 235))
            .draw();
        for (i, (name, pts)) in series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            if let Ok(s) =
                chart.draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            {
                s.label(name.as_str()).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
            }
        }
        let _ = chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw();
        root.present().ok()
    };
    let _ = draw(&mut svg);
    svg
}

/// Bars: each scenario's time next to its baseline's.
fn bars(report: &BenchReport) -> String {
    let mut svg = String::new();
    let n = report.scenarios.len().max(1);
    let max_y = report
        .scenarios
        .iter()
        .map(|s| s.wall_s.max(s.baseline_s) as f32)
        .fold(0.0f32, f32::max)
        .max(0.001);
    let draw = |svg: &mut String| -> Option<()> {
        let root = SVGBackend::with_string(svg, (760, 340)).into_drawing_area();
        root.fill(&WHITE).ok()?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "median seconds: pgdelta (blue) against its baseline (orange)",
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(70)
            .build_cartesian_2d(0f32..n as f32, 0f32..max_y * 1.15)
            .ok()?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_desc("seconds")
            .draw()
            .ok()?;
        for (i, s) in report.scenarios.iter().enumerate() {
            let x = i as f32;
            let _ = chart.draw_series([
                Rectangle::new(
                    [(x + 0.15, 0.0), (x + 0.48, s.wall_s as f32)],
                    COLORS[0].filled(),
                ),
                Rectangle::new(
                    [(x + 0.52, 0.0), (x + 0.85, s.baseline_s as f32)],
                    COLORS[1].filled(),
                ),
            ]);
            let _ = chart.draw_series(std::iter::once(Text::new(
                s.label(),
                (x + 0.3, max_y * 1.12),
                ("sans-serif", 14),
            )));
            let _ = chart.draw_series(std::iter::once(Text::new(
                format!("{:.2}x", s.ratio),
                (
                    x + 0.3,
                    s.wall_s.max(s.baseline_s) as f32 * 1.03 + max_y * 0.02,
                ),
                ("sans-serif", 14),
            )));
        }
        root.present().ok()
    };
    let _ = draw(&mut svg);
    svg
}

fn timeline(
    report: &BenchReport,
    pick: impl Fn(&serde_json::Value) -> Vec<(f32, f32)>,
) -> Vec<Series> {
    report
        .scenarios
        .iter()
        .filter_map(|s| {
            let summary = s.reps.iter().find_map(|r| r.summary.as_ref())?;
            Some((s.label(), pick(summary)))
        })
        .filter(|(_, pts)| !pts.is_empty())
        .collect()
}

fn triples(v: &serde_json::Value, key: &str, field: usize) -> Vec<(f32, f32)> {
    v[key]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| Some((e[0].as_f64()? as f32, e[field].as_f64()? as f32)))
                .collect()
        })
        .unwrap_or_default()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The whole report page.
pub(super) fn html(report: &BenchReport) -> String {
    let mut rows = String::new();
    for s in &report.scenarios {
        rows.push_str(&format!(
            "<tr><td>{}</td><td>{:.2}s</td><td>{}</td><td>{:.2}s</td><td>{:.3}x</td><td>{}</td><td>{} MiB</td><td>{:.1}s</td></tr>\n",
            s.label(),
            s.wall_s,
            escape(&s.baseline),
            s.baseline_s,
            s.ratio,
            match (s.target_ratio, s.meets_target) {
                (Some(t), Some(true)) => format!("&le; {t}x: met"),
                (Some(t), _) => format!("&le; {t}x: <b>missed</b>"),
                _ => "&ndash;".into(),
            },
            s.peak_rss_bytes >> 20,
            s.cpu_s
        ));
    }
    let read = timeline(report, |v| {
        triples(v, "read_timeline", 1)
            .into_iter()
            .map(|(t, rows)| (t, rows / 1e6))
            .collect()
    });
    let sizes = timeline(report, |v| triples(v, "batch_timeline", 1));
    let latency = timeline(report, |v| triples(v, "batch_timeline", 2));
    format!(
        r#"<!doctype html>
<html><head><meta charset="utf-8"><title>pgdelta bench</title>
<style>body{{font-family:sans-serif;max-width:820px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}</style></head><body>
<h1>pgdelta bench</h1>
<p>{rows} rows ({mib} MiB of binary COPY), {reps} repetitions, medians. Machine: {machine}. Server: {server}. pgdelta {version}.</p>
<table><tr><th>scenario</th><th>pgdelta</th><th>baseline</th><th>baseline time</th><th>ratio</th><th>target</th><th>peak RSS</th><th>CPU</th></tr>
{table}</table>
<h2>Against the baselines</h2>{bars}
<h2>Source rows read over time</h2>{read}
<h2>Batch size over time</h2>{sizes}
<h2>Batch commit latency over time</h2>{latency}
</body></html>
"#,
        rows = report.rows,
        mib = report.bytes >> 20,
        reps = report.reps,
        machine = escape(&report.machine),
        server = escape(&report.server),
        version = escape(&report.pgdelta_version),
        table = rows,
        bars = bars(report),
        read = line_chart("rows read (millions)", "seconds", "million rows", &read),
        sizes = line_chart("rows per batch", "seconds", "rows", &sizes),
        latency = line_chart("batch latency", "seconds", "ms", &latency),
    )
}
