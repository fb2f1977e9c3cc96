//! The database side of ingest: one task (or a few) per lane, each committing before it
//! reports `Done` to the ackers.
//!
//! Failure policy, the same everywhere: a transient database error (connection lost, server
//! restarting, read-only during failover, disk full) is retried with capped backoff while
//! the acks stay held, so the broker keeps the messages; a data error that no retry can fix
//! (a poison row) is isolated row by row and the row moves to `ingest_rejects` as
//! `unstorable`, so one bad row cannot wedge the lane.

use std::collections::HashMap;
use std::pin::pin;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use tokio::sync::{mpsc, Mutex};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::validate::{Heartbeat, RejectReason};
use super::{
    AckSenders, EventItem, HeartbeatItem, KnownDevices, PresenceItem, RejectItem, Router,
    UnresolvedItem,
};
use crate::metrics::IngestMetrics;
use crate::store::{self, StoreError};

const HEARTBEAT_COLUMNS: &str = "device_id, ts, seq, received_at, heart_rate_bpm, spo2_pct, \
     systolic_mmhg, diastolic_mmhg, skin_temp_dc, steps_today, battery_pct, worn, lat_e7, lon_e7, \
     loc_accuracy_m, loc_source, clock_skewed, device_ts";

const HEARTBEAT_TYPES: [Type; 18] = [
    Type::TEXT,
    Type::TIMESTAMPTZ,
    Type::INT8,
    Type::TIMESTAMPTZ,
    Type::INT2,
    Type::INT2,
    Type::INT2,
    Type::INT2,
    Type::INT2,
    Type::INT4,
    Type::INT2,
    Type::BOOL,
    Type::INT4,
    Type::INT4,
    Type::INT4,
    Type::INT2,
    Type::BOOL,
    Type::TIMESTAMPTZ,
];

/// What a heartbeat batch write did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchOutcome {
    pub inserted: u64,
    pub duplicates: u64,
}

async fn copy_rows(
    tx: &tokio_postgres::Transaction<'_>,
    table: &str,
    rows: &[&Heartbeat],
) -> Result<u64, tokio_postgres::Error> {
    let sink = tx
        .copy_in(&format!(
            "COPY {table} ({HEARTBEAT_COLUMNS}) FROM STDIN (FORMAT binary)"
        ))
        .await?;
    let mut writer = pin!(BinaryCopyInWriter::new(sink, &HEARTBEAT_TYPES));
    for h in rows {
        let (lat, lon, acc, src) = super::validate::Location::columns(h.location);
        let values: [&(dyn ToSql + Sync); 18] = [
            &h.device_id,
            &h.ts,
            &h.seq,
            &h.received_at,
            &h.heart_rate_bpm,
            &h.spo2_pct,
            &h.systolic_mmhg,
            &h.diastolic_mmhg,
            &h.skin_temp_dc,
            &h.steps_today,
            &h.battery_pct,
            &h.worn,
            &lat,
            &lon,
            &acc,
            &src,
            &h.clock_skewed,
            &h.device_ts,
        ];
        writer.as_mut().write(&values).await?;
    }
    writer.as_mut().finish().await
}

/// Writes heartbeats in one transaction. The fast path COPYs straight into the table; a
/// redelivered message makes the COPY hit the unique index, and only then the batch goes the
/// slower way (COPY into a temporary table, `INSERT ... ON CONFLICT DO NOTHING`). Skewed rows
/// always take the slow way: their time is the receive time, so the unique index cannot see
/// a redelivery and a lookup by the device's own claim does.
pub async fn write_heartbeats(
    pool: &Pool,
    rows: &[&Heartbeat],
) -> Result<BatchOutcome, StoreError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let (skewed, normal): (Vec<&Heartbeat>, Vec<&Heartbeat>) =
        rows.iter().partition(|h| h.clock_skewed);
    let mut inserted = 0;
    if !normal.is_empty() {
        tx.batch_execute("SAVEPOINT fast").await?;
        match copy_rows(&tx, "heartbeats", &normal).await {
            Ok(n) => {
                tx.batch_execute("RELEASE SAVEPOINT fast").await?;
                inserted += n;
            }
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
                tx.batch_execute("ROLLBACK TO SAVEPOINT fast").await?;
                inserted += staged_insert(&tx, &normal, false).await?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    if !skewed.is_empty() {
        inserted += staged_insert(&tx, &skewed, true).await?;
    }
    tx.commit().await?;
    Ok(BatchOutcome {
        inserted,
        duplicates: rows.len() as u64 - inserted,
    })
}

async fn staged_insert(
    tx: &tokio_postgres::Transaction<'_>,
    rows: &[&Heartbeat],
    skewed: bool,
) -> Result<u64, tokio_postgres::Error> {
    tx.batch_execute(
        "CREATE TEMP TABLE IF NOT EXISTS heartbeats_stage (LIKE heartbeats) ON COMMIT DELETE ROWS;
         TRUNCATE heartbeats_stage",
    )
    .await?;
    copy_rows(tx, "heartbeats_stage", rows).await?;
    let sql = if skewed {
        // A skewed redelivery is the same (device, seq, device_ts) received a little later.
        format!(
            "INSERT INTO heartbeats ({HEARTBEAT_COLUMNS})
             SELECT DISTINCT ON (s.device_id, s.seq, s.device_ts) {HEARTBEAT_COLUMNS}
             FROM heartbeats_stage s
             WHERE NOT EXISTS (
                 SELECT 1 FROM heartbeats h
                 WHERE h.clock_skewed AND h.device_id = s.device_id AND h.seq = s.seq
                   AND h.device_ts IS NOT DISTINCT FROM s.device_ts
                   AND h.ts > s.ts - interval '3 days')
             ON CONFLICT DO NOTHING"
        )
    } else {
        format!(
            "INSERT INTO heartbeats ({HEARTBEAT_COLUMNS})
             SELECT {HEARTBEAT_COLUMNS} FROM heartbeats_stage ON CONFLICT DO NOTHING"
        )
    };
    tx.execute(sql.as_str(), &[]).await
}

/// Whether retrying the same write can ever succeed.
fn is_poison(e: &StoreError) -> bool {
    match e {
        StoreError::Db(db) => db.code().is_some_and(|c| {
            let c = c.code();
            c.starts_with("22") || (c.starts_with("23") && c != "23505")
        }),
        _ => false,
    }
}

/// Backoff shared by every retry loop of the lanes.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Backoff(Duration::from_millis(100))
    }
    /// Sleeps, unless cancelled; returns false when cancelled.
    async fn wait(&mut self, cancel: &CancellationToken) -> bool {
        let d = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = cancel.cancelled() => false,
        }
    }
}

