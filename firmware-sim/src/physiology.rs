//! Deterministic physiology of one simulated elder.
//!
//! Everything is derived from `(fleet seed, device index)`, so the same fleet replays the same
//! elders: a resting heart rate, a blood-pressure baseline, a home in Hangzhou, a habit of
//! charging the bracelet at night. [`Body::sample`] turns a device-clock reading into the
//! vitals a wrist sensor would report at that moment, following the elder's local day
//! (China Standard Time, UTC+8, no daylight saving): lower heart rate and pressure at night,
//! a morning pressure surge, steps accumulating from morning to evening and resetting at
//! midnight, a battery that drains and is recharged, and off-wrist spells during which nothing
//! is measured (0 on the wire means "not measured").
//!
//! Values for a healthy elder stay well inside what the backend accepts; the abnormal
//! scenarios in [`crate::scenario`] override them on purpose.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use silverguard_proto::v1::{location::Source, Heartbeat, Location};
use std::f64::consts::PI;

/// China Standard Time is UTC+8 all year.
pub const LOCAL_UTC_OFFSET_MS: i64 = 8 * 3_600_000;
const DAY_MS: i64 = 86_400_000;
const HOUR_MS: f64 = 3_600_000.0;

/// Centre of the simulated elders' city (Hangzhou, West Lake district).
pub const HOME_CITY_LAT: f64 = 30.27;
/// See [`HOME_CITY_LAT`].
pub const HOME_CITY_LON: f64 = 120.15;

/// Share of an average day's steps walked in each local hour (0..24). Elders walk in the
/// morning and the afternoon, nap after lunch and do not walk at night.
const STEP_WEIGHTS: [f64; 24] = [
    0.0, 0.0, 0.0, 0.0, 0.0, 0.0, // 00-06 asleep
    0.03, 0.08, 0.12, 0.12, 0.08, 0.05, // 06-12 morning market, park, tai chi
    0.03, 0.02, 0.05, 0.10, 0.10, 0.07, // 12-18 nap, afternoon walk
    0.05, 0.05, 0.03, 0.02, 0.0, 0.0, // 18-24 evening stroll, bed
];

/// Local civil time of a device-clock reading.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LocalTime {
    /// Days since 1970-01-01 in local time; changes at local midnight.
    pub day: i64,
    /// Hours since local midnight, fractional (0.0 ..< 24.0).
    pub hour: f64,
}

impl LocalTime {
    /// Converts Unix milliseconds (as the device's clock reads them) to local time.
    pub fn from_unix_ms(unix_ms: i64) -> LocalTime {
        let local = unix_ms.saturating_add(LOCAL_UTC_OFFSET_MS);
        LocalTime {
            day: local.div_euclid(DAY_MS),
            hour: local.rem_euclid(DAY_MS) as f64 / HOUR_MS,
        }
    }

    /// True between 22:00 and 06:00, when an elder is in bed.
    pub fn is_night(&self) -> bool {
        self.hour >= 22.0 || self.hour < 6.0
    }
}

/// SplitMix64: turns (seed, index, stream) into independent, well-mixed seeds so that
/// neighbouring devices and neighbouring days do not get correlated random streams.
pub fn mix_seed(seed: u64, index: u64, stream: u64) -> u64 {
    let mut z = seed
        ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform number in [0, 1) from a hash, for per-day schedules that must not depend on
/// how often the body was sampled.
fn unit(seed: u64, index: u64, stream: u64) -> f64 {
    (mix_seed(seed, index, stream) >> 11) as f64 / (1u64 << 53) as f64
}

/// Standard normal deviate (Box-Muller); enough for sensor noise.
fn gauss(rng: &mut impl Rng) -> f64 {
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * PI * u2).cos()
}

/// Cumulative share of the day's steps walked by `hour` (0.0 at midnight, ~1.0 by 22:00).
fn step_share_until(hour: f64) -> f64 {
    let total: f64 = STEP_WEIGHTS.iter().sum();
    let h = hour.clamp(0.0, 24.0);
    let whole = h.floor() as usize;
    let mut acc: f64 = STEP_WEIGHTS.iter().take(whole).sum();
    if whole < 24 {
        acc += STEP_WEIGHTS[whole] * (h - whole as f64);
    }
    acc / total
}

