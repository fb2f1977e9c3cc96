//! What each simulated bracelet does besides its heartbeats.
//!
//! A [`Scenario`] is one behaviour (an SOS press, a fall, a fever, a bracelet that goes
//! silent, a bracelet that sends garbage). A [`ScenarioMix`] says how a fleet is split
//! between scenarios, either by weights (`normal=90,sos=5,fall=5`) or as an explicit list per
//! device; [`ScenarioMix::assign`] turns it into one scenario per device, deterministically.
//! A [`Script`] is the per-device state machine the fleet runner consults around each
//! heartbeat.
//!
//! Timing is counted in heartbeats, not seconds, and clipped to the run's `count`, so a short
//! test run still sees every scripted event exactly once: an `sos` device with `count = 2`
//! presses SOS after its second heartbeat rather than never.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use silverguard_proto::v1::EventKind;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::malformed::BadClass;
use crate::physiology::{mix_seed, Body, Vitals};
use crate::SimError;

/// One bracelet behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scenario {
    /// A healthy elder: plausible vitals, off-wrist spells (WORN_OFF / WORN_ON events).
    Normal,
    /// Presses SOS after ~3 heartbeats.
    Sos,
    /// Falls (FALL event) after ~3 heartbeats.
    Fall,
    /// Falls, then cancels (SOS_CANCEL) ~5 s later: "I'm fine".
    FallThenCancel,
    /// Heart rate 140-160 bpm, sustained.
    Tachycardia,
    /// Heart rate 38-45 bpm, sustained.
    Bradycardia,
    /// SpO2 85-88 %, sustained.
    Hypoxia,
    /// Skin temperature 38.5-39.5 °C, sustained.
    Fever,
    /// Stops after ~3 heartbeats without a clean disconnect, so the broker fires the Last Will.
    GoesSilent,
    /// Battery falls below 10 % within ~6 heartbeats and a LOW_BATTERY event is sent.
    LowBattery,
    /// Good heartbeats plus one bad message after each, rotating through [`BadClass::ALL`].
    Malformed,
    /// Requests a non-emergency service (SERVICE_CALL) after ~3 heartbeats.
    ServiceCall,
}

impl Scenario {
    pub const ALL: [Scenario; 12] = [
        Scenario::Normal,
        Scenario::Sos,
        Scenario::Fall,
        Scenario::FallThenCancel,
        Scenario::Tachycardia,
        Scenario::Bradycardia,
        Scenario::Hypoxia,
        Scenario::Fever,
        Scenario::GoesSilent,
        Scenario::LowBattery,
        Scenario::Malformed,
        Scenario::ServiceCall,
    ];

    /// The name used in mix strings and reports.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Normal => "normal",
            Scenario::Sos => "sos",
            Scenario::Fall => "fall",
            Scenario::FallThenCancel => "fall-then-cancel",
            Scenario::Tachycardia => "tachycardia",
            Scenario::Bradycardia => "bradycardia",
            Scenario::Hypoxia => "hypoxia",
            Scenario::Fever => "fever",
            Scenario::GoesSilent => "goes-silent",
            Scenario::LowBattery => "low-battery",
            Scenario::Malformed => "malformed",
            Scenario::ServiceCall => "service-call",
        }
    }

    /// Scenarios about vitals keep the bracelet on the wrist so every heartbeat measures.
    fn keeps_bracelet_on(self) -> bool {
        matches!(
            self,
            Scenario::Tachycardia
                | Scenario::Bradycardia
                | Scenario::Hypoxia
                | Scenario::Fever
                | Scenario::LowBattery
        )
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Scenario {
    type Err = SimError;
    fn from_str(s: &str) -> Result<Self, SimError> {
        let wanted = s.trim().to_ascii_lowercase().replace('_', "-");
        Scenario::ALL
            .into_iter()
            .find(|sc| sc.name() == wanted)
            .ok_or_else(|| {
                let names: Vec<_> = Scenario::ALL.iter().map(|s| s.name()).collect();
                SimError::InvalidScenario(format!(
                    "unknown scenario {s:?} (known: {})",
                    names.join(", ")
                ))
            })
    }
}

/// How a fleet is split between scenarios.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScenarioMix {
    /// Relative weights; the split is exact up to rounding (largest remainder) and which
    /// device gets which scenario is a seeded shuffle.
    Weighted(Vec<(Scenario, u32)>),
    /// Device `i` plays `list[i % list.len()]`.
    PerDevice(Vec<Scenario>),
}

impl Default for ScenarioMix {
    fn default() -> Self {
        ScenarioMix::single(Scenario::Normal)
    }
}

impl ScenarioMix {
    /// Every device plays `s`.
    pub fn single(s: Scenario) -> ScenarioMix {
        ScenarioMix::Weighted(vec![(s, 1)])
    }

