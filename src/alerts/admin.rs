//! Operator access to alerts without the console: list, show with timeline, acknowledge,
//! resolve. Used by `silverguard alert ...`.

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use serde::Serialize;

use super::engine::{self, Transition};
use super::settings::AlertSettings;
use crate::store::StoreError;

#[derive(Debug, Clone, Serialize)]
pub struct AlertRow {
    pub id: i64,
    pub kind: String,
    pub severity: String,
    pub status: String,
    pub elder: Option<String>,
    pub device_id: Option<String>,
    pub opened_at: DateTime<Utc>,
    pub repeat_count: i32,
    pub acknowledged_by: Option<String>,
    pub resolved_by: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TimelineRow {
    pub at: DateTime<Utc>,
    pub entry: String,
    pub actor: Option<String>,
    pub channel: Option<String>,
    pub detail: serde_json::Value,
}

const SELECT: &str = "SELECT a.id, a.kind, a.severity, a.status, e.name, a.device_id, a.opened_at,
                             a.repeat_count, a.acknowledged_by, a.resolved_by
                      FROM alerts a LEFT JOIN elders e ON e.id = a.elder_id";

fn row(r: &tokio_postgres::Row) -> AlertRow {
    AlertRow {
        id: r.get(0),
        kind: r.get(1),
        severity: r.get(2),
        status: r.get(3),
        elder: r.get(4),
        device_id: r.get(5),
        opened_at: r.get(6),
        repeat_count: r.get(7),
        acknowledged_by: r.get(8),
        resolved_by: r.get(9),
    }
}

/// Alerts, newest first; `active_only` hides resolved ones.
pub async fn list(pool: &Pool, active_only: bool, limit: i64) -> Result<Vec<AlertRow>, StoreError> {
    let client = pool.get().await?;
    let sql = format!(
        "{SELECT} WHERE ($1 = false OR a.status <> 'resolved') ORDER BY a.opened_at DESC LIMIT $2"
    );
    Ok(client
        .query(&sql, &[&active_only, &limit])
        .await?
        .iter()
        .map(row)
        .collect())
}

pub async fn show(
    pool: &Pool,
    id: i64,
) -> Result<Option<(AlertRow, Vec<TimelineRow>)>, StoreError> {
    let client = pool.get().await?;
    let Some(a) = client
        .query_opt(&format!("{SELECT} WHERE a.id = $1"), &[&id])
        .await?
    else {
        return Ok(None);
    };
    let t = client
        .query(
            "SELECT at, entry, actor, channel, detail FROM alert_timeline WHERE alert_id = $1 ORDER BY id",
            &[&id],
        )
        .await?
        .iter()
        .map(|r| TimelineRow {
            at: r.get(0),
            entry: r.get(1),
            actor: r.get(2),
            channel: r.get(3),
            detail: r.get(4),
        })
        .collect();
    Ok(Some((row(&a), t)))
}

pub async fn acknowledge(
    pool: &Pool,
    id: i64,
    actor: &str,
    channel: &str,
    settings: &AlertSettings,
) -> Result<Transition, StoreError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let t = engine::acknowledge(&tx, id, actor, channel, settings).await?;
    tx.commit().await?;
    Ok(t)
}

pub async fn resolve(
    pool: &Pool,
    id: i64,
    actor: &str,
    note: &str,
) -> Result<Transition, StoreError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let t = engine::resolve(&tx, id, actor, note).await?;
    tx.commit().await?;
    Ok(t)
}
