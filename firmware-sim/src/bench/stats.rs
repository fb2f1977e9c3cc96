//! The pure parts of the bench: percentiles, the token bucket that paces the load, and the
//! parsers for `/proc` and for the service's Prometheus text. Nothing here does IO, so all of
//! it is unit-tested.

use serde::Serialize;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Percentiles

/// Nearest-rank percentile of an ascending slice: the smallest value such that at least `p` %
/// of the samples are at or below it. No interpolation, so every reported figure is a latency
/// that was actually measured (with 120 samples, p99 is the second largest).
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() || !(0.0..=100.0).contains(&p) {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Count and percentiles of a set of latencies, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    pub count: usize,
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    pub mean_ms: Option<f64>,
}

impl LatencySummary {
    pub fn of(samples_ms: &[f64]) -> LatencySummary {
        let mut v: Vec<f64> = samples_ms
            .iter()
            .copied()
            .filter(|x| x.is_finite())
            .collect();
        v.sort_by(f64::total_cmp);
        let mean = (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
        LatencySummary {
            count: v.len(),
            p50_ms: percentile(&v, 50.0),
            p90_ms: percentile(&v, 90.0),
            p99_ms: percentile(&v, 99.0),
            max_ms: v.last().copied(),
            mean_ms: mean,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Token bucket

/// Paces one connection's publishes at `rate` per second, allowing short bursts of up to
/// `capacity` so that a late timer wake-up is made up at once instead of lost.
///
/// When the publisher falls behind by more than the burst (the MQTT client blocked, the CPU
/// was busy), the excess is not carried over: it is counted in [`TokenBucket::overflow`] and
/// the offered rate silently becomes lower. The bench reports it, because an offered rate that
/// was not actually offered must not pass for one.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
    overflow: f64,
}

impl TokenBucket {
    /// An empty bucket (no initial burst) filling at `rate` per second up to `capacity`.
    pub fn new(rate: f64, capacity: f64, now: Instant) -> TokenBucket {
        TokenBucket {
            rate: rate.max(0.0),
            capacity: capacity.max(1.0),
            tokens: 0.0,
            last: now,
            overflow: 0.0,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens += dt * self.rate;
        if self.tokens > self.capacity {
            self.overflow += self.tokens - self.capacity;
            self.tokens = self.capacity;
        }
    }

    /// Takes as many whole tokens as are available, at most `max`, and returns how many.
    pub fn take(&mut self, now: Instant, max: u64) -> u64 {
        self.refill(now);
        let n = (self.tokens.floor() as u64).min(max);
        self.tokens -= n as f64;
        n
    }

    /// How long until one whole token is available (zero if one is).
    pub fn until_next(&self, now: Instant) -> Duration {
        if self.rate <= 0.0 {
            return Duration::from_secs(3600);
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        let have = self.tokens + elapsed * self.rate;
        if have >= 1.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - have) / self.rate)
        }
    }

    /// Tokens discarded because the bucket was full: publishes that were due and never made.
    pub fn overflow(&self) -> u64 {
        self.overflow.floor() as u64
    }
}

// ---------------------------------------------------------------------------------------------
// /proc

/// User + system CPU time of a process, in clock ticks, from the text of `/proc/<pid>/stat`.
/// The command name (field 2) may contain spaces and parentheses, so fields are counted from
/// the last `)`.
pub fn parse_proc_stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, utime field 14, stime field 15 (proc(5)).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// How many CPUs a kernel CPU list names (`0-1`, `0,2-3`: the format of
/// `/sys/devices/system/cpu/online` and of `Cpus_allowed_list`).
pub fn count_cpu_list(list: &str) -> Option<usize> {
    let mut n = 0;
    for part in list.trim().split(',') {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let (lo, hi): (usize, usize) = (lo.parse().ok()?, hi.parse().ok()?);
        n += hi.checked_sub(lo)? + 1;
    }
    Some(n)
}

/// A `kB` field (`VmHWM`, `VmRSS`, `MemTotal`) of `/proc/<pid>/status` or `/proc/meminfo`,
/// in KiB.
pub fn parse_kib_field(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        if name.trim() != field {
            return None;
        }
        value.split_whitespace().next()?.parse().ok()
    })
}

/// Whole-machine CPU counters from the first line of `/proc/stat`: (busy, total) ticks, where
/// idle and iowait are not busy.
pub fn parse_machine_cpu(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8) // user nice system idle iowait irq softirq steal; guest is inside user
        .map(|x| x.parse().ok())
        .collect::<Option<Vec<u64>>>()?;
    if v.len() < 5 {
        return None;
    }
    let total: u64 = v.iter().sum();
    let idle = v[3] + v[4];
    Some((total - idle, total))
}

