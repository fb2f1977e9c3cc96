//! `/fleet`, `/dashboard` and `/work-orders`.

use std::sync::Arc;

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Form;
use serde::Deserialize;

use super::data::{self, DeviceLine};
use super::elder::{care_failure, work_order_line, WorkOrderLine};
use super::{i18n, render, see_other, Chrome, PageResult, Viewer};
use crate::api::ApiState;
use crate::care::{self, CareError, WorkOrderFilter, WorkOrderStatus};

#[derive(Template)]
#[template(path = "console/fleet.html")]
struct FleetPage {
    c: Chrome,
    devices: Vec<DeviceLine>,
    silent: usize,
    low_battery: usize,
}

pub async fn fleet(State(state): State<Arc<ApiState>>, viewer: Viewer) -> PageResult {
    let client = state.pool.get().await?;
    let devices = data::fleet(&**client, viewer.user_id(), None, viewer.lang).await?;
    render(&FleetPage {
        c: viewer.chrome("fleet", viewer.t("fleet.title")),
        silent: devices.iter().filter(|d| d.silent).count(),
        low_battery: devices.iter().filter(|d| d.low_battery).count(),
        devices,
    })
}

/// The telecare target: 97.5% of emergency calls answered within 60 s.
pub const TARGET_WITHIN_60S: f64 = 0.975;

pub struct DashRow {
    pub region_id: i64,
    pub name: String,
    pub level: String,
    /// Indentation by depth in the tree (CSS class `d0`..`d3`).
    pub depth: usize,
    pub open: i64,
    pub open_critical: i64,
    pub p50: String,
    pub p95: String,
    /// Alerts opened in the window.
    pub since: i64,
    pub within60: String,
    pub within60_bad: bool,
    pub compliance: String,
    pub compliance_bad: bool,
}

#[derive(Template)]
#[template(path = "console/dashboard.html")]
struct DashboardPage {
    c: Chrome,
    rows: Vec<DashRow>,
    days: i32,
    day_choices: Vec<i32>,
}

#[derive(Deserialize, Default)]
pub struct DashQuery {
    days: Option<i32>,
}

fn pct(share: f64) -> String {
    format!("{:.1}%", share * 100.0)
}

pub async fn dashboard(
    State(state): State<Arc<ApiState>>,
    viewer: Viewer,
    Query(q): Query<DashQuery>,
) -> PageResult {
    let days = q.days.unwrap_or(7).clamp(1, 90);
    let lang = viewer.lang;
    let client = state.pool.get().await?;
    let stats = data::region_stats(&**client, viewer.user_id(), days).await?;
    let dash = |v: Option<f64>| {
        v.map(|s| i18n::duration(s, lang))
            .unwrap_or_else(|| "–".into())
    };
    let rows = stats
        .into_iter()
        .map(|(depth, s)| {
            let share = s.ack_within_60s;
            let comp = &s.visits;
            DashRow {
                region_id: s.region_id,
                level: i18n::label_or(lang, "level", &s.level),
                name: s.name,
                depth: depth.min(3),
                open: s.open_alerts,
                open_critical: s.open_critical,
                p50: dash(s.ack_p50_s),
                p95: dash(s.ack_p95_s),
                since: s.alerts_since,
                within60: share.map(pct).unwrap_or_else(|| "–".into()),
                within60_bad: share.is_some_and(|v| v < TARGET_WITHIN_60S),
                compliance: comp
                    .share
                    .map(|sh| format!("{} ({}/{})", pct(sh), comp.compliant, comp.elders))
                    .unwrap_or_else(|| "–".into()),
                compliance_bad: comp.share.is_some_and(|v| v < 1.0),
            }
        })
        .collect();
    render(&DashboardPage {
        c: viewer.chrome("dashboard", viewer.t("dash.title")),
        rows,
        days,
        day_choices: vec![1, 7, 30, 90],
    })
}

#[derive(Template)]
#[template(path = "console/work_orders.html")]
struct WorkOrdersPage {
    c: Chrome,
    orders: Vec<WorkOrderRow>,
    filter: String,
    filters: Vec<(&'static str, &'static str)>,
}

pub struct WorkOrderRow {
    pub w: WorkOrderLine,
    pub elder_id: Option<i64>,
    pub elder_name: String,
    pub source: String,
    pub can_dispatch: bool,
    pub can_accept: bool,
    pub can_complete: bool,
    pub can_cancel: bool,
}

#[derive(Deserialize, Default)]
pub struct WorkOrdersQuery {
    status: Option<String>,
    done: Option<String>,
}

pub async fn work_orders(
    State(state): State<Arc<ApiState>>,
    viewer: Viewer,
    Query(q): Query<WorkOrdersQuery>,
) -> PageResult {
    let flash = q.done.is_some().then(|| viewer.t("wo.updated").to_string());
    render_orders(&state, &viewer, q.status, flash, None).await
}

