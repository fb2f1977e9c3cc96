//! Read models shared by the REST API (`/api/v1`) and the console: scoped list and detail
//! queries for elders, alerts and their timelines, devices (the fleet), telemetry in time
//! buckets, elder events, regions and the per-region dashboard.
//!
//! Every function takes any [`GenericClient`] (a pooled client or a transaction) and the
//! viewer's user id, and restricts rows with the database's one definition of scope
//! (`sg_user_elder_ids`, `sg_user_region_ids`, migrations/0004_console.sql). A record outside
//! the viewer's scope is indistinguishable from a missing one: detail functions answer
//! `Ok(None)` for both, so callers answer 404.
//!
//! Alerts and devices that belong to no elder (an unbound bracelet) are visible to admins
//! only.
//!
//! Lists are keyset-paginated: each [`Page`] carries an opaque `next_cursor`; the filter
//! types take the decoded position (see [`Cursor`]).

use base64::Engine;
use chrono::{DateTime, Datelike, Duration as ChronoDuration, NaiveDate, Utc};
use serde::Serialize;
use tokio_postgres::{GenericClient, Row};
use utoipa::ToSchema;

/// Default page size of every list.
pub const DEFAULT_LIMIT: i64 = 50;
/// Largest page size a client may ask for.
pub const MAX_LIMIT: i64 = 500;
/// A battery at or under this percentage is "low" in fleet views.
pub const LOW_BATTERY_PCT: i16 = 20;
/// Silence (no data) for this many heartbeat intervals makes a device "silent" when the
/// ingest has not computed a deadline for it.
pub const SILENT_INTERVALS: i32 = 3;

/// `a` (alerts) is visible to user `$1`.
const ALERT_SCOPE: &str = "(a.elder_id IN (SELECT sg_user_elder_ids($1))
      OR (a.elder_id IS NULL AND EXISTS (SELECT 1 FROM users su
                                         WHERE su.id = $1 AND su.role = 'admin'
                                           AND NOT su.disabled)))";

/// `d` (devices) is visible to user `$1`: its elder is, or (admins) it is unbound.
const DEVICE_SCOPE: &str = "(d.elder_id IN (SELECT sg_user_elder_ids($1))
      OR (d.elder_id IS NULL AND EXISTS (SELECT 1 FROM users su
                                         WHERE su.id = $1 AND su.role = 'admin'
                                           AND NOT su.disabled)))";

/// The regions under (and including) the region with code `$n`.
fn subtree_of_code(param: usize) -> String {
    format!(
        "(SELECT sr.id FROM regions sr, regions stop
           WHERE stop.code = ${param} AND left(sr.path, length(stop.path)) = stop.path)"
    )
}

// ---------------------------------------------------------------------------------------
// Pagination
// ---------------------------------------------------------------------------------------

/// One page of a list. `next_cursor` is absent on the last page; pass it back as `cursor`
/// to get the next one.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Page<T: ToSchema> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

impl<T: ToSchema> Page<T> {
    /// `rows` was fetched with `limit + 1`: the extra row (dropped) says there is more.
    fn from_rows(mut items: Vec<T>, limit: i64, key: impl Fn(&T) -> Cursor) -> Page<T> {
        let more = items.len() as i64 > limit;
        if more {
            items.truncate(limit as usize);
        }
        let next_cursor = if more {
            items.last().map(|t| key(t).encode())
        } else {
            None
        };
        Page { items, next_cursor }
    }
}

/// A position in a list: the sort key of the last item seen. Encoded opaquely (base64url)
/// so that clients do not build their own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cursor {
    /// Lists ordered by a numeric id.
    Id(i64),
    /// Lists ordered by a text key (device ids).
    Text(String),
    /// Lists ordered by a time, then id (newest first).
    TimeId(DateTime<Utc>, i64),
}

impl Cursor {
    pub fn encode(&self) -> String {
        let raw = match self {
            Cursor::Id(id) => format!("i:{id}"),
            Cursor::Text(t) => format!("t:{t}"),
            Cursor::TimeId(t, id) => format!(
                "ti:{}|{id}",
                t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
            ),
        };
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    }

    /// `None` for anything this module did not produce.
    pub fn decode(s: &str) -> Option<Cursor> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s.trim())
            .ok()?;
        let raw = String::from_utf8(bytes).ok()?;
        let (kind, rest) = raw.split_once(':')?;
        match kind {
            "i" => rest.parse().ok().map(Cursor::Id),
            "t" => Some(Cursor::Text(rest.to_string())),
            "ti" => {
                let (t, id) = rest.split_once('|')?;
                Some(Cursor::TimeId(
                    DateTime::parse_from_rfc3339(t).ok()?.with_timezone(&Utc),
                    id.parse().ok()?,
                ))
            }
            _ => None,
        }
    }

    pub fn as_id(&self) -> Option<i64> {
        match self {
            Cursor::Id(id) => Some(*id),
            _ => None,
        }
    }

    pub fn as_text(&self) -> Option<&str> {
        match self {
            Cursor::Text(t) => Some(t),
            _ => None,
        }
    }

    pub fn as_time_id(&self) -> Option<(DateTime<Utc>, i64)> {
        match self {
            Cursor::TimeId(t, id) => Some((*t, *id)),
            _ => None,
        }
    }
}

/// A page size within 1..=MAX_LIMIT (DEFAULT_LIMIT when absent).
pub fn clamp_limit(limit: Option<i64>) -> i64 {
    limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT)
}

/// `%` and `_` in user input match themselves in ILIKE.
fn like_pattern(q: &str) -> String {
    let escaped = q
        .trim()
        .replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_");
    format!("%{escaped}%")
}

// ---------------------------------------------------------------------------------------
// Common pieces
// ---------------------------------------------------------------------------------------

/// A position in degrees (WGS-84 as the bracelet reports it).
#[derive(Debug, Clone, Copy, Serialize, ToSchema, PartialEq)]
pub struct LatLon {
    pub lat: f64,
    pub lon: f64,
}

fn lat_lon(lat_e7: Option<i32>, lon_e7: Option<i32>) -> Option<LatLon> {
    Some(LatLon {
        lat: lat_e7? as f64 / 1e7,
        lon: lon_e7? as f64 / 1e7,
    })
}

/// Whether the viewer may see this elder (same rule as every list).
pub async fn can_see_elder<C: GenericClient>(
    client: &C,
    viewer: i64,
    elder_id: i64,
) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM sg_user_elder_ids($1) AS v(id) WHERE v.id = $2)",
            &[&viewer, &elder_id],
        )
        .await?
        .get(0))
}

/// Whether the viewer is an (enabled) admin.
async fn is_admin<C: GenericClient>(
    client: &C,
    viewer: i64,
) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM users WHERE id = $1 AND role = 'admin' AND NOT disabled)",
            &[&viewer],
        )
        .await?
        .get(0))
}

// ---------------------------------------------------------------------------------------
// Regions
// ---------------------------------------------------------------------------------------

