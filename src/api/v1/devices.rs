//! Bracelets: the fleet (scoped), provisioning with MQTT credentials (admin), rotation and
//! revocation, binding to elders with history.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use super::{broker_admin, require, ApiJson, Params, MANAGERS};
use crate::api::auth::{self, Principal};
use crate::api::problem::{ApiResult, FieldError, Problem};
use crate::api::query::{self, BindingEntry, DeviceFilter, DeviceSummary, Page};
use crate::api::ApiState;
use crate::store::credentials::{self, CredentialStatus, DeviceCredential};
use crate::store::devices::{self as store_devices, NewDevices};

/// The fleet within the caller's scope (unbound bracelets: admins only), by device id.
#[utoipa::path(
    get,
    path = "/api/v1/devices",
    tag = "devices",
    params(
        ("silent" = Option<bool>, Query, description = "Never heard from, or past its silence deadline"),
        ("online" = Option<bool>, Query, description = "As the broker last reported"),
        ("low_battery" = Option<bool>, Query, description = "Battery at or under 20 %"),
        ("bound" = Option<bool>, Query, description = "Bound to an elder (true) or free (false)"),
        ("elder_id" = Option<i64>, Query),
        ("region" = Option<String>, Query, description = "Region code: bracelets of elders in its subtree"),
        ("q" = Option<String>, Query, description = "Part of the device id or IMEI"),
        ("limit" = Option<i64>, Query, description = "1-500, default 50"),
        ("cursor" = Option<String>, Query, description = "next_cursor of the previous page"),
    ),
    responses(
        (status = 200, body = Page<DeviceSummary>),
        (status = 422, description = "Invalid parameter", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    mut q: Params,
) -> ApiResult<Json<Page<DeviceSummary>>> {
    let f = DeviceFilter {
        silent: q.bool("silent"),
        online: q.bool("online"),
        low_battery: q.bool("low_battery"),
        bound: q.bool("bound"),
        elder_id: q.i64("elder_id"),
        region: q.string("region", 64),
        q: q.string("q", 64),
        limit: q.limit(),
        after: q.text_cursor(),
    };
    q.finish()?;
    let db = state.pool.get().await?;
    Ok(Json(query::list_devices(&**db, p.user_id, &f).await?))
}

/// One bracelet with its latest state.
#[utoipa::path(
    get,
    path = "/api/v1/devices/{id}",
    tag = "devices",
    params(("id" = String, Path)),
    responses(
        (status = 200, body = DeviceSummary),
        (status = 404, description = "No such device in the caller's scope", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<DeviceSummary>> {
    let db = state.pool.get().await?;
    query::get_device(&**db, p.user_id, &id)
        .await?
        .map(Json)
        .ok_or_else(|| Problem::not_found("device"))
}

/// Who wore the bracelet when, newest first (earlier wearers outside the caller's scope are
/// not named).
#[utoipa::path(
    get,
    path = "/api/v1/devices/{id}/bindings",
    tag = "devices",
    params(("id" = String, Path)),
    responses(
        (status = 200, body = Page<BindingEntry>),
        (status = 404, description = "No such device in the caller's scope", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn bindings(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<Page<BindingEntry>>> {
    let db = state.pool.get().await?;
    let items = query::device_bindings(&**db, p.user_id, &id)
        .await?
        .ok_or_else(|| Problem::not_found("device"))?;
    Ok(Json(Page {
        items,
        next_cursor: None,
    }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewDeviceBody {
    /// The id the bracelet uses in its MQTT topics: its IMEI or 1-64 of A-Z a-z 0-9 _ -
    pub device_id: String,
    /// 15 digits.
    pub imei: Option<String>,
    pub model: Option<String>,
    pub firmware: Option<String>,
    /// Expected seconds between heartbeats (silence detection derives from it); default 60.
    pub heartbeat_interval_s: Option<i32>,
    /// Bind to this elder at once.
    pub elder_id: Option<i64>,
    /// Issue MQTT credentials now (default true).
    pub issue_credentials: Option<bool>,
}

/// MQTT credentials of a bracelet. The password is shown only here, once.
#[derive(Debug, Serialize, ToSchema)]
pub struct CredentialsBody {
    pub device_id: String,
    pub username: String,
    pub password: String,
    /// 1 at the first issue, +1 at every rotation.
    pub generation: i32,
    /// Topics the bracelet may publish to.
    pub publish: Vec<String>,
    /// The topic it may subscribe to (commands).
    pub subscribe: Vec<String>,
}

impl From<DeviceCredential> for CredentialsBody {
    fn from(c: DeviceCredential) -> Self {
        let base = format!("sg/v1/dev/{}", c.device_id);
        CredentialsBody {
            publish: vec![
                format!("{base}/hb"),
                format!("{base}/evt"),
                format!("{base}/state"),
            ],
            subscribe: vec![format!("{base}/cmd")],
            device_id: c.device_id,
            username: c.username,
            password: c.password,
            generation: c.generation,
        }
    }
}

/// What is recorded about a bracelet's credentials (never the password).
#[derive(Debug, Serialize, ToSchema)]
pub struct CredentialStatusBody {
    pub device_id: String,
    pub username: String,
    pub generation: i32,
    /// active or revoked.
    pub state: String,
    pub issued_at: DateTime<Utc>,
    pub rotated_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl From<CredentialStatus> for CredentialStatusBody {
    fn from(s: CredentialStatus) -> Self {
        CredentialStatusBody {
            device_id: s.device_id,
            username: s.username,
            generation: s.generation,
            state: s.state.to_string(),
            issued_at: s.issued_at,
            rotated_at: s.rotated_at,
            revoked_at: s.revoked_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Provisioned {
    pub device: DeviceSummary,
    /// Absent when `issue_credentials` was false.
    pub credentials: Option<CredentialsBody>,
}

/// Provision a bracelet (admin): registers it, optionally binds it to an elder, and issues
/// its MQTT credentials (returned once). 409 when the id is already provisioned; 503 when
/// credentials are asked for and broker administration is not configured (nothing is
/// written then).
#[utoipa::path(
    post,
    path = "/api/v1/devices",
    tag = "devices",
    request_body = NewDeviceBody,
    responses(
        (status = 201, body = Provisioned),
        (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Already provisioned", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid field", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Broker administration not configured", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn provision(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    ApiJson(b): ApiJson<NewDeviceBody>,
) -> ApiResult<impl IntoResponse> {
    p.require_admin()?;
    let mut errors = Vec::new();
    let mut bad = |field: &str, message: String| {
        errors.push(FieldError {
            field: field.into(),
            message,
        })
    };
    let device_id = store_devices::parse_device_id(&b.device_id)
        .map_err(|m| bad("device_id", m))
        .ok();
    let imei = match b.imei.as_deref().filter(|s| !s.trim().is_empty()) {
        Some(i) => store_devices::parse_imei(i)
            .map_err(|m| bad("imei", m))
            .ok(),
        None => None,
    };
    let model = match b.model.as_deref().filter(|s| !s.trim().is_empty()) {
        Some(m) => store_devices::parse_label(m)
            .map_err(|e| bad("model", e))
            .ok(),
        None => None,
    };
    let firmware = match b.firmware.as_deref().filter(|s| !s.trim().is_empty()) {
        Some(m) => store_devices::parse_label(m)
            .map_err(|e| bad("firmware", e))
            .ok(),
        None => None,
    };
    if let Some(i) = b.heartbeat_interval_s {
        if !(1..=86_400).contains(&i) {
            bad("heartbeat_interval_s", "1 to 86400 seconds".into());
        }
    }
    if !errors.is_empty() {
        return Err(Problem::invalid(errors));
    }
    let device_id = device_id.unwrap_or_default();
    let issue = b.issue_credentials.unwrap_or(true);
    let admin = if issue {
        Some(broker_admin(&state)?)
    } else {
        None
    };
    let mut client = state.pool.get().await?;
    if let Some(e) = b.elder_id {
        if client
            .query_opt("SELECT 1 FROM elders WHERE id = $1", &[&e])
            .await?
            .is_none()
        {
            return Err(Problem::invalid_field("elder_id", "no such elder"));
        }
    }
    if client
        .query_opt(
            "SELECT 1 FROM devices WHERE device_id = $1 OR ($2::text IS NOT NULL AND imei = $2)",
            &[&device_id, &imei],
        )
        .await?
        .is_some()
    {
        return Err(Problem::conflict(format!(
            "device {device_id} (or its IMEI) is already provisioned"
        )));
    }
    store_devices::add(
        &state.pool,
        &NewDevices {
            ids: vec![device_id.clone()],
            model,
            firmware,
            imei,
            heartbeat_interval_s: b.heartbeat_interval_s,
            actor: Some(p.username.clone()),
            ..Default::default()
        },
    )
    .await?;
    if let Some(elder_id) = b.elder_id {
        let tx = client.transaction().await?;
        store_devices::bind_in(&*tx, &device_id, elder_id, &p.username).await?;
        auth::audit(
            &*tx,
            &p,
            "bind_device",
            Some(elder_id),
            json!({"via": "api", "device_id": device_id}),
        )
        .await?;
        tx.commit().await?;
    }
    tracing::info!(by = %p.username, device_id, "device provisioned via API");
    let credentials = match admin {
        Some(admin) => Some(
            credentials::issue(&state.pool, &admin, &device_id)
                .await?
                .into(),
        ),
        None => None,
    };
    let device = query::get_device(&**client, p.user_id, &device_id)
        .await?
        .ok_or_else(|| Problem::not_found("device"))?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/api/v1/devices/{device_id}"))],
        Json(Provisioned {
            device,
            credentials,
        }),
    ))
}

async fn require_device_exists(state: &ApiState, id: &str) -> ApiResult<()> {
    let db = state.pool.get().await?;
    if db
        .query_opt("SELECT 1 FROM devices WHERE device_id = $1", &[&id])
        .await?
        .is_none()
    {
        return Err(Problem::not_found("device"));
    }
    Ok(())
}

/// Issue MQTT credentials to a bracelet that has none live (admin). 409 when it has.
#[utoipa::path(
    post,
    path = "/api/v1/devices/{id}/credentials",
    tag = "devices",
    params(("id" = String, Path)),
    responses(
        (status = 201, body = CredentialsBody),
        (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such device", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Credentials already live", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Broker administration not configured", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn issue_credentials(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<CredentialsBody>)> {
    p.require_admin()?;
    require_device_exists(&state, &id).await?;
    let admin = broker_admin(&state)?;
    let c = credentials::issue(&state.pool, &admin, &id).await?;
    tracing::info!(by = %p.username, device_id = %id, "device credentials issued via API");
    Ok((StatusCode::CREATED, Json(c.into())))
}

/// Replace a bracelet's password (admin): the old one stops working at once.
#[utoipa::path(
    post,
    path = "/api/v1/devices/{id}/credentials/rotate",
    tag = "devices",
    params(("id" = String, Path)),
    responses(
        (status = 200, body = CredentialsBody),
        (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such device", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "No live credentials to rotate", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Broker administration not configured", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn rotate_credentials(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<CredentialsBody>> {
    p.require_admin()?;
    require_device_exists(&state, &id).await?;
    let admin = broker_admin(&state)?;
    let c = credentials::rotate(&state.pool, &admin, &id).await?;
    tracing::info!(by = %p.username, device_id = %id, "device credentials rotated via API");
    Ok(Json(c.into()))
}

/// Revoke a bracelet's credentials (admin): the broker drops it and refuses it from now on.
#[utoipa::path(
    delete,
    path = "/api/v1/devices/{id}/credentials",
    tag = "devices",
    params(("id" = String, Path)),
    responses(
        (status = 200, body = CredentialStatusBody),
        (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such device", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "It never had credentials", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Broker administration not configured", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn revoke_credentials(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<CredentialStatusBody>> {
    p.require_admin()?;
    require_device_exists(&state, &id).await?;
    let admin = broker_admin(&state)?;
    let s = credentials::revoke(&state.pool, &admin, &id).await?;
    tracing::info!(by = %p.username, device_id = %id, "device credentials revoked via API");
    Ok(Json(s.into()))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BindBody {
    pub elder_id: i64,
}

/// Bind a bracelet to an elder (admins; supervisors for elders in their regions, with a
/// bracelet that is free or already theirs). Rebinding closes the previous binding; the
/// history is kept.
#[utoipa::path(
    post,
    path = "/api/v1/devices/{id}/bind",
    tag = "devices",
    params(("id" = String, Path)),
    request_body = BindBody,
    responses(
        (status = 200, body = DeviceSummary),
        (status = 403, description = "Role may not bind", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such device or elder in the caller's scope", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn bind(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    Path(id): Path<String>,
    ApiJson(b): ApiJson<BindBody>,
) -> ApiResult<Json<DeviceSummary>> {
    require(&p, MANAGERS)?;
    let mut client = state.pool.get().await?;
    let current: Option<Option<i64>> = client
        .query_opt("SELECT elder_id FROM devices WHERE device_id = $1", &[&id])
        .await?
        .map(|r| r.get(0));
    let usable = match current {
        None => false,
        Some(None) => true,
        Some(Some(_)) => query::get_device(&**client, p.user_id, &id)
            .await?
            .is_some(),
    };
    if !usable {
        return Err(Problem::not_found("device"));
    }
    if !query::can_see_elder(&**client, p.user_id, b.elder_id).await? {
        return Err(Problem::not_found("elder"));
    }
    let tx = client.transaction().await?;
    let rebind = store_devices::bind_in(&*tx, &id, b.elder_id, &p.username)
        .await?
        .ok_or_else(|| Problem::not_found("device"))?;
    auth::audit(
        &*tx,
        &p,
        "bind_device",
        Some(b.elder_id),
        json!({"via": "api", "device_id": id, "previous_elder": rebind.previous_elder}),
    )
    .await?;
    tx.commit().await?;
    query::get_device(&**client, p.user_id, &id)
        .await?
        .map(Json)
        .ok_or_else(|| Problem::not_found("device"))
}

/// Unbind a bracelet from its elder (admins; supervisors for their elders' bracelets).
#[utoipa::path(
    post,
    path = "/api/v1/devices/{id}/unbind",
    tag = "devices",
    params(("id" = String, Path)),
    responses(
        (status = 204, description = "Unbound (or already free)"),
        (status = 403, description = "Role may not unbind", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such device in the caller's scope", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn unbind(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    require(&p, MANAGERS)?;
    let mut client = state.pool.get().await?;
    if query::get_device(&**client, p.user_id, &id)
        .await?
        .is_none()
    {
        return Err(Problem::not_found("device"));
    }
    let tx = client.transaction().await?;
    let previous = store_devices::unbind_in(&*tx, &id, &p.username)
        .await?
        .ok_or_else(|| Problem::not_found("device"))?;
    if let Some(elder_id) = previous {
        auth::audit(
            &*tx,
            &p,
            "unbind_device",
            Some(elder_id),
            json!({"via": "api", "device_id": id}),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}