/// Updates for `device_latest`, merged in memory and flushed periodically.
#[derive(Debug, Clone)]
pub enum LatestUpdate {
    Seen {
        device_id: String,
        at: DateTime<Utc>,
    },
    Heartbeat(Box<Heartbeat>),
    Presence {
        device_id: String,
        online: bool,
        at: DateTime<Utc>,
    },
}

/// Everything the lane tasks share.
#[derive(Clone)]
pub struct LaneContext {
    pub pool: Pool,
    pub acks: AckSenders,
    pub metrics: IngestMetrics,
    pub latest: mpsc::Sender<Vec<LatestUpdate>>,
    pub router: Router,
    pub cancel: CancellationToken,
    /// Alert rules run inside the event transaction (SOS, fall...).
    pub alerts: Arc<crate::alerts::settings::AlertSettings>,
    /// Committed heartbeats go to the telemetry rules.
    pub rules: Option<mpsc::Sender<Vec<Heartbeat>>>,
    /// The dedicated event connection's index, when there is one: an event that arrives on
    /// another connection too is expected to be found already stored.
    pub event_conn: Option<u16>,
}

impl LaneContext {
    fn observe_commit(&self, received: Instant, ts: DateTime<Utc>) {
        self.observe_commit_at(Instant::now(), Utc::now(), received, ts);
    }

    /// [`Self::observe_commit`] with the clocks read once for a whole batch.
    fn observe_commit_at(
        &self,
        now: Instant,
        wall: DateTime<Utc>,
        received: Instant,
        ts: DateTime<Utc>,
    ) {
        self.metrics
            .pipeline_seconds
            .observe(now.saturating_duration_since(received).as_secs_f64());
        let lag = (wall - ts).num_milliseconds().max(0) as f64 / 1000.0;
        self.metrics.lag_seconds.observe(lag);
    }
}