/// A region of the three-tier network, with how many of the viewer's elders live under it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RegionNode {
    pub id: i64,
    pub parent_id: Option<i64>,
    /// `city`, `township`, `community` or `grid`.
    pub level: String,
    pub code: String,
    pub name: String,
    /// Ids from the root, e.g. `/1/4/17/`.
    pub path: String,
    /// Elders (visible to the viewer) living in this region or below it.
    pub elders: i64,
}

/// The regions the viewer may see, in tree order (a parent before its children). `under`
/// restricts to one region's subtree (by code).
pub async fn list_regions<C: GenericClient>(
    client: &C,
    viewer: i64,
    under: Option<&str>,
) -> Result<Vec<RegionNode>, tokio_postgres::Error> {
    let rows = client
        .query(
            &format!(
                "WITH vis AS (SELECT e.id, er.path FROM elders e
                                JOIN regions er ON er.id = e.region_id
                               WHERE e.id IN (SELECT sg_user_elder_ids($1)))
                 SELECT r.id, r.parent_id, r.level, r.code, r.name, r.path,
                        (SELECT count(*) FROM vis WHERE left(vis.path, length(r.path)) = r.path)
                   FROM regions r
                  WHERE r.id IN (SELECT sg_user_region_ids($1))
                    AND ($2::text IS NULL OR r.id IN {})
                  ORDER BY r.path",
                subtree_of_code(2)
            ),
            &[&viewer, &under],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| RegionNode {
            id: r.get(0),
            parent_id: r.get(1),
            level: r.get(2),
            code: r.get(3),
            name: r.get(4),
            path: r.get(5),
            elders: r.get(6),
        })
        .collect())
}

/// One region by code, when the viewer may see it.
pub async fn get_region<C: GenericClient>(
    client: &C,
    viewer: i64,
    code: &str,
) -> Result<Option<RegionNode>, tokio_postgres::Error> {
    Ok(list_regions(client, viewer, Some(code))
        .await?
        .into_iter()
        .find(|r| r.code == code))
}

// ---------------------------------------------------------------------------------------
// Elders
// ---------------------------------------------------------------------------------------

/// An elder in a list.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ElderSummary {
    pub id: i64,
    pub external_ref: Option<String>,
    pub name: String,
    /// `female` or `male`.
    pub gender: Option<String>,
    pub birth_date: Option<NaiveDate>,
    /// The grid the elder lives in.
    pub region_id: Option<i64>,
    pub region_code: Option<String>,
    pub region_name: Option<String>,
    /// `living_alone`, `empty_nest`, `left_behind`, `special_hardship`.
    pub categories: Vec<String>,
    /// Bracelets bound now.
    pub devices: Vec<String>,
    /// Alerts not yet resolved.
    pub open_alerts: i64,
    /// Last time any of the elder's bracelets was heard from.
    pub last_seen_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Default)]
pub struct ElderFilter {
    /// Region code: elders in this region or anywhere below it.
    pub region: Option<String>,
    pub category: Option<String>,
    /// Part of the name, or the exact ledger ref or phone.
    pub q: Option<String>,
    pub has_device: Option<bool>,
    /// Elders after this id (the cursor).
    pub after_id: Option<i64>,
    pub limit: i64,
}

const ELDER_SUMMARY_COLUMNS: &str = "e.id, e.external_ref, e.name, e.gender, e.birth_date,
    e.region_id, r.code, r.name, e.categories,
    ARRAY(SELECT d.device_id FROM devices d WHERE d.elder_id = e.id ORDER BY d.device_id),
    (SELECT count(*) FROM alerts a WHERE a.elder_id = e.id AND a.status <> 'resolved'),
    (SELECT max(l.last_seen_at) FROM devices d JOIN device_current l ON l.device_id = d.device_id
      WHERE d.elder_id = e.id)";

fn elder_summary(r: &Row) -> ElderSummary {
    ElderSummary {
        id: r.get(0),
        external_ref: r.get(1),
        name: r.get(2),
        gender: r.get(3),
        birth_date: r.get(4),
        region_id: r.get(5),
        region_code: r.get(6),
        region_name: r.get(7),
        categories: r.get(8),
        devices: r.get(9),
        open_alerts: r.get(10),
        last_seen_at: r.get(11),
    }
}

/// The viewer's elders, by id.
pub async fn list_elders<C: GenericClient>(
    client: &C,
    viewer: i64,
    f: &ElderFilter,
) -> Result<Page<ElderSummary>, tokio_postgres::Error> {
    let limit = f.limit.clamp(1, MAX_LIMIT);
    let q = f.q.as_deref().map(str::trim).filter(|q| !q.is_empty());
    let pattern = q.map(like_pattern);
    let rows = client
        .query(
            &format!(
                "SELECT {ELDER_SUMMARY_COLUMNS}
                   FROM elders e LEFT JOIN regions r ON r.id = e.region_id
                  WHERE e.id IN (SELECT sg_user_elder_ids($1))
                    AND ($2::text IS NULL OR e.region_id IN {sub})
                    AND ($3::text IS NULL OR $3 = ANY(e.categories))
                    AND ($4::text IS NULL OR e.name ILIKE $5 OR e.external_ref = $4
                         OR e.phone = $4)
                    AND ($6::bool IS NULL
                         OR $6 = EXISTS (SELECT 1 FROM devices d WHERE d.elder_id = e.id))
                    AND ($7::bigint IS NULL OR e.id > $7)
                  ORDER BY e.id
                  LIMIT $8",
                sub = subtree_of_code(2)
            ),
            &[
                &viewer,
                &f.region,
                &f.category,
                &q,
                &pattern,
                &f.has_device,
                &f.after_id,
                &(limit + 1),
            ],
        )
        .await?;
    Ok(Page::from_rows(
        rows.iter().map(elder_summary).collect(),
        limit,
        |e| Cursor::Id(e.id),
    ))
}

/// A contact who answers for an elder, in the registry's order.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ElderContact {
    pub contact_id: i64,
    pub name: String,
    /// `grid_worker`, `backup_grid_worker`, `guardian`, `community_supervisor`,
    /// `township_supervisor`.
    pub role: String,
    pub priority: i32,
    pub phone: Option<String>,
    pub email: Option<String>,
}

/// Everything about one elder a responder needs.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ElderDetail {
    pub id: i64,
    pub external_ref: Option<String>,
    pub name: String,
    pub id_number: Option<String>,
    pub gender: Option<String>,
    pub birth_date: Option<NaiveDate>,
    pub phone: Option<String>,
    pub address: Option<String>,
    pub community: Option<String>,
    pub home: Option<LatLon>,
    pub home_radius_m: i32,
    pub wander_risk: bool,
    pub language: String,
    /// Per-elder overrides of the vital-sign rules.
    #[schema(value_type = Object)]
    pub thresholds: serde_json::Value,
    pub notes: Option<String>,
    pub categories: Vec<String>,
    pub conditions: Vec<String>,
    pub medications: Vec<String>,
    pub region_id: Option<i64>,
    pub region_code: Option<String>,
    pub region_name: Option<String>,
    /// Region names from the city down to the grid.
    pub region_path: Vec<String>,
    pub contacts: Vec<ElderContact>,
    /// Bracelets bound now, with their latest state.
    pub devices: Vec<DeviceSummary>,
    pub open_alerts: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// One elder, when the viewer may see them.
