//! `[alerts]`: rules, escalation policies, quiet hours, rate limits and acknowledge links.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::config::Secret;

/// Who an escalation step tells: the registry's roles.
pub use crate::store::registry::Role;

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    Sms,
    Email,
    Im,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Sms => "sms",
            Channel::Email => "email",
            Channel::Im => "im",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Delay after the alert opened (step 0 is usually "0s").
    #[serde(with = "humantime_serde")]
    pub after: Duration,
    pub notify: Vec<Role>,
    pub channels: Vec<Channel>,
    /// Also send a `SosAck` downlink to the bracelet ("help is coming").
    #[serde(default)]
    pub downlink: bool,
    /// Repeat this (last) step at this interval until someone acknowledges.
    #[serde(default, with = "humantime_serde")]
    pub repeat_every: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub steps: Vec<Step>,
    /// Acknowledged but not resolved for this long: remind whoever acknowledged.
    #[serde(default, with = "humantime_serde")]
    pub ack_reminder_after: Option<Duration>,
}

fn step(
    after_s: u64,
    notify: &[Role],
    channels: &[Channel],
    downlink: bool,
    repeat_s: Option<u64>,
) -> Step {
    Step {
        after: Duration::from_secs(after_s),
        notify: notify.to_vec(),
        channels: channels.to_vec(),
        downlink,
        repeat_every: repeat_s.map(Duration::from_secs),
    }
}

/// The defaults DESIGN.md and the programmes describe: for SOS and falls, grid worker and
/// guardians together at once ("double insurance"), the backup and community after 3
/// minutes, the township after 10, repeating until acknowledged.
pub fn default_policies() -> BTreeMap<String, Policy> {
    use Channel::*;
    use Role::*;
    let mut m = BTreeMap::new();
    m.insert(
        "critical".into(),
        Policy {
            steps: vec![
                step(0, &[GridWorker, Guardian], &[Sms, Email, Im], true, None),
                step(
                    180,
                    &[BackupGridWorker, CommunitySupervisor],
                    &[Sms, Email, Im],
                    false,
                    None,
                ),
                step(600, &[TownshipSupervisor], &[Sms, Email], false, Some(600)),
            ],
            ack_reminder_after: Some(Duration::from_secs(30 * 60)),
        },
    );
    m.insert(
        "high".into(),
        Policy {
            steps: vec![
                step(0, &[GridWorker, Guardian], &[Sms, Email, Im], false, None),
                step(600, &[BackupGridWorker], &[Sms, Im], false, None),
                step(
                    1800,
                    &[CommunitySupervisor],
                    &[Sms, Email],
                    false,
                    Some(3600),
                ),
            ],
            ack_reminder_after: Some(Duration::from_secs(2 * 3600)),
        },
    );
    m.insert(
        "medium".into(),
        Policy {
            steps: vec![
                step(0, &[GridWorker], &[Sms, Im], false, None),
                step(1800, &[BackupGridWorker], &[Sms, Im], false, None),
            ],
            ack_reminder_after: Some(Duration::from_secs(4 * 3600)),
        },
    );
    m.insert(
        "low".into(),
        Policy {
            steps: vec![step(0, &[GridWorker], &[Im, Email], false, None)],
            ack_reminder_after: None,
        },
    );
    m
}

