//! The console's read queries. Every query that returns an elder's or an alert's data takes
//! the viewer's user id and restricts rows with `sg_user_elder_ids` (alerts of unbound
//! devices, which belong to no elder, are for admins only).

use chrono::{DateTime, FixedOffset, Utc};
use tokio_postgres::{GenericClient, Row};

use super::i18n;
use crate::api::query;
use crate::notify::templates::{kind_label, Lang};

/// `a` (alerts) is visible to user `$1`.
pub const ALERT_SCOPE: &str = "(a.elder_id IN (SELECT sg_user_elder_ids($1))
      OR (a.elder_id IS NULL AND EXISTS (SELECT 1 FROM users su
                                         WHERE su.id = $1 AND su.role = 'admin'
                                           AND NOT su.disabled)))";

/// `d` (devices) is visible to user `$1`: its elder is, or (admins) it is unbound.
pub const DEVICE_SCOPE: &str = "(d.elder_id IN (SELECT sg_user_elder_ids($1))
      OR (d.elder_id IS NULL AND EXISTS (SELECT 1 FROM users su
                                         WHERE su.id = $1 AND su.role = 'admin'
                                           AND NOT su.disabled)))";

fn cst() -> FixedOffset {
    FixedOffset::east_opt(8 * 3600).expect("UTC+8")
}

/// China Standard Time, as people in the programme read clocks.
pub fn fmt_time(t: DateTime<Utc>) -> String {
    t.with_timezone(&cst()).format("%Y-%m-%d %H:%M").to_string()
}

pub fn fmt_time_s(t: DateTime<Utc>) -> String {
    t.with_timezone(&cst()).format("%m-%d %H:%M:%S").to_string()
}

pub fn fmt_opt_time(t: Option<DateTime<Utc>>, lang: Lang) -> String {
    t.map(fmt_time)
        .unwrap_or_else(|| i18n::t(lang, "unknown").to_string())
}

/// The kind shown to people: a fall the wearer cancelled reads as such.
pub fn display_kind(kind: &str, detail: &serde_json::Value) -> String {
    if kind == "fall" && detail.get("cancelled_by_wearer").and_then(|v| v.as_bool()) == Some(true) {
        "fall_cancelled".into()
    } else {
        kind.into()
    }
}

/// One line of the live board.
#[derive(Debug, Clone)]
pub struct BoardRow {
    pub id: i64,
    pub elder_id: Option<i64>,
    pub elder_name: String,
    pub kind: String,
    pub kind_label: &'static str,
    pub severity: String,
    pub severity_label: &'static str,
    pub status: String,
    pub status_label: &'static str,
    pub opened_ms: i64,
    pub opened: String,
    pub age: String,
    pub grid: String,
    pub repeat_count: i32,
    pub acknowledged_by: Option<String>,
}

const BOARD_SELECT: &str = "SELECT a.id, a.elder_id, coalesce(e.name, a.device_id, '?'), a.kind,
        a.severity, a.status, a.opened_at, a.repeat_count, a.acknowledged_by,
        coalesce(r.name, ''), a.detail,
        extract(epoch FROM now() - a.opened_at)::float8
   FROM alerts a
   LEFT JOIN elders e ON e.id = a.elder_id
   LEFT JOIN regions r ON r.id = e.region_id";

const BOARD_ORDER: &str = "ORDER BY (a.status = 'open') DESC,
          CASE a.severity WHEN 'critical' THEN 0 WHEN 'high' THEN 1 WHEN 'medium' THEN 2 ELSE 3 END,
          a.opened_at DESC, a.id DESC";

fn board_row(r: &Row, lang: Lang) -> BoardRow {
    let kind: String = r.get(3);
    let detail: serde_json::Value = r.get(10);
    let shown = display_kind(&kind, &detail);
    let severity: String = r.get(4);
    let status: String = r.get(5);
    let opened: DateTime<Utc> = r.get(6);
    let age_s: f64 = r.get(11);
    BoardRow {
        id: r.get(0),
        elder_id: r.get(1),
        elder_name: r.get(2),
        kind_label: kind_label(&shown, lang),
        kind,
        severity_label: i18n::severity_label(&severity, lang),
        severity,
        status_label: i18n::status_label(&status, lang),
        status,
        opened_ms: opened.timestamp_millis(),
        opened: fmt_time(opened),
        age: i18n::age(age_s as i64, lang),
        grid: r.get(9),
        repeat_count: r.get(7),
        acknowledged_by: r.get(8),
    }
}

