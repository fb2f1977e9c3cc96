//! Running a fleet: one task per bracelet, a shared set of counters, and a clean end.
//!
//! Each device task owns a [`Link`] (its MQTT connection) and a [`Body`] (its elder). It
//! waits for its first CONNACK, publishes `Presence{online:true}` (retained), then sends a
//! heartbeat every `interval`, starting at its own offset within the first interval so the
//! fleet's load is smooth rather than a burst per interval. Around each heartbeat its
//! [`Script`] adds events or bad messages. At the end (count reached or cancelled) it
//! publishes `Presence{online:false}`, waits until the broker acknowledged everything (at most
//! `ack_timeout`), and disconnects cleanly; a `goes-silent` device instead drops its socket so
//! the broker fires its Last Will.

use bytes::Bytes;
use rumqttc::QoS;
use silverguard_proto::v1::{Event, EventKind, Location, Presence};
use silverguard_proto::Message;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::link::{BrokerAddr, Link, LinkSettings, NotPublished, Notice};
use crate::malformed;
use crate::physiology::{mix_seed, Body};
use crate::report::{Counters, FleetReport, MsgClass};
use crate::scenario::{Action, Scenario, ScenarioMix, Script};
use crate::{now_unix_ms, topics, SimError};

/// Keep-alive of each bracelet connection. Silence is detected by the backend from missing
/// heartbeats; this only bounds how long a half-open TCP connection goes unnoticed.
const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// How often progress snapshots are sent.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// What a fleet run does.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// `mqtt://[user:pass@]host[:port]`; `mqtts://` is refused for now.
    pub mqtt_url: String,
    /// Number of bracelets.
    pub devices: usize,
    /// Device ids are `format!("{id_prefix}{i:06}")` for `i` in `0..devices`; they must match
    /// `[A-Za-z0-9_-]{1,64}`.
    pub id_prefix: String,
    /// Heartbeat interval of each device.
    pub interval: Duration,
    /// Heartbeats per device; `None` runs until cancelled.
    pub count: Option<u64>,
    /// Which scenario each device plays.
    pub scenarios: ScenarioMix,
    /// QoS of heartbeats, events and bad messages (0, 1 or 2). Presence is always QoS 1.
    pub qos: u8,
    /// Seed of everything random: elders, scenario assignment, noise.
    pub seed: u64,
    /// Skew of the bracelets' clocks in milliseconds (may be negative), added to
    /// `measured_at_ms`, `occurred_at_ms` and `at_ms`.
    pub clock_offset_ms: i64,
    /// At most this many devices in the CONNECT handshake at once.
    pub max_connect_concurrency: usize,
    /// How long to wait for outstanding acknowledgements after a device's last publish.
    pub ack_timeout: Duration,
    /// How long a device may take to connect the first time before the run fails.
    pub connect_timeout: Duration,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            mqtt_url: "mqtt://127.0.0.1:1883".into(),
            devices: 10,
            id_prefix: "sim-".into(),
            interval: Duration::from_secs(5),
            count: None,
            scenarios: ScenarioMix::default(),
            qos: 1,
            seed: 1,
            clock_offset_ms: 0,
            max_connect_concurrency: 64,
            ack_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(30),
        }
    }
}

impl FleetConfig {
    /// Checks everything that can be checked without a broker.
    pub fn validate(&self) -> Result<(), SimError> {
        BrokerAddr::parse(&self.mqtt_url)?;
        let bad = |s: String| Err(SimError::InvalidConfig(s));
        if self.interval.is_zero() {
            return bad("interval must be above zero".into());
        }
        if self.qos > 2 {
            return bad(format!("qos {} is not 0, 1 or 2", self.qos));
        }
        if self.max_connect_concurrency == 0 {
            return bad("max_connect_concurrency must be at least 1".into());
        }
        if self.devices > 0 {
            // The longest id is the last one; if it is valid, all are.
            let last = device_id(&self.id_prefix, self.devices - 1);
            if !topics::is_valid_device_id(&last) {
                return bad(format!(
                    "device id {last:?} (prefix {:?}) does not match [A-Za-z0-9_-]{{1,64}}",
                    self.id_prefix
                ));
            }
        }
        Ok(())
    }

    fn qos(&self) -> QoS {
        match self.qos {
            0 => QoS::AtMostOnce,
            2 => QoS::ExactlyOnce,
            _ => QoS::AtLeastOnce,
        }
    }
}

