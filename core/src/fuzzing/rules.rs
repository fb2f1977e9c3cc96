//! Target `rule_eval`: a stream of heartbeats, restores and re-arms for a few devices through
//! [`rules::Evaluator`], checked step by step against an independent model of the contract in
//! the rules module's doc: a condition starts on the first reading where it holds, fires
//! once it has held for `sustain`, clears on the first reading where it does not hold, and
//! readings that did not measure it change nothing.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};

use super::bytes::{Reader, Writer};
use crate::rules::{self, ElderContext, Evaluator, Threshold, Transition, VITAL_RULES};
use crate::validate::{Heartbeat, Location};

/// Devices an input can address: few, so streams interleave on the same state.
pub const DEVICES: u8 = 3;
const MAX_STEPS: usize = 512;

fn device_name(d: u8) -> String {
    format!("dev-{}", d % DEVICES)
}

/// A rule name by selector: the real rules, and one the evaluator does not know.
fn rule_name(sel: u8) -> &'static str {
    VITAL_RULES
        .get(sel as usize % (VITAL_RULES.len() + 1))
        .copied()
        .unwrap_or("no_such_rule")
}

#[derive(Debug, Clone, Default)]
pub struct Readings {
    pub heart_rate_bpm: Option<i16>,
    pub spo2_pct: Option<i16>,
    pub systolic_mmhg: Option<i16>,
    pub diastolic_mmhg: Option<i16>,
    pub skin_temp_dc: Option<i16>,
    pub steps_today: Option<i32>,
    pub battery_pct: Option<i16>,
    pub worn: bool,
    pub location: Option<Location>,
}

#[derive(Debug, Clone)]
pub enum Step {
    /// A heartbeat `delta_s` after the previous one (negative: the clock went back), or at
    /// `at_ms` when given. `day`: None lets `rules::is_day` decide with the input's window.
    Observe {
        device: u8,
        delta_s: i32,
        at_ms: Option<i64>,
        day: Option<bool>,
        readings: Readings,
    },
    Rearm {
        device: u8,
        rule: u8,
    },
    Restore {
        device: u8,
        rule: u8,
        since_ms: i64,
        fired: bool,
    },
}

/// One threshold change applied over the starting set: `rule` selects as `rule_name`.
#[derive(Debug, Clone)]
pub struct Override {
    pub rule: u8,
    pub remove: bool,
    pub above: Option<f64>,
    pub below: Option<f64>,
    pub sustain_ms: u64,
}

#[derive(Debug, Clone, Default)]
pub struct RuleInput {
    pub default_thresholds: bool,
    pub overrides: Vec<Override>,
    pub wander_risk: bool,
    pub home: Option<(f64, f64, f64)>,
    pub utc_offset_hours: i8,
    pub day_start: u8,
    pub day_end: u8,
    pub start_ms: i64,
    pub steps: Vec<Step>,
}

const OPT_HR: u8 = 1;
const OPT_SPO2: u8 = 2;
const OPT_SYS: u8 = 4;
const OPT_DIA: u8 = 8;
const OPT_TEMP: u8 = 16;
const OPT_STEPS: u8 = 32;
const OPT_BATTERY: u8 = 64;
const OPT_LOCATION: u8 = 128;

