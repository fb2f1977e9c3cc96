//! SOS presses and their latency: publish → the stand-in gateway receives the SMS.
//!
//! Every SOS comes from its own device, bound to its own elder whose grid worker has a phone
//! no one else has, so the SMS that arrives for that phone belongs to that SOS and to nothing
//! else. One device per SOS also keeps the measurement honest: an SOS on an alert that is
//! still open is counted as a repeat and notifies no one, so reusing a device would measure
//! nothing.
//!
//! SOS presses go out on a connection of their own, as a real bracelet's would, so they do
//! not queue behind the bench's own heartbeat backlog; what they do share with the load is
//! everything on the service's side, from the broker on.

use bytes::Bytes;
use rumqttc::QoS;
use serde::Serialize;
use silverguard_proto::v1::{location::Source, Event, EventKind, Location};
use silverguard_proto::Message;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::conn::{Conn, ConnCounters, ConnSettings};
use super::gateway::SmsGateway;
use super::stats::LatencySummary;
use super::BenchError;
use crate::physiology::Elder;
use crate::{now_unix_ms, topics, BrokerAddr};

/// Mosquitto's `$SYS` topics the bench reads.
const SYS_TOPICS: [&str; 4] = [
    "$SYS/broker/version",
    "$SYS/broker/store/messages/count",
    "$SYS/broker/clients/total",
    "$SYS/broker/clients/connected",
];

/// The broker's own account of itself when the bench starts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BrokerState {
    pub version: Option<String>,
    /// Messages the broker holds (retained, and queued for sessions). With persistence on,
    /// Mosquitto writes all of them to disk at every `autosave_interval` and serves no one
    /// meanwhile: a large number here means stalls in every latency the bench measures.
    pub stored_messages: Option<u64>,
    /// Persistent sessions whose client is not connected (their queues grow).
    pub disconnected_clients: Option<u64>,
}

/// Above this many stored messages at start the report warns that the broker is carrying
/// someone's queue (measured: ~1 s stalls every 10 s with 700k-1M queued).
pub const STORED_MESSAGES_WARNING: u64 = 10_000;

/// Longest wait for a fresh `$SYS` count: Mosquitto's default `sys_interval` and a margin.
const SYS_REFRESH: Duration = Duration::from_secs(12);

/// One SOS device and the phone its SMS goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SosTarget {
    pub device_id: String,
    pub phone: String,
    /// Index of the device, for its elder's home location.
    pub index: u64,
}

/// One SOS that was published.
#[derive(Debug, Clone)]
pub struct Shot {
    pub target: SosTarget,
    /// Just before the publish call.
    pub published: Instant,
    /// The same instant on the wall clock, Unix ms (to compare with database timestamps).
    pub published_unix_ms: f64,
}

/// What became of one SOS.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub device_id: String,
    pub published_unix_ms: f64,
    /// Publish → SMS arrival, ms; `None` when no SMS came within the timeout.
    pub latency_ms: Option<f64>,
}

/// Latency of one phase's SOS presses.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SosSummary {
    /// SOS published.
    pub published: usize,
    /// SOS whose SMS arrived within the timeout.
    pub delivered: usize,
    /// SOS with no SMS within the timeout (must be 0).
    pub lost: usize,
    /// Of the delivered ones.
    pub latency: LatencySummary,
}

impl SosSummary {
    pub fn of(outcomes: &[Outcome]) -> SosSummary {
        let lat: Vec<f64> = outcomes.iter().filter_map(|o| o.latency_ms).collect();
        SosSummary {
            published: outcomes.len(),
            delivered: lat.len(),
            lost: outcomes.len() - lat.len(),
            latency: LatencySummary::of(&lat),
        }
    }
}

/// The SOS connection.
pub struct Injector {
    conn: Conn,
    pub counters: Arc<ConnCounters>,
    seed: u64,
    sys: mpsc::UnboundedReceiver<(String, Bytes)>,
}

impl Injector {
    pub async fn connect(
        broker: BrokerAddr,
        client_id: String,
        seed: u64,
    ) -> Result<Injector, BenchError> {
        let counters = Arc::new(ConnCounters::default());
        let (tx, rx) = mpsc::unbounded_channel();
        let conn = Conn::open(
            ConnSettings {
                broker,
                client_id,
                inflight: 100,
                channel: 64,
            },
            counters.clone(),
            Some(tx),
            Duration::from_secs(15),
        )
        .await?;
        // Mosquitto keeps its state in retained $SYS topics: the report names the broker and
        // says whether it was carrying other sessions' queues (see `BrokerState`).
        for topic in SYS_TOPICS {
            if let Err(e) = conn.client.try_subscribe(topic, QoS::AtMostOnce) {
                tracing::debug!(error = %e, topic, "could not ask for broker state");
            }
        }
        Ok(Injector {
            conn,
            counters,
            seed,
            sys: rx,
        })
    }