/// Gathers heartbeats into batches: up to `max_rows`, or whatever arrived within `max_delay`
/// of the batch's first row.
pub async fn run_heartbeat_batcher(
    mut rx: mpsc::Receiver<HeartbeatItem>,
    batches: mpsc::Sender<Vec<HeartbeatItem>>,
    max_rows: usize,
    max_delay: Duration,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = Vec::with_capacity(max_rows.min(16_384));
        batch.push(first);
        let deadline = tokio::time::Instant::now() + max_delay;
        while batch.len() < max_rows {
            tokio::select! {
                biased;
                item = rx.recv() => match item {
                    Some(i) => batch.push(i),
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        if batches.send(batch).await.is_err() {
            return;
        }
    }
}

/// One COPY writer. Several run at once, taking batches from a shared queue.
pub async fn run_heartbeat_writer(
    id: usize,
    batches: Arc<Mutex<mpsc::Receiver<Vec<HeartbeatItem>>>>,
    ctx: LaneContext,
) {
    let commit_seconds = ctx.metrics.commit_seconds("heartbeat");
    loop {
        let batch = {
            let mut rx = batches.lock().await;
            rx.recv().await
        };
        let Some(batch) = batch else { return };
        let span = tracing::debug_span!("heartbeat_batch", writer = id, rows = batch.len());
        async {
            let rows: Vec<&Heartbeat> = batch.iter().map(|i| &i.hb).collect();
            let mut backoff = Backoff::new();
            let started = Instant::now();
            let outcome = loop {
                match write_heartbeats(&ctx.pool, &rows).await {
                    Ok(o) => break Some(o),
                    Err(e) if is_poison(&e) => {
                        tracing::error!(error = %e, "heartbeat batch refused by the database; isolating the bad rows");
                        break Some(write_heartbeats_one_by_one(&ctx, &batch).await);
                    }
                    Err(e) => {
                        ctx.metrics.write_errors.inc();
                        tracing::warn!(error = %e, rows = rows.len(), "heartbeat batch not committed, retrying (acks held)");
                        if !backoff.wait(&ctx.cancel).await {
                            break None;
                        }
                    }
                }
            };
            let Some(outcome) = outcome else { return };
            commit_seconds.observe(started.elapsed().as_secs_f64());
            ctx.metrics.batch_rows.observe(batch.len() as f64);
            ctx.metrics.committed.heartbeat.inc_by(outcome.inserted);
            ctx.metrics.duplicates.heartbeat.inc_by(outcome.duplicates);
            let (now, wall) = (Instant::now(), Utc::now());
            for item in &batch {
                ctx.observe_commit_at(now, wall, item.ack.received, item.hb.ts);
            }
            ctx.acks.done_many(batch.iter().map(|i| i.ack));
            if let Some(rules) = &ctx.rules {
                let _ = rules.send(batch.iter().map(|i| i.hb.clone()).collect()).await;
            }
            let updates = batch
                .into_iter()
                .map(|i| LatestUpdate::Heartbeat(Box::new(i.hb)))
                .collect();
            let _ = ctx.latest.send(updates).await;
        }
        .instrument(span)
        .await;
    }
}

async fn write_heartbeats_one_by_one(ctx: &LaneContext, batch: &[HeartbeatItem]) -> BatchOutcome {
    let mut total = BatchOutcome::default();
    for item in batch {
        let mut backoff = Backoff::new();
        loop {
            match write_heartbeats(&ctx.pool, &[&item.hb]).await {
                Ok(o) => {
                    total.inserted += o.inserted;
                    total.duplicates += o.duplicates;
                    break;
                }
                Err(e) if is_poison(&e) => {
                    store_unstorable(ctx, &item.hb.device_id, "heartbeat", &e).await;
                    break;
                }
                Err(_) => {
                    if !backoff.wait(&ctx.cancel).await {
                        return total;
                    }
                }
            }
        }
    }
    total
}

async fn store_unstorable(ctx: &LaneContext, device_id: &str, what: &str, e: &StoreError) {
    ctx.metrics.rejected(RejectReason::Unstorable).inc();
    let detail = format!("{what} refused by the database: {e}");
    tracing::error!(device_id, %detail, "row moved to ingest_rejects");
    let result = async {
        let client = ctx.pool.get().await?;
        client
            .execute(
                "INSERT INTO ingest_rejects (received_at, topic, device_id, reason, detail, payload_size, payload)
                 VALUES (now(), '', $1, 'unstorable', $2, 0, '')",
                &[&device_id, &detail],
            )
            .await?;
        Ok::<_, StoreError>(())
    }
    .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "cannot record unstorable row");
    }
}

/// Inserts one device event in its own transaction. Returns the new row's id, or None when
/// it was a redelivery. The alert engine hooks in here, inside the same transaction.
pub async fn write_event(
    pool: &Pool,
    e: &super::validate::DeviceEvent,
    alerts: &crate::alerts::settings::AlertSettings,
) -> Result<Option<i64>, StoreError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let (lat, lon, acc, src) = super::validate::Location::columns(e.location);
    let row = tx
        .query_opt(
            "INSERT INTO device_events (device_id, seq, kind, occurred_at, device_ts, received_at,
                 clock_skewed, battery_pct, lat_e7, lon_e7, loc_accuracy_m, loc_source)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
             ON CONFLICT (device_id, seq, device_ts) DO NOTHING
             RETURNING id",
            &[
                &e.device_id,
                &e.seq,
                &e.kind.as_str(),
                &e.occurred_at,
                &e.device_ts,
                &e.received_at,
                &e.clock_skewed,
                &e.battery_pct,
                &lat,
                &lon,
                &acc,
                &src,
            ],
        )
        .await?;
    let id = row.map(|r| r.get::<_, i64>(0));
    if let Some(id) = id {
        // The alert and the notifications it causes commit with the event, or nothing does.
        if let Some(alert_id) = crate::alerts::on_event(&tx, e, id, alerts).await? {
            tracing::info!(event_id = id, alert_id, "alert raised or repeated");
        }
    }
    tx.commit().await?;
    Ok(id)
}