    /// One scenario per device, the same for the same `(mix, devices, seed)`.
    pub fn assign(&self, devices: usize, seed: u64) -> Vec<Scenario> {
        match self {
            ScenarioMix::PerDevice(list) if list.is_empty() => vec![Scenario::Normal; devices],
            ScenarioMix::PerDevice(list) => (0..devices).map(|i| list[i % list.len()]).collect(),
            ScenarioMix::Weighted(weights) => {
                let total: u64 = weights.iter().map(|&(_, w)| u64::from(w)).sum();
                if total == 0 {
                    return vec![Scenario::Normal; devices];
                }
                // Largest remainder: floor shares first, then the leftover devices to the
                // largest fractional parts (earlier entries win ties).
                let n = devices as u64;
                let mut counts: Vec<u64> = weights
                    .iter()
                    .map(|&(_, w)| u64::from(w) * n / total)
                    .collect();
                let mut order: Vec<usize> = (0..weights.len()).collect();
                order.sort_by_key(|&i| std::cmp::Reverse(u64::from(weights[i].1) * n % total));
                let mut left = n - counts.iter().sum::<u64>();
                for i in order {
                    if left == 0 {
                        break;
                    }
                    counts[i] += 1;
                    left -= 1;
                }
                let mut out: Vec<Scenario> = weights
                    .iter()
                    .zip(&counts)
                    .flat_map(|(&(s, _), &c)| std::iter::repeat_n(s, c as usize))
                    .collect();
                let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(seed, 0, 3));
                out.shuffle(&mut rng);
                out
            }
        }
    }
}

impl FromStr for ScenarioMix {
    type Err = SimError;

    /// `normal`, `sos`, `normal=90,sos=5,fall=5`. A name without `=` has weight 1.
    fn from_str(s: &str) -> Result<Self, SimError> {
        let mut weights: Vec<(Scenario, u32)> = Vec::new();
        for part in s.split(',').map(str::trim) {
            if part.is_empty() {
                continue;
            }
            let (name, weight) = match part.split_once('=') {
                Some((n, w)) => {
                    let w: u32 = w.trim().parse().map_err(|_| {
                        SimError::InvalidScenario(format!(
                            "weight {:?} of {:?} is not a non-negative integer",
                            w.trim(),
                            n.trim()
                        ))
                    })?;
                    (n, w)
                }
                None => (part, 1),
            };
            let sc: Scenario = name.parse()?;
            if weights.iter().any(|&(s, _)| s == sc) {
                return Err(SimError::InvalidScenario(format!(
                    "scenario {sc} appears twice in {s:?}"
                )));
            }
            weights.push((sc, weight));
        }
        if weights.is_empty() {
            return Err(SimError::InvalidScenario("empty scenario mix".into()));
        }
        if weights.iter().all(|&(_, w)| w == 0) {
            return Err(SimError::InvalidScenario(format!(
                "all weights in {s:?} are zero"
            )));
        }
        Ok(ScenarioMix::Weighted(weights))
    }
}

impl fmt::Display for ScenarioMix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScenarioMix::Weighted(w) => {
                let parts: Vec<String> = w.iter().map(|(s, w)| format!("{s}={w}")).collect();
                f.write_str(&parts.join(","))
            }
            ScenarioMix::PerDevice(list) => {
                let parts: Vec<&str> = list.iter().map(|s| s.name()).collect();
                write!(f, "per-device[{}]", parts.join(","))
            }
        }
    }
}

/// What the device does after a heartbeat, besides waiting for the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Publish an event now.
    Event(EventKind),
    /// Publish an event after a delay (the run waits for it even when the heartbeats are done).
    EventAfter(EventKind, Duration),
    /// Publish one bad message.
    Bad(BadClass),
    /// Wait for outstanding acks, then drop the connection without DISCONNECT.
    GoSilent,
}

/// How many heartbeats before a scripted event, when the run is long enough.
const TRIGGER_AFTER: u64 = 3;
/// How many heartbeats the low-battery script takes to go below 10 %.
const LOW_BATTERY_AFTER: u64 = 6;
/// Delay between FALL and its SOS_CANCEL.
pub const CANCEL_AFTER: Duration = Duration::from_secs(5);

/// The per-device state machine of a scenario.
#[derive(Debug, Clone)]
pub struct Script {
    scenario: Scenario,
    /// Heartbeat after which the scripted event (or silence) happens.
    trigger: u64,
    /// low-battery: heartbeat by which the battery is below 10 %.
    low_battery_at: u64,
    low_battery_sent: bool,
}

