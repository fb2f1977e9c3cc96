//! `/alerts/{id}`: what happened, to whom, where; the timeline; acknowledge and resolve.

use std::sync::Arc;

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Form;
use serde::Deserialize;

use super::data::{self, AlertDetail, ContactLine, TimelineEntry, Vitals};
use super::{render, see_other, Chrome, Failure, PageResult, Viewer};
use crate::alerts::engine::{self, Transition};
use crate::api::auth;
use crate::api::ApiState;

#[derive(Template)]
#[template(path = "console/alert.html")]
struct AlertPage {
    c: Chrome,
    a: AlertDetail,
    timeline: Vec<TimelineEntry>,
    latest: Option<Vitals>,
    recent: Vec<Vitals>,
    contacts: Vec<ContactLine>,
    note: String,
    note_error: bool,
}

#[derive(Deserialize, Default)]
pub struct DoneQuery {
    done: Option<String>,
}

async fn load(
    state: &ApiState,
    viewer: &Viewer,
    id: i64,
) -> Result<
    (
        AlertDetail,
        Vec<TimelineEntry>,
        Option<Vitals>,
        Vec<Vitals>,
        Vec<ContactLine>,
    ),
    Failure,
> {
    let client = state.pool.get().await?;
    let Some(a) = data::alert_detail(&**client, viewer.user_id(), id, viewer.lang).await? else {
        return Err(viewer.not_found());
    };
    let timeline = data::timeline(&**client, viewer.user_id(), id, viewer.lang).await?;
    let (latest, recent) = match &a.device_id {
        Some(d) => data::recent_vitals(&**client, d).await?,
        None => (None, Vec::new()),
    };
    let contacts = match &a.elder {
        Some(e) => data::elder_contacts(&**client, e.id, viewer.lang).await?,
        None => Vec::new(),
    };
    if let Some(e) = &a.elder {
        auth::audit(
            &**client,
            &viewer.p,
            "view_alert",
            Some(e.id),
            serde_json::json!({ "alert_id": id, "via": "console" }),
        )
        .await?;
    }
    Ok((a, timeline, latest, recent, contacts))
}

pub async fn page(
    State(state): State<Arc<ApiState>>,
    viewer: Viewer,
    Path(id): Path<i64>,
    Query(q): Query<DoneQuery>,
) -> PageResult {
    let (a, timeline, latest, recent, contacts) = load(&state, &viewer, id).await?;
    let flash = match q.done.as_deref() {
        Some("ack") => Some(viewer.t("alert.done_ack").to_string()),
        Some("resolve") => Some(viewer.t("alert.done_resolve").to_string()),
        Some("already") => Some(viewer.t("alert.already").to_string()),
        _ => None,
    };
    let title = format!("{} · {}", a.row.kind_label, a.row.elder_name);
    render(&AlertPage {
        c: viewer.chrome("board", title).with_flash(flash),
        a,
        timeline,
        latest,
        recent,
        contacts,
        note: String::new(),
        note_error: false,
    })
}

#[derive(Deserialize)]
pub struct AckForm {
    csrf: Option<String>,
}

/// Scope first (404 outside it), then the transition in one transaction.
async fn visible(state: &ApiState, viewer: &Viewer, id: i64) -> Result<(), Failure> {
    let client = state.pool.get().await?;
    match data::board_row_by_id(&**client, viewer.user_id(), id, viewer.lang).await? {
        Some(_) => Ok(()),
        None => Err(viewer.not_found()),
    }
}

pub async fn acknowledge(
    State(state): State<Arc<ApiState>>,
    viewer: Viewer,
    Path(id): Path<i64>,
    Form(f): Form<AckForm>,
) -> PageResult {
    viewer.check_csrf(f.csrf.as_deref())?;
    visible(&state, &viewer, id).await?;
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let t = engine::acknowledge(&tx, id, &viewer.p.username, "console", &state.alerts).await?;
    tx.commit().await?;
    tracing::info!(alert_id = id, user = %viewer.p.username, outcome = ?t, "acknowledged in the console");
    Ok(see_other(&format!(
        "/alerts/{id}?done={}",
        match t {
            Transition::Done => "ack",
            Transition::NotFound => return Err(viewer.not_found()),
            _ => "already",
        }
    )))
}

#[derive(Deserialize)]
pub struct ResolveForm {
    csrf: Option<String>,
    note: Option<String>,
}

pub async fn resolve(
    State(state): State<Arc<ApiState>>,
    viewer: Viewer,
    Path(id): Path<i64>,
    Form(f): Form<ResolveForm>,
) -> PageResult {
    viewer.check_csrf(f.csrf.as_deref())?;
    visible(&state, &viewer, id).await?;
    let note = f.note.unwrap_or_default().trim().to_string();
    if note.is_empty() || note.chars().count() > 2000 {
        let (a, timeline, latest, recent, contacts) = load(&state, &viewer, id).await?;
        let mut c = viewer.chrome("board", viewer.t("alert.title"));
        c.error = Some(viewer.t("alert.note_required").into());
        let mut res = render(&AlertPage {
            c,
            a,
            timeline,
            latest,
            recent,
            contacts,
            note,
            note_error: true,
        })?;
        *res.status_mut() = StatusCode::UNPROCESSABLE_ENTITY;
        return Ok(res);
    }
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let t = engine::resolve(&tx, id, &viewer.p.username, &note).await?;
    tx.commit().await?;
    tracing::info!(alert_id = id, user = %viewer.p.username, outcome = ?t, "resolved in the console");
    Ok(see_other(&format!(
        "/alerts/{id}?done={}",
        match t {
            Transition::Done => "resolve",
            Transition::NotFound => return Err(viewer.not_found()),
            _ => "already",
        }
    )))
}
