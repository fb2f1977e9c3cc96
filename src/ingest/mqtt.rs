//! MQTT connections: one task polls each rumqttc event loop and nothing else; a separate
//! acker task per connection sends the PUBACKs.
//!
//! Ordering: MQTT requires PUBACKs in the order the PUBLISHes arrived (MQTT 5 §4.6), while
//! our lanes commit out of order (an SOS commits before the heartbeat batch received just
//! before it). The acker therefore keeps a window of received messages and acknowledges the
//! longest committed prefix. The cost is that an ack may wait for an earlier message's
//! commit; the commit, which is what matters for safety and latency, never waits.
//!
//! Reconnects: packet ids belong to a network connection. After a reconnect the broker
//! resends everything unacknowledged (persistent session), so the acker forgets the old
//! window; those resends are deduplicated by the database's unique keys and acked anew.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::{ConnectProperties, Filter, Publish};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::Outgoing;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{AckToken, Router};
use crate::config::MqttSettings;
use crate::ingest::validate::Limits;

#[derive(Debug)]
pub enum AckCmd {
    /// A message was received; `ack` (QoS, packet id) is None for QoS 0 (nothing to
    /// acknowledge).
    Register { seq: u64, ack: Option<(QoS, u16)> },
    /// The message's rows are committed (or it was rejected and recorded).
    Done(u64),
    /// `Done` for several messages (a committed heartbeat batch).
    DoneMany(Vec<u64>),
    /// The connection was re-established: old packet ids are void.
    Reset,
}

#[derive(Debug, thiserror::Error)]
pub enum MqttConfigError {
    #[error("mqtt.url {0:?}: {1}")]
    Url(String, String),
    #[error("mqtts:// needs TLS support: {0}")]
    Tls(String),
}

/// Outgoing QoS 1 publishes in flight per connection. The ingest connections publish
/// nothing; the downlink publishes one command at a time and waits for its ack.
const OUTGOING_INFLIGHT: u16 = 64;

/// Builds the options for connection `index` of this instance.
pub fn options(settings: &MqttSettings, index: usize) -> Result<MqttOptions, MqttConfigError> {
    options_for(settings, &index.to_string())
}

/// Builds the options for this instance's connection `{client_id}-{suffix}`.
pub fn options_for(settings: &MqttSettings, suffix: &str) -> Result<MqttOptions, MqttConfigError> {
    let url = url::Url::parse(&settings.url)
        .map_err(|e| MqttConfigError::Url(settings.url.clone(), e.to_string()))?;
    let host = url
        .host_str()
        .ok_or_else(|| MqttConfigError::Url(settings.url.clone(), "no host".into()))?;
    let tls = matches!(url.scheme(), "mqtts" | "ssl");
    let port = url.port().unwrap_or(if tls { 8883 } else { 1883 });
    let client_id = format!("{}-{suffix}", settings.client_id);
    let mut opts = MqttOptions::new(client_id, host, port);
    opts.set_keep_alive(settings.keep_alive);
    // A persistent session: the broker keeps our subscription and queues messages while we
    // are down or restarting, so nothing published meanwhile is lost.
    opts.set_clean_start(false);
    opts.set_manual_acks(true);
    opts.set_connect_properties(ConnectProperties {
        session_expiry_interval: Some(settings.session_expiry.as_secs().min(u32::MAX as u64) as u32),
        receive_maximum: Some(settings.receive_maximum),
        max_packet_size: Some(settings.max_packet_bytes),
        topic_alias_max: None,
        request_response_info: None,
        request_problem_info: None,
        user_properties: Vec::new(),
        authentication_method: None,
        authentication_data: None,
    });
    // rumqttc allocates (and touches) one slot per outgoing in-flight packet id up front:
    // 65,535 slots, about 14 MiB per connection, by default. Subscriptions take their packet
    // ids from the same range, so it must stay above 1.
    opts.set_outgoing_inflight_upper_limit(OUTGOING_INFLIGHT);
    // Acks flow through the request channel: room for a full window of them.
    opts.set_request_channel_capacity(settings.receive_maximum as usize + 64);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    opts.set_network_options(net);
    if let (Some(user), Some(pass)) = (&settings.username, &settings.password) {
        opts.set_credentials(user.clone(), pass.expose().to_string());
    }
    if tls {
        opts.set_transport(tls_transport(settings)?);
    }
    Ok(opts)
}

fn tls_transport(settings: &MqttSettings) -> Result<rumqttc::Transport, MqttConfigError> {
    match &settings.ca_file {
        Some(path) => {
            let ca = std::fs::read(path).map_err(|e| {
                MqttConfigError::Tls(format!("cannot read mqtt.ca_file {path}: {e}"))
            })?;
            Ok(rumqttc::Transport::tls(ca, None, None))
        }
        None => Err(MqttConfigError::Tls(
            "set mqtt.ca_file (SILVERGUARD_MQTT__CA_FILE) to the broker's CA bundle".into(),
        )),
    }
}