impl RuleInput {
    pub fn parse(data: &[u8]) -> RuleInput {
        let mut r = Reader::new(data);
        let flags = r.u8();
        let mut input = RuleInput {
            default_thresholds: flags & 1 != 0,
            wander_risk: flags & 2 != 0,
            ..RuleInput::default()
        };
        for _ in 0..r.u8() % 10 {
            let rule = r.u8();
            let f = r.u8();
            let (above, below, sustain_ms) = (r.f64(), r.f64(), r.u64());
            input.overrides.push(Override {
                rule,
                remove: f & 4 != 0,
                above: (f & 1 != 0).then_some(above),
                below: (f & 2 != 0).then_some(below),
                sustain_ms,
            });
        }
        if flags & 4 != 0 {
            input.home = Some((r.f64(), r.f64(), r.f64()));
        }
        input.utc_offset_hours = r.u8() as i8;
        input.day_start = r.u8();
        input.day_end = r.u8();
        input.start_ms = r.i64();
        while !r.is_empty() && input.steps.len() < MAX_STEPS {
            let op = r.u8() % 8;
            let device = r.u8();
            let step = match op {
                5 => Step::Rearm {
                    device,
                    rule: r.u8(),
                },
                6 => Step::Restore {
                    device,
                    rule: r.u8(),
                    since_ms: r.i64(),
                    fired: r.u8() & 1 != 0,
                },
                _ => {
                    let delta_s = r.i32();
                    let at_ms = (op == 7).then(|| r.i64());
                    let f = r.u8();
                    let opt = r.u8();
                    let v = |bit: u8, x: i16| (opt & bit != 0).then_some(x);
                    let readings = Readings {
                        heart_rate_bpm: v(OPT_HR, r.i16()),
                        spo2_pct: v(OPT_SPO2, r.i16()),
                        systolic_mmhg: v(OPT_SYS, r.i16()),
                        diastolic_mmhg: v(OPT_DIA, r.i16()),
                        skin_temp_dc: v(OPT_TEMP, r.i16()),
                        battery_pct: v(OPT_BATTERY, r.i16()),
                        steps_today: (opt & OPT_STEPS != 0).then_some(r.i32()),
                        worn: f & 1 != 0,
                        location: (opt & OPT_LOCATION != 0).then(|| Location {
                            lat_e7: r.i32(),
                            lon_e7: r.i32(),
                            accuracy_m: r.i32(),
                            source: r.i16(),
                        }),
                    };
                    Step::Observe {
                        device,
                        delta_s,
                        at_ms,
                        day: (f & 2 != 0).then_some(f & 4 != 0),
                        readings,
                    }
                }
            };
            input.steps.push(step);
        }
        input
    }

    /// The inverse of [`RuleInput::parse`], for seeds. Every optional reading is written,
    /// present or not, so a mutation that flips a presence bit keeps the layout.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(self.default_thresholds as u8
            | (self.wander_risk as u8) << 1
            | (self.home.is_some() as u8) << 2);
        w.u8(self.overrides.len() as u8);
        for o in &self.overrides {
            w.u8(o.rule)
                .u8(o.above.is_some() as u8
                    | (o.below.is_some() as u8) << 1
                    | (o.remove as u8) << 2)
                .f64(o.above.unwrap_or(0.0))
                .f64(o.below.unwrap_or(0.0))
                .u64(o.sustain_ms);
        }
        if let Some((a, b, c)) = self.home {
            w.f64(a).f64(b).f64(c);
        }
        w.u8(self.utc_offset_hours as u8)
            .u8(self.day_start)
            .u8(self.day_end)
            .i64(self.start_ms);
        for s in &self.steps {
            match s {
                Step::Rearm { device, rule } => {
                    w.u8(5).u8(*device).u8(*rule);
                }
                Step::Restore {
                    device,
                    rule,
                    since_ms,
                    fired,
                } => {
                    w.u8(6)
                        .u8(*device)
                        .u8(*rule)
                        .i64(*since_ms)
                        .u8(*fired as u8);
                }
                Step::Observe {
                    device,
                    delta_s,
                    at_ms,
                    day,
                    readings: x,
                } => {
                    w.u8(if at_ms.is_some() { 7 } else { 0 })
                        .u8(*device)
                        .i32(*delta_s);
                    if let Some(at) = at_ms {
                        w.i64(*at);
                    }
                    w.u8(x.worn as u8
                        | (day.is_some() as u8) << 1
                        | (day.unwrap_or(false) as u8) << 2);
                    let bit = |b: u8, present: bool| if present { b } else { 0 };
                    w.u8(bit(OPT_HR, x.heart_rate_bpm.is_some())
                        | bit(OPT_SPO2, x.spo2_pct.is_some())
                        | bit(OPT_SYS, x.systolic_mmhg.is_some())
                        | bit(OPT_DIA, x.diastolic_mmhg.is_some())
                        | bit(OPT_TEMP, x.skin_temp_dc.is_some())
                        | bit(OPT_STEPS, x.steps_today.is_some())
                        | bit(OPT_BATTERY, x.battery_pct.is_some())
                        | bit(OPT_LOCATION, x.location.is_some()));
                    for v in [
                        x.heart_rate_bpm,
                        x.spo2_pct,
                        x.systolic_mmhg,
                        x.diastolic_mmhg,
                        x.skin_temp_dc,
                        x.battery_pct,
                    ] {
                        w.i16(v.unwrap_or(0));
                    }
                    if let Some(s) = x.steps_today {
                        w.i32(s);
                    }
                    if let Some(l) = x.location {
                        w.i32(l.lat_e7)
                            .i32(l.lon_e7)
                            .i32(l.accuracy_m)
                            .i16(l.source);
                    }
                }
            }
        }
        w.out
    }

    fn context(&self) -> ElderContext {
        let mut thresholds = if self.default_thresholds {
            rules::default_thresholds()
        } else {
            BTreeMap::new()
        };
        for o in &self.overrides {
            let name = rule_name(o.rule).to_string();
            if o.remove {
                thresholds.remove(&name);
            } else {
                thresholds.insert(
                    name,
                    Threshold {
                        above: o.above,
                        below: o.below,
                        sustain: Duration::from_millis(o.sustain_ms),
                    },
                );
            }
        }
        ElderContext {
            elder_id: Some(1),
            thresholds,
            home: self.home,
            wander_risk: self.wander_risk,
        }
    }
}