pub async fn get_elder<C: GenericClient>(
    client: &C,
    viewer: i64,
    elder_id: i64,
) -> Result<Option<ElderDetail>, tokio_postgres::Error> {
    let Some(r) = client
        .query_opt(
            "SELECT e.id, e.external_ref, e.name, e.id_number, e.gender, e.birth_date, e.phone,
                    e.address, e.community, e.home_lat_e7, e.home_lon_e7, e.home_radius_m,
                    e.wander_risk, e.language, e.thresholds, e.notes, e.categories,
                    e.conditions, e.medications, e.region_id, r.code, r.name,
                    ARRAY(SELECT a.name FROM regions a
                           WHERE r.path IS NOT NULL AND left(r.path, length(a.path)) = a.path
                           ORDER BY length(a.path)),
                    (SELECT count(*) FROM alerts al
                      WHERE al.elder_id = e.id AND al.status <> 'resolved'),
                    e.created_at, e.updated_at
               FROM elders e LEFT JOIN regions r ON r.id = e.region_id
              WHERE e.id = $2 AND e.id IN (SELECT sg_user_elder_ids($1))",
            &[&viewer, &elder_id],
        )
        .await?
    else {
        return Ok(None);
    };
    let contacts = client
        .query(
            "SELECT c.id, c.name, ec.role, ec.priority, c.phone, c.email
               FROM elder_contacts ec JOIN contacts c ON c.id = ec.contact_id
              WHERE ec.elder_id = $1
              ORDER BY array_position(ARRAY['grid_worker', 'backup_grid_worker', 'guardian',
                                            'community_supervisor', 'township_supervisor'],
                                      ec.role),
                       ec.priority, c.id",
            &[&elder_id],
        )
        .await?
        .iter()
        .map(|c| ElderContact {
            contact_id: c.get(0),
            name: c.get(1),
            role: c.get(2),
            priority: c.get(3),
            phone: c.get(4),
            email: c.get(5),
        })
        .collect();
    let devices = client
        .query(
            &format!("{DEVICE_SELECT} WHERE d.elder_id = $1 ORDER BY d.device_id"),
            &[&elder_id],
        )
        .await?
        .iter()
        .map(device_summary)
        .collect();
    Ok(Some(ElderDetail {
        id: r.get(0),
        external_ref: r.get(1),
        name: r.get(2),
        id_number: r.get(3),
        gender: r.get(4),
        birth_date: r.get(5),
        phone: r.get(6),
        address: r.get(7),
        community: r.get(8),
        home: lat_lon(r.get(9), r.get(10)),
        home_radius_m: r.get(11),
        wander_risk: r.get(12),
        language: r.get(13),
        thresholds: r.get(14),
        notes: r.get(15),
        categories: r.get(16),
        conditions: r.get(17),
        medications: r.get(18),
        region_id: r.get(19),
        region_code: r.get(20),
        region_name: r.get(21),
        region_path: r.get(22),
        open_alerts: r.get(23),
        created_at: r.get(24),
        updated_at: r.get(25),
        contacts,
        devices,
    }))
}

// ---------------------------------------------------------------------------------------
// Alerts
// ---------------------------------------------------------------------------------------

/// An alert as lists and detail pages show it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AlertView {
    pub id: i64,
    pub elder_id: Option<i64>,
    pub elder_name: Option<String>,
    /// The elder's grid.
    pub region_code: Option<String>,
    pub device_id: Option<String>,
    /// `sos`, `fall`, `hr_high`, `silent`, `wellness_check`, ...
    pub kind: String,
    /// `critical`, `high`, `medium`, `low`.
    pub severity: String,
    /// `open`, `acknowledged`, `resolved`.
    pub status: String,
    pub opened_at: DateTime<Utc>,
    /// When the condition started on the device.
    pub occurred_at: DateTime<Utc>,
    pub last_repeat_at: DateTime<Utc>,
    pub repeat_count: i32,
    pub acknowledged_at: Option<DateTime<Utc>>,
    pub acknowledged_by: Option<String>,
    pub ack_channel: Option<String>,
    pub resolved_at: Option<DateTime<Utc>>,
    pub resolved_by: Option<String>,
    pub resolution_note: Option<String>,
    pub auto_resolved: bool,
    /// Where the bracelet was when the alert was raised.
    pub location: Option<LatLon>,
    #[schema(value_type = Object)]
    pub detail: serde_json::Value,
}

const ALERT_SELECT: &str = "SELECT a.id, a.elder_id, e.name, r.code, a.device_id, a.kind,
        a.severity, a.status, a.opened_at, a.occurred_at, a.last_repeat_at, a.repeat_count,
        a.acknowledged_at, a.acknowledged_by, a.ack_channel, a.resolved_at, a.resolved_by,
        a.resolution_note, a.auto_resolved, a.lat_e7, a.lon_e7, a.detail
   FROM alerts a LEFT JOIN elders e ON e.id = a.elder_id
   LEFT JOIN regions r ON r.id = e.region_id";

fn alert_view(r: &Row) -> AlertView {
    AlertView {
        id: r.get(0),
        elder_id: r.get(1),
        elder_name: r.get(2),
        region_code: r.get(3),
        device_id: r.get(4),
        kind: r.get(5),
        severity: r.get(6),
        status: r.get(7),
        opened_at: r.get(8),
        occurred_at: r.get(9),
        last_repeat_at: r.get(10),
        repeat_count: r.get(11),
        acknowledged_at: r.get(12),
        acknowledged_by: r.get(13),
        ack_channel: r.get(14),
        resolved_at: r.get(15),
        resolved_by: r.get(16),
        resolution_note: r.get(17),
        auto_resolved: r.get(18),
        location: lat_lon(r.get(19), r.get(20)),
        detail: r.get(21),
    }
}

#[derive(Debug, Clone, Default)]
pub struct AlertFilter {
    /// Any of these statuses (empty: all).
    pub status: Vec<String>,
    pub kind: Vec<String>,
    pub severity: Vec<String>,
    pub elder_id: Option<i64>,
    pub device_id: Option<String>,
    /// Region code: alerts of elders in this region's subtree.
    pub region: Option<String>,
    /// Opened at or after.
    pub since: Option<DateTime<Utc>>,
    /// Opened before.
    pub until: Option<DateTime<Utc>>,
    /// Alerts older than this (opened_at, id): the cursor.
    pub before: Option<(DateTime<Utc>, i64)>,
    pub limit: i64,
}