impl Script {
    /// The script for one device; `count` is the run's heartbeats per device, if bounded.
    pub fn new(scenario: Scenario, count: Option<u64>) -> Script {
        let clip = |n: u64| count.map_or(n, |c| n.min(c)).max(1);
        Script {
            scenario,
            trigger: clip(TRIGGER_AFTER),
            low_battery_at: clip(LOW_BATTERY_AFTER),
            low_battery_sent: false,
        }
    }

    pub fn scenario(&self) -> Scenario {
        self.scenario
    }

    /// Prepares the body once, before the first heartbeat.
    pub fn prepare(&self, body: &mut Body) {
        if self.scenario.keeps_bracelet_on() {
            body.set_always_worn(true);
        }
    }

    /// Bends the vitals of heartbeat `seq` to the scenario.
    pub fn shape(&mut self, seq: u64, body: &mut Body, v: &mut Vitals) {
        match self.scenario {
            Scenario::Tachycardia => v.heart_rate_bpm = body.rng().random_range(140..=160),
            Scenario::Bradycardia => v.heart_rate_bpm = body.rng().random_range(38..=45),
            Scenario::Hypoxia => v.spo2_pct = body.rng().random_range(85..=88),
            Scenario::Fever => {
                v.skin_temp_decicelsius = body.rng().random_range(385..=395);
                v.heart_rate_bpm = (v.heart_rate_bpm + 12).min(130);
            }
            Scenario::LowBattery => {
                // 22 % at the first heartbeat, linearly to 8 % at `low_battery_at`, then on
                // down to a floor of 3 %: the bracelet is never charged.
                const START: f64 = 22.0;
                const LOW: f64 = 8.0;
                let pct = if self.low_battery_at <= 1 {
                    LOW
                } else {
                    let step = (START - LOW) / (self.low_battery_at - 1) as f64;
                    (START - step * (seq.saturating_sub(1)) as f64).max(3.0)
                };
                body.set_battery(pct);
                v.battery_pct = pct.round() as u32;
            }
            _ => {}
        }
    }

