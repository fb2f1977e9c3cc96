//! Rules over telemetry, evaluated as each heartbeat arrives: pure state machines, no IO.
//!
//! A rule fires when its condition has held continuously for its `sustain` time and clears
//! on the first reading where it no longer holds (readings that did not measure the value,
//! e.g. a bracelet off the wrist, neither extend nor break a condition). The start time of
//! every condition in progress is reported so the caller can persist it: a restart must not
//! forget a condition nor restart its clock.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use chrono::{DateTime, Timelike, Utc};
use serde::Deserialize;

use crate::validate::Heartbeat;

/// A vital-sign rule: a bound and how long it must hold (`alerts.thresholds.*` and
/// `elders.thresholds`).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Threshold {
    #[serde(default)]
    pub above: Option<f64>,
    #[serde(default)]
    pub below: Option<f64>,
    #[serde(rename = "for", with = "humantime_serde")]
    pub sustain: Duration,
}

/// Defaults for elders (older hearts run slower; fever thresholds use skin temperature,
/// which reads lower than core temperature).
pub fn default_thresholds() -> BTreeMap<String, Threshold> {
    let t = |above: Option<f64>, below: Option<f64>, secs: u64| Threshold {
        above,
        below,
        sustain: Duration::from_secs(secs),
    };
    BTreeMap::from([
        ("hr_high".into(), t(Some(130.0), None, 120)),
        ("hr_low".into(), t(None, Some(45.0), 120)),
        ("spo2_low".into(), t(None, Some(90.0), 120)),
        ("temp_high".into(), t(Some(37.8), None, 300)),
        ("bp_high".into(), t(Some(180.0), None, 300)),
        ("low_battery".into(), t(None, Some(15.0), 0)),
        ("not_worn".into(), t(None, None, 2 * 3600)),
        ("geofence_exit".into(), t(None, None, 120)),
    ])
}

/// The rules this module evaluates (names as in `alerts.thresholds`, and alert kinds).
pub const VITAL_RULES: [&str; 8] = [
    "hr_high",
    "hr_low",
    "spo2_low",
    "temp_high",
    "bp_high",
    "low_battery",
    "not_worn",
    "geofence_exit",
];

