//! Care work around the alerts: work orders (a service call dispatched to a helper, accepted,
//! completed and settled), home visits and phone calls, and the weekly compliance the
//! programmes hold grid workers to (at least one visit and two calls per elder per week).
//!
//! Functions take a client and, for lists, the viewer's user id: rows are restricted with the
//! same `sg_user_elder_ids` the API and console use. Single-row operations leave the scope
//! check to the caller (`Principal::can_see_elder`), which answers 404 outside it.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Datelike, Duration, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use tokio_postgres::{GenericClient, Row};
use utoipa::ToSchema;

/// Visits and calls per elder per ISO week that count as compliant.
pub const VISITS_PER_WEEK: i64 = 1;
pub const CALLS_PER_WEEK: i64 = 2;

#[derive(Debug, thiserror::Error)]
pub enum CareError {
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("no such {0}")]
    NotFound(&'static str),
    #[error("a {from} work order cannot be {action}")]
    Transition { from: String, action: &'static str },
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

fn invalid(field: &'static str, message: impl Into<String>) -> CareError {
    CareError::Invalid {
        field,
        message: message.into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WorkOrderStatus {
    New,
    Dispatched,
    Accepted,
    Completed,
    Cancelled,
}

impl WorkOrderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkOrderStatus::New => "new",
            WorkOrderStatus::Dispatched => "dispatched",
            WorkOrderStatus::Accepted => "accepted",
            WorkOrderStatus::Completed => "completed",
            WorkOrderStatus::Cancelled => "cancelled",
        }
    }

    pub fn is_open(self) -> bool {
        !matches!(
            self,
            WorkOrderStatus::Completed | WorkOrderStatus::Cancelled
        )
    }
}

impl fmt::Display for WorkOrderStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for WorkOrderStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "new" => WorkOrderStatus::New,
            "dispatched" => WorkOrderStatus::Dispatched,
            "accepted" => WorkOrderStatus::Accepted,
            "completed" => WorkOrderStatus::Completed,
            "cancelled" => WorkOrderStatus::Cancelled,
            other => return Err(format!("unknown work order status {other:?}")),
        })
    }
}

pub const CATEGORIES: [&str; 6] = [
    "meals",
    "medicine",
    "housekeeping",
    "repair",
    "escort",
    "other",
];

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct WorkOrder {
    pub id: i64,
    pub elder_id: Option<i64>,
    pub elder_name: Option<String>,
    pub device_id: Option<String>,
    /// device (a SERVICE_CALL press), console or api.
    pub source: String,
    pub category: String,
    pub description: Option<String>,
    pub status: WorkOrderStatus,
    pub requested_at: DateTime<Utc>,
    pub created_by: Option<String>,
    pub helper_name: Option<String>,
    pub helper_phone: Option<String>,
    pub dispatched_at: Option<DateTime<Utc>>,
    pub dispatched_by: Option<String>,
    pub accepted_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub completed_by: Option<String>,
    /// Settlement amount in fen (1/100 yuan).
    pub cost_cents: Option<i32>,
    pub completion_note: Option<String>,
    pub cancelled_at: Option<DateTime<Utc>>,
}

const WORK_ORDER_SELECT: &str = "SELECT w.id, w.elder_id, e.name, w.device_id, w.source,
        w.category, w.description, w.status, w.requested_at, w.created_by, w.helper_name,
        w.helper_phone, w.dispatched_at, w.dispatched_by, w.accepted_at, w.completed_at,
        w.completed_by, w.cost_cents, w.completion_note, w.cancelled_at
   FROM work_orders w LEFT JOIN elders e ON e.id = w.elder_id";

