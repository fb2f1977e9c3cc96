//! `/api/v1`: the REST API for API clients and the console's scripts.
//!
//! - Authentication: `Authorization: Bearer <token>` (from `POST /api/v1/auth/token`), or the
//!   console's session cookie plus `X-CSRF-Token` on state-changing calls.
//! - Scope: every read goes through [`crate::api::query`], which restricts rows to the
//!   caller's elders and regions; a record outside it answers 404 exactly like a missing
//!   one. A role that may not do something at all answers 403.
//! - Errors: `application/problem+json` (RFC 7807) always, validation errors naming the
//!   field; bodies are JSON of at most 64 KiB.
//! - Lists: `limit` (1-500, default 50) and an opaque `cursor`; responses are
//!   `{items, next_cursor}`.
//!
//! `docs/api.md` is the guide; `GET /api/v1/openapi.json` the reference.

pub mod alerts;
pub mod care;
pub mod contacts;
pub mod devices;
pub mod elders;
pub mod extract;
pub mod regions;
pub mod session;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::auth::{Principal, UserRole};
use super::problem::Problem;
use super::query::Page;
use super::ApiState;
use crate::store::credentials::BrokerAdmin;

pub use extract::{ApiJson, Params, MAX_BODY_BYTES};

/// Roles that do the care work: everyone but guardians.
pub const STAFF: &[UserRole] = &[UserRole::Admin, UserRole::Supervisor, UserRole::GridWorker];
/// Roles that keep the registry: admins, and supervisors within their regions.
pub const MANAGERS: &[UserRole] = &[UserRole::Admin, UserRole::Supervisor];

/// The dynamic-security admin client used to issue, rotate and revoke device credentials;
/// without `broker_admin` settings the credential endpoints answer 503.
pub(crate) fn broker_admin(state: &ApiState) -> Result<Arc<BrokerAdmin>, Problem> {
    state.broker_admin.clone().ok_or_else(unconfigured)
}

fn unconfigured() -> Problem {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "Broker administration not configured",
    )
    .typed("broker-admin-unconfigured")
    .detail(
        "device credentials need broker_admin settings \
         (SILVERGUARD_BROKER_ADMIN__USERNAME / __PASSWORD)",
    )
}

/// The routes, relative to `/api/v1`.
pub fn router() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/openapi.json", get(openapi_json))
        .route(
            "/auth/token",
            post(session::create_token).delete(session::revoke_token),
        )
        .route("/me", get(session::me))
        .route(
            "/users",
            get(session::list_users).post(session::create_user),
        )
        .route(
            "/users/{username}",
            get(session::get_user)
                .put(session::put_user)
                .delete(session::disable_user),
        )
        .route("/regions", get(regions::list).post(regions::create))
        .route("/regions/{code}", get(regions::get))
        .route("/dashboard", get(regions::dashboard))
        .route("/elders", get(elders::list).post(elders::create))
        .route(
            "/elders/{id}",
            get(elders::get)
                .patch(elders::update)
                .delete(elders::remove),
        )
        .route("/elders/{id}/telemetry", get(elders::telemetry))
        .route("/elders/{id}/events", get(elders::events))
        .route("/elders/{id}/bindings", get(elders::bindings))
        .route("/elders/{id}/contacts", post(contacts::link))
        .route(
            "/elders/{id}/contacts/{contact_id}",
            delete(contacts::unlink),
        )
        .route(
            "/elders/{id}/care-contacts",
            get(care::list_care_contacts).post(care::record_care_contact),
        )
        .route("/contacts", get(contacts::list).post(contacts::create))
        .route(
            "/contacts/{id}",
            get(contacts::get).delete(contacts::remove),
        )
        .route("/devices", get(devices::list).post(devices::provision))
        .route("/devices/{id}", get(devices::get))
        .route("/devices/{id}/bindings", get(devices::bindings))
        .route("/devices/{id}/bind", post(devices::bind))
        .route("/devices/{id}/unbind", post(devices::unbind))
        .route(
            "/devices/{id}/credentials",
            post(devices::issue_credentials).delete(devices::revoke_credentials),
        )
        .route(
            "/devices/{id}/credentials/rotate",
            post(devices::rotate_credentials),
        )
        .route("/alerts", get(alerts::list))
        .route("/alerts/{id}", get(alerts::get))
        .route("/alerts/{id}/timeline", get(alerts::timeline))
        .route("/alerts/{id}/ack", post(alerts::acknowledge))
        .route("/alerts/{id}/resolve", post(alerts::resolve))
        .route(
            "/work-orders",
            get(care::list_work_orders).post(care::create_work_order),
        )
        .route("/work-orders/{id}", get(care::get_work_order))
        .route("/work-orders/{id}/dispatch", post(care::dispatch))
        .route("/work-orders/{id}/accept", post(care::accept))
        .route("/work-orders/{id}/complete", post(care::complete))
        .route("/work-orders/{id}/cancel", post(care::cancel))
        .route("/compliance", get(care::compliance))
        .route("/compliance/regions", get(care::compliance_regions))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Bodies over the limit are refused while being read (ApiJson answers 413).
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        // Whatever answers an error without a problem document (axum's own path
        // rejections, a layer), answers with one.
        .layer(axum::middleware::map_response(problem_safety_net))
}

