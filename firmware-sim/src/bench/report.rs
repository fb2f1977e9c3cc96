//! The bench's result: one serialisable [`BenchReport`] (the `--json` file) and its human
//! table. Field names carry their unit (`_ms`, `_per_s`, `_mib`, `_percent`) so the JSON reads
//! without this file.

use serde::Serialize;
use std::fmt::Write as _;

use super::baselines::Baselines;
use super::db::{LatestTable, Storage};
use super::gateway::GatewayTally;
use super::lag::LagSummary;
use super::sos::SosSummary;
use super::stats::{Histogram, LatencySummary};

/// Issue 3's bound: SOS publish → SMS accepted, p99.
pub const TARGET_P99_MS: f64 = 500.0;
/// ... while the pipeline ingests this many heartbeats per second.
pub const TARGET_RATE: f64 = 5000.0;

#[derive(Debug, Clone, Default, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub mem_total_mib: Option<u64>,
    pub kernel: Option<String>,
    pub postgres_version: Option<String>,
    /// The server's WAL, checkpoint and memory settings ([`super::db::Server::write_settings`]).
    pub postgres_settings: std::collections::BTreeMap<String, String>,
    pub broker_version: Option<String>,
    /// `$SYS/broker/store/messages/count` when the bench started.
    pub broker_stored_messages_at_start: Option<u64>,
    /// `$SYS/broker/clients/disconnected` when the bench started.
    pub broker_disconnected_clients_at_start: Option<u64>,
    /// Which CPUs each program may run on: whether the run had the broker on a core of its
    /// own (`scripts/lib.sh` `bench_cpu_layout`, docs/deployment.md) or shared every core.
    pub cpus: CpuLayout,
}

/// CPU lists as `/proc/<pid>/status` gives them (`Cpus_allowed_list`, e.g. `0-1`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct CpuLayout {
    /// Every `mosquitto` process here, distinct lists (empty: the broker is not on this machine).
    pub broker: Vec<String>,
    /// The bench's own backend, whose list it inherited from the postmaster (`None`: the
    /// server is not on this machine).
    pub postgres: Option<String>,
    pub bench: Option<String>,
    pub silverguard: Option<String>,
}

