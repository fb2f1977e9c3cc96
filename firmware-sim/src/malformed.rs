//! Bad messages a broken or hostile bracelet might send, one per rejection class the
//! backend must handle without stopping (DESIGN.md, guarantee 3).
//!
//! Each [`BadClass`] name equals the backend's reject reason for it, so a test can compare
//! [`crate::FleetReport::bad_published`] with the backend's reject counters key by key.

use rand::Rng;
use silverguard_proto::v1::Heartbeat;
use silverguard_proto::Message;

use crate::topics;

/// Size of an `oversized` payload: far above any real heartbeat (~60 bytes) and above the
/// backend's default 4 KiB limit.
pub const OVERSIZED_BYTES: usize = 64 * 1024;

/// The classes of bad message the `malformed` scenario rotates through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BadClass {
    /// Bytes that are not protobuf at all.
    MalformedProtobuf,
    /// A 64 KiB payload (a valid Heartbeat padded with an unknown field).
    Oversized,
    /// A Heartbeat with an impossible heart rate or SpO2.
    OutOfRange,
    /// A Heartbeat whose `device_id` names another device than its topic.
    DeviceIdMismatch,
    /// A well-formed Heartbeat on the topic of a device that is not registered.
    UnknownDevice,
    /// A Heartbeat on a topic the backend does not serve.
    BadTopic,
}

impl BadClass {
    /// All classes, in the order the `malformed` scenario sends them.
    pub const ALL: [BadClass; 6] = [
        BadClass::MalformedProtobuf,
        BadClass::Oversized,
        BadClass::OutOfRange,
        BadClass::DeviceIdMismatch,
        BadClass::UnknownDevice,
        BadClass::BadTopic,
    ];

    /// The report key (equal to the backend's reject reason).
    pub fn as_str(self) -> &'static str {
        match self {
            BadClass::MalformedProtobuf => "malformed_protobuf",
            BadClass::Oversized => "oversized",
            BadClass::OutOfRange => "out_of_range",
            BadClass::DeviceIdMismatch => "device_id_mismatch",
            BadClass::UnknownDevice => "unknown_device",
            BadClass::BadTopic => "bad_topic",
        }
    }

    /// Position in [`BadClass::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for BadClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One bad message, ready to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct BadMessage {
    pub class: BadClass,
    pub topic: String,
    pub payload: Vec<u8>,
}

/// A device id that is not in the fleet but still well-formed, so the backend rejects the
/// message as `unknown_device` rather than as `bad_topic`.
pub fn ghost_id(device_id: &str) -> String {
    const SUFFIX: &str = "-ghost";
    let keep = device_id
        .len()
        .min(topics::MAX_DEVICE_ID_LEN - SUFFIX.len());
    // Device ids are ASCII (checked at start), so byte slicing is on a char boundary.
    format!("{}{SUFFIX}", &device_id[..keep])
}

/// Builds a bad message of `class` for `device_id`.
///
/// `good` is the heartbeat the device just sent (the bad one imitates it), `other_device_id`
/// another id of the fleet for `device_id_mismatch`, and `nth` counts bad messages of this
/// device so that `out_of_range` alternates between a heart rate of 400 and an SpO2 of 120.
pub fn build(
    class: BadClass,
    device_id: &str,
    other_device_id: &str,
    good: &Heartbeat,
    nth: u64,
    rng: &mut impl Rng,
) -> BadMessage {
    let (topic, payload) = match class {
        BadClass::MalformedProtobuf => {
            // Eleven 0xFF bytes are a varint longer than protobuf allows, so no decoder can
            // read even the first tag; random bytes after that make each one different.
            let mut p = vec![0xFF; 11];
            let tail = rng.random_range(8..48);
            p.extend((0..tail).map(|_| rng.random::<u8>()));
            (topics::heartbeat(device_id), p)
        }
        BadClass::Oversized => (topics::heartbeat(device_id), oversized(good)),
        BadClass::OutOfRange => {
            let mut hb = good.clone();
            if nth % 2 == 0 {
                hb.heart_rate_bpm = 400;
            } else {
                hb.spo2_pct = 120;
            }
            hb.worn = true;
            (topics::heartbeat(device_id), hb.encode_to_vec())
        }
        BadClass::DeviceIdMismatch => {
            let mut hb = good.clone();
            hb.device_id = other_device_id.to_string();
            (topics::heartbeat(device_id), hb.encode_to_vec())
        }
        BadClass::UnknownDevice => {
            let ghost = ghost_id(device_id);
            let mut hb = good.clone();
            hb.device_id = ghost.clone();
            (topics::heartbeat(&ghost), hb.encode_to_vec())
        }
        BadClass::BadTopic => (topics::nonsense(device_id), good.encode_to_vec()),
    };
    BadMessage {
        class,
        topic,
        payload,
    }
}

