//! Alerts: decide when something is wrong and make sure a human answers.
//!
//! - Events (SOS, fall, cancel, low battery, service call) are handled inside the event
//!   lane's transaction ([`on_event`]): the event row, its alert and the notifications due
//!   commit together or not at all.
//! - Telemetry rules run as heartbeats commit ([`run_telemetry_rules`]), with per-device
//!   state in memory and the start of every condition in `rule_state`.
//! - A sweeper ([`run_sweeper`]) takes due escalation steps (`FOR UPDATE SKIP LOCKED`),
//!   raises silence alerts from an indexed deadline, resolves them when data returns, and
//!   runs the daily knock once a day across all instances.
//!
//! The lifecycle SQL is in [`engine`], the pure rule state machines in [`rules`].

pub mod admin;
pub mod engine;
pub use silverguard_core::rules;
pub mod settings;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use deadpool_postgres::Pool;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_postgres::Transaction;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::ingest::validate::{DeviceEvent, EventKind, Heartbeat};
use crate::store::StoreError;
use engine::{subject_of, NewAlert};
use rules::{ElderContext, Evaluator, Transition};
use settings::{AlertSettings, Threshold};

/// Severity of each alert kind the engine raises.
pub fn severity_of(kind: &str) -> &'static str {
    match kind {
        "sos" | "fall" => "critical",
        "hr_high" | "hr_low" | "spo2_low" | "geofence_exit" => "high",
        "temp_high" | "bp_high" | "device_silent" | "wellness_check" => "medium",
        _ => "low",
    }
}

fn static_kind(rule: &str) -> &'static str {
    rules::VITAL_RULES
        .iter()
        .find(|r| **r == rule)
        .copied()
        .unwrap_or("unknown")
}

/// Called by the event lane inside the transaction that inserted the event.
pub async fn on_event(
    tx: &Transaction<'_>,
    e: &DeviceEvent,
    event_id: i64,
    settings: &AlertSettings,
) -> Result<Option<i64>, StoreError> {
    let elder_id: Option<i64> = tx
        .query_opt(
            "SELECT elder_id FROM devices WHERE device_id = $1",
            &[&e.device_id],
        )
        .await?
        .and_then(|r| r.get(0));
    let location = e.location.map(|l| (l.lat_e7, l.lon_e7));
    let new = |kind: &'static str, detail: serde_json::Value| NewAlert {
        elder_id,
        device_id: e.device_id.clone(),
        kind,
        severity: severity_of(kind),
        occurred_at: e.occurred_at,
        source_event_id: Some(event_id),
        location,
        detail,
    };
    match e.kind {
        EventKind::Sos => {
            let o = engine::open_or_repeat(
                tx,
                &new("sos", json!({"battery_pct": e.battery_pct})),
                settings,
                None,
            )
            .await?;
            Ok(Some(o.alert_id))
        }
        EventKind::Fall => {
            lock_device(tx, &e.device_id).await?;
            let o = engine::open_or_repeat(
                tx,
                &new("fall", json!({"battery_pct": e.battery_pct})),
                settings,
                Some(settings.fall_cancel_window),
            )
            .await?;
            // Events are committed in parallel, so the wearer's cancel may have been
            // committed first: it still counts if it came within the window.
            let window = settings.fall_cancel_window.as_secs_f64();
            let cancel = tx
                .query_opt(
                    "SELECT id FROM device_events
                     WHERE device_id = $1 AND kind = 'sos_cancel'
                       AND occurred_at >= $2 AND occurred_at <= $2 + make_interval(secs => $3)
                     ORDER BY occurred_at LIMIT 1",
                    &[&e.device_id, &e.occurred_at, &window],
                )
                .await?;
            if let (true, Some(c)) = (o.new, cancel) {
                engine::wearer_cancelled(
                    tx,
                    &subject_of(elder_id, &e.device_id),
                    c.get(0),
                    settings,
                )
                .await?;
            }
            Ok(Some(o.alert_id))
        }
        EventKind::SosCancel => {
            lock_device(tx, &e.device_id).await?;
            engine::wearer_cancelled(tx, &subject_of(elder_id, &e.device_id), event_id, settings)
                .await
        }
        EventKind::LowBattery => {
            let o = engine::open_or_repeat(
                tx,
                &new("low_battery", json!({"battery_pct": e.battery_pct})),
                settings,
                None,
            )
            .await?;
            Ok(Some(o.alert_id))
        }
        EventKind::ServiceCall => {
            tx.execute(
                "INSERT INTO work_orders (elder_id, device_id, source_event_id, source, requested_at)
                 VALUES ($1, $2, $3, 'device', $4) ON CONFLICT (source_event_id) DO NOTHING",
                &[&elder_id, &e.device_id, &event_id, &e.occurred_at],
            )
            .await?;
            Ok(None)
        }
        EventKind::WornOff | EventKind::WornOn | EventKind::PowerOff => Ok(None),
    }
}