/// What a rule needs to know about the elder wearing the device.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ElderContext {
    pub elder_id: Option<i64>,
    /// Fleet defaults merged with the elder's overrides.
    pub thresholds: BTreeMap<String, Threshold>,
    pub home: Option<(f64, f64, f64)>, // lat, lon, radius m
    pub wander_risk: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    /// The condition began (persist `since`).
    Started {
        rule: &'static str,
        since: DateTime<Utc>,
    },
    /// The condition has held long enough: raise the alert.
    Fire {
        rule: &'static str,
        since: DateTime<Utc>,
        value: f64,
    },
    /// The condition no longer holds (forget `since`; auto-resolve the alert).
    Cleared { rule: &'static str },
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Condition {
    since: DateTime<Utc>,
    fired: bool,
}

/// The conditions in progress of one device, one slot per rule (indexed as `VITAL_RULES`).
type Slots = [Option<Condition>; VITAL_RULES.len()];

fn rule_index(rule: &str) -> Option<usize> {
    VITAL_RULES.iter().position(|r| *r == rule)
}

/// Per-device state of every rule. Keyed by device only, so a heartbeat costs one lookup and
/// no allocation unless a condition starts or ends.
#[derive(Debug, Default)]
pub struct Evaluator {
    state: HashMap<String, Slots>,
}

/// Great-circle distance in metres.
pub fn distance_m(a: (f64, f64), b: (f64, f64)) -> f64 {
    let r = 6_371_000.0_f64;
    let (la1, la2) = (a.0.to_radians(), b.0.to_radians());
    let dla = la2 - la1;
    let dlo = (b.1 - a.1).to_radians();
    let h = (dla / 2.0).sin().powi(2) + la1.cos() * la2.cos() * (dlo / 2.0).sin().powi(2);
    2.0 * r * h.sqrt().asin()
}

impl Evaluator {
    /// Restores a condition in progress (from `rule_state`). It counts as already fired when
    /// it has held long enough: the alert it raised is still open, or will repeat harmlessly.
    pub fn restore(&mut self, device_id: &str, rule: &str, since: DateTime<Utc>, fired: bool) {
        if let Some(i) = rule_index(rule) {
            self.state.entry(device_id.to_string()).or_default()[i] =
                Some(Condition { since, fired });
        }
    }

    /// A firing that could not be stored: let the next reading fire again.
    pub fn rearm(&mut self, device_id: &str, rule: &str) {
        if let (Some(i), Some(slots)) = (rule_index(rule), self.state.get_mut(device_id)) {
            if let Some(c) = &mut slots[i] {
                c.fired = false;
            }
        }
    }

    pub fn in_progress(&self) -> usize {
        self.state.values().flatten().flatten().count()
    }

    /// The condition in progress of one device's rule: since when, and whether it fired.
    pub fn condition(&self, device_id: &str, rule: &str) -> Option<(DateTime<Utc>, bool)> {
        let c = self.state.get(device_id)?[rule_index(rule)?]?;
        Some((c.since, c.fired))
    }

    /// Devices holding state; a device with nothing in progress holds none, so this stays
    /// bounded by what is in progress, not by the fleet.
    pub fn tracked_devices(&self) -> usize {
        self.state.len()
    }

    /// Evaluates one heartbeat. `day` says whether the reading falls in local daytime (the
    /// not-worn rule only runs by day).
    pub fn observe(&mut self, hb: &Heartbeat, ctx: &ElderContext, day: bool) -> Vec<Transition> {
        let mut out = Vec::new();
        let before: Slots = self.state.get(&hb.device_id).copied().unwrap_or_default();
        let mut slots = before;
        for (i, rule) in VITAL_RULES.into_iter().enumerate() {
            let Some(t) = ctx.thresholds.get(rule) else {
                continue;
            };
            // Some(true/false): the reading says whether the condition holds; None: unknown.
            let reading: Option<(bool, f64)> = match rule {
                "hr_high" | "hr_low" => hb.heart_rate_bpm.map(|v| (bound(t, v as f64), v as f64)),
                "spo2_low" => hb.spo2_pct.map(|v| (bound(t, v as f64), v as f64)),
                "temp_high" => hb
                    .skin_temp_dc
                    .map(|v| (bound(t, v as f64 / 10.0), v as f64 / 10.0)),
                "bp_high" => hb.systolic_mmhg.map(|v| (bound(t, v as f64), v as f64)),
                "low_battery" => hb.battery_pct.map(|v| {
                    // Hysteresis: once low, it clears only when clearly charging (+15).
                    let low = bound(t, v as f64);
                    let firing = slots[i].is_some();
                    let clears_above = t.below.unwrap_or(15.0) + 15.0;
                    (low || (firing && (v as f64) < clears_above), v as f64)
                }),
                "not_worn" => {
                    if day {
                        Some((!hb.worn, 0.0))
                    } else if hb.worn {
                        Some((false, 0.0))
                    } else {
                        None // night: taking it off to charge is normal; keep the clock
                    }
                }
                "geofence_exit" => match (ctx.wander_risk, ctx.home, hb.location) {
                    (true, Some((lat, lon, radius)), Some(l)) => {
                        let here = (l.lat_e7 as f64 / 1e7, l.lon_e7 as f64 / 1e7);
                        let d = distance_m((lat, lon), here);
                        // Add the fix's own uncertainty, so a poor fix does not fire.
                        Some((d > radius + l.accuracy_m as f64, d))
                    }
                    _ => None,
                },
                _ => None,
            };
            match reading {
                None => {}
                Some((true, value)) => {
                    let cond = slots[i].get_or_insert_with(|| {
                        out.push(Transition::Started { rule, since: hb.ts });
                        Condition {
                            since: hb.ts,
                            fired: false,
                        }
                    });
                    // A sustain beyond chrono's range is never reached (it used to fall
                    // back to zero and fire at once).
                    let held_long_enough = chrono::TimeDelta::from_std(t.sustain)
                        .is_ok_and(|sustain| hb.ts - cond.since >= sustain);
                    if !cond.fired && held_long_enough {
                        cond.fired = true;
                        out.push(Transition::Fire {
                            rule,
                            since: cond.since,
                            value,
                        });
                    }
                }
                Some((false, _)) if slots[i].take().is_some() => {
                    out.push(Transition::Cleared { rule });
                }
                Some((false, _)) => {}
            }
        }
        if slots != before {
            if slots.iter().all(Option::is_none) {
                self.state.remove(&hb.device_id);
            } else if let Some(stored) = self.state.get_mut(&hb.device_id) {
                *stored = slots;
            } else {
                self.state.insert(hb.device_id.clone(), slots);
            }
        }
        out
    }
}

fn bound(t: &Threshold, v: f64) -> bool {
    t.above.is_some_and(|a| v > a) || t.below.is_some_and(|b| v < b)
}

/// Whether a UTC instant is local daytime.
pub fn is_day(at: DateTime<Utc>, utc_offset_hours: i32, start: u32, end: u32) -> bool {
    // Hour arithmetic rather than `at + offset`, which panics at the ends of chrono's range.
    let h = (i64::from(at.hour()) + i64::from(utc_offset_hours)).rem_euclid(24) as u32;
    h >= start && h < end
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::Location;

    fn hb(device: &str, secs: i64, hr: i16) -> Heartbeat {
        let ts = DateTime::<Utc>::from_timestamp(1_790_000_000 + secs, 0).unwrap();
        Heartbeat {
            device_id: device.into(),
            seq: secs,
            ts,
            received_at: ts,
            heart_rate_bpm: Some(hr),
            spo2_pct: Some(97),
            systolic_mmhg: Some(120),
            diastolic_mmhg: Some(80),
            skin_temp_dc: Some(345),
            steps_today: Some(10),
            battery_pct: Some(80),
            worn: true,
            location: None,
            clock_skewed: false,
            device_ts: None,
        }
    }

    fn ctx() -> ElderContext {
        ElderContext {
            elder_id: Some(1),
            thresholds: default_thresholds(),
            home: None,
            wander_risk: false,
        }
    }

    #[test]
    fn sustained_high_heart_rate_fires_once_then_clears() {
        let mut e = Evaluator::default();
        let c = ctx();
        let mut fired = 0;
        for s in (0..=300).step_by(30) {
            for t in e.observe(&hb("d", s, 142), &c, true) {
                if let Transition::Fire {
                    rule: "hr_high",
                    since,
                    value,
                } = t
                {
                    assert_eq!(since, hb("d", 0, 0).ts);
                    assert_eq!(value, 142.0);
                    assert!(s >= 120);
                    fired += 1;
                }
            }
        }
        assert_eq!(fired, 1);
        let t = e.observe(&hb("d", 330, 80), &c, true);
        assert!(t.contains(&Transition::Cleared { rule: "hr_high" }));
        // Nothing in progress: the device holds no state at all.
        assert_eq!(e.in_progress(), 0);
        assert!(e.state.is_empty());
    }

    #[test]
    fn a_short_spike_does_not_fire() {
        let mut e = Evaluator::default();
        let c = ctx();
        for s in [0, 30, 60] {
            assert!(!e
                .observe(&hb("d", s, 150), &c, true)
                .iter()
                .any(|t| matches!(t, Transition::Fire { .. })));
        }
        e.observe(&hb("d", 90, 70), &c, true);
        for s in [120, 150] {
            assert!(!e
                .observe(&hb("d", s, 150), &c, true)
                .iter()
                .any(|t| matches!(t, Transition::Fire { .. })));
        }
    }

    #[test]
    fn not_measured_neither_extends_nor_breaks() {
        let mut e = Evaluator::default();
        let c = ctx();
        e.observe(&hb("d", 0, 140), &c, true);
        let mut off = hb("d", 60, 0);
        off.heart_rate_bpm = None;
        assert!(!e
            .observe(&off, &c, true)
            .iter()
            .any(|t| matches!(t, Transition::Cleared { rule: "hr_high" })));
        assert!(e
            .observe(&hb("d", 130, 140), &c, true)
            .iter()
            .any(|t| matches!(
                t,
                Transition::Fire {
                    rule: "hr_high",
                    ..
                }
            )));
    }

    #[test]
    fn restored_condition_keeps_its_clock() {
        let mut e = Evaluator::default();
        e.restore("d", "hr_high", hb("d", 0, 0).ts, false);
        assert!(e
            .observe(&hb("d", 125, 140), &ctx(), true)
            .iter()
            .any(|t| matches!(
                t,
                Transition::Fire {
                    rule: "hr_high",
                    ..
                }
            )));
    }

    #[test]
    fn per_elder_override() {
        let mut c = ctx();
        c.thresholds.insert(
            "hr_high".into(),
            Threshold {
                above: Some(100.0),
                below: None,
                sustain: std::time::Duration::from_secs(0),
            },
        );
        let mut e = Evaluator::default();
        assert!(e
            .observe(&hb("d", 0, 110), &c, true)
            .iter()
            .any(|t| matches!(
                t,
                Transition::Fire {
                    rule: "hr_high",
                    ..
                }
            )));
    }

    #[test]
    fn a_sustain_beyond_chronos_range_never_fires() {
        // Found by the rule_eval fuzz target: the conversion failed and fell back to zero.
        let mut c = ctx();
        c.thresholds.insert(
            "hr_high".into(),
            Threshold {
                above: Some(100.0),
                below: None,
                sustain: std::time::Duration::from_secs(u64::MAX),
            },
        );
        let mut e = Evaluator::default();
        for s in [0, 3600, 10 * 365 * 86_400] {
            let t = e.observe(&hb("d", s, 150), &c, true);
            assert!(
                !t.iter().any(|t| matches!(t, Transition::Fire { .. })),
                "{t:?}"
            );
        }
        assert_eq!(e.condition("d", "hr_high"), Some((hb("d", 0, 0).ts, false)));
    }

    #[test]
    fn geofence_only_for_wander_risk() {
        let mut c = ctx();
        c.home = Some((30.27, 120.15, 300.0));
        let mut far = hb("d", 0, 70);
        far.location = Some(Location {
            lat_e7: 302_900_000,
            lon_e7: 1_201_500_000,
            accuracy_m: 20,
            source: 1,
        });
        let mut e = Evaluator::default();
        assert!(e.observe(&far, &c, true).is_empty());
        c.wander_risk = true;
        let mut later = far.clone();
        later.ts += chrono::TimeDelta::seconds(150);
        e.observe(&far, &c, true);
        assert!(e.observe(&later, &c, true).iter().any(|t| matches!(
            t,
            Transition::Fire {
                rule: "geofence_exit",
                ..
            }
        )));
    }

    #[test]
    fn is_day_in_local_time_and_at_the_ends_of_time() {
        let at = DateTime::<Utc>::from_timestamp(1_790_000_000, 0).unwrap(); // 14:13 UTC
        assert!(is_day(at, 0, 8, 20));
        assert!(!is_day(at, 8, 8, 20)); // 22:13 in China
        assert!(is_day(at, -12, 0, 3)); // 02:13
                                        // Found by the rule_eval fuzz target: these overflowed `at + offset` and panicked.
                                        // MAX_UTC is 23:59 UTC, 13:59 at +14; MIN_UTC is 00:00 UTC, 12:00 at -12.
        assert!(is_day(DateTime::<Utc>::MAX_UTC, 14, 8, 20));
        assert!(is_day(DateTime::<Utc>::MIN_UTC, -12, 8, 20));
        assert!(!is_day(DateTime::<Utc>::MAX_UTC, 0, 8, 20));
    }

    #[test]
    fn distance() {
        let d = distance_m((30.27, 120.15), (30.28, 120.15));
        assert!((d - 1112.0).abs() < 5.0, "{d}");
    }
}