/// How active the elder is at this hour, 0.0 (asleep) to 1.0 (the busiest hour).
fn activity(hour: f64) -> f64 {
    let max = STEP_WEIGHTS.iter().cloned().fold(0.0, f64::max);
    STEP_WEIGHTS[(hour.floor() as usize).min(23)] / max
}

/// Circadian factor: -1 at 04:00 (deepest sleep), +1 at 16:00.
fn circadian(hour: f64) -> f64 {
    -(2.0 * PI * (hour - 4.0) / 24.0).cos()
}

/// Why the bracelet is off the wrist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffWrist {
    /// On its charger (nightly habit, or because the battery ran low).
    Charging,
    /// Taken off for a shower.
    Shower,
}

/// The fixed traits of one elder, drawn once from the seed.
#[derive(Debug, Clone, PartialEq)]
pub struct Elder {
    /// Fleet seed and device index, kept for per-day schedules.
    pub seed: u64,
    pub index: u64,
    /// Resting heart rate, 60-85 bpm.
    pub resting_hr: f64,
    /// SpO2 baseline, 96-98 %.
    pub spo2_base: f64,
    /// Blood-pressure baseline, around 125/80 mmHg.
    pub systolic_base: f64,
    pub diastolic_base: f64,
    /// Skin temperature baseline, 33.5-35.5 °C.
    pub skin_temp_base_c: f64,
    /// Steps on an average day.
    pub daily_steps: f64,
    /// Battery drain while not charging, % per hour.
    pub battery_drain_per_hour: f64,
    /// Home, degrees (WGS-84), somewhere in urban Hangzhou.
    pub home_lat: f64,
    pub home_lon: f64,
    /// Local hour the bracelet goes on its charger every day, and for how long.
    pub charge_start_hour: f64,
    pub charge_hours: f64,
}

impl Elder {
    /// Draws the elder for `index` in a fleet seeded with `seed`.
    pub fn generate(seed: u64, index: u64) -> Elder {
        let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(seed, index, 1));
        let systolic_base = 125.0 + 7.0 * gauss(&mut rng).clamp(-2.0, 2.0);
        let diastolic_base = 80.0 + 4.0 * gauss(&mut rng).clamp(-2.0, 2.0);
        // Most elders charge before bed; some do it in the morning while washing.
        let charge_start_hour = if rng.random_bool(0.8) {
            rng.random_range(21.0..23.5)
        } else {
            rng.random_range(6.5..8.0)
        };
        Elder {
            seed,
            index,
            resting_hr: rng.random_range(60.0..85.0),
            spo2_base: rng.random_range(96.0..98.5),
            systolic_base,
            diastolic_base,
            skin_temp_base_c: rng.random_range(33.5..35.5),
            daily_steps: rng.random_range(1500.0..8000.0),
            battery_drain_per_hour: rng.random_range(1.0..2.5),
            home_lat: HOME_CITY_LAT + rng.random_range(-0.12..0.12),
            home_lon: HOME_CITY_LON + rng.random_range(-0.15..0.15),
            charge_start_hour,
            charge_hours: rng.random_range(0.5..1.5),
        }
    }

    /// The off-wrist spell scheduled at this local time, if any. Pure, so the schedule does
    /// not depend on how often the body is sampled.
    pub fn scheduled_off(&self, t: LocalTime) -> Option<OffWrist> {
        // The charging window may cross midnight, so yesterday's window is checked too.
        let end = self.charge_start_hour + self.charge_hours;
        if (t.hour >= self.charge_start_hour && t.hour < end) || t.hour + 24.0 < end {
            return Some(OffWrist::Charging);
        }
        // A shower on about half the evenings, 15-25 minutes between 19:00 and 21:00.
        let day = t.day as u64;
        if unit(self.seed, self.index, day.wrapping_mul(4).wrapping_add(100)) < 0.5 {
            let start = 19.0 + 2.0 * unit(self.seed, self.index, day.wrapping_mul(4) + 101);
            let len = 0.25 + 0.17 * unit(self.seed, self.index, day.wrapping_mul(4) + 102);
            if t.hour >= start && t.hour < start + len {
                return Some(OffWrist::Shower);
            }
        }
        None
    }

    /// How much more (or less) this elder walks on a given day: 0.7-1.2.
    fn day_factor(&self, day: i64) -> f64 {
        0.7 + 0.5 * unit(self.seed, self.index, (day as u64).wrapping_mul(4) + 103)
    }

    /// Whether the elder is out of the house during this local hour (on active hours of
    /// about two days in three).
    fn is_out(&self, t: LocalTime) -> bool {
        let slot = (t.day as u64).wrapping_mul(24) + t.hour.floor() as u64;
        activity(t.hour) >= 0.6 && unit(self.seed, self.index, slot.wrapping_add(1 << 40)) < 0.65
    }
}

