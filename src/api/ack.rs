//! `/ack/{token}`: the one-click acknowledge link in every SMS, email and IM message.
//!
//! GET shows what the alert is and one button; POST acknowledges. GET never changes state:
//! messaging apps and mail scanners open links to build previews, and a preview must not
//! acknowledge an SOS nobody has read (nor use up the single-use link).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};

use super::ApiState;
use crate::alerts::engine::{self, Transition};
use crate::notify::links::{AckLink, LinkError};
use crate::notify::templates::{html_escape, kind_label, Lang};

fn page(status: StatusCode, title_zh: &str, title_en: &str, body: &str) -> Response {
    let html = format!(
        "<!doctype html><html lang=\"zh-CN\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{tz} · {te}</title><style>body{{font-family:system-ui,sans-serif;max-width:32rem;margin:2rem auto;padding:0 1rem;line-height:1.5}}\
         button{{font-size:1.4rem;padding:1rem 2rem;width:100%;background:#c62828;color:#fff;border:0;border-radius:.5rem}}\
         .en{{color:#555}}</style></head><body><h1>{tz}<br><span class=\"en\">{te}</span></h1>{body}</body></html>",
        tz = html_escape(title_zh),
        te = html_escape(title_en),
    );
    (status, Html(html)).into_response()
}

fn refused(e: LinkError) -> Response {
    let (zh, en) = match e {
        LinkError::Expired => ("链接已过期", "This link has expired"),
        LinkError::BadSignature | LinkError::Malformed => ("链接无效", "This link is not valid"),
    };
    page(
        StatusCode::FORBIDDEN,
        zh,
        en,
        "<p>请在控制台确认告警，或联系社区。<br><span class=\"en\">Acknowledge in the console, or call the community office.</span></p>",
    )
}

pub async fn show(State(state): State<Arc<ApiState>>, Path(token): Path<String>) -> Response {
    let link = match AckLink::verify(&token, &state.link_secret, chrono::Utc::now().timestamp()) {
        Ok(l) => l,
        Err(e) => return refused(e),
    };
    let row = match state.pool.get().await {
        Ok(c) => c
            .query_opt(
                "SELECT a.kind, a.status, coalesce(e.name, a.device_id, ''), a.acknowledged_by
                 FROM alerts a LEFT JOIN elders e ON e.id = a.elder_id WHERE a.id = $1",
                &[&link.alert_id],
            )
            .await
            .ok()
            .flatten(),
        Err(_) => None,
    };
    let Some(row) = row else {
        return page(
            StatusCode::SERVICE_UNAVAILABLE,
            "暂时无法访问",
            "Temporarily unavailable",
            "<p>请稍后重试。 Please retry.</p>",
        );
    };
    let kind: String = row.get(0);
    let status: String = row.get(1);
    let name: String = row.get(2);
    let what = format!(
        "<p><b>{}</b> — {} <span class=\"en\">/ {}</span></p>",
        html_escape(&name),
        kind_label(&kind, Lang::ZhCn),
        kind_label(&kind, Lang::En)
    );
    if status != "open" {
        let by: Option<String> = row.get(3);
        return page(
            StatusCode::OK,
            "已有人确认",
            "Already acknowledged",
            &format!("{what}<p>{}</p>", html_escape(&by.unwrap_or_default())),
        );
    }
    page(
        StatusCode::OK,
        "确认告警",
        "Acknowledge this alert",
        &format!(
            "{what}<form method=\"post\"><button type=\"submit\">我已收到，马上处理<br><small>I'm on it</small></button></form>"
        ),
    )
}

pub async fn acknowledge(
    State(state): State<Arc<ApiState>>,
    Path(token): Path<String>,
) -> Response {
    let link = match AckLink::verify(&token, &state.link_secret, chrono::Utc::now().timestamp()) {
        Ok(l) => l,
        Err(e) => return refused(e),
    };
    let result = async {
        let mut client = state.pool.get().await?;
        let tx = client.transaction().await?;
        let first_use = tx
            .execute(
                "INSERT INTO ack_link_uses (nonce, alert_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&link.nonce_key(), &link.alert_id],
            )
            .await?;
        if first_use == 0 {
            return Ok::<_, crate::store::StoreError>(None);
        }
        let actor: String = if link.contact_id > 0 {
            tx.query_opt("SELECT name FROM contacts WHERE id = $1", &[&link.contact_id])
                .await?
                .map(|r| r.get(0))
                .unwrap_or_else(|| format!("contact #{}", link.contact_id))
        } else {
            "link".into()
        };
        let t = engine::acknowledge(&tx, link.alert_id, &actor, "link", &state.alerts).await?;
        tx.commit().await?;
        Ok(Some((t, actor)))
    }
    .await;
    match result {
        Ok(Some((Transition::Done, actor))) => {
            tracing::info!(alert_id = link.alert_id, "acknowledged by link");
            page(StatusCode::OK, "已确认，谢谢", "Acknowledged, thank you",
                &format!("<p>{} — 升级通知已停止。<br><span class=\"en\">Escalation has stopped.</span></p>", html_escape(&actor)))
        }
        Ok(Some((Transition::AlreadyAcknowledged | Transition::AlreadyResolved, _))) => {
            page(StatusCode::OK, "已有人确认", "Already acknowledged", "")
        }
        Ok(Some((Transition::NotFound, _))) => {
            page(StatusCode::NOT_FOUND, "告警不存在", "No such alert", "")
        }
        Ok(None) => page(
            StatusCode::CONFLICT,
            "链接已使用",
            "This link was already used",
            "",
        ),
        Err(e) => {
            tracing::error!(alert_id = link.alert_id, error = %e, "acknowledge by link failed");
            page(
                StatusCode::SERVICE_UNAVAILABLE,
                "暂时无法确认，请重试",
                "Could not acknowledge; please retry",
                "",
            )
        }
    }
}