pub fn subscription_filter(settings: &MqttSettings) -> String {
    if settings.shared_group.is_empty() {
        settings.topic_filter.clone()
    } else {
        format!("$share/{}/{}", settings.shared_group, settings.topic_filter)
    }
}

/// The device event topics, as a filter.
pub const EVENT_TOPICS: &str = "sg/v1/dev/+/evt";

/// Whether an MQTT topic filter matches a topic (`+` one level, `#` the rest).
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The subscription of the dedicated event connection, when the configured filter takes
/// device events at all (`None`: it does not, so there is nothing to separate).
///
/// Why a connection of its own: acknowledgements go out in receive order and only after
/// commit, so on a connection that carries heartbeats the broker's in-flight window is
/// mostly heartbeats waiting for their batch. An SOS queued behind a full window waits for
/// a whole batch commit before the broker even sends it. On its own connection (its own
/// session, its own window) an SOS is sent at once. The main connections still receive
/// events too (their filter covers them, and MQTT has no "all but"); that copy is written
/// with `ON CONFLICT DO NOTHING` and makes no second row and no second alert, and it keeps an
/// event safe even if the event session were missing when it was published.
pub fn event_filter(settings: &MqttSettings) -> Option<String> {
    if !filter_matches(&settings.topic_filter, "sg/v1/dev/x/evt") {
        return None;
    }
    Some(if settings.shared_group.is_empty() {
        EVENT_TOPICS.to_string()
    } else {
        format!("$share/{}/{EVENT_TOPICS}", settings.shared_group)
    })
}

/// One received message in the acker's window.
struct Slot {
    ack: Option<(QoS, u16)>,
    done: bool,
}

fn mark_done(window: &mut VecDeque<Slot>, base: u64, seq: u64) {
    if seq >= base {
        if let Some(slot) = window.get_mut((seq - base) as usize) {
            slot.done = true;
        }
    }
}

/// Sends the PUBACKs of the longest committed prefix of the window. False when the event
/// loop is gone (shutdown; unacked messages are redelivered to the session later).
async fn ack_prefix(
    client: &AsyncClient,
    window: &mut VecDeque<Slot>,
    base: &mut u64,
    metrics: &crate::metrics::IngestMetrics,
) -> bool {
    while window.front().is_some_and(|s| s.done) {
        let Some(slot) = window.pop_front() else {
            break;
        };
        *base += 1;
        metrics.pending_acks.dec();
        if let Some((qos, pkid)) = slot.ack {
            let mut p = Publish::new("", qos, bytes::Bytes::new(), None);
            p.pkid = pkid;
            if client.ack(&p).await.is_err() {
                return false;
            }
            metrics.acks_sent.inc();
        }
    }
    true
}

/// Acknowledges committed messages in receive order.
pub async fn run_acker(
    client: AsyncClient,
    mut rx: mpsc::UnboundedReceiver<AckCmd>,
    pending_tx: watch::Sender<usize>,
    router: Router,
) {
    let mut window: VecDeque<Slot> = VecDeque::new();
    let mut base: u64 = 0;
    let metrics = router.metrics.clone();
    while let Some(cmd) = rx.recv().await {
        match cmd {
            AckCmd::Register { seq, ack } => {
                if window.is_empty() {
                    base = seq;
                }
                window.push_back(Slot { ack, done: false });
                metrics.pending_acks.inc();
            }
            AckCmd::Done(seq) => {
                mark_done(&mut window, base, seq);
                if !ack_prefix(&client, &mut window, &mut base, &metrics).await {
                    return;
                }
            }
            AckCmd::DoneMany(seqs) => {
                for seq in seqs {
                    mark_done(&mut window, base, seq);
                }
                if !ack_prefix(&client, &mut window, &mut base, &metrics).await {
                    return;
                }
            }
            AckCmd::Reset => {
                metrics.pending_acks.dec_by(window.len() as i64);
                window.clear();
            }
        }
        let _ = pending_tx.send(window.len());
    }
}