/// The viewer's alerts, newest first.
pub async fn list_alerts<C: GenericClient>(
    client: &C,
    viewer: i64,
    f: &AlertFilter,
) -> Result<Page<AlertView>, tokio_postgres::Error> {
    let limit = f.limit.clamp(1, MAX_LIMIT);
    let (before_t, before_id) = f
        .before
        .map(|(t, i)| (Some(t), Some(i)))
        .unwrap_or_default();
    let rows = client
        .query(
            &format!(
                "{ALERT_SELECT}
                  WHERE {ALERT_SCOPE}
                    AND (cardinality($2::text[]) = 0 OR a.status = ANY($2))
                    AND (cardinality($3::text[]) = 0 OR a.kind = ANY($3))
                    AND (cardinality($4::text[]) = 0 OR a.severity = ANY($4))
                    AND ($5::bigint IS NULL OR a.elder_id = $5)
                    AND ($6::text IS NULL OR a.device_id = $6)
                    AND ($7::text IS NULL OR e.region_id IN {sub})
                    AND ($8::timestamptz IS NULL OR a.opened_at >= $8)
                    AND ($9::timestamptz IS NULL OR a.opened_at < $9)
                    AND ($10::timestamptz IS NULL OR (a.opened_at, a.id) < ($10, $11::bigint))
                  ORDER BY a.opened_at DESC, a.id DESC
                  LIMIT $12",
                sub = subtree_of_code(7)
            ),
            &[
                &viewer,
                &f.status,
                &f.kind,
                &f.severity,
                &f.elder_id,
                &f.device_id,
                &f.region,
                &f.since,
                &f.until,
                &before_t,
                &before_id,
                &(limit + 1),
            ],
        )
        .await?;
    Ok(Page::from_rows(
        rows.iter().map(alert_view).collect(),
        limit,
        |a| Cursor::TimeId(a.opened_at, a.id),
    ))
}

/// One alert, when the viewer may see it.
pub async fn get_alert<C: GenericClient>(
    client: &C,
    viewer: i64,
    alert_id: i64,
) -> Result<Option<AlertView>, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            &format!("{ALERT_SELECT} WHERE a.id = $2 AND {ALERT_SCOPE}"),
            &[&viewer, &alert_id],
        )
        .await?
        .map(|r| alert_view(&r)))
}

/// One entry of an alert's timeline.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TimelineEntry {
    pub id: i64,
    pub at: DateTime<Utc>,
    /// `opened`, `notified`, `escalated`, `delivered`, `acknowledged`, `resolved`, ...
    pub entry: String,
    pub actor: Option<String>,
    pub channel: Option<String>,
    #[schema(value_type = Object)]
    pub detail: serde_json::Value,
}

/// An alert's timeline in order, when the viewer may see the alert.
pub async fn alert_timeline<C: GenericClient>(
    client: &C,
    viewer: i64,
    alert_id: i64,
) -> Result<Option<Vec<TimelineEntry>>, tokio_postgres::Error> {
    let visible: bool = client
        .query_one(
            &format!("SELECT EXISTS (SELECT 1 FROM alerts a WHERE a.id = $2 AND {ALERT_SCOPE})"),
            &[&viewer, &alert_id],
        )
        .await?
        .get(0);
    if !visible {
        return Ok(None);
    }
    let rows = client
        .query(
            "SELECT id, at, entry, actor, channel, detail FROM alert_timeline
              WHERE alert_id = $1 ORDER BY id",
            &[&alert_id],
        )
        .await?;
    Ok(Some(
        rows.iter()
            .map(|r| TimelineEntry {
                id: r.get(0),
                at: r.get(1),
                entry: r.get(2),
                actor: r.get(3),
                channel: r.get(4),
                detail: r.get(5),
            })
            .collect(),
    ))
}

// ---------------------------------------------------------------------------------------
// Devices
// ---------------------------------------------------------------------------------------

/// A bracelet with its latest state (the fleet view).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DeviceSummary {
    pub device_id: String,
    pub imei: Option<String>,
    pub model: Option<String>,
    pub firmware: Option<String>,
    pub heartbeat_interval_s: i32,
    pub elder_id: Option<i64>,
    pub elder_name: Option<String>,
    pub region_code: Option<String>,
    pub bound_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub last_seen_at: Option<DateTime<Utc>>,
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    /// As the broker last told (Last Will / presence).
    pub online: Option<bool>,
    pub battery_pct: Option<i16>,
    pub worn: Option<bool>,
    pub heart_rate_bpm: Option<i16>,
    pub spo2_pct: Option<i16>,
    pub location: Option<LatLon>,
    /// Never heard from, or past its silence deadline.
    pub silent: bool,
    /// Battery at or under 20 %.
    pub low_battery: bool,
    /// MQTT credential state: `active`, `revoked`, or absent when never issued.
    pub credential_state: Option<String>,
    pub credential_generation: Option<i32>,
}

/// Columns of [`DeviceSummary`]; `silent` and `low_battery` follow [`SILENT_INTERVALS`]
/// and [`LOW_BATTERY_PCT`].
const DEVICE_SELECT: &str = "SELECT d.device_id, d.imei, d.model, d.firmware,
        d.heartbeat_interval_s, d.elder_id, e.name, r.code, d.bound_at, d.created_at,
        l.last_seen_at, l.last_hb_at, l.online, l.battery_pct, l.worn, l.heart_rate_bpm,
        l.spo2_pct, l.lat_e7, l.lon_e7,
        (l.last_seen_at IS NULL
         OR coalesce(l.silent_after,
                     l.last_seen_at + make_interval(secs => d.heartbeat_interval_s * 3)) < now()),
        coalesce(l.battery_pct <= 20, false),
        CASE WHEN c.device_id IS NULL THEN NULL
             WHEN c.revoked_at IS NULL THEN 'active' ELSE 'revoked' END,
        c.generation
   FROM devices d
   LEFT JOIN device_current l ON l.device_id = d.device_id
   LEFT JOIN elders e ON e.id = d.elder_id
   LEFT JOIN regions r ON r.id = e.region_id
   LEFT JOIN device_credentials c ON c.device_id = d.device_id";

fn device_summary(r: &Row) -> DeviceSummary {
    DeviceSummary {
        device_id: r.get(0),
        imei: r.get(1),
        model: r.get(2),
        firmware: r.get(3),
        heartbeat_interval_s: r.get(4),
        elder_id: r.get(5),
        elder_name: r.get(6),
        region_code: r.get(7),
        bound_at: r.get(8),
        created_at: r.get(9),
        last_seen_at: r.get(10),
        last_heartbeat_at: r.get(11),
        online: r.get(12),
        battery_pct: r.get(13),
        worn: r.get(14),
        heart_rate_bpm: r.get(15),
        spo2_pct: r.get(16),
        location: lat_lon(r.get(17), r.get(18)),
        silent: r.get(19),
        low_battery: r.get(20),
        credential_state: r.get(21),
        credential_generation: r.get(22),
    }
}

#[derive(Debug, Clone, Default)]
pub struct DeviceFilter {
    pub silent: Option<bool>,
    pub online: Option<bool>,
    pub low_battery: Option<bool>,
    /// Bound to an elder (true) or free (false).
    pub bound: Option<bool>,
    pub elder_id: Option<i64>,
    /// Region code: devices of elders in this region's subtree.
    pub region: Option<String>,
    /// Part of the device id or IMEI.
    pub q: Option<String>,
    /// Devices after this id (the cursor).
    pub after: Option<String>,
    pub limit: i64,
}