/// The fuzz target's body.
pub fn check_rule_eval(data: &[u8]) {
    run(&RuleInput::parse(data));
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Cond {
    since: DateTime<Utc>,
    fired: bool,
}

fn bound(t: &Threshold, v: f64) -> bool {
    matches!(t.above, Some(a) if v > a) || matches!(t.below, Some(b) if v < b)
}

/// Whether `rule`'s condition holds for this reading (None: the reading does not tell).
fn holds(
    rule: &str,
    t: &Threshold,
    hb: &Heartbeat,
    ctx: &ElderContext,
    day: bool,
    in_progress: bool,
) -> Option<(bool, f64)> {
    let simple = |v: Option<f64>| v.map(|v| (bound(t, v), v));
    match rule {
        "hr_high" | "hr_low" => simple(hb.heart_rate_bpm.map(f64::from)),
        "spo2_low" => simple(hb.spo2_pct.map(f64::from)),
        "temp_high" => simple(hb.skin_temp_dc.map(|v| f64::from(v) / 10.0)),
        "bp_high" => simple(hb.systolic_mmhg.map(f64::from)),
        "low_battery" => hb.battery_pct.map(|v| {
            let v = f64::from(v);
            let release = t.below.unwrap_or(15.0) + 15.0;
            (bound(t, v) || (in_progress && v < release), v)
        }),
        "not_worn" if day => Some((!hb.worn, 0.0)),
        "not_worn" => hb.worn.then_some((false, 0.0)),
        "geofence_exit" => match (ctx.wander_risk, ctx.home, hb.location) {
            (true, Some((lat, lon, radius)), Some(l)) => {
                let here = (f64::from(l.lat_e7) / 1e7, f64::from(l.lon_e7) / 1e7);
                let d = rules::distance_m((lat, lon), here);
                if [lat, lon, here.0, here.1].iter().all(|x| x.abs() <= 400.0) {
                    assert!(
                        (0.0..=20_100_000.0).contains(&d),
                        "distance {d} m from {:?} to {here:?}",
                        (lat, lon)
                    );
                }
                Some((d > radius + f64::from(l.accuracy_m), d))
            }
            _ => None,
        },
        _ => unreachable!("{rule}"),
    }
}

/// Runs the input, checking each step against the model; panics on any difference.
pub fn run(input: &RuleInput) {
    let ctx = input.context();
    let mut ev = Evaluator::default();
    let mut model: HashMap<(String, &'static str), Cond> = HashMap::new();
    let epoch = DateTime::<Utc>::UNIX_EPOCH;
    let mut now = DateTime::<Utc>::from_timestamp_millis(input.start_ms).unwrap_or(epoch);
    let mut seq = 0;
    for step in &input.steps {
        match step {
            Step::Rearm { device, rule } => {
                let (d, r) = (device_name(*device), rule_name(*rule));
                ev.rearm(&d, r);
                if let Some(c) = model.get_mut(&(d, r)) {
                    c.fired = false;
                }
            }
            Step::Restore {
                device,
                rule,
                since_ms,
                fired,
            } => {
                let (d, r) = (device_name(*device), rule_name(*rule));
                let since = DateTime::<Utc>::from_timestamp_millis(*since_ms).unwrap_or(epoch);
                ev.restore(&d, r, since, *fired);
                if r != "no_such_rule" {
                    model.insert(
                        (d, r),
                        Cond {
                            since,
                            fired: *fired,
                        },
                    );
                }
            }
            Step::Observe {
                device,
                delta_s,
                at_ms,
                day,
                readings: x,
            } => {
                now = match at_ms {
                    Some(ms) => DateTime::<Utc>::from_timestamp_millis(*ms).unwrap_or(now),
                    None => {
                        let d = TimeDelta::seconds(i64::from(*delta_s));
                        now.checked_add_signed(d)
                            .unwrap_or(if d < TimeDelta::zero() {
                                DateTime::<Utc>::MIN_UTC
                            } else {
                                DateTime::<Utc>::MAX_UTC
                            })
                    }
                };
                seq += 1;
                let hb = Heartbeat {
                    device_id: device_name(*device),
                    seq,
                    ts: now,
                    received_at: now,
                    heart_rate_bpm: x.heart_rate_bpm,
                    spo2_pct: x.spo2_pct,
                    systolic_mmhg: x.systolic_mmhg,
                    diastolic_mmhg: x.diastolic_mmhg,
                    skin_temp_dc: x.skin_temp_dc,
                    steps_today: x.steps_today,
                    battery_pct: x.battery_pct,
                    worn: x.worn,
                    location: x.location,
                    clock_skewed: false,
                    device_ts: None,
                };
                let day = day.unwrap_or_else(|| {
                    rules::is_day(
                        now,
                        i32::from(input.utc_offset_hours),
                        u32::from(input.day_start),
                        u32::from(input.day_end),
                    )
                });
                let got = ev.observe(&hb, &ctx, day);
                let want = expected(&mut model, &hb, &ctx, day);
                assert_eq!(got, want, "transitions for {hb:?} (day {day})");
            }
        }
        // The evaluator holds exactly the model's conditions, and nothing for a device
        // without one (state stays bounded by what is in progress).
        assert_eq!(ev.in_progress(), model.len());
        let devices: std::collections::HashSet<&String> = model.keys().map(|(d, _)| d).collect();
        assert_eq!(ev.tracked_devices(), devices.len());
        for d in 0..DEVICES {
            let d = device_name(d);
            for r in VITAL_RULES {
                let want = model.get(&(d.clone(), r)).map(|c| (c.since, c.fired));
                assert_eq!(ev.condition(&d, r), want, "{d} {r}");
            }
        }
    }
}

/// The transitions one heartbeat must cause, in rule order; updates the model.
fn expected(
    model: &mut HashMap<(String, &'static str), Cond>,
    hb: &Heartbeat,
    ctx: &ElderContext,
    day: bool,
) -> Vec<Transition> {
    let mut out = Vec::new();
    for rule in VITAL_RULES {
        let Some(t) = ctx.thresholds.get(rule) else {
            continue;
        };
        let key = (hb.device_id.clone(), rule);
        let before = model.get(&key).copied();
        match holds(rule, t, hb, ctx, day, before.is_some()) {
            None => {}
            Some((false, _)) if model.remove(&key).is_some() => {
                out.push(Transition::Cleared { rule });
            }
            Some((false, _)) => {}
            Some((true, value)) => {
                let mut c = before.unwrap_or_else(|| {
                    out.push(Transition::Started { rule, since: hb.ts });
                    Cond {
                        since: hb.ts,
                        fired: false,
                    }
                });
                // A sustain too long for chrono is never reached.
                let long_enough = TimeDelta::from_std(t.sustain)
                    .is_ok_and(|sustain| hb.ts.signed_duration_since(c.since) >= sustain);
                if !c.fired && long_enough {
                    c.fired = true;
                    out.push(Transition::Fire {
                        rule,
                        since: c.since,
                        value,
                    });
                }
                model.insert(key, c);
            }
        }
    }
    out
}
