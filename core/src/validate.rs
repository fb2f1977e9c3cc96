//! The edge: MQTT topic + protobuf payload in, validated domain types out.
//!
//! prost types never leave this module. Everything a device can get wrong becomes a
//! [`Rejected`] with a reason from a small fixed set (a metrics label) and a human detail.
//! This is pure code with no IO, so it is unit-, property- and fuzz-testable.

use chrono::{DateTime, TimeDelta, Utc};
use silverguard_proto::v1 as pb;
use silverguard_proto::Message;

use crate::is_valid_device_id;

/// Why a message was not used. The string forms are metrics labels and `ingest_rejects.reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    BadTopic,
    Oversized,
    MalformedProtobuf,
    UnknownDevice,
    DeviceIdMismatch,
    OutOfRange,
    UnknownEventKind,
    /// Valid on the wire but refused by the database (a data error no retry can fix).
    Unstorable,
}

impl RejectReason {
    pub const ALL: [RejectReason; 8] = [
        RejectReason::BadTopic,
        RejectReason::Oversized,
        RejectReason::MalformedProtobuf,
        RejectReason::UnknownDevice,
        RejectReason::DeviceIdMismatch,
        RejectReason::OutOfRange,
        RejectReason::UnknownEventKind,
        RejectReason::Unstorable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::BadTopic => "bad_topic",
            RejectReason::Oversized => "oversized",
            RejectReason::MalformedProtobuf => "malformed_protobuf",
            RejectReason::UnknownDevice => "unknown_device",
            RejectReason::DeviceIdMismatch => "device_id_mismatch",
            RejectReason::OutOfRange => "out_of_range",
            RejectReason::UnknownEventKind => "unknown_event_kind",
            RejectReason::Unstorable => "unstorable",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub reason: RejectReason,
    pub detail: String,
    /// The device id from the topic, when the topic had a well-formed one.
    pub device_id: Option<String>,
}

/// The kind of message a topic carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Heartbeat,
    Event,
    State,
    /// Our own downlink topic; seen because the subscription is broad. Not for ingest.
    Command,
}

/// Parses `sg/v1/dev/{device_id}/{hb|evt|state|cmd}`.
pub fn parse_topic(topic: &str) -> Result<(&str, Channel), Rejected> {
    let bad = |detail: String, device_id: Option<String>| Rejected {
        reason: RejectReason::BadTopic,
        detail,
        device_id,
    };
    let mut parts = topic.split('/');
    let (Some("sg"), Some("v1"), Some("dev"), Some(id), Some(leaf), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(bad(
            format!("topic {topic:?} is outside sg/v1/dev/{{device_id}}/{{hb|evt|state}}"),
            None,
        ));
    };
    if !is_valid_device_id(id) {
        return Err(bad(format!("device id {id:?} in topic is not valid"), None));
    }
    let channel = match leaf {
        "hb" => Channel::Heartbeat,
        "evt" => Channel::Event,
        "state" => Channel::State,
        "cmd" => Channel::Command,
        other => {
            return Err(bad(
                format!("unknown message type {other:?} in topic"),
                Some(id.to_string()),
            ))
        }
    };
    Ok((id, channel))
}

/// Limits the validation applies; built from `IngestSettings`.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_payload_bytes: usize,
    pub max_clock_ahead: TimeDelta,
    pub max_clock_behind: TimeDelta,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload_bytes: 4096,
            max_clock_ahead: TimeDelta::minutes(5),
            max_clock_behind: TimeDelta::days(7),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub lat_e7: i32,
    pub lon_e7: i32,
    pub accuracy_m: i32,
    /// 0 unspecified, 1 GPS, 2 WIFI, 3 CELL (the protobuf numbering).
    pub source: i16,
}

impl Location {
    /// The four nullable columns a location is stored in.
    pub fn columns(l: Option<Location>) -> (Option<i32>, Option<i32>, Option<i32>, Option<i16>) {
        match l {
            Some(l) => (
                Some(l.lat_e7),
                Some(l.lon_e7),
                Some(l.accuracy_m),
                Some(l.source),
            ),
            None => (None, None, None, None),
        }
    }
}

