//! Ingest lag, publish → committed, measured from outside the service.
//!
//! Method: a sample of the load's heartbeats are **markers** (about 200 per second over the
//! whole load, spread over the connections). For each, the publisher records the device, its
//! `seq`, its `measured_at_ms` (which the service stores as `ts`, the device clock being the
//! bench's own) and the monotonic instant just before the write that carried it. This
//! tracker polls the database every `poll` (10 ms by default) for the markers not seen yet,
//! by the heartbeats table's unique key `(device_id, ts, seq)` (an index probe each):
//!
//! ```sql
//! SELECT m.i FROM unnest($1::text[], $2::timestamptz[], $3::int8[], $4::int4[]) AS m(d, ts, seq, i)
//! WHERE EXISTS (SELECT 1 FROM heartbeats h WHERE h.device_id = m.d AND h.ts = m.ts AND h.seq = m.seq)
//! ```
//!
//! A row is visible to a query only once its transaction has committed, so the first poll
//! that finds a marker bounds its commit: after the previous poll's snapshot, before this
//! one's. The lag recorded is **the instant this poll was sent minus the publish instant**;
//! it is late by at most the query's own time (about a millisecond) and early by at most one
//! poll interval. Both clocks are the bench's, so no clock sync is involved. A marker not
//! seen within `give_up` is recorded as lost.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::stats::LatencySummary;

/// One sampled heartbeat.
#[derive(Debug, Clone)]
pub struct Marker {
    pub device_id: String,
    pub seq: i64,
    pub measured_at_ms: i64,
    /// Just before the write that carried it.
    pub published: Instant,
}

/// What became of one marker.
#[derive(Debug, Clone, Copy)]
pub struct LagSample {
    pub published: Instant,
    /// Publish → first poll that saw the row; `None`: never seen within the give-up time.
    pub lag_ms: Option<f64>,
}

/// Lag of the markers published in one window.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct LagSummary {
    /// Markers published in the window.
    pub markers: usize,
    /// Not seen in the database (yet, when the summary was taken, or ever).
    pub unseen: usize,
    pub latency: LatencySummary,
    /// The poll interval: the resolution of every figure here.
    pub poll_ms: f64,
    /// How long the polls of the window took (each figure above may be late by this much).
    pub poll_query: LatencySummary,
}

/// The tracker task and what it found.
pub struct LagTracker {
    pub tx: mpsc::UnboundedSender<Marker>,
    samples: Arc<Mutex<Vec<LagSample>>>,
    /// (sent, duration ms) of every poll query.
    polls: Arc<Mutex<Vec<(Instant, f64)>>>,
    pending: Arc<Mutex<Vec<Marker>>>,
    stop: CancellationToken,
    task: JoinHandle<()>,
    poll: Duration,
}

/// One index probe per marker: `LATERAL ... LIMIT 1` keeps it a nested loop whatever the
/// planner thinks of a fresh partition without statistics (a semi-join could turn into a
/// hash join over the whole table, and every poll would be late by a table scan).
const QUERY: &str =
    "SELECT m.i FROM unnest($1::text[], $2::timestamptz[], $3::int8[], $4::int4[]) \
     AS m(d, ts, seq, i) CROSS JOIN LATERAL (SELECT 1 FROM heartbeats h \
     WHERE h.device_id = m.d AND h.ts = m.ts AND h.seq = m.seq LIMIT 1) AS found";

/// At most this many markers per query (a backlog after a stall is worked off over polls).
const MAX_PER_QUERY: usize = 2000;

impl LagTracker {
    /// Starts polling through `client` (a connection of its own: the polls must not queue
    /// behind the bench's other queries).
    pub fn start(client: Client, poll: Duration, give_up: Duration) -> LagTracker {
        let (tx, rx) = mpsc::unbounded_channel();
        let samples = Arc::new(Mutex::new(Vec::new()));
        let polls = Arc::new(Mutex::new(Vec::new()));
        let pending = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let task = tokio::spawn(track(
            client,
            rx,
            Shared {
                samples: samples.clone(),
                polls: polls.clone(),
                pending: pending.clone(),
            },
            (poll, give_up),
            stop.clone(),
        ));
        LagTracker {
            tx,
            samples,
            polls,
            pending,
            stop,
            task,
            poll,
        }
    }