fn device_id(prefix: &str, i: usize) -> String {
    format!("{prefix}{i:06}")
}

/// The device ids of a fleet, in device order.
pub fn device_ids(cfg: &FleetConfig) -> Vec<String> {
    (0..cfg.devices)
        .map(|i| device_id(&cfg.id_prefix, i))
        .collect()
}

/// Each device id with the scenario it plays, in device order; the same for the same config.
pub fn device_plan(cfg: &FleetConfig) -> Vec<(String, Scenario)> {
    device_ids(cfg)
        .into_iter()
        .zip(cfg.scenarios.assign(cfg.devices, cfg.seed))
        .collect()
}

/// Runs the fleet until every device sent `count` heartbeats (and its scripted events) or
/// `cancel` fires, then waits for outstanding acknowledgements and disconnects.
///
/// Returns only after each device either saw all its QoS 1/2 messages acknowledged or waited
/// `ack_timeout` after its last publish (the shortfall is [`FleetReport::unacked`]). When
/// `progress` is given, a fresh snapshot is sent every 250 ms and the final report last.
///
/// Fails with [`SimError::Connect`] when a device cannot make its first connection within
/// `connect_timeout`; the other devices are then stopped.
pub async fn run_fleet(
    cfg: FleetConfig,
    cancel: CancellationToken,
    progress: Option<watch::Sender<FleetReport>>,
) -> Result<FleetReport, SimError> {
    cfg.validate()?;
    let broker = BrokerAddr::parse(&cfg.mqtt_url)?;
    let started = std::time::Instant::now();
    let plan = device_plan(&cfg);
    let ids: Vec<String> = plan.iter().map(|(id, _)| id.clone()).collect();
    let counters = Arc::new(Counters::default());
    // Bounds concurrent CONNECT handshakes fleet-wide (initial and reconnects alike), so a
    // broker restart does not meet 1,000 simultaneous reconnects.
    let gate = Arc::new(Semaphore::new(cfg.max_connect_concurrency));
    // Stops the whole fleet when one device cannot connect, without cancelling the caller.
    let stop = cancel.child_token();
    let cfg = Arc::new(cfg);
    let t0 = Instant::now();
    // Spreads first heartbeats over one interval: a low-discrepancy sequence, so any
    // prefix of the fleet is spread evenly too, rotated by the seed.
    let rotation = (mix_seed(cfg.seed, 0, 4) >> 11) as f64 / (1u64 << 53) as f64;

    let mut tasks = JoinSet::new();
    for (i, (id, scenario)) in plan.into_iter().enumerate() {
        let other_id = if ids.len() > 1 {
            ids[(i + 1) % ids.len()].clone()
        } else {
            format!("{id}-other")
        };
        let phase = (i as f64 * 0.618_033_988_749_895 + rotation).fract();
        let dev = Device {
            index: i as u64,
            id,
            other_id,
            scenario,
            first_heartbeat: t0 + cfg.interval.mul_f64(phase),
            cfg: cfg.clone(),
            broker: broker.clone(),
            counters: counters.clone(),
            gate: gate.clone(),
            cancel: stop.clone(),
        };
        tasks.spawn(dev.run());
    }

    let snapshot =
        |counters: &Counters| counters.snapshot(cfg.devices, started.elapsed().as_secs_f64());
    let mut ticker = tokio::time::interval(PROGRESS_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failure: Option<SimError> = None;
    loop {
        tokio::select! {
            joined = tasks.join_next() => match joined {
                None => break,
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(e))) => {
                    // Returned to the caller below; logged only for the record.
                    tracing::debug!(error = %e, "device failed; stopping the fleet");
                    stop.cancel();
                    failure.get_or_insert(e);
                }
                Some(Err(e)) => {
                    // A panicking device is a simulator bug; the rest of the fleet carries on
                    // and the report shows the gap.
                    tracing::error!(error = %e, "device task ended abnormally");
                }
            },
            _ = ticker.tick(), if progress.is_some() => {
                if let Some(tx) = &progress {
                    tx.send_replace(snapshot(&counters));
                }
            }
        }
    }

    let report = snapshot(&counters);
    if let Some(tx) = &progress {
        tx.send_replace(report.clone());
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(report),
    }
}