/// What the sensors report at one instant.
#[derive(Debug, Clone, PartialEq)]
pub struct Vitals {
    /// 0 when not measured (bracelet off the wrist).
    pub heart_rate_bpm: u32,
    pub spo2_pct: u32,
    pub systolic_mmhg: u32,
    pub diastolic_mmhg: u32,
    /// Tenths of a degree Celsius; 0 when not measured.
    pub skin_temp_decicelsius: i32,
    pub steps_today: u32,
    pub battery_pct: u32,
    pub worn: bool,
    /// Why it is not worn, when it is not.
    pub off_wrist: Option<OffWrist>,
    pub location: Location,
}

impl Vitals {
    /// The Heartbeat message carrying these vitals.
    pub fn to_heartbeat(&self, device_id: &str, seq: u64, measured_at_ms: i64) -> Heartbeat {
        Heartbeat {
            seq,
            measured_at_ms,
            heart_rate_bpm: self.heart_rate_bpm,
            spo2_pct: self.spo2_pct,
            systolic_mmhg: self.systolic_mmhg,
            diastolic_mmhg: self.diastolic_mmhg,
            skin_temp_decicelsius: self.skin_temp_decicelsius,
            steps_today: self.steps_today,
            battery_pct: self.battery_pct,
            worn: self.worn,
            location: Some(self.location),
            device_id: device_id.to_string(),
        }
    }
}

/// One elder's body plus the state that carries over between samples (steps so far today,
/// battery charge).
#[derive(Debug, Clone)]
pub struct Body {
    elder: Elder,
    /// Sensor noise; seeded per device so a replay gives the same readings.
    rng: ChaCha8Rng,
    /// Scenarios that need the vitals measured keep the bracelet on the wrist.
    always_worn: bool,
    battery: f64,
    steps: f64,
    /// Local day and time of the previous sample.
    last: Option<(LocalTime, i64)>,
    /// Set when the battery ran low and the elder put the bracelet on its charger.
    low_battery_charge_until_ms: Option<i64>,
}

/// Charging speed, % per hour.
const CHARGE_PER_HOUR: f64 = 45.0;
/// Below this the elder notices and charges the bracelet (healthy elders only).
const CHARGE_WHEN_BELOW: f64 = 15.0;

