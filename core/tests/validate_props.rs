//! Property tests for validation: what the edge accepts, rejects, and why, over generated
//! messages rather than a handful of examples.

use chrono::{DateTime, TimeDelta, Utc};
use proptest::prelude::*;
use silverguard_core::fuzzing::decode::check_decode;
use silverguard_core::validate::{decode, Decoded, Limits, RejectReason};
use silverguard_proto::v1 as pb;
use silverguard_proto::Message;

fn now() -> DateTime<Utc> {
    DateTime::from_timestamp_millis(1_790_000_000_000).unwrap()
}

fn device_id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_-]{1,64}"
}

/// 0 (not measured) or a value in the documented range.
fn vital(lo: u32, hi: u32) -> impl Strategy<Value = u32> {
    prop_oneof![Just(0u32), lo..=hi]
}

fn location() -> impl Strategy<Value = pb::Location> {
    (
        -900_000_000..=900_000_000i32,
        -1_800_000_000..=1_800_000_000i32,
        0..=i32::MAX as u32,
        0..=3i32,
    )
        .prop_map(|(lat_e7, lon_e7, accuracy_m, source)| pb::Location {
            lat_e7,
            lon_e7,
            accuracy_m,
            source,
        })
}

prop_compose! {
    /// A heartbeat inside every documented range, measured within the clock tolerance.
    fn valid_heartbeat()(
        seq in 0..=i64::MAX as u64,
        offset_ms in -7 * 86_400_000i64..=5 * 60_000,
        heart_rate_bpm in vital(20, 250),
        spo2_pct in vital(50, 100),
        (systolic_mmhg, diastolic_mmhg) in (vital(50, 260), vital(30, 160))
            .prop_filter("diastolic below systolic", |(s, d)| *s == 0 || *d == 0 || d < s),
        skin_temp_decicelsius in prop_oneof![Just(0i32), 200..=450i32],
        steps_today in 0..=200_000u32,
        battery_pct in 0..=100u32,
        worn in any::<bool>(),
        location in proptest::option::of(location()),
        claim_id in any::<bool>(),
    ) -> (pb::Heartbeat, bool) {
        (pb::Heartbeat {
            seq,
            measured_at_ms: now().timestamp_millis() + offset_ms,
            heart_rate_bpm,
            spo2_pct,
            systolic_mmhg,
            diastolic_mmhg,
            skin_temp_decicelsius,
            steps_today,
            battery_pct,
            worn,
            location,
            device_id: String::new(),
        }, claim_id)
    }
}

fn opt(v: u32) -> Option<i16> {
    (v != 0).then_some(v as i16)
}