/// Serializes a device's fall and cancel handling: whichever commits second sees the first.
async fn lock_device(tx: &Transaction<'_>, device_id: &str) -> Result<(), StoreError> {
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('sg-device:' || $1))",
        &[&device_id],
    )
    .await?;
    Ok(())
}

/// What the rules need per device, loaded for the whole fleet in one query and reloaded
/// every 30 s: a per-heartbeat lookup would cost a query per reading. Devices share one
/// context per elder, and unbound devices share the fleet default.
struct ContextCache {
    default: Arc<ElderContext>,
    by_device: HashMap<String, Arc<ElderContext>>,
    loaded: Option<Instant>,
}

const CONTEXT_RELOAD: Duration = Duration::from_secs(30);

impl ContextCache {
    fn new(defaults: BTreeMap<String, Threshold>) -> Self {
        ContextCache {
            default: Arc::new(ElderContext {
                thresholds: defaults,
                ..Default::default()
            }),
            by_device: HashMap::new(),
            loaded: None,
        }
    }

    async fn reload_if_due(&mut self, pool: &Pool) -> Result<(), StoreError> {
        if self.loaded.is_some_and(|t| t.elapsed() < CONTEXT_RELOAD) {
            return Ok(());
        }
        let client = pool.get().await?;
        let rows = client
            .query(
                "SELECT d.device_id, d.elder_id, e.thresholds, e.home_lat_e7, e.home_lon_e7,
                        e.home_radius_m, e.wander_risk
                 FROM devices d JOIN elders e ON e.id = d.elder_id",
                &[],
            )
            .await?;
        let mut per_elder: HashMap<i64, Arc<ElderContext>> = HashMap::new();
        let mut by_device = HashMap::with_capacity(rows.len());
        for r in &rows {
            let elder_id: i64 = r.get(1);
            let ctx = per_elder
                .entry(elder_id)
                .or_insert_with(|| Arc::new(self.elder_context(elder_id, r)))
                .clone();
            by_device.insert(r.get::<_, String>(0), ctx);
        }
        self.by_device = by_device;
        self.loaded = Some(Instant::now());
        Ok(())
    }

    fn elder_context(&self, elder_id: i64, r: &tokio_postgres::Row) -> ElderContext {
        let mut ctx = ElderContext {
            elder_id: Some(elder_id),
            thresholds: self.default.thresholds.clone(),
            ..Default::default()
        };
        if let Some(serde_json::Value::Object(map)) = r.get::<_, Option<serde_json::Value>>(2) {
            for (rule, v) in map {
                match serde_json::from_value::<Threshold>(v) {
                    Ok(t) => {
                        ctx.thresholds.insert(rule, t);
                    }
                    Err(e) => {
                        tracing::warn!(elder_id, rule, error = %e, "ignoring invalid threshold override")
                    }
                }
            }
        }
        let (lat, lon, radius): (Option<i32>, Option<i32>, Option<i32>) =
            (r.get(3), r.get(4), r.get(5));
        if let (Some(lat), Some(lon)) = (lat, lon) {
            ctx.home = Some((
                lat as f64 / 1e7,
                lon as f64 / 1e7,
                radius.unwrap_or(300) as f64,
            ));
        }
        ctx.wander_risk = r.get::<_, Option<bool>>(6).unwrap_or(false);
        ctx
    }

    fn get(&self, device_id: &str) -> Arc<ElderContext> {
        self.by_device
            .get(device_id)
            .cloned()
            .unwrap_or_else(|| self.default.clone())
    }
}