/// The viewer's devices, by device id.
pub async fn list_devices<C: GenericClient>(
    client: &C,
    viewer: i64,
    f: &DeviceFilter,
) -> Result<Page<DeviceSummary>, tokio_postgres::Error> {
    let limit = f.limit.clamp(1, MAX_LIMIT);
    let pattern =
        f.q.as_deref()
            .map(str::trim)
            .filter(|q| !q.is_empty())
            .map(like_pattern);
    let rows = client
        .query(
            &format!(
                "SELECT * FROM ({DEVICE_SELECT}
                  WHERE {DEVICE_SCOPE}
                    AND ($2::bool IS NULL OR coalesce(l.online, false) = $2)
                    AND ($3::bool IS NULL OR (d.elder_id IS NOT NULL) = $3)
                    AND ($4::bigint IS NULL OR d.elder_id = $4)
                    AND ($5::text IS NULL OR e.region_id IN {sub})
                    AND ($6::text IS NULL OR d.device_id ILIKE $6 OR d.imei ILIKE $6)
                    AND ($7::text IS NULL OR d.device_id > $7)
                 ) AS v(device_id, imei, model, firmware, heartbeat_interval_s, elder_id,
                        elder_name, region_code, bound_at, created_at, last_seen_at,
                        last_hb_at, online, battery_pct, worn, heart_rate_bpm, spo2_pct,
                        lat_e7, lon_e7, silent, low_battery, credential_state,
                        credential_generation)
                 WHERE ($8::bool IS NULL OR v.silent = $8)
                   AND ($9::bool IS NULL OR v.low_battery = $9)
                 ORDER BY v.device_id
                 LIMIT $10",
                sub = subtree_of_code(5)
            ),
            &[
                &viewer,
                &f.online,
                &f.bound,
                &f.elder_id,
                &f.region,
                &pattern,
                &f.after,
                &f.silent,
                &f.low_battery,
                &(limit + 1),
            ],
        )
        .await?;
    Ok(Page::from_rows(
        rows.iter().map(device_summary).collect(),
        limit,
        |d| Cursor::Text(d.device_id.clone()),
    ))
}

/// One device, when the viewer may see it.
pub async fn get_device<C: GenericClient>(
    client: &C,
    viewer: i64,
    device_id: &str,
) -> Result<Option<DeviceSummary>, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            &format!("{DEVICE_SELECT} WHERE d.device_id = $2 AND {DEVICE_SCOPE}"),
            &[&viewer, &device_id],
        )
        .await?
        .map(|r| device_summary(&r)))
}

/// One period during which a bracelet belonged to an elder.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct BindingEntry {
    pub id: i64,
    pub device_id: String,
    /// Absent when the elder's record was removed, or is outside the viewer's scope.
    pub elder_id: Option<i64>,
    pub elder_name: Option<String>,
    pub bound_at: DateTime<Utc>,
    pub bound_by: Option<String>,
    /// Absent while the binding is open.
    pub unbound_at: Option<DateTime<Utc>>,
    pub unbound_by: Option<String>,
}

/// A device's binding history, newest first, when the viewer may see the device. Earlier
/// wearers outside the viewer's scope are not named.
pub async fn device_bindings<C: GenericClient>(
    client: &C,
    viewer: i64,
    device_id: &str,
) -> Result<Option<Vec<BindingEntry>>, tokio_postgres::Error> {
    if get_device(client, viewer, device_id).await?.is_none() {
        return Ok(None);
    }
    let rows = client
        .query(
            "WITH vis AS (SELECT sg_user_elder_ids($1) AS id)
             SELECT b.id, b.device_id,
                    CASE WHEN b.elder_id IN (SELECT id FROM vis) THEN b.elder_id END,
                    CASE WHEN b.elder_id IN (SELECT id FROM vis) THEN e.name END,
                    b.bound_at, b.bound_by, b.unbound_at, b.unbound_by
               FROM device_bindings b LEFT JOIN elders e ON e.id = b.elder_id
              WHERE b.device_id = $2
              ORDER BY b.bound_at DESC, b.id DESC",
            &[&viewer, &device_id],
        )
        .await?;
    Ok(Some(
        rows.iter()
            .map(|r| BindingEntry {
                id: r.get(0),
                device_id: r.get(1),
                elder_id: r.get(2),
                elder_name: r.get(3),
                bound_at: r.get(4),
                bound_by: r.get(5),
                unbound_at: r.get(6),
                unbound_by: r.get(7),
            })
            .collect(),
    ))
}

/// The bracelets an elder has worn, newest first. `None` when the viewer may not see the
/// elder.
pub async fn elder_bindings<C: GenericClient>(
    client: &C,
    viewer: i64,
    elder_id: i64,
) -> Result<Option<Vec<BindingEntry>>, tokio_postgres::Error> {
    if !can_see_elder(client, viewer, elder_id).await? {
        return Ok(None);
    }
    let rows = client
        .query(
            "SELECT b.id, b.device_id, b.elder_id, e.name, b.bound_at, b.bound_by, b.unbound_at,
                    b.unbound_by
               FROM device_bindings b LEFT JOIN elders e ON e.id = b.elder_id
              WHERE b.elder_id = $1
              ORDER BY b.bound_at DESC, b.id DESC",
            &[&elder_id],
        )
        .await?;
    Ok(Some(
        rows.iter()
            .map(|r| BindingEntry {
                id: r.get(0),
                device_id: r.get(1),
                elder_id: r.get(2),
                elder_name: r.get(3),
                bound_at: r.get(4),
                bound_by: r.get(5),
                unbound_at: r.get(6),
                unbound_by: r.get(7),
            })
            .collect(),
    ))
}

// ---------------------------------------------------------------------------------------
// Telemetry and events of an elder
// ---------------------------------------------------------------------------------------

/// The periods during which each bracelet belonged to elder `$2`: the binding history, plus
/// a current binding the history does not (yet) record.
const ELDER_SPANS: &str = "spans AS (
        SELECT b.device_id, b.bound_at AS lo, coalesce(b.unbound_at, 'infinity') AS hi
          FROM device_bindings b WHERE b.elder_id = $2
        UNION ALL
        SELECT d.device_id, coalesce(d.bound_at, '-infinity'), 'infinity'::timestamptz
          FROM devices d
         WHERE d.elder_id = $2
           AND NOT EXISTS (SELECT 1 FROM device_bindings b
                            WHERE b.device_id = d.device_id AND b.elder_id = $2
                              AND b.unbound_at IS NULL))";

/// Width of a telemetry bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub enum BucketWidth {
    #[serde(rename = "5m")]
    FiveMinutes,
    #[serde(rename = "1h")]
    Hour,
    #[serde(rename = "1d")]
    Day,
}

impl BucketWidth {
    pub fn seconds(self) -> i64 {
        match self {
            BucketWidth::FiveMinutes => 300,
            BucketWidth::Hour => 3600,
            BucketWidth::Day => 86_400,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BucketWidth::FiveMinutes => "5m",
            BucketWidth::Hour => "1h",
            BucketWidth::Day => "1d",
        }
    }
}

impl std::str::FromStr for BucketWidth {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "5m" => Ok(BucketWidth::FiveMinutes),
            "1h" => Ok(BucketWidth::Hour),
            "1d" => Ok(BucketWidth::Day),
            other => Err(format!("{other:?} is not a bucket width: 5m, 1h or 1d")),
        }
    }
}