impl Body {
    /// The body of the elder for `index` in a fleet seeded with `seed`.
    pub fn new(seed: u64, index: u64) -> Body {
        let elder = Elder::generate(seed, index);
        let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(seed, index, 2));
        let battery = rng.random_range(40.0..100.0);
        Body {
            elder,
            rng,
            always_worn: false,
            battery,
            steps: 0.0,
            last: None,
            low_battery_charge_until_ms: None,
        }
    }

    pub fn elder(&self) -> &Elder {
        &self.elder
    }

    /// Keeps the bracelet on the wrist (no charging, no shower), so every sample measures.
    pub fn set_always_worn(&mut self, on: bool) {
        self.always_worn = on;
    }

    /// Current battery charge, %.
    pub fn battery(&self) -> f64 {
        self.battery
    }

    /// Overrides the battery charge (scenarios that drain it on purpose).
    pub fn set_battery(&mut self, pct: f64) {
        self.battery = pct.clamp(0.0, 100.0);
    }

    /// The random stream scenarios use for their own noise, so they stay deterministic too.
    pub fn rng(&mut self) -> &mut ChaCha8Rng {
        &mut self.rng
    }

    /// What the sensors report when the device clock reads `device_ms`.
    pub fn sample(&mut self, device_ms: i64) -> Vitals {
        let t = LocalTime::from_unix_ms(device_ms);
        let dt_h = match self.last {
            Some((_, last_ms)) => ((device_ms - last_ms).max(0) as f64 / HOUR_MS).min(24.0),
            None => 0.0,
        };

        // Off the wrist?
        if let Some(until) = self.low_battery_charge_until_ms {
            if device_ms >= until {
                self.low_battery_charge_until_ms = None;
            }
        }
        let off = if self.always_worn {
            None
        } else if self.low_battery_charge_until_ms.is_some() {
            Some(OffWrist::Charging)
        } else {
            self.elder.scheduled_off(t)
        };

        // Battery: charges on the charger, drains otherwise.
        if off == Some(OffWrist::Charging) {
            self.battery = (self.battery + CHARGE_PER_HOUR * dt_h).min(100.0);
        } else {
            self.battery = (self.battery - self.elder.battery_drain_per_hour * dt_h).max(1.0);
        }
        if !self.always_worn
            && off.is_none()
            && self.battery < CHARGE_WHEN_BELOW
            && self.low_battery_charge_until_ms.is_none()
        {
            // The elder (or the grid worker on a visit) notices and puts it on the charger.
            self.low_battery_charge_until_ms = Some(device_ms + 90 * 60_000);
        }

        // Steps: what the elder walked since the previous sample, counted only on the wrist;
        // the counter restarts at local midnight.
        let target = |day: i64, hour: f64| {
            self.elder.daily_steps * self.elder.day_factor(day) * step_share_until(hour)
        };
        match self.last {
            None => self.steps = target(t.day, t.hour),
            Some((prev, _)) if prev.day != t.day => {
                self.steps = if off.is_none() {
                    target(t.day, t.hour)
                } else {
                    0.0
                };
            }
            Some((prev, _)) => {
                if off.is_none() {
                    let walked = (target(t.day, t.hour) - target(prev.day, prev.hour)).max(0.0);
                    self.steps += walked * self.rng.random_range(0.6..1.4);
                }
            }
        }
        self.last = Some((t, device_ms));

        let out = off.is_none() && self.elder.is_out(t);
        let location = self.location(t, out);
        let worn = off.is_none();
        if !worn {
            return Vitals {
                heart_rate_bpm: 0,
                spo2_pct: 0,
                systolic_mmhg: 0,
                diastolic_mmhg: 0,
                skin_temp_decicelsius: 0,
                steps_today: self.steps.round() as u32,
                battery_pct: self.battery.round() as u32,
                worn,
                off_wrist: off,
                location,
            };
        }

        let circ = circadian(t.hour);
        let act = activity(t.hour) * if out { 1.0 } else { 0.3 };
        let morning_surge = if (6.0..9.0).contains(&t.hour) {
            7.0
        } else {
            0.0
        };
        let night = t.is_night();
        let e = &self.elder;
        let rng = &mut self.rng;

        let hr = e.resting_hr + 5.0 * circ + 20.0 * act + 3.0 * gauss(rng);
        let spo2 = e.spo2_base - if night { 0.8 } else { 0.0 } + 0.7 * gauss(rng);
        let sys = e.systolic_base + 5.0 * circ + morning_surge + 6.0 * act + 5.0 * gauss(rng);
        let sys = sys.clamp(95.0, 175.0);
        let dia = e.diastolic_base + 0.45 * (sys - e.systolic_base) + 3.0 * gauss(rng);
        let dia = dia.clamp(55.0, (sys - 25.0).min(105.0));
        // Skin warms a little under the covers and cools outdoors.
        let temp = e.skin_temp_base_c + if night { 0.4 } else { 0.0 } - if out { 0.4 } else { 0.0 }
            + 0.15 * gauss(rng);

        Vitals {
            heart_rate_bpm: hr.clamp(45.0, 150.0).round() as u32,
            spo2_pct: spo2.clamp(92.0, 100.0).round() as u32,
            systolic_mmhg: sys.round() as u32,
            diastolic_mmhg: dia.round() as u32,
            skin_temp_decicelsius: (temp.clamp(31.0, 37.0) * 10.0).round() as i32,
            steps_today: self.steps.round() as u32,
            battery_pct: self.battery.round() as u32,
            worn,
            off_wrist: None,
            location,
        }
    }

    /// Home over Wi-Fi positioning, or somewhere in the neighbourhood over GPS when out.
    fn location(&mut self, t: LocalTime, out: bool) -> Location {
        let e = &self.elder;
        let (lat, lon, accuracy, source) = if out {
            // The place of this hour's outing: 200-900 m from home, stable for the hour.
            let slot = (t.day as u64).wrapping_mul(24) + t.hour.floor() as u64;
            let bearing = 2.0 * PI * unit(e.seed, e.index, slot.wrapping_add(2 << 40));
            let dist_m = 200.0 + 700.0 * unit(e.seed, e.index, slot.wrapping_add(3 << 40));
            let dlat = dist_m * bearing.cos() / 111_320.0;
            let dlon = dist_m * bearing.sin() / (111_320.0 * e.home_lat.to_radians().cos());
            let jitter = 8.0 / 111_320.0;
            (
                e.home_lat + dlat + jitter * gauss(&mut self.rng),
                e.home_lon + dlon + jitter * gauss(&mut self.rng),
                self.rng.random_range(5..=15),
                Source::Gps,
            )
        } else {
            let jitter = 5.0 / 111_320.0;
            (
                e.home_lat + jitter * gauss(&mut self.rng),
                e.home_lon + jitter * gauss(&mut self.rng),
                self.rng.random_range(15..=40),
                Source::Wifi,
            )
        };
        Location {
            lat_e7: (lat * 1e7).round() as i32,
            lon_e7: (lon * 1e7).round() as i32,
            accuracy_m: accuracy,
            source: source as i32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-03-02 00:00 local (UTC+8), a Monday.
    const LOCAL_MIDNIGHT_MS: i64 = 1_772_380_800_000;

    #[test]
    fn local_time_is_china_standard_time() {
        let t = LocalTime::from_unix_ms(LOCAL_MIDNIGHT_MS);
        assert_eq!(t.hour, 0.0);
        let t2 = LocalTime::from_unix_ms(LOCAL_MIDNIGHT_MS - 1);
        assert_eq!(t2.day, t.day - 1);
        assert!(t2.hour > 23.99);
        // 06:30 local is 22:30 UTC the evening before.
        let t3 = LocalTime::from_unix_ms(LOCAL_MIDNIGHT_MS + 6 * 3_600_000 + 1_800_000);
        assert!((t3.hour - 6.5).abs() < 1e-9);
    }

    #[test]
    fn elders_are_deterministic_and_distinct() {
        assert_eq!(Elder::generate(7, 3), Elder::generate(7, 3));
        assert_ne!(Elder::generate(7, 3), Elder::generate(7, 4));
        assert_ne!(Elder::generate(7, 3), Elder::generate(8, 3));
        let mut a = Body::new(7, 3);
        let mut b = Body::new(7, 3);
        for k in 0..50 {
            let ms = LOCAL_MIDNIGHT_MS + k * 300_000;
            assert_eq!(a.sample(ms), b.sample(ms));
        }
    }

    #[test]
    fn elder_traits_are_in_range() {
        for i in 0..500 {
            let e = Elder::generate(42, i);
            assert!((60.0..85.0).contains(&e.resting_hr));
            assert!((33.5..35.5).contains(&e.skin_temp_base_c));
            assert!((110.0..=140.0).contains(&e.systolic_base));
            assert!((70.0..=90.0).contains(&e.diastolic_base));
            assert!((e.home_lat - HOME_CITY_LAT).abs() < 0.2);
            assert!((e.home_lon - HOME_CITY_LON).abs() < 0.2);
        }
    }

    /// Normal elders over two simulated days, sampled every 5 minutes: every reading is
    /// plausible, unmeasured vitals are 0 exactly when off the wrist, steps only grow during
    /// the day and restart at midnight, nights are calmer than days.
    #[test]
    fn normal_physiology_is_plausible_over_a_day() {
        let step_ms = 5 * 60_000;
        let (mut day_hr, mut day_n, mut night_hr, mut night_n) = (0.0, 0, 0.0, 0);
        let (mut worn, mut total) = (0u64, 0u64);
        for i in 0..200u64 {
            let mut body = Body::new(1234, i);
            let mut prev: Option<(LocalTime, u32)> = None;
            let mut max_steps = 0;
            for k in 0..(2 * 24 * 12) {
                let ms = LOCAL_MIDNIGHT_MS + 3 * 3_600_000 + k * step_ms;
                let t = LocalTime::from_unix_ms(ms);
                let v = body.sample(ms);
                total += 1;
                assert!(v.battery_pct <= 100, "battery {}", v.battery_pct);
                assert!(v.steps_today <= 200_000);
                if v.worn {
                    worn += 1;
                    assert!((40..=180).contains(&v.heart_rate_bpm), "hr {v:?}");
                    assert!((70..=100).contains(&v.spo2_pct), "spo2 {v:?}");
                    assert!((80..=200).contains(&v.systolic_mmhg), "sys {v:?}");
                    assert!((40..=120).contains(&v.diastolic_mmhg), "dia {v:?}");
                    assert!(v.diastolic_mmhg + 20 <= v.systolic_mmhg, "bp {v:?}");
                    assert!((300..=430).contains(&v.skin_temp_decicelsius), "temp {v:?}");
                    assert!(v.off_wrist.is_none());
                    if t.hour < 5.0 {
                        night_hr += v.heart_rate_bpm as f64;
                        night_n += 1;
                    } else if (9.0..18.0).contains(&t.hour) {
                        day_hr += v.heart_rate_bpm as f64;
                        day_n += 1;
                    }
                } else {
                    assert_eq!(
                        (
                            v.heart_rate_bpm,
                            v.spo2_pct,
                            v.systolic_mmhg,
                            v.diastolic_mmhg
                        ),
                        (0, 0, 0, 0)
                    );
                    assert_eq!(v.skin_temp_decicelsius, 0);
                    assert!(v.off_wrist.is_some());
                }
                let lat = v.location.lat_e7 as f64 / 1e7;
                let lon = v.location.lon_e7 as f64 / 1e7;
                assert!((lat - HOME_CITY_LAT).abs() < 0.2 && (lon - HOME_CITY_LON).abs() < 0.2);
                if let Some((pt, psteps)) = prev {
                    if pt.day == t.day {
                        assert!(v.steps_today >= psteps, "steps went down within a day");
                        if t.hour < 5.5 {
                            assert_eq!(v.steps_today, psteps, "steps at night");
                        }
                    } else {
                        assert!(v.steps_today < 50, "steps not reset at midnight: {v:?}");
                    }
                }
                prev = Some((t, v.steps_today));
                max_steps = max_steps.max(v.steps_today);
            }
            // Every elder walks a few hundred steps at least on one of the two days.
            assert!(max_steps > 300, "elder {i} hardly walked: {max_steps}");
        }
        let worn_share = worn as f64 / total as f64;
        assert!(worn_share > 0.85 && worn_share < 0.999, "worn {worn_share}");
        assert!(night_hr / night_n as f64 + 5.0 < day_hr / day_n as f64);
    }

    #[test]
    fn battery_drains_and_recharges() {
        let mut body = Body::new(5, 5);
        body.set_battery(30.0);
        let start = LOCAL_MIDNIGHT_MS + 9 * 3_600_000;
        body.sample(start);
        let later = body.sample(start + 3 * 3_600_000);
        assert!(later.battery_pct < 30, "no drain: {later:?}");
        // Over two days the nightly charge keeps it alive.
        let mut min = 100;
        for k in 0..(48 * 12) {
            let v = body.sample(start + 3 * 3_600_000 + k * 300_000);
            min = min.min(v.battery_pct);
        }
        assert!(min >= 1);
        assert!(body.battery() > 10.0);
    }

    #[test]
    fn always_worn_measures_at_night() {
        let mut body = Body::new(9, 9);
        body.set_always_worn(true);
        for k in 0..(24 * 12) {
            let v = body.sample(LOCAL_MIDNIGHT_MS + k * 300_000);
            assert!(v.worn && v.heart_rate_bpm > 0);
        }
    }
}
