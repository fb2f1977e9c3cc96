//! What the fleet published and what the broker acknowledged.
//!
//! Devices count into lock-free `Counters` shared by the whole fleet (1,000 devices
//! publishing at once must not contend on a lock); `Counters::snapshot` turns them into a
//! serialisable [`FleetReport`] for progress updates and for the final result.
//!
//! Good and bad messages are counted apart: `heartbeats_*` and `events_*` count only
//! messages the backend should store, so a test can compare them with database rows, while
//! every bad message is counted under its [`BadClass`] in `bad_*`.

use serde::{Deserialize, Serialize};
use silverguard_proto::v1::EventKind;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::malformed::BadClass;

/// Counts for one fleet run. All counts are messages.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FleetReport {
    /// Devices in the fleet.
    pub devices: usize,
    /// Good heartbeats handed to the MQTT client (each one exactly once, however often the
    /// client had to retransmit it).
    pub heartbeats_published: u64,
    /// Good heartbeats the broker acknowledged (PUBACK at QoS 1, PUBCOMP at QoS 2; at QoS 0,
    /// written to the socket).
    pub heartbeats_acked: u64,
    /// Events by kind name (`SOS`, `FALL`, `SOS_CANCEL`, `WORN_OFF`, ...).
    pub events_published: BTreeMap<String, u64>,
    /// Acknowledged events by kind name.
    pub events_acked: BTreeMap<String, u64>,
    /// Presence messages (`online` on each connect, `offline` before a clean disconnect).
    pub presence_published: u64,
    pub presence_acked: u64,
    /// Bad messages by class (`malformed_protobuf`, `oversized`, `out_of_range`,
    /// `device_id_mismatch`, `unknown_device`, `bad_topic`).
    pub bad_published: BTreeMap<String, u64>,
    pub bad_acked: BTreeMap<String, u64>,
    /// Messages still unacknowledged when the run ended (the shortfall; 0 on a clean run).
    pub unacked: u64,
    /// Messages given up after being retransmitted on too many connections (a broker that
    /// drops the connection on one message would otherwise loop forever).
    pub abandoned: u64,
    /// Connections re-established after an error (broker restart, network cut).
    pub reconnects: u64,
    /// Devices that went silent on purpose (`goes-silent`): each should make the broker
    /// publish its Last Will.
    pub silenced_devices: u64,
    /// Downlink commands (`sg/v1/dev/{id}/cmd`) the bracelets received.
    pub commands_received: u64,
    /// Wall-clock seconds from start to the report.
    pub elapsed_s: f64,
    /// Published messages of every class per second over `elapsed_s`.
    pub rate_per_s: f64,
}

impl FleetReport {
    /// Events of every kind published.
    pub fn events_published_total(&self) -> u64 {
        self.events_published.values().sum()
    }

    /// Events of every kind acknowledged.
    pub fn events_acked_total(&self) -> u64 {
        self.events_acked.values().sum()
    }

    /// Bad messages of every class published.
    pub fn bad_published_total(&self) -> u64 {
        self.bad_published.values().sum()
    }

    /// Bad messages of every class acknowledged.
    pub fn bad_acked_total(&self) -> u64 {
        self.bad_acked.values().sum()
    }

    /// Every message published: good, bad and presence.
    pub fn published_total(&self) -> u64 {
        self.heartbeats_published
            + self.events_published_total()
            + self.presence_published
            + self.bad_published_total()
    }

    /// Every message acknowledged.
    pub fn acked_total(&self) -> u64 {
        self.heartbeats_acked
            + self.events_acked_total()
            + self.presence_acked
            + self.bad_acked_total()
    }

    /// Events of one kind published (0 when none).
    pub fn events_of(&self, kind: EventKind) -> u64 {
        self.events_published
            .get(kind.as_str_name())
            .copied()
            .unwrap_or(0)
    }

    /// True when everything published was acknowledged.
    pub fn all_acked(&self) -> bool {
        self.unacked == 0 && self.abandoned == 0 && self.acked_total() == self.published_total()
    }
}

/// The class of a message, for counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MsgClass {
    Heartbeat,
    Event(EventKind),
    Presence,
    Bad(BadClass),
}

/// EventKind values are 0..=8 today; a slot per value, with room for kinds added later.
const EVENT_SLOTS: usize = 16;