/// Event lane: emergencies first. Each event commits on its own, at once; several run in
/// parallel so a slow one does not hold the next SOS.
pub async fn run_event_lane(
    emergencies: Arc<Mutex<mpsc::Receiver<EventItem>>>,
    routine: Arc<Mutex<mpsc::Receiver<EventItem>>>,
    ctx: LaneContext,
) {
    let commit_seconds = ctx.metrics.commit_seconds("event");
    loop {
        // Emergencies are always checked first; the routine lock is only taken when none wait.
        let item = {
            let mut em = emergencies.lock().await;
            match em.try_recv() {
                Ok(i) => Some(i),
                Err(mpsc::error::TryRecvError::Disconnected) => None,
                Err(mpsc::error::TryRecvError::Empty) => {
                    let mut ro = routine.lock().await;
                    tokio::select! {
                        biased;
                        i = em.recv() => i,
                        i = ro.recv() => i,
                    }
                }
            }
        };
        let Some(item) = item else { return };
        let e = &item.event;
        let span = tracing::info_span!("event", device_id = %e.device_id, kind = e.kind.as_str(), seq = e.seq);
        async {
            let started = Instant::now();
            let mut backoff = Backoff::new();
            loop {
                match write_event(&ctx.pool, e, &ctx.alerts).await {
                    Ok(Some(id)) => {
                        ctx.metrics.committed.event.inc();
                        commit_seconds.observe(started.elapsed().as_secs_f64());
                        if e.kind.is_emergency() {
                            tracing::warn!(event_id = id, "emergency event committed");
                        } else {
                            tracing::info!(event_id = id, "event committed");
                        }
                        break;
                    }
                    Ok(None) => {
                        if ctx.event_conn.is_some_and(|c| c != item.ack.conn) {
                            // The main subscription's copy of what the event connection took.
                            tracing::debug!("event already stored (from the event connection)");
                        } else {
                            ctx.metrics.duplicates.event.inc();
                            tracing::debug!("event already stored (redelivery)");
                        }
                        break;
                    }
                    // An emergency is never given up: keep retrying (its ack stays held, so the
                    // broker keeps it too) and shout, because this is a bug to fix now.
                    Err(err) if is_poison(&err) && !e.kind.is_emergency() => {
                        store_unstorable(&ctx, &e.device_id, "event", &err).await;
                        break;
                    }
                    Err(err) => {
                        ctx.metrics.write_errors.inc();
                        tracing::warn!(error = %err, "event not committed, retrying (ack held)");
                        if !backoff.wait(&ctx.cancel).await {
                            return;
                        }
                    }
                }
            }
            ctx.observe_commit(item.ack.received, e.occurred_at);
            ctx.acks.done(item.ack);
            // Never wait here: the event lane carries SOS presses. A "last seen" dropped when
            // the tracker is busy is made up by the device's next row refresh, and the
            // sweeper reads the device's heartbeats anyway.
            let _ = ctx.latest.try_send(vec![LatestUpdate::Seen {
                device_id: e.device_id.clone(),
                at: e.received_at,
            }]);
        }
        .instrument(span)
        .await;
    }
}

/// Presence lane: small batches (presence is rare, but a broker restart makes every device
/// reconnect at once).
pub async fn run_presence_lane(mut rx: mpsc::Receiver<PresenceItem>, ctx: LaneContext) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, 1000).await > 0 {
        let ids: Vec<&str> = batch
            .iter()
            .map(|i| i.presence.device_id.as_str())
            .collect();
        let ats: Vec<DateTime<Utc>> = batch.iter().map(|i| i.presence.at).collect();
        let online: Vec<bool> = batch.iter().map(|i| i.presence.online).collect();
        let recv: Vec<DateTime<Utc>> = batch.iter().map(|i| i.presence.received_at).collect();
        let mut backoff = Backoff::new();
        loop {
            let result = async {
                let client = ctx.pool.get().await?;
                let n = client
                    .execute(
                        "INSERT INTO device_presence (device_id, at, online, received_at)
                         SELECT u.* FROM unnest($1::text[], $2::timestamptz[], $3::bool[], $4::timestamptz[])
                             AS u(device_id, at, online, received_at)
                         JOIN devices d USING (device_id)
                         ON CONFLICT DO NOTHING",
                        &[&ids, &ats, &online, &recv],
                    )
                    .await?;
                Ok::<_, StoreError>(n)
            }
            .await;
            match result {
                Ok(n) => {
                    ctx.metrics.committed.presence.inc_by(n);
                    ctx.metrics
                        .duplicates
                        .presence
                        .inc_by(batch.len() as u64 - n);
                    break;
                }
                Err(e) => {
                    ctx.metrics.write_errors.inc();
                    tracing::warn!(error = %e, "presence not committed, retrying (acks held)");
                    if !backoff.wait(&ctx.cancel).await {
                        return;
                    }
                }
            }
        }
        let mut updates = Vec::with_capacity(batch.len());
        for item in batch.drain(..) {
            ctx.acks.done(item.ack);
            updates.push(LatestUpdate::Presence {
                device_id: item.presence.device_id,
                online: item.presence.online,
                at: item.presence.at,
            });
        }
        let _ = ctx.latest.send(updates).await;
    }
}

