//! Collects the figures and writes them as a Markdown table (and plots).

use std::fmt::Write;

pub struct Row {
    pub what: String,
    pub ours: String,
    pub machine: String,
    pub ratio: f64,
    pub target: String,
}

#[derive(Default)]
pub struct Report {
    pub rows: Vec<Row>,
    pub notes: Vec<String>,
    /// Extra files (name, contents), e.g. SVG plots.
    pub files: Vec<(String, String)>,
}

impl Report {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn row(&mut self, what: &str, ours: String, machine: String, ratio: f64, target: &str) {
        self.rows.push(Row {
            what: what.into(),
            ours,
            machine,
            ratio,
            target: target.into(),
        });
    }

    pub fn note(&mut self, note: String) {
        println!("{note}");
        self.notes.push(note);
    }

    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let host = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| {
                c.lines()
                    .find(|l| l.starts_with("model name"))
                    .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
            })
            .unwrap_or_default();
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0);
        let _ = writeln!(
            out,
            "Run {} on {cores} cores ({host}).\n",
            chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
        );
        out.push_str("| measure | order-service | machine's own limit, same run | ratio | target |\n|---|---|---|---|---|\n");
        for r in &self.rows {
            let ratio = if r.ratio.is_finite() {
                format!("{:.2}", r.ratio)
            } else {
                "-".into()
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} |",
                r.what, r.ours, r.machine, ratio, r.target
            );
        }
        if !self.notes.is_empty() {
            out.push('\n');
            for n in &self.notes {
                let _ = writeln!(out, "- {n}");
            }
        }
        out
    }

    /// Writes `bench-results/` (or `BENCH_RESULTS_DIR`, for smoke runs that
    /// must not replace the recorded figures).
    pub fn write(&self) -> anyhow::Result<()> {
        let dir = std::env::var_os("BENCH_RESULTS_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("bench-results")
            });
        std::fs::create_dir_all(&dir)?;
        let md = self.markdown();
        println!("\n{md}");
        std::fs::write(dir.join("latest.md"), &md)?;
        for (name, contents) in &self.files {
            std::fs::write(dir.join(name), contents)?;
        }
        println!("written to {}", dir.display());
        Ok(())
    }
}

/// An SVG with two panels: the latency distributions (CDF) from the order's
/// commit to billing and to the payment-confirmed mail, and orders
/// accepted, charged and mailed per second.
pub fn plot(r: &crate::e2e::StepResult) -> String {
    let (w, h, pad) = (900.0, 320.0, 50.0);
    let mut svg = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{}' height='{}' font-family='sans-serif' font-size='12'>\
         <rect width='100%' height='100%' fill='white'/>",
        w * 2.0,
        h
    );
    // Panel 1: CDFs of latency, log-free, x up to the larger p99.9.
    let curves = [(&r.billing, "steelblue"), (&r.mail, "seagreen")];
    let xmax = curves
        .iter()
        .map(|(l, _)| crate::setup::percentile(&l.values, 99.9))
        .filter(|v| v.is_finite())
        .fold(1.0, f64::max);
    let _ = write!(
        svg,
        "<text x='{}' y='20'>latency at {}/s, CDF: commit to billing (blue, p50 {:.1} ms, p99 {:.1} ms), \
         to payment-confirmed mail (green, p50 {:.1} ms, p99 {:.1} ms)</text>",
        pad, r.offered, r.billing.p50_ms, r.billing.p99_ms, r.mail.p50_ms, r.mail.p99_ms
    );
    for (latencies, color) in curves {
        let lat = &latencies.values;
        let mut points = String::new();
        for (i, v) in lat.iter().enumerate().step_by((lat.len() / 400).max(1)) {
            let x = pad + (v / xmax).min(1.0) * (w - 2.0 * pad);
            let y = h - pad - (i as f64 / lat.len() as f64) * (h - 2.0 * pad);
            let _ = write!(points, "{x:.1},{y:.1} ");
        }
        let _ = write!(
            svg,
            "<polyline fill='none' stroke='{color}' stroke-width='2' points='{points}'/>"
        );
    }
    axes(&mut svg, pad, w, h, &format!("{xmax:.0} ms"), "100%", 0.0);
    // Panel 2: throughput over time.
    let ymax = r
        .timeline
        .iter()
        .map(|t| t.1.max(t.2).max(t.3))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let n = r.timeline.len().max(2) as f64 - 1.0;
    let _ = write!(
        svg,
        "<text x='{}' y='20'>orders per second: accepted (blue), charged by billing (orange), \
         payment-confirmed mails (green)</text>",
        w + pad
    );
    for (idx, color) in [(1usize, "steelblue"), (2, "darkorange"), (3, "seagreen")] {
        let mut points = String::new();
        for (i, t) in r.timeline.iter().enumerate() {
            let v = match idx {
                1 => t.1,
                2 => t.2,
                _ => t.3,
            } as f64;
            let x = w + pad + (i as f64 / n) * (w - 2.0 * pad);
            let y = h - pad - (v / ymax) * (h - 2.0 * pad);
            let _ = write!(points, "{x:.1},{y:.1} ");
        }
        let _ = write!(
            svg,
            "<polyline fill='none' stroke='{color}' stroke-width='2' points='{points}'/>"
        );
    }
    axes(
        &mut svg,
        pad,
        w,
        h,
        &format!("{} s", r.timeline.len().saturating_sub(1)),
        &format!("{ymax:.0}/s"),
        w,
    );
    svg.push_str("</svg>\n");
    svg
}

fn axes(svg: &mut String, pad: f64, w: f64, h: f64, xlabel: &str, ylabel: &str, offset: f64) {
    let _ = write!(
        svg,
        "<line x1='{x0}' y1='{y0}' x2='{x1}' y2='{y0}' stroke='black'/>\
         <line x1='{x0}' y1='{y0}' x2='{x0}' y2='{pad}' stroke='black'/>\
         <text x='{x1}' y='{ty}' text-anchor='end'>{xlabel}</text>\
         <text x='{tx}' y='{pad}' text-anchor='end'>{ylabel}</text>\
         <text x='{x0}' y='{ty}'>0</text>",
        x0 = offset + pad,
        x1 = offset + w - pad,
        y0 = h - pad,
        ty = h - pad + 15.0,
        tx = offset + pad - 5.0,
    );
}