/// One simulated bracelet.
struct Device {
    index: u64,
    id: String,
    /// Another fleet member, named by `device_id_mismatch` messages.
    other_id: String,
    scenario: Scenario,
    first_heartbeat: Instant,
    cfg: Arc<FleetConfig>,
    broker: BrokerAddr,
    counters: Arc<Counters>,
    gate: Arc<Semaphore>,
    cancel: CancellationToken,
}

/// Why a device stopped mid-step.
enum Halt {
    /// Told to stop while waiting to hand a message over.
    Cancelled,
    Failed(SimError),
}

impl From<SimError> for Halt {
    fn from(e: SimError) -> Self {
        Halt::Failed(e)
    }
}

/// How a device's main loop ended.
enum Ending {
    /// Count reached or cancelled: say goodbye and disconnect.
    Clean,
    /// `goes-silent`: drop the connection so the Last Will fires.
    Silent,
}

/// Per-device mutable state of the main loop.
struct Run {
    link: Link,
    body: Body,
    script: Script,
    hb_seq: u64,
    evt_seq: u64,
    bad_sent: u64,
    worn: Option<bool>,
    last_location: Option<Location>,
    last_battery: u32,
    /// Events due later (FALL's SOS_CANCEL), in due order.
    timed: VecDeque<(Instant, EventKind)>,
}

impl Device {
    fn device_ms(&self) -> i64 {
        now_unix_ms().saturating_add(self.cfg.clock_offset_ms)
    }

    async fn run(self) -> Result<(), SimError> {
        let settings = LinkSettings {
            broker: self.broker.clone(),
            client_id: topics::client_id(&self.id),
            persistent: true,
            will_topic: Some(topics::state(&self.id)),
            clock_offset_ms: self.cfg.clock_offset_ms,
            keep_alive: KEEP_ALIVE,
            connect_timeout: self.cfg.connect_timeout,
        };
        let mut link = Link::start(settings, self.counters.clone(), self.gate.clone());

        // First connection.
        let first = tokio::select! {
            _ = self.cancel.cancelled() => return Ok(()),
            n = link.next_notice() => n,
        };
        match first {
            Some(Notice::Connected {
                session_present, ..
            }) => match self.on_connected(&link, session_present).await {
                // Cancelled: the main loop sees it first and ends cleanly.
                Ok(()) | Err(Halt::Cancelled) => {}
                Err(Halt::Failed(e)) => return Err(e),
            },
            Some(Notice::GaveUp { reason }) => {
                return Err(SimError::Connect {
                    device_id: self.id.clone(),
                    timeout: self.cfg.connect_timeout,
                    reason,
                })
            }
            None => return Err(SimError::LinkClosed(self.id.clone())),
        }

        let mut body = Body::new(self.cfg.seed, self.index);
        let script = Script::new(self.scenario, self.cfg.count);
        script.prepare(&mut body);
        let mut run = Run {
            link,
            body,
            script,
            hb_seq: 0,
            evt_seq: 0,
            bad_sent: 0,
            worn: None,
            last_location: None,
            last_battery: 0,
            timed: VecDeque::new(),
        };

        let ending = match self.main_loop(&mut run).await {
            Ok(ending) => ending,
            Err(Halt::Cancelled) => Ending::Clean,
            Err(Halt::Failed(e)) => return Err(e),
        };

        match ending {
            Ending::Clean => {
                let payload = Presence {
                    online: false,
                    at_ms: self.device_ms(),
                }
                .encode_to_vec();
                let bye = run
                    .link
                    .publish(
                        MsgClass::Presence,
                        &topics::state(&self.id),
                        QoS::AtLeastOnce,
                        true,
                        payload.into(),
                        // Already cancelled on Ctrl-C: then it goes out only if there is
                        // room at once, rather than waiting on a broker that is gone.
                        Some(&self.cancel),
                    )
                    .await;
                if bye.is_err() {
                    tracing::debug!(device = %self.id, "no goodbye: link closed or full");
                }
                self.settle(&run.link).await;
                run.link.disconnect().await;
            }
            Ending::Silent => {
                // Everything sent so far must reach the backend (the test compares rows);
                // only then does the bracelet die.
                self.settle(&run.link).await;
                self.counters
                    .silenced
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                run.link.kill();
            }
        }
        Ok(())
    }