/// A valid Heartbeat followed by one unknown length-delimited field (number 1000) that pads
/// the payload to exactly [`OVERSIZED_BYTES`]: it decodes fine, so only its size is wrong.
fn oversized(good: &Heartbeat) -> Vec<u8> {
    let mut p = good.encode_to_vec();
    // Tag of field 1000, wire type 2 (LEN): (1000 << 3) | 2 = 8002, a 2-byte varint.
    let tag = encode_varint(1000 << 3 | 2);
    // Length varint of a ~64 KiB pad is 3 bytes (values 16384..2097151).
    let pad = OVERSIZED_BYTES - p.len() - tag.len() - 3;
    let len = encode_varint(pad as u64);
    debug_assert_eq!(len.len(), 3);
    p.extend_from_slice(&tag);
    p.extend_from_slice(&len);
    p.resize(OVERSIZED_BYTES, 0x5A);
    p
}

fn encode_varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(10);
    loop {
        let byte = (v & 0x7F) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn good() -> Heartbeat {
        Heartbeat {
            seq: 7,
            measured_at_ms: 1_772_380_800_000,
            heart_rate_bpm: 72,
            spo2_pct: 97,
            systolic_mmhg: 125,
            diastolic_mmhg: 80,
            skin_temp_decicelsius: 345,
            steps_today: 1200,
            battery_pct: 80,
            worn: true,
            location: None,
            device_id: "sim-000001".into(),
        }
    }

    fn make(class: BadClass, nth: u64) -> BadMessage {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        build(class, "sim-000001", "sim-000002", &good(), nth, &mut rng)
    }

    #[test]
    fn names_match_backend_reject_reasons() {
        let names: Vec<_> = BadClass::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(
            names,
            [
                "malformed_protobuf",
                "oversized",
                "out_of_range",
                "device_id_mismatch",
                "unknown_device",
                "bad_topic"
            ]
        );
        for (i, c) in BadClass::ALL.iter().enumerate() {
            assert_eq!(c.index(), i);
        }
    }

    #[test]
    fn malformed_protobuf_does_not_decode() {
        for nth in 0..20 {
            let mut rng = ChaCha8Rng::seed_from_u64(nth);
            let m = build(
                BadClass::MalformedProtobuf,
                "d",
                "e",
                &good(),
                nth,
                &mut rng,
            );
            assert_eq!(m.topic, "sg/v1/dev/d/hb");
            assert_eq!(&m.payload[..3], &[0xFF, 0xFF, 0xFF]);
            assert!(Heartbeat::decode(m.payload.as_slice()).is_err());
            assert!(silverguard_proto::v1::Event::decode(m.payload.as_slice()).is_err());
            assert!(silverguard_proto::v1::Presence::decode(m.payload.as_slice()).is_err());
        }
    }

    #[test]
    fn oversized_is_64k_and_otherwise_valid() {
        let m = make(BadClass::Oversized, 0);
        assert_eq!(m.payload.len(), OVERSIZED_BYTES);
        assert_eq!(m.topic, "sg/v1/dev/sim-000001/hb");
        let hb = Heartbeat::decode(m.payload.as_slice()).expect("decodes");
        assert_eq!(hb, good());
    }

    #[test]
    fn out_of_range_alternates_hr_and_spo2() {
        let a = Heartbeat::decode(make(BadClass::OutOfRange, 0).payload.as_slice()).unwrap();
        assert_eq!(a.heart_rate_bpm, 400);
        let b = Heartbeat::decode(make(BadClass::OutOfRange, 1).payload.as_slice()).unwrap();
        assert_eq!(b.spo2_pct, 120);
        assert_eq!(
            make(BadClass::OutOfRange, 1).topic,
            "sg/v1/dev/sim-000001/hb"
        );
    }

    #[test]
    fn device_id_mismatch_names_another_device() {
        let m = make(BadClass::DeviceIdMismatch, 0);
        assert_eq!(m.topic, "sg/v1/dev/sim-000001/hb");
        let hb = Heartbeat::decode(m.payload.as_slice()).unwrap();
        assert_eq!(hb.device_id, "sim-000002");
    }

    #[test]
    fn unknown_device_uses_a_valid_ghost_id() {
        let m = make(BadClass::UnknownDevice, 0);
        assert_eq!(m.topic, "sg/v1/dev/sim-000001-ghost/hb");
        let hb = Heartbeat::decode(m.payload.as_slice()).unwrap();
        assert_eq!(hb.device_id, "sim-000001-ghost");
        let long = "x".repeat(64);
        let g = ghost_id(&long);
        assert!(topics::is_valid_device_id(&g));
        assert!(g.ends_with("-ghost"));
    }

    #[test]
    fn bad_topic_is_outside_the_contract() {
        let m = make(BadClass::BadTopic, 0);
        assert_eq!(m.topic, "sg/v1/dev/sim-000001/nonsense");
        assert_eq!(Heartbeat::decode(m.payload.as_slice()).unwrap(), good());
    }
}