impl CpuLayout {
    /// One line for the human report: `broker 0; PostgreSQL 1; bench 1; silverguard 1`.
    pub fn line(&self) -> String {
        let one = |v: &Option<String>| v.clone().unwrap_or_else(|| "?".into());
        format!(
            "broker {}; PostgreSQL {}; bench {}; silverguard {}",
            if self.broker.is_empty() {
                "?".to_string()
            } else {
                self.broker.join(" and ")
            },
            one(&self.postgres),
            one(&self.bench),
            one(&self.silverguard)
        )
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Settings {
    pub smoke: bool,
    pub offered_rate_per_s: f64,
    /// The ramp's offered rates (empty: one step at `offered_rate_per_s`).
    pub steps_per_s: Vec<f64>,
    pub devices: usize,
    pub connections: usize,
    pub warmup_s: f64,
    pub duration_s: f64,
    pub sos_rate_per_s: f64,
    pub idle_sos: usize,
    pub sos_devices: usize,
    pub sos_timeout_s: f64,
    pub markers_per_s: f64,
    pub lag_poll_ms: f64,
    /// The load connections' write tick (`--publish-tick`).
    pub publish_tick_ms: f64,
    pub seed: u64,
    pub database: String,
    pub kept_database: bool,
    /// Extra service settings given with `--service-env`.
    pub service_env: Vec<String>,
    /// SQL applied to the database before the service started (`--db-sql`).
    pub db_sql: Vec<String>,
    /// `silverguard serve` processes sharing the stream (`--instances`).
    pub instances: usize,
    /// How the broker baseline's bare subscriber coalesced its reads, in ms (0: it read
    /// every message as it arrived; `--baseline-read-coalesce`).
    pub baseline_read_coalesce_ms: f64,
    /// How long the load's publishers let the broker's PUBACKs wait before reading them
    /// (0: each read as it arrives, as every run before `--ack-read-coalesce` did).
    pub ack_read_coalesce_ms: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Heartbeats {
    pub offered_rate_per_s: f64,
    /// Whole run (warm-up, window, drain): handed to the MQTT clients.
    pub published: u64,
    /// Acknowledged by the broker (PUBACK).
    pub acked: u64,
    /// Rows in `heartbeats` once the count stopped growing.
    pub committed: u64,
    /// published − committed (0 on a correct run).
    pub lost: u64,
    /// Heartbeats that were due by the offered rate but never published because the bench
    /// itself fell behind (then the offered rate was not really offered).
    pub not_offered: u64,
    pub window_s: f64,
    pub published_in_window: u64,
    pub published_per_s: f64,
    pub committed_in_window: u64,
    /// The sustained rate: rows committed during the measured window / its length.
    pub committed_per_s: f64,
    pub publish_errors: u64,
    pub reconnects: u64,
}

/// A distribution read from the service's own Prometheus histogram, restricted to the
/// measured window (difference of two scrapes). Quantiles are estimates within power-of-two
/// buckets.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HistSummary {
    pub count: u64,
    pub mean_ms: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

impl HistSummary {
    pub fn of(h: &Histogram) -> HistSummary {
        HistSummary {
            count: h.count.max(0.0) as u64,
            mean_ms: h.mean().map(|s| s * 1000.0),
            p50_ms: h.quantile(0.5).map(|s| s * 1000.0),
            p99_ms: h.quantile(0.99).map(|s| s * 1000.0),
        }
    }
}

/// Where an SOS's time goes, per stage, from database timestamps (same machine clock).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stages {
    /// Bench publish → silverguard takes it from the broker.
    pub publish_to_received: LatencySummary,
    /// Received → alert and outbox rows written (event transaction, before its commit).
    pub received_to_queued: LatencySummary,
    /// Queued → the notifier starts the SMS request (commit, NOTIFY, claim, render).
    pub queued_to_send: LatencySummary,
    /// Request started → the gateway has it (HTTP on loopback).
    pub send_to_sms: LatencySummary,
}

/// One SOS, for plots and for finding the slow one in the service's log.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SosSample {
    pub device_id: String,
    pub published_unix_ms: f64,
    /// `None`: lost.
    pub latency_ms: Option<f64>,
    pub publish_to_received_ms: Option<f64>,
    pub received_to_queued_ms: Option<f64>,
    pub queued_to_send_ms: Option<f64>,
    pub send_to_sms_ms: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ServiceMetrics {
    pub notify_sms_queued_to_delivered: HistSummary,
    pub ingest_commit_heartbeat: HistSummary,
    pub ingest_commit_event: HistSummary,
    pub ingest_pipeline: HistSummary,
    pub heartbeat_batch_rows_mean: Option<f64>,
    /// PUBACKs per write to the broker over the window (the ingest session's batching).
    pub acks_per_write: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Usage {
    /// silverguard's user + system CPU over the measured window, % of one core.
    pub service_cpu_percent: Option<f64>,
    pub service_peak_rss_mib: Option<f64>,
    pub service_rss_end_mib: Option<f64>,
    /// The bench process itself, % of one core.
    pub bench_cpu_percent: Option<f64>,
    /// Every `mosquitto` process on this machine, % of one core (none with a remote broker).
    pub broker_cpu_percent: Option<f64>,
    /// Every `postgres` process on this machine, % of one core.
    pub database_cpu_percent: Option<f64>,
    /// The committed rate of the same window: CPU per heartbeat = CPU / this.
    pub committed_per_s: Option<f64>,
    /// PostgreSQL's write-ahead log over the same window per committed heartbeat (the whole
    /// cluster's: heartbeats, `device_latest`, events, alerts), and its full-page images per
    /// 1,000 heartbeats.
    pub wal_bytes_per_heartbeat: Option<f64>,
    pub wal_full_page_images_per_1000: Option<f64>,
    /// Every process on the machine, % of all cores (100 = saturated).
    pub machine_cpu_busy_percent: Option<f64>,
    /// The same over the idle phase, before the load: what else was running.
    pub machine_cpu_busy_before_load_percent: Option<f64>,
    /// Each instance's memory (`service_*` above are every instance together).
    pub instances: Vec<InstanceUsage>,
    pub service_log: String,
}

/// One `silverguard serve` of several (`--instances`), at the end of the run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct InstanceUsage {
    pub pid: u32,
    pub peak_rss_mib: Option<f64>,
    pub rss_end_mib: Option<f64>,
}

/// One instance's share of a step's measured window.
#[derive(Debug, Clone, Default, Serialize)]
pub struct InstanceStep {
    /// Heartbeats this instance committed in the window / its length.
    pub committed_per_s: f64,
    /// This instance's CPU over the window, % of one core.
    pub cpu_percent: Option<f64>,
}

/// One step of the offered load: warm-up, measured window, then a pause until everything
/// published is committed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Step {
    pub offered_per_s: f64,
    pub window_s: f64,
    /// Published by the bench in the window (below `offered` when the bench fell behind).
    pub published_per_s: f64,
    /// Committed by the service in the window (its own counter, rows inserted): sustained.
    pub committed_per_s: f64,
    pub not_offered: u64,
    /// Whole step (warm-up, window, drain).
    pub published: u64,
    pub committed: u64,
    /// published − committed once drained (0 on a correct run).
    pub lost: u64,
    /// Messages the service rejected during the window (0 expected: the load is valid).
    pub rejects: u64,
    /// Everything published was committed before the next step.
    pub drained: bool,
    pub drain_s: f64,
    /// After a lossy step: how long the fleet ran at half the highest sustained rate, before
    /// this step's warm-up, until the service's silence detection had settled (`settle`).
    pub settle_s: Option<f64>,
    /// Publish → committed, of the markers published in the window.
    pub lag: LagSummary,
    /// SOS publish → SMS accepted, in the window.
    pub sos: SosSummary,
    pub service_cpu_percent: Option<f64>,
    /// Largest resident set seen during the window (sampled every second).
    pub service_rss_max_mib: Option<f64>,
    pub bench_cpu_percent: Option<f64>,
    /// Every `mosquitto` and every `postgres` process here, % of one core.
    pub broker_cpu_percent: Option<f64>,
    pub database_cpu_percent: Option<f64>,
    /// WAL per committed heartbeat in the window, and full-page images per 1,000 of them.
    pub wal_bytes_per_heartbeat: Option<f64>,
    pub wal_full_page_images_per_1000: Option<f64>,
    pub machine_cpu_busy_percent: Option<f64>,
    pub service_metrics: ServiceMetrics,
    /// Committed ≥ 98 % of offered, drained, lag p99 under 2 s, nothing lost.
    pub sustained: bool,
    /// Each instance's part of the window (`service_*` above are all of them together).
    pub instances: Vec<InstanceStep>,
    /// Messages the broker held (`$SYS` store count) at most in the window and at its end:
    /// sent but not yet seen acknowledged, or queued ([`super::broker_sys`]). A backlog that
    /// grows through the window is borrowed against `max_queued_messages`.
    pub broker_backlog_max: Option<u64>,
    pub broker_backlog_end: Option<u64>,
    /// What the broker held at the window's end was a consumer's window, not a queue
    /// ([`super::broker_sys::kept_up`]); `None` when the broker's figures are unknown.
    pub broker_kept_up: Option<bool>,
    /// Messages the broker dropped from the window's start to the end of the drain.
    pub broker_dropped: Option<u64>,
    /// Seconds the step waited before it started for the broker to clear what the previous
    /// load left.
    pub waited_for_broker_s: Option<f64>,
}

impl Step {
    /// Committed ≥ 98 % of offered, drained, lag p99 under 2 s, nothing lost, and the
    /// broker not queueing at the window's end (when its figures are known).
    pub fn is_sustained(&self) -> bool {
        self.committed_per_s >= 0.98 * self.offered_per_s
            && self.drained
            && self.lost == 0
            && self.lag.latency.p99_ms.is_some_and(|p| p <= 2000.0)
            && self.broker_kept_up != Some(false)
    }
}

/// Silverguard against the limits measured in the same run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Ratios {
    /// The highest committed rate of a sustained step ([`Step::is_sustained`]); 0 when no
    /// step was sustained.
    pub silverguard_per_s: f64,
    pub vs_broker: Option<f64>,
    /// The broker limit `vs_broker` is against ([`broker_limit`]), for readers of the JSON
    /// (`scripts/bench-plot.py`) that should not restate the rule.
    pub broker_limit_per_s: Option<f64>,
    pub vs_copy: Option<f64>,
    pub vs_naive: Option<f64>,
    /// Against the slower of the broker and COPY limits (issue 5: ≥ 0.8).
    pub vs_slower_limit: Option<f64>,
    /// The broker's limit measured after the ramp over the one measured before it, minus 1
    /// (`baselines.broker_after`): how much the machine's speed moved during the run. Only
    /// for two limits of the same kind; `vs_broker` then uses the higher of the two.
    pub broker_limit_change: Option<f64>,
}