fn hb_topic(id: &str) -> String {
    format!("sg/v1/dev/{id}/hb")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn a_heartbeat_in_range_is_accepted_field_by_field(
        (mut m, claim_id) in valid_heartbeat(),
        id in device_id(),
    ) {
        if claim_id {
            m.device_id = id.clone();
        }
        let got = decode(&hb_topic(&id), &m.encode_to_vec(), now(), &Limits::default());
        let Ok(Decoded::Heartbeat(h)) = got else {
            return Err(TestCaseError::fail(format!("{got:?}")));
        };
        prop_assert_eq!(&h.device_id, &id);
        prop_assert_eq!(h.seq as u64, m.seq);
        prop_assert_eq!(h.ts.timestamp_millis(), m.measured_at_ms);
        prop_assert_eq!(h.received_at, now());
        prop_assert!(!h.clock_skewed);
        prop_assert_eq!(h.device_ts, None);
        prop_assert_eq!(h.heart_rate_bpm, opt(m.heart_rate_bpm));
        prop_assert_eq!(h.spo2_pct, opt(m.spo2_pct));
        prop_assert_eq!(h.systolic_mmhg, opt(m.systolic_mmhg));
        prop_assert_eq!(h.diastolic_mmhg, opt(m.diastolic_mmhg));
        prop_assert_eq!(h.skin_temp_dc, opt(m.skin_temp_decicelsius as u32));
        prop_assert_eq!(h.steps_today, Some(m.steps_today as i32));
        prop_assert_eq!(h.battery_pct, Some(m.battery_pct as i16));
        prop_assert_eq!(h.worn, m.worn);
        match (&h.location, &m.location) {
            (None, None) => {}
            (Some(a), Some(b)) => {
                prop_assert_eq!(a.lat_e7, b.lat_e7);
                prop_assert_eq!(a.lon_e7, b.lon_e7);
                prop_assert_eq!(a.accuracy_m as u32, b.accuracy_m);
                prop_assert_eq!(i32::from(a.source), b.source);
            }
            (a, b) => prop_assert!(false, "location {:?} from {:?}", a, b),
        }
    }

    #[test]
    fn an_out_of_range_field_is_rejected_naming_it(
        (m, _) in valid_heartbeat(),
        field in 0..7usize,
        high in any::<bool>(),
        pick in any::<u32>(),
    ) {
        let mut m = m;
        // (name, lowest valid, highest valid); 0 is "not measured", so only above/below.
        let (name, lo, hi): (&str, i64, i64) = [
            ("heart_rate_bpm", 20, 250),
            ("spo2_pct", 50, 100),
            ("systolic_mmhg", 50, 260),
            ("diastolic_mmhg", 30, 160),
            ("skin_temp_decicelsius", 200, 450),
            ("battery_pct", 0, 100),
            ("steps_today", 0, 200_000),
        ][field];
        let below_possible = lo > 1;
        let v: i64 = if high || !below_possible {
            hi + 1 + i64::from(pick % 1_000_000)
        } else {
            1 + i64::from(pick) % (lo - 1)
        };
        match field {
            0 => m.heart_rate_bpm = v as u32,
            1 => m.spo2_pct = v as u32,
            2 => { m.systolic_mmhg = v as u32; m.diastolic_mmhg = 0 }
            3 => { m.diastolic_mmhg = v as u32; m.systolic_mmhg = 0 }
            4 => m.skin_temp_decicelsius = v as i32,
            5 => m.battery_pct = v as u32,
            _ => m.steps_today = v as u32,
        }
        let e = decode(&hb_topic("d1"), &m.encode_to_vec(), now(), &Limits::default())
            .unwrap_err();
        prop_assert_eq!(e.reason, RejectReason::OutOfRange);
        prop_assert!(e.detail.contains(&format!("{name}={v}")), "{}", e.detail);
        prop_assert_eq!(e.device_id.as_deref(), Some("d1"));
    }

    #[test]
    fn a_topic_outside_the_scheme_is_bad_topic(
        topic in prop_oneof![
            ".*",
            "sg/v1/dev/[A-Za-z0-9_-]{1,64}",
            "sg/v[02-9]/dev/[a-z0-9]{1,8}/hb",
            "sg/v1/dev/[^/]*[+# /.][^/]*/hb",
            "sg/v1/dev/[a-z]{65,80}/evt",
            "sg/v1/dev/[a-z0-9]{1,8}/(hb|evt|state)/.*",
        ],
        payload in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let parts: Vec<&str> = topic.split('/').collect();
        let well_formed = parts.len() == 5
            && parts[..3] == ["sg", "v1", "dev"]
            && (1..=64).contains(&parts[3].len())
            && parts[3].bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        prop_assume!(!well_formed);
        let e = decode(&topic, &payload, now(), &Limits::default()).unwrap_err();
        prop_assert_eq!(e.reason, RejectReason::BadTopic);
        prop_assert_eq!(e.device_id, None);
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics_and_keeps_every_invariant(
        id in device_id(),
        leaf in prop_oneof![
            Just("hb".to_string()),
            Just("evt".to_string()),
            Just("state".to_string()),
            Just("cmd".to_string()),
            "[a-z]{0,6}",
        ],
        payload in proptest::collection::vec(any::<u8>(), 0..256),
        received_s in any::<i32>(),
    ) {
        let received_at = now() + TimeDelta::seconds(received_s.into());
        // check_decode asserts the fuzz target's invariants against its independent oracle.
        let _ = check_decode(&format!("sg/v1/dev/{id}/{leaf}"), &payload, received_at, &Limits::default());
    }

    #[test]
    fn a_payload_naming_another_device_is_rejected(
        (mut m, _) in valid_heartbeat(),
        topic_id in device_id(),
        claimed in ".{1,100}",
        as_event in any::<bool>(),
    ) {
        prop_assume!(claimed != topic_id);
        let (topic, payload) = if as_event {
            let e = pb::Event {
                seq: 1,
                occurred_at_ms: now().timestamp_millis(),
                kind: pb::EventKind::Sos as i32,
                device_id: claimed.clone(),
                ..Default::default()
            };
            (format!("sg/v1/dev/{topic_id}/evt"), e.encode_to_vec())
        } else {
            m.device_id = claimed.clone();
            (hb_topic(&topic_id), m.encode_to_vec())
        };
        let e = decode(&topic, &payload, now(), &Limits { max_payload_bytes: 1 << 20, ..Limits::default() })
            .unwrap_err();
        prop_assert_eq!(e.reason, RejectReason::DeviceIdMismatch);
        prop_assert_eq!(e.device_id.as_deref(), Some(topic_id.as_str()));
    }

    #[test]
    fn a_clock_outside_the_tolerance_is_replaced_by_the_receive_time(
        (mut m, _) in valid_heartbeat(),
        ahead in any::<bool>(),
        beyond_ms in 1..=i64::MAX / 4,
    ) {
        let limits = Limits::default();
        let claim = if ahead {
            now().timestamp_millis().saturating_add(limits.max_clock_ahead.num_milliseconds()).saturating_add(beyond_ms)
        } else {
            now().timestamp_millis().saturating_sub(limits.max_clock_behind.num_milliseconds()).saturating_sub(beyond_ms)
        };
        m.measured_at_ms = claim;
        let Ok(Decoded::Heartbeat(h)) = decode(&hb_topic("d1"), &m.encode_to_vec(), now(), &limits) else {
            return Err(TestCaseError::fail("not accepted"));
        };
        prop_assert!(h.clock_skewed);
        prop_assert_eq!(h.ts, now());
        let expected_claim = DateTime::<Utc>::from_timestamp_millis(claim).unwrap_or(DateTime::<Utc>::UNIX_EPOCH);
        prop_assert_eq!(h.device_ts, Some(expected_claim));
    }
}
