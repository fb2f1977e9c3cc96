//! Prometheus metrics for every stage, served at `/metrics`.
//!
//! Handles are created once at start (one per label value) and cloned into the stages, so the
//! hot path only increments atomics. Counters get the `_total` suffix from the encoder; units
//! are base units (seconds, bytes).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::Arc;

use crate::ingest::validate::RejectReason;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LaneLabel {
    pub lane: &'static str,
}

fn latency_histogram() -> Histogram {
    // 1 ms .. ~33 s
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// Per-kind counters: heartbeat, event, presence.
#[derive(Clone)]
pub struct PerKind {
    pub heartbeat: Counter,
    pub event: Counter,
    pub presence: Counter,
}

impl PerKind {
    fn new(family: &Family<KindLabel, Counter>) -> Self {
        // One statement each: `get_or_create` returns a read guard, and a second call while
        // the first guard lives (same statement) would wait forever for the write lock.
        let counter = |kind| family.get_or_create(&KindLabel { kind }).clone();
        let heartbeat = counter("heartbeat");
        let event = counter("event");
        let presence = counter("presence");
        PerKind {
            heartbeat,
            event,
            presence,
        }
    }
}

#[derive(Clone)]
pub struct IngestMetrics {
    /// MQTT publishes taken from the broker, before validation.
    pub received_messages: Counter,
    pub received_bytes: Counter,
    pub committed: PerKind,
    /// Redeliveries (or device resends) that were already stored.
    pub duplicates: PerKind,
    rejected: Family<ReasonLabel, Counter>,
    /// Rejects counted but not stored because the reject lane was full (flood protection).
    pub rejects_not_stored: Counter,
    pub clock_skewed: Counter,
    pub batch_rows: Histogram,
    commit_seconds: Family<LaneLabel, Histogram, fn() -> Histogram>,
    /// Device time (or receive time when skewed) to commit.
    pub lag_seconds: Histogram,
    /// Broker receive to commit (what the pipeline itself adds).
    pub pipeline_seconds: Histogram,
    pub write_errors: Counter,
    pub mqtt_connected: Gauge,
    pub mqtt_connection_errors: Counter,
    pub pending_acks: Gauge,
    /// Socket reads of the ingest connections that brought data. Received messages per read
    /// says how much each wake-up of the reader handles (about 2 at 30,000/s on loopback:
    /// the broker writes each message on its own, docs/performance.md, eighth round).
    pub socket_reads: Counter,
    pub acks_sent: Counter,
    pub ack_writes: Counter,
}

impl IngestMetrics {
    pub fn rejected(&self, reason: RejectReason) -> Counter {
        let counter = self.rejected.get_or_create(&ReasonLabel {
            reason: reason.as_str(),
        });
        counter.clone()
    }

    pub fn commit_seconds(&self, lane: &'static str) -> Histogram {
        let histogram = self.commit_seconds.get_or_create(&LaneLabel { lane });
        histogram.clone()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabel {
    pub channel: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChannelLabel {
    pub channel: String,
}

#[derive(Clone)]
pub struct NotifyMetrics {
    attempts: Family<DeliveryLabel, Counter>,
    attempt_seconds: Family<ChannelLabel, Histogram, fn() -> Histogram>,
    /// Outbox row created (in the alert's transaction) to delivery accepted by the provider.
    queued_to_delivered_seconds: Family<ChannelLabel, Histogram, fn() -> Histogram>,
}

impl NotifyMetrics {
    pub fn observe(
        &self,
        channel: &str,
        ok: bool,
        elapsed: std::time::Duration,
        _urgent: bool,
        created_at: chrono::DateTime<chrono::Utc>,
    ) {
        let label = DeliveryLabel {
            channel: channel.to_string(),
            outcome: if ok { "delivered" } else { "failed" },
        };
        let c = self.attempts.get_or_create(&label);
        c.inc();
        drop(c);
        let ch = ChannelLabel {
            channel: channel.to_string(),
        };
        let h = self.attempt_seconds.get_or_create(&ch);
        h.observe(elapsed.as_secs_f64());
        drop(h);
        if ok {
            let lag = (chrono::Utc::now() - created_at).num_milliseconds().max(0) as f64 / 1000.0;
            let h = self.queued_to_delivered_seconds.get_or_create(&ch);
            h.observe(lag);
        }
    }
}

/// The silence sweeper's work: how many deadlines it confirmed or moved, and how long a
/// sweep took (a fleet-wide wave of deadlines shows here first).
#[derive(Clone)]
pub struct SilenceMetrics {
    pub deadlines_moved: Counter,
    pub alerts_raised: Counter,
    pub rearmed: Counter,
    pub sweep_seconds: Histogram,
}

/// The registry and every stage's handles.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub ingest: IngestMetrics,
    pub notify: NotifyMetrics,
    pub silence: SilenceMetrics,
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("silverguard");
        let received_messages = Counter::default();
        r.register(
            "ingest_received_messages",
            "MQTT messages received from the broker",
            received_messages.clone(),
        );
        let received_bytes = Counter::default();
        r.register(
            "ingest_received_bytes",
            "Payload bytes received from the broker",
            received_bytes.clone(),
        );
        let committed = Family::<KindLabel, Counter>::default();
        r.register(
            "ingest_committed",
            "Rows committed, by message kind",
            committed.clone(),
        );
        let duplicates = Family::<KindLabel, Counter>::default();
        r.register(
            "ingest_duplicates",
            "Messages already stored (broker redelivery or device resend), by kind",
            duplicates.clone(),
        );
        let rejected = Family::<ReasonLabel, Counter>::default();
        for reason in RejectReason::ALL {
            // Pre-create so every reason shows as 0 before the first reject.
            let _ = rejected.get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            });
        }
        r.register(
            "ingest_rejected",
            "Messages rejected, by reason",
            rejected.clone(),
        );
        let rejects_not_stored = Counter::default();
        r.register(
            "ingest_rejects_not_stored",
            "Rejects counted but not stored because the reject lane was full",
            rejects_not_stored.clone(),
        );
        let clock_skewed = Counter::default();
        r.register(
            "ingest_clock_skewed",
            "Messages whose device clock was outside tolerance (stored with receive time)",
            clock_skewed.clone(),
        );
        let batch_rows = Histogram::new(exponential_buckets(1.0, 2.0, 15));
        r.register(
            "ingest_batch_rows",
            "Heartbeat rows per COPY batch",
            batch_rows.clone(),
        );
        let commit_seconds =
            Family::<LaneLabel, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            );
        r.register(
            "ingest_commit_seconds",
            "Time to commit a write, by lane",
            commit_seconds.clone(),
        );
        let lag_seconds = Histogram::new(exponential_buckets(0.01, 2.0, 16));
        r.register(
            "ingest_lag_seconds",
            "Measurement time on the device to commit",
            lag_seconds.clone(),
        );
        let pipeline_seconds = latency_histogram();
        r.register(
            "ingest_pipeline_seconds",
            "Receipt from the broker to commit",
            pipeline_seconds.clone(),
        );
        let write_errors = Counter::default();
        r.register(
            "ingest_write_errors",
            "Failed database writes (retried)",
            write_errors.clone(),
        );
        let mqtt_connected = Gauge::default();
        r.register(
            "mqtt_connections_up",
            "MQTT connections currently connected",
            mqtt_connected.clone(),
        );
        let mqtt_connection_errors = Counter::default();
        r.register(
            "mqtt_connection_errors",
            "MQTT connection errors (each followed by a reconnect)",
            mqtt_connection_errors.clone(),
        );
        let pending_acks = Gauge::default();
        r.register(
            "ingest_pending_acks",
            "Messages received but not yet acknowledged to the broker",
            pending_acks.clone(),
        );
        let socket_reads = Counter::default();
        r.register(
            "ingest_socket_reads",
            "Reads of the ingest connections' sockets that brought data",
            socket_reads.clone(),
        );
        let acks_sent = Counter::default();
        r.register(
            "ingest_acks_sent",
            "PUBACKs sent to the broker after commit",
            acks_sent.clone(),
        );
        let ack_writes = Counter::default();
        r.register(
            "ingest_ack_writes",
            "Writes to the broker carrying PUBACKs (acks_sent / ack_writes: acknowledgements per write)",
            ack_writes.clone(),
        );
        let attempts = Family::<DeliveryLabel, Counter>::default();
        r.register(
            "notify_attempts",
            "Delivery attempts, by channel and outcome",
            attempts.clone(),
        );
        let attempt_seconds =
            Family::<ChannelLabel, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            );
        r.register(
            "notify_attempt_seconds",
            "Time for one delivery attempt, by channel",
            attempt_seconds.clone(),
        );
        let queued_to_delivered_seconds =
            Family::<ChannelLabel, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            );
        r.register(
            "notify_queued_to_delivered_seconds",
            "From the outbox row (written in the alert's transaction) to the provider accepting the notification, by channel",
            queued_to_delivered_seconds.clone(),
        );
        let deadlines_moved = Counter::default();
        r.register(
            "silence_deadlines_moved",
            "Silence deadlines that came and were moved on: the device's newest heartbeat was recent",
            deadlines_moved.clone(),
        );
        let alerts_raised = Counter::default();
        r.register(
            "silence_alerts_raised",
            "Devices found silent (device_silent raised or repeated)",
            alerts_raised.clone(),
        );
        let rearmed = Counter::default();
        r.register(
            "silence_rearmed",
            "Silent devices re-armed by the sweeper because their data came back",
            rearmed.clone(),
        );
        let sweep_seconds = latency_histogram();
        r.register(
            "silence_sweep_seconds",
            "Time for one silence sweep (all due deadlines, then the devices back)",
            sweep_seconds.clone(),
        );
        Metrics {
            silence: SilenceMetrics {
                deadlines_moved,
                alerts_raised,
                rearmed,
                sweep_seconds,
            },
            notify: NotifyMetrics {
                attempts,
                attempt_seconds,
                queued_to_delivered_seconds,
            },
            registry: Arc::new(r),
            ingest: IngestMetrics {
                received_messages,
                received_bytes,
                committed: PerKind::new(&committed),
                duplicates: PerKind::new(&duplicates),
                rejected,
                rejects_not_stored,
                clock_skewed,
                batch_rows,
                commit_seconds,
                lag_seconds,
                pipeline_seconds,
                write_errors,
                mqtt_connected,
                mqtt_connection_errors,
                pending_acks,
                socket_reads,
                acks_sent,
                ack_writes,
            },
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