/// Reject lane: stores rejects in batches, raw bytes truncated to `keep_bytes`.
pub async fn run_reject_lane(
    mut rx: mpsc::Receiver<RejectItem>,
    ctx: LaneContext,
    keep_bytes: usize,
) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, 500).await > 0 {
        let at: Vec<DateTime<Utc>> = batch.iter().map(|i| i.received_at).collect();
        let topics: Vec<String> = batch
            .iter()
            .map(|i| i.topic.chars().take(512).collect())
            .collect();
        let devices: Vec<Option<&str>> = batch.iter().map(|i| i.device_id.as_deref()).collect();
        let reasons: Vec<&str> = batch.iter().map(|i| i.reason.as_str()).collect();
        let details: Vec<&str> = batch.iter().map(|i| i.detail.as_str()).collect();
        let sizes: Vec<i32> = batch.iter().map(|i| i.payload.len() as i32).collect();
        let payloads: Vec<&[u8]> = batch
            .iter()
            .map(|i| &i.payload[..i.payload.len().min(keep_bytes)])
            .collect();
        let mut backoff = Backoff::new();
        loop {
            let result = async {
                let client = ctx.pool.get().await?;
                client
                    .execute(
                        "INSERT INTO ingest_rejects (received_at, topic, device_id, reason, detail, payload_size, payload)
                         SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int4[], $7::bytea[])",
                        &[&at, &topics, &devices, &reasons, &details, &sizes, &payloads],
                    )
                    .await?;
                Ok::<_, StoreError>(())
            }
            .await;
            match result {
                Ok(()) => break,
                Err(e) => {
                    ctx.metrics.write_errors.inc();
                    tracing::warn!(error = %e, "rejects not stored, retrying");
                    if !backoff.wait(&ctx.cancel).await {
                        return;
                    }
                }
            }
        }
        for item in batch.drain(..) {
            ctx.acks.done(item.ack);
        }
    }
}

/// Looks up device ids missing from the cache. A device provisioned a moment ago is found
/// and its message proceeds; an unknown one is rejected. Lookups are negative-cached briefly
/// so a flood of one unknown id costs one query per interval.
pub async fn run_resolver(
    mut rx: mpsc::Receiver<UnresolvedItem>,
    ctx: LaneContext,
    known: KnownDevices,
) {
    let mut negative: HashMap<String, Instant> = HashMap::new();
    const NEGATIVE_TTL: Duration = Duration::from_secs(2);
    while let Some(item) = rx.recv().await {
        let id = item.decoded.device_id().unwrap_or_default().to_string();
        if known.contains(&id) {
            ctx.router.route_known(item.decoded, item.ack).await;
            continue;
        }
        if negative
            .get(&id)
            .is_some_and(|t| t.elapsed() < NEGATIVE_TTL)
        {
            ctx.router.reject_unknown(item);
            continue;
        }
        if negative.len() > 100_000 {
            negative.retain(|_, t| t.elapsed() < NEGATIVE_TTL);
        }
        let mut backoff = Backoff::new();
        let exists = loop {
            match store::devices::exists(&ctx.pool, &id).await {
                Ok(b) => break Some(b),
                Err(e) => {
                    tracing::warn!(error = %e, "device lookup failed, retrying");
                    if !backoff.wait(&ctx.cancel).await {
                        break None;
                    }
                }
            }
        };
        match exists {
            Some(true) => {
                known.insert(id);
                ctx.router.route_known(item.decoded, item.ack).await;
            }
            Some(false) => {
                negative.insert(id, Instant::now());
                ctx.router.reject_unknown(item);
            }
            None => return,
        }
    }
}

#[derive(Default)]
struct Latest {
    seen: Option<DateTime<Utc>>,
    hb: Option<Box<Heartbeat>>,
    presence: Option<(bool, DateTime<Utc>)>,
}

/// When this process last wrote a device's row with a last-seen time, and the newest
/// heartbeat time it wrote.
struct Written {
    at: Instant,
    hb_ts: Option<DateTime<Utc>>,
}

/// What the tracker holds between flushes: the pending writes, and what this process last
/// wrote for each device.
struct LatestState {
    pending: HashMap<String, Latest>,
    written: foldhash::HashMap<String, Written>,
    /// Heartbeats of a device written less than this long ago are not written again.
    refresh: Duration,
    last_pruned: Instant,
}

impl LatestState {
    fn new(refresh: Duration) -> Self {
        LatestState {
            pending: HashMap::new(),
            written: foldhash::HashMap::default(),
            refresh,
            last_pruned: Instant::now(),
        }
    }

    /// Whether `hb` can be left out: its device's row was written within the refresh
    /// period with a heartbeat no newer. An older one still goes in: the view and the
    /// sweeper only look at heartbeats from the row's on, so one whose clock stepped back
    /// would otherwise look silent until its clock caught up (its row's last-seen time
    /// moves with every write, whatever the heartbeat's own time).
    fn fresh(&self, hb: &Heartbeat, now: Instant) -> bool {
        self.written.get(&hb.device_id).is_some_and(|w| {
            now.saturating_duration_since(w.at) < self.refresh
                && w.hb_ts.is_some_and(|ts| hb.ts >= ts)
        })
    }

    fn merge(&mut self, updates: Vec<LatestUpdate>) {
        let now = Instant::now();
        for u in updates {
            match u {
                LatestUpdate::Seen { device_id, at } => {
                    let e = self.pending.entry(device_id).or_default();
                    e.seen = e.seen.max(Some(at));
                }
                LatestUpdate::Heartbeat(hb) => {
                    // The heartbeat itself is stored: readers and the silence sweeper find it
                    // there (migration 0007). The row is only rewritten now and then. (A
                    // write pending for a presence change or an event then carries an older
                    // heartbeat's snapshot, which readers overlay anyway.)
                    if self.fresh(&hb, now) {
                        continue;
                    }
                    let e = self.pending.entry(hb.device_id.clone()).or_default();
                    e.seen = e.seen.max(Some(hb.received_at));
                    if e.hb.as_ref().is_none_or(|old| old.ts <= hb.ts) {
                        e.hb = Some(hb);
                    }
                }
                LatestUpdate::Presence {
                    device_id,
                    online,
                    at,
                } => {
                    let e = self.pending.entry(device_id).or_default();
                    if online {
                        e.seen = e.seen.max(Some(at));
                    }
                    if e.presence.is_none_or(|(_, old)| old <= at) {
                        e.presence = Some((online, at));
                    }
                }
            }
        }
    }