/// Turns an error response that is not `application/problem+json` into a problem with the
/// same status, keeping its other headers (`Allow`, `Retry-After`) and its text as detail.
async fn problem_safety_net(res: axum::response::Response) -> axum::response::Response {
    use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
    let status = res.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return res;
    }
    let is_problem = res
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/problem+json"));
    if is_problem {
        return res;
    }
    let (parts, body) = res.into_parts();
    let bytes = axum::body::to_bytes(body, 16 * 1024)
        .await
        .unwrap_or_default();
    let text: String = String::from_utf8_lossy(&bytes)
        .trim()
        .chars()
        .take(500)
        .collect();
    let kind = match status {
        StatusCode::BAD_REQUEST => "bad-request".to_string(),
        StatusCode::NOT_FOUND => "not-found".into(),
        StatusCode::METHOD_NOT_ALLOWED => "method-not-allowed".into(),
        StatusCode::PAYLOAD_TOO_LARGE => "payload-too-large".into(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported-media-type".into(),
        s if s.is_server_error() => "internal".into(),
        s => format!("http-{}", s.as_u16()),
    };
    let mut p = Problem::new(status, status.canonical_reason().unwrap_or("Error")).typed(&kind);
    if !text.is_empty() && !status.is_server_error() {
        p = p.detail(text);
    }
    let mut out = p.into_response();
    for (k, v) in parts.headers.iter() {
        if k != CONTENT_TYPE && k != CONTENT_LENGTH {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    out
}

async fn not_found() -> Problem {
    Problem::new(StatusCode::NOT_FOUND, "Not found")
        .typed("not-found")
        .detail("no such endpoint: see /api/v1/openapi.json")
}

async fn method_not_allowed() -> Problem {
    Problem::new(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed")
        .typed("method-not-allowed")
        .detail("this endpoint does not take that method: see /api/v1/openapi.json")
}

/// The OpenAPI 3 document of this API.
#[utoipa::path(
    get,
    path = "/api/v1/openapi.json",
    tag = "meta",
    security(()),
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json"))
)]
async fn openapi_json() -> impl IntoResponse {
    Json(ApiDoc::openapi())
}

/// A `{items, next_cursor}` page made from a list already in memory (short lists: users,
/// regions, compliance rows), positioned by a text key.
pub fn page_in_memory<T: utoipa::ToSchema>(
    items: Vec<T>,
    after: Option<&str>,
    limit: i64,
    key: impl Fn(&T) -> String,
) -> Page<T> {
    let mut rest: Vec<T> = match after {
        Some(a) => {
            let mut seen = false;
            items
                .into_iter()
                .filter(|t| {
                    if seen {
                        return true;
                    }
                    if key(t) == a {
                        seen = true;
                    }
                    false
                })
                .collect()
        }
        None => items,
    };
    let more = rest.len() as i64 > limit;
    rest.truncate(limit as usize);
    let next_cursor = if more {
        rest.last()
            .map(|t| super::query::Cursor::Text(key(t)).encode())
    } else {
        None
    };
    Page {
        items: rest,
        next_cursor,
    }
}

/// 403 unless the caller has one of `roles`.
pub fn require(p: &Principal, roles: &[UserRole]) -> Result<(), Problem> {
    p.require_role(roles)
}

struct SecurityAddon;

impl Modify for SecurityAddon {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("sgt_…")
                    .description(Some(
                        "An API token from POST /api/v1/auth/token (or `silverguard user token`).",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "session",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
                super::auth::SESSION_COOKIE,
                "The console's session cookie; state-changing calls must also send the \
                 session's CSRF token in X-CSRF-Token (see GET /api/v1/me).",
            ))),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Silverguard API",
        version = "1",
        description = "Elders, their bracelets, alerts, care work and the region dashboard. \
                       Every list is scoped to the caller's elders and regions; errors are \
                       RFC 7807 problem documents. See docs/api.md."
    ),
    modifiers(&SecurityAddon),
    security(("bearer" = []), ("session" = [])),
    paths(
        openapi_json,
        session::create_token,
        session::revoke_token,
        session::me,
        session::list_users,
        session::create_user,
        session::get_user,
        session::put_user,
        session::disable_user,
        regions::list,
        regions::get,
        regions::create,
        regions::dashboard,
        elders::list,
        elders::create,
        elders::get,
        elders::update,
        elders::remove,
        elders::telemetry,
        elders::events,
        elders::bindings,
        contacts::list,
        contacts::get,
        contacts::create,
        contacts::remove,
        contacts::link,
        contacts::unlink,
        devices::list,
        devices::get,
        devices::provision,
        devices::bindings,
        devices::bind,
        devices::unbind,
        devices::issue_credentials,
        devices::rotate_credentials,
        devices::revoke_credentials,
        alerts::list,
        alerts::get,
        alerts::timeline,
        alerts::acknowledge,
        alerts::resolve,
        care::list_work_orders,
        care::create_work_order,
        care::get_work_order,
        care::dispatch,
        care::accept,
        care::complete,
        care::cancel,
        care::list_care_contacts,
        care::record_care_contact,
        care::compliance,
        care::compliance_regions,
    ),
    components(schemas(Problem, super::problem::FieldError)),
    tags(
        (name = "auth", description = "Tokens, the caller, users (admin)"),
        (name = "regions", description = "The three-tier network and the dashboard"),
        (name = "elders", description = "Elders, their telemetry and events"),
        (name = "contacts", description = "Grid workers, guardians, supervisors"),
        (name = "devices", description = "Bracelets, bindings, MQTT credentials"),
        (name = "alerts", description = "Alerts: list, acknowledge, resolve, timeline"),
        (name = "care", description = "Work orders, visits and calls, weekly compliance"),
        (name = "meta", description = "This document"),
    )
)]
pub struct ApiDoc;

