//! Alerts: list and filter, detail, timeline, acknowledge, resolve.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use utoipa::ToSchema;

use super::extract::OptionalJson;
use super::{require, ApiJson, Params, STAFF};
use crate::alerts::engine::{self, Transition};
use crate::api::auth::Principal;
use crate::api::problem::{ApiResult, Problem};
use crate::api::query::{self, AlertFilter, AlertView, Page, TimelineEntry};
use crate::api::ApiState;

pub const STATUSES: &[&str] = &["open", "acknowledged", "resolved"];
pub const SEVERITIES: &[&str] = &["critical", "high", "medium", "low"];

/// The caller's alerts, newest first.
#[utoipa::path(
    get,
    path = "/api/v1/alerts",
    tag = "alerts",
    params(
        ("status" = Option<String>, Query, description = "Comma-separated: open, acknowledged, resolved"),
        ("kind" = Option<String>, Query, description = "Comma-separated kinds: sos, fall, hr_high, silent, wellness_check, ..."),
        ("severity" = Option<String>, Query, description = "Comma-separated: critical, high, medium, low"),
        ("elder_id" = Option<i64>, Query),
        ("device_id" = Option<String>, Query),
        ("region" = Option<String>, Query, description = "Region code: alerts of elders in its subtree"),
        ("since" = Option<String>, Query, description = "Opened at or after (RFC 3339 or date)"),
        ("until" = Option<String>, Query, description = "Opened before"),
        ("limit" = Option<i64>, Query, description = "1-500, default 50"),
        ("cursor" = Option<String>, Query, description = "next_cursor of the previous page"),
    ),
    responses(
        (status = 200, body = Page<AlertView>),
        (status = 422, description = "Invalid parameter", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    mut q: Params,
) -> ApiResult<Json<Page<AlertView>>> {
    let f = AlertFilter {
        status: q.list("status", Some(STATUSES)),
        kind: q.list("kind", None),
        severity: q.list("severity", Some(SEVERITIES)),
        elder_id: q.i64("elder_id"),
        device_id: q.string("device_id", 64),
        region: q.string("region", 64),
        since: q.time("since"),
        until: q.time("until"),
        limit: q.limit(),
        before: q.time_id_cursor(),
    };
    q.finish()?;
    let db = state.pool.get().await?;
    Ok(Json(query::list_alerts(&**db, p.user_id, &f).await?))
}

/// One alert.
#[utoipa::path(
    get,
    path = "/api/v1/alerts/{id}",
    tag = "alerts",
    params(("id" = i64, Path)),
    responses(
        (status = 200, body = AlertView),
        (status = 404, description = "No such alert in the caller's scope", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    Path(id): Path<i64>,
) -> ApiResult<Json<AlertView>> {
    let db = state.pool.get().await?;
    query::get_alert(&**db, p.user_id, id)
        .await?
        .map(Json)
        .ok_or_else(|| Problem::not_found("alert"))
}

/// Everything that happened to an alert, in order: opened, notified, delivered, escalated,
/// acknowledged, resolved...
#[utoipa::path(
    get,
    path = "/api/v1/alerts/{id}/timeline",
    tag = "alerts",
    params(("id" = i64, Path)),
    responses(
        (status = 200, body = Page<TimelineEntry>),
        (status = 404, description = "No such alert in the caller's scope", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn timeline(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    Path(id): Path<i64>,
) -> ApiResult<Json<Page<TimelineEntry>>> {
    let db = state.pool.get().await?;
    let items = query::alert_timeline(&**db, p.user_id, id)
        .await?
        .ok_or_else(|| Problem::not_found("alert"))?;
    Ok(Json(Page {
        items,
        next_cursor: None,
    }))
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AckBody {
    /// Optional words for the timeline ("on my way").
    pub note: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResolveBody {
    /// What happened and what was done (required).
    pub note: String,
}

fn transition_problem(t: Transition) -> Problem {
    match t {
        Transition::AlreadyAcknowledged => {
            Problem::conflict("the alert is already acknowledged").typed("already-acknowledged")
        }
        Transition::AlreadyResolved => {
            Problem::conflict("the alert is already resolved").typed("already-resolved")
        }
        Transition::NotFound => Problem::not_found("alert"),
        Transition::Done => Problem::internal(&"transition reported as failed"),
    }
}

/// Acknowledge: someone is on it. Escalation stops (pending steps are skipped, unsent
/// notifications cancelled). 409 when already acknowledged or resolved. Guardians may
/// acknowledge their own elders' alerts.
#[utoipa::path(
    post,
    path = "/api/v1/alerts/{id}/ack",
    tag = "alerts",
    params(("id" = i64, Path)),
    request_body(content = Option<AckBody>, description = "Optional; an empty body is fine"),
    responses(
        (status = 200, body = AlertView),
        (status = 404, description = "No such alert in the caller's scope", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Already acknowledged or resolved", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn acknowledge(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    Path(id): Path<i64>,
    OptionalJson(body): OptionalJson<AckBody>,
) -> ApiResult<Json<AlertView>> {
    // The body is optional: `POST .../ack` with nothing is the one-tap case.
    let note = body
        .note
        .as_deref()
        .map(str::trim)
        .filter(|n| !n.is_empty());
    if note.is_some_and(|n| n.chars().count() > 2000) {
        return Err(Problem::invalid_field("note", "at most 2000 characters"));
    }
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    if query::get_alert(&*tx, p.user_id, id).await?.is_none() {
        return Err(Problem::not_found("alert"));
    }
    let t = engine::acknowledge(&tx, id, &p.username, "api", &state.alerts).await?;
    if t != Transition::Done {
        return Err(transition_problem(t));
    }
    if let Some(n) = note {
        engine::timeline(
            &tx,
            id,
            "note",
            Some(&p.username),
            Some("api"),
            json!({"note": n}),
        )
        .await?;
    }
    tx.commit().await?;
    tracing::info!(alert_id = id, by = %p.username, "alert acknowledged via API");
    query::get_alert(&**client, p.user_id, id)
        .await?
        .map(Json)
        .ok_or_else(|| Problem::not_found("alert"))
}

/// Resolve with a note (required). Staff only: guardians acknowledge, the grid closes.
/// 409 when already resolved.
#[utoipa::path(
    post,
    path = "/api/v1/alerts/{id}/resolve",
    tag = "alerts",
    params(("id" = i64, Path)),
    request_body = ResolveBody,
    responses(
        (status = 200, body = AlertView),
        (status = 403, description = "Guardians may not resolve", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such alert in the caller's scope", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Already resolved", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Note missing", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn resolve(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    Path(id): Path<i64>,
    ApiJson(body): ApiJson<ResolveBody>,
) -> ApiResult<Json<AlertView>> {
    require(&p, STAFF)?;
    let note = body.note.trim();
    if note.is_empty() {
        return Err(Problem::invalid_field(
            "note",
            "is required: say what happened",
        ));
    }
    if note.chars().count() > 2000 {
        return Err(Problem::invalid_field("note", "at most 2000 characters"));
    }
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    if query::get_alert(&*tx, p.user_id, id).await?.is_none() {
        return Err(Problem::not_found("alert"));
    }
    let t = engine::resolve(&tx, id, &p.username, note).await?;
    if t != Transition::Done {
        return Err(transition_problem(t));
    }
    tx.commit().await?;
    tracing::info!(alert_id = id, by = %p.username, "alert resolved via API");
    query::get_alert(&**client, p.user_id, id)
        .await?
        .map(Json)
        .ok_or_else(|| Problem::not_found("alert"))
}