/// Active (open or acknowledged) alerts the user may see: open first, most severe first,
/// newest first.
pub async fn board_rows<C: GenericClient>(
    client: &C,
    user_id: i64,
    lang: Lang,
) -> Result<Vec<BoardRow>, tokio_postgres::Error> {
    let rows = client
        .query(
            &format!(
                "{BOARD_SELECT} WHERE a.status <> 'resolved' AND {ALERT_SCOPE} {BOARD_ORDER} LIMIT 500"
            ),
            &[&user_id],
        )
        .await?;
    Ok(rows.iter().map(|r| board_row(r, lang)).collect())
}

/// One alert as a board row, if the user may see it (whatever its status).
pub async fn board_row_by_id<C: GenericClient>(
    client: &C,
    user_id: i64,
    alert_id: i64,
    lang: Lang,
) -> Result<Option<BoardRow>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            &format!("{BOARD_SELECT} WHERE a.id = $2 AND {ALERT_SCOPE}"),
            &[&user_id, &alert_id],
        )
        .await?;
    Ok(row.map(|r| board_row(&r, lang)))
}

/// A map position in degrees.
#[derive(Debug, Clone, Copy)]
pub struct Position {
    pub lat: f64,
    pub lon: f64,
}

impl Position {
    pub fn from_e7(lat: Option<i32>, lon: Option<i32>) -> Option<Position> {
        let (lat, lon) = (lat? as f64 / 1e7, lon? as f64 / 1e7);
        (lat.abs() <= 90.0 && lon.abs() <= 180.0 && (lat != 0.0 || lon != 0.0))
            .then_some(Position { lat, lon })
    }

    /// Amap (高德) marker. The bracelet reports WGS-84 and Amap draws GCJ-02, so the pin can
    /// sit a few hundred metres off; the written address is on the page too.
    pub fn amap(&self) -> String {
        format!(
            "https://uri.amap.com/marker?position={:.6},{:.6}",
            self.lon, self.lat
        )
    }

    pub fn osm(&self) -> String {
        format!(
            "https://www.openstreetmap.org/?mlat={lat:.6}&mlon={lon:.6}#map=17/{lat:.6}/{lon:.6}",
            lat = self.lat,
            lon = self.lon
        )
    }

    pub fn text(&self) -> String {
        format!("{:.5}, {:.5}", self.lat, self.lon)
    }
}

#[derive(Debug, Clone)]
pub struct AlertDetail {
    pub row: BoardRow,
    pub device_id: Option<String>,
    pub occurred: String,
    pub acknowledged_at: Option<String>,
    pub ack_channel: Option<String>,
    pub resolved_at: Option<String>,
    pub resolved_by: Option<String>,
    pub resolution_note: Option<String>,
    pub position: Option<Position>,
    pub detail: String,
    pub elder: Option<ElderBrief>,
}

#[derive(Debug, Clone)]
pub struct ElderBrief {
    pub id: i64,
    pub name: String,
    pub address: Option<String>,
    pub phone: Option<String>,
    pub home: Option<Position>,
    pub age: Option<i32>,
    pub conditions: Vec<String>,
}

