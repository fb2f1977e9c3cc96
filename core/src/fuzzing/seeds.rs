//! Seed inputs for both targets: real encodings of every message type and realistic rule
//! scenarios. `cargo run -p silverguard-core --example fuzz_seeds` writes them into
//! `fuzz/corpus/<target>/seed-<name>`; libFuzzer's own finds sit beside them.

use std::time::Duration;

use chrono::{DateTime, Utc};

use silverguard_proto::v1 as pb;
use silverguard_proto::Message;

use super::decode::{DecodeSeed, BASE_MS};
use super::rules::{Override, Readings, RuleInput, Step};
use crate::rules::VITAL_RULES;
use crate::validate::Location;

/// The named seeds of a target (empty for an unknown target).
pub fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    match target {
        "decode_validate" => decode_seeds()
            .into_iter()
            .map(|(n, s)| (n, s.to_bytes()))
            .collect(),
        "rule_eval" => rule_seeds()
            .into_iter()
            .map(|(n, s)| (n.to_string(), s.to_bytes()))
            .collect(),
        _ => Vec::new(),
    }
}

fn location() -> pb::Location {
    pb::Location {
        lat_e7: 302_740_000,
        lon_e7: 1_201_550_000,
        accuracy_m: 10,
        source: 1,
    }
}

fn heartbeat(device_id: &str) -> pb::Heartbeat {
    pb::Heartbeat {
        seq: 7,
        measured_at_ms: BASE_MS - 1_000,
        heart_rate_bpm: 72,
        spo2_pct: 97,
        systolic_mmhg: 125,
        diastolic_mmhg: 80,
        skin_temp_decicelsius: 345,
        steps_today: 1200,
        battery_pct: 80,
        worn: true,
        location: Some(location()),
        device_id: device_id.into(),
    }
}

fn seed(shape: u8, id: u8, payload: Vec<u8>) -> DecodeSeed {
    DecodeSeed {
        shape,
        id,
        payload,
        ..DecodeSeed::default()
    }
}