fn work_order_from_row(r: &Row) -> WorkOrder {
    WorkOrder {
        id: r.get(0),
        elder_id: r.get(1),
        elder_name: r.get(2),
        device_id: r.get(3),
        source: r.get(4),
        category: r.get(5),
        description: r.get(6),
        status: r
            .get::<_, String>(7)
            .parse()
            .unwrap_or(WorkOrderStatus::New),
        requested_at: r.get(8),
        created_by: r.get(9),
        helper_name: r.get(10),
        helper_phone: r.get(11),
        dispatched_at: r.get(12),
        dispatched_by: r.get(13),
        accepted_at: r.get(14),
        completed_at: r.get(15),
        completed_by: r.get(16),
        cost_cents: r.get(17),
        completion_note: r.get(18),
        cancelled_at: r.get(19),
    }
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct NewWorkOrder {
    pub elder_id: i64,
    /// meals, medicine, housekeeping, repair, escort or other.
    pub category: String,
    pub description: Option<String>,
}

fn check_text(field: &'static str, v: &Option<String>, max: usize) -> Result<(), CareError> {
    match v {
        Some(s) if s.chars().count() > max => {
            Err(invalid(field, format!("at most {max} characters")))
        }
        _ => Ok(()),
    }
}

/// Creates a work order from the console or the API (`source`), for an elder the caller may
/// see (checked by the caller).
pub async fn create_work_order<C: GenericClient>(
    client: &C,
    new: &NewWorkOrder,
    source: &str,
    actor: &str,
) -> Result<WorkOrder, CareError> {
    if !CATEGORIES.contains(&new.category.as_str()) {
        return Err(invalid(
            "category",
            format!("one of {}", CATEGORIES.join(", ")),
        ));
    }
    check_text("description", &new.description, 2000)?;
    if !["console", "api"].contains(&source) {
        return Err(invalid("source", "console or api"));
    }
    let row = client
        .query_opt(
            "INSERT INTO work_orders (elder_id, device_id, source, category, description,
                                      requested_at, created_by)
             SELECT e.id, (SELECT d.device_id FROM devices d WHERE d.elder_id = e.id
                            ORDER BY d.device_id LIMIT 1),
                    $2, $3, nullif(btrim($4), ''), now(), $5
               FROM elders e WHERE e.id = $1
             RETURNING id",
            &[
                &new.elder_id,
                &source,
                &new.category,
                &new.description,
                &actor,
            ],
        )
        .await?
        .ok_or(CareError::NotFound("elder"))?;
    get_work_order(client, row.get(0)).await
}

pub async fn get_work_order<C: GenericClient>(client: &C, id: i64) -> Result<WorkOrder, CareError> {
    client
        .query_opt(&format!("{WORK_ORDER_SELECT} WHERE w.id = $1"), &[&id])
        .await?
        .map(|r| work_order_from_row(&r))
        .ok_or(CareError::NotFound("work order"))
}

/// Moves a work order along, refusing transitions its state does not allow.
async fn transition<C: GenericClient>(
    client: &C,
    id: i64,
    allowed_from: &[&str],
    action: &'static str,
    set: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<WorkOrder, CareError> {
    let mut all: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&id];
    all.extend_from_slice(params);
    let allowed: Vec<String> = allowed_from.iter().map(|s| s.to_string()).collect();
    all.push(&allowed);
    let n = all.len();
    let updated = client
        .execute(
            &format!("UPDATE work_orders SET {set} WHERE id = $1 AND status = ANY(${n})"),
            &all,
        )
        .await?;
    let current = get_work_order(client, id).await?;
    if updated == 0 {
        return Err(CareError::Transition {
            from: current.status.to_string(),
            action,
        });
    }
    Ok(current)
}

/// Dispatches (or re-dispatches) to a named helper.
pub async fn dispatch<C: GenericClient>(
    client: &C,
    id: i64,
    helper_name: &str,
    helper_phone: Option<&str>,
    actor: &str,
) -> Result<WorkOrder, CareError> {
    let name = helper_name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        return Err(invalid("helper_name", "1-200 characters"));
    }
    let phone = helper_phone.map(str::trim).filter(|p| !p.is_empty());
    if let Some(p) = phone {
        crate::store::registry::parse_phone(p).map_err(|m| invalid("helper_phone", m))?;
    }
    transition(
        client,
        id,
        &["new", "dispatched"],
        "dispatched",
        "status = 'dispatched', helper_name = $2, helper_phone = $3, dispatched_at = now(),
         dispatched_by = $4, accepted_at = NULL",
        &[&name, &phone, &actor],
    )
    .await
}