async fn render_orders(
    state: &ApiState,
    viewer: &Viewer,
    status: Option<String>,
    flash: Option<String>,
    error: Option<String>,
) -> PageResult {
    let lang = viewer.lang;
    let filter = status.unwrap_or_else(|| "open".into());
    let mut f = WorkOrderFilter {
        limit: Some(200),
        ..Default::default()
    };
    match filter.as_str() {
        "open" => f.open_only = true,
        "all" => {}
        other => f.status = other.parse::<WorkOrderStatus>().ok(),
    }
    let client = state.pool.get().await?;
    let orders = care::list_work_orders(&**client, viewer.user_id(), &f)
        .await
        .map_err(|e| care_failure(viewer, e))?
        .into_iter()
        .map(|w| {
            let status = w.status;
            let staff = viewer.is_staff();
            WorkOrderRow {
                elder_id: w.elder_id,
                elder_name: w.elder_name.clone().unwrap_or_default(),
                source: i18n::label_or(lang, "wo.source", &w.source),
                can_dispatch: staff
                    && matches!(status, WorkOrderStatus::New | WorkOrderStatus::Dispatched),
                can_accept: staff && status == WorkOrderStatus::Dispatched,
                can_complete: staff
                    && matches!(
                        status,
                        WorkOrderStatus::Dispatched | WorkOrderStatus::Accepted
                    ),
                can_cancel: staff && status.is_open(),
                w: work_order_line(w, lang),
            }
        })
        .collect();
    let mut c = viewer
        .chrome("work_orders", viewer.t("wo.title"))
        .with_flash(flash);
    c.error = error;
    render(&WorkOrdersPage {
        c,
        orders,
        filter,
        filters: vec![
            ("open", i18n::t(lang, "wo.open")),
            ("new", i18n::t(lang, "wo.status.new")),
            ("dispatched", i18n::t(lang, "wo.status.dispatched")),
            ("accepted", i18n::t(lang, "wo.status.accepted")),
            ("completed", i18n::t(lang, "wo.status.completed")),
            ("cancelled", i18n::t(lang, "wo.status.cancelled")),
            ("all", i18n::t(lang, "wo.all")),
        ],
    })
}

#[derive(Deserialize)]
pub struct WorkOrderActionForm {
    csrf: Option<String>,
    helper_name: Option<String>,
    helper_phone: Option<String>,
    /// Yuan, e.g. "25" or "25.50".
    cost: Option<String>,
    note: Option<String>,
}

/// "25.5" yuan -> 2550 fen.
pub fn parse_yuan(s: &str) -> Option<i32> {
    let s = s
        .trim()
        .trim_start_matches('¥')
        .trim_start_matches('￥')
        .trim();
    if s.is_empty() {
        return Some(0);
    }
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    if !int.chars().all(|c| c.is_ascii_digit())
        || !frac.chars().all(|c| c.is_ascii_digit())
        || frac.len() > 2
        || int.len() > 7
    {
        return None;
    }
    let yuan: i32 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let fen: i32 = match frac.len() {
        0 => 0,
        1 => frac.parse::<i32>().ok()? * 10,
        _ => frac.parse().ok()?,
    };
    yuan.checked_mul(100)?.checked_add(fen)
}

pub async fn work_order_action(
    State(state): State<Arc<ApiState>>,
    viewer: Viewer,
    Path((id, action)): Path<(i64, String)>,
    Form(f): Form<WorkOrderActionForm>,
) -> PageResult {
    viewer.check_csrf(f.csrf.as_deref())?;
    // Families may ask for a service (on the elder's page); staff run the orders.
    viewer.require_staff()?;
    let client = state.pool.get().await?;
    // Scope: the order's elder must be the viewer's (404 otherwise, as for a missing one).
    let order = match care::get_work_order(&**client, id).await {
        Ok(o) => o,
        Err(CareError::NotFound(_)) => return Err(viewer.not_found()),
        Err(e) => return Err(care_failure(&viewer, e)),
    };
    match order.elder_id {
        Some(e) if viewer.p.can_see_elder(&**client, e).await? => {}
        _ => return Err(viewer.not_found()),
    }
    let who = viewer.p.username.as_str();
    let result = match action.as_str() {
        "dispatch" => {
            care::dispatch(
                &**client,
                id,
                f.helper_name.as_deref().unwrap_or_default(),
                f.helper_phone.as_deref(),
                who,
            )
            .await
        }
        "accept" => care::accept(&**client, id).await,
        "complete" => match parse_yuan(f.cost.as_deref().unwrap_or_default()) {
            Some(fen) => care::complete(&**client, id, fen, f.note.as_deref(), who).await,
            None => Err(CareError::Invalid {
                field: "cost",
                message: "yuan, e.g. 25 or 25.50".into(),
            }),
        },
        "cancel" => care::cancel(&**client, id, who).await,
        _ => return Err(viewer.not_found()),
    };
    match result {
        Ok(_) => Ok(see_other("/work-orders?done=1")),
        Err(e @ (CareError::Invalid { .. } | CareError::Transition { .. })) => {
            drop(client);
            let message = format!("{}: {e}", viewer.t("err.invalid"));
            let mut res = render_orders(&state, &viewer, None, None, Some(message)).await?;
            *res.status_mut() = StatusCode::UNPROCESSABLE_ENTITY;
            Ok(res)
        }
        Err(e) => Err(care_failure(&viewer, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yuan_parses_to_fen() {
        assert_eq!(parse_yuan("25"), Some(2500));
        assert_eq!(parse_yuan("25.5"), Some(2550));
        assert_eq!(parse_yuan("￥0.05"), Some(5));
        assert_eq!(parse_yuan(""), Some(0));
        assert_eq!(parse_yuan("1.234"), None);
        assert_eq!(parse_yuan("-3"), None);
        assert_eq!(parse_yuan("abc"), None);
        assert_eq!(parse_yuan("."), None);
    }
}