/// Evaluates telemetry rules on committed heartbeats.
pub async fn run_telemetry_rules(
    mut rx: mpsc::Receiver<Vec<Heartbeat>>,
    pool: Pool,
    settings: AlertSettings,
    cancel: CancellationToken,
) {
    let mut evaluator = Evaluator::default();
    // Conditions in progress survive restarts.
    loop {
        match restore(&pool, &mut evaluator).await {
            Ok(n) => {
                tracing::info!(conditions = n, "rule state restored");
                break;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot load rule state, retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = cancel.cancelled() => return,
                }
            }
        }
    }
    let mut cache = ContextCache::new(settings.thresholds.clone());
    while let Some(batch) = rx.recv().await {
        if let Err(e) = cache.reload_if_due(&pool).await {
            // Keep the previous contexts; a stale binding is better than no rules.
            tracing::warn!(error = %e, "rule contexts not reloaded; using the previous ones");
        }
        for hb in &batch {
            let ctx = cache.get(&hb.device_id);
            let day = rules::is_day(
                hb.ts,
                settings.utc_offset_hours,
                settings.day_starts_hour,
                settings.day_ends_hour,
            );
            for t in evaluator.observe(hb, &ctx, day) {
                if let Err(e) = apply(&pool, hb, &ctx, &t, &settings).await {
                    tracing::error!(device_id = %hb.device_id, transition = ?t, error = %e, "rule transition not stored");
                    if let Transition::Fire { rule, .. } = t {
                        // Not raised: the next reading that still meets the rule fires again.
                        evaluator.rearm(&hb.device_id, rule);
                    }
                }
            }
        }
    }
}

async fn restore(pool: &Pool, evaluator: &mut Evaluator) -> Result<usize, StoreError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT r.device_id, r.rule, r.since,
                    EXISTS (SELECT 1 FROM alerts a WHERE a.device_id = r.device_id AND a.kind = r.rule
                                                     AND a.status <> 'resolved')
             FROM rule_state r",
            &[],
        )
        .await?;
    for r in &rows {
        evaluator.restore(r.get(0), r.get(1), r.get(2), r.get(3));
    }
    Ok(rows.len())
}

async fn apply(
    pool: &Pool,
    hb: &Heartbeat,
    ctx: &ElderContext,
    t: &Transition,
    settings: &AlertSettings,
) -> Result<(), StoreError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let subject = subject_of(ctx.elder_id, &hb.device_id);
    match t {
        Transition::Started { rule, since } => {
            tx.execute(
                "INSERT INTO rule_state (device_id, rule, since) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                &[&hb.device_id, rule, since],
            )
            .await?;
        }
        Transition::Fire { rule, since, value } => {
            // The database is the shared truth when several instances see this device.
            let since: DateTime<Utc> = tx
                .query_one(
                    "INSERT INTO rule_state (device_id, rule, since) VALUES ($1, $2, $3)
                     ON CONFLICT (device_id, rule) DO UPDATE SET since = rule_state.since
                     RETURNING since",
                    &[&hb.device_id, rule, since],
                )
                .await?
                .get(0);
            let kind = static_kind(rule);
            let sustained = (hb.ts - since).num_seconds();
            engine::open_or_repeat(
                &tx,
                &NewAlert {
                    elder_id: ctx.elder_id,
                    device_id: hb.device_id.clone(),
                    kind,
                    severity: severity_of(kind),
                    occurred_at: since,
                    source_event_id: None,
                    location: hb.location.map(|l| (l.lat_e7, l.lon_e7)),
                    detail: json!({"value": value, "sustained_s": sustained, "threshold": ctx.thresholds.get(*rule).map(|t| json!({"above": t.above, "below": t.below, "for_s": t.sustain.as_secs()}))}),
                },
                settings,
                None,
            )
            .await?;
        }
        Transition::Cleared { rule } => {
            tx.execute(
                "DELETE FROM rule_state WHERE device_id = $1 AND rule = $2",
                &[&hb.device_id, rule],
            )
            .await?;
            engine::auto_resolve(
                &tx,
                &subject,
                static_kind(rule),
                json!({"cleared_at": hb.ts}),
            )
            .await?;
        }
    }
    tx.commit().await?;
    Ok(())
}