/// An alert the user may see, with its elder; None outside the user's scope.
pub async fn alert_detail<C: GenericClient>(
    client: &C,
    user_id: i64,
    alert_id: i64,
    lang: Lang,
) -> Result<Option<AlertDetail>, tokio_postgres::Error> {
    let Some(row) = board_row_by_id(client, user_id, alert_id, lang).await? else {
        return Ok(None);
    };
    let r = client
        .query_one(
            "SELECT a.device_id, a.occurred_at, a.acknowledged_at, a.ack_channel, a.resolved_at,
                    a.resolved_by, a.resolution_note, a.lat_e7, a.lon_e7, a.detail,
                    e.id, e.name, e.address, e.phone, e.home_lat_e7, e.home_lon_e7,
                    extract(year FROM age(e.birth_date))::int4, e.conditions
               FROM alerts a LEFT JOIN elders e ON e.id = a.elder_id
              WHERE a.id = $1",
            &[&alert_id],
        )
        .await?;
    let detail: serde_json::Value = r.get(9);
    let elder = r.get::<_, Option<i64>>(10).map(|id| ElderBrief {
        id,
        name: r.get(11),
        address: r.get(12),
        phone: r.get(13),
        home: Position::from_e7(r.get(14), r.get(15)),
        age: r.get(16),
        conditions: r.get::<_, Option<Vec<String>>>(17).unwrap_or_default(),
    });
    Ok(Some(AlertDetail {
        row,
        device_id: r.get(0),
        occurred: fmt_time(r.get(1)),
        acknowledged_at: r.get::<_, Option<DateTime<Utc>>>(2).map(fmt_time_s),
        ack_channel: r.get(3),
        resolved_at: r.get::<_, Option<DateTime<Utc>>>(4).map(fmt_time_s),
        resolved_by: r.get(5),
        resolution_note: r.get(6),
        position: Position::from_e7(r.get(7), r.get(8)),
        detail: describe_detail(&detail),
        elder,
    }))
}

/// "hr_bpm: 142, for_s: 120" from the alert's detail object, for people.
fn describe_detail(v: &serde_json::Value) -> String {
    match v.as_object() {
        Some(m) if !m.is_empty() => m
            .iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => format!("{k}: {s}"),
                other => format!("{k}: {other}"),
            })
            .collect::<Vec<_>>()
            .join(", "),
        _ => String::new(),
    }
}

#[derive(Debug, Clone)]
pub struct TimelineEntry {
    pub at: String,
    pub entry: String,
    pub label: String,
    pub actor: String,
    pub channel: String,
    pub detail: String,
}

/// The alert's timeline (`query::alert_timeline`, scoped), labelled for people.
pub async fn timeline<C: GenericClient>(
    client: &C,
    user_id: i64,
    alert_id: i64,
    lang: Lang,
) -> Result<Vec<TimelineEntry>, tokio_postgres::Error> {
    let entries = query::alert_timeline(client, user_id, alert_id)
        .await?
        .unwrap_or_default();
    Ok(entries
        .into_iter()
        .map(|t| TimelineEntry {
            at: fmt_time_s(t.at),
            label: i18n::label_or(lang, "tl", &t.entry),
            entry: t.entry,
            actor: t.actor.unwrap_or_default(),
            channel: t.channel.unwrap_or_default(),
            detail: describe_detail(&t.detail),
        })
        .collect())
}

/// A bracelet's latest readings.
#[derive(Debug, Clone, Default)]
pub struct Vitals {
    pub at: String,
    pub hr: String,
    pub spo2: String,
    pub bp: String,
    pub temp: String,
    pub steps: String,
    pub battery: String,
}

fn opt<T: std::fmt::Display>(v: Option<T>, unit: &str) -> String {
    v.map(|v| format!("{v}{unit}"))
        .unwrap_or_else(|| "–".into())
}

fn vitals_from(r: &Row, base: usize) -> Vitals {
    let sys: Option<i16> = r.get(base + 3);
    let dia: Option<i16> = r.get(base + 4);
    let temp: Option<i16> = r.get(base + 5);
    Vitals {
        at: r
            .get::<_, Option<DateTime<Utc>>>(base)
            .map(fmt_time_s)
            .unwrap_or_else(|| "–".into()),
        hr: opt(r.get::<_, Option<i16>>(base + 1), " bpm"),
        spo2: opt(r.get::<_, Option<i16>>(base + 2), "%"),
        bp: match (sys, dia) {
            (Some(s), Some(d)) => format!("{s}/{d} mmHg"),
            _ => "–".into(),
        },
        temp: temp
            .map(|t| format!("{:.1} ℃", t as f64 / 10.0))
            .unwrap_or_else(|| "–".into()),
        steps: opt(r.get::<_, Option<i32>>(base + 6), ""),
        battery: opt(r.get::<_, Option<i16>>(base + 7), "%"),
    }
}