    /// Records what a flush wrote. Only a write that set the last-seen time counts: an
    /// "offline" presence alone leaves the row without a silence deadline.
    fn stamp(&mut self, written: Vec<(String, Latest)>, now: Instant) {
        for (id, l) in written {
            if l.seen.is_none() {
                continue;
            }
            let hb_ts = l.hb.map(|h| h.ts);
            let w = self.written.entry(id).or_insert(Written { at: now, hb_ts });
            w.at = now;
            w.hb_ts = w.hb_ts.max(hb_ts);
        }
    }

    async fn flush(&mut self, pool: &Pool, silence_factor: f64) {
        let written = flush_latest(pool, &mut self.pending, silence_factor).await;
        if self.refresh.is_zero() {
            return;
        }
        let now = Instant::now();
        self.stamp(written, now);
        // Devices that stopped reporting here (moved to another instance, removed) would
        // otherwise stay in the map for the life of the process.
        if now.saturating_duration_since(self.last_pruned) >= self.refresh {
            let refresh = self.refresh;
            self.written
                .retain(|_, w| now.saturating_duration_since(w.at) < refresh);
            self.last_pruned = now;
        }
    }
}

/// Keeps `device_latest` rows in place with one statement per flush interval, so the hot
/// path never writes per message: a device's row is written when this process first sees
/// it, on its events and presence changes, and for its heartbeats at most once per
/// `refresh`. Readers overlay the newest stored heartbeat (view `device_current`), and the
/// silence sweeper moves deadlines from it.
pub async fn run_latest_tracker(
    mut rx: mpsc::Receiver<Vec<LatestUpdate>>,
    pool: Pool,
    interval: Duration,
    refresh: Duration,
    silence_factor: u32,
) {
    let silence_factor = silence_factor as f64;
    let mut state = LatestState::new(refresh);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            updates = rx.recv() => match updates {
                Some(u) => state.merge(u),
                None => {
                    // All lanes are done: write what is left, then stop.
                    state.flush(&pool, silence_factor).await;
                    return;
                }
            },
            _ = tick.tick() => state.flush(&pool, silence_factor).await,
        }
    }
}

/// Merges `updates` and writes them exactly as one flush of the tracker does (chunks of
/// [`LATEST_FLUSH_CHUNK`] devices in device order, the same statement). For the
/// `latest_upsert` benchmark, which times the flush against a real PostgreSQL; the service
/// flushes through [`run_latest_tracker`].
/// Returns how many devices were left unwritten (0 when the flush succeeded).
#[doc(hidden)]
pub async fn flush_updates(pool: &Pool, updates: Vec<LatestUpdate>, silence_factor: u32) -> usize {
    let mut state = LatestState::new(Duration::ZERO);
    state.merge(updates);
    flush_latest(pool, &mut state.pending, silence_factor as f64).await;
    state.pending.len()
}

/// Columns that follow the newest heartbeat, in `device_latest` order after `last_hb_at`.
/// The silence sweeper copies the same snapshot ([`heartbeat_column`] names each one's
/// source in `heartbeats`), and the view `device_current` (migration 0007) overlays them.
pub(crate) const LATEST_HB_COLUMNS: [&str; 11] = [
    "last_hb_seq",
    "heart_rate_bpm",
    "spo2_pct",
    "systolic_mmhg",
    "diastolic_mmhg",
    "skin_temp_dc",
    "steps_today",
    "battery_pct",
    "worn",
    "lat_e7",
    "lon_e7",
];

/// The `heartbeats` column a `device_latest` snapshot column holds: the same name, except
/// `last_hb_at` (the heartbeat's `ts`) and `last_hb_seq` (its `seq`).
pub(crate) fn heartbeat_column(latest: &str) -> &str {
    match latest {
        "last_hb_at" => "ts",
        "last_hb_seq" => "seq",
        other => other,
    }
}

/// Built once: the flush runs it up to 50 times a second (100,000 devices in chunks).
static LATEST_UPSERT_SQL: LazyLock<String> = LazyLock::new(latest_upsert_sql);

