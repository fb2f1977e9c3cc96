//! Elders: list, detail (audited), create and update (admins; supervisors within their
//! regions), telemetry in buckets (audited), events and bracelet history.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use chrono::{DateTime, Duration, NaiveDate, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use super::{require, ApiJson, Params, MANAGERS};
use crate::api::auth::{self, Principal, UserRole};
use crate::api::problem::{ApiResult, FieldError, Problem};
use crate::api::query::{
    self, BindingEntry, BucketWidth, ElderDetail, ElderEvent, ElderFilter, ElderSummary,
    EventFilter, Page, TelemetryBucket,
};
use crate::api::ApiState;
use crate::store::registry::{
    self, Category, ElderKey, ElderPatch, Gender, HomeLocation, Language, NewElder, Thresholds,
};

pub const CATEGORIES: &[&str] = &[
    "living_alone",
    "empty_nest",
    "left_behind",
    "special_hardship",
];
pub const EVENT_KINDS: &[&str] = &[
    "sos",
    "fall",
    "sos_cancel",
    "worn_off",
    "worn_on",
    "low_battery",
    "power_off",
    "service_call",
];
/// Most buckets one telemetry request may return.
pub const MAX_BUCKETS: i64 = 2000;

/// The caller's elders, by id.
#[utoipa::path(
    get,
    path = "/api/v1/elders",
    tag = "elders",
    params(
        ("region" = Option<String>, Query, description = "Region code: elders in it or anywhere under it"),
        ("category" = Option<String>, Query, description = "living_alone, empty_nest, left_behind or special_hardship"),
        ("q" = Option<String>, Query, description = "Part of the name, or the exact ledger ref or phone"),
        ("has_device" = Option<bool>, Query, description = "With (true) or without (false) a bound bracelet"),
        ("limit" = Option<i64>, Query, description = "1-500, default 50"),
        ("cursor" = Option<String>, Query, description = "next_cursor of the previous page"),
    ),
    responses(
        (status = 200, body = Page<ElderSummary>),
        (status = 401, description = "Not authenticated", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid parameter", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    mut q: Params,
) -> ApiResult<Json<Page<ElderSummary>>> {
    let f = ElderFilter {
        region: q.string("region", 64),
        category: q.one_of("category", CATEGORIES),
        q: q.string("q", 100),
        has_device: q.bool("has_device"),
        limit: q.limit(),
        after_id: q.id_cursor(),
    };
    q.finish()?;
    let db = state.pool.get().await?;
    Ok(Json(query::list_elders(&**db, p.user_id, &f).await?))
}

/// One elder: identity, home, health notes, contacts and bracelets. Every view is recorded
/// in the access audit (`view_elder`).
#[utoipa::path(
    get,
    path = "/api/v1/elders/{id}",
    tag = "elders",
    params(("id" = i64, Path)),
    responses(
        (status = 200, body = ElderDetail),
        (status = 404, description = "No such elder in the caller's scope", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    Path(id): Path<i64>,
) -> ApiResult<Json<ElderDetail>> {
    let db = state.pool.get().await?;
    let elder = query::get_elder(&**db, p.user_id, id)
        .await?
        .ok_or_else(|| Problem::not_found("elder"))?;
    auth::audit(&**db, &p, "view_elder", Some(id), json!({"via": "api"})).await?;
    Ok(Json(elder))
}

/// A position in degrees.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LatLonBody {
    pub lat: f64,
    pub lon: f64,
}

/// Absent: unchanged; `null`: cleared; a value: set.
fn double_option<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Some(Option::deserialize(d)?))
}