/// Minimum, maximum and mean of one vital sign over a bucket (absent when not measured).
#[derive(Debug, Clone, Copy, Serialize, ToSchema, PartialEq, Default)]
pub struct Stat {
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub avg: Option<f64>,
    /// Readings that measured it.
    pub n: i64,
}

/// One time bucket of an elder's vital signs.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TelemetryBucket {
    /// Start of the bucket. Buckets are aligned to China Standard Time (UTC+8): a day
    /// bucket runs from local midnight to midnight.
    pub start: DateTime<Utc>,
    /// Heartbeats in the bucket.
    pub count: i64,
    pub heart_rate_bpm: Stat,
    pub spo2_pct: Stat,
    pub systolic_mmhg: Stat,
    pub diastolic_mmhg: Stat,
    /// Skin temperature in °C.
    pub skin_temp_c: Stat,
    /// Largest step count reported in the bucket (steps are counted per day).
    pub steps_max: Option<i32>,
    /// Lowest battery reported in the bucket.
    pub battery_min: Option<i16>,
}

/// Origin of the buckets: a Monday midnight in UTC+8.
const BUCKET_ORIGIN: &str = "2000-01-03 00:00:00+08";

/// An elder's heartbeats in `[from, to)` in buckets, from every bracelet they wore in that
/// time (only while they wore it). `None` when the viewer may not see the elder.
pub async fn telemetry_buckets<C: GenericClient>(
    client: &C,
    viewer: i64,
    elder_id: i64,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    width: BucketWidth,
) -> Result<Option<Vec<TelemetryBucket>>, tokio_postgres::Error> {
    if !can_see_elder(client, viewer, elder_id).await? {
        return Ok(None);
    }
    let secs = width.seconds() as f64;
    let rows = client
        .query(
            &format!(
                "WITH {ELDER_SPANS}
                 SELECT date_bin(make_interval(secs => $5), h.ts, '{BUCKET_ORIGIN}'::timestamptz) AS b,
                        count(*),
                        min(h.heart_rate_bpm)::float8, max(h.heart_rate_bpm)::float8,
                        avg(h.heart_rate_bpm)::float8, count(h.heart_rate_bpm),
                        min(h.spo2_pct)::float8, max(h.spo2_pct)::float8,
                        avg(h.spo2_pct)::float8, count(h.spo2_pct),
                        min(h.systolic_mmhg)::float8, max(h.systolic_mmhg)::float8,
                        avg(h.systolic_mmhg)::float8, count(h.systolic_mmhg),
                        min(h.diastolic_mmhg)::float8, max(h.diastolic_mmhg)::float8,
                        avg(h.diastolic_mmhg)::float8, count(h.diastolic_mmhg),
                        min(h.skin_temp_dc)::float8 / 10, max(h.skin_temp_dc)::float8 / 10,
                        avg(h.skin_temp_dc)::float8 / 10, count(h.skin_temp_dc),
                        max(h.steps_today), min(h.battery_pct)
                   FROM heartbeats h
                  WHERE h.ts >= $3 AND h.ts < $4 AND $1::bigint IS NOT NULL
                    AND h.device_id IN (SELECT device_id FROM spans)
                    AND EXISTS (SELECT 1 FROM spans s
                                 WHERE s.device_id = h.device_id AND h.ts >= s.lo AND h.ts < s.hi)
                  GROUP BY 1 ORDER BY 1"
            ),
            &[&viewer, &elder_id, &from, &to, &secs],
        )
        .await?;
    let stat = |r: &Row, i: usize| Stat {
        min: r.get(i),
        max: r.get(i + 1),
        avg: r.get::<_, Option<f64>>(i + 2).map(round2),
        n: r.get(i + 3),
    };
    Ok(Some(
        rows.iter()
            .map(|r| TelemetryBucket {
                start: r.get(0),
                count: r.get(1),
                heart_rate_bpm: stat(r, 2),
                spo2_pct: stat(r, 6),
                systolic_mmhg: stat(r, 10),
                diastolic_mmhg: stat(r, 14),
                skin_temp_c: stat(r, 18),
                steps_max: r.get(22),
                battery_min: r.get(23),
            })
            .collect(),
    ))
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Something a bracelet reported (SOS, fall, worn off, ...).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ElderEvent {
    pub id: i64,
    pub device_id: String,
    /// `sos`, `fall`, `sos_cancel`, `worn_off`, `worn_on`, `low_battery`, `power_off`,
    /// `service_call`.
    pub kind: String,
    pub occurred_at: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    pub battery_pct: Option<i16>,
    pub location: Option<LatLon>,
}

#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub kind: Vec<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// Events older than this (occurred_at, id): the cursor.
    pub before: Option<(DateTime<Utc>, i64)>,
    pub limit: i64,
}

/// An elder's events, newest first, from the bracelets they wore at the time. `None` when
/// the viewer may not see the elder.
pub async fn elder_events<C: GenericClient>(
    client: &C,
    viewer: i64,
    elder_id: i64,
    f: &EventFilter,
) -> Result<Option<Page<ElderEvent>>, tokio_postgres::Error> {
    if !can_see_elder(client, viewer, elder_id).await? {
        return Ok(None);
    }
    let limit = f.limit.clamp(1, MAX_LIMIT);
    let (before_t, before_id) = f
        .before
        .map(|(t, i)| (Some(t), Some(i)))
        .unwrap_or_default();
    let rows = client
        .query(
            &format!(
                "WITH {ELDER_SPANS}
                 SELECT v.id, v.device_id, v.kind, v.occurred_at, v.received_at, v.battery_pct,
                        v.lat_e7, v.lon_e7
                   FROM device_events v
                  WHERE v.device_id IN (SELECT device_id FROM spans)
                    AND EXISTS (SELECT 1 FROM spans s WHERE s.device_id = v.device_id
                                   AND v.occurred_at >= s.lo AND v.occurred_at < s.hi)
                    AND ($1::bigint IS NOT NULL)
                    AND (cardinality($3::text[]) = 0 OR v.kind = ANY($3))
                    AND ($4::timestamptz IS NULL OR v.occurred_at >= $4)
                    AND ($5::timestamptz IS NULL OR v.occurred_at < $5)
                    AND ($6::timestamptz IS NULL OR (v.occurred_at, v.id) < ($6, $7::bigint))
                  ORDER BY v.occurred_at DESC, v.id DESC
                  LIMIT $8"
            ),
            &[
                &viewer,
                &elder_id,
                &f.kind,
                &f.since,
                &f.until,
                &before_t,
                &before_id,
                &(limit + 1),
            ],
        )
        .await?;
    let items = rows
        .iter()
        .map(|r| ElderEvent {
            id: r.get(0),
            device_id: r.get(1),
            kind: r.get::<_, String>(2).to_lowercase(),
            occurred_at: r.get(3),
            received_at: r.get(4),
            battery_pct: r.get(5),
            location: lat_lon(r.get(6), r.get(7)),
        })
        .collect();
    Ok(Some(Page::from_rows(items, limit, |e| {
        Cursor::TimeId(e.occurred_at, e.id)
    })))
}

// ---------------------------------------------------------------------------------------
// Contacts
// ---------------------------------------------------------------------------------------

