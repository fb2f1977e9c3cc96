//! The live alert board: `/` renders the active alerts in scope, `/console/events` pushes
//! every change over SSE, `/console/board/rows` re-renders the list (the browser calls it
//! when its stream (re)connects, so nothing missed while offline stays missing).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use askama::Template;
use axum::extract::State;
use axum::http::request::Parts;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use futures::Stream;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::broadcast::error::RecvError;

use super::data::{self, BoardRow};
use super::live::LiveMsg;
use super::{render, Chrome, Failure, PageResult, Viewer};
use crate::api::auth::SESSION_COOKIE;
use crate::api::ApiState;
use crate::notify::templates::Lang;

#[derive(Template)]
#[template(path = "console/board.html")]
struct BoardPage {
    c: Chrome,
    rows: Vec<BoardRow>,
}

#[derive(Template)]
#[template(path = "console/board_rows.html")]
struct RowsFragment {
    rows: Vec<BoardRow>,
}

#[derive(Template)]
#[template(path = "console/alert_row.html")]
struct RowFragment {
    row: BoardRow,
}

pub async fn page(State(state): State<Arc<ApiState>>, viewer: Viewer) -> PageResult {
    let client = state.pool.get().await?;
    let rows = data::board_rows(&**client, viewer.user_id(), viewer.lang).await?;
    let c = viewer.chrome("board", viewer.t("board.title"));
    render(&BoardPage { c, rows })
}

pub async fn rows(State(state): State<Arc<ApiState>>, viewer: Viewer) -> PageResult {
    let client = state.pool.get().await?;
    let rows = data::board_rows(&**client, viewer.user_id(), viewer.lang).await?;
    Ok(Html(RowsFragment { rows }.render()?).into_response())
}

/// What the browser receives for one changed alert.
#[derive(Serialize)]
struct Pushed {
    id: i64,
    status: String,
    severity: String,
    kind: String,
    repeat: i32,
    /// The row as the board shows it (escaped HTML rendered here); empty when resolved.
    html: String,
}

struct StreamState {
    state: Arc<ApiState>,
    rx: tokio::sync::broadcast::Receiver<LiveMsg>,
    user_id: i64,
    lang: Lang,
    session_hash: Option<Vec<u8>>,
    check: tokio::time::Interval,
    stop: tokio_util::sync::CancellationToken,
    ended: bool,
}

/// `GET /console/events`: SSE. Events: `alert` (JSON [`Pushed`]), `resync` (reload the
/// rows), `bye` (the session ended: go to the login page).
pub async fn events(
    State(state): State<Arc<ApiState>>,
    parts: Parts,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, Response> {
    // Not `Viewer`: an EventSource cannot follow a redirect to the login form, so a
    // missing session is a plain 401 (the page's script then goes to /login).
    let principal = match crate::api::auth::authenticate(&state.pool, &parts).await {
        Ok(Some(p)) => p,
        Ok(None) => return Err(axum::http::StatusCode::UNAUTHORIZED.into_response()),
        Err(p) => return Err(p.into_response()),
    };
    let lang = super::pick_lang(&parts, Some(&principal.language));
    let session_hash =
        super::cookie(&parts, SESSION_COOKIE).map(|t| Sha256::digest(t.as_bytes()).to_vec());
    let mut check = tokio::time::interval(Duration::from_secs(30));
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    check.reset(); // the first tick after 30 s, not now
    let st = StreamState {
        rx: state.live.subscribe(),
        stop: state.live.stopping(),
        state,
        user_id: principal.user_id,
        lang,
        session_hash,
        check,
        ended: false,
    };
    let stream = futures::stream::unfold(st, |mut st| async move {
        if st.ended {
            return None;
        }
        loop {
            tokio::select! {
                _ = st.stop.cancelled() => return None,
                _ = st.check.tick() => {
                    if !session_alive(&st).await {
                        st.ended = true;
                        return Some((Ok(Event::default().event("bye").data("session ended")), st));
                    }
                }
                msg = st.rx.recv() => match msg {
                    Ok(LiveMsg::Changed(change)) => {
                        match render_change(&st, change.id).await {
                            Ok(Some(ev)) => return Some((Ok(ev), st)),
                            Ok(None) => {}
                            Err(e) => {
                                tracing::warn!(error = ?e, alert_id = change.id, "console: live update failed; asking for a resync");
                                return Some((Ok(Event::default().event("resync").data("error")), st));
                            }
                        }
                    }
                    Ok(LiveMsg::Resync) | Err(RecvError::Lagged(_)) => {
                        return Some((Ok(Event::default().event("resync").data("missed")), st));
                    }
                    Err(RecvError::Closed) => return None,
                },
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(
        KeepAlive::new()
            .interval(Duration::from_secs(15))
            .text("ping"),
    ))
}

/// The session is still there (not logged out, not expired, user not disabled).
async fn session_alive(st: &StreamState) -> bool {
    let Some(hash) = &st.session_hash else {
        return true; // a bearer token: checked when the stream opened
    };
    let Ok(client) = st.state.pool.get().await else {
        return true; // the database is away; do not log people out for it
    };
    client
        .query_opt(
            "SELECT 1 FROM user_sessions s JOIN users u ON u.id = s.user_id
              WHERE s.token_hash = $1 AND s.expires_at > now() AND NOT u.disabled",
            &[hash],
        )
        .await
        .map(|r| r.is_some())
        .unwrap_or(true)
}

/// The changed alert as this user sees it, or None when it is not theirs to see.
async fn render_change(st: &StreamState, alert_id: i64) -> Result<Option<Event>, Failure> {
    let client = st.state.pool.get().await?;
    let Some(row) = data::board_row_by_id(&**client, st.user_id, alert_id, st.lang).await? else {
        return Ok(None);
    };
    let html = if row.status == "resolved" {
        String::new()
    } else {
        RowFragment { row: row.clone() }.render()?
    };
    let pushed = Pushed {
        id: row.id,
        status: row.status,
        severity: row.severity,
        kind: row.kind,
        repeat: row.repeat_count,
        html,
    };
    let json = serde_json::to_string(&pushed).map_err(|e| Failure::Internal(e.to_string()))?;
    Ok(Some(
        Event::default()
            .event("alert")
            .id(alert_id.to_string())
            .data(json),
    ))
}
