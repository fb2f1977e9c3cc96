//! `/elders` (the register in scope, with this week's visit compliance) and `/elders/{id}`
//! (profile, 24-hour vitals, events, alerts, visits and calls, work orders).

use std::sync::Arc;

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Form;
use chrono::{NaiveDateTime, TimeZone, Utc};
use serde::Deserialize;

use super::charts::{Chart, Series};
use super::data::{self, BoardRow, ContactLine, DeviceLine, ElderProfile, EventLine};
use super::{i18n, render, see_other, Chrome, Failure, PageResult, Viewer};
use crate::api::auth;
use crate::api::ApiState;
use crate::care::{self, CareContactKind, CareError, NewCareContact, NewWorkOrder};
use crate::notify::templates::Lang;

pub struct ElderListRow {
    pub id: i64,
    pub name: String,
    pub region: String,
    pub visits: i64,
    pub calls: i64,
    pub compliant: bool,
    pub last_visit: String,
}

#[derive(Template)]
#[template(path = "console/elders.html")]
struct ElderListPage {
    c: Chrome,
    rows: Vec<ElderListRow>,
    q: String,
    only_noncompliant: bool,
}

#[derive(Deserialize, Default)]
pub struct ListQuery {
    q: Option<String>,
    noncompliant: Option<String>,
}

pub async fn list(
    State(state): State<Arc<ApiState>>,
    viewer: Viewer,
    Query(query): Query<ListQuery>,
) -> PageResult {
    let client = state.pool.get().await?;
    let today = Utc::now()
        .with_timezone(&chrono::FixedOffset::east_opt(8 * 3600).expect("UTC+8"))
        .date_naive();
    let all = care::weekly_compliance(&**client, viewer.user_id(), today)
        .await
        .map_err(|e| care_failure(&viewer, e))?;
    let q = query.q.unwrap_or_default().trim().to_string();
    let only_noncompliant = query.noncompliant.is_some();
    let rows = all
        .into_iter()
        .filter(|e| q.is_empty() || e.name.contains(&q))
        .filter(|e| !only_noncompliant || !e.compliant)
        .take(1000)
        .map(|e| ElderListRow {
            id: e.elder_id,
            name: e.name,
            region: e.region_name.unwrap_or_default(),
            visits: e.visits,
            calls: e.calls,
            compliant: e.compliant,
            last_visit: data::fmt_opt_time(e.last_visit_at, viewer.lang),
        })
        .collect();
    render(&ElderListPage {
        c: viewer.chrome("elders", viewer.t("elder.list_title")),
        rows,
        q,
        only_noncompliant,
    })
}

pub struct CareLine {
    pub at: String,
    pub kind: &'static str,
    pub by: String,
    pub notes: String,
}

pub struct WorkOrderLine {
    pub id: i64,
    pub category: String,
    pub description: String,
    pub status: String,
    pub status_label: String,
    pub requested: String,
    pub helper: String,
    pub cost: String,
}

#[derive(Template)]
#[template(path = "console/elder.html")]
struct ElderPage {
    c: Chrome,
    e: ElderProfile,
    contacts: Vec<ContactLine>,
    devices: Vec<DeviceLine>,
    charts: Vec<ChartBox>,
    events: Vec<EventLine>,
    alerts: Vec<BoardRow>,
    care: Vec<CareLine>,
    work_orders: Vec<WorkOrderLine>,
    categories: Vec<(&'static str, &'static str)>,
    now_local: String,
    /// Visits and calls are recorded by care staff, not by family.
    staff: bool,
}

#[derive(Deserialize, Default)]
pub struct DoneQuery {
    done: Option<String>,
}

pub fn care_failure(viewer: &Viewer, e: CareError) -> Failure {
    match e {
        CareError::NotFound(_) => viewer.not_found(),
        CareError::Db(e) => e.into(),
        other => Failure::Internal(other.to_string()),
    }
}

pub fn work_order_line(w: care::WorkOrder, lang: Lang) -> WorkOrderLine {
    WorkOrderLine {
        id: w.id,
        category: i18n::label_or(lang, "wo.cat", &w.category),
        description: w.description.unwrap_or_default(),
        status: w.status.as_str().to_string(),
        status_label: i18n::label_or(lang, "wo.status", w.status.as_str()),
        requested: data::fmt_time(w.requested_at),
        helper: match (w.helper_name, w.helper_phone) {
            (Some(n), Some(p)) => format!("{n} {p}"),
            (Some(n), None) => n,
            _ => String::new(),
        },
        cost: w
            .cost_cents
            .map(|c| format!("{}.{:02}", c / 100, c % 100))
            .unwrap_or_default(),
    }
}

/// One chart with its caption: the metric and the latest 5-minute average.
pub struct ChartBox {
    pub title: &'static str,
    pub latest: String,
    pub svg: String,
}

