//! Tokens, the caller (`/me`) and, for admins, users.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Extension, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{page_in_memory, ApiJson, Params};
use crate::api::auth::{self, AuthError, AuthVia, LoginError, NewUser, Principal, User, UserRole};
use crate::api::problem::{ApiResult, Problem};
use crate::api::query::Page;
use crate::api::ApiState;

/// Lifetime of a token when the request does not say.
pub const DEFAULT_TOKEN_DAYS: u32 = 30;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    pub username: String,
    pub password: String,
    /// A label to recognise the token by (default: "api").
    pub name: Option<String>,
    /// Lifetime in days, 1 to 365 (default 30).
    pub ttl_days: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TokenResponse {
    /// Send as `Authorization: Bearer <token>`. Shown once: only its hash is stored.
    pub token: String,
    /// Always `Bearer`.
    pub token_type: String,
    pub expires_at: Option<DateTime<Utc>>,
    pub user: Me,
}

/// What the caller may do, so a client can hide what would answer 403.
#[derive(Debug, Serialize, ToSchema)]
pub struct Permissions {
    pub acknowledge_alerts: bool,
    pub resolve_alerts: bool,
    /// Create and change elders and contacts (supervisors: within their regions).
    pub edit_registry: bool,
    /// Provision devices, manage their MQTT credentials, add regions, manage users.
    pub administer: bool,
    /// Work orders, visits and calls.
    pub care_work: bool,
    /// The per-region dashboard and weekly compliance.
    pub dashboard: bool,
}

impl Permissions {
    pub fn of(role: UserRole) -> Permissions {
        let staff = role != UserRole::Guardian;
        Permissions {
            acknowledge_alerts: true,
            resolve_alerts: staff,
            edit_registry: matches!(role, UserRole::Admin | UserRole::Supervisor),
            administer: role == UserRole::Admin,
            care_work: staff,
            dashboard: staff,
        }
    }
}

/// The caller.
#[derive(Debug, Serialize, ToSchema)]
pub struct Me {
    pub user_id: i64,
    pub username: String,
    pub display_name: String,
    pub role: UserRole,
    pub language: String,
    /// Regions held (supervisors: overseen with their subtrees; grid workers: their grids).
    pub regions: Vec<String>,
    /// The registry contact this user is (guardians: whose elders they see).
    pub contact: Option<String>,
    /// For a console session: the token to send in `X-CSRF-Token` on state-changing calls.
    pub csrf_token: Option<String>,
    pub permissions: Permissions,
}

async fn me_of(state: &ApiState, p: &Principal) -> ApiResult<Me> {
    let u = auth::get_user(&state.pool, &p.username).await?;
    Ok(Me {
        user_id: p.user_id,
        username: p.username.clone(),
        display_name: p.display_name.clone(),
        role: p.role,
        language: p.language.clone(),
        regions: u.regions,
        contact: u.contact,
        csrf_token: p.csrf_token().map(str::to_string),
        permissions: Permissions::of(p.role),
    })
}