/// Escalation steps, silence, recovery from silence and the daily knock.
pub async fn run_sweeper(
    pool: Pool,
    settings: AlertSettings,
    max_clock_ahead: Duration,
    metrics: crate::metrics::SilenceMetrics,
    cancel: CancellationToken,
) {
    let started = Instant::now();
    let mut last_wellness_check = Instant::now() - Duration::from_secs(3600);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(settings.sweep_interval) => {}
            _ = cancel.cancelled() => return,
        }
        let mut client = match pool.get().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "sweeper: database unavailable");
                continue;
            }
        };
        loop {
            match engine::run_due_steps(&mut client, &settings).await {
                Ok(100) => continue, // more may be due
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "escalation sweep failed; will retry");
                    break;
                }
            }
        }
        if started.elapsed() >= settings.silence_grace {
            let t = Instant::now();
            let swept =
                sweep_silence(&mut client, &settings, max_clock_ahead, &metrics, &cancel).await;
            metrics.sweep_seconds.observe(t.elapsed().as_secs_f64());
            if let Err(e) = swept {
                tracing::warn!(error = %e, "silence sweep failed; will retry");
            }
        }
        if last_wellness_check.elapsed() >= Duration::from_secs(30) {
            last_wellness_check = Instant::now();
            if let Err(e) = daily_knock(&mut client, &settings, Utc::now()).await {
                tracing::warn!(error = %e, "daily knock failed; will retry");
            }
        }
    }
}

/// Devices whose silence deadline has come, read per statement: a few batches a sweep keep up
/// with a city's fleet (100,000 bracelets every 2 s with factor 15 reach 3,300 deadlines a
/// second), and a batch stays one short transaction even when every device in it is found
/// silent (each alert and its notifications are written in it: about 3 ms apiece).
const SILENCE_BATCH: i64 = 1_000;

/// How long one sweep may spend on due deadlines before it lets escalation steps run again.
const SILENCE_SWEEP_BUDGET: Duration = Duration::from_secs(1);

/// One statement that takes devices matching `which` (locked, skipping rows another
/// instance holds), reads each one's newest heartbeat, and writes the result back: the
/// last-seen time, a deadline one threshold after it, the snapshot of that heartbeat, and
/// `silence_alerted` when the deadline has passed. `$1` is the silence factor. It is the
/// same probe as the view `device_current` (migration 0007): heartbeats at or after the
/// snapshot's, newest first, up to `$2` seconds ahead (`ingest.max_clock_ahead`: no stored
/// heartbeat is later), which prunes the partitions of the days ahead.
///
/// The batch is picked first, in the order of the deadline index (a range scan that stops
/// after the batch), and probed afterwards: with the probe below the `LIMIT`, PostgreSQL
/// probed every due device's heartbeats and sorted them all, so a fleet-wide wave of
/// deadlines made each batch of 1,000 cost as much as the whole wave. In `deadline_sets`, `{seen}` and
/// `{deadline}` stand for the new last-seen time and deadline. Both are computed from the row
/// as the `UPDATE` finds it (an ingest flush may have moved it since the batch was read), so
/// neither the last-seen time nor the snapshot ever goes back.
fn silence_sweep_sql(which: &str, deadline_sets: &str) -> String {
    use crate::ingest::writer::{heartbeat_column, LATEST_HB_COLUMNS};
    // The snapshot the ingest tracker writes, `last_hb_at` first.
    let snapshot: Vec<(&str, &str)> = std::iter::once("last_hb_at")
        .chain(LATEST_HB_COLUMNS)
        .map(|l| (l, heartbeat_column(l)))
        .collect();
    let picked: Vec<String> = snapshot
        .iter()
        .map(|(_, h)| h)
        .chain([&"received_at"])
        .map(|h| format!("h.{h} AS hb_{h}"))
        .collect();
    let sets: Vec<String> = snapshot
        .iter()
        .map(|(l, h)| {
            format!(
                "{l} = CASE WHEN c.hb_ts IS NULL OR c.hb_ts < l.last_hb_at THEN l.{l} ELSE c.hb_{h} END"
            )
        })
        .collect();
    let seen = "greatest(l.last_seen_at, c.hb_received_at)";
    let deadline = format!("({seen} + c.threshold)");
    let deadline_sets = deadline_sets
        .replace("{seen}", seen)
        .replace("{deadline}", &deadline);
    format!(
        "WITH due AS (
             SELECT l.device_id, l.last_hb_at, d.elder_id, d.heartbeat_interval_s
             FROM device_latest l JOIN devices d USING (device_id)
             WHERE {which} AND l.last_seen_at IS NOT NULL
             ORDER BY l.silence_check_at LIMIT {SILENCE_BATCH}
             FOR UPDATE OF l SKIP LOCKED
         ), c AS (
             SELECT due.device_id, due.elder_id, due.heartbeat_interval_s,
                    make_interval(secs => due.heartbeat_interval_s * $1::float8) AS threshold,
                    {picked}
             FROM due
             LEFT JOIN LATERAL (
                 SELECT hb.* FROM heartbeats hb
                 WHERE hb.device_id = due.device_id
                   AND hb.ts >= coalesce(due.last_hb_at, '-infinity')
                   AND hb.ts <= now() + make_interval(secs => $2::float8)
                 ORDER BY hb.ts DESC, hb.seq DESC
                 LIMIT 1
             ) h ON true
         )
         UPDATE device_latest l
         SET last_seen_at = {seen},
             {deadline_sets},
             {sets}
         FROM c
         WHERE l.device_id = c.device_id
         RETURNING l.device_id, c.elder_id, l.last_seen_at, c.heartbeat_interval_s, l.silence_alerted",
        picked = picked.join(", "),
        sets = sets.join(",\n             "),
    )
}

