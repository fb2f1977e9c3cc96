//! Regions (the three-tier network) and the per-region dashboard.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Duration, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{page_in_memory, require, ApiJson, Params, STAFF};
use crate::api::auth::Principal;
use crate::api::problem::{ApiResult, Problem};
use crate::api::query::{self, Page, RegionNode, RegionStats};
use crate::api::ApiState;
use crate::store::regions::{self, Level, NewRegion};

const LEVELS: &[&str] = &["city", "township", "community", "grid"];

/// The regions the caller may see, in tree order (each after its parent), with how many of
/// the caller's elders live under each. Guardians hold no regions and get an empty list.
#[utoipa::path(
    get,
    path = "/api/v1/regions",
    tag = "regions",
    params(
        ("under" = Option<String>, Query, description = "Only this region (by code) and everything under it"),
        ("level" = Option<String>, Query, description = "city, township, community or grid"),
        ("limit" = Option<i64>, Query, description = "1-500, default 50"),
        ("cursor" = Option<String>, Query, description = "next_cursor of the previous page"),
    ),
    responses(
        (status = 200, body = Page<RegionNode>),
        (status = 401, description = "Not authenticated", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    mut q: Params,
) -> ApiResult<Json<Page<RegionNode>>> {
    let under = q.string("under", 64);
    let level = q.one_of("level", LEVELS);
    let limit = q.limit();
    let after = q.text_cursor();
    q.finish()?;
    let db = state.pool.get().await?;
    let items: Vec<RegionNode> = query::list_regions(&**db, p.user_id, under.as_deref())
        .await?
        .into_iter()
        .filter(|r| level.as_deref().is_none_or(|l| r.level == l))
        .collect();
    Ok(Json(page_in_memory(items, after.as_deref(), limit, |r| {
        r.path.clone()
    })))
}

/// One region, by code.
#[utoipa::path(
    get,
    path = "/api/v1/regions/{code}",
    tag = "regions",
    params(("code" = String, Path)),
    responses(
        (status = 200, body = RegionNode),
        (status = 404, description = "No such region in the caller's scope", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    Path(code): Path<String>,
) -> ApiResult<Json<RegionNode>> {
    let db = state.pool.get().await?;
    query::get_region(&**db, p.user_id, &code)
        .await?
        .map(Json)
        .ok_or_else(|| Problem::not_found("region"))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewRegionBody {
    /// The office's code: 1-64 of A-Z a-z 0-9 _ . -
    pub code: String,
    pub name: String,
    /// city, township, community or grid.
    pub level: String,
    /// The parent's code; required for all but a city. Levels nest city → township →
    /// community → grid.
    pub parent: Option<String>,
}

/// Add a region (admin).
#[utoipa::path(
    post,
    path = "/api/v1/regions",
    tag = "regions",
    request_body = NewRegionBody,
    responses(
        (status = 201, body = RegionNode),
        (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The code exists", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid field", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn create(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    ApiJson(body): ApiJson<NewRegionBody>,
) -> ApiResult<(StatusCode, Json<RegionNode>)> {
    p.require_admin()?;
    let level: Level = body
        .level
        .parse()
        .map_err(|m: String| Problem::invalid_field("level", m))?;
    let db = state.pool.get().await?;
    if query::get_region(&**db, p.user_id, body.code.trim())
        .await?
        .is_some()
    {
        return Err(Problem::conflict(format!(
            "region {} exists",
            body.code.trim()
        )));
    }
    let new = NewRegion {
        code: body.code,
        name: body.name,
        level,
        parent_code: body.parent,
    };
    let up = regions::add_region(&state.pool, &new).await.map_err(|e| {
        // The registry calls the parent `parent_code`; this API calls it `parent`.
        let mut p = Problem::from(e);
        for f in &mut p.errors {
            if f.field == "parent_code" {
                f.field = "parent".into();
            }
        }
        p
    })?;
    let region = regions::get_region(&state.pool, up.id).await?;
    tracing::info!(by = %p.username, code = %region.code, "region added");
    query::get_region(&**db, p.user_id, &region.code)
        .await?
        .map(|r| (StatusCode::CREATED, Json(r)))
        .ok_or_else(|| Problem::not_found("region"))
}

/// The dashboard.
#[derive(Debug, Serialize, ToSchema)]
pub struct Dashboard {
    pub generated_at: DateTime<Utc>,
    /// Alerts opened since this time count towards the response figures.
    pub since: DateTime<Utc>,
    /// Monday (China Standard Time) of the week whose visits are counted.
    pub week_start: NaiveDate,
    /// One row per region the caller may see, each over its whole subtree, in tree order.
    pub regions: Vec<RegionStats>,
}

/// Per region in the caller's scope: open alerts, time to acknowledge (p50, p95), the
/// share acknowledged within 60 s, and weekly visit compliance. Staff only.
#[utoipa::path(
    get,
    path = "/api/v1/dashboard",
    tag = "regions",
    params(
        ("since" = Option<String>, Query, description = "RFC 3339 time or date; default 7 days ago"),
        ("week" = Option<String>, Query, description = "A date in the week for visit compliance (YYYY-MM-DD); default this week"),
        ("level" = Option<String>, Query, description = "Only regions of this level"),
        ("region" = Option<String>, Query, description = "Only this region's subtree (code)"),
    ),
    responses(
        (status = 200, body = Dashboard),
        (status = 403, description = "Guardians have no dashboard", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid parameter", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn dashboard(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    mut q: Params,
) -> ApiResult<Json<Dashboard>> {
    require(&p, STAFF)?;
    let now = Utc::now();
    let since = q.time("since").unwrap_or(now - Duration::days(7));
    let week = q.date("week");
    let level = q.one_of("level", LEVELS);
    let region = q.string("region", 64);
    q.finish()?;
    if since > now {
        return Err(Problem::invalid_field("since", "is in the future"));
    }
    let week_start = match week {
        Some(d) => crate::care::week_start(d),
        None => query::week_start_of(now),
    };
    let db = state.pool.get().await?;
    let regions = query::dashboard(
        &**db,
        p.user_id,
        &query::DashboardFilter {
            since,
            week_start,
            level,
            region,
        },
    )
    .await?;
    Ok(Json(Dashboard {
        generated_at: now,
        since,
        week_start,
        regions,
    }))
}