/// Polls one connection until cancelled; on cancel, takes no new messages, waits (bounded)
/// until everything taken is committed and acknowledged, then disconnects cleanly.
#[allow(clippy::too_many_arguments)]
pub async fn run_connection(
    index: u16,
    settings: MqttSettings,
    filter: String,
    client: AsyncClient,
    mut eventloop: EventLoop,
    acker: mpsc::UnboundedSender<AckCmd>,
    mut pending: watch::Receiver<usize>,
    router: Router,
    limits: Limits,
    cancel: CancellationToken,
    drain_timeout: Duration,
) {
    let span = tracing::info_span!("mqtt", conn = index, broker = %settings.url, filter = %filter);
    async move {
        let mut seq: u64 = 0;
        let mut draining: Option<Instant> = None;
        let mut backoff = Duration::from_millis(200);
        let mut connected = false;
        let metrics = router.metrics.clone();
        loop {
            if let Some(since) = draining {
                let drained = *pending.borrow() == 0;
                if drained || since.elapsed() > drain_timeout {
                    if !drained {
                        tracing::warn!(
                            pending = *pending.borrow(),
                            "drain timed out; the broker will redeliver the rest"
                        );
                    }
                    break;
                }
            }
            let event = tokio::select! {
                ev = eventloop.poll() => ev,
                _ = cancel.cancelled(), if draining.is_none() => {
                    tracing::info!("stopping: no new messages, draining in-flight work");
                    draining = Some(Instant::now());
                    continue;
                }
                _ = pending.changed(), if draining.is_some() => continue,
            };
            match event {
                Ok(Event::Incoming(rumqttc::v5::Incoming::Publish(publish))) => {
                    if draining.is_some() {
                        // Not acknowledged: it stays with the broker for the next start.
                        continue;
                    }
                    seq += 1;
                    let ack = AckToken {
                        conn: index,
                        seq,
                        received: Instant::now(),
                    };
                    metrics.received_messages.inc();
                    metrics.received_bytes.inc_by(publish.payload.len() as u64);
                    let register = AckCmd::Register {
                        seq,
                        ack: (publish.qos != QoS::AtMostOnce)
                            .then_some((publish.qos, publish.pkid)),
                    };
                    if acker.send(register).is_err() {
                        break;
                    }
                    match std::str::from_utf8(&publish.topic) {
                        Ok(topic) => {
                            router.handle(topic, publish.payload, &limits, ack).await;
                        }
                        Err(_) => {
                            let topic = String::from_utf8_lossy(&publish.topic).into_owned();
                            router.reject(
                                super::validate::Rejected {
                                    reason: super::validate::RejectReason::BadTopic,
                                    detail: "topic is not UTF-8".into(),
                                    device_id: None,
                                },
                                &topic,
                                publish.payload,
                                ack,
                            );
                        }
                    }
                }
                Ok(Event::Incoming(rumqttc::v5::Incoming::ConnAck(connack))) => {
                    backoff = Duration::from_millis(200);
                    if !connected {
                        metrics.mqtt_connected.inc();
                        connected = true;
                    }
                    let _ = acker.send(AckCmd::Reset);
                    tracing::info!(
                        session_present = connack.session_present,
                        "connected to broker"
                    );
                    // Subscribing again is idempotent and covers a session the broker lost.
                    // Done from a spawned task: awaiting the request channel from inside the
                    // poll loop could deadlock.
                    let c = client.clone();
                    let f = filter.clone();
                    tokio::spawn(async move {
                        if let Err(e) = c
                            .subscribe_many([Filter::new(f.clone(), QoS::AtLeastOnce)])
                            .await
                        {
                            tracing::error!(filter = %f, error = %e, "cannot subscribe");
                        }
                    });
                }
                Ok(Event::Incoming(rumqttc::v5::Incoming::SubAck(suback))) => {
                    tracing::info!(filter = %filter, codes = ?suback.return_codes, "subscribed");
                }
                Ok(Event::Incoming(rumqttc::v5::Incoming::Disconnect(d))) => {
                    tracing::warn!(reason = ?d.reason_code, "broker sent DISCONNECT");
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => {}
                Ok(_) => {}
                Err(error) => {
                    if connected {
                        metrics.mqtt_connected.dec();
                        connected = false;
                    }
                    if draining.is_some() {
                        // Nothing more can be acknowledged on this connection.
                        break;
                    }
                    metrics.mqtt_connection_errors.inc();
                    tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64,
                        "broker connection lost or refused, reconnecting");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = cancel.cancelled() => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
        if connected {
            let _ = client.try_disconnect();
            // Let the event loop write the DISCONNECT (bounded).
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                        _ => {}
                    }
                }
            })
            .await;
            metrics.mqtt_connected.dec();
        }
        tracing::info!("connection closed");
    }
    .instrument(span)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_like_a_broker() {
        assert!(filter_matches("sg/#", "sg/v1/dev/x/evt"));
        assert!(filter_matches("#", "sg/v1/dev/x/evt"));
        assert!(filter_matches("sg/v1/dev/+/evt", "sg/v1/dev/x/evt"));
        assert!(filter_matches("sg/+/dev/+/+", "sg/v1/dev/x/evt"));
        assert!(!filter_matches("sg/v1/dev/+/hb", "sg/v1/dev/x/evt"));
        assert!(!filter_matches("sg/v1/dev/+", "sg/v1/dev/x/evt"));
        assert!(!filter_matches("sg/v1/dev/+/evt/x", "sg/v1/dev/x/evt"));
    }

    #[test]
    fn events_get_their_own_subscription_when_the_filter_takes_them() {
        let mut m = MqttSettings::default();
        assert_eq!(event_filter(&m).as_deref(), Some("sg/v1/dev/+/evt"));
        m.shared_group = "g".into();
        assert_eq!(
            event_filter(&m).as_deref(),
            Some("$share/g/sg/v1/dev/+/evt")
        );
        m.topic_filter = "sg/v1/dev/+/hb".into();
        assert_eq!(event_filter(&m), None);
    }
}