/// The latest readings and the last heartbeats (two hours at most) of a device.
pub async fn recent_vitals<C: GenericClient>(
    client: &C,
    device_id: &str,
) -> Result<(Option<Vitals>, Vec<Vitals>), tokio_postgres::Error> {
    let latest = client
        .query_opt(
            "SELECT last_hb_at, heart_rate_bpm, spo2_pct, systolic_mmhg, diastolic_mmhg,
                    skin_temp_dc, steps_today, battery_pct
               FROM device_current WHERE device_id = $1",
            &[&device_id],
        )
        .await?
        .map(|r| vitals_from(&r, 0));
    let rows = client
        .query(
            "SELECT ts, nullif(heart_rate_bpm, 0), nullif(spo2_pct, 0), nullif(systolic_mmhg, 0),
                    nullif(diastolic_mmhg, 0), skin_temp_dc, steps_today, battery_pct
               FROM heartbeats
              WHERE device_id = $1 AND ts > now() - interval '2 hours'
                AND ts < now() + interval '5 minutes'
              ORDER BY ts DESC LIMIT 12",
            &[&device_id],
        )
        .await?;
    Ok((latest, rows.iter().map(|r| vitals_from(r, 0)).collect()))
}

#[derive(Debug, Clone)]
pub struct ContactLine {
    pub name: String,
    pub role: String,
    pub phone: Option<String>,
}

pub async fn elder_contacts<C: GenericClient>(
    client: &C,
    elder_id: i64,
    lang: Lang,
) -> Result<Vec<ContactLine>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT c.name, ec.role, c.phone FROM elder_contacts ec
               JOIN contacts c ON c.id = ec.contact_id
              WHERE ec.elder_id = $1
              ORDER BY CASE ec.role WHEN 'grid_worker' THEN 0 WHEN 'guardian' THEN 1
                                    WHEN 'backup_grid_worker' THEN 2
                                    WHEN 'community_supervisor' THEN 3 ELSE 4 END,
                       ec.priority, c.name",
            &[&elder_id],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| ContactLine {
            name: r.get(0),
            role: i18n::label_or(lang, "contact", &r.get::<_, String>(1)),
            phone: r.get(2),
        })
        .collect())
}

#[derive(Debug, Clone)]
pub struct ElderProfile {
    pub id: i64,
    pub name: String,
    pub gender: String,
    pub age: Option<i32>,
    pub birth_date: Option<String>,
    pub phone: Option<String>,
    pub address: Option<String>,
    pub home: Option<Position>,
    pub region: String,
    pub categories: Vec<String>,
    pub conditions: Vec<String>,
    pub medications: Vec<String>,
    pub notes: Option<String>,
}

/// An elder's record, or None outside the user's scope.
pub async fn elder_profile<C: GenericClient>(
    client: &C,
    user_id: i64,
    elder_id: i64,
    lang: Lang,
) -> Result<Option<ElderProfile>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT e.id, e.name, e.gender, extract(year FROM age(e.birth_date))::int4,
                    e.birth_date::text, e.phone, e.address, e.home_lat_e7, e.home_lon_e7,
                    coalesce(r.name, e.community, ''), e.categories, e.conditions, e.medications,
                    e.notes
               FROM elders e LEFT JOIN regions r ON r.id = e.region_id
              WHERE e.id = $2 AND e.id IN (SELECT sg_user_elder_ids($1))",
            &[&user_id, &elder_id],
        )
        .await?;
    Ok(row.map(|r| {
        let gender: Option<String> = r.get(2);
        ElderProfile {
            id: r.get(0),
            name: r.get(1),
            gender: match gender.as_deref() {
                Some("female") => i18n::t(lang, "elder.female").into(),
                Some("male") => i18n::t(lang, "elder.male").into(),
                _ => "–".into(),
            },
            age: r.get(3),
            birth_date: r.get(4),
            phone: r.get(5),
            address: r.get(6),
            home: Position::from_e7(r.get(7), r.get(8)),
            region: r.get(9),
            categories: r
                .get::<_, Vec<String>>(10)
                .iter()
                .map(|c| i18n::label_or(lang, "cat", c))
                .collect(),
            conditions: r.get(11),
            medications: r.get(12),
            notes: r.get(13),
        }
    }))
}

