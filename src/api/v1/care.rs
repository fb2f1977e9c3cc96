//! Care work (src/care.rs): work orders, home visits and phone calls, weekly compliance.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use chrono::{NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use super::{page_in_memory, require, ApiJson, Params, STAFF};
use crate::api::auth::{self, Principal};
use crate::api::problem::{ApiResult, Problem};
use crate::api::query::{self, Cursor, Page, MAX_LIMIT};
use crate::api::ApiState;
use crate::care::{
    self, CareContact, CareContactKind, ElderCompliance, NewCareContact, NewWorkOrder,
    RegionCompliance, WorkOrder, WorkOrderFilter, WorkOrderStatus,
};

const WO_STATUSES: &[&str] = &["new", "dispatched", "accepted", "completed", "cancelled"];

/// A work order the caller may see: its elder is theirs (orders of no elder: admins).
async fn visible_work_order<C: tokio_postgres::GenericClient>(
    db: &C,
    p: &Principal,
    id: i64,
) -> ApiResult<WorkOrder> {
    let wo = match care::get_work_order(db, id).await {
        Ok(w) => w,
        Err(care::CareError::NotFound(_)) => return Err(Problem::not_found("work order")),
        Err(e) => return Err(e.into()),
    };
    let visible = match wo.elder_id {
        Some(e) => query::can_see_elder(db, p.user_id, e).await?,
        None => p.is_admin(),
    };
    if visible {
        Ok(wo)
    } else {
        Err(Problem::not_found("work order"))
    }
}