#[derive(Default)]
struct Pair {
    published: AtomicU64,
    acked: AtomicU64,
}

/// Fleet-wide counters, shared by every device task.
#[derive(Default)]
pub(crate) struct Counters {
    heartbeats: Pair,
    presence: Pair,
    events: [Pair; EVENT_SLOTS],
    bad: [Pair; BadClass::ALL.len()],
    pub(crate) abandoned: AtomicU64,
    pub(crate) reconnects: AtomicU64,
    pub(crate) silenced: AtomicU64,
    pub(crate) commands: AtomicU64,
    pub(crate) unacked: AtomicU64,
}

impl Counters {
    fn pair(&self, class: MsgClass) -> &Pair {
        match class {
            MsgClass::Heartbeat => &self.heartbeats,
            MsgClass::Presence => &self.presence,
            MsgClass::Event(k) => &self.events[(k as usize).min(EVENT_SLOTS - 1)],
            MsgClass::Bad(b) => &self.bad[b.index()],
        }
    }

    pub(crate) fn published(&self, class: MsgClass) {
        self.pair(class).published.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn acked(&self, class: MsgClass) {
        self.pair(class).acked.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self, devices: usize, elapsed_s: f64) -> FleetReport {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut r = FleetReport {
            devices,
            heartbeats_published: load(&self.heartbeats.published),
            heartbeats_acked: load(&self.heartbeats.acked),
            presence_published: load(&self.presence.published),
            presence_acked: load(&self.presence.acked),
            unacked: load(&self.unacked),
            abandoned: load(&self.abandoned),
            reconnects: load(&self.reconnects),
            silenced_devices: load(&self.silenced),
            commands_received: load(&self.commands),
            elapsed_s,
            ..FleetReport::default()
        };
        for (i, pair) in self.events.iter().enumerate() {
            let name = i32::try_from(i)
                .ok()
                .and_then(|v| EventKind::try_from(v).ok())
                .map_or_else(|| format!("KIND_{i}"), |k| k.as_str_name().to_string());
            let (p, a) = (load(&pair.published), load(&pair.acked));
            if p > 0 || a > 0 {
                r.events_published.insert(name.clone(), p);
                r.events_acked.insert(name, a);
            }
        }
        for class in BadClass::ALL {
            let pair = &self.bad[class.index()];
            let (p, a) = (load(&pair.published), load(&pair.acked));
            if p > 0 || a > 0 {
                r.bad_published.insert(class.as_str().to_string(), p);
                r.bad_acked.insert(class.as_str().to_string(), a);
            }
        }
        r.rate_per_s = if elapsed_s > 0.0 {
            r.published_total() as f64 / elapsed_s
        } else {
            0.0
        };
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_good_and_bad_apart() {
        let c = Counters::default();
        c.published(MsgClass::Heartbeat);
        c.published(MsgClass::Heartbeat);
        c.acked(MsgClass::Heartbeat);
        c.published(MsgClass::Event(EventKind::Sos));
        c.acked(MsgClass::Event(EventKind::Sos));
        c.published(MsgClass::Event(EventKind::SosCancel));
        c.published(MsgClass::Bad(BadClass::OutOfRange));
        c.published(MsgClass::Presence);
        let r = c.snapshot(3, 2.0);
        assert_eq!(r.devices, 3);
        assert_eq!((r.heartbeats_published, r.heartbeats_acked), (2, 1));
        assert_eq!(r.events_published["SOS"], 1);
        assert_eq!(r.events_acked["SOS"], 1);
        assert_eq!(r.events_published["SOS_CANCEL"], 1);
        assert_eq!(r.events_acked["SOS_CANCEL"], 0);
        assert_eq!(r.events_of(EventKind::Fall), 0);
        assert_eq!(r.bad_published["out_of_range"], 1);
        assert_eq!(r.published_total(), 6);
        assert_eq!(r.acked_total(), 2);
        assert_eq!(r.rate_per_s, 3.0);
        assert!(!r.all_acked());

        let json = serde_json::to_string(&r).unwrap();
        let back: FleetReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
        // Old or partial reports still load.
        let partial: FleetReport = serde_json::from_str(r#"{"heartbeats_published":5}"#).unwrap();
        assert_eq!(partial.heartbeats_published, 5);
    }
}
