//! 24-hour vitals charts as inline SVG, drawn on the server: no chart library, no script, and
//! they print. Each chart shows the 5-minute average as a line and the min–max range as a
//! band, with the normal range shaded; gaps of more than 15 minutes break the line (the
//! bracelet was off or not worn) instead of drawing a straight line across them.

use std::fmt::Write as _;

use chrono::{FixedOffset, TimeZone, Utc};

use crate::notify::templates::html_escape;

const W: f64 = 640.0;
const H: f64 = 170.0;
const LEFT: f64 = 40.0;
const RIGHT: f64 = 8.0;
const TOP: f64 = 10.0;
const BOTTOM: f64 = 22.0;
/// A gap longer than this breaks the line.
const GAP_MS: i64 = 15 * 60 * 1000;

/// One series of a chart: (bucket start ms, [min, avg, max]).
pub struct Series<'a> {
    pub points: Vec<(i64, [f64; 3])>,
    /// CSS class of the line and band (`s-hr`, `s-spo2`, ...).
    pub class: &'a str,
}

pub struct Chart<'a> {
    pub title: &'a str,
    pub unit: &'a str,
    pub series: Vec<Series<'a>>,
    /// The normal range, shaded.
    pub normal: Option<(f64, f64)>,
    /// The y range always shown (widened to fit the data).
    pub y_floor: (f64, f64),
    pub now_ms: i64,
    pub no_data: &'a str,
}

fn fmt_num(v: f64) -> String {
    if (v - v.round()).abs() < 0.05 {
        format!("{}", v.round() as i64)
    } else {
        format!("{v:.1}")
    }
}

impl Chart<'_> {
    pub fn svg(&self) -> String {
        let x0 = self.now_ms - 24 * 3600 * 1000;
        let span = (self.now_ms - x0) as f64;
        let (mut lo, mut hi) = self.y_floor;
        for s in &self.series {
            for (_, [mn, _, mx]) in &s.points {
                lo = lo.min(*mn);
                hi = hi.max(*mx);
            }
        }
        if hi - lo < 1.0 {
            hi = lo + 1.0;
        }
        let pad = (hi - lo) * 0.05;
        let (lo, hi) = (lo - pad, hi + pad);
        let plot_w = W - LEFT - RIGHT;
        let plot_h = H - TOP - BOTTOM;
        let x = |ms: i64| LEFT + ((ms - x0) as f64 / span).clamp(0.0, 1.0) * plot_w;
        let y = |v: f64| TOP + (1.0 - (v - lo) / (hi - lo)) * plot_h;

        let mut s = String::new();
        let _ = write!(
            s,
            "<svg class=\"chart\" viewBox=\"0 0 {W} {H}\" role=\"img\" aria-label=\"{t}\" \
             xmlns=\"http://www.w3.org/2000/svg\"><title>{t}</title>",
            t = html_escape(&format!("{} ({})", self.title, self.unit)),
        );
        let _ = write!(
            s,
            "<rect class=\"plot\" x=\"{LEFT}\" y=\"{TOP}\" width=\"{plot_w}\" height=\"{plot_h}\"/>"
        );
        if let Some((a, b)) = self.normal {
            let (ya, yb) = (y(b.min(hi)), y(a.max(lo)));
            if yb > ya {
                let _ = write!(
                    s,
                    "<rect class=\"normal\" x=\"{LEFT}\" y=\"{ya:.1}\" width=\"{plot_w}\" height=\"{:.1}\"/>",
                    yb - ya
                );
            }
        }
        // Y ticks: bottom, middle, top.
        for v in [lo + pad, (lo + hi) / 2.0, hi - pad] {
            let yy = y(v);
            let _ = write!(
                s,
                "<line class=\"gl\" x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\"/>\
                 <text class=\"tick\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
                W - RIGHT,
                LEFT - 4.0,
                yy + 4.0,
                fmt_num(v)
            );
        }
        // X ticks every 6 hours, in China Standard Time.
        let cst = FixedOffset::east_opt(8 * 3600).expect("UTC+8");
        let six_h = 6 * 3600 * 1000;
        let offset_ms = 8 * 3600 * 1000;
        let mut tick = ((x0 + offset_ms) / six_h + 1) * six_h - offset_ms;
        while tick <= self.now_ms {
            let xx = x(tick);
            let label = Utc
                .timestamp_millis_opt(tick)
                .single()
                .map(|t| t.with_timezone(&cst).format("%H:%M").to_string())
                .unwrap_or_default();
            let _ = write!(
                s,
                "<line class=\"gl\" x1=\"{xx:.1}\" x2=\"{xx:.1}\" y1=\"{TOP}\" y2=\"{:.1}\"/>\
                 <text class=\"tick\" x=\"{xx:.1}\" y=\"{:.1}\" text-anchor=\"{anchor}\">{label}</text>",
                TOP + plot_h,
                H - 6.0,
                // The last label would be cut at the right edge.
                anchor = if xx > W - RIGHT - 20.0 { "end" } else { "middle" },
            );
            tick += six_h;
        }
        let mut any = false;
        for series in &self.series {
            for seg in segments(&series.points) {
                any = true;
                if seg.len() == 1 {
                    let (t, [mn, avg, mx]) = seg[0];
                    let _ = write!(
                        s,
                        "<line class=\"band {c}\" x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\"/>\
                         <circle class=\"dot {c}\" cx=\"{:.1}\" cy=\"{:.1}\" r=\"2\"/>",
                        x(t),
                        x(t),
                        y(mx),
                        y(mn),
                        x(t),
                        y(avg),
                        c = series.class
                    );
                    continue;
                }
                let mut band = String::new();
                for (t, [_, _, mx]) in seg {
                    let _ = write!(band, "{:.1},{:.1} ", x(*t), y(*mx));
                }
                for (t, [mn, _, _]) in seg.iter().rev() {
                    let _ = write!(band, "{:.1},{:.1} ", x(*t), y(*mn));
                }
                let line: Vec<String> = seg
                    .iter()
                    .map(|(t, [_, avg, _])| format!("{:.1},{:.1}", x(*t), y(*avg)))
                    .collect();
                let _ = write!(
                    s,
                    "<polygon class=\"band {c}\" points=\"{}\"/><polyline class=\"line {c}\" points=\"{}\"/>",
                    band.trim_end(),
                    line.join(" "),
                    c = series.class
                );
            }
        }
        if !any {
            let _ = write!(
                s,
                "<text class=\"nodata\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                LEFT + plot_w / 2.0,
                TOP + plot_h / 2.0,
                html_escape(self.no_data)
            );
        }
        s.push_str("</svg>");
        s
    }
}