/// Work orders of the caller's elders, newest first.
#[utoipa::path(
    get,
    path = "/api/v1/work-orders",
    tag = "care",
    params(
        ("status" = Option<String>, Query, description = "new, dispatched, accepted, completed or cancelled"),
        ("open" = Option<bool>, Query, description = "Only orders not completed or cancelled"),
        ("elder_id" = Option<i64>, Query),
        ("limit" = Option<i64>, Query, description = "1-500, default 50"),
        ("cursor" = Option<String>, Query, description = "next_cursor of the previous page"),
    ),
    responses(
        (status = 200, body = Page<WorkOrder>),
        (status = 422, description = "Invalid parameter", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list_work_orders(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    mut q: Params,
) -> ApiResult<Json<Page<WorkOrder>>> {
    let status = q
        .one_of("status", WO_STATUSES)
        .and_then(|s| s.parse::<WorkOrderStatus>().ok());
    let open_only = q.bool("open").unwrap_or(false);
    let elder_id = q.i64("elder_id");
    let limit = q.limit();
    let before_id = q.id_cursor();
    q.finish()?;
    let db = state.pool.get().await?;
    let mut items = care::list_work_orders(
        &**db,
        p.user_id,
        &WorkOrderFilter {
            status,
            open_only,
            elder_id,
            before_id,
            limit: Some((limit + 1).min(MAX_LIMIT)),
        },
    )
    .await?;
    let more = items.len() as i64 > limit || (limit == MAX_LIMIT && items.len() as i64 == limit);
    items.truncate(limit as usize);
    let next_cursor = if more {
        items.last().map(|w| Cursor::Id(w.id).encode())
    } else {
        None
    };
    Ok(Json(Page { items, next_cursor }))
}

/// One work order.
#[utoipa::path(
    get,
    path = "/api/v1/work-orders/{id}",
    tag = "care",
    params(("id" = i64, Path)),
    responses(
        (status = 200, body = WorkOrder),
        (status = 404, description = "No such work order in the caller's scope", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_work_order(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    Path(id): Path<i64>,
) -> ApiResult<Json<WorkOrder>> {
    let db = state.pool.get().await?;
    Ok(Json(visible_work_order(&**db, &p, id).await?))
}

/// Open a work order for one of the caller's elders (staff).
#[utoipa::path(
    post,
    path = "/api/v1/work-orders",
    tag = "care",
    request_body = NewWorkOrder,
    responses(
        (status = 201, body = WorkOrder),
        (status = 403, description = "Guardians may not open work orders", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such elder in the caller's scope", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid field", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn create_work_order(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    ApiJson(new): ApiJson<NewWorkOrder>,
) -> ApiResult<impl IntoResponse> {
    require(&p, STAFF)?;
    let db = state.pool.get().await?;
    if !query::can_see_elder(&**db, p.user_id, new.elder_id).await? {
        return Err(Problem::not_found("elder"));
    }
    let wo = care::create_work_order(&**db, &new, "api", &p.username).await?;
    auth::audit(
        &**db,
        &p,
        "create_work_order",
        Some(new.elder_id),
        json!({"via": "api", "work_order_id": wo.id}),
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/api/v1/work-orders/{}", wo.id))],
        Json(wo),
    ))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DispatchBody {
    pub helper_name: String,
    pub helper_phone: Option<String>,
}

/// Dispatch (or re-dispatch) to a named helper. 409 when the order's state does not allow it.
#[utoipa::path(
    post,
    path = "/api/v1/work-orders/{id}/dispatch",
    tag = "care",
    params(("id" = i64, Path)),
    request_body = DispatchBody,
    responses(
        (status = 200, body = WorkOrder),
        (status = 403, description = "Guardians may not", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such work order in the caller's scope", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Not allowed in the order's state", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn dispatch(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    Path(id): Path<i64>,
    ApiJson(b): ApiJson<DispatchBody>,
) -> ApiResult<Json<WorkOrder>> {
    require(&p, STAFF)?;
    let db = state.pool.get().await?;
    visible_work_order(&**db, &p, id).await?;
    Ok(Json(
        care::dispatch(
            &**db,
            id,
            &b.helper_name,
            b.helper_phone.as_deref(),
            &p.username,
        )
        .await?,
    ))
}

/// The helper took the order on.
#[utoipa::path(
    post,
    path = "/api/v1/work-orders/{id}/accept",
    tag = "care",
    params(("id" = i64, Path)),
    responses(
        (status = 200, body = WorkOrder),
        (status = 403, description = "Guardians may not", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such work order in the caller's scope", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Not dispatched", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn accept(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    Path(id): Path<i64>,
) -> ApiResult<Json<WorkOrder>> {
    require(&p, STAFF)?;
    let db = state.pool.get().await?;
    visible_work_order(&**db, &p, id).await?;
    Ok(Json(care::accept(&**db, id).await?))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompleteBody {
    /// Amount to settle, in fen (1/100 yuan).
    pub cost_cents: i32,
    pub note: Option<String>,
}

/// Done, with the cost to settle.
#[utoipa::path(
    post,
    path = "/api/v1/work-orders/{id}/complete",
    tag = "care",
    params(("id" = i64, Path)),
    request_body = CompleteBody,
    responses(
        (status = 200, body = WorkOrder),
        (status = 403, description = "Guardians may not", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such work order in the caller's scope", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Not dispatched or accepted", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid field", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn complete(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    Path(id): Path<i64>,
    ApiJson(b): ApiJson<CompleteBody>,
) -> ApiResult<Json<WorkOrder>> {
    require(&p, STAFF)?;
    let db = state.pool.get().await?;
    visible_work_order(&**db, &p, id).await?;
    Ok(Json(
        care::complete(&**db, id, b.cost_cents, b.note.as_deref(), &p.username).await?,
    ))
}

/// Cancel an order not yet completed.
#[utoipa::path(
    post,
    path = "/api/v1/work-orders/{id}/cancel",
    tag = "care",
    params(("id" = i64, Path)),
    responses(
        (status = 200, body = WorkOrder),
        (status = 403, description = "Guardians may not", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such work order in the caller's scope", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Already completed or cancelled", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn cancel(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    Path(id): Path<i64>,
) -> ApiResult<Json<WorkOrder>> {
    require(&p, STAFF)?;
    let db = state.pool.get().await?;
    visible_work_order(&**db, &p, id).await?;
    Ok(Json(care::cancel(&**db, id, &p.username).await?))
}

/// An elder's home visits and phone calls, newest first.
#[utoipa::path(
    get,
    path = "/api/v1/elders/{id}/care-contacts",
    tag = "care",
    params(
        ("id" = i64, Path),
        ("kind" = Option<String>, Query, description = "visit or call"),
        ("limit" = Option<i64>, Query, description = "1-500, default 50"),
        ("cursor" = Option<String>, Query, description = "next_cursor of the previous page"),
    ),
    responses(
        (status = 200, body = Page<CareContact>),
        (status = 404, description = "No such elder in the caller's scope", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list_care_contacts(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    Path(id): Path<i64>,
    mut q: Params,
) -> ApiResult<Json<Page<CareContact>>> {
    let kind = q.one_of("kind", &["visit", "call"]);
    let limit = q.limit();
    let before = q.time_id_cursor();
    q.finish()?;
    let db = state.pool.get().await?;
    if !query::can_see_elder(&**db, p.user_id, id).await? {
        return Err(Problem::not_found("elder"));
    }
    let (before_t, before_id) = before.map(|(t, i)| (Some(t), Some(i))).unwrap_or_default();
    let rows = db
        .query(
            "SELECT id, elder_id, kind, at, by_name, notes FROM care_contacts
              WHERE elder_id = $1
                AND ($2::text IS NULL OR kind = $2)
                AND ($3::timestamptz IS NULL OR (at, id) < ($3, $4::bigint))
              ORDER BY at DESC, id DESC LIMIT $5",
            &[&id, &kind, &before_t, &before_id, &(limit + 1)],
        )
        .await?;
    let mut items: Vec<CareContact> = rows
        .iter()
        .map(|r| CareContact {
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
        })
        .collect();
    let more = items.len() as i64 > limit;
    items.truncate(limit as usize);
    let next_cursor = if more {
        items.last().map(|c| Cursor::TimeId(c.at, c.id).encode())
    } else {
        None
    };
    Ok(Json(Page { items, next_cursor }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CareContactBody {
    /// visit or call.
    pub kind: CareContactKind,
    /// When it happened (default now); not in the future, at most 30 days back.
    pub at: Option<chrono::DateTime<Utc>>,
    pub notes: Option<String>,
}

/// Record a home visit or phone call (staff); `by` is the caller.
#[utoipa::path(
    post,
    path = "/api/v1/elders/{id}/care-contacts",
    tag = "care",
    params(("id" = i64, Path)),
    request_body = CareContactBody,
    responses(
        (status = 201, body = CareContact),
        (status = 403, description = "Guardians may not", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such elder in the caller's scope", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid field", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn record_care_contact(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    Path(id): Path<i64>,
    ApiJson(b): ApiJson<CareContactBody>,
) -> ApiResult<(StatusCode, Json<CareContact>)> {
    require(&p, STAFF)?;
    let db = state.pool.get().await?;
    if !query::can_see_elder(&**db, p.user_id, id).await? {
        return Err(Problem::not_found("elder"));
    }
    let c = care::record_care_contact(
        &**db,
        &NewCareContact {
            elder_id: id,
            kind: b.kind,
            at: b.at,
            notes: b.notes,
        },
        p.user_id,
        &p.display_name,
    )
    .await?;
    Ok((StatusCode::CREATED, Json(c)))
}

/// Weekly compliance of each elder.
#[derive(Debug, Serialize, ToSchema)]
pub struct ComplianceList {
    /// Monday (China Standard Time) of the week.
    pub week_start: NaiveDate,
    /// Non-compliant first.
    pub items: Vec<ElderCompliance>,
    pub next_cursor: Option<String>,
}

/// Each of the caller's elders: visits and calls this week (or `week`), compliant when
/// visited at least once and called at least twice. Staff only.
#[utoipa::path(
    get,
    path = "/api/v1/compliance",
    tag = "care",
    params(
        ("week" = Option<String>, Query, description = "Any date in the week (YYYY-MM-DD); default this week"),
        ("compliant" = Option<bool>, Query, description = "Only compliant (true) or non-compliant (false) elders"),
        ("limit" = Option<i64>, Query, description = "1-500, default 50"),
        ("cursor" = Option<String>, Query, description = "next_cursor of the previous page"),
    ),
    responses(
        (status = 200, body = ComplianceList),
        (status = 403, description = "Guardians may not", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn compliance(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    mut q: Params,
) -> ApiResult<Json<ComplianceList>> {
    require(&p, STAFF)?;
    let week = q.date("week");
    let compliant = q.bool("compliant");
    let limit = q.limit();
    let after = q.text_cursor();
    q.finish()?;
    let week_start = match week {
        Some(d) => care::week_start(d),
        None => query::week_start_of(Utc::now()),
    };
    let db = state.pool.get().await?;
    let rows: Vec<ElderCompliance> = care::weekly_compliance(&**db, p.user_id, week_start)
        .await?
        .into_iter()
        .filter(|c| compliant.is_none_or(|want| c.compliant == want))
        .collect();
    let page = page_in_memory(rows, after.as_deref(), limit, |c| c.elder_id.to_string());
    Ok(Json(ComplianceList {
        week_start,
        items: page.items,
        next_cursor: page.next_cursor,
    }))
}

/// Weekly compliance rolled up per region.
#[derive(Debug, Serialize, ToSchema)]
pub struct RegionComplianceList {
    pub week_start: NaiveDate,
    pub items: Vec<RegionCompliance>,
    pub next_cursor: Option<String>,
}

/// Compliance per region in the caller's scope (each over its subtree), tree order. Staff
/// only.
#[utoipa::path(
    get,
    path = "/api/v1/compliance/regions",
    tag = "care",
    params(
        ("week" = Option<String>, Query, description = "Any date in the week (YYYY-MM-DD); default this week"),
        ("limit" = Option<i64>, Query, description = "1-500, default 50"),
        ("cursor" = Option<String>, Query, description = "next_cursor of the previous page"),
    ),
    responses(
        (status = 200, body = RegionComplianceList),
        (status = 403, description = "Guardians may not", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn compliance_regions(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    mut q: Params,
) -> ApiResult<Json<RegionComplianceList>> {
    require(&p, STAFF)?;
    let week = q.date("week");
    let limit = q.limit();
    let after = q.text_cursor();
    q.finish()?;
    let week_start = match week {
        Some(d) => care::week_start(d),
        None => query::week_start_of(Utc::now()),
    };
    let db = state.pool.get().await?;
    let rows = care::compliance_by_region(&**db, p.user_id, week_start).await?;
    let page = page_in_memory(rows, after.as_deref(), limit, |r| r.code.clone());
    Ok(Json(RegionComplianceList {
        week_start,
        items: page.items,
        next_cursor: page.next_cursor,
    }))
}