/// A person in the registry who answers for elders.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ContactView {
    pub id: i64,
    pub external_ref: Option<String>,
    pub name: String,
    pub phone: Option<String>,
    pub email: Option<String>,
    pub language: String,
    pub im_webhook: Option<String>,
    /// Elders (visible to the viewer) this contact answers for.
    pub elders: i64,
    /// The roles they play for those elders.
    pub roles: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct ContactFilter {
    /// Part of the name, or the exact phone or ref.
    pub q: Option<String>,
    /// Only contacts playing this role for some visible elder.
    pub role: Option<String>,
    /// Only contacts of this elder.
    pub elder_id: Option<i64>,
    pub after_id: Option<i64>,
    pub limit: i64,
}

/// Contacts: admins see all; others the contacts of the elders they may see.
pub async fn list_contacts<C: GenericClient>(
    client: &C,
    viewer: i64,
    f: &ContactFilter,
) -> Result<Page<ContactView>, tokio_postgres::Error> {
    let limit = f.limit.clamp(1, MAX_LIMIT);
    let q = f.q.as_deref().map(str::trim).filter(|q| !q.is_empty());
    let pattern = q.map(like_pattern);
    let rows = client
        .query(
            "WITH vis AS (SELECT sg_user_elder_ids($1) AS id),
                  admin AS (SELECT EXISTS (SELECT 1 FROM users WHERE id = $1 AND role = 'admin'
                                             AND NOT disabled) AS yes)
             SELECT c.id, c.external_ref, c.name, c.phone, c.email, c.language, c.im_webhook,
                    (SELECT count(DISTINCT ec.elder_id) FROM elder_contacts ec
                      WHERE ec.contact_id = c.id AND ec.elder_id IN (SELECT id FROM vis)),
                    ARRAY(SELECT DISTINCT ec.role FROM elder_contacts ec
                           WHERE ec.contact_id = c.id AND ec.elder_id IN (SELECT id FROM vis)
                           ORDER BY ec.role)
               FROM contacts c
              WHERE ((SELECT yes FROM admin)
                     OR EXISTS (SELECT 1 FROM elder_contacts ec
                                 WHERE ec.contact_id = c.id
                                   AND ec.elder_id IN (SELECT id FROM vis)))
                AND ($2::text IS NULL OR c.name ILIKE $3 OR c.phone = $2 OR c.external_ref = $2)
                AND ($4::text IS NULL OR EXISTS (SELECT 1 FROM elder_contacts ec
                                 WHERE ec.contact_id = c.id AND ec.role = $4
                                   AND ec.elder_id IN (SELECT id FROM vis)))
                AND ($5::bigint IS NULL OR EXISTS (SELECT 1 FROM elder_contacts ec
                                 WHERE ec.contact_id = c.id AND ec.elder_id = $5
                                   AND ec.elder_id IN (SELECT id FROM vis)))
                AND ($6::bigint IS NULL OR c.id > $6)
              ORDER BY c.id
              LIMIT $7",
            &[
                &viewer,
                &q,
                &pattern,
                &f.role,
                &f.elder_id,
                &f.after_id,
                &(limit + 1),
            ],
        )
        .await?;
    let items = rows
        .iter()
        .map(|r| ContactView {
            id: r.get(0),
            external_ref: r.get(1),
            name: r.get(2),
            phone: r.get(3),
            email: r.get(4),
            language: r.get(5),
            im_webhook: r.get(6),
            elders: r.get(7),
            roles: r.get(8),
        })
        .collect();
    Ok(Page::from_rows(items, limit, |c| Cursor::Id(c.id)))
}

/// One contact, when the viewer may see it.
pub async fn get_contact<C: GenericClient>(
    client: &C,
    viewer: i64,
    contact_id: i64,
) -> Result<Option<ContactView>, tokio_postgres::Error> {
    // Contact ids are dense; a one-row window of the list keeps one definition of scope.
    let page = list_contacts(
        client,
        viewer,
        &ContactFilter {
            after_id: Some(contact_id - 1),
            limit: 1,
            ..Default::default()
        },
    )
    .await?;
    Ok(page.items.into_iter().find(|c| c.id == contact_id))
}

// ---------------------------------------------------------------------------------------
// Dashboard
// ---------------------------------------------------------------------------------------

/// The Monday (China Standard Time) starting the week that contains `t`.
pub fn week_start_of(t: DateTime<Utc>) -> NaiveDate {
    let local = (t + ChronoDuration::hours(8)).date_naive();
    local - ChronoDuration::days(local.weekday().num_days_from_monday() as i64)
}

/// Weekly visit compliance of a group of elders: visited at least once and called at least
/// twice in the ISO week (Monday to Sunday, China Standard Time).
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq)]
pub struct ComplianceStats {
    pub elders: i64,
    pub visited: i64,
    pub called_twice: i64,
    pub compliant: i64,
    /// compliant / elders (absent without elders).
    pub share: Option<f64>,
}

/// Response and care figures of one region (its whole subtree).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RegionStats {
    pub region_id: i64,
    pub parent_id: Option<i64>,
    pub code: String,
    pub name: String,
    pub level: String,
    /// Elders (visible to the viewer) in the subtree.
    pub elders: i64,
    /// Alerts not yet resolved, whenever opened.
    pub open_alerts: i64,
    pub open_critical: i64,
    /// Alerts opened since `since`.
    pub alerts_since: i64,
    /// Of those, acknowledged by a person (or resolved without an acknowledgement).
    pub acknowledged: i64,
    /// Time to acknowledge, seconds, median and 95th percentile (of alerts opened since
    /// `since` and answered).
    pub ack_p50_s: Option<f64>,
    pub ack_p95_s: Option<f64>,
    /// Share of emergencies (SOS and falls) acknowledged within 60 s: answered within 60 s /
    /// (answered, plus unanswered for over 60 s and not resolved by the system). Telecare
    /// services are held to 97.5 % for emergency calls; a low battery is not one.
    pub ack_within_60s: Option<f64>,
    pub week_start: NaiveDate,
    pub visits: ComplianceStats,
}

#[derive(Debug, Clone)]
pub struct DashboardFilter {
    pub since: DateTime<Utc>,
    /// Monday of the week whose visit compliance is reported.
    pub week_start: NaiveDate,
    /// Only regions of this level.
    pub level: Option<String>,
    /// Only this region's subtree (code).
    pub region: Option<String>,
}

