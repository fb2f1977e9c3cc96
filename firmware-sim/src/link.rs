//! One bracelet's MQTT connection, with delivery accounting.
//!
//! rumqttc splits a connection into an [`AsyncClient`] (hands requests to a bounded channel)
//! and an [`EventLoop`] (does the IO). The rule from rumqtt applies: exactly one task polls
//! the event loop and that task never publishes, because a publish from inside the poll loop
//! can wait on the very channel only the poll loop drains. So a [`Link`] owns:
//!
//! * the poll task: connects (through a fleet-wide gate, so 1,000 bracelets do not connect in
//!   the same instant), reconnects with jittered exponential backoff, and matches the event
//!   loop's outgoing publishes and incoming PUBACKs to what was published;
//! * the client side, used by the device task: [`Link::publish`], [`Link::wait_acked`],
//!   [`Link::disconnect`] (clean) and [`Link::kill`] (abrupt, so the Last Will fires).
//!
//! ## Accounting
//!
//! rumqttc reports `Outgoing::Publish(pkid)` when it writes a publish and
//! `Incoming::PubAck(pkid)` when the broker acknowledges it, but not which message a packet id
//! belongs to. Requests leave the channel in the order they entered it, so the [`Tracker`]
//! keeps the classes of queued publishes in that order and binds each to its packet id when it
//! is written. A packet id that is already bound is a retransmission after a reconnect.
//!
//! ## Reconnects
//!
//! The session is persistent (`clean_session = false`), so after a reconnect rumqttc resends
//! what was not acknowledged. If the broker lost the session (a restart without
//! persistence; CONNACK says `session_present = false`) rumqttc drops that backlog; the poll
//! task puts it back, because a bracelet that has buffered an SOS must still deliver it.
//! A message that was in flight on too many failed connections is abandoned and counted, so
//! a broker that drops the connection on one message cannot make a device loop forever.

use bytes::Bytes;
use rumqttc::{
    AsyncClient, ClientError, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Outgoing,
    Packet, QoS, Request,
};
use silverguard_proto::v1::{Command, Presence};
use silverguard_proto::Message;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::report::{Counters, MsgClass};
use crate::{now_unix_ms, SimError};

/// How many times a message may be retransmitted on a new connection before it is abandoned.
const MAX_RESENDS: u8 = 5;
/// Capacity of the request channel between client and event loop. It only has to absorb a
/// short outage at the heartbeat rate; when it is full, [`Link::publish`] waits.
const REQUEST_CHANNEL: usize = 256;
/// In-flight QoS 1 window per connection. Bracelets publish a few messages per interval, so
/// this only matters at very short intervals; a larger window keeps round trips off the rate.
const INFLIGHT: u16 = 100;
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Where to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddr {
    pub host: String,
    pub port: u16,
    pub credentials: Option<(String, String)>,
}

impl BrokerAddr {
    /// Parses `mqtt://[user:pass@]host[:port]` (also `tcp://`). TLS schemes are refused.
    pub fn parse(url: &str) -> Result<BrokerAddr, SimError> {
        let bad = |why: &str| SimError::InvalidUrl(format!("{url:?}: {why}"));
        let u = url::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
        match u.scheme() {
            "mqtt" | "tcp" => {}
            "mqtts" | "ssl" | "tls" | "wss" => {
                return Err(SimError::Unsupported(format!(
                    "{url:?}: TLS not supported yet (use mqtt://)"
                )))
            }
            other => return Err(bad(&format!("scheme {other:?} is not mqtt://"))),
        }
        let host = u
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| bad("no host"))?;
        // url keeps the brackets of an IPv6 literal; the socket address wants it bare.
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let credentials = (!u.username().is_empty()).then(|| {
            (
                u.username().to_string(),
                u.password().unwrap_or_default().to_string(),
            )
        });
        Ok(BrokerAddr {
            host,
            port: u.port().unwrap_or(1883),
            credentials,
        })
    }
}