/// The rule types live in the IO-free core crate (fuzzed there); re-exported at their old path.
pub use silverguard_core::rules::{default_thresholds, Threshold};

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlertSettings {
    /// A fall is announced after this window unless the bracelet sends SOS_CANCEL.
    #[serde(with = "humantime_serde")]
    pub fall_cancel_window: Duration,
    /// A device is silent after `heartbeat_interval_s × silence_factor` without data.
    pub silence_factor: u32,
    /// After a start, no silence alert for this long: if silverguard itself was down, every
    /// device looks silent until the broker's backlog is ingested.
    #[serde(with = "humantime_serde")]
    pub silence_grace: Duration,
    /// How often due escalation steps and silent devices are looked for.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// Fleet-wide rule defaults; elders override them in `elders.thresholds`.
    pub thresholds: BTreeMap<String, Threshold>,
    /// Escalation policy per severity (critical, high, medium, low).
    pub policies: BTreeMap<String, Policy>,
    /// Local time of the community, as an offset from UTC (China: 8).
    pub utc_offset_hours: i32,
    /// Daytime window (local hours) for the "not worn" rule.
    pub day_starts_hour: u32,
    pub day_ends_hour: u32,
    /// The daily knock: by this local time, no sign of life today raises a wellness check
    /// ("off" disables it).
    pub wellness_check_at: String,
    /// Quiet hours (local) for non-urgent SMS: deferred to the end of the window.
    pub quiet_hours: Option<String>,
    /// At most this many non-urgent notifications per contact per hour; more are suppressed.
    pub max_per_contact_per_hour: u32,
    /// Fallback channel when a channel fails for good (e.g. sms = "email").
    pub fallback: BTreeMap<String, String>,
    /// Base URL of the web console, for links in messages (e.g. https://sg.example.org).
    pub public_url: String,
    /// Key for signing acknowledge links (at least 32 characters).
    pub link_secret: Secret,
    /// How long an acknowledge link stays valid.
    #[serde(with = "humantime_serde")]
    pub link_ttl: Duration,
    /// Give up a notification (and fall back) after this many attempts.
    pub max_attempts: i32,
}

impl Default for AlertSettings {
    fn default() -> Self {
        AlertSettings {
            fall_cancel_window: Duration::from_secs(30),
            silence_factor: 15,
            silence_grace: Duration::from_secs(60),
            sweep_interval: Duration::from_millis(500),
            thresholds: default_thresholds(),
            policies: default_policies(),
            utc_offset_hours: 8,
            day_starts_hour: 8,
            day_ends_hour: 20,
            wellness_check_at: "10:00".into(),
            quiet_hours: Some("22:00-07:00".into()),
            max_per_contact_per_hour: 10,
            fallback: BTreeMap::from([
                ("sms".into(), "email".into()),
                ("email".into(), "sms".into()),
                ("im".into(), "sms".into()),
            ]),
            public_url: "http://127.0.0.1:8080".into(),
            link_secret: Secret::new(""),
            link_ttl: Duration::from_secs(24 * 3600),
            max_attempts: 10,
        }
    }
}

/// Parses "HH:MM" into minutes after midnight.
pub fn parse_hhmm(s: &str) -> Option<u32> {
    let (h, m) = s.trim().split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some(h * 60 + m)
}

/// Parses "HH:MM-HH:MM" (may wrap midnight).
pub fn parse_window(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.split_once('-')?;
    Some((parse_hhmm(a)?, parse_hhmm(b)?))
}

impl AlertSettings {
    /// A file that sets one policy or one threshold keeps the defaults for the others.
    pub fn fill_defaults(&mut self) {
        for (k, v) in default_policies() {
            self.policies.entry(k).or_insert(v);
        }
        for (k, v) in default_thresholds() {
            self.thresholds.entry(k).or_insert(v);
        }
    }

    /// The daily knock's local time in minutes, or None when it is switched off ("off").
    pub fn wellness_minute(&self) -> Option<u32> {
        parse_hhmm(&self.wellness_check_at)
    }