/// One validated heartbeat row.
#[derive(Debug, Clone, PartialEq)]
pub struct Heartbeat {
    pub device_id: String,
    pub seq: i64,
    /// The measurement time, or `received_at` when the device clock was off.
    pub ts: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    pub heart_rate_bpm: Option<i16>,
    pub spo2_pct: Option<i16>,
    pub systolic_mmhg: Option<i16>,
    pub diastolic_mmhg: Option<i16>,
    pub skin_temp_dc: Option<i16>,
    pub steps_today: Option<i32>,
    pub battery_pct: Option<i16>,
    pub worn: bool,
    pub location: Option<Location>,
    pub clock_skewed: bool,
    /// The device's claim, kept only when it was not believed.
    pub device_ts: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    Sos,
    Fall,
    SosCancel,
    WornOff,
    WornOn,
    LowBattery,
    PowerOff,
    ServiceCall,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Sos => "sos",
            EventKind::Fall => "fall",
            EventKind::SosCancel => "sos_cancel",
            EventKind::WornOff => "worn_off",
            EventKind::WornOn => "worn_on",
            EventKind::LowBattery => "low_battery",
            EventKind::PowerOff => "power_off",
            EventKind::ServiceCall => "service_call",
        }
    }

    /// SOS and fall are emergencies: they take the event lane's front seat.
    pub fn is_emergency(self) -> bool {
        matches!(self, EventKind::Sos | EventKind::Fall)
    }
}