/// An elder to create (`name` required) or the fields to change (absent: unchanged).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ElderBody {
    pub name: Option<String>,
    /// The office ledger's id.
    pub external_ref: Option<String>,
    /// Resident ID number (18 characters).
    pub id_number: Option<String>,
    pub birth_date: Option<NaiveDate>,
    pub phone: Option<String>,
    pub address: Option<String>,
    pub community: Option<String>,
    /// Home location (the geofence's centre); `null` clears it.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<LatLonBody>)]
    pub home: Option<Option<LatLonBody>>,
    pub home_radius_m: Option<i32>,
    pub wander_risk: Option<bool>,
    /// zh-CN or en.
    pub language: Option<String>,
    /// Per-elder vital-sign thresholds, e.g. `{"hr_high": {"above": 120, "for": "5m"}}`.
    #[schema(value_type = Option<Object>)]
    pub thresholds: Option<serde_json::Value>,
    pub notes: Option<String>,
    /// The grid (code) the elder lives in; `null` takes them out of every region (admins).
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>)]
    pub region: Option<Option<String>>,
    /// female or male.
    pub gender: Option<String>,
    /// living_alone, empty_nest, left_behind, special_hardship (replaces the list).
    pub categories: Option<Vec<String>>,
    pub conditions: Option<Vec<String>>,
    pub medications: Option<Vec<String>>,
}

/// The typed values of a body, every problem named.
struct Typed {
    gender: Option<Gender>,
    language: Option<Language>,
    categories: Option<Vec<Category>>,
    thresholds: Option<Thresholds>,
    home: Option<Option<HomeLocation>>,
}

fn typed(b: &ElderBody) -> Result<Typed, Vec<FieldError>> {
    let mut errors = Vec::new();
    let mut bad = |field: String, message: String| errors.push(FieldError { field, message });
    let gender = match b.gender.as_deref().map(str::parse::<Gender>) {
        Some(Err(m)) => {
            bad("gender".into(), m);
            None
        }
        Some(Ok(g)) => Some(g),
        None => None,
    };
    let language = match b.language.as_deref().map(str::parse::<Language>) {
        Some(Err(m)) => {
            bad("language".into(), m);
            None
        }
        Some(Ok(l)) => Some(l),
        None => None,
    };
    let categories = b.categories.as_ref().map(|list| {
        list.iter()
            .enumerate()
            .filter_map(|(i, c)| match c.parse::<Category>() {
                Ok(c) => Some(c),
                Err(m) => {
                    bad(format!("categories[{i}]"), m);
                    None
                }
            })
            .collect()
    });
    let thresholds = match &b.thresholds {
        None => None,
        Some(v) => match Thresholds::from_json(v) {
            Ok(t) => Some(t),
            Err(problems) => {
                for m in problems {
                    match m.split_once(':') {
                        Some((k, rest)) if !k.contains(' ') => {
                            bad(format!("thresholds.{}", k.trim()), rest.trim().to_string())
                        }
                        _ => bad("thresholds".into(), m),
                    }
                }
                None
            }
        },
    };
    let home = match b.home {
        None => None,
        Some(None) => Some(None),
        Some(Some(h)) => match HomeLocation::from_degrees(h.lat, h.lon) {
            Ok(h) => Some(Some(h)),
            Err(m) => {
                bad("home".into(), m);
                None
            }
        },
    };
    if errors.is_empty() {
        Ok(Typed {
            gender,
            language,
            categories,
            thresholds,
            home,
        })
    } else {
        Err(errors)
    }
}

/// Every problem of a body at once: the typed fields above, and the registry's own checks
/// of the text fields (named as this API names them).
fn check_body(b: &ElderBody, creating: bool) -> Result<Typed, Problem> {
    let mut errors = match typed(b) {
        Ok(_) => Vec::new(),
        Err(e) => e,
    };
    let name = b.name.clone().unwrap_or_default();
    if name.trim().is_empty() && (creating || b.name.is_some()) {
        errors.push(FieldError {
            field: "name".into(),
            message: "is required".into(),
        });
    }
    let probe = NewElder {
        external_ref: b.external_ref.clone(),
        name: if name.trim().is_empty() {
            "-".into()
        } else {
            name
        },
        id_number: b.id_number.clone(),
        birth_date: b.birth_date,
        phone: b.phone.clone(),
        address: b.address.clone(),
        community: b.community.clone(),
        home_radius_m: b.home_radius_m,
        notes: b.notes.clone(),
        region: b.region.clone().flatten(),
        conditions: b.conditions.clone(),
        medications: b.medications.clone(),
        ..Default::default()
    };
    if let Err(problems) = probe.validated() {
        errors.extend(problems.into_iter().map(|p| FieldError {
            field: match p.field.as_str() {
                "ref" => "external_ref".into(),
                "radius_m" => "home_radius_m".into(),
                _ => p.field,
            },
            message: p.message,
        }));
    }
    if !errors.is_empty() {
        return Err(Problem::invalid(errors));
    }
    typed(b).map_err(Problem::invalid)
}