fn decode_seeds() -> Vec<(String, DecodeSeed)> {
    let (hb, evt, state, cmd) = (0, 1, 2, 3);
    let mut s: Vec<(String, DecodeSeed)> = Vec::new();
    for id in 0..4u8 {
        let name = super::decode::known_id(id);
        s.push((
            format!("hb-id{id}"),
            seed(hb, id, heartbeat(&name).encode_to_vec()),
        ));
    }
    let mut m = heartbeat("");
    m.location = None;
    s.push(("hb-anonymous-no-fix".into(), seed(hb, 0, m.encode_to_vec())));
    s.push((
        "hb-not-worn-zeros".into(),
        seed(
            hb,
            0,
            pb::Heartbeat {
                seq: 1,
                measured_at_ms: BASE_MS,
                battery_pct: 5,
                ..Default::default()
            }
            .encode_to_vec(),
        ),
    ));
    let mut m = heartbeat("d1");
    m.measured_at_ms = BASE_MS + 3 * 3_600_000;
    s.push(("hb-clock-ahead".into(), seed(hb, 0, m.encode_to_vec())));
    m.measured_at_ms = i64::MIN;
    s.push((
        "hb-clock-unrepresentable".into(),
        seed(hb, 0, m.encode_to_vec()),
    ));
    let mut m = heartbeat("d1");
    m.heart_rate_bpm = 400;
    s.push(("hb-hr-out-of-range".into(), seed(hb, 0, m.encode_to_vec())));
    let mut m = heartbeat("d1");
    m.diastolic_mmhg = 130;
    m.systolic_mmhg = 120;
    s.push(("hb-bp-inverted".into(), seed(hb, 0, m.encode_to_vec())));
    let mut m = heartbeat("d1");
    m.location = Some(pb::Location {
        lat_e7: i32::MAX,
        ..location()
    });
    s.push(("hb-off-earth".into(), seed(hb, 0, m.encode_to_vec())));
    let mut m = heartbeat("d1");
    m.seq = u64::MAX;
    s.push(("hb-seq-too-big".into(), seed(hb, 0, m.encode_to_vec())));
    s.push((
        "hb-id-mismatch".into(),
        seed(hb, 0, heartbeat("other").encode_to_vec()),
    ));
    s.push(("hb-malformed".into(), seed(hb, 0, vec![0xff, 0xff, 0xff])));
    s.push(("hb-empty".into(), seed(hb, 0, Vec::new())));
    s.push((
        "hb-oversized".into(),
        seed(hb, 0, heartbeat("d1").encode_to_vec().repeat(80)),
    ));
    s.push((
        "hb-tight-limits".into(),
        DecodeSeed {
            limits: Some((32, 0, 0)),
            ..seed(hb, 0, heartbeat("d1").encode_to_vec())
        },
    ));
    s.push((
        "hb-huge-clock-window".into(),
        DecodeSeed {
            limits: Some((4096, i64::MAX as u64, i64::MAX as u64)),
            ..seed(hb, 0, heartbeat("d1").encode_to_vec())
        },
    ));
    for kind in 0..=9 {
        let m = pb::Event {
            seq: 3,
            occurred_at_ms: BASE_MS - 500,
            kind,
            location: Some(location()),
            battery_pct: 40,
            device_id: "d1".into(),
        };
        s.push((format!("evt-kind{kind}"), seed(evt, 0, m.encode_to_vec())));
    }
    let m = pb::Event {
        seq: 1,
        occurred_at_ms: BASE_MS,
        kind: pb::EventKind::Sos as i32,
        location: Some(pb::Location {
            lat_e7: i32::MAX,
            lon_e7: 0,
            accuracy_m: u32::MAX,
            source: 9,
        }),
        battery_pct: 250,
        device_id: String::new(),
    };
    s.push((
        "evt-sos-garbage-extras".into(),
        seed(evt, 1, m.encode_to_vec()),
    ));
    for online in [true, false] {
        let m = pb::Presence {
            online,
            at_ms: BASE_MS,
        };
        s.push((format!("state-{online}"), seed(state, 2, m.encode_to_vec())));
    }
    s.push(("state-cleared".into(), seed(state, 2, Vec::new())));
    let m = pb::Command {
        id: 5,
        body: Some(pb::command::Body::SosAck(pb::SosAck {
            alert_id: "42".into(),
            text: "help is coming".into(),
        })),
    };
    s.push(("cmd-sos-ack".into(), seed(cmd, 3, m.encode_to_vec())));
    s.push((
        "topic-unknown-leaf".into(),
        DecodeSeed {
            shape: 6,
            extra: b"nonsense".to_vec(),
            ..seed(0, 0, heartbeat("d1").encode_to_vec())
        },
    ));
    s.push((
        "topic-raw-id".into(),
        DecodeSeed {
            raw_id: b"a+b".to_vec(),
            ..seed(hb, 4 + 3, heartbeat("a+b").encode_to_vec())
        },
    ));
    for (i, t) in [
        "sg/v1/dev/d1/hb/x",
        "sg/v2/dev/d1/hb",
        "other",
        "sg/v1/dev//hb",
    ]
    .iter()
    .enumerate()
    {
        s.push((
            format!("topic-raw{i}"),
            DecodeSeed {
                shape: 7,
                extra: t.as_bytes().to_vec(),
                ..seed(0, 0, heartbeat("d1").encode_to_vec())
            },
        ));
    }
    s.push((
        "received-far-off".into(),
        DecodeSeed {
            received_offset_s: i32::MIN,
            ..seed(hb, 0, heartbeat("d1").encode_to_vec())
        },
    ));
    s
}

fn normal() -> Readings {
    Readings {
        heart_rate_bpm: Some(72),
        spo2_pct: Some(97),
        systolic_mmhg: Some(125),
        diastolic_mmhg: Some(80),
        skin_temp_dc: Some(345),
        steps_today: Some(1200),
        battery_pct: Some(80),
        worn: true,
        location: Some(Location {
            lat_e7: 302_740_000,
            lon_e7: 1_201_550_000,
            accuracy_m: 10,
            source: 1,
        }),
    }
}

fn obs(device: u8, delta_s: i32, readings: Readings) -> Step {
    Step::Observe {
        device,
        delta_s,
        at_ms: None,
        day: Some(true),
        readings,
    }
}

fn with(f: impl FnOnce(&mut Readings)) -> Readings {
    let mut r = normal();
    f(&mut r);
    r
}

fn scenario(steps: Vec<Step>) -> RuleInput {
    RuleInput {
        default_thresholds: true,
        utc_offset_hours: 8,
        day_start: 8,
        day_end: 20,
        start_ms: BASE_MS,
        steps,
        ..RuleInput::default()
    }
}

fn rule(name: &str) -> u8 {
    VITAL_RULES.iter().position(|r| *r == name).unwrap_or(0) as u8
}