fn charts(buckets: &[data::Bucket], lang: Lang) -> Vec<ChartBox> {
    let now_ms = Utc::now().timestamp_millis();
    let no_data = i18n::t(lang, "vital.no_data");
    let pick = |f: fn(&data::Bucket) -> Option<[f64; 3]>| -> Vec<(i64, [f64; 3])> {
        buckets
            .iter()
            .filter_map(|b| f(b).map(|v| (b.at_ms, v)))
            .collect()
    };
    let latest = |f: fn(&data::Bucket) -> Option<[f64; 3]>, digits: usize, unit: &str| {
        buckets
            .iter()
            .rev()
            .find_map(f)
            .map(|v| format!("{:.*} {unit}", digits, v[1]))
            .unwrap_or_else(|| "–".into())
    };
    let bp_latest = match (
        buckets.iter().rev().find_map(|b| b.sys),
        buckets.iter().rev().find_map(|b| b.dia),
    ) {
        (Some(s), Some(d)) => format!("{:.0}/{:.0} mmHg", s[1], d[1]),
        _ => "–".into(),
    };
    let boxed = |title: &'static str, latest: String, svg: String| ChartBox { title, latest, svg };
    vec![
        boxed(
            i18n::t(lang, "vital.hr"),
            latest(|b| b.hr, 0, "bpm"),
            Chart {
                title: i18n::t(lang, "vital.hr"),
                unit: "bpm",
                series: vec![Series {
                    points: pick(|b| b.hr),
                    class: "s-hr",
                }],
                normal: Some((50.0, 100.0)),
                y_floor: (50.0, 110.0),
                now_ms,
                no_data,
            }
            .svg(),
        ),
        boxed(
            i18n::t(lang, "vital.spo2"),
            latest(|b| b.spo2, 0, "%"),
            Chart {
                title: i18n::t(lang, "vital.spo2"),
                unit: "%",
                series: vec![Series {
                    points: pick(|b| b.spo2),
                    class: "s-spo2",
                }],
                normal: Some((95.0, 100.0)),
                y_floor: (88.0, 100.0),
                now_ms,
                no_data,
            }
            .svg(),
        ),
        boxed(
            i18n::t(lang, "vital.bp"),
            bp_latest,
            Chart {
                title: i18n::t(lang, "vital.bp"),
                unit: "mmHg",
                series: vec![
                    Series {
                        points: pick(|b| b.sys),
                        class: "s-sys",
                    },
                    Series {
                        points: pick(|b| b.dia),
                        class: "s-dia",
                    },
                ],
                normal: Some((60.0, 140.0)),
                y_floor: (60.0, 150.0),
                now_ms,
                no_data,
            }
            .svg(),
        ),
        boxed(
            i18n::t(lang, "vital.temp"),
            latest(|b| b.temp, 1, "℃"),
            Chart {
                title: i18n::t(lang, "vital.temp"),
                unit: "℃",
                series: vec![Series {
                    points: pick(|b| b.temp),
                    class: "s-temp",
                }],
                normal: Some((36.0, 37.3)),
                y_floor: (35.5, 38.0),
                now_ms,
                no_data,
            }
            .svg(),
        ),
    ]
}

pub async fn page(
    State(state): State<Arc<ApiState>>,
    viewer: Viewer,
    Path(id): Path<i64>,
    Query(q): Query<DoneQuery>,
) -> PageResult {
    let flash = match q.done.as_deref() {
        Some("care") => Some(viewer.t("elder.care_saved").to_string()),
        Some("work_order") => Some(viewer.t("elder.wo_created").to_string()),
        _ => None,
    };
    render_page(&state, &viewer, id, flash, None).await
}

async fn render_page(
    state: &ApiState,
    viewer: &Viewer,
    id: i64,
    flash: Option<String>,
    error: Option<String>,
) -> PageResult {
    let client = state.pool.get().await?;
    let lang = viewer.lang;
    let Some(e) = data::elder_profile(&**client, viewer.user_id(), id, lang).await? else {
        return Err(viewer.not_found());
    };
    auth::audit(
        &**client,
        &viewer.p,
        "view_elder",
        Some(id),
        serde_json::json!({ "via": "console" }),
    )
    .await?;
    let contacts = data::elder_contacts(&**client, id, lang).await?;
    let devices = data::fleet(&**client, viewer.user_id(), Some(id), lang).await?;
    let buckets = data::vitals_buckets(&**client, viewer.user_id(), id).await?;
    let events = data::elder_events(&**client, viewer.user_id(), id, lang).await?;
    let alerts = data::elder_alerts(&**client, viewer.user_id(), id, lang).await?;
    let care = care::list_care_contacts(&**client, id, 20)
        .await
        .map_err(|e| care_failure(viewer, e))?
        .into_iter()
        .map(|c| CareLine {
            at: data::fmt_time(c.at),
            kind: match c.kind {
                CareContactKind::Visit => i18n::t(lang, "care.visit"),
                CareContactKind::Call => i18n::t(lang, "care.call"),
            },
            by: c.by_name,
            notes: c.notes.unwrap_or_default(),
        })
        .collect();
    let work_orders = care::list_work_orders(
        &**client,
        viewer.user_id(),
        &care::WorkOrderFilter {
            elder_id: Some(id),
            limit: Some(20),
            ..Default::default()
        },
    )
    .await
    .map_err(|e| care_failure(viewer, e))?
    .into_iter()
    .map(|w| work_order_line(w, lang))
    .collect();
    let now_local = Utc::now()
        .with_timezone(&chrono::FixedOffset::east_opt(8 * 3600).expect("UTC+8"))
        .format("%Y-%m-%dT%H:%M")
        .to_string();
    let mut c = viewer.chrome("elders", e.name.clone()).with_flash(flash);
    c.error = error;
    render(&ElderPage {
        c,
        charts: charts(&buckets, lang),
        e,
        contacts,
        devices,
        events,
        alerts,
        care,
        work_orders,
        categories: care::CATEGORIES
            .iter()
            .map(|k| (*k, i18n::t(lang, &format!("wo.cat.{k}"))))
            .collect(),
        now_local,
        staff: viewer.is_staff(),
    })
}