#[derive(Debug, Clone)]
pub struct DeviceLine {
    pub device_id: String,
    pub model: String,
    pub elder_id: Option<i64>,
    pub elder_name: String,
    pub region: String,
    pub battery: Option<i16>,
    pub battery_text: String,
    pub low_battery: bool,
    pub last_seen: String,
    pub worn: String,
    pub online: String,
    pub silent: bool,
}

/// Devices the user may see, silent ones first, then by battery (the console's triage
/// order over the whole fleet; `query::list_devices` pages by device id).
pub async fn fleet<C: GenericClient>(
    client: &C,
    user_id: i64,
    elder_id: Option<i64>,
    lang: Lang,
) -> Result<Vec<DeviceLine>, tokio_postgres::Error> {
    let rows = client
        .query(
            &format!(
                "SELECT d.device_id, coalesce(d.model, ''), d.elder_id, e.name,
                        coalesce(r.name, ''), l.battery_pct, l.last_seen_at, l.worn, l.online,
                        -- The same test as query::list_devices (and the API).
                        (l.last_seen_at IS NULL
                         OR coalesce(l.silent_after,
                                     l.last_seen_at + make_interval(secs => d.heartbeat_interval_s * $3))
                            < now()) AS silent,
                        extract(epoch FROM now() - l.last_seen_at)::float8
                   FROM devices d
                   LEFT JOIN device_current l ON l.device_id = d.device_id
                   LEFT JOIN elders e ON e.id = d.elder_id
                   LEFT JOIN regions r ON r.id = e.region_id
                  WHERE {DEVICE_SCOPE} AND ($2::bigint IS NULL OR d.elder_id = $2)
                  ORDER BY silent DESC, l.battery_pct ASC NULLS FIRST, d.device_id
                  LIMIT 5000"
            ),
            &[&user_id, &elder_id, &query::SILENT_INTERVALS],
        )
        .await?;
    let yes_no = |v: Option<bool>| match v {
        Some(true) => i18n::t(lang, "yes"),
        Some(false) => i18n::t(lang, "no"),
        None => "–",
    };
    Ok(rows
        .iter()
        .map(|r| {
            let battery: Option<i16> = r.get(5);
            let seen: Option<DateTime<Utc>> = r.get(6);
            let ago: Option<f64> = r.get(10);
            DeviceLine {
                device_id: r.get(0),
                model: r.get(1),
                elder_id: r.get(2),
                elder_name: r
                    .get::<_, Option<String>>(3)
                    .unwrap_or_else(|| i18n::t(lang, "fleet.unbound").into()),
                region: r.get(4),
                battery,
                battery_text: opt(battery, "%"),
                low_battery: battery.is_some_and(|b| b <= query::LOW_BATTERY_PCT),
                last_seen: match (seen, ago) {
                    (Some(t), Some(a)) => {
                        format!("{} ({})", fmt_time(t), i18n::age(a as i64, lang))
                    }
                    _ => i18n::t(lang, "fleet.never").into(),
                },
                worn: yes_no(r.get(7)).into(),
                online: yes_no(r.get(8)).into(),
                silent: r.get(9),
            }
        })
        .collect())
}

#[derive(Debug, Clone)]
pub struct EventLine {
    pub at: String,
    pub kind: String,
    pub device_id: String,
    pub battery: String,
}

/// The latest events of the bracelets the elder wore (`query::elder_events`).
pub async fn elder_events<C: GenericClient>(
    client: &C,
    user_id: i64,
    elder_id: i64,
    lang: Lang,
) -> Result<Vec<EventLine>, tokio_postgres::Error> {
    let page = query::elder_events(
        client,
        user_id,
        elder_id,
        &query::EventFilter {
            since: Some(Utc::now() - chrono::Duration::days(30)),
            limit: 20,
            ..Default::default()
        },
    )
    .await?;
    Ok(page
        .map(|p| p.items)
        .unwrap_or_default()
        .into_iter()
        .map(|e| EventLine {
            at: fmt_time_s(e.occurred_at),
            kind: i18n::label_or(lang, "event", &e.kind),
            device_id: e.device_id,
            battery: opt(e.battery_pct, "%"),
        })
        .collect())
}

