//! Contacts (grid workers, backups, guardians, supervisors) and their links to elders.
//! Admins and supervisors only; supervisors see and link the contacts of their elders.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use utoipa::ToSchema;

use super::{require, ApiJson, Params, MANAGERS};
use crate::api::auth::{self, Principal};
use crate::api::problem::{ApiResult, Problem};
use crate::api::query::{self, ContactFilter, ContactView, Page};
use crate::api::ApiState;
use crate::store::registry::{self, ContactKey, ElderKey, Language, NewContact, Role};

pub const ROLES: &[&str] = &[
    "grid_worker",
    "backup_grid_worker",
    "guardian",
    "community_supervisor",
    "township_supervisor",
];

/// Contacts (admins: all; supervisors: those of their elders), by id.
#[utoipa::path(
    get,
    path = "/api/v1/contacts",
    tag = "contacts",
    params(
        ("q" = Option<String>, Query, description = "Part of the name, or the exact phone or ref"),
        ("role" = Option<String>, Query, description = "Plays this role for some elder: grid_worker, backup_grid_worker, guardian, community_supervisor, township_supervisor"),
        ("elder_id" = Option<i64>, Query, description = "Only this elder's contacts"),
        ("limit" = Option<i64>, Query, description = "1-500, default 50"),
        ("cursor" = Option<String>, Query, description = "next_cursor of the previous page"),
    ),
    responses(
        (status = 200, body = Page<ContactView>),
        (status = 403, description = "Grid workers and guardians see contacts on the elder's record", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    mut q: Params,
) -> ApiResult<Json<Page<ContactView>>> {
    require(&p, MANAGERS)?;
    let f = ContactFilter {
        q: q.string("q", 100),
        role: q.one_of("role", ROLES),
        elder_id: q.i64("elder_id"),
        limit: q.limit(),
        after_id: q.id_cursor(),
    };
    q.finish()?;
    let db = state.pool.get().await?;
    Ok(Json(query::list_contacts(&**db, p.user_id, &f).await?))
}

/// One contact.
#[utoipa::path(
    get,
    path = "/api/v1/contacts/{id}",
    tag = "contacts",
    params(("id" = i64, Path)),
    responses(
        (status = 200, body = ContactView),
        (status = 403, description = "Role may not list contacts", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such contact in the caller's scope", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    Path(id): Path<i64>,
) -> ApiResult<Json<ContactView>> {
    require(&p, MANAGERS)?;
    let db = state.pool.get().await?;
    query::get_contact(&**db, p.user_id, id)
        .await?
        .map(Json)
        .ok_or_else(|| Problem::not_found("contact"))
}

/// A link of a contact to an elder.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LinkBody {
    pub elder_id: i64,
    /// grid_worker, backup_grid_worker, guardian, community_supervisor, township_supervisor.
    pub role: String,
    /// 1 first (guardians are told in priority order); default 1.
    pub priority: Option<i32>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewContactBody {
    /// The office ledger's id; an existing contact with it is updated.
    pub external_ref: Option<String>,
    pub name: String,
    /// Mobile number; an existing contact with it is updated (one row per person).
    pub phone: Option<String>,
    pub email: Option<String>,
    /// zh-CN or en.
    pub language: Option<String>,
    /// WeCom / DingTalk group-robot URL.
    pub im_webhook: Option<String>,
    /// Link to an elder at once (required for supervisors, to one of their elders).
    pub link: Option<LinkBody>,
}

fn parse_role(field: &str, s: &str) -> ApiResult<Role> {
    s.parse::<Role>()
        .map_err(|m| Problem::invalid_field(field, m))
}

/// Add a contact, or update the one with the same `external_ref` or phone (200 then), and
/// optionally link it to an elder. Admins; supervisors must link it to one of their elders
/// and cannot change a contact outside their regions (409).
#[utoipa::path(
    post,
    path = "/api/v1/contacts",
    tag = "contacts",
    request_body = NewContactBody,
    responses(
        (status = 201, body = ContactView),
        (status = 200, description = "An existing contact (same ref or phone) was updated", body = ContactView),
        (status = 403, description = "Role may not add contacts", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such elder in the caller's scope", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The ref or phone belongs to a contact outside the caller's regions", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid field", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn create(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    ApiJson(b): ApiJson<NewContactBody>,
) -> ApiResult<(StatusCode, Json<ContactView>)> {
    require(&p, MANAGERS)?;
    let language = match b.language.as_deref() {
        Some(l) => Some(
            l.parse::<Language>()
                .map_err(|m| Problem::invalid_field("language", m))?,
        ),
        None => None,
    };
    let new = NewContact {
        external_ref: b.external_ref.clone(),
        name: b.name.clone(),
        phone: b.phone.clone(),
        email: b.email.clone(),
        language,
        im_webhook: b.im_webhook.clone(),
    };
    // Validate now so that every field problem is reported before any scope question.
    let v = new.validated().map_err(|problems| {
        Problem::invalid(
            problems
                .into_iter()
                .map(|f| crate::api::problem::FieldError {
                    field: if f.field == "ref" {
                        "external_ref".into()
                    } else {
                        f.field
                    },
                    message: f.message,
                })
                .collect(),
        )
    })?;
    let role = match &b.link {
        Some(l) => Some(parse_role("link.role", &l.role)?),
        None if !p.is_admin() => {
            return Err(Problem::invalid_field(
                "link",
                "is required: link the contact to one of your elders",
            ))
        }
        None => None,
    };
    let db = state.pool.get().await?;
    if let Some(l) = &b.link {
        if !query::can_see_elder(&**db, p.user_id, l.elder_id).await? {
            return Err(Problem::not_found("elder"));
        }
    }
    if !p.is_admin() {
        let existing: Vec<i64> = db
            .query(
                "SELECT id FROM contacts WHERE ($1::text IS NOT NULL AND external_ref = $1)
                                            OR ($2::text IS NOT NULL AND phone = $2)",
                &[&v.external_ref, &v.phone],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for id in existing {
            if query::get_contact(&**db, p.user_id, id).await?.is_none() {
                return Err(Problem::conflict(
                    "this ref or phone belongs to a contact outside your regions; ask an admin",
                ));
            }
        }
    }
    let up = registry::upsert_contact(&state.pool, &v).await?;
    if let (Some(l), Some(role)) = (&b.link, role) {
        registry::link_contact(
            &state.pool,
            &ElderKey::Id(l.elder_id),
            &ContactKey::Id(up.id),
            role,
            l.priority,
        )
        .await?;
        auth::audit(
            &**db,
            &p,
            "link_contact",
            Some(l.elder_id),
            json!({"via": "api", "contact_id": up.id, "role": role.as_str()}),
        )
        .await?;
    }
    let view = query::get_contact(&**db, p.user_id, up.id)
        .await?
        .ok_or_else(|| Problem::not_found("contact"))?;
    let status = if up.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(view)))
}

/// Remove a contact and all their links (admin).
#[utoipa::path(
    delete,
    path = "/api/v1/contacts/{id}",
    tag = "contacts",
    params(("id" = i64, Path)),
    responses(
        (status = 204, description = "Removed"),
        (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such contact", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn remove(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    Path(id): Path<i64>,
) -> ApiResult<StatusCode> {
    p.require_admin()?;
    let removed = registry::remove_contact(&state.pool, &ContactKey::Id(id)).await?;
    if !removed.elders_without_grid_worker.is_empty() {
        tracing::warn!(
            contact_id = id,
            elders = ?removed.elders_without_grid_worker,
            "contact removed via API: these elders have no grid worker now"
        );
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ElderLinkBody {
    pub contact_id: i64,
    /// grid_worker, backup_grid_worker, guardian, community_supervisor, township_supervisor.
    pub role: String,
    pub priority: Option<i32>,
}

/// Link a contact to an elder in a role (admins; supervisors for their elders and contacts).
#[utoipa::path(
    post,
    path = "/api/v1/elders/{id}/contacts",
    tag = "contacts",
    params(("id" = i64, Path)),
    request_body = ElderLinkBody,
    responses(
        (status = 200, body = ContactView),
        (status = 403, description = "Role may not link contacts", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such elder or contact in the caller's scope", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid field", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn link(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    Path(elder_id): Path<i64>,
    ApiJson(b): ApiJson<ElderLinkBody>,
) -> ApiResult<Json<ContactView>> {
    require(&p, MANAGERS)?;
    let role = parse_role("role", &b.role)?;
    let db = state.pool.get().await?;
    if !query::can_see_elder(&**db, p.user_id, elder_id).await? {
        return Err(Problem::not_found("elder"));
    }
    if query::get_contact(&**db, p.user_id, b.contact_id)
        .await?
        .is_none()
    {
        return Err(Problem::not_found("contact"));
    }
    registry::link_contact(
        &state.pool,
        &ElderKey::Id(elder_id),
        &ContactKey::Id(b.contact_id),
        role,
        b.priority,
    )
    .await?;
    auth::audit(
        &**db,
        &p,
        "link_contact",
        Some(elder_id),
        json!({"via": "api", "contact_id": b.contact_id, "role": role.as_str()}),
    )
    .await?;
    query::get_contact(&**db, p.user_id, b.contact_id)
        .await?
        .map(Json)
        .ok_or_else(|| Problem::not_found("contact"))
}

/// Unlink a contact from an elder (every role, or only `role`).
#[utoipa::path(
    delete,
    path = "/api/v1/elders/{id}/contacts/{contact_id}",
    tag = "contacts",
    params(
        ("id" = i64, Path),
        ("contact_id" = i64, Path),
        ("role" = Option<String>, Query, description = "Only this role"),
    ),
    responses(
        (status = 204, description = "Unlinked"),
        (status = 403, description = "Role may not unlink contacts", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such elder or link in the caller's scope", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn unlink(
    State(state): State<Arc<ApiState>>,
    p: Principal,
    Path((elder_id, contact_id)): Path<(i64, i64)>,
    mut q: Params,
) -> ApiResult<StatusCode> {
    require(&p, MANAGERS)?;
    let role = q.one_of("role", ROLES);
    q.finish()?;
    let role = role.map(|r| parse_role("role", &r)).transpose()?;
    let db = state.pool.get().await?;
    if !query::can_see_elder(&**db, p.user_id, elder_id).await? {
        return Err(Problem::not_found("elder"));
    }
    let n = registry::unlink_contact(
        &state.pool,
        &ElderKey::Id(elder_id),
        &ContactKey::Id(contact_id),
        role,
    )
    .await?;
    if n == 0 {
        return Err(Problem::not_found("link"));
    }
    auth::audit(
        &**db,
        &p,
        "unlink_contact",
        Some(elder_id),
        json!({"via": "api", "contact_id": contact_id, "role": role.map(Role::as_str)}),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}