/// Splits points where consecutive buckets are more than `GAP_MS` apart.
fn segments(points: &[(i64, [f64; 3])]) -> Vec<&[(i64, [f64; 3])]> {
    let mut out = Vec::new();
    let mut start = 0;
    for i in 1..points.len() {
        if points[i].0 - points[i - 1].0 > GAP_MS {
            out.push(&points[start..i]);
            start = i;
        }
    }
    if start < points.len() {
        out.push(&points[start..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart(points: Vec<(i64, [f64; 3])>) -> String {
        Chart {
            title: "心率 <HR>",
            unit: "bpm",
            series: vec![Series {
                points,
                class: "s-hr",
            }],
            normal: Some((50.0, 100.0)),
            y_floor: (40.0, 120.0),
            now_ms: 1_800_000_000_000,
            no_data: "暂无数据",
        }
        .svg()
    }

    #[test]
    fn gaps_break_the_line() {
        let t = 1_800_000_000_000 - 3600 * 1000;
        let svg = chart(vec![
            (t, [60.0, 70.0, 80.0]),
            (t + 300_000, [61.0, 71.0, 81.0]),
            // 30 minutes later: a new segment
            (t + 2_100_000, [62.0, 72.0, 82.0]),
            (t + 2_400_000, [63.0, 73.0, 83.0]),
        ]);
        assert_eq!(svg.matches("<polyline").count(), 2, "{svg}");
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert!(svg.contains("心率 &lt;HR&gt; (bpm)"), "title is escaped");
        assert!(!svg.contains("暂无数据"));
    }

    #[test]
    fn empty_chart_says_so() {
        let svg = chart(vec![]);
        assert!(svg.contains("暂无数据"));
        assert!(!svg.contains("<polyline"));
    }

    #[test]
    fn a_single_bucket_is_a_dot() {
        let svg = chart(vec![(1_800_000_000_000 - 600_000, [60.0, 70.0, 80.0])]);
        assert!(svg.contains("<circle"));
    }
}