/// The elder's latest alerts, any status.
pub async fn elder_alerts<C: GenericClient>(
    client: &C,
    user_id: i64,
    elder_id: i64,
    lang: Lang,
) -> Result<Vec<BoardRow>, tokio_postgres::Error> {
    let rows = client
        .query(
            &format!(
                "{BOARD_SELECT} WHERE a.elder_id = $2 AND {ALERT_SCOPE}
                 ORDER BY a.opened_at DESC LIMIT 20"
            ),
            &[&user_id, &elder_id],
        )
        .await?;
    Ok(rows.iter().map(|r| board_row(r, lang)).collect())
}

/// One 5-minute bucket of readings: (start ms, [min, avg, max] per metric).
#[derive(Debug, Clone, Default)]
pub struct Bucket {
    pub at_ms: i64,
    pub hr: Option<[f64; 3]>,
    pub spo2: Option<[f64; 3]>,
    pub sys: Option<[f64; 3]>,
    pub dia: Option<[f64; 3]>,
    pub temp: Option<[f64; 3]>,
}

fn triple(s: &query::Stat) -> Option<[f64; 3]> {
    Some([s.min?, s.avg?, s.max?])
}

/// The last 24 hours of an elder's readings in 5-minute buckets, from the bracelets they
/// wore (`query::telemetry_buckets`).
pub async fn vitals_buckets<C: GenericClient>(
    client: &C,
    user_id: i64,
    elder_id: i64,
) -> Result<Vec<Bucket>, tokio_postgres::Error> {
    let now = Utc::now();
    let buckets = query::telemetry_buckets(
        client,
        user_id,
        elder_id,
        now - chrono::Duration::hours(24),
        now + chrono::Duration::minutes(5),
        query::BucketWidth::FiveMinutes,
    )
    .await?
    .unwrap_or_default();
    Ok(buckets
        .iter()
        .map(|b| Bucket {
            at_ms: b.start.timestamp_millis(),
            hr: triple(&b.heart_rate_bpm),
            spo2: triple(&b.spo2_pct),
            sys: triple(&b.systolic_mmhg),
            dia: triple(&b.diastolic_mmhg),
            temp: triple(&b.skin_temp_c),
        })
        .collect())
}

/// Per-region figures (`query::dashboard`), with each region's depth in the tree.
pub async fn region_stats<C: GenericClient>(
    client: &C,
    user_id: i64,
    days: i32,
) -> Result<Vec<(usize, query::RegionStats)>, tokio_postgres::Error> {
    let now = Utc::now();
    let stats = query::dashboard(
        client,
        user_id,
        &query::DashboardFilter {
            since: now - chrono::Duration::days(days as i64),
            week_start: query::week_start_of(now),
            level: None,
            region: None,
        },
    )
    .await?;
    // Depth: how many of the listed regions are ancestors of each (rows come in tree order).
    let mut depth: std::collections::HashMap<i64, usize> = std::collections::HashMap::new();
    Ok(stats
        .into_iter()
        .map(|s| {
            let d = s
                .parent_id
                .and_then(|p| depth.get(&p).map(|d| d + 1))
                .unwrap_or(0);
            depth.insert(s.region_id, d);
            (d, s)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_validate_and_link() {
        assert!(Position::from_e7(None, Some(1)).is_none());
        assert!(Position::from_e7(Some(0), Some(0)).is_none());
        assert!(Position::from_e7(Some(950_000_000), Some(0)).is_none());
        let p = Position::from_e7(Some(302_741_000), Some(1_201_551_000)).unwrap();
        assert_eq!(
            p.amap(),
            "https://uri.amap.com/marker?position=120.155100,30.274100"
        );
        assert!(p
            .osm()
            .starts_with("https://www.openstreetmap.org/?mlat=30.274100&mlon=120.155100"));
    }

    #[test]
    fn a_cancelled_fall_reads_as_such() {
        let d = serde_json::json!({"cancelled_by_wearer": true});
        assert_eq!(display_kind("fall", &d), "fall_cancelled");
        assert_eq!(display_kind("sos", &d), "sos");
        assert_eq!(
            describe_detail(&serde_json::json!({"a": "x", "b": 2})),
            "a: x, b: 2"
        );
    }
}