    /// Markers published in `[from, to)`; those still pending count as unseen.
    pub fn summary(&self, from: Instant, to: Instant) -> LagSummary {
        let in_window = |t: Instant| t >= from && t < to;
        let samples = self.samples.lock().map(|s| s.clone()).unwrap_or_default();
        let pending = self
            .pending
            .lock()
            .map(|p| p.iter().filter(|m| in_window(m.published)).count())
            .unwrap_or(0);
        let mine: Vec<&LagSample> = samples.iter().filter(|s| in_window(s.published)).collect();
        let lags: Vec<f64> = mine.iter().filter_map(|s| s.lag_ms).collect();
        LagSummary {
            markers: mine.len() + pending,
            unseen: mine.len() - lags.len() + pending,
            latency: LatencySummary::of(&lags),
            poll_ms: self.poll.as_secs_f64() * 1000.0,
            poll_query: LatencySummary::of(
                &self
                    .polls
                    .lock()
                    .map(|p| {
                        p.iter()
                            .filter(|(t, _)| in_window(*t))
                            .map(|(_, d)| *d)
                            .collect::<Vec<f64>>()
                    })
                    .unwrap_or_default(),
            ),
        }
    }

    /// Waits until no marker published before `before` is pending (at most `timeout`).
    pub async fn wait_seen(&self, before: Instant, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let pending = self
                .pending
                .lock()
                .map(|p| p.iter().any(|m| m.published < before))
                .unwrap_or(false);
            if !pending || Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(self.poll).await;
        }
    }

    /// Records every marker published before `before` and not seen yet as never committed,
    /// and stops asking for it. For a step that lost heartbeats, once its drain has waited
    /// for quiet: they will not come, and each poll would keep asking for them.
    pub fn give_up_before(&self, before: Instant) {
        if let (Ok(mut p), Ok(mut s)) = (self.pending.lock(), self.samples.lock()) {
            s.extend(
                p.iter()
                    .filter(|m| m.published < before)
                    .map(|m| LagSample {
                        published: m.published,
                        lag_ms: None,
                    }),
            );
            p.retain(|m| m.published >= before);
        }
    }

    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// What the tracker task shares with [`LagTracker`].
struct Shared {
    samples: Arc<Mutex<Vec<LagSample>>>,
    polls: Arc<Mutex<Vec<(Instant, f64)>>>,
    pending: Arc<Mutex<Vec<Marker>>>,
}

/// `(poll, give_up)`: how often to look, and when a marker counts as never committed.
async fn track(
    client: Client,
    mut rx: mpsc::UnboundedReceiver<Marker>,
    shared: Shared,
    (poll, give_up): (Duration, Duration),
    stop: CancellationToken,
) {
    let Shared {
        samples,
        polls,
        pending,
    } = shared;
    let stmt = match client.prepare(QUERY).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "lag tracker cannot prepare its query; no lag figures");
            return;
        }
    };
    let mut tick = tokio::time::interval(poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut batch: Vec<Marker> = {
            let Ok(mut p) = pending.lock() else { return };
            while let Ok(m) = rx.try_recv() {
                p.push(m);
            }
            if p.is_empty() {
                continue;
            }
            p.iter().take(MAX_PER_QUERY).cloned().collect()
        };
        let ids: Vec<&str> = batch.iter().map(|m| m.device_id.as_str()).collect();
        let ts: Vec<SystemTime> = batch
            .iter()
            .map(|m| UNIX_EPOCH + Duration::from_millis(m.measured_at_ms.max(0) as u64))
            .collect();
        let seqs: Vec<i64> = batch.iter().map(|m| m.seq).collect();
        let idx: Vec<i32> = (0..batch.len() as i32).collect();
        let sent = Instant::now();
        let rows = match client.query(&stmt, &[&ids, &ts, &seqs, &idx]).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "lag poll failed");
                continue;
            }
        };
        if let Ok(mut p) = polls.lock() {
            p.push((sent, sent.elapsed().as_secs_f64() * 1000.0));
        }
        let mut seen = vec![false; batch.len()];
        for r in rows {
            if let Ok(i) = r.try_get::<_, i32>(0) {
                if let Some(s) = seen.get_mut(i as usize) {
                    *s = true;
                }
            }
        }
        let mut done = Vec::new();
        for (m, seen) in batch.drain(..).zip(seen) {
            if seen {
                let lag = (sent - m.published).as_secs_f64() * 1000.0;
                done.push((m, Some(lag)));
            } else if sent.saturating_duration_since(m.published) > give_up {
                done.push((m, None));
            }
        }
        if done.is_empty() {
            continue;
        }
        if let (Ok(mut p), Ok(mut s)) = (pending.lock(), samples.lock()) {
            let finished: std::collections::HashSet<(&str, i64)> = done
                .iter()
                .map(|(m, _)| (m.device_id.as_str(), m.seq))
                .collect();
            p.retain(|x| !finished.contains(&(x.device_id.as_str(), x.seq)));
            s.extend(done.iter().map(|(m, lag)| LagSample {
                published: m.published,
                lag_ms: *lag,
            }));
        }
    }
}
