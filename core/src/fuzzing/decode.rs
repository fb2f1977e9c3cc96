//! Target `decode_validate`: topic + payload through [`validate::decode`], checked against an
//! independent reading of the topic scheme and of the protobuf message.

use chrono::{DateTime, TimeDelta, Utc};
use silverguard_proto::v1 as pb;
use silverguard_proto::Message;

use super::bytes::{Reader, Writer};
use crate::validate::{self, Decoded, EventKind, Limits, Location, RejectReason, Rejected};

/// Device ids the fuzzer can pick with one byte, so payloads that name the topic's device
/// (the interesting case) are within reach. The last is the longest id allowed.
pub fn known_id(i: u8) -> String {
    match i {
        0 => "d1".into(),
        1 => "861234567890123".into(),
        2 => "sim-000001_a".into(),
        _ => "a".repeat(64),
    }
}

/// "Now" for inputs: received_at is this plus an offset the input chooses.
pub const BASE_MS: i64 = 1_790_000_000_000;

const LEAVES: [&str; 4] = ["hb", "evt", "state", "cmd"];

#[derive(Debug, Clone)]
pub struct DecodeInput {
    pub topic: String,
    pub payload: Vec<u8>,
    pub received_at: DateTime<Utc>,
    pub limits: Limits,
}

/// How a seed is laid out; [`DecodeInput::parse`] reads the same layout.
///
/// `shape`: 0 hb, 1 evt, 2 state, 3 cmd, 4 hb, 5 evt (a well-formed topic), 6 a custom leaf
/// (`extra`), 7 a raw topic (`extra`). `id` < 4 picks [`known_id`], otherwise `extra` holds
/// the id's `id - 4` raw bytes (before the leaf, for shape 6).
#[derive(Debug, Clone, Default)]
pub struct DecodeSeed {
    pub shape: u8,
    pub id: u8,
    pub raw_id: Vec<u8>,
    pub extra: Vec<u8>,
    pub received_offset_s: i32,
    /// max payload bytes, max clock ahead ms, max clock behind ms; None: the defaults.
    pub limits: Option<(u16, u64, u64)>,
    pub payload: Vec<u8>,
}

impl DecodeSeed {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(self.shape);
        if self.shape % 8 == 7 {
            w.u16(self.extra.len() as u16).bytes(&self.extra);
        } else {
            w.u8(self.id);
            if self.id >= 4 {
                w.bytes(&self.raw_id);
            }
            if self.shape % 8 == 6 {
                w.u8(self.extra.len() as u8).bytes(&self.extra);
            }
        }
        w.i32(self.received_offset_s);
        match self.limits {
            None => w.u8(0),
            Some((max, ahead, behind)) => w.u8(1).u16(max).u64(ahead).u64(behind),
        };
        w.bytes(&self.payload);
        w.out
    }
}

fn delta_ms(ms: u64) -> TimeDelta {
    // As `TimeDelta::from_std` turns a configured Duration: up to TimeDelta::MAX.
    TimeDelta::try_milliseconds((ms & i64::MAX as u64) as i64).unwrap_or(TimeDelta::MAX)
}

impl DecodeInput {
    pub fn parse(data: &[u8]) -> DecodeInput {
        let mut r = Reader::new(data);
        let shape = r.u8() % 8;
        let topic = if shape == 7 {
            let n = r.u16() as usize;
            String::from_utf8_lossy(r.bytes(n)).into_owned()
        } else {
            let id = match r.u8() {
                c @ 0..=3 => known_id(c),
                c => String::from_utf8_lossy(r.bytes(c as usize - 4)).into_owned(),
            };
            let leaf = if shape == 6 {
                let n = r.u8() as usize;
                String::from_utf8_lossy(r.bytes(n)).into_owned()
            } else {
                LEAVES[shape as usize % 4].to_string()
            };
            format!("sg/v1/dev/{id}/{leaf}")
        };
        let received_at = DateTime::<Utc>::from_timestamp_millis(BASE_MS).unwrap_or_default()
            + TimeDelta::seconds(r.i32() as i64);
        let limits = match r.u8() {
            1 => Limits {
                max_payload_bytes: r.u16() as usize,
                max_clock_ahead: delta_ms(r.u64()),
                max_clock_behind: delta_ms(r.u64()),
            },
            _ => Limits::default(),
        };
        DecodeInput {
            topic,
            payload: r.rest().to_vec(),
            received_at,
            limits,
        }
    }
}