#[derive(Deserialize)]
pub struct CareForm {
    csrf: Option<String>,
    kind: String,
    /// `datetime-local` in China Standard Time; empty = now.
    at: Option<String>,
    notes: Option<String>,
}

async fn check_scope(state: &ApiState, viewer: &Viewer, id: i64) -> Result<(), Failure> {
    let client = state.pool.get().await?;
    if viewer.p.can_see_elder(&**client, id).await? {
        Ok(())
    } else {
        Err(viewer.not_found())
    }
}

async fn invalid(state: &ApiState, viewer: &Viewer, id: i64, message: String) -> PageResult {
    let mut res = render_page(state, viewer, id, None, Some(message)).await?;
    *res.status_mut() = StatusCode::UNPROCESSABLE_ENTITY;
    Ok(res)
}

pub async fn record_care(
    State(state): State<Arc<ApiState>>,
    viewer: Viewer,
    Path(id): Path<i64>,
    Form(f): Form<CareForm>,
) -> PageResult {
    viewer.check_csrf(f.csrf.as_deref())?;
    viewer.require_staff()?;
    check_scope(&state, &viewer, id).await?;
    let kind = match f.kind.as_str() {
        "visit" => CareContactKind::Visit,
        "call" => CareContactKind::Call,
        _ => {
            return invalid(
                &state,
                &viewer,
                id,
                format!("{}: {}", viewer.t("err.invalid"), viewer.t("care.kind")),
            )
            .await
        }
    };
    let at = match f.at.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => match NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M")
            .ok()
            .and_then(|t| {
                chrono::FixedOffset::east_opt(8 * 3600)?
                    .from_local_datetime(&t)
                    .single()
            }) {
            Some(t) => Some(t.with_timezone(&Utc)),
            None => {
                return invalid(
                    &state,
                    &viewer,
                    id,
                    format!("{}: {}", viewer.t("err.invalid"), viewer.t("care.at")),
                )
                .await
            }
        },
    };
    let client = state.pool.get().await?;
    let result = care::record_care_contact(
        &**client,
        &NewCareContact {
            elder_id: id,
            kind,
            at,
            notes: f.notes,
        },
        viewer.user_id(),
        &viewer.p.display_name,
    )
    .await;
    drop(client);
    match result {
        Ok(_) => Ok(see_other(&format!("/elders/{id}?done=care"))),
        Err(CareError::Invalid { field, message }) => {
            invalid(
                &state,
                &viewer,
                id,
                format!("{}: {field}: {message}", viewer.t("err.invalid")),
            )
            .await
        }
        Err(e) => Err(care_failure(&viewer, e)),
    }
}

#[derive(Deserialize)]
pub struct WorkOrderForm {
    csrf: Option<String>,
    category: String,
    description: Option<String>,
}

pub async fn create_work_order(
    State(state): State<Arc<ApiState>>,
    viewer: Viewer,
    Path(id): Path<i64>,
    Form(f): Form<WorkOrderForm>,
) -> PageResult {
    viewer.check_csrf(f.csrf.as_deref())?;
    check_scope(&state, &viewer, id).await?;
    let client = state.pool.get().await?;
    let result = care::create_work_order(
        &**client,
        &NewWorkOrder {
            elder_id: id,
            category: f.category,
            description: f.description,
        },
        "console",
        &viewer.p.username,
    )
    .await;
    drop(client);
    match result {
        Ok(_) => Ok(see_other(&format!("/elders/{id}?done=work_order"))),
        Err(CareError::Invalid { field, message }) => {
            invalid(
                &state,
                &viewer,
                id,
                format!("{}: {field}: {message}", viewer.t("err.invalid")),
            )
            .await
        }
        Err(e) => Err(care_failure(&viewer, e)),
    }
}