fn latest_upsert_sql() -> String {
    let newer_hb =
        "excluded.last_hb_at IS NOT NULL AND (l.last_hb_at IS NULL OR excluded.last_hb_at >= l.last_hb_at)";
    let newer_presence = "excluded.presence_at IS NOT NULL AND (l.presence_at IS NULL OR excluded.presence_at >= l.presence_at)";
    let mut sets = vec![
        "last_seen_at = greatest(l.last_seen_at, excluded.last_seen_at)".to_string(),
        // New data moves the silence deadline and re-arms the silence rule.
        "silent_after = CASE WHEN l.last_seen_at IS NULL OR excluded.last_seen_at > l.last_seen_at \
         THEN excluded.silent_after ELSE l.silent_after END"
            .to_string(),
        // The indexed deadline moves only when it has come within half the threshold of the
        // newest report, or lies past the exact one (a shorter interval), or the device was
        // alerted or never had one: most updates leave every indexed column as it was and
        // can be HOT (migration 0006). It is never later than `silent_after`.
        "silence_check_at = CASE WHEN l.last_seen_at IS NULL OR excluded.last_seen_at > l.last_seen_at \
         THEN CASE WHEN l.silence_check_at IS NULL OR l.silence_alerted \
                     OR l.silence_check_at > excluded.silent_after \
                     OR l.silence_check_at - excluded.last_seen_at \
                        < (excluded.silent_after - excluded.last_seen_at) / 2 \
                   THEN excluded.silent_after ELSE l.silence_check_at END \
         ELSE l.silence_check_at END"
            .to_string(),
        "silence_alerted = CASE WHEN excluded.last_seen_at > l.last_seen_at THEN false \
         ELSE l.silence_alerted END"
            .to_string(),
    ];
    for c in std::iter::once("last_hb_at").chain(LATEST_HB_COLUMNS) {
        sets.push(format!(
            "{c} = CASE WHEN {newer_hb} THEN excluded.{c} ELSE l.{c} END"
        ));
    }
    for c in ["online", "presence_at"] {
        sets.push(format!(
            "{c} = CASE WHEN {newer_presence} THEN excluded.{c} ELSE l.{c} END"
        ));
    }
    format!(
        "INSERT INTO device_latest AS l (device_id, last_seen_at, last_hb_at, {hb}, online, presence_at,
                                         silent_after, silence_check_at)
         SELECT u.device_id, u.last_seen_at, u.last_hb_at, {uhb}, u.online, u.presence_at,
                u.deadline, u.deadline
         FROM (SELECT u.*, u.last_seen_at + make_interval(secs => d.heartbeat_interval_s * $17::float8) AS deadline
         FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[], $4::int8[], $5::int2[],
                     $6::int2[], $7::int2[], $8::int2[], $9::int2[], $10::int4[], $11::int2[],
                     $12::bool[], $13::int4[], $14::int4[], $15::bool[], $16::timestamptz[])
              AS u(device_id, last_seen_at, last_hb_at, {hb}, online, presence_at)
         JOIN devices d ON d.device_id = u.device_id) u
         ORDER BY u.device_id
         ON CONFLICT (device_id) DO UPDATE SET {sets}",
        hb = LATEST_HB_COLUMNS.join(", "),
        uhb = LATEST_HB_COLUMNS.map(|c| format!("u.{c}")).join(", "),
        sets = sets.join(",\n             "),
    )
}

/// Devices per `device_latest` upsert statement. One statement for the whole map would carry
/// every pending device (100,000 in a city fleet when PostgreSQL is slow): a Bind message of
/// 10-20 MB, and tokio-postgres keeps each connection's encode and write buffers at the
/// largest size they ever held, so every pooled connection that once ran the flush kept
/// 30-60 MiB (heaptrack, 30,000 hb/s with 100,000 bracelets; RSS grew from 80 to 283 MiB in
/// 25 s). At 2,000 devices a statement is about 200 kB.
const LATEST_FLUSH_CHUNK: usize = 2_000;

/// Rows are upserted in device-id order (sorted here and `ORDER BY` in
/// [`latest_upsert_sql`]): several instances flush overlapping sets of devices, and in any
/// other order (this map's is random) two flushes lock the same rows in opposite orders and
/// deadlock (SQLSTATE 40P01, seen with three instances at 20,000 heartbeats/s). Each chunk
/// commits on its own; a chunk that fails stays pending, with the ones after it, and is
/// merged into the next flush.
async fn flush_latest(
    pool: &Pool,
    pending: &mut HashMap<String, Latest>,
    silence_factor: f64,
) -> Vec<(String, Latest)> {
    if pending.is_empty() {
        return Vec::new();
    }
    let mut entries: Vec<(String, Latest)> = pending.drain().collect();
    entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let total = entries.len();
    let mut written = 0;
    let result = async {
        let client = pool.get().await?;
        let stmt = client.prepare_cached(&LATEST_UPSERT_SQL).await?;
        for chunk in entries.chunks(LATEST_FLUSH_CHUNK) {
            upsert_latest(&client, &stmt, chunk, silence_factor).await?;
            written += chunk.len();
        }
        Ok::<_, StoreError>(())
    }
    .await;
    if let Err(e) = result {
        // Kept and merged into the next flush; this table is a cache of the newest values.
        tracing::warn!(error = %e, devices = total - written, "device_latest flush failed, will retry");
        // `pending` is empty: updates are merged by this same task, never during a flush.
        let rest = entries.split_off(written);
        pending.extend(rest);
    }
    entries
}