fn rule_seeds() -> Vec<(&'static str, RuleInput)> {
    let high = || with(|r| r.heart_rate_bpm = Some(142));
    let mut s = Vec::new();
    let mut steps: Vec<Step> = (0..8).map(|_| obs(0, 30, high())).collect();
    steps.push(obs(0, 30, normal()));
    s.push(("hr-high-fires-then-clears", scenario(steps)));
    s.push((
        "short-spike",
        scenario(vec![
            obs(0, 30, high()),
            obs(0, 30, high()),
            obs(0, 30, normal()),
            obs(0, 30, high()),
        ]),
    ));
    s.push((
        "not-measured-gap",
        scenario(vec![
            obs(0, 0, high()),
            obs(0, 60, with(|r| r.heart_rate_bpm = None)),
            obs(0, 70, high()),
        ]),
    ));
    s.push((
        "restore-then-fire",
        scenario(vec![
            Step::Restore {
                device: 1,
                rule: rule("hr_high"),
                since_ms: BASE_MS,
                fired: false,
            },
            obs(1, 125, high()),
        ]),
    ));
    s.push((
        "rearm-fires-again",
        scenario(vec![
            obs(0, 0, high()),
            obs(0, 130, high()),
            Step::Rearm {
                device: 0,
                rule: rule("hr_high"),
            },
            obs(0, 30, high()),
        ]),
    ));
    let mut o = scenario(vec![obs(2, 0, with(|r| r.heart_rate_bpm = Some(110)))]);
    o.overrides.push(Override {
        rule: rule("hr_high"),
        remove: false,
        above: Some(100.0),
        below: None,
        sustain_ms: 0,
    });
    s.push(("override-immediate", o));
    let mut o = scenario((0..4).map(|_| obs(0, 3600, high())).collect());
    o.overrides.push(Override {
        rule: rule("hr_high"),
        remove: false,
        above: Some(100.0),
        below: None,
        sustain_ms: Duration::from_secs(u64::MAX / 1000).as_millis() as u64,
    });
    s.push(("override-sustain-beyond-chrono", o));
    let away = || {
        with(|r| {
            r.location = Some(Location {
                lat_e7: 302_900_000,
                lon_e7: 1_201_500_000,
                accuracy_m: 20,
                source: 1,
            })
        })
    };
    let mut g = scenario(vec![
        obs(0, 0, away()),
        obs(0, 150, away()),
        obs(0, 30, normal()),
    ]);
    g.wander_risk = true;
    g.home = Some((30.274, 120.155, 300.0));
    s.push(("geofence-exit", g));
    s.push((
        "low-battery-hysteresis",
        scenario(
            [10, 12, 20, 29, 31, 10]
                .into_iter()
                .map(|b| obs(0, 60, with(|r| r.battery_pct = Some(b))))
                .collect(),
        ),
    ));
    let off = || with(|r| r.worn = false);
    let mut steps: Vec<Step> = (0..5).map(|_| obs(0, 1800, off())).collect();
    steps.push(Step::Observe {
        device: 0,
        delta_s: 1800,
        at_ms: None,
        day: Some(false),
        readings: off(),
    });
    steps.push(obs(0, 1800, normal()));
    s.push(("not-worn-day-and-night", scenario(steps)));
    s.push((
        "clock-goes-back",
        scenario(vec![
            obs(0, 0, high()),
            obs(0, -600, high()),
            obs(0, 900, high()),
        ]),
    ));
    s.push((
        "interleaved-devices",
        scenario(
            (0..12)
                .map(|i| obs(i % 3, 20, if i % 2 == 0 { high() } else { normal() }))
                .collect(),
        ),
    ));
    let mut steps: Vec<Step> = (0..30)
        .map(|_| Step::Observe {
            device: 0,
            delta_s: 600,
            at_ms: None,
            day: None,
            readings: off(),
        })
        .collect();
    steps.push(obs(0, 60, with(|r| r.spo2_pct = Some(85))));
    s.push(("is-day-window", scenario(steps)));
    s.push((
        "extreme-times",
        scenario(vec![
            Step::Observe {
                device: 0,
                delta_s: 0,
                at_ms: Some(DateTime::<Utc>::MAX_UTC.timestamp_millis()),
                day: None,
                readings: high(),
            },
            obs(0, i32::MAX, high()),
            Step::Observe {
                device: 0,
                delta_s: 0,
                at_ms: Some(DateTime::<Utc>::MIN_UTC.timestamp_millis()),
                day: None,
                readings: high(),
            },
            obs(0, i32::MIN, high()),
        ]),
    ));
    let mut e = scenario(vec![obs(0, 0, high())]);
    e.default_thresholds = false;
    s.push(("no-thresholds", e));
    s
}