    /// What the broker says about itself in `$SYS` (waits at most `wait` for all of it;
    /// brokers without `$SYS` answer nothing).
    pub async fn broker_state(&mut self, wait: Duration) -> BrokerState {
        let deadline = Instant::now() + wait;
        let mut st = BrokerState::default();
        let (mut total, mut connected) = (None::<u64>, None::<u64>);
        while st.version.is_none()
            || st.stored_messages.is_none()
            || total.is_none()
            || connected.is_none()
        {
            let Ok(Some((topic, payload))) =
                tokio::time::timeout_at(deadline, self.sys.recv()).await
            else {
                break;
            };
            let text = String::from_utf8_lossy(&payload).trim().to_string();
            match topic.as_str() {
                "$SYS/broker/version" => st.version = Some(text),
                "$SYS/broker/store/messages/count" => st.stored_messages = text.parse().ok(),
                "$SYS/broker/clients/total" => total = text.parse().ok(),
                "$SYS/broker/clients/connected" => connected = text.parse().ok(),
                _ => {}
            }
        }
        // The retained count can be up to `sys_interval` (Mosquitto's default: 10 s) old: right
        // after the broker baseline it still shows that run's backlog, freed since. A high
        // count is only reported once the next refresh confirms it.
        let refresh_deadline = Instant::now() + SYS_REFRESH;
        while st
            .stored_messages
            .is_some_and(|n| n > STORED_MESSAGES_WARNING)
        {
            let Ok(Some((topic, payload))) =
                tokio::time::timeout_at(refresh_deadline, self.sys.recv()).await
            else {
                break;
            };
            if topic == "$SYS/broker/store/messages/count" {
                st.stored_messages = String::from_utf8_lossy(&payload).trim().parse().ok();
                break;
            }
        }
        // Mosquitto counts sessions without a connection as total - connected (its values
        // are refreshed every `sys_interval`, so this one's own connection may be missing).
        st.disconnected_clients = total.zip(connected).map(|(t, c)| t.saturating_sub(c));
        st
    }

    /// Presses SOS on one device.
    pub async fn fire(&self, target: &SosTarget) -> Shot {
        let home = Elder::generate(self.seed, target.index);
        let at = now_unix_ms();
        let event = Event {
            seq: 1,
            occurred_at_ms: at,
            kind: EventKind::Sos as i32,
            location: Some(Location {
                lat_e7: (home.home_lat * 1e7).round() as i32,
                lon_e7: (home.home_lon * 1e7).round() as i32,
                accuracy_m: 15,
                source: Source::Gps as i32,
            }),
            battery_pct: 76,
            device_id: target.device_id.clone(),
        };
        let payload = event.encode_to_vec();
        let topic = topics::event(&target.device_id);
        // The instants are taken just before the publish: the latency includes the bench's
        // client, the broker and the service, as a bracelet's press would.
        let published = Instant::now();
        let published_unix_ms = unix_ms_f64();
        self.conn.publish(&self.counters, topic, payload).await;
        Shot {
            target: target.clone(),
            published,
            published_unix_ms,
        }
    }

    /// Presses SOS on each target in turn, `rate` per second, until the targets run out or
    /// `stop` fires.
    pub async fn run(
        &self,
        targets: &[SosTarget],
        rate: f64,
        stop: &CancellationToken,
    ) -> Vec<Shot> {
        let period = Duration::from_secs_f64(1.0 / rate.max(0.001));
        let mut tick = tokio::time::interval(period);
        // A late tick is not made up with a burst: SOS presses are independent events.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shots = Vec::with_capacity(targets.len());
        for t in targets {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            shots.push(self.fire(t).await);
        }
        shots
    }

    pub async fn close(self) {
        self.conn.close().await;
    }
}

/// Wall-clock Unix milliseconds with sub-millisecond precision.
pub fn unix_ms_f64() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// Waits until every shot's SMS has arrived or its `timeout` has passed, then pairs them.
pub async fn collect(shots: &[Shot], gateway: &SmsGateway, timeout: Duration) -> Vec<Outcome> {
    loop {
        let now = Instant::now();
        let pending = shots.iter().any(|s| {
            gateway.first_arrival(&s.target.phone).is_none() && now < s.published + timeout
        });
        if !pending {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shots
        .iter()
        .map(|s| {
            let latency = gateway
                .first_arrival(&s.target.phone)
                .filter(|at| *at >= s.published)
                .map(|at| at - s.published)
                .filter(|d| *d <= timeout)
                .map(|d| d.as_secs_f64() * 1000.0);
            Outcome {
                device_id: s.target.device_id.clone(),
                published_unix_ms: s.published_unix_ms,
                latency_ms: latency,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_count_losses() {
        let o = |l: Option<f64>| Outcome {
            device_id: "d".into(),
            published_unix_ms: 0.0,
            latency_ms: l,
        };
        let s = SosSummary::of(&[o(Some(100.0)), o(None), o(Some(300.0))]);
        assert_eq!((s.published, s.delivered, s.lost), (3, 2, 1));
        assert_eq!(s.latency.max_ms, Some(300.0));
        assert_eq!(SosSummary::of(&[]).lost, 0);
    }
}
