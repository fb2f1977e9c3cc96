//! Device registry queries used by the admin CLI (`silverguard device ...`) and by ingest
//! (which needs to know whether a device id is provisioned).

use std::collections::HashSet;

use super::StoreError;
use deadpool_postgres::Pool;

/// Whether a string is a valid device id (DESIGN.md: IMEI or `[A-Za-z0-9_-]{1,64}`).
pub use silverguard_proto::topics::is_valid_device_id;

#[derive(Debug, Clone, Default)]
pub struct NewDevices {
    pub ids: Vec<String>,
    /// Bind to the elder of this name, creating the elder when there is none.
    pub elder_name: Option<String>,
    pub model: Option<String>,
    pub heartbeat_interval_s: Option<i32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddOutcome {
    pub added: u64,
    pub already_present: u64,
}

pub async fn add(pool: &Pool, new: &NewDevices) -> Result<AddOutcome, StoreError> {
    if let Some(bad) = new.ids.iter().find(|id| !is_valid_device_id(id)) {
        return Err(StoreError::Invalid(format!(
            "device id {bad:?} is not valid: use 1 to 64 of A-Z a-z 0-9 _ -"
        )));
    }
    if let Some(i) = new.heartbeat_interval_s {
        if i <= 0 {
            return Err(StoreError::Invalid(
                "heartbeat interval must be positive".into(),
            ));
        }
    }
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let elder_id: Option<i64> = match &new.elder_name {
        None => None,
        Some(name) => {
            let name = name.trim();
            if name.is_empty() || name.chars().count() > 200 {
                return Err(StoreError::Invalid(
                    "elder name must have 1 to 200 characters".into(),
                ));
            }
            let existing = tx
                .query(
                    "SELECT id FROM elders WHERE name = $1 ORDER BY id",
                    &[&name],
                )
                .await?;
            match existing.len() {
                0 => Some(
                    tx.query_one(
                        "INSERT INTO elders (name) VALUES ($1) RETURNING id",
                        &[&name],
                    )
                    .await?
                    .get(0),
                ),
                1 => Some(existing[0].get(0)),
                n => {
                    return Err(StoreError::Invalid(format!(
                        "{n} elders are named {name:?}; bind by a unique name"
                    )))
                }
            }
        }
    };
    let mut unique: Vec<&String> = new.ids.iter().collect();
    unique.sort();
    unique.dedup();
    let ids: Vec<&str> = unique.iter().map(|s| s.as_str()).collect();
    let added = tx
        .execute(
            "INSERT INTO devices (device_id, elder_id, model, heartbeat_interval_s)
             SELECT id, $2, $3, coalesce($4, 60) FROM unnest($1::text[]) AS id
             ON CONFLICT (device_id) DO NOTHING",
            &[&ids, &elder_id, &new.model, &new.heartbeat_interval_s],
        )
        .await?;
    tx.commit().await?;
    Ok(AddOutcome {
        added,
        already_present: ids.len() as u64 - added,
    })
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceRow {
    pub device_id: String,
    pub elder: Option<String>,
    pub model: Option<String>,
    pub heartbeat_interval_s: i32,
    pub last_seen_at: Option<String>,
    pub online: Option<bool>,
    pub battery_pct: Option<i16>,
}

pub async fn list(pool: &Pool, limit: i64) -> Result<Vec<DeviceRow>, StoreError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT d.device_id, e.name, d.model, d.heartbeat_interval_s,
                    to_char(l.last_seen_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                    l.online, l.battery_pct
             FROM devices d
             LEFT JOIN elders e ON e.id = d.elder_id
             LEFT JOIN device_latest l ON l.device_id = d.device_id
             ORDER BY d.device_id LIMIT $1",
            &[&limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| DeviceRow {
            device_id: r.get(0),
            elder: r.get(1),
            model: r.get(2),
            heartbeat_interval_s: r.get(3),
            last_seen_at: r.get(4),
            online: r.get(5),
            battery_pct: r.get(6),
        })
        .collect())
}

/// Removes devices; their telemetry stays (heartbeats are keyed by id, not by reference).
pub async fn remove(pool: &Pool, ids: &[String]) -> Result<u64, StoreError> {
    let client = pool.get().await?;
    Ok(client
        .execute("DELETE FROM devices WHERE device_id = ANY($1)", &[&ids])
        .await?)
}

pub async fn all_ids(pool: &Pool) -> Result<HashSet<String>, StoreError> {
    let client = pool.get().await?;
    let rows = client.query("SELECT device_id FROM devices", &[]).await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

pub async fn exists(pool: &Pool, id: &str) -> Result<bool, StoreError> {
    let client = pool.get().await?;
    Ok(client
        .query_opt("SELECT 1 FROM devices WHERE device_id = $1", &[&id])
        .await?
        .is_some())
}

#[cfg(test)]
mod tests {
    use super::is_valid_device_id;

    #[test]
    fn device_ids() {
        assert!(is_valid_device_id("861234567890123"));
        assert!(is_valid_device_id("sim-000001_a"));
        assert!(!is_valid_device_id(""));
        assert!(!is_valid_device_id("a/b"));
        assert!(!is_valid_device_id("+"));
        assert!(!is_valid_device_id(&"x".repeat(65)));
        assert!(!is_valid_device_id("张三"));
    }
}
