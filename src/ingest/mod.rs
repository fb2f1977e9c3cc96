//! Ingest: bracelet messages from the MQTT broker into PostgreSQL, at least once, never twice.
//!
//! ```text
//!  broker ──(N MQTT 5 connections, $share group, manual acks)──> connection tasks
//!         └─(+1 connection `{client_id}-evt`: device events only)──┘
//!     connection task: decode + validate (pure, inline) -> route by kind ──┐
//!       ├─ heartbeat lane ─> batcher ─> W COPY writers ───────────────────┤
//!       ├─ event lane (emergency first) ─> per-event transaction ─────────┤ Done(ack)
//!       ├─ presence lane ─> small batched inserts ────────────────────────┤
//!       ├─ unknown-device resolver (registry lookup on a cache miss) ─────┤
//!       └─ reject lane ─> batched inserts into ingest_rejects ────────────┘
//!  acker (one per connection) <─ Done ── sends PUBACKs in receive order, only after commit
//! ```
//!
//! Why the lanes are sized the way they are: the broker never has more than
//! `receive_maximum` unacknowledged messages out per connection, and nothing is acknowledged
//! before it is committed, so the number of messages inside the pipeline is bounded by
//! `(connections + 1) × receive_maximum`. The extra connection carries device events alone,
//! so an SOS never waits behind a window full of heartbeats (`mqtt::event_filter`). Every lane can hold that many, so the connection tasks
//! never block on a full lane in normal operation; when the database stalls, the whole window
//! fills, the broker stops sending and queues for us (persistent session), and nothing is lost.

pub mod mqtt;
pub mod session;
pub use silverguard_core::validate;
pub mod writer;

use std::sync::{Arc, RwLock};
use std::time::Instant;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use tokio::sync::mpsc;

use crate::metrics::IngestMetrics;
use validate::{Decoded, DeviceEvent, Heartbeat, Presence, RejectReason, Rejected};

/// Identifies one received message for its acknowledgement: which connection, and the
/// connection-local receive sequence number.
#[derive(Debug, Clone, Copy)]
pub struct AckToken {
    pub conn: u16,
    pub seq: u64,
    /// When the connection task took the message from the broker.
    pub received: Instant,
}

/// Sends "committed" back to the connection's acker. Ackers live as long as the pipeline.
#[derive(Clone)]
pub struct AckSenders(Arc<Vec<mpsc::UnboundedSender<session::AckCmd>>>);

impl AckSenders {
    pub fn done(&self, token: AckToken) {
        if let Some(tx) = self.0.get(token.conn as usize) {
            // A closed acker means the connection task is gone (shutdown): the broker will
            // redeliver, which the unique keys make harmless.
            let _ = tx.send(session::AckCmd::Done(token.seq));
        }
    }

    /// `done` for many messages at once: one channel send per connection instead of one per
    /// message (a heartbeat batch is thousands of messages).
    pub fn done_many(&self, tokens: impl IntoIterator<Item = AckToken>) {
        let mut per_conn: Vec<Vec<u64>> = vec![Vec::new(); self.0.len()];
        for t in tokens {
            if let Some(v) = per_conn.get_mut(t.conn as usize) {
                v.push(t.seq);
            }
        }
        for (tx, seqs) in self.0.iter().zip(per_conn) {
            if !seqs.is_empty() {
                let _ = tx.send(session::AckCmd::DoneMany(seqs));
            }
        }
    }
}

pub struct HeartbeatItem {
    pub hb: Heartbeat,
    pub ack: AckToken,
}

pub struct EventItem {
    pub event: DeviceEvent,
    pub ack: AckToken,
}

pub struct PresenceItem {
    pub presence: Presence,
    pub ack: AckToken,
}

pub struct RejectItem {
    pub received_at: DateTime<Utc>,
    pub topic: String,
    pub device_id: Option<String>,
    pub reason: RejectReason,
    pub detail: String,
    pub payload: Bytes,
    pub ack: AckToken,
}