/// The helper took it on.
pub async fn accept<C: GenericClient>(client: &C, id: i64) -> Result<WorkOrder, CareError> {
    transition(
        client,
        id,
        &["dispatched"],
        "accepted",
        "status = 'accepted', accepted_at = now()",
        &[],
    )
    .await
}

/// Done, with the cost to settle (in fen) and a note.
pub async fn complete<C: GenericClient>(
    client: &C,
    id: i64,
    cost_cents: i32,
    note: Option<&str>,
    actor: &str,
) -> Result<WorkOrder, CareError> {
    if !(0..=100_000_000).contains(&cost_cents) {
        return Err(invalid("cost_cents", "0 to 100,000,000 fen"));
    }
    let note = note.map(str::trim).filter(|n| !n.is_empty());
    if note.is_some_and(|n| n.chars().count() > 2000) {
        return Err(invalid("note", "at most 2000 characters"));
    }
    transition(
        client,
        id,
        &["dispatched", "accepted"],
        "completed",
        "status = 'completed', completed_at = now(), cost_cents = $2, completion_note = $3,
         completed_by = $4, accepted_at = coalesce(accepted_at, now())",
        &[&cost_cents, &note, &actor],
    )
    .await
}

pub async fn cancel<C: GenericClient>(
    client: &C,
    id: i64,
    actor: &str,
) -> Result<WorkOrder, CareError> {
    transition(
        client,
        id,
        &["new", "dispatched", "accepted"],
        "cancelled",
        "status = 'cancelled', cancelled_at = now(), completed_by = $2",
        &[&actor],
    )
    .await
}

#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct WorkOrderFilter {
    pub status: Option<WorkOrderStatus>,
    /// Only orders not completed or cancelled.
    #[serde(default)]
    pub open_only: bool,
    pub elder_id: Option<i64>,
    /// Keyset pagination: orders with a smaller id than this.
    pub before_id: Option<i64>,
    pub limit: Option<i64>,
}