/// A supervisor may only place elders in grids of their own regions.
async fn check_region_in_scope<C: tokio_postgres::GenericClient>(
    db: &C,
    p: &Principal,
    code: &str,
) -> ApiResult<()> {
    if p.is_admin() {
        return Ok(());
    }
    let row = db
        .query_opt("SELECT id FROM regions WHERE code = $1", &[&code.trim()])
        .await?;
    let visible = match row {
        Some(r) => p.can_see_region(db, r.get(0)).await?,
        None => false,
    };
    if visible {
        Ok(())
    } else {
        Err(Problem::invalid_field(
            "region",
            format!("no grid {:?} among your regions", code.trim()),
        ))
    }
}

fn elder_location(id: i64) -> [(header::HeaderName, String); 1] {
    [(header::LOCATION, format!("/api/v1/elders/{id}"))]
}

/// Register an elder (admins; supervisors in a grid of their regions, which is then
/// required). 409 when `external_ref` is taken.
#[utoipa::path(
    post,
    path = "/api/v1/elders",
    tag = "elders",
    request_body = ElderBody,
    responses(
        (status = 201, body = ElderDetail),
        (status = 403, description = "Role may not register elders", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The ledger ref is taken", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid field", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn create(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    ApiJson(b): ApiJson<ElderBody>,
) -> ApiResult<impl IntoResponse> {
    require(&p, MANAGERS)?;
    let t = check_body(&b, true)?;
    let name = b.name.clone().unwrap_or_default();
    let region = b.region.clone().flatten();
    let db = state.pool.get().await?;
    match &region {
        Some(code) => check_region_in_scope(&**db, &p, code).await?,
        None if p.role == UserRole::Supervisor => {
            return Err(Problem::invalid_field(
                "region",
                "is required: the grid, among your regions, the elder lives in",
            ))
        }
        None => {}
    }
    if let Some(r) = b
        .external_ref
        .as_deref()
        .map(str::trim)
        .filter(|r| !r.is_empty())
    {
        if db
            .query_opt("SELECT 1 FROM elders WHERE external_ref = $1", &[&r])
            .await?
            .is_some()
        {
            return Err(Problem::conflict(format!(
                "external_ref {r:?} already belongs to an elder"
            )));
        }
    }
    let new = NewElder {
        external_ref: b.external_ref.clone(),
        name,
        id_number: b.id_number.clone(),
        birth_date: b.birth_date,
        phone: b.phone.clone(),
        address: b.address.clone(),
        community: b.community.clone(),
        home: t.home.flatten(),
        home_radius_m: b.home_radius_m,
        wander_risk: b.wander_risk,
        language: t.language,
        thresholds: t.thresholds,
        notes: b.notes.clone(),
        region,
        gender: t.gender,
        categories: t.categories,
        conditions: b.conditions.clone(),
        medications: b.medications.clone(),
    };
    let up = registry::upsert_elder(&state.pool, &new).await?;
    auth::audit(
        &**db,
        &p,
        "create_elder",
        Some(up.id),
        json!({"via": "api"}),
    )
    .await?;
    let elder = query::get_elder(&**db, p.user_id, up.id)
        .await?
        .ok_or_else(|| Problem::not_found("elder"))?;
    Ok((StatusCode::CREATED, elder_location(up.id), Json(elder)))
}

/// Change an elder (admins; supervisors for elders in their regions). Only the fields given
/// change; lists replace the stored lists.
#[utoipa::path(
    patch,
    path = "/api/v1/elders/{id}",
    tag = "elders",
    params(("id" = i64, Path)),
    request_body = ElderBody,
    responses(
        (status = 200, body = ElderDetail),
        (status = 403, description = "Role may not change elders", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such elder in the caller's scope", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid field", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn update(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    Path(id): Path<i64>,
    ApiJson(b): ApiJson<ElderBody>,
) -> ApiResult<Json<ElderDetail>> {
    require(&p, MANAGERS)?;
    let db = state.pool.get().await?;
    if !query::can_see_elder(&**db, p.user_id, id).await? {
        return Err(Problem::not_found("elder"));
    }
    let t = check_body(&b, false)?;
    match &b.region {
        Some(Some(code)) => check_region_in_scope(&**db, &p, code).await?,
        Some(None) if !p.is_admin() => {
            return Err(Problem::invalid_field(
                "region",
                "only an admin can take an elder out of every region",
            ))
        }
        _ => {}
    }
    let patch = ElderPatch {
        name: b.name.clone(),
        external_ref: b.external_ref.clone(),
        id_number: b.id_number.clone(),
        birth_date: b.birth_date,
        phone: b.phone.clone(),
        address: b.address.clone(),
        community: b.community.clone(),
        home: t.home,
        home_radius_m: b.home_radius_m,
        wander_risk: b.wander_risk,
        language: t.language,
        thresholds: t.thresholds,
        notes: b.notes.clone(),
        region: b.region.clone(),
        gender: t.gender,
        categories: t.categories,
        conditions: b.conditions.clone(),
        medications: b.medications.clone(),
    };
    registry::update_elder(&state.pool, &ElderKey::Id(id), &patch).await?;
    auth::audit(&**db, &p, "update_elder", Some(id), json!({"via": "api"})).await?;
    // A supervisor cannot move an elder out of their regions (checked above), so the elder
    // is still visible.
    query::get_elder(&**db, p.user_id, id)
        .await?
        .map(Json)
        .ok_or_else(|| Problem::not_found("elder"))
}

/// Remove an elder (admin). Their bracelets stay provisioned, unbound; telemetry stays.
#[utoipa::path(
    delete,
    path = "/api/v1/elders/{id}",
    tag = "elders",
    params(("id" = i64, Path)),
    responses(
        (status = 204, description = "Removed"),
        (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such elder", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn remove(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    Path(id): Path<i64>,
) -> ApiResult<StatusCode> {
    p.require_admin()?;
    let db = state.pool.get().await?;
    if !query::can_see_elder(&**db, p.user_id, id).await? {
        return Err(Problem::not_found("elder"));
    }
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let devices: Vec<String> = tx
        .query("SELECT device_id FROM devices WHERE elder_id = $1", &[&id])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for d in &devices {
        crate::store::devices::unbind_in(&*tx, d, &p.username).await?;
    }
    tx.execute("DELETE FROM elders WHERE id = $1", &[&id])
        .await?;
    auth::audit(
        &*tx,
        &p,
        "delete_elder",
        Some(id),
        json!({"via": "api", "devices": devices}),
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// An elder's vital signs in time buckets.
#[derive(Debug, Serialize, ToSchema)]
pub struct Telemetry {
    pub elder_id: i64,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub bucket: BucketWidth,
    /// Buckets with at least one heartbeat, oldest first.
    pub buckets: Vec<TelemetryBucket>,
}

/// Vital signs in buckets of 5 min, 1 h or 1 day: per bucket min, max and mean of heart
/// rate, SpO2, blood pressure and skin temperature, and the number of heartbeats. From every
/// bracelet the elder wore in the range, only while they wore it. Audited
/// (`view_telemetry`).
#[utoipa::path(
    get,
    path = "/api/v1/elders/{id}/telemetry",
    tag = "elders",
    params(
        ("id" = i64, Path),
        ("from" = Option<String>, Query, description = "Start (RFC 3339 or date); default 24 h before `to`"),
        ("to" = Option<String>, Query, description = "End, exclusive; default now"),
        ("bucket" = Option<String>, Query, description = "5m, 1h or 1d (default 1h); buckets align to China Standard Time"),
    ),
    responses(
        (status = 200, body = Telemetry),
        (status = 404, description = "No such elder in the caller's scope", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid parameter", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn telemetry(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    Path(id): Path<i64>,
    mut q: Params,
) -> ApiResult<Json<Telemetry>> {
    let to = q.time("to").unwrap_or_else(Utc::now);
    let from = q.time("from").unwrap_or(to - Duration::hours(24));
    let bucket = match q.raw("bucket") {
        None => BucketWidth::Hour,
        Some(b) => match b.parse() {
            Ok(b) => b,
            Err(m) => {
                q.error("bucket", m);
                BucketWidth::Hour
            }
        },
    };
    q.finish()?;
    if from >= to {
        return Err(Problem::invalid_field("to", "must be after from"));
    }
    let n = (to - from).num_seconds() / bucket.seconds();
    if n > MAX_BUCKETS {
        return Err(Problem::invalid_field(
            "bucket",
            format!(
                "the range holds {n} buckets of {}; at most {MAX_BUCKETS}: narrow from/to or use a wider bucket",
                bucket.as_str()
            ),
        ));
    }
    let db = state.pool.get().await?;
    let buckets = query::telemetry_buckets(&**db, p.user_id, id, from, to, bucket)
        .await?
        .ok_or_else(|| Problem::not_found("elder"))?;
    auth::audit(
        &**db,
        &p,
        "view_telemetry",
        Some(id),
        json!({"via": "api", "from": from, "to": to, "bucket": bucket.as_str()}),
    )
    .await?;
    Ok(Json(Telemetry {
        elder_id: id,
        from,
        to,
        bucket,
        buckets,
    }))
}

/// What the elder's bracelets reported (SOS, fall, worn off, ...), newest first.
#[utoipa::path(
    get,
    path = "/api/v1/elders/{id}/events",
    tag = "elders",
    params(
        ("id" = i64, Path),
        ("kind" = Option<String>, Query, description = "Comma-separated: sos, fall, sos_cancel, worn_off, worn_on, low_battery, power_off, service_call"),
        ("since" = Option<String>, Query, description = "Occurred at or after (RFC 3339 or date)"),
        ("until" = Option<String>, Query, description = "Occurred before"),
        ("limit" = Option<i64>, Query, description = "1-500, default 50"),
        ("cursor" = Option<String>, Query, description = "next_cursor of the previous page"),
    ),
    responses(
        (status = 200, body = Page<ElderEvent>),
        (status = 404, description = "No such elder in the caller's scope", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn events(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    Path(id): Path<i64>,
    mut q: Params,
) -> ApiResult<Json<Page<ElderEvent>>> {
    let f = EventFilter {
        kind: q.list("kind", Some(EVENT_KINDS)),
        since: q.time("since"),
        until: q.time("until"),
        limit: q.limit(),
        before: q.time_id_cursor(),
    };
    q.finish()?;
    let db = state.pool.get().await?;
    query::elder_events(&**db, p.user_id, id, &f)
        .await?
        .map(Json)
        .ok_or_else(|| Problem::not_found("elder"))
}

/// The bracelets the elder has worn, newest first.
#[utoipa::path(
    get,
    path = "/api/v1/elders/{id}/bindings",
    tag = "elders",
    params(("id" = i64, Path)),
    responses(
        (status = 200, body = Page<BindingEntry>),
        (status = 404, description = "No such elder in the caller's scope", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn bindings(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    Path(id): Path<i64>,
) -> ApiResult<Json<Page<BindingEntry>>> {
    let db = state.pool.get().await?;
    let items = query::elder_bindings(&**db, p.user_id, id)
        .await?
        .ok_or_else(|| Problem::not_found("elder"))?;
    Ok(Json(Page {
        items,
        next_cursor: None,
    }))
}