// ---------------------------------------------------------------------------------------
// Errors of other modules, as problems
// ---------------------------------------------------------------------------------------

impl From<crate::store::StoreError> for Problem {
    fn from(e: crate::store::StoreError) -> Problem {
        use crate::store::StoreError;
        match e {
            StoreError::Db(e) => e.into(),
            StoreError::Pool(e) => e.into(),
            StoreError::Invalid(m) => Problem::bad_request(m),
            other => Problem::internal(&other),
        }
    }
}

impl From<crate::store::registry::RegistryError> for Problem {
    fn from(e: crate::store::registry::RegistryError) -> Problem {
        use crate::store::registry::RegistryError;
        match e {
            RegistryError::Store(e) => e.into(),
            RegistryError::Invalid { field, message } => {
                // Several fields may be reported together ("phone, email" / "a; b").
                let fields: Vec<&str> = field.split(", ").collect();
                let messages: Vec<&str> = message.split("; ").collect();
                if fields.len() > 1 && fields.len() == messages.len() {
                    Problem::invalid(
                        fields
                            .iter()
                            .zip(messages)
                            .map(|(f, m)| super::problem::FieldError {
                                field: f.to_string(),
                                message: m.to_string(),
                            })
                            .collect(),
                    )
                } else {
                    Problem::invalid_field(&field, message)
                }
            }
            RegistryError::NotFound(what) => Problem::not_found(&what),
            RegistryError::NotProvisioned(d) => {
                Problem::invalid_field("device_id", format!("device {d} is not provisioned"))
            }
            RegistryError::Conflict(m) => Problem::conflict(m),
            RegistryError::ImportDb { source, .. } => source.into(),
            other => Problem::bad_request(other.to_string()),
        }
    }
}

impl From<crate::care::CareError> for Problem {
    fn from(e: crate::care::CareError) -> Problem {
        use crate::care::CareError;
        match e {
            CareError::Db(e) => e.into(),
            CareError::NotFound(what) => Problem::not_found(what),
            e @ CareError::Transition { .. } => Problem::conflict(e.to_string()),
            CareError::Invalid { field, message } => Problem::invalid_field(field, message),
        }
    }
}

impl From<crate::store::credentials::CredentialError> for Problem {
    fn from(e: crate::store::credentials::CredentialError) -> Problem {
        use crate::store::credentials::CredentialError;
        match e {
            CredentialError::Store(e) => e.into(),
            CredentialError::NotProvisioned(_) => Problem::not_found("device"),
            e @ (CredentialError::AlreadyIssued(..) | CredentialError::NoCredential(_)) => {
                Problem::conflict(e.to_string())
            }
            e @ CredentialError::NotConfigured(_) => {
                tracing::warn!(error = %e, "device credentials");
                unconfigured()
            }
            e @ (CredentialError::Broker(_) | CredentialError::Refused { .. }) => {
                tracing::error!(error = %e, "broker administration failed");
                Problem::new(StatusCode::BAD_GATEWAY, "Broker error")
                    .typed("broker")
                    .detail(e.to_string())
            }
            CredentialError::Invalid(m) => Problem::invalid_field("device_id", m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    if k == "$ref" {
                        if let Some(s) = x.as_str() {
                            out.push(s.to_string());
                        }
                    }
                    refs(x, out);
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
            _ => {}
        }
    }

    #[test]
    fn openapi_document_is_complete() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        assert!(paths.len() >= 30, "{} paths", paths.len());
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        let mut all = Vec::new();
        refs(&doc, &mut all);
        assert!(!all.is_empty());
        for r in all {
            let name = r.trim_start_matches("#/components/schemas/");
            assert!(schemas.contains_key(name), "dangling {r}");
        }
        assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    }
}