/// Beyond this change of the broker's limit between before and after the ramp, the report
/// says the machine's speed moved and the ratio is uncertain.
pub const BROKER_LIMIT_CHANGE_WARN: f64 = 0.10;

/// The broker limit the ratio uses, and how far the limit after the ramp moved from the one
/// before. Of two limits of the same kind (both a probe that held, or both the flood's
/// figure), the higher: the stricter ratio. Of two of different kinds, the probe's: a flood
/// figure is what the broker passes while it queues, and would be no measure of the
/// machine's speed.
fn broker_limit(b: &super::baselines::Baselines) -> (Option<f64>, Option<f64>) {
    match (&b.broker, &b.broker_after) {
        (Some(x), Some(y)) if x.limit_held == y.limit_held => (
            Some(x.limit_per_s.max(y.limit_per_s)),
            (x.limit_per_s > 0.0).then(|| y.limit_per_s / x.limit_per_s - 1.0),
        ),
        (Some(x), Some(y)) => (Some(if x.limit_held { x } else { y }.limit_per_s), None),
        (x, y) => (x.as_ref().or(y.as_ref()).map(|v| v.limit_per_s), None),
    }
}

impl Ratios {
    /// Silverguard's best sustained rate over `limit` (None for no limit).
    fn silverguard_per_s_over(&self, limit: f64) -> Option<f64> {
        (limit > 0.0).then(|| self.silverguard_per_s / limit)
    }
}