/// The fuzz target's body.
pub fn check_decode_validate(data: &[u8]) {
    let i = DecodeInput::parse(data);
    let _ = check_decode(&i.topic, &i.payload, i.received_at, &i.limits);
}

/// `sg/v1/dev/{id}/{leaf}` with a valid id, read without `validate::parse_topic`.
fn topic_oracle(topic: &str) -> Option<(&str, &str)> {
    let parts: Vec<&str> = topic.split('/').collect();
    match parts.as_slice() {
        ["sg", "v1", "dev", id, leaf]
            if (1..=64).contains(&id.len())
                && id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') =>
        {
            Some((id, leaf))
        }
        _ => None,
    }
}

/// Where the validation must place a device timestamp: (effective, claim, skewed).
fn time_oracle(
    device_ms: i64,
    received_at: DateTime<Utc>,
    limits: &Limits,
) -> (DateTime<Utc>, DateTime<Utc>, bool) {
    let Some(t) = DateTime::<Utc>::from_timestamp_millis(device_ms) else {
        return (received_at, DateTime::<Utc>::UNIX_EPOCH, true);
    };
    // A window edge beyond chrono's range is no edge at all.
    let ahead_ok = received_at
        .checked_add_signed(limits.max_clock_ahead)
        .is_none_or(|hi| t <= hi);
    let behind_ok = received_at
        .checked_sub_signed(limits.max_clock_behind)
        .is_none_or(|lo| t >= lo);
    if ahead_ok && behind_ok {
        (t, t, false)
    } else {
        (received_at, t, true)
    }
}

fn vital_oracle(v: u32, lo: u32, hi: u32) -> Result<Option<i16>, ()> {
    match v {
        0 => Ok(None),
        v if (lo..=hi).contains(&v) => Ok(Some(v as i16)),
        _ => Err(()),
    }
}

fn location_oracle(l: &pb::Location) -> Option<Location> {
    let on_earth =
        l.lat_e7.unsigned_abs() <= 900_000_000 && l.lon_e7.unsigned_abs() <= 1_800_000_000;
    on_earth.then(|| Location {
        lat_e7: l.lat_e7,
        lon_e7: l.lon_e7,
        accuracy_m: i32::try_from(l.accuracy_m).unwrap_or(i32::MAX),
        source: if (0..=3).contains(&l.source) {
            l.source as i16
        } else {
            0
        },
    })
}

/// What a heartbeat must become, or None when it must be rejected as out of range.
fn heartbeat_oracle(
    id: &str,
    m: &pb::Heartbeat,
    received_at: DateTime<Utc>,
    limits: &Limits,
) -> Option<validate::Heartbeat> {
    let hr = vital_oracle(m.heart_rate_bpm, 20, 250).ok()?;
    let spo2 = vital_oracle(m.spo2_pct, 50, 100).ok()?;
    let sys = vital_oracle(m.systolic_mmhg, 50, 260).ok()?;
    let dia = vital_oracle(m.diastolic_mmhg, 30, 160).ok()?;
    if let (Some(s), Some(d)) = (sys, dia) {
        if d >= s {
            return None;
        }
    }
    let temp = match m.skin_temp_decicelsius {
        0 => None,
        t if (200..=450).contains(&t) => Some(t as i16),
        _ => return None,
    };
    if m.battery_pct > 100 || m.steps_today > 200_000 {
        return None;
    }
    let location = match &m.location {
        None => None,
        Some(l) => Some(location_oracle(l)?),
    };
    let seq = i64::try_from(m.seq).ok()?;
    let (ts, claim, skewed) = time_oracle(m.measured_at_ms, received_at, limits);
    Some(validate::Heartbeat {
        device_id: id.to_string(),
        seq,
        ts,
        received_at,
        heart_rate_bpm: hr,
        spo2_pct: spo2,
        systolic_mmhg: sys,
        diastolic_mmhg: dia,
        skin_temp_dc: temp,
        steps_today: Some(m.steps_today as i32),
        battery_pct: Some(m.battery_pct as i16),
        worn: m.worn,
        location,
        clock_skewed: skewed,
        device_ts: skewed.then_some(claim),
    })
}

fn claims_other(claimed: &str, id: &str) -> bool {
    !claimed.is_empty() && claimed != id
}