/// Log in with a username and password and get an API token.
///
/// Failed logins are counted per username and client address: after 5 within 15 minutes
/// the pair is refused with 429 (and `Retry-After`) whatever the password.
#[utoipa::path(
    post,
    path = "/api/v1/auth/token",
    tag = "auth",
    security(()),
    request_body = TokenRequest,
    responses(
        (status = 201, description = "Logged in", body = TokenResponse),
        (status = 401, description = "Wrong username or password", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid field", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Too many failed logins", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn create_token(
    State(state): State<Arc<ApiState>>,
    connect: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<TokenRequest>,
) -> Result<Response, Problem> {
    let days = req.ttl_days.unwrap_or(DEFAULT_TOKEN_DAYS);
    if !(1..=365).contains(&days) {
        return Err(Problem::invalid_field("ttl_days", "1 to 365"));
    }
    let name = req
        .name
        .as_deref()
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .unwrap_or("api")
        .to_string();
    if name.chars().count() > 100 {
        return Err(Problem::invalid_field("name", "at most 100 characters"));
    }
    if req.username.trim().is_empty() {
        return Err(Problem::invalid_field("username", "is required"));
    }
    let client = auth::client_addr(
        connect.as_ref().map(|e| e.0 .0),
        &headers,
        &state.trusted_proxies,
    );
    let p = match auth::login(
        &state.pool,
        &state.login_limiter,
        &req.username,
        &req.password,
        &client,
    )
    .await
    {
        Ok(p) => p,
        Err(LoginError::RateLimited { retry_after_s }) => {
            let mut res = Problem::from(LoginError::RateLimited { retry_after_s }).into_response();
            if let Ok(v) = retry_after_s.to_string().parse() {
                res.headers_mut().insert(header::RETRY_AFTER, v);
            }
            return Ok(res);
        }
        Err(e) => return Err(e.into()),
    };
    let (token, expires_at) = auth::create_api_token(
        &state.pool,
        p.user_id,
        &name,
        Some(Duration::from_secs(u64::from(days) * 86_400)),
    )
    .await?;
    let user = me_of(&state, &p).await?;
    Ok((
        StatusCode::CREATED,
        Json(TokenResponse {
            token,
            token_type: "Bearer".into(),
            expires_at,
            user,
        }),
    )
        .into_response())
}

/// Revoke the token this request is made with (or end the console session).
#[utoipa::path(
    delete,
    path = "/api/v1/auth/token",
    tag = "auth",
    responses(
        (status = 204, description = "Revoked"),
        (status = 401, description = "Not authenticated", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn revoke_token(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    headers: HeaderMap,
) -> ApiResult<StatusCode> {
    match p.via {
        AuthVia::Token => {
            let token = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split_once(' '))
                .map(|(_, t)| t.trim().to_string())
                .unwrap_or_default();
            auth::revoke_api_token(&state.pool, &token).await?;
        }
        AuthVia::Session { .. } => {
            let cookie = headers
                .get_all(header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|kv| kv.trim().split_once('='))
                .find(|(k, _)| *k == auth::SESSION_COOKIE)
                .map(|(_, v)| v.to_string())
                .unwrap_or_default();
            auth::end_session(&state.pool, &cookie).await?;
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

/// The caller: who they are, their regions and what they may do.
#[utoipa::path(
    get,
    path = "/api/v1/me",
    tag = "auth",
    responses(
        (status = 200, body = Me),
        (status = 401, description = "Not authenticated", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn me(State(state): State<Arc<ApiState>>, p: Principal) -> ApiResult<Json<Me>> {
    Ok(Json(me_of(&state, &p).await?))
}

/// Users (admin). Filters: `role`, `q` (part of the username or display name).
#[utoipa::path(
    get,
    path = "/api/v1/users",
    tag = "auth",
    params(
        ("role" = Option<String>, Query, description = "admin, supervisor, grid_worker or guardian"),
        ("q" = Option<String>, Query, description = "Part of the username or display name"),
        ("limit" = Option<i64>, Query, description = "1-500, default 50"),
        ("cursor" = Option<String>, Query, description = "next_cursor of the previous page"),
    ),
    responses(
        (status = 200, body = Page<User>),
        (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list_users(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    mut q: Params,
) -> ApiResult<Json<Page<User>>> {
    p.require_admin()?;
    let role = q.one_of("role", &["admin", "supervisor", "grid_worker", "guardian"]);
    let text = q.string("q", 100).map(|s| s.to_lowercase());
    let limit = q.limit();
    let after = q.text_cursor();
    q.finish()?;
    let users: Vec<User> = auth::list_users(&state.pool)
        .await?
        .into_iter()
        .filter(|u| role.as_deref().is_none_or(|r| u.role.as_str() == r))
        .filter(|u| {
            text.as_deref().is_none_or(|t| {
                u.username.to_lowercase().contains(t) || u.display_name.to_lowercase().contains(t)
            })
        })
        .collect();
    Ok(Json(page_in_memory(users, after.as_deref(), limit, |u| {
        u.username.clone()
    })))
}

/// Create a user (admin). 409 when the username is taken.
#[utoipa::path(
    post,
    path = "/api/v1/users",
    tag = "auth",
    request_body = NewUser,
    responses(
        (status = 201, body = User),
        (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Username taken", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid field", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn create_user(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    ApiJson(u): ApiJson<NewUser>,
) -> ApiResult<(StatusCode, Json<User>)> {
    p.require_admin()?;
    match auth::get_user(&state.pool, &u.username).await {
        Ok(_) => return Err(Problem::conflict(format!("user {} exists", u.username))),
        Err(AuthError::NoSuchUser(_)) => {}
        Err(e) => return Err(e.into()),
    }
    let user = auth::upsert_user(&state.pool, &u).await?;
    tracing::info!(by = %p.username, user = %user.username, role = %user.role, "user created");
    Ok((StatusCode::CREATED, Json(user)))
}

/// One user (admin).
#[utoipa::path(
    get,
    path = "/api/v1/users/{username}",
    tag = "auth",
    params(("username" = String, Path)),
    responses(
        (status = 200, body = User),
        (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such user", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_user(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    Path(username): Path<String>,
) -> ApiResult<Json<User>> {
    p.require_admin()?;
    Ok(Json(auth::get_user(&state.pool, &username).await?))
}

/// Create or replace a user (admin): role, regions, contact and password. Replacing ends
/// the user's console sessions.
#[utoipa::path(
    put,
    path = "/api/v1/users/{username}",
    tag = "auth",
    params(("username" = String, Path)),
    request_body = NewUser,
    responses(
        (status = 200, body = User),
        (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid field", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn put_user(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    Path(username): Path<String>,
    ApiJson(u): ApiJson<NewUser>,
) -> ApiResult<Json<User>> {
    p.require_admin()?;
    if !u.username.eq_ignore_ascii_case(&username) {
        return Err(Problem::invalid_field(
            "username",
            "must be the username in the path",
        ));
    }
    let user = auth::upsert_user(&state.pool, &u).await?;
    tracing::info!(by = %p.username, user = %user.username, role = %user.role, "user replaced");
    Ok(Json(user))
}

/// Disable a user (admin): their sessions and tokens end at once.
#[utoipa::path(
    delete,
    path = "/api/v1/users/{username}",
    tag = "auth",
    params(("username" = String, Path)),
    responses(
        (status = 204, description = "Disabled"),
        (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such user", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Disabling yourself", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn disable_user(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    Path(username): Path<String>,
) -> ApiResult<StatusCode> {
    p.require_admin()?;
    if username.eq_ignore_ascii_case(&p.username) {
        return Err(Problem::conflict("you cannot disable yourself"));
    }
    auth::set_disabled(&state.pool, &username, true).await?;
    tracing::info!(by = %p.username, user = %username, "user disabled");
    Ok(StatusCode::NO_CONTENT)
}