    /// Waits for outstanding acknowledgements and records the shortfall.
    async fn settle(&self, link: &Link) {
        let left = link.wait_acked(Instant::now() + self.cfg.ack_timeout).await;
        if left > 0 {
            tracing::warn!(device = %self.id, unacked = left, "messages not acknowledged in time");
            self.counters
                .unacked
                .fetch_add(left as u64, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// On every CONNACK: announce presence, and subscribe to commands if the broker does not
    /// remember the subscription.
    async fn on_connected(&self, link: &Link, session_present: bool) -> Result<(), Halt> {
        if !session_present {
            link.subscribe(&topics::command(&self.id));
        }
        let payload = Presence {
            online: true,
            at_ms: self.device_ms(),
        }
        .encode_to_vec();
        link.publish(
            MsgClass::Presence,
            &topics::state(&self.id),
            QoS::AtLeastOnce,
            true,
            payload.into(),
            Some(&self.cancel),
        )
        .await
        .map_err(|e| self.halt(e))
    }

    fn halt(&self, e: NotPublished) -> Halt {
        match e {
            NotPublished::Cancelled => Halt::Cancelled,
            NotPublished::Closed => Halt::Failed(SimError::LinkClosed(self.id.clone())),
        }
    }

    async fn main_loop(&self, run: &mut Run) -> Result<Ending, Halt> {
        let interval = self.cfg.interval;
        let mut next_hb = self.first_heartbeat.max(Instant::now());
        loop {
            let more_heartbeats = self.cfg.count.is_none_or(|c| run.hb_seq < c);
            if !more_heartbeats && run.timed.is_empty() {
                return Ok(Ending::Clean);
            }
            let next_timed = run.timed.front().map(|(at, _)| *at);
            tokio::select! {
                // Cancellation first: Ctrl-C stops publishing at once.
                biased;
                _ = self.cancel.cancelled() => return Ok(Ending::Clean),
                notice = run.link.next_notice() => match notice {
                    Some(Notice::Connected { session_present, reconnect }) => {
                        if reconnect {
                            tracing::debug!(device = %self.id, session_present, "reconnected");
                        }
                        self.on_connected(&run.link, session_present).await?;
                    }
                    Some(Notice::GaveUp { .. }) | None => {
                        return Err(SimError::LinkClosed(self.id.clone()).into());
                    }
                },
                _ = tokio::time::sleep_until(next_timed.unwrap_or(next_hb)), if next_timed.is_some() => {
                    if let Some((_, kind)) = run.timed.pop_front() {
                        self.publish_event(run, kind).await?;
                    }
                }
                _ = tokio::time::sleep_until(next_hb), if more_heartbeats => {
                    if self.heartbeat(run).await? {
                        return Ok(Ending::Silent);
                    }
                    // Fixed rate; after a stall (channel full during an outage) resume at
                    // once but do not burst to catch up.
                    next_hb += interval;
                    let now = Instant::now();
                    if next_hb < now {
                        next_hb = now;
                    }
                }
            }
        }
    }

    /// Publishes one heartbeat and what the script adds to it. Returns true when the device
    /// should now go silent.
    async fn heartbeat(&self, run: &mut Run) -> Result<bool, Halt> {
        run.hb_seq += 1;
        let seq = run.hb_seq;
        let at = self.device_ms();
        let mut v = run.body.sample(at);
        run.script.shape(seq, &mut run.body, &mut v);
        run.last_location = Some(v.location);
        run.last_battery = v.battery_pct;

        // A wear change is an event of its own, sent before the heartbeat that shows it.
        if let Some(prev) = run.worn {
            if prev != v.worn {
                let kind = if v.worn {
                    EventKind::WornOn
                } else {
                    EventKind::WornOff
                };
                self.publish_event(run, kind).await?;
            }
        }
        run.worn = Some(v.worn);

        let hb = v.to_heartbeat(&self.id, seq, at);
        self.send(
            run,
            MsgClass::Heartbeat,
            &topics::heartbeat(&self.id),
            hb.encode_to_vec(),
        )
        .await?;

        for action in run.script.after_heartbeat(seq, v.battery_pct) {
            match action {
                Action::Event(kind) => self.publish_event(run, kind).await?,
                Action::EventAfter(kind, delay) => {
                    let due = Instant::now() + delay;
                    let pos = run.timed.partition_point(|(at, _)| *at <= due);
                    run.timed.insert(pos, (due, kind));
                }
                Action::Bad(class) => {
                    let bad = malformed::build(
                        class,
                        &self.id,
                        &self.other_id,
                        &hb,
                        run.bad_sent,
                        run.body.rng(),
                    );
                    run.bad_sent += 1;
                    self.send(run, MsgClass::Bad(class), &bad.topic, bad.payload)
                        .await?;
                }
                Action::GoSilent => return Ok(true),
            }
        }
        Ok(false)
    }

    async fn publish_event(&self, run: &mut Run, kind: EventKind) -> Result<(), Halt> {
        run.evt_seq += 1;
        let event = Event {
            seq: run.evt_seq,
            occurred_at_ms: self.device_ms(),
            kind: kind as i32,
            location: run.last_location,
            battery_pct: run.last_battery,
            device_id: self.id.clone(),
        };
        tracing::debug!(device = %self.id, kind = kind.as_str_name(), "event");
        self.send(
            run,
            MsgClass::Event(kind),
            &topics::event(&self.id),
            event.encode_to_vec(),
        )
        .await
    }

    async fn send(
        &self,
        run: &Run,
        class: MsgClass,
        topic: &str,
        payload: Vec<u8>,
    ) -> Result<(), Halt> {
        run.link
            .publish(
                class,
                topic,
                self.cfg.qos(),
                false,
                Bytes::from(payload),
                Some(&self.cancel),
            )
            .await
            .map_err(|e| self.halt(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_deterministic_and_valid() {
        let cfg = FleetConfig {
            devices: 3,
            id_prefix: "hz-".into(),
            ..FleetConfig::default()
        };
        assert_eq!(device_ids(&cfg), ["hz-000000", "hz-000001", "hz-000002"]);
        assert_eq!(device_ids(&cfg), device_ids(&cfg));
        let big = FleetConfig {
            devices: 1_000_001,
            id_prefix: String::new(),
            ..FleetConfig::default()
        };
        let ids = device_ids(&big);
        assert_eq!(ids[999_999], "999999");
        assert_eq!(ids[1_000_000], "1000000");
        assert!(ids
            .iter()
            .take(100)
            .all(|id| topics::is_valid_device_id(id)));
        assert!(big.validate().is_ok());
    }

    #[test]
    fn plan_is_deterministic() {
        let cfg = FleetConfig {
            devices: 50,
            scenarios: "normal=90,sos=5,fall=5".parse().unwrap(),
            seed: 77,
            ..FleetConfig::default()
        };
        let a = device_plan(&cfg);
        assert_eq!(a, device_plan(&cfg));
        assert_eq!(a.iter().filter(|(_, s)| *s == Scenario::Sos).count(), 3);
        assert_eq!(a[0].0, "sim-000000");
    }

    #[test]
    fn validation() {
        let ok = FleetConfig::default();
        assert!(ok.validate().is_ok());
        let cases = [
            FleetConfig {
                id_prefix: "bad/".into(),
                ..FleetConfig::default()
            },
            FleetConfig {
                id_prefix: "x".repeat(59),
                ..FleetConfig::default()
            },
            FleetConfig {
                interval: Duration::ZERO,
                ..FleetConfig::default()
            },
            FleetConfig {
                qos: 3,
                ..FleetConfig::default()
            },
            FleetConfig {
                max_connect_concurrency: 0,
                ..FleetConfig::default()
            },
            FleetConfig {
                mqtt_url: "mqtts://127.0.0.1:8883".into(),
                ..FleetConfig::default()
            },
        ];
        for c in cases {
            assert!(c.validate().is_err(), "{c:?}");
        }
        // 58 + 6 digits = 64 characters: still valid.
        let edge = FleetConfig {
            id_prefix: "x".repeat(58),
            ..FleetConfig::default()
        };
        assert!(edge.validate().is_ok());
    }

    /// End to end against a real broker: every scenario once, delivery checked by a
    /// subscriber. Run with `cargo test -p firmware-sim -- --ignored`
    /// (`BRACELET_SIM_TEST_MQTT_URL`, default `mqtt://127.0.0.1:1883`).
    // The default current-thread runtime of `#[tokio::test]`, which callers most likely use.
    #[tokio::test]
    #[ignore = "needs an MQTT broker (BRACELET_SIM_TEST_MQTT_URL, default mqtt://127.0.0.1:1883)"]
    async fn every_scenario_against_a_real_broker() {
        use rumqttc::{AsyncClient, Event, MqttOptions, Packet};
        use silverguard_proto::v1::Heartbeat;
        use std::sync::Mutex;

        let url = std::env::var("BRACELET_SIM_TEST_MQTT_URL")
            .unwrap_or_else(|_| "mqtt://127.0.0.1:1883".into());
        let broker = BrokerAddr::parse(&url).unwrap();
        let prefix = format!("t{:08x}-", rand::random::<u32>());
        let cfg = FleetConfig {
            mqtt_url: url,
            devices: Scenario::ALL.len(),
            id_prefix: prefix.clone(),
            interval: Duration::from_millis(100),
            count: Some(6),
            scenarios: ScenarioMix::PerDevice(Scenario::ALL.to_vec()),
            ..FleetConfig::default()
        };
        let plan = device_plan(&cfg);

        // A subscriber that keeps every message under this run's prefix.
        type Seen = Vec<(String, Vec<u8>)>;
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let mut opts = MqttOptions::new(format!("{prefix}checker"), broker.host, broker.port);
        opts.set_max_packet_size(256 * 1024, 256 * 1024);
        let (sub, mut el) = AsyncClient::new(opts, 10);
        sub.subscribe("sg/v1/dev/#", QoS::AtLeastOnce)
            .await
            .unwrap();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let sink = seen.clone();
        let want = format!("sg/v1/dev/{prefix}");
        let poller = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            while let Ok(ev) = el.poll().await {
                match ev {
                    Event::Incoming(Packet::SubAck(_)) => {
                        if let Some(tx) = ready.take() {
                            let _ = tx.send(());
                        }
                    }
                    Event::Incoming(Packet::Publish(p)) if p.topic.starts_with(&want) => {
                        sink.lock().unwrap().push((p.topic, p.payload.to_vec()));
                    }
                    _ => {}
                }
            }
        });
        ready_rx.await.unwrap();

        let report = run_fleet(cfg, CancellationToken::new(), None)
            .await
            .unwrap();
        assert!(report.all_acked(), "{report:#?}");
        // 11 devices send 6 heartbeats; goes-silent stops after 3.
        assert_eq!(report.heartbeats_published, 11 * 6 + 3);
        assert_eq!(report.events_of(EventKind::Sos), 1);
        assert_eq!(report.events_of(EventKind::Fall), 2);
        assert_eq!(report.events_of(EventKind::SosCancel), 1);
        assert_eq!(report.events_of(EventKind::LowBattery), 1);
        assert_eq!(report.events_of(EventKind::ServiceCall), 1);
        for class in crate::BadClass::ALL {
            assert_eq!(report.bad_published[class.as_str()], 1, "{class}");
        }
        assert_eq!(report.silenced_devices, 1);

        // Give the broker a moment to forward the last messages and the Last Will.
        tokio::time::sleep(Duration::from_millis(500)).await;
        poller.abort();
        let seen = seen.lock().unwrap().clone();
        let ids: Vec<&str> = plan.iter().map(|(id, _)| id.as_str()).collect();
        // What the backend would store: a decodable, small, in-range Heartbeat on the hb
        // topic of a fleet device that names that device.
        let good_heartbeats = seen
            .iter()
            .filter(|(topic, payload)| {
                let id = topic.split('/').nth(3).unwrap_or_default();
                topic.ends_with("/hb")
                    && ids.contains(&id)
                    && payload.len() <= 4096
                    && Heartbeat::decode(payload.as_slice()).is_ok_and(|h| {
                        h.device_id == id && h.heart_rate_bpm <= 250 && h.spo2_pct <= 100
                    })
            })
            .count() as u64;
        assert_eq!(good_heartbeats, report.heartbeats_published);

        let (silent, _) = plan
            .iter()
            .find(|(_, s)| *s == Scenario::GoesSilent)
            .unwrap();
        let last_state = seen
            .iter()
            .rev()
            .find(|(t, _)| *t == topics::state(silent))
            .map(|(_, p)| Presence::decode(p.as_slice()).unwrap())
            .unwrap();
        assert!(!last_state.online, "the Last Will did not fire");
    }
}