/// Devices whose (possibly early) deadline has come: confirmed silent, or moved forward.
static SILENCE_DUE_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    silence_sweep_sql(
        "l.silence_check_at <= now() AND NOT l.silence_alerted",
        "silent_after = {deadline}, silence_check_at = {deadline}, \
         silence_alerted = {deadline} <= now()",
    )
});

/// Alerted devices, a batch at a time, oldest check first: those whose data came back are
/// re-armed with a new deadline, the others are looked at again [`BACK_RECHECK`] later.
/// For an alerted row `silence_check_at` is the time of its next look (partial index
/// `device_latest_silence_alerted`): after a fleet-wide outage each sweep probes one batch,
/// not every silent device.
static SILENCE_BACK_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    silence_sweep_sql(
        "l.silence_alerted AND l.silence_check_at <= now()",
        &format!(
            "silent_after = CASE WHEN c.hb_received_at > l.last_seen_at THEN {{deadline}} \
                                 ELSE l.silent_after END, \
             silence_check_at = CASE WHEN c.hb_received_at > l.last_seen_at THEN {{deadline}} \
                                     ELSE now() + interval '{} milliseconds' END, \
             silence_alerted = NOT coalesce(c.hb_received_at > l.last_seen_at, false)",
            BACK_RECHECK.as_millis()
        ),
    )
});

/// How long an alerted device waits between two looks for its data.
const BACK_RECHECK: Duration = Duration::from_secs(2);

/// Silence, from the stored heartbeats (migration 0007): ingest no longer rewrites a
/// device's row for every heartbeat, so the row's deadline is a lower bound. When it comes,
/// the newest heartbeat says whether the device really went quiet; if not, the deadline
/// moves to one threshold after it. A device reporting steadily is read here once per
/// threshold (1 in `silence_factor` heartbeats).
async fn sweep_silence(
    client: &mut deadpool_postgres::Client,
    settings: &AlertSettings,
    max_clock_ahead: Duration,
    metrics: &crate::metrics::SilenceMetrics,
    cancel: &CancellationToken,
) -> Result<(), StoreError> {
    let ahead = max_clock_ahead.as_secs_f64();
    // Each part runs even when an earlier one failed: a device whose alert cannot be
    // written must not keep every other device from being re-armed.
    let rechecked = recheck_changed_intervals(client).await;
    let due = sweep_due(client, settings, ahead, metrics, cancel).await;
    let back = sweep_back(client, settings, ahead, metrics).await;
    rechecked.and(due).and(back)
}