/// Per-region figures for every region the viewer may see (each over its subtree), in tree
/// order.
pub async fn dashboard<C: GenericClient>(
    client: &C,
    viewer: i64,
    f: &DashboardFilter,
) -> Result<Vec<RegionStats>, tokio_postgres::Error> {
    let rows = client
        .query(
            &format!(
                "WITH el AS (
                    -- (elder, each region from the city down to their grid)
                    SELECT e.id AS elder_id, anc.id AS region_id
                      FROM elders e
                      JOIN regions er ON er.id = e.region_id
                      JOIN regions anc
                        ON anc.id = ANY (string_to_array(trim(both '/' from er.path), '/')::bigint[])
                     WHERE e.id IN (SELECT sg_user_elder_ids($1))),
                 wk AS (SELECT ($3::date::timestamp AT TIME ZONE 'Asia/Shanghai') AS lo),
                 cc AS (
                    SELECT c.elder_id,
                           count(*) FILTER (WHERE c.kind = 'visit') AS visits,
                           count(*) FILTER (WHERE c.kind = 'call') AS calls
                      FROM care_contacts c, wk
                     WHERE c.at >= wk.lo AND c.at < wk.lo + interval '7 days'
                       AND c.elder_id IN (SELECT elder_id FROM el)
                     GROUP BY c.elder_id),
                 es AS (
                    SELECT el.region_id, count(*) AS elders,
                           count(*) FILTER (WHERE coalesce(cc.visits, 0) >= 1) AS visited,
                           count(*) FILTER (WHERE coalesce(cc.calls, 0) >= 2) AS called,
                           count(*) FILTER (WHERE coalesce(cc.visits, 0) >= 1
                                              AND coalesce(cc.calls, 0) >= 2) AS compliant
                      FROM el LEFT JOIN cc ON cc.elder_id = el.elder_id
                     GROUP BY el.region_id),
                 al AS (
                    SELECT a.*, (a.acknowledged_at IS NOT NULL
                                 AND a.acknowledged_by IS DISTINCT FROM 'system') AS answered,
                           extract(epoch FROM a.acknowledged_at - a.opened_at)::float8 AS tta
                      FROM alerts a
                     WHERE a.elder_id IN (SELECT elder_id FROM el)
                       AND (a.status <> 'resolved' OR a.opened_at >= $2)),
                 ast AS (
                    SELECT el.region_id,
                           count(*) FILTER (WHERE al.status <> 'resolved') AS open,
                           count(*) FILTER (WHERE al.status <> 'resolved'
                                              AND al.severity = 'critical') AS open_critical,
                           count(*) FILTER (WHERE al.opened_at >= $2) AS since,
                           count(*) FILTER (WHERE al.opened_at >= $2 AND al.answered) AS answered,
                           percentile_cont(0.5) WITHIN GROUP (ORDER BY al.tta)
                               FILTER (WHERE al.opened_at >= $2 AND al.answered) AS p50,
                           percentile_cont(0.95) WITHIN GROUP (ORDER BY al.tta)
                               FILTER (WHERE al.opened_at >= $2 AND al.answered) AS p95,
                           count(*) FILTER (WHERE al.opened_at >= $2 AND al.answered
                                              AND al.kind IN ('sos', 'fall')
                                              AND al.tta <= 60) AS within60,
                           count(*) FILTER (WHERE al.opened_at >= $2
                                              AND al.kind IN ('sos', 'fall')
                                              AND (al.answered
                                                   OR (al.acknowledged_at IS NULL
                                                       AND NOT al.auto_resolved
                                                       AND al.opened_at < now() - interval '60 seconds')))
                               AS judged
                      FROM al JOIN el ON el.elder_id = al.elder_id
                     GROUP BY el.region_id)
                 SELECT r.id, r.parent_id, r.code, r.name, r.level,
                        coalesce(es.elders, 0), coalesce(ast.open, 0),
                        coalesce(ast.open_critical, 0), coalesce(ast.since, 0),
                        coalesce(ast.answered, 0), ast.p50, ast.p95,
                        coalesce(ast.within60, 0), coalesce(ast.judged, 0),
                        coalesce(es.visited, 0), coalesce(es.called, 0),
                        coalesce(es.compliant, 0)
                   FROM regions r
                   LEFT JOIN es ON es.region_id = r.id
                   LEFT JOIN ast ON ast.region_id = r.id
                  WHERE r.id IN (SELECT sg_user_region_ids($1))
                    AND ($4::text IS NULL OR r.level = $4)
                    AND ($5::text IS NULL OR r.id IN {sub})
                  ORDER BY r.path",
                sub = subtree_of_code(5)
            ),
            &[&viewer, &f.since, &f.week_start, &f.level, &f.region],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let elders: i64 = r.get(5);
            let within60: i64 = r.get(12);
            let judged: i64 = r.get(13);
            let compliant: i64 = r.get(16);
            RegionStats {
                region_id: r.get(0),
                parent_id: r.get(1),
                code: r.get(2),
                name: r.get(3),
                level: r.get(4),
                elders,
                open_alerts: r.get(6),
                open_critical: r.get(7),
                alerts_since: r.get(8),
                acknowledged: r.get(9),
                ack_p50_s: r.get::<_, Option<f64>>(10).map(round2),
                ack_p95_s: r.get::<_, Option<f64>>(11).map(round2),
                ack_within_60s: (judged > 0).then(|| round4(within60 as f64 / judged as f64)),
                week_start: f.week_start,
                visits: ComplianceStats {
                    elders,
                    visited: r.get(14),
                    called_twice: r.get(15),
                    compliant,
                    share: (elders > 0).then(|| round4(compliant as f64 / elders as f64)),
                },
            }
        })
        .collect())
}

fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

/// Whether the viewer may see any region at all (guardians may not).
pub async fn sees_regions<C: GenericClient>(
    client: &C,
    viewer: i64,
) -> Result<bool, tokio_postgres::Error> {
    if is_admin(client, viewer).await? {
        return Ok(true);
    }
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM sg_user_region_ids($1))",
            &[&viewer],
        )
        .await?
        .get(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let t = DateTime::parse_from_rfc3339("2025-03-04T05:06:07.123456Z")
            .unwrap()
            .with_timezone(&Utc);
        for c in [
            Cursor::Id(42),
            Cursor::Text("dev-1".into()),
            Cursor::TimeId(t, 7),
        ] {
            assert_eq!(Cursor::decode(&c.encode()), Some(c));
        }
        assert_eq!(Cursor::decode("not a cursor!"), None);
        assert_eq!(Cursor::decode("eDox"), None);
    }

    #[test]
    fn limits_are_clamped() {
        assert_eq!(clamp_limit(None), DEFAULT_LIMIT);
        assert_eq!(clamp_limit(Some(0)), 1);
        assert_eq!(clamp_limit(Some(10_000)), MAX_LIMIT);
    }

    #[test]
    fn week_starts_on_monday_in_china() {
        // Sunday 2025-03-09 20:00 UTC is Monday 04:00 in Beijing.
        let t = DateTime::parse_from_rfc3339("2025-03-09T20:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            week_start_of(t),
            NaiveDate::from_ymd_opt(2025, 3, 10).unwrap()
        );
        let t = DateTime::parse_from_rfc3339("2025-03-09T15:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            week_start_of(t),
            NaiveDate::from_ymd_opt(2025, 3, 3).unwrap()
        );
    }

    #[test]
    fn device_sql_follows_the_constants() {
        assert!(DEVICE_SELECT.contains(&format!("heartbeat_interval_s * {SILENT_INTERVALS})")));
        assert!(DEVICE_SELECT.contains(&format!("battery_pct <= {LOW_BATTERY_PCT},")));
    }

    #[test]
    fn like_patterns_escape_wildcards() {
        assert_eq!(like_pattern(" 王%_ "), "%王\\%\\_%");
    }
}