/// Settings of one connection.
#[derive(Debug, Clone)]
pub(crate) struct LinkSettings {
    pub broker: BrokerAddr,
    pub client_id: String,
    /// Persistent session: the broker keeps the subscription and unacknowledged messages.
    pub persistent: bool,
    /// Presence topic for the Last Will (`online = false`), if any.
    pub will_topic: Option<String>,
    /// Added to wall-clock time in the Last Will's `at_ms`.
    pub clock_offset_ms: i64,
    pub keep_alive: Duration,
    /// How long the first connection may take, counted from the first attempt (later
    /// reconnects retry for as long as the device runs).
    pub connect_timeout: Duration,
}

/// A connection notice from the poll task to the device task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Notice {
    /// CONNACK received.
    Connected {
        session_present: bool,
        /// False for the first connection, true after an error.
        reconnect: bool,
    },
    /// The first connection did not succeed within `connect_timeout`; the poll task ended.
    GaveUp { reason: String },
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    class: MsgClass,
    resent: u8,
}

/// Which published message each packet id stands for (see the module docs).
#[derive(Default)]
struct Tracker {
    /// Classes of publishes handed to the client, not yet written, in channel order.
    queued: VecDeque<MsgClass>,
    /// Written and not yet acknowledged, by packet id.
    inflight: HashMap<u16, Entry>,
    /// Taken from the channel but parked by rumqttc because its packet id was still in use
    /// (only happens with brokers that acknowledge out of order).
    collided: Option<(u16, MsgClass)>,
}

impl Tracker {
    fn outstanding(&self) -> usize {
        self.queued.len() + self.inflight.len() + usize::from(self.collided.is_some())
    }
}

/// State shared by the poll task and the device task. The mutex is held only for map
/// updates, never across an await.
struct Shared {
    tracker: Mutex<Tracker>,
    /// Woken on every acknowledgement, for [`Link::wait_acked`].
    acked: Notify,
    /// Whether the connection is up, so a goodbye does not wait on a broker that is gone.
    up: AtomicBool,
    counters: Arc<Counters>,
}

impl Shared {
    fn tracker(&self) -> MutexGuard<'_, Tracker> {
        // A poisoned lock means the other task panicked mid-update; counting on with what is
        // there beats taking the whole fleet down.
        self.tracker.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn ack(&self, class: MsgClass) {
        self.counters.acked(class);
        self.acked.notify_one();
    }
}

/// Why [`Link::publish`] did not hand the message over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotPublished {
    /// The poll task ended.
    Closed,
    /// Cancelled while waiting for room in the request channel.
    Cancelled,
}

/// One bracelet's connection (see the module docs).
pub(crate) struct Link {
    client: AsyncClient,
    shared: Arc<Shared>,
    poll: JoinHandle<()>,
    notices: mpsc::UnboundedReceiver<Notice>,
}