/// A message from a device id not in the cache, waiting for a registry lookup.
pub struct UnresolvedItem {
    pub decoded: Decoded,
    pub topic: String,
    pub payload: Bytes,
    pub ack: AckToken,
}

/// The senders into every lane, shared by the connection tasks.
#[derive(Clone)]
pub struct Lanes {
    pub heartbeats: mpsc::Sender<HeartbeatItem>,
    pub emergencies: mpsc::Sender<EventItem>,
    pub events: mpsc::Sender<EventItem>,
    pub presence: mpsc::Sender<PresenceItem>,
    pub rejects: mpsc::Sender<RejectItem>,
    pub unresolved: mpsc::Sender<UnresolvedItem>,
}

/// Provisioned device ids, cached. Filled at start, extended on a confirmed lookup, and
/// refreshed periodically so removals take effect. Looked up for every message.
#[derive(Clone, Default)]
pub struct KnownDevices(Arc<RwLock<foldhash::HashSet<String>>>);

impl KnownDevices {
    pub fn contains(&self, id: &str) -> bool {
        self.0.read().map(|s| s.contains(id)).unwrap_or(false)
    }
    pub fn insert(&self, id: String) {
        if let Ok(mut s) = self.0.write() {
            s.insert(id);
        }
    }
    pub fn replace(&self, ids: impl IntoIterator<Item = String>) {
        let ids: foldhash::HashSet<String> = ids.into_iter().collect();
        if let Ok(mut s) = self.0.write() {
            *s = ids;
        }
    }
    pub fn len(&self) -> usize {
        self.0.read().map(|s| s.len()).unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Every ingest connection's options, and the index of the event connection when there is
/// one. Connections 0..N share the configured filter; one more (`-evt`) takes device events
/// alone, so an SOS never waits behind heartbeats in an in-flight window (see
/// `mqtt::event_filter`). Only connections no SOS depends on coalesce their reads.
fn session_configs(
    m: &crate::config::MqttSettings,
) -> Result<(Vec<session::SessionConfig>, Option<u16>), mqtt::MqttConfigError> {
    let mut sessions: Vec<_> = (0..m.connections)
        .map(|i| session::SessionConfig::new(m, &i.to_string(), mqtt::subscription_filter(m)))
        .collect::<Result<_, _>>()?;
    let event_conn = match mqtt::event_filter(m) {
        Some(filter) => {
            sessions.push(session::SessionConfig::new(m, "evt", filter)?.without_read_coalescing());
            Some(m.connections as u16)
        }
        // Events come on the main connections: they must not wait for a coalesced read.
        None => {
            sessions = sessions
                .into_iter()
                .map(|s| s.without_read_coalescing())
                .collect();
            None
        }
    };
    Ok((sessions, event_conn))
}

/// Routes one validated message to its lane. Shared by the connection tasks and the resolver.
#[derive(Clone)]
pub struct Router {
    pub lanes: Lanes,
    pub acks: AckSenders,
    pub known: KnownDevices,
    pub metrics: IngestMetrics,
    /// The dedicated event connection's index, when there is one (`mqtt::event_filter`).
    pub event_conn: Option<u16>,
}

impl Router {
    /// A message on a device event topic that arrived on a main connection while the event
    /// connection takes the same topics: the event connection has its own copy.
    fn is_event_copy(&self, topic: &str, ack: AckToken) -> bool {
        self.event_conn.is_some_and(|c| c != ack.conn)
            && mqtt::filter_matches(mqtt::EVENT_TOPICS, topic)
    }

    /// Sends a known device's message to its lane. Awaiting is backpressure, not a risk: see
    /// the module docs for why the lanes cannot fill in normal operation.
    pub async fn route_known(&self, decoded: Decoded, ack: AckToken) {
        let sent = match decoded {
            Decoded::Heartbeat(hb) => {
                if hb.clock_skewed {
                    self.metrics.clock_skewed.inc();
                }
                self.lanes
                    .heartbeats
                    .send(HeartbeatItem { hb, ack })
                    .await
                    .is_ok()
            }
            Decoded::Event(event) => {
                // Counted once: the event connection's copy counts it.
                let copy = self.event_conn.is_some_and(|c| c != ack.conn);
                if event.clock_skewed && !copy {
                    self.metrics.clock_skewed.inc();
                }
                let lane = if event.kind.is_emergency() {
                    &self.lanes.emergencies
                } else {
                    &self.lanes.events
                };
                lane.send(EventItem { event, ack }).await.is_ok()
            }
            Decoded::Presence(presence) => self
                .lanes
                .presence
                .send(PresenceItem { presence, ack })
                .await
                .is_ok(),
            Decoded::Downlink => {
                self.acks.done(ack);
                true
            }
        };
        if !sent {
            tracing::debug!("lane closed during shutdown; message left for redelivery");
        }
    }

    /// Records a reject. The reject lane sheds under a flood: a device spraying garbage must
    /// not slow good messages, so when it is full the reject is counted, not stored.
    pub fn reject(&self, rejected: Rejected, topic: &str, payload: Bytes, ack: AckToken) {
        if self.is_event_copy(topic, ack) {
            // Recorded (and counted) once, by the event connection, which received the same
            // message. Valid events are still written from both copies (see
            // `mqtt::event_filter`); a rejected one has nothing to keep safe.
            self.acks.done(ack);
            return;
        }
        self.metrics.rejected(rejected.reason).inc();
        tracing::debug!(device_id = rejected.device_id.as_deref().unwrap_or(""), reason = rejected.reason.as_str(),
            detail = %rejected.detail, "message rejected");
        let item = RejectItem {
            received_at: Utc::now(),
            topic: topic.to_string(),
            device_id: rejected.device_id,
            reason: rejected.reason,
            detail: rejected.detail,
            payload,
            ack,
        };
        if let Err(e) = self.lanes.rejects.try_send(item) {
            self.metrics.rejects_not_stored.inc();
            let item = match e {
                mpsc::error::TrySendError::Full(i) | mpsc::error::TrySendError::Closed(i) => i,
            };
            self.acks.done(item.ack);
        }
    }

    /// Full path for one received message: validate, check the registry, route.
    pub async fn handle(
        &self,
        topic: &str,
        payload: Bytes,
        limits: &validate::Limits,
        ack: AckToken,
    ) {
        let received_at = Utc::now();
        match validate::decode(topic, &payload, received_at, limits) {
            Err(rejected) => self.reject(rejected, topic, payload, ack),
            Ok(Decoded::Downlink) => self.acks.done(ack),
            Ok(decoded) => {
                let known = decoded
                    .device_id()
                    .is_some_and(|id| self.known.contains(id));
                if known {
                    self.route_known(decoded, ack).await;
                } else {
                    let item = UnresolvedItem {
                        decoded,
                        topic: topic.to_string(),
                        payload,
                        ack,
                    };
                    if let Err(e) = self.lanes.unresolved.try_send(item) {
                        // A flood of unknown ids: reject without a lookup.
                        let item = match e {
                            mpsc::error::TrySendError::Full(i)
                            | mpsc::error::TrySendError::Closed(i) => i,
                        };
                        self.reject_unknown(item);
                    }
                }
            }
        }
    }

    pub fn reject_unknown(&self, item: UnresolvedItem) {
        let id = item.decoded.device_id().unwrap_or_default().to_string();
        self.reject(
            Rejected {
                reason: RejectReason::UnknownDevice,
                detail: format!("device {id:?} is not provisioned"),
                device_id: Some(id),
            },
            &item.topic,
            item.payload,
            item.ack,
        );
    }
}

/// A running ingest pipeline.
pub struct Pipeline {
    intake: tokio_util::sync::CancellationToken,
    lanes_cancel: tokio_util::sync::CancellationToken,
    connections: tokio::task::JoinSet<()>,
    lanes: tokio::task::JoinSet<()>,
    latest: Option<tokio::task::JoinHandle<()>>,
    pub known: KnownDevices,
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Mqtt(#[from] mqtt::MqttConfigError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

impl Pipeline {
    /// Starts lanes, writers and MQTT connections. The database must be reachable and migrated.
    pub async fn start(
        settings: &crate::config::Settings,
        pool: deadpool_postgres::Pool,
        metrics: IngestMetrics,
        rules_tx: Option<mpsc::Sender<Vec<Heartbeat>>>,
    ) -> Result<Pipeline, IngestError> {
        use std::sync::Arc;
        use tokio::sync::Mutex;
        let m = &settings.mqtt;
        let s = &settings.ingest;
        // Build every connection's options first, so a bad URL fails before anything starts.
        let (sessions, event_conn) = session_configs(m)?;
        let n_conns = sessions.len();
        let known = KnownDevices::default();
        known.replace(crate::store::devices::all_ids(&pool).await?);
        tracing::info!(devices = known.len(), "device registry loaded");

        let window = n_conns * m.receive_maximum as usize + 1024;
        let (hb_tx, hb_rx) = mpsc::channel(window);
        let (em_tx, em_rx) = mpsc::channel(window);
        let (ev_tx, ev_rx) = mpsc::channel(window);
        let (pr_tx, pr_rx) = mpsc::channel(window);
        let (rj_tx, rj_rx) = mpsc::channel(10_000);
        let (un_tx, un_rx) = mpsc::channel(4096);
        // Batches of latest-state updates (one per committed batch). Small on purpose: the
        // tracker folds them into one map per device, and when it falls behind the writers
        // should wait rather than memory fill with boxed copies of heartbeats.
        let (latest_tx, latest_rx) = mpsc::channel(64);
        let (batch_tx, batch_rx) = mpsc::channel(s.writers);

        let mut ack_senders = Vec::new();
        let mut ack_receivers = Vec::new();
        for _ in 0..n_conns {
            let (tx, rx) = mpsc::unbounded_channel();
            ack_senders.push(tx);
            ack_receivers.push(rx);
        }
        let acks = AckSenders(Arc::new(ack_senders.clone()));
        let router = Router {
            lanes: Lanes {
                heartbeats: hb_tx,
                emergencies: em_tx,
                events: ev_tx,
                presence: pr_tx,
                rejects: rj_tx,
                unresolved: un_tx,
            },
            acks: acks.clone(),
            known: known.clone(),
            metrics: metrics.clone(),
            event_conn,
        };
        let intake = tokio_util::sync::CancellationToken::new();
        let lanes_cancel = tokio_util::sync::CancellationToken::new();
        let ctx = writer::LaneContext {
            pool: pool.clone(),
            acks,
            metrics: metrics.clone(),
            latest: latest_tx,
            router: router.clone(),
            cancel: lanes_cancel.clone(),
            alerts: Arc::new(settings.alerts.clone()),
            rules: rules_tx,
            event_conn,
        };

        let latest = tokio::spawn(writer::run_latest_tracker(
            latest_rx,
            pool.clone(),
            s.latest_flush_interval,
            s.latest_refresh,
            settings.alerts.silence_factor,
        ));
        let mut lanes = tokio::task::JoinSet::new();
        lanes.spawn(writer::run_heartbeat_batcher(
            hb_rx,
            batch_tx,
            s.batch_max_rows,
            s.batch_max_delay,
        ));
        let batch_rx = Arc::new(Mutex::new(batch_rx));
        for w in 0..s.writers {
            lanes.spawn(writer::run_heartbeat_writer(
                w,
                batch_rx.clone(),
                ctx.clone(),
            ));
        }
        let (em_rx, ev_rx) = (Arc::new(Mutex::new(em_rx)), Arc::new(Mutex::new(ev_rx)));
        // Several event workers: one slow event must not hold the next SOS.
        for _ in 0..4 {
            lanes.spawn(writer::run_event_lane(
                em_rx.clone(),
                ev_rx.clone(),
                ctx.clone(),
            ));
        }
        lanes.spawn(writer::run_presence_lane(pr_rx, ctx.clone()));
        lanes.spawn(writer::run_reject_lane(
            rj_rx,
            ctx.clone(),
            s.reject_payload_keep_bytes,
        ));
        lanes.spawn(writer::run_resolver(un_rx, ctx.clone(), known.clone()));
        {
            // Removals and bulk provisioning take effect without a restart.
            let (pool, known, cancel) = (pool.clone(), known.clone(), lanes_cancel.clone());
            lanes.spawn(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(std::time::Duration::from_secs(30)) => {}
                        _ = cancel.cancelled() => return,
                    }
                    match crate::store::devices::all_ids(&pool).await {
                        Ok(ids) => known.replace(ids),
                        Err(e) => tracing::warn!(error = %e, "device registry refresh failed"),
                    }
                }
            });
        }

        let limits = validate::Limits {
            max_payload_bytes: s.max_payload_bytes,
            max_clock_ahead: chrono::TimeDelta::from_std(s.max_clock_ahead)
                .unwrap_or(chrono::TimeDelta::minutes(5)),
            max_clock_behind: chrono::TimeDelta::from_std(s.max_clock_behind)
                .unwrap_or(chrono::TimeDelta::days(7)),
        };
        let mut connections = tokio::task::JoinSet::new();
        for (i, (cfg, ack_rx)) in sessions.into_iter().zip(ack_receivers).enumerate() {
            let (pending_tx, pending_rx) = tokio::sync::watch::channel(0usize);
            lanes.spawn(session::run_acker(
                ack_rx,
                pending_tx,
                metrics.clone(),
                m.keep_alive,
            ));
            connections.spawn(session::run_connection(
                i as u16,
                cfg,
                ack_senders[i].clone(),
                pending_rx,
                router.clone(),
                limits.clone(),
                intake.clone(),
                std::time::Duration::from_secs(15),
            ));
        }
        tracing::info!(
            broker = %m.url,
            connections = m.connections,
            receive_maximum = m.receive_maximum,
            filter = %mqtt::subscription_filter(m),
            event_filter = mqtt::event_filter(m).as_deref().unwrap_or("-"),
            "ingest started"
        );
        Ok(Pipeline {
            intake,
            lanes_cancel,
            connections,
            lanes,
            latest: Some(latest),
            known,
        })
    }

    /// Graceful stop: take nothing new, let in-flight messages commit and be acknowledged,
    /// disconnect, then stop the lanes and write the last device state.
    pub async fn shutdown(mut self) {
        self.intake.cancel();
        while self.connections.join_next().await.is_some() {}
        self.lanes_cancel.cancel();
        // Whatever is still in a lane was not acknowledged; the broker redelivers it.
        self.lanes.abort_all();
        while self.lanes.join_next().await.is_some() {}
        if let Some(latest) = self.latest.take() {
            // Lanes are gone, so the tracker's channel closes and it flushes once more.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), latest).await;
        }
        tracing::info!("ingest stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_connections_no_sos_depends_on_coalesce_their_reads() {
        let mut m = crate::config::MqttSettings::default();
        let (sessions, event_conn) = session_configs(&m).unwrap();
        assert_eq!(event_conn, Some(1));
        assert!(sessions[0].coalesces_reads(), "the heartbeat connection");
        assert!(!sessions[1].coalesces_reads(), "the event connection");

        // A filter without device events: they arrive on the main connections.
        m.topic_filter = "sg/v1/dev/+/hb".into();
        let (sessions, event_conn) = session_configs(&m).unwrap();
        assert_eq!(event_conn, None);
        assert!(sessions.iter().all(|s| !s.coalesces_reads()));

        m.topic_filter = "sg/#".into();
        m.read_coalesce = std::time::Duration::ZERO;
        let (sessions, _) = session_configs(&m).unwrap();
        assert!(sessions.iter().all(|s| !s.coalesces_reads()));
    }
}