impl TryFrom<i32> for EventKind {
    type Error = i32;
    fn try_from(v: i32) -> Result<Self, i32> {
        Ok(match pb::EventKind::try_from(v).map_err(|_| v)? {
            pb::EventKind::Sos => EventKind::Sos,
            pb::EventKind::Fall => EventKind::Fall,
            pb::EventKind::SosCancel => EventKind::SosCancel,
            pb::EventKind::WornOff => EventKind::WornOff,
            pb::EventKind::WornOn => EventKind::WornOn,
            pb::EventKind::LowBattery => EventKind::LowBattery,
            pb::EventKind::PowerOff => EventKind::PowerOff,
            pb::EventKind::ServiceCall => EventKind::ServiceCall,
            pb::EventKind::Unspecified => return Err(v),
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeviceEvent {
    pub device_id: String,
    pub seq: i64,
    pub kind: EventKind,
    pub occurred_at: DateTime<Utc>,
    pub device_ts: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    pub clock_skewed: bool,
    /// Out-of-range extras on an event are dropped (set to None), never a reason to lose
    /// an SOS.
    pub battery_pct: Option<i16>,
    pub location: Option<Location>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Presence {
    pub device_id: String,
    pub online: bool,
    pub at: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    Heartbeat(Heartbeat),
    Event(DeviceEvent),
    Presence(Presence),
    /// A message on our own downlink topic: nothing to store.
    Downlink,
}

impl Decoded {
    pub fn device_id(&self) -> Option<&str> {
        match self {
            Decoded::Heartbeat(h) => Some(&h.device_id),
            Decoded::Event(e) => Some(&e.device_id),
            Decoded::Presence(p) => Some(&p.device_id),
            Decoded::Downlink => None,
        }
    }
}

/// Decodes and validates one message. Device existence is checked by the caller (it needs
/// the registry); everything else is decided here.
pub fn decode(
    topic: &str,
    payload: &[u8],
    received_at: DateTime<Utc>,
    limits: &Limits,
) -> Result<Decoded, Rejected> {
    let (device_id, channel) = parse_topic(topic)?;
    let reject = |reason, detail: String| Rejected {
        reason,
        detail,
        device_id: Some(device_id.to_string()),
    };
    if channel == Channel::Command {
        return Ok(Decoded::Downlink);
    }
    if payload.is_empty() {
        if channel == Channel::State {
            // An empty retained message is how MQTT clears a retained state: nothing to store.
            return Ok(Decoded::Downlink);
        }
        return Err(reject(
            RejectReason::MalformedProtobuf,
            "empty payload".into(),
        ));
    }
    if payload.len() > limits.max_payload_bytes {
        return Err(reject(
            RejectReason::Oversized,
            format!(
                "payload of {} bytes exceeds the limit of {}",
                payload.len(),
                limits.max_payload_bytes
            ),
        ));
    }
    let malformed =
        |e: silverguard_proto::DecodeError| reject(RejectReason::MalformedProtobuf, e.to_string());
    match channel {
        Channel::Heartbeat => {
            let m = pb::Heartbeat::decode(payload).map_err(malformed)?;
            check_claimed_id(&m.device_id, device_id)?;
            heartbeat(device_id, m, received_at, limits)
                .map(Decoded::Heartbeat)
                .map_err(|detail| reject(RejectReason::OutOfRange, detail))
        }
        Channel::Event => {
            let m = pb::Event::decode(payload).map_err(malformed)?;
            check_claimed_id(&m.device_id, device_id)?;
            let kind = EventKind::try_from(m.kind).map_err(|k| {
                reject(
                    RejectReason::UnknownEventKind,
                    format!("event kind {k} is not known"),
                )
            })?;
            let seq = seq_of(m.seq).map_err(|d| reject(RejectReason::OutOfRange, d))?;
            let (occurred_at, device_ts, clock_skewed) =
                place_in_time(m.occurred_at_ms, received_at, limits);
            Ok(Decoded::Event(DeviceEvent {
                device_id: device_id.to_string(),
                seq,
                kind,
                occurred_at,
                device_ts,
                received_at,
                clock_skewed,
                battery_pct: (m.battery_pct <= 100).then_some(m.battery_pct as i16),
                location: m.location.as_ref().and_then(|l| location(l).ok()),
            }))
        }
        Channel::State => {
            let m = pb::Presence::decode(payload).map_err(malformed)?;
            let (at, _, _) = place_in_time(m.at_ms, received_at, limits);
            Ok(Decoded::Presence(Presence {
                device_id: device_id.to_string(),
                online: m.online,
                at,
                received_at,
            }))
        }
        Channel::Command => Ok(Decoded::Downlink),
    }
}

fn check_claimed_id(claimed: &str, topic_id: &str) -> Result<(), Rejected> {
    if claimed.is_empty() || claimed == topic_id {
        Ok(())
    } else {
        Err(Rejected {
            reason: RejectReason::DeviceIdMismatch,
            detail: format!(
                "payload names device {:?} but was published on the topic of {topic_id:?}",
                truncate(claimed, 80)
            ),
            device_id: Some(topic_id.to_string()),
        })
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn seq_of(seq: u64) -> Result<i64, String> {
    i64::try_from(seq).map_err(|_| format!("seq {seq} is above 2^63-1"))
}

/// Returns (effective time, device's claim, skewed). A device clock outside the tolerance is
/// not believed: the receive time is used and the claim is kept for inspection.
fn place_in_time(
    device_ms: i64,
    received_at: DateTime<Utc>,
    limits: &Limits,
) -> (DateTime<Utc>, DateTime<Utc>, bool) {
    // Checked: a tolerance configured beyond chrono's range (say "1000000 years") would
    // otherwise panic on every message; an edge past the range is no edge at all.
    let believable = |t: DateTime<Utc>| {
        received_at
            .checked_add_signed(limits.max_clock_ahead)
            .is_none_or(|latest| t <= latest)
            && received_at
                .checked_sub_signed(limits.max_clock_behind)
                .is_none_or(|earliest| t >= earliest)
    };
    match DateTime::<Utc>::from_timestamp_millis(device_ms) {
        Some(t) if believable(t) => (t, t, false),
        Some(t) => (received_at, t, true),
        None => (received_at, DateTime::<Utc>::UNIX_EPOCH, true),
    }
}

fn vital(
    name: &str,
    value: u32,
    range: std::ops::RangeInclusive<u32>,
) -> Result<Option<i16>, String> {
    if value == 0 {
        Ok(None)
    } else if range.contains(&value) {
        Ok(Some(value as i16))
    } else {
        Err(format!(
            "{name}={value} is outside {}..={}",
            range.start(),
            range.end()
        ))
    }
}

fn location(l: &pb::Location) -> Result<Location, String> {
    if !(-900_000_000..=900_000_000).contains(&l.lat_e7)
        || !(-1_800_000_000..=1_800_000_000).contains(&l.lon_e7)
    {
        return Err(format!(
            "location lat_e7={} lon_e7={} is not on Earth",
            l.lat_e7, l.lon_e7
        ));
    }
    Ok(Location {
        lat_e7: l.lat_e7,
        lon_e7: l.lon_e7,
        accuracy_m: l.accuracy_m.min(i32::MAX as u32) as i32,
        // An unknown source is stored as 0 (unspecified), not guessed.
        source: if (0..=3).contains(&l.source) {
            l.source as i16
        } else {
            0
        },
    })
}

fn heartbeat(
    device_id: &str,
    m: pb::Heartbeat,
    received_at: DateTime<Utc>,
    limits: &Limits,
) -> Result<Heartbeat, String> {
    // Ranges are what a wrist sensor on a living person can report; beyond them the sensor
    // or the firmware is broken, and storing the value would poison trends and alerts.
    let heart_rate_bpm = vital("heart_rate_bpm", m.heart_rate_bpm, 20..=250)?;
    let spo2_pct = vital("spo2_pct", m.spo2_pct, 50..=100)?;
    let systolic_mmhg = vital("systolic_mmhg", m.systolic_mmhg, 50..=260)?;
    let diastolic_mmhg = vital("diastolic_mmhg", m.diastolic_mmhg, 30..=160)?;
    if let (Some(s), Some(d)) = (systolic_mmhg, diastolic_mmhg) {
        if d >= s {
            return Err(format!("diastolic_mmhg={d} is not below systolic_mmhg={s}"));
        }
    }
    let skin_temp_dc = match m.skin_temp_decicelsius {
        0 => None,
        t @ 200..=450 => Some(t as i16),
        t => return Err(format!("skin_temp_decicelsius={t} is outside 200..=450")),
    };
    if m.battery_pct > 100 {
        return Err(format!("battery_pct={} is above 100", m.battery_pct));
    }
    if m.steps_today > 200_000 {
        return Err(format!("steps_today={} is above 200000", m.steps_today));
    }
    let location = m.location.as_ref().map(location).transpose()?;
    let seq = seq_of(m.seq)?;
    let (ts, device_ts, clock_skewed) = place_in_time(m.measured_at_ms, received_at, limits);
    Ok(Heartbeat {
        device_id: device_id.to_string(),
        seq,
        ts,
        received_at,
        heart_rate_bpm,
        spo2_pct,
        systolic_mmhg,
        diastolic_mmhg,
        skin_temp_dc,
        steps_today: Some(m.steps_today as i32),
        battery_pct: Some(m.battery_pct as i16),
        worn: m.worn,
        location,
        clock_skewed,
        device_ts: clock_skewed.then_some(device_ts),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp_millis(1_790_000_000_000).unwrap()
    }

    fn hb(now_ms: i64) -> pb::Heartbeat {
        pb::Heartbeat {
            seq: 7,
            measured_at_ms: now_ms,
            heart_rate_bpm: 72,
            spo2_pct: 97,
            systolic_mmhg: 125,
            diastolic_mmhg: 80,
            skin_temp_decicelsius: 345,
            steps_today: 1200,
            battery_pct: 80,
            worn: true,
            location: Some(pb::Location {
                lat_e7: 302_740_000,
                lon_e7: 1_201_550_000,
                accuracy_m: 10,
                source: 1,
            }),
            device_id: "d1".into(),
        }
    }

    fn decode_hb(m: &pb::Heartbeat) -> Result<Decoded, Rejected> {
        decode(
            "sg/v1/dev/d1/hb",
            &m.encode_to_vec(),
            now(),
            &Limits::default(),
        )
    }

    #[test]
    fn good_heartbeat() {
        let Decoded::Heartbeat(h) = decode_hb(&hb(now().timestamp_millis())).unwrap() else {
            panic!()
        };
        assert_eq!(h.heart_rate_bpm, Some(72));
        assert_eq!(h.ts, now());
        assert!(!h.clock_skewed);
    }

    #[test]
    fn zero_means_not_measured() {
        let mut m = hb(now().timestamp_millis());
        m.heart_rate_bpm = 0;
        m.systolic_mmhg = 0;
        m.worn = false;
        let Decoded::Heartbeat(h) = decode_hb(&m).unwrap() else {
            panic!()
        };
        assert_eq!(h.heart_rate_bpm, None);
        assert_eq!(h.systolic_mmhg, None);
    }

    #[test]
    fn absurd_values_are_rejected_with_the_field() {
        let mut m = hb(now().timestamp_millis());
        m.heart_rate_bpm = 400;
        let e = decode_hb(&m).unwrap_err();
        assert_eq!(e.reason, RejectReason::OutOfRange);
        assert!(e.detail.contains("heart_rate_bpm=400"));
        let mut m = hb(now().timestamp_millis());
        m.spo2_pct = 120;
        assert!(decode_hb(&m).unwrap_err().detail.contains("spo2_pct=120"));
    }

    #[test]
    fn skewed_clock_keeps_row_with_receive_time() {
        let claim = now().timestamp_millis() + 3 * 3600 * 1000;
        let Decoded::Heartbeat(h) = decode_hb(&hb(claim)).unwrap() else {
            panic!()
        };
        assert!(h.clock_skewed);
        assert_eq!(h.ts, now());
        assert_eq!(h.device_ts.unwrap().timestamp_millis(), claim);
        let Decoded::Heartbeat(h) = decode_hb(&hb(0)).unwrap() else {
            panic!()
        };
        assert!(h.clock_skewed, "1970 is far in the past");
    }

    #[test]
    fn a_clock_tolerance_beyond_chronos_range_does_not_panic() {
        // Found by the decode_validate fuzz target: `received_at + max_clock_ahead` panicked.
        let limits = Limits {
            max_clock_ahead: TimeDelta::MAX,
            max_clock_behind: TimeDelta::MAX,
            ..Limits::default()
        };
        for claim in [i64::MIN, 0, now().timestamp_millis(), i64::MAX] {
            let r = decode(
                "sg/v1/dev/d1/hb",
                &hb(claim).encode_to_vec(),
                now(),
                &limits,
            );
            let Ok(Decoded::Heartbeat(h)) = r else {
                panic!("{r:?}")
            };
            // Every representable time is within an unbounded window.
            let representable = DateTime::<Utc>::from_timestamp_millis(claim).is_some();
            assert_eq!(h.clock_skewed, !representable, "{claim}");
        }
    }

    #[test]
    fn device_id_mismatch() {
        let mut m = hb(now().timestamp_millis());
        m.device_id = "other".into();
        assert_eq!(
            decode_hb(&m).unwrap_err().reason,
            RejectReason::DeviceIdMismatch
        );
    }

    #[test]
    fn malformed_and_oversized() {
        let e = decode(
            "sg/v1/dev/d1/hb",
            &[0xff, 0xff, 0xff],
            now(),
            &Limits::default(),
        )
        .unwrap_err();
        assert_eq!(e.reason, RejectReason::MalformedProtobuf);
        let big = vec![0u8; 5000];
        let e = decode("sg/v1/dev/d1/hb", &big, now(), &Limits::default()).unwrap_err();
        assert_eq!(e.reason, RejectReason::Oversized);
    }

    #[test]
    fn topics() {
        assert_eq!(
            parse_topic("sg/v1/dev/abc/evt").unwrap(),
            ("abc", Channel::Event)
        );
        for bad in [
            "sg/v1/dev/abc",
            "sg/v1/dev/abc/hb/x",
            "sg/v2/dev/abc/hb",
            "sg/v1/dev/a+b/hb",
            "sg/v1/dev//hb",
            "other",
        ] {
            assert_eq!(
                parse_topic(bad).unwrap_err().reason,
                RejectReason::BadTopic,
                "{bad}"
            );
        }
        assert_eq!(
            parse_topic("sg/v1/dev/abc/nonsense")
                .unwrap_err()
                .device_id
                .as_deref(),
            Some("abc")
        );
    }

    #[test]
    fn an_sos_with_garbage_extras_is_kept() {
        let m = pb::Event {
            seq: 1,
            occurred_at_ms: now().timestamp_millis(),
            kind: pb::EventKind::Sos as i32,
            location: Some(pb::Location {
                lat_e7: i32::MAX,
                lon_e7: 0,
                accuracy_m: 0,
                source: 9,
            }),
            battery_pct: 250,
            device_id: String::new(),
        };
        let Decoded::Event(e) = decode(
            "sg/v1/dev/d1/evt",
            &m.encode_to_vec(),
            now(),
            &Limits::default(),
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(e.kind, EventKind::Sos);
        assert_eq!(e.battery_pct, None);
        assert_eq!(e.location, None);
    }

    #[test]
    fn unknown_event_kind() {
        let m = pb::Event {
            kind: 99,
            ..Default::default()
        };
        let e = decode(
            "sg/v1/dev/d1/evt",
            &m.encode_to_vec(),
            now(),
            &Limits::default(),
        )
        .unwrap_err();
        assert_eq!(e.reason, RejectReason::UnknownEventKind);
    }
}