impl Link {
    /// Starts the poll task; it connects as soon as the `gate` lets it.
    pub fn start(settings: LinkSettings, counters: Arc<Counters>, gate: Arc<Semaphore>) -> Link {
        let mut opts = MqttOptions::new(
            settings.client_id.clone(),
            settings.broker.host.clone(),
            settings.broker.port,
        );
        opts.set_keep_alive(settings.keep_alive)
            .set_clean_session(!settings.persistent)
            .set_inflight(INFLIGHT)
            // Room for the 64 KiB `oversized` payloads both ways.
            .set_max_packet_size(256 * 1024, 256 * 1024);
        if let Some((user, pass)) = &settings.broker.credentials {
            opts.set_credentials(user.clone(), pass.clone());
        }
        let (client, mut eventloop) = AsyncClient::new(opts, REQUEST_CHANNEL);
        let mut net = eventloop.network_options();
        // Bracelet messages are tiny; Nagle would hold each one back waiting for the ack of
        // the previous one and cap a device at a few messages per round trip.
        net.set_tcp_nodelay(true);
        net.set_connection_timeout(10);
        eventloop.set_network_options(net);

        let shared = Arc::new(Shared {
            tracker: Mutex::new(Tracker::default()),
            acked: Notify::new(),
            up: AtomicBool::new(false),
            counters,
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let poll = tokio::spawn(poll_loop(eventloop, settings, shared.clone(), gate, tx));
        Link {
            client,
            shared,
            poll,
            notices: rx,
        }
    }

    /// The next connection notice; `None` once the poll task has ended.
    pub async fn next_notice(&mut self) -> Option<Notice> {
        self.notices.recv().await
    }

    /// Hands one message to the event loop and counts it as published. While the request
    /// channel is full (broker unreachable for a while) it waits, unless `cancel` fires:
    /// a device that is told to stop must not hang on a broker that is gone.
    pub async fn publish(
        &self,
        class: MsgClass,
        topic: &str,
        qos: QoS,
        retain: bool,
        payload: Bytes,
        cancel: Option<&CancellationToken>,
    ) -> Result<(), NotPublished> {
        if !rumqttc::valid_topic(topic) {
            // Ids are validated at start, so this is a bug; refuse rather than loop.
            return Err(NotPublished::Closed);
        }
        let mut wait = Duration::from_millis(5);
        loop {
            {
                // The class is queued under the same lock as the send, so the poll task can
                // never see the request before its class.
                let mut t = self.shared.tracker();
                t.queued.push_back(class);
                match self
                    .client
                    .try_publish(topic, qos, retain, payload.to_vec())
                {
                    Ok(()) => {
                        self.shared.counters.published(class);
                        return Ok(());
                    }
                    Err(ClientError::TryRequest(_)) if !self.poll.is_finished() => {
                        t.queued.pop_back();
                    }
                    Err(_) => {
                        t.queued.pop_back();
                        return Err(NotPublished::Closed);
                    }
                }
            }
            match cancel {
                Some(c) => tokio::select! {
                    _ = c.cancelled() => return Err(NotPublished::Cancelled),
                    _ = tokio::time::sleep(wait) => {}
                },
                None => tokio::time::sleep(wait).await,
            }
            wait = (wait * 2).min(Duration::from_millis(200));
        }
    }

    /// Subscribes without waiting (a full channel just skips it; the next reconnect retries).
    pub fn subscribe(&self, filter: &str) {
        if let Err(e) = self.client.try_subscribe(filter, QoS::AtLeastOnce) {
            tracing::debug!(error = %e, filter, "subscribe deferred");
        }
    }

    /// Messages published and not yet acknowledged.
    pub fn outstanding(&self) -> usize {
        self.shared.tracker().outstanding()
    }

    /// Waits until every published message is acknowledged or `deadline` passes; returns how
    /// many are still outstanding.
    pub async fn wait_acked(&self, deadline: Instant) -> usize {
        loop {
            let n = self.outstanding();
            if n == 0 || self.poll.is_finished() {
                return n;
            }
            // `notify_one` keeps a permit when nobody waits, so an ack between the check
            // above and this wait is not missed.
            if tokio::time::timeout_at(deadline, self.shared.acked.notified())
                .await
                .is_err()
            {
                return self.outstanding();
            }
        }
    }

    /// Sends DISCONNECT (so no Last Will) and waits briefly for the poll task to write it.
    pub async fn disconnect(mut self) {
        if !self.shared.up.load(ordering()) {
            // Nobody to say goodbye to; dropping the link ends the reconnect attempts.
            return;
        }
        let sent = tokio::time::timeout(Duration::from_secs(2), self.client.disconnect()).await;
        if matches!(sent, Ok(Ok(()))) {
            // A poll task that cannot write it (broker down) is aborted on drop below.
            let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.poll).await;
        }
    }

    /// Drops the connection without DISCONNECT, as a bracelet whose battery died would: the
    /// socket closes and the broker publishes the Last Will.
    pub fn kill(self) {
        // Drop aborts the poll task, which drops the event loop and with it the socket.
        drop(self);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Never leave a poll task running for a device that is gone.
        self.poll.abort();
    }
}

fn presence_payload(online: bool, clock_offset_ms: i64) -> Vec<u8> {
    Presence {
        online,
        at_ms: now_unix_ms().saturating_add(clock_offset_ms),
    }
    .encode_to_vec()
}

/// The only task that polls this connection's event loop.
async fn poll_loop(
    mut el: EventLoop,
    settings: LinkSettings,
    shared: Arc<Shared>,
    gate: Arc<Semaphore>,
    notices: mpsc::UnboundedSender<Notice>,
) {
    let mut backoff = BACKOFF_START;
    let mut ever_connected = false;
    let mut first_attempt: Option<Instant> = None;
    // Publishes rumqttc will drop if the broker lost our session (see module docs).
    let mut backlog: Vec<Request> = Vec::new();

    loop {
        let connecting = el.network.is_none();
        let result = if connecting {
            // The Last Will is fixed at CONNECT, so its timestamp is refreshed per attempt.
            if let Some(topic) = &settings.will_topic {
                el.mqtt_options.set_last_will(LastWill::new(
                    topic.clone(),
                    presence_payload(false, settings.clock_offset_ms),
                    QoS::AtLeastOnce,
                    true,
                ));
            }
            // The permit is held only for the handshake; that bounds concurrent connects.
            let Ok(_permit) = gate.acquire().await else {
                return;
            };
            first_attempt.get_or_insert_with(Instant::now);
            el.poll().await
        } else {
            el.poll().await
        };

        match result {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                backoff = BACKOFF_START;
                shared.up.store(true, ordering());
                if ever_connected {
                    shared.counters.reconnects.fetch_add(1, ordering());
                }
                if !ack.session_present && !backlog.is_empty() {
                    restore_backlog(&mut el, &shared, std::mem::take(&mut backlog));
                }
                backlog.clear();
                // The device task may be gone already; nothing to tell then.
                let _ = notices.send(Notice::Connected {
                    session_present: ack.session_present,
                    reconnect: ever_connected,
                });
                ever_connected = true;
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                // DISCONNECT is written and flushed; dropping the event loop closes the socket.
                return;
            }
            Ok(event) => on_event(event, &shared),
            Err(ConnectionError::RequestsDone) => return,
            Err(e) => {
                shared.up.store(false, ordering());
                match &e {
                    ConnectionError::ConnectionRefused(code) => tracing::warn!(
                        client_id = %settings.client_id, ?code, "broker refused the connection"
                    ),
                    _ => tracing::debug!(
                        client_id = %settings.client_id, error = %e, "connection error"
                    ),
                }
                if !ever_connected
                    && first_attempt.is_some_and(|t| t.elapsed() >= settings.connect_timeout)
                {
                    let _ = notices.send(Notice::GaveUp {
                        reason: e.to_string(),
                    });
                    return;
                }
                if !connecting {
                    guard_backlog(&mut el, &shared);
                }
                // Remember what rumqttc plans to resend, in case the session is gone.
                backlog = el
                    .pending
                    .iter()
                    .filter(|r| matches!(r, Request::Publish(_) | Request::PubRel(_)))
                    .cloned()
                    .collect();
                let jitter = 0.5 + rand::random::<f64>();
                tokio::time::sleep(backoff.mul_f64(jitter)).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

fn ordering() -> std::sync::atomic::Ordering {
    std::sync::atomic::Ordering::Relaxed
}

/// Matches written publishes and acknowledgements to what was published.
fn on_event(event: Event, shared: &Shared) {
    match event {
        Event::Outgoing(Outgoing::Publish(pkid)) => {
            let mut t = shared.tracker();
            if pkid == 0 {
                // QoS 0 has no acknowledgement; written is as good as it gets.
                if let Some(class) = t.queued.pop_front() {
                    drop(t);
                    shared.ack(class);
                }
            } else if t.inflight.contains_key(&pkid) {
                // A retransmission after a reconnect: already bound.
            } else if matches!(t.collided, Some((p, _)) if p == pkid) {
                if let Some((_, class)) = t.collided.take() {
                    t.inflight.insert(pkid, Entry { class, resent: 0 });
                }
            } else if let Some(class) = t.queued.pop_front() {
                t.inflight.insert(pkid, Entry { class, resent: 0 });
            }
        }
        Event::Outgoing(Outgoing::AwaitAck(pkid)) => {
            let mut t = shared.tracker();
            if let Some(class) = t.queued.pop_front() {
                t.collided = Some((pkid, class));
            }
        }
        // PUBACK ends QoS 1, PUBCOMP ends QoS 2; a packet id is only ever one of the two.
        Event::Incoming(Packet::PubAck(ack)) => settle(shared, ack.pkid),
        Event::Incoming(Packet::PubComp(comp)) => settle(shared, comp.pkid),
        Event::Incoming(Packet::Publish(p)) => {
            shared.counters.commands.fetch_add(1, ordering());
            match Command::decode(p.payload.as_ref()) {
                Ok(cmd) => tracing::debug!(topic = %p.topic, ?cmd, "command received"),
                Err(e) => tracing::debug!(topic = %p.topic, error = %e, "undecodable command"),
            }
        }
        _ => {}
    }
}

fn settle(shared: &Shared, pkid: u16) {
    let entry = shared.tracker().inflight.remove(&pkid);
    if let Some(e) = entry {
        shared.ack(e.class);
    }
}

/// After a connection failed: blames the oldest unacknowledged message (the first publish
/// rumqttc will resend) and abandons it once it has been resent [`MAX_RESENDS`] times.
///
/// Only the oldest is blamed: a broker that drops the connection on one message keeps it at
/// the head of the resend queue, while the innocent messages behind it are never counted and
/// go through once it is gone. A merely flaky network rarely fails six times before the head
/// is acknowledged.
fn guard_backlog(el: &mut EventLoop, shared: &Shared) {
    let mut t = shared.tracker();
    let head = el.pending.iter().position(
        |r| matches!(r, Request::Publish(p) if p.pkid != 0 && t.inflight.contains_key(&p.pkid)),
    );
    let Some(pos) = head else { return };
    let Some(Request::Publish(p)) = el.pending.get(pos) else {
        return;
    };
    let pkid = p.pkid;
    let give_up = match t.inflight.get_mut(&pkid) {
        Some(e) if e.resent >= MAX_RESENDS => true,
        Some(e) => {
            e.resent += 1;
            false
        }
        None => false,
    };
    if give_up {
        el.pending.remove(pos);
        if let Some(e) = t.inflight.remove(&pkid) {
            tracing::warn!(?e.class, "message abandoned after {MAX_RESENDS} resends");
            shared.counters.abandoned.fetch_add(1, ordering());
        }
        drop(t);
        // The device may be waiting for this very message.
        shared.acked.notify_one();
    }
}

/// The broker lost the session and rumqttc dropped its resend queue: put it back. Publishes
/// keep their packet ids (the new session has none in use), so the tracker still knows them.
/// A QoS 2 message waiting for PUBCOMP was already received (PUBREC); it counts as delivered.
fn restore_backlog(el: &mut EventLoop, shared: &Shared, backlog: Vec<Request>) {
    let mut restored = VecDeque::with_capacity(backlog.len());
    for r in backlog {
        match r {
            Request::PubRel(rel) => settle(shared, rel.pkid),
            other => restored.push_back(other),
        }
    }
    tracing::info!(
        count = restored.len(),
        "broker lost the session; resending unacknowledged messages"
    );
    restored.extend(el.pending.drain(..));
    el.pending = restored;
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::{PubAck, PubComp};
    use silverguard_proto::v1::EventKind;

    fn shared() -> Shared {
        Shared {
            tracker: Mutex::new(Tracker::default()),
            acked: Notify::new(),
            up: AtomicBool::new(true),
            counters: Arc::new(Counters::default()),
        }
    }

    fn queue(s: &Shared, classes: &[MsgClass]) {
        s.tracker().queued.extend(classes.iter().copied());
    }

    fn out(s: &Shared, pkid: u16) {
        on_event(Event::Outgoing(Outgoing::Publish(pkid)), s);
    }

    fn ack(s: &Shared, pkid: u16) {
        on_event(Event::Incoming(Packet::PubAck(PubAck::new(pkid))), s);
    }

    #[test]
    fn acks_are_matched_to_classes() {
        let s = shared();
        let sos = MsgClass::Event(EventKind::Sos);
        queue(&s, &[MsgClass::Presence, MsgClass::Heartbeat, sos]);
        out(&s, 1);
        out(&s, 2);
        ack(&s, 2);
        out(&s, 3);
        assert_eq!(s.tracker().outstanding(), 2);
        ack(&s, 1);
        ack(&s, 3);
        // A stray or duplicate PUBACK changes nothing.
        ack(&s, 3);
        ack(&s, 42);
        let r = s.counters.snapshot(1, 1.0);
        assert_eq!(r.presence_acked, 1);
        assert_eq!(r.heartbeats_acked, 1);
        assert_eq!(r.events_acked["SOS"], 1);
        assert_eq!(s.tracker().outstanding(), 0);
    }

    #[test]
    fn retransmissions_are_not_counted_twice() {
        let s = shared();
        queue(
            &s,
            &[
                MsgClass::Heartbeat,
                MsgClass::Heartbeat,
                MsgClass::Heartbeat,
            ],
        );
        out(&s, 1);
        out(&s, 2);
        // Connection lost; after the reconnect rumqttc resends 1 and 2, then sends the third.
        out(&s, 1);
        out(&s, 2);
        out(&s, 3);
        assert_eq!(s.tracker().inflight.len(), 3);
        for p in [1, 2, 3] {
            ack(&s, p);
        }
        assert_eq!(s.counters.snapshot(1, 1.0).heartbeats_acked, 3);
        assert_eq!(s.tracker().outstanding(), 0);
    }

    #[test]
    fn qos0_counts_when_written_and_collisions_resolve() {
        let s = shared();
        let bad = MsgClass::Bad(crate::BadClass::Oversized);
        queue(&s, &[MsgClass::Heartbeat, bad, MsgClass::Presence]);
        out(&s, 0); // QoS 0 heartbeat
        out(&s, 7); // QoS 1 bad message
        on_event(Event::Outgoing(Outgoing::AwaitAck(7)), &s); // presence parked on pkid 7
        assert_eq!(s.tracker().outstanding(), 2);
        ack(&s, 7); // acks the bad message; rumqttc then writes the parked one
        out(&s, 7);
        ack(&s, 7);
        // QoS 2 ends with PUBCOMP.
        queue(&s, &[MsgClass::Heartbeat]);
        out(&s, 8);
        on_event(Event::Incoming(Packet::PubComp(PubComp { pkid: 8 })), &s);
        let r = s.counters.snapshot(1, 1.0);
        assert_eq!(r.heartbeats_acked, 2);
        assert_eq!(r.bad_acked["oversized"], 1);
        assert_eq!(r.presence_acked, 1);
        assert_eq!(s.tracker().outstanding(), 0);
    }

    #[test]
    fn broker_urls() {
        assert_eq!(
            BrokerAddr::parse("mqtt://127.0.0.1:1883").unwrap(),
            BrokerAddr {
                host: "127.0.0.1".into(),
                port: 1883,
                credentials: None
            }
        );
        let b = BrokerAddr::parse("tcp://u:p@broker.local").unwrap();
        assert_eq!((b.host.as_str(), b.port), ("broker.local", 1883));
        assert_eq!(b.credentials, Some(("u".into(), "p".into())));
        assert_eq!(BrokerAddr::parse("mqtt://[::1]:1884").unwrap().host, "::1");
        assert!(matches!(
            BrokerAddr::parse("mqtts://x:8883"),
            Err(SimError::Unsupported(_))
        ));
        assert!(BrokerAddr::parse("http://x").is_err());
        assert!(BrokerAddr::parse("127.0.0.1:1883").is_err());
    }
}