    /// What to do after heartbeat `seq` (whose battery reading was `battery_pct`) went out.
    pub fn after_heartbeat(&mut self, seq: u64, battery_pct: u32) -> Vec<Action> {
        let at_trigger = seq == self.trigger;
        match self.scenario {
            Scenario::Sos if at_trigger => vec![Action::Event(EventKind::Sos)],
            Scenario::Fall if at_trigger => vec![Action::Event(EventKind::Fall)],
            Scenario::FallThenCancel if at_trigger => vec![
                Action::Event(EventKind::Fall),
                Action::EventAfter(EventKind::SosCancel, CANCEL_AFTER),
            ],
            Scenario::ServiceCall if at_trigger => vec![Action::Event(EventKind::ServiceCall)],
            Scenario::GoesSilent if at_trigger => vec![Action::GoSilent],
            Scenario::LowBattery if !self.low_battery_sent && battery_pct < 10 => {
                self.low_battery_sent = true;
                vec![Action::Event(EventKind::LowBattery)]
            }
            Scenario::Malformed => {
                let class = BadClass::ALL[((seq.max(1) - 1) % BadClass::ALL.len() as u64) as usize];
                vec![Action::Bad(class)]
            }
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn parses_names_and_weights() {
        assert_eq!(
            "normal".parse::<ScenarioMix>().unwrap(),
            ScenarioMix::single(Scenario::Normal)
        );
        assert_eq!(
            " normal=90, sos=5 ,fall=5 ".parse::<ScenarioMix>().unwrap(),
            ScenarioMix::Weighted(vec![
                (Scenario::Normal, 90),
                (Scenario::Sos, 5),
                (Scenario::Fall, 5)
            ])
        );
        assert_eq!(
            "fall-then-cancel,goes_silent=2,LOW-BATTERY=0"
                .parse::<ScenarioMix>()
                .unwrap(),
            ScenarioMix::Weighted(vec![
                (Scenario::FallThenCancel, 1),
                (Scenario::GoesSilent, 2),
                (Scenario::LowBattery, 0)
            ])
        );
        for s in Scenario::ALL {
            assert_eq!(s.name().parse::<Scenario>().unwrap(), s);
        }
    }

    #[test]
    fn rejects_bad_mixes() {
        for bad in [
            "",
            " , ",
            "nope",
            "sos=x",
            "sos=-1",
            "sos=1,sos=2",
            "sos=0",
            "=3",
        ] {
            assert!(
                bad.parse::<ScenarioMix>().is_err(),
                "{bad:?} should not parse"
            );
        }
        let msg = "nope".parse::<ScenarioMix>().unwrap_err().to_string();
        assert!(msg.contains("fall-then-cancel"), "{msg}");
    }

    #[test]
    fn display_round_trips() {
        let m: ScenarioMix = "normal=80,sos=10,malformed=10".parse().unwrap();
        assert_eq!(m.to_string().parse::<ScenarioMix>().unwrap(), m);
    }

    fn tally(v: &[Scenario]) -> BTreeMap<Scenario, usize> {
        let mut t = BTreeMap::new();
        for s in v {
            *t.entry(*s).or_default() += 1;
        }
        t
    }

    #[test]
    fn weighted_assignment_is_exact_and_deterministic() {
        let m: ScenarioMix = "normal=80,sos=10,malformed=10".parse().unwrap();
        let a = m.assign(20, 1);
        assert_eq!(a.len(), 20);
        let t = tally(&a);
        assert_eq!(t[&Scenario::Normal], 16);
        assert_eq!(t[&Scenario::Sos], 2);
        assert_eq!(t[&Scenario::Malformed], 2);
        assert_eq!(a, m.assign(20, 1));
        // A different seed shuffles differently but keeps the split.
        let b = m.assign(20, 2);
        assert_eq!(tally(&b), t);

        // Rounding: 3 devices over weights 1:1 -> 2 + 1 (first entry wins the tie).
        let m: ScenarioMix = "sos,fall".parse().unwrap();
        let t = tally(&m.assign(3, 9));
        assert_eq!((t[&Scenario::Sos], t[&Scenario::Fall]), (2, 1));
        assert!(m.assign(0, 9).is_empty());
    }

    #[test]
    fn per_device_assignment_cycles() {
        let m = ScenarioMix::PerDevice(vec![Scenario::Sos, Scenario::Normal]);
        assert_eq!(
            m.assign(3, 0),
            vec![Scenario::Sos, Scenario::Normal, Scenario::Sos]
        );
    }

    #[test]
    fn scripted_events_happen_once_even_in_short_runs() {
        for count in [Some(1), Some(2), Some(10), None] {
            let mut s = Script::new(Scenario::Sos, count);
            let n = count.unwrap_or(20);
            let events: Vec<Action> = (1..=n).flat_map(|seq| s.after_heartbeat(seq, 80)).collect();
            assert_eq!(
                events,
                vec![Action::Event(EventKind::Sos)],
                "count {count:?}"
            );
        }
        let mut s = Script::new(Scenario::FallThenCancel, Some(10));
        let events: Vec<Action> = (1..=10)
            .flat_map(|seq| s.after_heartbeat(seq, 80))
            .collect();
        assert_eq!(
            events,
            vec![
                Action::Event(EventKind::Fall),
                Action::EventAfter(EventKind::SosCancel, CANCEL_AFTER)
            ]
        );
    }

    #[test]
    fn low_battery_goes_below_ten_and_reports_once() {
        for count in [Some(1), Some(3), Some(10), None] {
            let mut s = Script::new(Scenario::LowBattery, count);
            let mut body = Body::new(1, 1);
            s.prepare(&mut body);
            let mut sent = 0;
            let mut last = 100;
            for seq in 1..=count.unwrap_or(12) {
                let mut v = body.sample(1_772_380_800_000 + seq as i64 * 5000);
                s.shape(seq, &mut body, &mut v);
                assert!(v.battery_pct <= last);
                last = v.battery_pct;
                sent += s
                    .after_heartbeat(seq, v.battery_pct)
                    .iter()
                    .filter(|a| **a == Action::Event(EventKind::LowBattery))
                    .count();
            }
            assert!(last < 10, "count {count:?}: battery {last}");
            assert_eq!(sent, 1);
        }
    }

    #[test]
    fn malformed_rotates_through_every_class() {
        let mut s = Script::new(Scenario::Malformed, Some(6));
        let classes: Vec<BadClass> = (1..=6)
            .flat_map(|seq| s.after_heartbeat(seq, 80))
            .map(|a| match a {
                Action::Bad(c) => c,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(classes, BadClass::ALL);
    }

    #[test]
    fn vital_scenarios_override_vitals() {
        let cases = [
            (Scenario::Tachycardia, 140..=160u32, 0),
            (Scenario::Bradycardia, 38..=45, 0),
            (Scenario::Hypoxia, 85..=88, 1),
            (Scenario::Fever, 385..=395, 2),
        ];
        for (sc, range, field) in cases {
            let mut s = Script::new(sc, None);
            let mut body = Body::new(3, 3);
            s.prepare(&mut body);
            for seq in 1..100u64 {
                // Include the small hours, when a healthy elder's bracelet may be charging.
                let mut v = body.sample(1_772_380_800_000 + seq as i64 * 600_000);
                s.shape(seq, &mut body, &mut v);
                assert!(v.worn);
                let value = match field {
                    0 => v.heart_rate_bpm,
                    1 => v.spo2_pct,
                    _ => v.skin_temp_decicelsius as u32,
                };
                assert!(range.contains(&value), "{sc}: {value}");
            }
        }
    }
}