/// Issue 5's targets that one run can judge (`None`: this run does not show it).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Targets5 {
    /// ≥ 20,000 hb/s committed over a window of ≥ 5 min, nothing lost.
    pub sustained_20k_5min: Option<bool>,
    /// ≥ 80 % of the slower of broker and COPY.
    pub ratio_80_percent: Option<bool>,
    /// The step nearest 80 % of the highest sustained rate, its SOS p99 ≤ 500 ms.
    pub sos_p99_at_80_percent_load: Option<bool>,
    pub sos_p99_at_80_percent_load_ms: Option<f64>,
    pub sos_p99_at_80_percent_load_rate: Option<f64>,
    /// Peak RSS ≤ 256 MiB with ≥ 100k devices.
    pub rss_256mib_100k_devices: Option<bool>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Target {
    pub p99_limit_ms: f64,
    pub rate_required_per_s: f64,
    /// The committed rate over the window reached the required rate (within 1 %).
    pub rate_met: bool,
    pub p99_met: bool,
    pub met: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct BenchReport {
    pub tool: String,
    pub started_unix_ms: i64,
    pub elapsed_s: f64,
    pub machine: Machine,
    pub settings: Settings,
    pub heartbeats: Heartbeats,
    /// SOS with no heartbeat load, just before it starts.
    pub sos_idle: SosSummary,
    /// SOS during the measured window.
    pub sos_loaded: SosSummary,
    /// loaded p99 / idle p99.
    pub sos_p99_ratio: Option<f64>,
    pub sos_loaded_stages: Stages,
    /// Every SOS of both phases, in publish order.
    pub sos_samples_idle: Vec<SosSample>,
    pub sos_samples_loaded: Vec<SosSample>,
    pub usage: Usage,
    pub service_metrics: ServiceMetrics,
    pub sms: GatewayTally,
    /// The ramp, one entry per step (one entry without a ramp).
    pub steps: Vec<Step>,
    pub baselines: Baselines,
    pub ratios: Ratios,
    /// Bytes per committed heartbeat on disk, indexes included.
    pub storage: Option<Storage>,
    /// `device_latest` row updates over the run, how many were HOT, and its size.
    pub latest_table: Option<LatestTable>,
    pub target: Target,
    pub targets5: Targets5,
    /// Why the run failed (lost SOS, lost heartbeats); empty when it passed.
    pub failures: Vec<String>,
    pub passed: bool,
}

impl BenchReport {
    /// Fills `target`, `failures` and `passed` from the measurements.
    pub fn judge(&mut self) {
        self.judge_steps();
        let hb = &self.heartbeats;
        let rate_met = self.settings.offered_rate_per_s >= TARGET_RATE
            && hb.committed_per_s >= TARGET_RATE * 0.99;
        let p99_met = self
            .sos_loaded
            .latency
            .p99_ms
            .is_some_and(|p| p <= TARGET_P99_MS)
            && self.sos_loaded.lost == 0;
        self.target = Target {
            p99_limit_ms: TARGET_P99_MS,
            rate_required_per_s: TARGET_RATE,
            rate_met,
            p99_met,
            met: rate_met && p99_met,
        };
        let mut f = Vec::new();
        let lost_sos = self.sos_idle.lost + self.sos_loaded.lost;
        if lost_sos > 0 {
            f.push(format!("{lost_sos} SOS produced no SMS within the timeout"));
        }
        if hb.lost > 0 {
            f.push(format!(
                "{} of {} heartbeats published were not committed{}",
                hb.lost,
                hb.published,
                self.where_lost()
            ));
        }
        if hb.published == 0 {
            f.push("no heartbeat was published".into());
        }
        if self.sos_idle.published + self.sos_loaded.published == 0 {
            f.push("no SOS was published".into());
        }
        self.passed = f.is_empty();
        self.failures = f;
    }

    /// The largest `figure` of a sustained step; 0 when none was.
    fn sustained_max(&self, figure: fn(&Step) -> f64) -> f64 {
        self.steps
            .iter()
            .filter(|s| s.sustained)
            .map(figure)
            .fold(0.0, f64::max)
    }

    /// Which steps lost heartbeats, and whether all of them were offered more than the
    /// highest sustained rate (a ramp past the machine's ceiling loses by design of the test;
    /// a loss at or below it is a defect).
    fn where_lost(&self) -> String {
        let lossy: Vec<&Step> = self.steps.iter().filter(|s| s.lost > 0).collect();
        if lossy.is_empty() || self.steps.len() < 2 {
            return String::new();
        }
        let rates: Vec<String> = lossy
            .iter()
            .map(|s| format!("{:.0}", s.offered_per_s))
            .collect();
        let ceiling = self.sustained_max(|s| s.offered_per_s);
        if ceiling > 0.0 && lossy.iter().all(|s| s.offered_per_s > ceiling) {
            format!(
                " (in the steps offered {}/s, all above the highest sustained rate, \
                 {ceiling:.0}/s: overload)",
                rates.join(", ")
            )
        } else {
            format!(" (in the steps offered {}/s)", rates.join(", "))
        }
    }

    /// Marks sustained steps, computes the ratios and issue 5's targets.
    fn judge_steps(&mut self) {
        for s in &mut self.steps {
            s.sustained = s.is_sustained();
        }
        // Only a sustained step counts: a step that lost heartbeats, or committed a backlog
        // from before its window (lag p99 over 2 s), can show a higher committed rate than
        // the service can keep.
        let best = self.sustained_max(|s| s.committed_per_s);
        let b = &self.baselines;
        let ratio = |limit: Option<f64>| limit.filter(|l| *l > 0.0).map(|l| best / l);
        let (broker, broker_limit_change) = broker_limit(b);
        let copy = b.copy.as_ref().map(|x| x.rows_per_s);
        let slower = match (broker, copy) {
            (Some(a), Some(c)) => Some(a.min(c)),
            (a, c) => a.or(c),
        };
        self.ratios = Ratios {
            silverguard_per_s: best,
            vs_broker: ratio(broker),
            broker_limit_per_s: broker,
            vs_copy: ratio(copy),
            vs_naive: ratio(b.naive.as_ref().map(|x| x.committed_per_s)),
            vs_slower_limit: ratio(slower),
            broker_limit_change,
        };
        let mut t = Targets5 {
            ratio_80_percent: self.ratios.vs_slower_limit.map(|r| r >= 0.8),
            ..Targets5::default()
        };
        let long = self.steps.iter().filter(|s| s.window_s >= 299.0);
        if long.clone().count() > 0 {
            t.sustained_20k_5min = Some(
                long.into_iter()
                    .any(|s| s.committed_per_s >= 20_000.0 * 0.99 && s.lost == 0 && s.drained)
                    && self.heartbeats.lost == 0,
            );
        }
        let max_sustained = best;
        if self.steps.len() > 1 && max_sustained > 0.0 {
            let goal = 0.8 * max_sustained;
            if let Some(s) = self
                .steps
                .iter()
                .filter(|s| s.sos.published > 0)
                .min_by(|a, b| {
                    (a.offered_per_s - goal)
                        .abs()
                        .total_cmp(&(b.offered_per_s - goal).abs())
                })
            {
                t.sos_p99_at_80_percent_load_ms = s.sos.latency.p99_ms;
                t.sos_p99_at_80_percent_load_rate = Some(s.offered_per_s);
                t.sos_p99_at_80_percent_load = Some(
                    s.sos.lost == 0 && s.sos.latency.p99_ms.is_some_and(|p| p <= TARGET_P99_MS),
                );
            }
        }
        if self.settings.devices >= 100_000 {
            t.rss_256mib_100k_devices = self.usage.service_peak_rss_mib.map(|m| m <= 256.0);
        }
        self.targets5 = t;
    }

    /// The human table.
    pub fn table(&self) -> String {
        // Rounded to whole ms; a stage of -0.3 ms (clock granularity) prints as 0.
        let ms = |v: Option<f64>| {
            v.map_or("-".to_string(), |v| {
                format!("{:.0}", if v.abs() < 0.5 { 0.0 } else { v })
            })
        };
        let pct = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0} %"));
        let mib = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0} MiB"));
        let count = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
        let h = &self.heartbeats;
        let s = &self.settings;
        let mut o = String::new();
        let offered = if s.steps_per_s.is_empty() {
            format!("{:.0} hb/s offered", s.offered_rate_per_s)
        } else {
            let r: Vec<String> = s.steps_per_s.iter().map(|r| format!("{r:.0}")).collect();
            format!("ramp {} hb/s, each step", r.join(", "))
        };
        let _ = writeln!(
            o,
            "bracelet-sim bench{}{}: {} devices over {} connections, {offered}, \
             {:.0}s warm-up + {:.0}s measured, SOS {}/s",
            if s.smoke { " (smoke)" } else { "" },
            if s.instances > 1 {
                format!(", {} instances", s.instances)
            } else {
                String::new()
            },
            s.devices,
            s.connections,
            s.warmup_s,
            s.duration_s,
            s.sos_rate_per_s
        );
        let m = &self.machine;
        let _ = writeln!(
            o,
            "machine: {} cores, {} MiB; PostgreSQL {}; broker {}",
            m.nproc,
            m.mem_total_mib.map_or("?".into(), |v| v.to_string()),
            m.postgres_version.as_deref().unwrap_or("?"),
            m.broker_version.as_deref().unwrap_or("?")
        );
        if !m.postgres_settings.is_empty() {
            let settings: Vec<String> = m
                .postgres_settings
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let _ = writeln!(o, "PostgreSQL settings: {}", settings.join(" "));
        }
        let _ = writeln!(o, "CPUs each may use: {}", m.cpus.line());
        if let Some(n) = m
            .broker_stored_messages_at_start
            .filter(|n| *n > super::sos::STORED_MESSAGES_WARNING)
        {
            let _ = writeln!(
                o,
                "WARNING: the broker held {n} messages at start ({} disconnected sessions): \
                 its periodic snapshots stall it, and every latency below with it \
                 (docs/performance.md)",
                m.broker_disconnected_clients_at_start
                    .map_or("?".into(), |c| c.to_string())
            );
        }
        let _ = writeln!(o);
        let _ = writeln!(o, "heartbeats");
        let row = |o: &mut String, k: &str, v: String| {
            let _ = writeln!(o, "  {k:<34} {v}");
        };
        row(&mut o, "offered", format!("{:.0}/s", h.offered_rate_per_s));
        row(
            &mut o,
            "published (window)",
            format!("{:.0}/s", h.published_per_s),
        );
        row(
            &mut o,
            "committed (window, sustained)",
            format!("{:.0}/s", h.committed_per_s),
        );
        row(
            &mut o,
            "published / acked / committed",
            format!("{} / {} / {}", h.published, h.acked, h.committed),
        );
        row(&mut o, "lost (published - committed)", h.lost.to_string());
        if h.not_offered > 0 {
            row(
                &mut o,
                "not offered (bench fell behind)",
                h.not_offered.to_string(),
            );
        }
        if h.reconnects > 0 || h.publish_errors > 0 {
            row(
                &mut o,
                "reconnects / publish errors",
                format!("{} / {}", h.reconnects, h.publish_errors),
            );
        }
        if let [one] = self.steps.as_slice() {
            row(
                &mut o,
                "ingest lag publish -> committed",
                format!(
                    "p50 {} / p99 {} / max {} ms ({} markers, {} unseen, {:.0} ms polls \
                     taking p99 {} ms)",
                    ms(one.lag.latency.p50_ms),
                    ms(one.lag.latency.p99_ms),
                    ms(one.lag.latency.max_ms),
                    one.lag.markers,
                    one.lag.unseen,
                    one.lag.poll_ms,
                    ms(one.lag.poll_query.p99_ms)
                ),
            );
            row(&mut o, "rejected (window)", one.rejects.to_string());
        }
        if self.steps.len() > 1 {
            let _ = writeln!(o);
            let _ = writeln!(
                o,
                "ramp    offered  published  committed  lag p50/p99 ms  SOS p50/p99 ms  \
                 sg CPU  sg RSS  machine  lost  rejects  broker held max/end  sustained"
            );
            for st in &self.steps {
                let held = format!(
                    "{}/{}",
                    count(st.broker_backlog_max),
                    count(st.broker_backlog_end)
                );
                let _ = writeln!(
                    o,
                    "  {:>11.0} {:>10.0} {:>10.0} {:>7}/{:<7} {:>7}/{:<7} {:>6} {:>7} {:>8} {:>5} {:>8} {:>20}  {}",
                    st.offered_per_s,
                    st.published_per_s,
                    st.committed_per_s,
                    ms(st.lag.latency.p50_ms),
                    ms(st.lag.latency.p99_ms),
                    ms(st.sos.latency.p50_ms),
                    ms(st.sos.latency.p99_ms),
                    pct(st.service_cpu_percent),
                    mib(st.service_rss_max_mib),
                    pct(st.machine_cpu_busy_percent),
                    st.lost,
                    st.rejects,
                    held,
                    if st.sustained { "yes" } else { "no" }
                );
            }
        }
        if s.instances > 1 {
            let _ = writeln!(o);
            let _ = writeln!(
                o,
                "instances ({} sharing the stream; committed/s and CPU per window)",
                s.instances
            );
            for (i, st) in self.steps.iter().enumerate() {
                let each: Vec<String> = st
                    .instances
                    .iter()
                    .map(|x| format!("{:.0}/s {}", x.committed_per_s, pct(x.cpu_percent)))
                    .collect();
                let _ = writeln!(
                    o,
                    "  step {} ({:.0}/s offered): {}",
                    i + 1,
                    st.offered_per_s,
                    each.join(" | ")
                );
            }
            let each: Vec<String> = self
                .usage
                .instances
                .iter()
                .map(|x| format!("pid {} peak {}", x.pid, mib(x.peak_rss_mib)))
                .collect();
            let _ = writeln!(o, "  memory: {}", each.join(" | "));
        }
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "SOS -> SMS accepted (ms)   count  lost    p50    p90    p99    max"
        );
        for (name, x) in [("idle", &self.sos_idle), ("loaded", &self.sos_loaded)] {
            let l = &x.latency;
            let _ = writeln!(
                o,
                "  {name:<24} {:>6} {:>5} {:>6} {:>6} {:>6} {:>6}",
                x.published,
                x.lost,
                ms(l.p50_ms),
                ms(l.p90_ms),
                ms(l.p99_ms),
                ms(l.max_ms)
            );
        }
        row(
            &mut o,
            "loaded p99 / idle p99",
            self.sos_p99_ratio
                .map_or("-".into(), |r| format!("{r:.2}x")),
        );
        let st = &self.sos_loaded_stages;
        let _ = writeln!(o, "  where it goes (loaded, p50 / p99 ms):");
        for (name, l) in [
            ("publish -> service receives", &st.publish_to_received),
            ("received -> alert + outbox written", &st.received_to_queued),
            ("written -> SMS request started", &st.queued_to_send),
            ("request -> SMS at the gateway", &st.send_to_sms),
        ] {
            let _ = writeln!(
                o,
                "    {name:<36} {:>6} / {:>6}",
                ms(l.p50_ms),
                ms(l.p99_ms)
            );
        }
        let _ = writeln!(o);
        let u = &self.usage;
        let _ = writeln!(o, "resources (measured window)");
        row(
            &mut o,
            "silverguard CPU (% of one core, all)",
            pct(u.service_cpu_percent),
        );
        row(&mut o, "silverguard peak RSS", mib(u.service_peak_rss_mib));
        row(
            &mut o,
            "bench CPU (% of one core)",
            pct(u.bench_cpu_percent),
        );
        row(
            &mut o,
            "broker CPU (mosquitto, % of one core)",
            pct(u.broker_cpu_percent),
        );
        row(
            &mut o,
            "PostgreSQL CPU (% of one core)",
            pct(u.database_cpu_percent),
        );
        row(
            &mut o,
            "machine busy (% of all cores)",
            pct(u.machine_cpu_busy_percent),
        );
        if let Some(rate) = u.committed_per_s {
            // % of one core at `rate` heartbeats/s -> microseconds of CPU per heartbeat.
            let us =
                |p: Option<f64>| p.map_or("-".to_string(), |p| format!("{:.1}", p * 1e4 / rate));
            row(
                &mut o,
                "CPU per committed heartbeat (us)",
                format!(
                    "silverguard {}, PostgreSQL {}, broker {}, bench {}",
                    us(u.service_cpu_percent),
                    us(u.database_cpu_percent),
                    us(u.broker_cpu_percent),
                    us(u.bench_cpu_percent)
                ),
            );
        }
        if let Some(b) = u.wal_bytes_per_heartbeat {
            row(
                &mut o,
                "WAL per committed heartbeat",
                format!(
                    "{b:.0} bytes, {} full-page images per 1,000",
                    u.wal_full_page_images_per_1000
                        .map_or("-".into(), |f| format!("{f:.1}"))
                ),
            );
        }
        row(
            &mut o,
            "machine busy before the load",
            pct(u.machine_cpu_busy_before_load_percent),
        );
        let sm = &self.service_metrics;
        let _ = writeln!(
            o,
            "service histograms (window; bucket estimates, ms)  count   mean    p50    p99"
        );
        for (name, x) in [
            (
                "notify sms queued -> delivered",
                &sm.notify_sms_queued_to_delivered,
            ),
            (
                "ingest commit, heartbeat batch",
                &sm.ingest_commit_heartbeat,
            ),
            ("ingest commit, event", &sm.ingest_commit_event),
            ("ingest receipt -> commit", &sm.ingest_pipeline),
        ] {
            let _ = writeln!(
                o,
                "  {name:<48} {:>6} {:>6} {:>6} {:>6}",
                x.count,
                ms(x.mean_ms),
                ms(x.p50_ms),
                ms(x.p99_ms)
            );
        }
        if let Some(r) = sm.heartbeat_batch_rows_mean {
            row(&mut o, "mean heartbeat batch", format!("{r:.0} rows"));
        }
        if let Some(r) = sm.acks_per_write {
            row(&mut o, "PUBACKs per write to the broker", format!("{r:.0}"));
        }
        let sms = &self.sms;
        if sms.refused + sms.repeats + sms.unexpected > 0 {
            row(
                &mut o,
                "SMS refused / repeated / unexpected",
                format!("{} / {} / {}", sms.refused, sms.repeats, sms.unexpected),
            );
        }
        let _ = writeln!(o);
        let b = &self.baselines;
        if b.broker.is_some() || b.copy.is_some() || b.naive.is_some() || !b.skipped.is_empty() {
            let _ = writeln!(
                o,
                "limits measured in this run            rate/s   silverguard ratio"
            );
            let r = &self.ratios;
            let ratio =
                |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.0} %", v * 100.0));
            if let Some(x) = &b.broker {
                let _ = writeln!(
                    o,
                    "  broker pass-through (bare subscriber) {:>8.0}   {}   (flooded at {:.0}/s: \
                     received {:.0}/s, bench published {:.0}/s, mosquitto {} of a core, bench {}; \
                     best fixed-rate probe {})",
                    x.limit_per_s,
                    ratio(r.silverguard_per_s_over(x.limit_per_s)),
                    x.offered_per_s,
                    x.received_per_s,
                    x.published_per_s,
                    pct(x.broker_cpu_percent),
                    pct(x.bench_cpu_percent),
                    x.sustained_per_s
                        .map_or("none held".into(), |v| format!("{v:.0}/s"))
                );
            }
            if let Some(x) = &b.broker_after {
                let _ = writeln!(
                    o,
                    "  the same, again after the ramp        {:>8.0}   {}   (flooded: received \
                     {:.0}/s, mosquitto {} of a core; best fixed-rate probe {})",
                    x.limit_per_s,
                    ratio(r.silverguard_per_s_over(x.limit_per_s)),
                    x.received_per_s,
                    pct(x.broker_cpu_percent),
                    x.sustained_per_s
                        .map_or("none held".into(), |v| format!("{v:.0}/s"))
                );
                if b.broker
                    .as_ref()
                    .is_some_and(|a| a.limit_held != x.limit_held)
                {
                    let _ = writeln!(
                        o,
                        "  the two limits are of different kinds (a probe that held, and a \
                         flood's figure): the ratio is against the probe's"
                    );
                }
                if let Some(c) = r.broker_limit_change {
                    let _ = writeln!(
                        o,
                        "  {}",
                        if c.abs() > BROKER_LIMIT_CHANGE_WARN {
                            format!(
                                "the broker's limit moved {:+.0} % during the run: the machine's \
                                 speed, or what else ran on it, changed, and the ratio (against \
                                 the higher) is uncertain; rerun for a steadier figure",
                                c * 100.0
                            )
                        } else {
                            format!(
                                "the broker's limit moved {:+.0} % during the run; the ratio is \
                                 against the higher",
                                c * 100.0
                            )
                        }
                    );
                }
            }
            if let Some(x) = &b.copy {
                let _ = writeln!(
                    o,
                    "  PostgreSQL psql \\copy ({} rows)    {:>8.0}   {}",
                    x.rows,
                    x.rows_per_s,
                    ratio(r.vs_copy)
                );
            }
            if let Some(x) = &b.naive {
                let _ = writeln!(
                    o,
                    "  naive bridge (INSERT per message)     {:>8.0}   {}",
                    x.committed_per_s,
                    ratio(r.vs_naive)
                );
            }
            for sk in &b.skipped {
                let _ = writeln!(o, "  skipped: {sk}");
            }
            row(
                &mut o,
                "silverguard, best sustained step",
                if r.silverguard_per_s > 0.0 {
                    format!(
                        "{:.0}/s = {} of the slower of broker and COPY",
                        r.silverguard_per_s,
                        ratio(r.vs_slower_limit)
                    )
                } else {
                    "none: no step was sustained (see the steps above)".into()
                },
            );
        }
        if let Some(st) = &self.storage {
            row(
                &mut o,
                "storage per heartbeat",
                format!(
                    "{} bytes ({} rows, {:.1} MiB with indexes)",
                    st.bytes_per_row.map_or("-".into(), |v| format!("{v:.0}")),
                    st.rows,
                    st.bytes as f64 / 1_048_576.0
                ),
            );
        }
        if let Some(l) = &self.latest_table {
            row(
                &mut o,
                "device_latest updates",
                format!(
                    "{} ({} HOT, no index entry), table {:.1} MiB with indexes",
                    l.updates,
                    l.hot_pct.map_or("-".into(), |p| format!("{p:.0} %")),
                    l.bytes as f64 / 1_048_576.0
                ),
            );
        }
        if let Some(c) = self.baselines.copy.as_ref().and_then(|c| c.bytes_per_row) {
            row(
                &mut o,
                "storage per row, COPY baseline",
                format!("{c:.0} bytes"),
            );
        }
        let t5 = &self.targets5;
        let yn = |v: Option<bool>| match v {
            Some(true) => "met",
            Some(false) => "NOT MET",
            None => "not shown by this run",
        };
        let _ = writeln!(o);
        let _ = writeln!(o, "targets (issue 5)");
        row(
            &mut o,
            ">= 20,000 hb/s for 5 min, no loss",
            yn(t5.sustained_20k_5min).into(),
        );
        row(
            &mut o,
            ">= 80 % of the slower limit",
            yn(t5.ratio_80_percent).into(),
        );
        row(
            &mut o,
            "SOS p99 <= 500 ms at 80 % load",
            format!(
                "{}{}",
                yn(t5.sos_p99_at_80_percent_load),
                match (
                    t5.sos_p99_at_80_percent_load_ms,
                    t5.sos_p99_at_80_percent_load_rate
                ) {
                    (Some(p), Some(r)) => format!(" ({p:.0} ms at {r:.0} hb/s)"),
                    _ => String::new(),
                }
            ),
        );
        row(
            &mut o,
            "RSS <= 256 MiB, >= 100k devices",
            yn(t5.rss_256mib_100k_devices).into(),
        );
        let t = &self.target;
        let verdict = if self.settings.smoke {
            // The smoke run checks loss, not speed.
            "not evaluated in a smoke run"
        } else if t.met {
            "MET"
        } else {
            "NOT MET"
        };
        let _ = writeln!(
            o,
            "target (issue 3): p99 <= {:.0} ms at {:.0} hb/s: {} (rate {}, p99 {})",
            t.p99_limit_ms,
            t.rate_required_per_s,
            verdict,
            if t.rate_met { "met" } else { "not met" },
            if t.p99_met { "met" } else { "not met" }
        );
        if self.passed {
            let _ = writeln!(o, "result: PASS (no SOS and no heartbeat lost)");
        } else {
            let _ = writeln!(o, "result: FAIL: {}", self.failures.join("; "));
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(p99: f64, committed_per_s: f64, lost: u64) -> BenchReport {
        let mut r = BenchReport::default();
        r.settings.offered_rate_per_s = 5000.0;
        r.heartbeats.published = 1000;
        r.heartbeats.committed = 1000 - lost;
        r.heartbeats.lost = lost;
        r.heartbeats.committed_per_s = committed_per_s;
        r.sos_loaded.published = 3;
        r.sos_loaded.delivered = 3;
        r.sos_loaded.latency.p99_ms = Some(p99);
        r
    }

    #[test]
    fn the_cpu_layout_is_one_line_and_says_what_it_does_not_know() {
        let pinned = CpuLayout {
            broker: vec!["0".into()],
            postgres: Some("1".into()),
            bench: Some("1".into()),
            silverguard: Some("1".into()),
        };
        assert_eq!(
            pinned.line(),
            "broker 0; PostgreSQL 1; bench 1; silverguard 1"
        );
        let two_brokers = CpuLayout {
            broker: vec!["0".into(), "0-1".into()],
            ..CpuLayout::default()
        };
        assert_eq!(
            two_brokers.line(),
            "broker 0 and 0-1; PostgreSQL ?; bench ?; silverguard ?"
        );
        assert_eq!(
            CpuLayout::default().line(),
            "broker ?; PostgreSQL ?; bench ?; silverguard ?"
        );
    }

    #[test]
    fn a_step_the_broker_carried_by_queueing_is_not_sustained() {
        let mut s = ramp_step(42_500.0, 42_482.0, 0);
        assert!(
            s.is_sustained(),
            "broker figures unknown: the other tests decide"
        );
        s.broker_kept_up = Some(true);
        assert!(s.is_sustained());
        s.broker_kept_up = Some(false);
        assert!(!s.is_sustained());
    }

    fn ramp_step(offered: f64, committed: f64, lost: u64) -> Step {
        let mut s = Step {
            offered_per_s: offered,
            committed_per_s: committed,
            lost,
            drained: true,
            ..Step::default()
        };
        s.lag.latency.p99_ms = Some(200.0);
        s
    }

    #[test]
    fn the_ratio_counts_sustained_steps_and_losses_name_their_steps() {
        let mut r = report(100.0, 60_000.0, 700);
        r.baselines.broker = Some(crate::bench::baselines::BrokerBaseline {
            received_per_s: 60_000.0,
            limit_per_s: 60_000.0,
            ..crate::bench::baselines::BrokerBaseline::default()
        });
        r.steps = vec![
            // A backlog drained in the first window: more committed than offered, late.
            Step {
                lag: LagSummary {
                    latency: LatencySummary {
                        p99_ms: Some(5_900.0),
                        ..LatencySummary::default()
                    },
                    ..LagSummary::default()
                },
                ..ramp_step(40_000.0, 56_000.0, 0)
            },
            ramp_step(48_000.0, 47_900.0, 0),
            ramp_step(50_000.0, 45_000.0, 700),
        ];
        r.judge();
        assert_eq!(r.ratios.silverguard_per_s, 47_900.0);
        assert_eq!(r.targets5.ratio_80_percent, Some(false));
        assert!(
            r.failures[0].contains("above the highest sustained rate, 48000/s"),
            "{:?}",
            r.failures
        );
        // A loss at a rate the service otherwise sustains is not called overload.
        r.steps[0] = ramp_step(40_000.0, 39_000.0, 5);
        r.steps[1].lost = 0;
        r.judge();
        assert!(
            r.failures[0].ends_with("(in the steps offered 40000, 50000/s)"),
            "{:?}",
            r.failures
        );
    }

    #[test]
    fn the_broker_ratio_is_against_the_higher_limit_of_before_and_after() {
        let broker = |limit_per_s: f64| crate::bench::baselines::BrokerBaseline {
            received_per_s: limit_per_s,
            limit_per_s,
            limit_held: true,
            ..crate::bench::baselines::BrokerBaseline::default()
        };
        let mut r = report(100.0, 40_000.0, 0);
        r.steps = vec![ramp_step(44_000.0, 44_000.0, 0)];
        r.baselines.broker = Some(broker(50_000.0));
        r.judge();
        assert_eq!(r.ratios.vs_slower_limit, Some(0.88));
        assert_eq!(r.ratios.broker_limit_change, None);
        // The machine was slower by the end: the earlier, higher limit still counts.
        r.baselines.broker_after = Some(broker(40_000.0));
        r.judge();
        assert_eq!(r.ratios.vs_slower_limit, Some(0.88));
        let change = r.ratios.broker_limit_change.unwrap_or(0.0);
        assert!((change + 0.2).abs() < 1e-9, "{change}");
        assert!(r
            .table()
            .contains("moved -20 % during the run: the machine's speed"));
        // Faster by the end: the later limit counts, and the target is missed.
        r.baselines.broker_after = Some(broker(56_000.0));
        r.judge();
        assert_eq!(r.ratios.vs_slower_limit, Some(44_000.0 / 56_000.0));
        assert_eq!(r.ratios.broker_limit_per_s, Some(56_000.0));
        assert_eq!(r.targets5.ratio_80_percent, Some(false));
        // Within 10 %: said, not warned about.
        r.baselines.broker_after = Some(broker(53_000.0));
        r.judge();
        assert!(r
            .table()
            .contains("moved +6 % during the run; the ratio is against the higher"));
        // A flood's figure is not compared with a probe that held: the probe's limit counts.
        let mut flood = broker(70_000.0);
        flood.limit_held = false;
        r.baselines.broker_after = Some(flood);
        r.judge();
        assert_eq!(r.ratios.vs_slower_limit, Some(0.88));
        assert_eq!(r.ratios.broker_limit_per_s, Some(50_000.0));
        assert_eq!(r.ratios.broker_limit_change, None);
        assert!(r.table().contains("the two limits are of different kinds"));
        // Only the later one (the first could not run).
        r.baselines.broker_after = Some(broker(56_000.0));
        r.baselines.broker = None;
        r.judge();
        assert_eq!(r.ratios.vs_slower_limit, Some(44_000.0 / 56_000.0));
        assert_eq!(r.ratios.broker_limit_change, None);
    }

    #[test]
    fn verdicts() {
        let mut r = report(120.0, 4990.0, 0);
        r.judge();
        assert!(r.passed && r.target.met, "{:?}", r.failures);
        let mut r = report(700.0, 5000.0, 0);
        r.judge();
        assert!(r.passed && !r.target.met && r.target.rate_met && !r.target.p99_met);
        let mut r = report(100.0, 5000.0, 3);
        r.judge();
        assert!(!r.passed && r.failures[0].contains("3 of 1000"));
        let mut r = report(100.0, 5000.0, 0);
        r.sos_loaded.lost = 1;
        r.judge();
        assert!(!r.passed && !r.target.p99_met);
        assert!(r.table().contains("FAIL"));
    }
}