/// [`cpu_percent`] of two samples that may be missing (a process gone, a remote program):
/// `None` unless both were read.
pub fn cpu_percent_of(
    before: Option<u64>,
    after: Option<u64>,
    ticks_per_s: u64,
    wall: Duration,
) -> Option<f64> {
    Some(cpu_percent(before?, after?, ticks_per_s, wall))
}

/// CPU use between two readings of a process's ticks, in % of one core (so two busy cores
/// read 200 %, as `top` shows it).
pub fn cpu_percent(ticks_before: u64, ticks_after: u64, ticks_per_s: u64, wall: Duration) -> f64 {
    let secs = wall.as_secs_f64();
    if secs <= 0.0 || ticks_per_s == 0 {
        return 0.0;
    }
    ticks_after.saturating_sub(ticks_before) as f64 / ticks_per_s as f64 / secs * 100.0
}

// ---------------------------------------------------------------------------------------------
// Prometheus text

/// Label pairs of one sample, in order.
type Labels = Vec<(String, String)>;

/// Splits `name{a="x",b="y"} 12.5` into its name, labels and value. Returns `None` for
/// comments, blank lines and anything malformed: the service's exposition is read, never
/// trusted.
fn parse_sample(line: &str) -> Option<(&str, Labels, f64)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (head, value) = line.rsplit_once(' ')?;
    let value: f64 = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    let Some(open) = head.find('{') else {
        return Some((head, Vec::new(), value));
    };
    let name = &head[..open];
    let body = head[open + 1..].strip_suffix('}')?;
    let mut labels = Vec::new();
    let mut chars = body.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        if chars.next() != Some('"') {
            return None;
        }
        let mut val = String::new();
        loop {
            match chars.next()? {
                '\\' => val.push(chars.next()?),
                '"' => break,
                c => val.push(c),
            }
        }
        labels.push((key.trim().to_string(), val));
        match chars.next() {
            Some(',') => continue,
            None => break,
            Some(_) => return None,
        }
    }
    Some((name, labels, value))
}

/// One histogram (or a histogram's difference between two scrapes): cumulative bucket counts
/// by upper bound, ascending, then sum and count.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    pub buckets: Vec<(f64, f64)>,
    pub sum: f64,
    pub count: f64,
}

impl Histogram {
    /// Finds histogram `name` in a Prometheus text exposition, restricted to the series whose
    /// labels include every pair in `want` (`le` aside). `None` when it is absent.
    pub fn parse(text: &str, name: &str, want: &[(&str, &str)]) -> Option<Histogram> {
        let bucket_name = format!("{name}_bucket");
        let sum_name = format!("{name}_sum");
        let count_name = format!("{name}_count");
        let mut h = Histogram::default();
        let mut found = false;
        for line in text.lines() {
            let Some((n, labels, value)) = parse_sample(line) else {
                continue;
            };
            if n != bucket_name && n != sum_name && n != count_name {
                continue;
            }
            let matches = want
                .iter()
                .all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v));
            if !matches {
                continue;
            }
            found = true;
            // The same series may appear more than once (the pages of several instances,
            // one after the other): their observations add up.
            if n == bucket_name {
                let le = labels.iter().find(|(k, _)| k == "le").map(|(_, v)| v)?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                match h.buckets.iter_mut().find(|(l, _)| *l == le) {
                    Some((_, c)) => *c += value,
                    None => h.buckets.push((le, value)),
                }
            } else if n == sum_name {
                h.sum += value;
            } else {
                h.count += value;
            }
        }
        h.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        found.then_some(h)
    }

    /// What was observed between `earlier` and this scrape (same series, same buckets).
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        let buckets = self
            .buckets
            .iter()
            .map(|(le, c)| {
                let before = earlier
                    .buckets
                    .iter()
                    .find(|(l, _)| l == le)
                    .map_or(0.0, |(_, c)| *c);
                (*le, (c - before).max(0.0))
            })
            .collect();
        Histogram {
            buckets,
            sum: (self.sum - earlier.sum).max(0.0),
            count: (self.count - earlier.count).max(0.0),
        }
    }

    /// Estimated quantile (0..=1), interpolating linearly inside the bucket as Prometheus's
    /// `histogram_quantile` does; the answer is only as fine as the buckets (powers of two
    /// here). A quantile in the `+Inf` bucket answers with the last finite bound.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count <= 0.0 || !(0.0..=1.0).contains(&q) {
            return None;
        }
        let total = self.buckets.last().map_or(self.count, |(_, c)| *c);
        if total <= 0.0 {
            return None;
        }
        let rank = q * total;
        let mut prev_le = 0.0;
        let mut prev_count = 0.0;
        for (le, count) in &self.buckets {
            if *count >= rank {
                if le.is_infinite() {
                    return Some(prev_le);
                }
                let in_bucket = count - prev_count;
                let frac = if in_bucket > 0.0 {
                    (rank - prev_count) / in_bucket
                } else {
                    1.0
                };
                return Some(prev_le + (le - prev_le) * frac);
            }
            prev_le = *le;
            prev_count = *count;
        }
        Some(prev_le)
    }

    pub fn mean(&self) -> Option<f64> {
        (self.count > 0.0).then(|| self.sum / self.count)
    }
}