/// Decodes once and asserts everything that must hold for any input; returns the result so
/// property tests can look further.
pub fn check_decode(
    topic: &str,
    payload: &[u8],
    received_at: DateTime<Utc>,
    limits: &Limits,
) -> Result<Decoded, Rejected> {
    let got = validate::decode(topic, payload, received_at, limits);
    assert_eq!(
        got,
        validate::decode(topic, payload, received_at, limits),
        "decode is deterministic"
    );
    let expected = expected_outcome(topic, payload, received_at, limits);
    match (&got, &expected) {
        (Ok(d), Ok(e)) => assert_eq!(d, e, "accepted, but not as the oracle reads it"),
        (Err(r), Err((reason, device_id))) => {
            assert_eq!(r.reason, *reason, "rejected for another reason: {r:?}");
            assert_eq!(r.device_id.as_deref(), *device_id, "{r:?}");
            assert!(RejectReason::ALL.contains(&r.reason));
            assert!(!r.detail.is_empty(), "{r:?}");
            // Detail strings go to logs and the database: a hostile payload must not make
            // them big. The topic is bounded by the broker and the claimed id is cut to 80
            // characters; both are quoted with `{:?}`, which may turn a character into up
            // to 10 bytes (`\u{10ffff}`).
            assert!(
                r.detail.len() <= 200 + 10 * (topic.len() + 80),
                "detail of {} bytes",
                r.detail.len()
            );
        }
        (got, expected) => panic!("decode gave {got:?}, the oracle expects {expected:?}"),
    }
    if let Ok(d) = &got {
        if let Some(id) = d.device_id() {
            assert_eq!(Some(id), topic_oracle(topic).map(|(id, _)| id));
        }
    }
    got
}

type Expected<'t> = Result<Decoded, (RejectReason, Option<&'t str>)>;

fn expected_outcome<'t>(
    topic: &'t str,
    payload: &[u8],
    received_at: DateTime<Utc>,
    limits: &Limits,
) -> Expected<'t> {
    use RejectReason::*;
    let Some((id, leaf)) = topic_oracle(topic) else {
        return Err((BadTopic, None));
    };
    let reject = |reason| Err((reason, Some(id)));
    if !LEAVES.contains(&leaf) {
        return reject(BadTopic);
    }
    if leaf == "cmd" || (leaf == "state" && payload.is_empty()) {
        return Ok(Decoded::Downlink);
    }
    if payload.is_empty() {
        return reject(MalformedProtobuf);
    }
    if payload.len() > limits.max_payload_bytes {
        return reject(Oversized);
    }
    match leaf {
        "hb" => {
            let Ok(m) = pb::Heartbeat::decode(payload) else {
                return reject(MalformedProtobuf);
            };
            if claims_other(&m.device_id, id) {
                return reject(DeviceIdMismatch);
            }
            match heartbeat_oracle(id, &m, received_at, limits) {
                Some(h) => Ok(Decoded::Heartbeat(h)),
                None => reject(OutOfRange),
            }
        }
        "evt" => {
            let Ok(m) = pb::Event::decode(payload) else {
                return reject(MalformedProtobuf);
            };
            if claims_other(&m.device_id, id) {
                return reject(DeviceIdMismatch);
            }
            let Ok(kind) = EventKind::try_from(m.kind) else {
                return reject(UnknownEventKind);
            };
            let Ok(seq) = i64::try_from(m.seq) else {
                return reject(OutOfRange);
            };
            let (occurred_at, device_ts, clock_skewed) =
                time_oracle(m.occurred_at_ms, received_at, limits);
            Ok(Decoded::Event(validate::DeviceEvent {
                device_id: id.to_string(),
                seq,
                kind,
                occurred_at,
                device_ts,
                received_at,
                clock_skewed,
                battery_pct: (m.battery_pct <= 100).then_some(m.battery_pct as i16),
                location: m.location.as_ref().and_then(location_oracle),
            }))
        }
        _ => {
            let Ok(m) = pb::Presence::decode(payload) else {
                return reject(MalformedProtobuf);
            };
            Ok(Decoded::Presence(validate::Presence {
                device_id: id.to_string(),
                online: m.online,
                at: time_oracle(m.at_ms, received_at, limits).0,
                received_at,
            }))
        }
    }
}