/// Devices whose heartbeat interval changed (queued by the trigger of migration 0007) are
/// due at once, so a shorter interval's deadline applies from this sweep. Queued rather than
/// updated by the trigger itself: a bulk import that changes thousands of intervals would
/// otherwise hold their `device_latest` rows until it commits, and ingest's flush with them.
async fn recheck_changed_intervals(
    client: &mut deadpool_postgres::Client,
) -> Result<(), StoreError> {
    let tx = client.transaction().await?;
    let ids: Vec<String> = tx
        .query(
            "DELETE FROM silence_rechecks WHERE device_id IN (
                 SELECT device_id FROM silence_rechecks LIMIT 1000 FOR UPDATE SKIP LOCKED)
             RETURNING device_id",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !ids.is_empty() {
        // Locked in device order, as ingest's flush does: no deadlock with it.
        tx.execute(
            "WITH r AS (SELECT device_id FROM device_latest
                        WHERE device_id = ANY($1) AND NOT silence_alerted
                        ORDER BY device_id FOR UPDATE)
             UPDATE device_latest l SET silence_check_at = now() FROM r
             WHERE l.device_id = r.device_id",
            &[&ids],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Due deadlines, a batch at a time: confirmed silent (alert raised in the same
/// transaction) or moved forward.
async fn sweep_due(
    client: &mut deadpool_postgres::Client,
    settings: &AlertSettings,
    ahead: f64,
    metrics: &crate::metrics::SilenceMetrics,
    cancel: &CancellationToken,
) -> Result<(), StoreError> {
    let started = Instant::now();
    let factor = settings.silence_factor as f64;
    loop {
        let mut raised = 0;
        let mut moved = 0;
        let tx = client.transaction().await?;
        // Prepared once per connection: planning this statement over the day partitions
        // took about as long as a tenth of a batch.
        let due = tx.prepare_cached(SILENCE_DUE_SQL.as_str()).await?;
        let rows = tx.query(&due, &[&factor, &ahead]).await?;
        for r in &rows {
            let alerted: bool = r.get(4);
            if !alerted {
                moved += 1;
                continue;
            }
            let device_id: String = r.get(0);
            let last_seen: DateTime<Utc> = r.get(2);
            let interval: i32 = r.get(3);
            let span = tracing::info_span!("silence", device_id = %device_id);
            engine::open_or_repeat(
                &tx,
                &NewAlert {
                    elder_id: r.get(1),
                    device_id: device_id.clone(),
                    kind: "device_silent",
                    severity: severity_of("device_silent"),
                    occurred_at: last_seen,
                    source_event_id: None,
                    location: None,
                    detail: json!({"last_seen_at": last_seen, "threshold_s": interval as i64 * settings.silence_factor as i64}),
                },
                settings,
                None,
            )
            .instrument(span)
            .await?;
            raised += 1;
        }
        tx.commit().await?;
        metrics.deadlines_moved.inc_by(moved);
        metrics.alerts_raised.inc_by(raised);
        if raised > 0 {
            tracing::warn!(devices = raised, "device silence alerts raised");
        }
        // A fleet-wide wave of deadlines takes many batches. Escalation steps run in the same
        // task, so the rest waits for the next sweep rather than delay them; shutdown need
        // not wait for it either (what is left is still due at the next start).
        if (rows.len() as i64) < SILENCE_BATCH
            || started.elapsed() >= SILENCE_SWEEP_BUDGET
            || cancel.is_cancelled()
        {
            return Ok(());
        }
    }
}

/// Data came back: re-arm the alerted devices that reported since, then resolve their open
/// silence alerts.
async fn sweep_back(
    client: &mut deadpool_postgres::Client,
    settings: &AlertSettings,
    ahead: f64,
    metrics: &crate::metrics::SilenceMetrics,
) -> Result<(), StoreError> {
    let factor = settings.silence_factor as f64;
    let tx = client.transaction().await?;
    let back_sql = tx.prepare_cached(SILENCE_BACK_SQL.as_str()).await?;
    let looked = tx.query(&back_sql, &[&factor, &ahead]).await?;
    let rearmed = looked.iter().filter(|r| !r.get::<_, bool>(4)).count();
    metrics.rearmed.inc_by(rearmed as u64);
    let back = tx
        .query(
            "SELECT a.subject FROM alerts a JOIN device_latest l ON l.device_id = a.device_id
             WHERE a.kind = 'device_silent' AND a.status <> 'resolved'
               AND l.last_seen_at > a.occurred_at AND NOT l.silence_alerted
             FOR UPDATE OF a SKIP LOCKED",
            &[],
        )
        .await?;
    for r in &back {
        let subject: String = r.get(0);
        engine::auto_resolve(
            &tx,
            &subject,
            "device_silent",
            json!({"why": "data received again"}),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// The daily knock: by the configured local time, an elder whose bracelets show no sign of
/// life today (not worn, no steps, no events) gets a wellness check by their grid worker.
pub async fn daily_knock(
    client: &mut deadpool_postgres::Client,
    settings: &AlertSettings,
    now: DateTime<Utc>,
) -> Result<Option<usize>, StoreError> {
    let Some(check_min) = settings.wellness_minute() else {
        return Ok(None);
    };
    let offset = TimeDelta::hours(settings.utc_offset_hours as i64);
    let local = now + offset;
    let local_day = local.date_naive();
    let minutes = (local
        - local_day
            .and_hms_opt(0, 0, 0)
            .map(|d| d.and_utc())
            .unwrap_or(local))
    .num_minutes();
    if minutes < check_min as i64 {
        return Ok(None);
    }
    let midnight_utc = local_day
        .and_hms_opt(0, 0, 0)
        .map(|d| d.and_utc() - offset)
        .unwrap_or(now);
    let tx = client.transaction().await?;
    let claimed = tx
        .execute(
            "INSERT INTO wellness_runs (day, checked, raised) VALUES ($1, 0, 0) ON CONFLICT DO NOTHING",
            &[&local_day],
        )
        .await?;
    if claimed == 0 {
        return Ok(None); // done today, by us or another instance
    }
    let rows = tx
        .query(
            "SELECT e.id, min(d.device_id)
             FROM elders e JOIN devices d ON d.elder_id = e.id
             -- A bracelet handed out today has had no chance to show a sign of life.
             WHERE d.created_at < $1
             GROUP BY e.id
             HAVING NOT bool_or(EXISTS (
                        SELECT 1 FROM heartbeats h
                        WHERE h.device_id = d.device_id AND h.ts >= $1
                          AND (h.worn OR coalesce(h.steps_today, 0) > 0)))
                AND NOT bool_or(EXISTS (
                        SELECT 1 FROM device_events v
                        WHERE v.device_id = d.device_id AND v.occurred_at >= $1
                          AND v.kind NOT IN ('power_off', 'worn_off', 'low_battery')))",
            &[&midnight_utc],
        )
        .await?;
    let checked: i64 = tx
        .query_one(
            "SELECT count(DISTINCT elder_id) FROM devices WHERE elder_id IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    for r in &rows {
        engine::open_or_repeat(
            &tx,
            &NewAlert {
                elder_id: Some(r.get(0)),
                device_id: r.get(1),
                kind: "wellness_check",
                severity: severity_of("wellness_check"),
                occurred_at: now,
                source_event_id: None,
                location: None,
                detail: json!({"day": local_day.to_string(), "why": "no sign of life today"}),
            },
            settings,
            None,
        )
        .await?;
    }
    tx.execute(
        "UPDATE wellness_runs SET checked = $2, raised = $3 WHERE day = $1",
        &[&local_day, &(checked as i32), &(rows.len() as i32)],
    )
    .await?;
    tx.commit().await?;
    tracing::info!(day = %local_day, checked, raised = rows.len(), "daily knock done");
    Ok(Some(rows.len()))
}

#[cfg(test)]
mod silence_sql_tests {
    use super::{SILENCE_BACK_SQL, SILENCE_DUE_SQL};

    #[test]
    fn the_silence_statements_have_every_placeholder_filled() {
        for sql in [SILENCE_DUE_SQL.as_str(), SILENCE_BACK_SQL.as_str()] {
            assert!(
                !sql.contains("{seen}") && !sql.contains("{deadline}"),
                "{sql}"
            );
            if std::env::var_os("SG_PRINT_SQL").is_some() {
                println!("{sql};");
            }
        }
    }
}