/// The value of a counter or gauge (summed over series matching `want`), if present.
pub fn scalar(text: &str, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    let mut total = None;
    for line in text.lines() {
        let Some((n, labels, value)) = parse_sample(line) else {
            continue;
        };
        if n != name {
            continue;
        }
        if want
            .iter()
            .all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
        {
            *total.get_or_insert(0.0) += value;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_are_counted() {
        assert_eq!(count_cpu_list("0-1\n"), Some(2));
        assert_eq!(count_cpu_list("0"), Some(1));
        assert_eq!(count_cpu_list("0,2-3,7"), Some(4));
        assert_eq!(count_cpu_list("3-1"), None);
        assert_eq!(count_cpu_list(""), None);
        assert_eq!(count_cpu_list("x"), None);
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&v, 101.0), None);
        // 120 samples: p99 is the 119th, the second largest.
        let w: Vec<f64> = (1..=120).map(f64::from).collect();
        assert_eq!(percentile(&w, 99.0), Some(119.0));
        assert_eq!(percentile(&w, 90.0), Some(108.0));
    }

    #[test]
    fn summaries_sort_and_skip_nan() {
        let s = LatencySummary::of(&[30.0, 10.0, f64::NAN, 20.0]);
        assert_eq!(s.count, 3);
        assert_eq!(s.p50_ms, Some(20.0));
        assert_eq!(s.max_ms, Some(30.0));
        assert_eq!(s.mean_ms, Some(20.0));
        assert_eq!(LatencySummary::of(&[]).p99_ms, None);
    }

    #[test]
    fn token_bucket_paces_and_counts_overflow() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000.0, 10.0, t0);
        assert_eq!(b.take(t0, u64::MAX), 0, "starts empty: no burst at start");
        assert_eq!(b.until_next(t0), Duration::from_millis(1));
        // 5.5 ms later: 5 whole tokens, half a token kept.
        let t1 = t0 + Duration::from_micros(5500);
        assert_eq!(b.take(t1, u64::MAX), 5);
        assert_eq!(b.until_next(t1), Duration::from_micros(500));
        // A cap on what is taken leaves the rest in the bucket.
        let t2 = t1 + Duration::from_millis(3);
        assert_eq!(b.take(t2, 2), 2);
        assert_eq!(b.take(t2, u64::MAX), 1);
        // A long stall: the burst is capped at 10 and the rest counted as overflow.
        let t3 = t2 + Duration::from_millis(100);
        assert_eq!(b.take(t3, u64::MAX), 10);
        assert_eq!(b.overflow(), 90);
        // Over a long steady run the rate is exact.
        let mut b = TokenBucket::new(625.0, 31.0, t0);
        let mut taken = 0;
        for ms in 1..=10_000u64 {
            taken += b.take(t0 + Duration::from_millis(ms), u64::MAX);
        }
        assert_eq!(taken, 6250);
        assert_eq!(b.overflow(), 0);
    }

    #[test]
    fn proc_stat_ticks() {
        // A command name with a space and a parenthesis, as proc(5) warns.
        let stat = "4242 (silver guard)) S 1 4242 4242 0 -1 4194560 1234 0 0 0 \
                    750 250 0 0 20 0 12 0 1000 123456789 4567 18446744073709551615";
        assert_eq!(parse_proc_stat_ticks(stat), Some(1000));
        assert_eq!(parse_proc_stat_ticks("garbage"), None);
        assert_eq!(parse_proc_stat_ticks("1 (x) S 1 2"), None);
    }

    #[test]
    fn status_and_meminfo_fields() {
        let status =
            "Name:\tsilverguard\nVmPeak:\t  300000 kB\nVmHWM:\t   51234 kB\nVmRSS:\t   40000 kB\n";
        assert_eq!(parse_kib_field(status, "VmHWM"), Some(51234));
        assert_eq!(parse_kib_field(status, "VmRSS"), Some(40000));
        assert_eq!(parse_kib_field(status, "VmSwap"), None);
        let meminfo = "MemTotal:       24684216 kB\nMemFree:        18000000 kB\n";
        assert_eq!(parse_kib_field(meminfo, "MemTotal"), Some(24684216));
    }

    #[test]
    fn machine_cpu_and_percent() {
        let stat = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 50 0 25 400 25 0 0 0 0 0\n";
        assert_eq!(parse_machine_cpu(stat), Some((150, 1000)));
        assert_eq!(parse_machine_cpu("intr 1 2 3"), None);
        assert_eq!(cpu_percent(100, 250, 100, Duration::from_secs(1)), 150.0);
        assert_eq!(cpu_percent(100, 100, 100, Duration::ZERO), 0.0);
    }

    const METRICS: &str = r#"# HELP silverguard_notify_queued_to_delivered_seconds From the alert's commit to the provider accepting the notification, by channel.