async fn upsert_latest(
    client: &tokio_postgres::Client,
    stmt: &tokio_postgres::Statement,
    chunk: &[(String, Latest)],
    silence_factor: f64,
) -> Result<(), StoreError> {
    let n = chunk.len();
    let mut ids = Vec::with_capacity(n);
    let mut seen = Vec::with_capacity(n);
    let mut hb_at = Vec::with_capacity(n);
    let mut seq = Vec::with_capacity(n);
    let (mut hr, mut spo2, mut sys, mut dia, mut temp) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut steps, mut battery, mut worn, mut lat, mut lon) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut online, mut presence_at) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for (id, l) in chunk {
        ids.push(id.as_str());
        seen.push(l.seen);
        let h = l.hb.as_deref();
        hb_at.push(h.map(|h| h.ts));
        seq.push(h.map(|h| h.seq));
        hr.push(h.and_then(|h| h.heart_rate_bpm));
        spo2.push(h.and_then(|h| h.spo2_pct));
        sys.push(h.and_then(|h| h.systolic_mmhg));
        dia.push(h.and_then(|h| h.diastolic_mmhg));
        temp.push(h.and_then(|h| h.skin_temp_dc));
        steps.push(h.and_then(|h| h.steps_today));
        battery.push(h.and_then(|h| h.battery_pct));
        worn.push(h.map(|h| h.worn));
        lat.push(h.and_then(|h| h.location.map(|l| l.lat_e7)));
        lon.push(h.and_then(|h| h.location.map(|l| l.lon_e7)));
        online.push(l.presence.map(|p| p.0));
        presence_at.push(l.presence.map(|p| p.1));
    }
    client
        .execute(
            stmt,
            &[
                &ids,
                &seen,
                &hb_at,
                &seq,
                &hr,
                &spo2,
                &sys,
                &dia,
                &temp,
                &steps,
                &battery,
                &worn,
                &lat,
                &lon,
                &online,
                &presence_at,
                &silence_factor,
            ],
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hb(device_id: &str, seq: i64) -> LatestUpdate {
        let now = Utc::now();
        LatestUpdate::Heartbeat(Box::new(Heartbeat {
            device_id: device_id.into(),
            seq,
            ts: now,
            received_at: now,
            heart_rate_bpm: Some(70),
            spo2_pct: None,
            systolic_mmhg: None,
            diastolic_mmhg: None,
            skin_temp_dc: None,
            steps_today: None,
            battery_pct: Some(80),
            worn: true,
            location: None,
            clock_skewed: false,
            device_ts: None,
        }))
    }

    #[test]
    fn heartbeats_of_a_device_written_within_the_refresh_are_not_written_again() {
        let mut s = LatestState::new(Duration::from_secs(300));
        s.merge(vec![hb("a", 1)]);
        assert!(s.pending.contains_key("a"), "first sight is written");
        s.pending.clear();
        s.written.insert("a".into(), written_now(Utc::now()));
        s.merge(vec![hb("a", 2), hb("b", 1)]);
        assert!(!s.pending.contains_key("a"), "written a moment ago");
        assert!(s.pending.contains_key("b"), "never written by this process");
        // A presence change is written; the heartbeats of a fresh device still are not.
        s.merge(vec![
            LatestUpdate::Presence {
                device_id: "a".into(),
                online: true,
                at: Utc::now(),
            },
            hb("a", 3),
        ]);
        assert!(s.pending["a"].presence.is_some());
        assert!(s.pending["a"].hb.is_none());
    }

    #[test]
    fn an_expired_refresh_or_a_zero_one_writes_the_heartbeat() {
        let mut s = LatestState::new(Duration::from_millis(5));
        let earlier = Instant::now().checked_sub(Duration::from_millis(10));
        s.written.insert(
            "a".into(),
            Written {
                at: earlier.unwrap_or_else(Instant::now),
                hb_ts: Some(Utc::now()),
            },
        );
        s.merge(vec![hb("a", 2)]);
        assert!(s.pending.contains_key("a"));
        let mut every = LatestState::new(Duration::ZERO);
        every.written.insert("a".into(), written_now(Utc::now()));
        every.merge(vec![hb("a", 2)]);
        assert!(every.pending.contains_key("a"));
    }

    #[test]
    fn a_heartbeat_older_than_the_one_written_is_written() {
        // The bracelet's clock stepped back: its new heartbeats sort before the row's.
        let mut s = LatestState::new(Duration::from_secs(300));
        s.written.insert(
            "a".into(),
            written_now(Utc::now() + chrono::TimeDelta::minutes(10)),
        );
        s.merge(vec![hb("a", 7)]);
        assert!(s.pending.contains_key("a"));
    }

    #[test]
    fn only_a_write_with_a_last_seen_time_makes_a_device_fresh() {
        let mut s = LatestState::new(Duration::from_secs(300));
        let offline = Latest {
            presence: Some((false, Utc::now())),
            ..Default::default()
        };
        let seen = Latest {
            seen: Some(Utc::now()),
            ..Default::default()
        };
        s.stamp(
            vec![("off".into(), offline), ("on".into(), seen)],
            Instant::now(),
        );
        assert!(!s.written.contains_key("off"));
        assert!(s.written.contains_key("on"));
        // Written without a heartbeat: the next heartbeat is still written.
        s.merge(vec![hb("on", 1)]);
        assert!(s.pending.contains_key("on"));
    }

    fn written_now(hb_ts: DateTime<Utc>) -> Written {
        Written {
            at: Instant::now(),
            hb_ts: Some(hb_ts),
        }
    }
}
