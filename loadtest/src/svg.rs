//! Hand-written SVG line charts: no plotting crate, just text. Used for the
//! latency percentile distribution (percentile on a log(1/(1-p)) axis,
//! latency on a log axis) and the ramp curve.

use std::fmt::Write;

/// One line of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend text.
    pub label: String,
    /// Stroke colour.
    pub color: String,
    /// Points in data coordinates.
    pub points: Vec<(f64, f64)>,
    /// Draw a dot at every point.
    pub markers: bool,
}

/// How an axis maps and labels values.
#[derive(Debug, Clone)]
pub struct Axis {
    /// Axis title.
    pub label: String,
    /// Logarithmic (base 10); values <= 0 are dropped.
    pub log: bool,
    /// Fixed ticks (value, label); automatic when empty.
    pub ticks: Vec<(f64, String)>,
}

impl Axis {
    /// A linear axis with automatic ticks.
    pub fn linear(label: &str) -> Self {
        Axis {
            label: label.into(),
            log: false,
            ticks: Vec::new(),
        }
    }

    /// A log axis with decade ticks.
    pub fn log(label: &str) -> Self {
        Axis {
            log: true,
            ..Self::linear(label)
        }
    }
}

/// Colours of the two systems.
pub const FLOWGATE: &str = "#1f77b4";
/// Colour of the baseline.
pub const BASELINE: &str = "#d62728";

const W: f64 = 760.0;
const H: f64 = 440.0;
const L: f64 = 80.0;
const R: f64 = 36.0;
const T: f64 = 50.0;
const B: f64 = 60.0;

fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{}M", trim(v / 1e6))
    } else if a >= 1e3 {
        format!("{}k", trim(v / 1e3))
    } else {
        trim(v)
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() || s == "-0" {
        "0".into()
    } else {
        s.into()
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

struct Scale {
    log: bool,
    lo: f64,
    hi: f64,
    a: f64,
    b: f64,
}

impl Scale {
    fn t(&self, v: f64) -> f64 {
        if self.log {
            v.log10()
        } else {
            v
        }
    }
    fn map(&self, v: f64) -> f64 {
        let x = (self.t(v) - self.lo) / (self.hi - self.lo).max(1e-12);
        self.a + x * (self.b - self.a)
    }
}

fn scale(axis: &Axis, values: &[f64], a: f64, b: f64, zero: bool) -> (Scale, Vec<(f64, String)>) {
    let vals: Vec<f64> = values
        .iter()
        .copied()
        .filter(|v| v.is_finite() && (!axis.log || *v > 0.0))
        .map(|v| if axis.log { v.log10() } else { v })
        .collect();
    let mut lo = vals.iter().copied().fold(f64::INFINITY, f64::min);
    let mut hi = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    for (v, _) in &axis.ticks {
        let v = if axis.log { v.log10() } else { *v };
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    if zero && !axis.log {
        lo = lo.min(0.0);
    }
    let ticks = if !axis.ticks.is_empty() {
        axis.ticks.clone()
    } else if axis.log {
        lo = lo.floor();
        hi = hi.ceil().max(lo + 1.0);
        (lo as i32..=hi as i32)
            .map(|k| (10f64.powi(k), fmt_num(10f64.powi(k))))
            .collect()
    } else {
        let span = (hi - lo).max(1e-9);
        let raw = span / 6.0;
        let mag = 10f64.powf(raw.log10().floor());
        let step = [1.0, 2.0, 5.0, 10.0]
            .iter()
            .map(|m| m * mag)
            .find(|s| span / s <= 7.0)
            .unwrap_or(10.0 * mag);
        lo = (lo / step).floor() * step;
        hi = (hi / step).ceil() * step;
        if hi <= lo {
            hi = lo + step;
        }
        let mut t = Vec::new();
        let mut v = lo;
        while v <= hi + step * 1e-6 {
            t.push((v, fmt_num(v)));
            v += step;
        }
        t
    };
    (
        Scale {
            log: axis.log,
            lo,
            hi,
            a,
            b,
        },
        ticks,
    )
}

/// A line chart as an SVG document; `hline` draws a dashed horizontal
/// reference line (value, label).
pub fn line_chart(
    title: &str,
    x: &Axis,
    y: &Axis,
    series: &[Series],
    hline: Option<(f64, &str)>,
) -> String {
    let xs: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .collect();
    let mut ys: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .collect();
    if let Some((v, _)) = hline {
        ys.push(v);
    }
    let (sx, xticks) = scale(x, &xs, L, W - R, false);
    let (sy, yticks) = scale(y, &ys, H - B, T, true);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
        W / 2.0,
        esc(title)
    );
    for (v, label) in &xticks {
        let px = sx.map(*v);
        let _ = writeln!(
            s,
            r##"<line x1="{px:.1}" y1="{T}" x2="{px:.1}" y2="{}" stroke="#e5e5e5"/><text x="{px:.1}" y="{}" text-anchor="middle">{}</text>"##,
            H - B,
            H - B + 18.0,
            esc(label)
        );
    }
    for (v, label) in &yticks {
        let py = sy.map(*v);
        let _ = writeln!(
            s,
            r##"<line x1="{L}" y1="{py:.1}" x2="{}" y2="{py:.1}" stroke="#e5e5e5"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            W - R,
            L - 6.0,
            py + 4.0,
            esc(label)
        );
    }
    let _ = writeln!(
        s,
        r##"<rect x="{L}" y="{T}" width="{}" height="{}" fill="none" stroke="#333"/>"##,
        W - L - R,
        H - T - B
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        (L + W - R) / 2.0,
        H - 16.0,
        esc(&x.label)
    );
    let _ = writeln!(
        s,
        r#"<text x="18" y="{0}" text-anchor="middle" transform="rotate(-90 18 {0})">{1}</text>"#,
        (T + H - B) / 2.0,
        esc(&y.label)
    );
    if let Some((v, label)) = hline {
        let py = sy.map(v);
        let _ = writeln!(
            s,
            r##"<line x1="{L}" y1="{py:.1}" x2="{}" y2="{py:.1}" stroke="#555" stroke-dasharray="6 4"/><text x="{}" y="{:.1}" text-anchor="end" fill="#555">{}</text>"##,
            W - R,
            W - R - 4.0,
            py - 5.0,
            esc(label)
        );
    }
    for (k, se) in series.iter().enumerate() {
        let pts: Vec<String> = se
            .points
            .iter()
            .filter(|(px, py)| (!x.log || *px > 0.0) && (!y.log || *py > 0.0))
            .map(|(px, py)| format!("{:.1},{:.1}", sx.map(*px), sy.map(*py)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>"#,
            se.color,
            pts.join(" ")
        );
        if se.markers {
            for p in &pts {
                let (cx, cy) = p.split_once(',').unwrap_or(("0", "0"));
                let _ = writeln!(
                    s,
                    r#"<circle cx="{cx}" cy="{cy}" r="3.5" fill="{}"/>"#,
                    se.color
                );
            }
        }
        let ly = T + 18.0 + 18.0 * k as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
            L + 12.0,
            L + 36.0,
            se.color,
            L + 42.0,
            ly + 4.0,
            esc(&se.label)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// The latency percentile distribution of several runs: `(label, colour,
/// (percentile, ms) points)`.
pub fn latency_chart(title: &str, runs: &[(String, String, Vec<[f64; 2]>)]) -> String {
    let to_x = |p: f64| -(1.0 - p / 100.0).max(1e-6).log10();
    let series: Vec<Series> = runs
        .iter()
        .map(|(label, color, pts)| Series {
            label: label.clone(),
            color: color.clone(),
            points: pts.iter().map(|[p, ms]| (to_x(*p), *ms)).collect(),
            markers: false,
        })
        .collect();
    let ticks = [
        (0.0, "0%"),
        (1.0, "90%"),
        (2.0, "99%"),
        (3.0, "99.9%"),
        (4.0, "99.99%"),
        (5.0, "99.999%"),
    ]
    .iter()
    .map(|(v, l)| (*v, l.to_string()))
    .collect();
    line_chart(
        title,
        &Axis {
            label: "percentile".into(),
            log: false,
            ticks,
        },
        &Axis::log("end-to-end latency (ms)"),
        &series,
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_svg_documents() {
        let s = latency_chart(
            "latency",
            &[(
                "flowgate".into(),
                FLOWGATE.into(),
                vec![[0.0, 0.3], [90.0, 1.0], [99.0, 3.0], [99.9, 9.0]],
            )],
        );
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert!(s.contains("<polyline") && s.contains("99.9%"));
        let r = line_chart(
            "ramp",
            &Axis::linear("delivered/s"),
            &Axis::log("p99 ms"),
            &[Series {
                label: "a & b".into(),
                color: BASELINE.into(),
                points: vec![(1000.0, 2.0), (5000.0, 150.0)],
                markers: true,
            }],
            Some((100.0, "100 ms")),
        );
        assert!(r.contains("<circle") && r.contains("a &amp; b"));
    }
}