    pub fn validate(&self) -> Vec<String> {
        let mut p = Vec::new();
        for sev in ["critical", "high", "medium", "low"] {
            match self.policies.get(sev) {
                None => p.push(format!("alerts.policies.{sev} is missing")),
                Some(pol) if pol.steps.is_empty() => {
                    p.push(format!("alerts.policies.{sev} needs at least one step"))
                }
                Some(pol) => {
                    for w in pol.steps.windows(2) {
                        if w[1].after < w[0].after {
                            p.push(format!(
                                "alerts.policies.{sev}: steps must be in order of `after`"
                            ));
                        }
                    }
                    if pol
                        .steps
                        .iter()
                        .rev()
                        .skip(1)
                        .any(|s| s.repeat_every.is_some())
                    {
                        p.push(format!(
                            "alerts.policies.{sev}: only the last step may repeat"
                        ));
                    }
                    if pol
                        .steps
                        .iter()
                        .any(|s| s.repeat_every.is_some_and(|d| d < Duration::from_secs(10)))
                    {
                        p.push(format!(
                            "alerts.policies.{sev}: repeat_every must be at least 10s"
                        ));
                    }
                }
            }
        }
        for sev in self.policies.keys() {
            if !["critical", "high", "medium", "low"].contains(&sev.as_str()) {
                p.push(format!(
                    "alerts.policies.{sev}: not a severity (critical, high, medium, low)"
                ));
            }
        }
        for (rule, t) in &self.thresholds {
            if !default_thresholds().contains_key(rule) {
                p.push(format!("alerts.thresholds.{rule}: unknown rule"));
            }
            let _ = t;
        }
        if self.silence_factor < 2 {
            p.push("alerts.silence_factor must be at least 2".into());
        }
        if !(-12..=14).contains(&self.utc_offset_hours) {
            p.push("alerts.utc_offset_hours must be between -12 and 14".into());
        }
        if self.wellness_check_at != "off" && parse_hhmm(&self.wellness_check_at).is_none() {
            p.push("alerts.wellness_check_at must be HH:MM or \"off\"".into());
        }
        if let Some(q) = &self.quiet_hours {
            if parse_window(q).is_none() {
                p.push("alerts.quiet_hours must be HH:MM-HH:MM".into());
            }
        }
        if self.day_starts_hour >= self.day_ends_hour || self.day_ends_hour > 24 {
            p.push("alerts.day_starts_hour must be before alerts.day_ends_hour".into());
        }
        for (from, to) in &self.fallback {
            for c in [from, to] {
                if !["sms", "email", "im"].contains(&c.as_str()) {
                    p.push(format!(
                        "alerts.fallback: {c} is not a channel (sms, email, im)"
                    ));
                }
            }
        }
        if url::Url::parse(&self.public_url).is_err() {
            p.push("alerts.public_url must be a URL".into());
        }
        if !self.link_secret.expose().is_empty() && self.link_secret.expose().len() < 32 {
            p.push("alerts.link_secret must have at least 32 characters".into());
        }
        if self.max_per_contact_per_hour < 1 {
            p.push("alerts.max_per_contact_per_hour must be at least 1 (0 would suppress every non-urgent notification)".into());
        }
        if self.link_ttl < Duration::from_secs(60) {
            p.push("alerts.link_ttl must be at least 1m".into());
        }
        if self.fall_cancel_window > Duration::from_secs(300) {
            p.push(
                "alerts.fall_cancel_window must be at most 5m (a fallen elder waits that long)"
                    .into(),
            );
        }
        for (rule, t) in &self.thresholds {
            let needs_bound = !matches!(rule.as_str(), "not_worn" | "geofence_exit");
            if needs_bound && t.above.is_none() && t.below.is_none() {
                p.push(format!(
                    "alerts.thresholds.{rule} needs \"above\" or \"below\""
                ));
            }
        }
        if self.max_attempts < 1 {
            p.push("alerts.max_attempts must be at least 1".into());
        }
        p
    }

    pub fn policy(&self, severity: &str) -> Option<&Policy> {
        self.policies.get(severity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        assert!(AlertSettings::default().validate().is_empty());
    }

    #[test]
    fn windows() {
        assert_eq!(parse_window("22:00-07:00"), Some((1320, 420)));
        assert_eq!(parse_hhmm("24:00"), None);
    }
}