/// Work orders of the elders the viewer may see, newest first.
pub async fn list_work_orders<C: GenericClient>(
    client: &C,
    viewer: i64,
    f: &WorkOrderFilter,
) -> Result<Vec<WorkOrder>, CareError> {
    let limit = f.limit.unwrap_or(50).clamp(1, 500);
    let status = f.status.map(|s| s.as_str());
    let rows = client
        .query(
            &format!(
                "{WORK_ORDER_SELECT}
                 WHERE w.elder_id IN (SELECT sg_user_elder_ids($1))
                   AND ($2::text IS NULL OR w.status = $2)
                   AND (NOT $3 OR w.status IN ('new', 'dispatched', 'accepted'))
                   AND ($4::bigint IS NULL OR w.elder_id = $4)
                   AND ($5::bigint IS NULL OR w.id < $5)
                 ORDER BY w.id DESC LIMIT $6"
            ),
            &[
                &viewer,
                &status,
                &f.open_only,
                &f.elder_id,
                &f.before_id,
                &limit,
            ],
        )
        .await?;
    Ok(rows.iter().map(work_order_from_row).collect())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CareContactKind {
    Visit,
    Call,
}

impl CareContactKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CareContactKind::Visit => "visit",
            CareContactKind::Call => "call",
        }
    }
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct NewCareContact {
    pub elder_id: i64,
    pub kind: CareContactKind,
    /// When it happened [default: now]. Not in the future, not more than 30 days back.
    pub at: Option<DateTime<Utc>>,
    pub notes: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CareContact {
    pub id: i64,
    pub elder_id: i64,
    pub kind: CareContactKind,
    pub at: DateTime<Utc>,
    pub by_name: String,
    pub notes: Option<String>,
}

fn care_contact_from_row(r: &Row) -> CareContact {
    CareContact {
        id: r.get(0),
        elder_id: r.get(1),
        kind: if r.get::<_, String>(2) == "visit" {
            CareContactKind::Visit
        } else {
            CareContactKind::Call
        },
        at: r.get(3),
        by_name: r.get(4),
        notes: r.get(5),
    }
}

/// Records a home visit or phone call by a user.
pub async fn record_care_contact<C: GenericClient>(
    client: &C,
    new: &NewCareContact,
    by_user_id: i64,
    by_name: &str,
) -> Result<CareContact, CareError> {
    let now = Utc::now();
    let at = new.at.unwrap_or(now);
    if at > now + Duration::minutes(5) {
        return Err(invalid("at", "is in the future"));
    }
    if at < now - Duration::days(30) {
        return Err(invalid("at", "is more than 30 days ago"));
    }
    check_text("notes", &new.notes, 2000)?;
    let notes = new
        .notes
        .as_deref()
        .map(str::trim)
        .filter(|n| !n.is_empty());
    let row = client
        .query_opt(
            "INSERT INTO care_contacts (elder_id, kind, at, by_user_id, by_name, notes)
             SELECT e.id, $2, $3, $4, $5, $6 FROM elders e WHERE e.id = $1
             RETURNING id, elder_id, kind, at, by_name, notes",
            &[
                &new.elder_id,
                &new.kind.as_str(),
                &at,
                &by_user_id,
                &by_name,
                &notes,
            ],
        )
        .await?
        .ok_or(CareError::NotFound("elder"))?;
    Ok(care_contact_from_row(&row))
}

/// An elder's visits and calls, newest first.
pub async fn list_care_contacts<C: GenericClient>(
    client: &C,
    elder_id: i64,
    limit: i64,
) -> Result<Vec<CareContact>, CareError> {
    let rows = client
        .query(
            "SELECT id, elder_id, kind, at, by_name, notes FROM care_contacts
              WHERE elder_id = $1 ORDER BY at DESC, id DESC LIMIT $2",
            &[&elder_id, &limit.clamp(1, 500)],
        )
        .await?;
    Ok(rows.iter().map(care_contact_from_row).collect())
}

/// The Monday of the ISO week holding `day`.
pub fn week_start(day: NaiveDate) -> NaiveDate {
    day - Duration::days(day.weekday().num_days_from_monday() as i64)
}

/// Weeks are counted in China Standard Time, the programmes' working calendar.
fn week_bounds(week: NaiveDate) -> (DateTime<Utc>, DateTime<Utc>) {
    let monday = week_start(week);
    let cst = chrono::FixedOffset::east_opt(8 * 3600).expect("UTC+8 is a valid offset");
    let start = monday
        .and_hms_opt(0, 0, 0)
        .and_then(|t| t.and_local_timezone(cst).single())
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_else(Utc::now);
    (start, start + Duration::days(7))
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ElderCompliance {
    pub elder_id: i64,
    pub name: String,
    pub region_id: Option<i64>,
    pub region_name: Option<String>,
    pub visits: i64,
    pub calls: i64,
    pub compliant: bool,
    pub last_visit_at: Option<DateTime<Utc>>,
}

/// Each visible elder's visits and calls in the ISO week holding `week`, non-compliant first.
pub async fn weekly_compliance<C: GenericClient>(
    client: &C,
    viewer: i64,
    week: NaiveDate,
) -> Result<Vec<ElderCompliance>, CareError> {
    let (from, to) = week_bounds(week);
    let rows = client
        .query(
            "SELECT e.id, e.name, e.region_id, r.name,
                    count(*) FILTER (WHERE c.kind = 'visit'),
                    count(*) FILTER (WHERE c.kind = 'call'),
                    (SELECT max(v.at) FROM care_contacts v
                      WHERE v.elder_id = e.id AND v.kind = 'visit')
               FROM elders e
               LEFT JOIN regions r ON r.id = e.region_id
               LEFT JOIN care_contacts c ON c.elder_id = e.id AND c.at >= $2 AND c.at < $3
              WHERE e.id IN (SELECT sg_user_elder_ids($1))
              GROUP BY e.id, r.name
              ORDER BY e.name, e.id",
            &[&viewer, &from, &to],
        )
        .await?;
    let mut out: Vec<ElderCompliance> = rows
        .iter()
        .map(|r| {
            let visits: i64 = r.get(4);
            let calls: i64 = r.get(5);
            ElderCompliance {
                elder_id: r.get(0),
                name: r.get(1),
                region_id: r.get(2),
                region_name: r.get(3),
                visits,
                calls,
                compliant: visits >= VISITS_PER_WEEK && calls >= CALLS_PER_WEEK,
                last_visit_at: r.get(6),
            }
        })
        .collect();
    out.sort_by_key(|c| c.compliant);
    Ok(out)
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RegionCompliance {
    pub region_id: i64,
    pub code: String,
    pub name: String,
    pub level: String,
    pub elders: i64,
    pub compliant: i64,
    /// compliant / elders; None for a region without elders.
    pub share: Option<f64>,
}

/// Compliance rolled up for every region the viewer may see (each region counts the elders
/// of its whole subtree), top of the tree first.
pub async fn compliance_by_region<C: GenericClient>(
    client: &C,
    viewer: i64,
    week: NaiveDate,
) -> Result<Vec<RegionCompliance>, CareError> {
    let (from, to) = week_bounds(week);
    let rows = client
        .query(
            "WITH per_elder AS (
                 SELECT e.id, er.path,
                        (count(*) FILTER (WHERE c.kind = 'visit') >= $4
                         AND count(*) FILTER (WHERE c.kind = 'call') >= $5) AS ok
                   FROM elders e
                   JOIN regions er ON er.id = e.region_id
                   LEFT JOIN care_contacts c ON c.elder_id = e.id AND c.at >= $2 AND c.at < $3
                  WHERE e.id IN (SELECT sg_user_elder_ids($1))
                  GROUP BY e.id, er.path)
             SELECT r.id, r.code, r.name, r.level,
                    count(p.id), count(p.id) FILTER (WHERE p.ok)
               FROM regions r
               LEFT JOIN per_elder p ON left(p.path, length(r.path)) = r.path
              WHERE r.id IN (SELECT sg_user_region_ids($1))
              GROUP BY r.id
              ORDER BY r.path",
            &[&viewer, &from, &to, &VISITS_PER_WEEK, &CALLS_PER_WEEK],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let elders: i64 = r.get(4);
            let compliant: i64 = r.get(5);
            RegionCompliance {
                region_id: r.get(0),
                code: r.get(1),
                name: r.get(2),
                level: r.get(3),
                elders,
                compliant,
                share: (elders > 0).then(|| compliant as f64 / elders as f64),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn week_starts_on_monday() {
        let d = NaiveDate::from_ymd_opt(2026, 11, 26).unwrap(); // a Thursday
        assert_eq!(
            week_start(d),
            NaiveDate::from_ymd_opt(2026, 11, 23).unwrap()
        );
        let m = NaiveDate::from_ymd_opt(2026, 11, 23).unwrap();
        assert_eq!(week_start(m), m);
        let (from, to) = week_bounds(d);
        // Monday 00:00 in China is Sunday 16:00 UTC.
        assert_eq!(from.to_rfc3339(), "2026-11-22T16:00:00+00:00");
        assert_eq!(to - from, Duration::days(7));
    }

    #[test]
    fn statuses_round_trip() {
        for s in ["new", "dispatched", "accepted", "completed", "cancelled"] {
            assert_eq!(s.parse::<WorkOrderStatus>().unwrap().as_str(), s);
        }
        assert!(!WorkOrderStatus::Completed.is_open());
        assert!(WorkOrderStatus::Accepted.is_open());
    }
}