# TYPE silverguard_notify_queued_to_delivered_seconds histogram
silverguard_notify_queued_to_delivered_seconds_sum{channel="sms"} 1.5
silverguard_notify_queued_to_delivered_seconds_count{channel="sms"} 10
silverguard_notify_queued_to_delivered_seconds_bucket{le="0.001",channel="sms"} 0
silverguard_notify_queued_to_delivered_seconds_bucket{le="0.064",channel="sms"} 2
silverguard_notify_queued_to_delivered_seconds_bucket{le="0.128",channel="sms"} 6
silverguard_notify_queued_to_delivered_seconds_bucket{le="0.256",channel="sms"} 10
silverguard_notify_queued_to_delivered_seconds_bucket{le="+Inf",channel="sms"} 10
silverguard_notify_queued_to_delivered_seconds_sum{channel="email"} 9
silverguard_notify_queued_to_delivered_seconds_count{channel="email"} 1
silverguard_notify_queued_to_delivered_seconds_bucket{le="+Inf",channel="email"} 1
silverguard_ingest_committed_total{kind="heartbeat"} 12345
silverguard_ingest_committed_total{kind="event"} 7
silverguard_mqtt_connections_up 1
# EOF
"#;

    #[test]
    fn histograms_from_prometheus_text() {
        let h = Histogram::parse(
            METRICS,
            "silverguard_notify_queued_to_delivered_seconds",
            &[("channel", "sms")],
        )
        .unwrap();
        assert_eq!(h.count, 10.0);
        assert_eq!(h.sum, 1.5);
        assert_eq!(h.buckets.len(), 5);
        assert_eq!(h.mean(), Some(0.15));
        // Median: rank 5 of 10, 3/4 of the way through the (0.064, 0.128] bucket.
        let p50 = h.quantile(0.5).unwrap();
        assert!((p50 - 0.112).abs() < 1e-9, "{p50}");
        assert_eq!(h.quantile(1.0), Some(0.256));
        assert!(Histogram::parse(METRICS, "silverguard_nope", &[]).is_none());

        // The difference of two scrapes is what happened in between.
        let mut earlier = h.clone();
        for b in &mut earlier.buckets {
            b.1 = (b.1 - 2.0f64).max(0.0);
        }
        earlier.count = 8.0;
        earlier.sum = 1.0;
        let d = h.since(&earlier);
        assert_eq!(d.count, 2.0);
        assert_eq!(d.sum, 0.5);
        assert_eq!(Histogram::default().quantile(0.5), None);
    }

    #[test]
    fn several_instances_pages_add_up() {
        let both = format!("{METRICS}\n{METRICS}");
        let name = "silverguard_notify_queued_to_delivered_seconds";
        let one = Histogram::parse(METRICS, name, &[("channel", "sms")]).unwrap();
        let two = Histogram::parse(&both, name, &[("channel", "sms")]).unwrap();
        assert_eq!((two.count, two.sum), (20.0, 3.0));
        assert_eq!(two.buckets.len(), one.buckets.len());
        assert_eq!(two.quantile(0.5), one.quantile(0.5));
        assert_eq!(
            scalar(
                &both,
                "silverguard_ingest_committed_total",
                &[("kind", "heartbeat")]
            ),
            Some(24690.0)
        );
    }

    #[test]
    fn scalars_and_malformed_lines() {
        assert_eq!(
            scalar(
                METRICS,
                "silverguard_ingest_committed_total",
                &[("kind", "heartbeat")]
            ),
            Some(12345.0)
        );
        assert_eq!(
            scalar(METRICS, "silverguard_ingest_committed_total", &[]),
            Some(12352.0)
        );
        assert_eq!(
            scalar(METRICS, "silverguard_mqtt_connections_up", &[]),
            Some(1.0)
        );
        assert_eq!(scalar("x{a=\"1\" 2\nx{a=1} 3\nx 4 5\n", "x", &[]), None);
        assert_eq!(
            scalar("x{a=\"q\\\"uote\"} 2\n", "x", &[("a", "q\"uote")]),
            Some(2.0)
        );
    }
}
