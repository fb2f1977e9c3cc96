//! Device registry: provisioning (`silverguard device add|import`), listing, binding a
//! bracelet to an elder with its history (`device_bindings`), and the lookups ingest needs
//! (whether a device id is provisioned).
//!
//! Every bind and unbind goes through [`bind_in`] / [`unbind_in`], inside the caller's
//! transaction, so the devices row (`elder_id`, `bound_at`) and the history never disagree:
//! at most one open binding per device (a unique partial index backs this), and rebinding
//! closes the old row at the same instant the new one opens.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use serde::Serialize;
use tokio_postgres::GenericClient;

use super::registry::{
    self, clean_text, decode_office_text, to_half_width, ImportProblem, RegistryError,
};
use super::StoreError;

/// Whether a string is a valid device id (DESIGN.md: IMEI or `[A-Za-z0-9_-]{1,64}`).
pub use silverguard_proto::topics::is_valid_device_id;

/// A device id as typed in an office file or a form: full-width characters and spaces are
/// tolerated, the result must be a valid id.
pub fn parse_device_id(raw: &str) -> Result<String, String> {
    let id = to_half_width(raw).trim().to_string();
    if is_valid_device_id(&id) {
        Ok(id)
    } else {
        Err(format!(
            "{id:?} is not a device id: use 1 to 64 of A-Z a-z 0-9 _ -"
        ))
    }
}

/// An IMEI: 15 digits. Spaces, dashes and full-width digits are tolerated
/// (`86-123456-789012-3`, `８６１２...`).
pub fn parse_imei(raw: &str) -> Result<String, String> {
    let shown = raw.trim();
    let digits: String = to_half_width(shown)
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '/' | '.'))
        .collect();
    if digits.len() == 15 && digits.bytes().all(|b| b.is_ascii_digit()) {
        Ok(digits)
    } else {
        Err(format!("{shown:?} is not an IMEI: 15 digits"))
    }
}

/// A model or firmware version: 1 to 100 printable characters.
pub fn parse_label(raw: &str) -> Result<String, String> {
    let s = clean_text(&to_half_width(raw));
    if s.is_empty() || s.chars().count() > 100 || s.chars().any(char::is_control) {
        return Err(format!(
            "{s:?} is not a label: 1 to 100 printable characters"
        ));
    }
    Ok(s)
}

#[derive(Debug, Clone, Default)]
pub struct NewDevices {
    pub ids: Vec<String>,
    /// Bind new devices to the elder of this name, creating the elder when there is none.
    pub elder_name: Option<String>,
    pub model: Option<String>,
    pub heartbeat_interval_s: Option<i32>,
    /// The IMEI (15 digits); only with a single id.
    pub imei: Option<String>,
    pub firmware: Option<String>,
    /// Who provisions: recorded on the bindings to `elder_name` (default `cli`).
    pub actor: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddOutcome {
    pub added: u64,
    pub already_present: u64,
    /// Already present, and their model, firmware, IMEI or interval changed now.
    pub updated: u64,
}

/// Provisions devices (idempotent). Devices already present keep their binding; the model,
/// firmware, IMEI and interval given replace the stored ones.
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
    let imei = match &new.imei {
        None => None,
        Some(_) if new.ids.len() != 1 => {
            return Err(StoreError::Invalid(
                "--imei names one bracelet: give exactly one device id with it".into(),
            ))
        }
        Some(raw) => Some(parse_imei(raw).map_err(|m| StoreError::Invalid(format!("imei: {m}")))?),
    };
    let model = match &new.model {
        Some(m) => Some(parse_label(m).map_err(|e| StoreError::Invalid(format!("model: {e}")))?),
        None => None,
    };
    let firmware = match &new.firmware {
        Some(m) => Some(parse_label(m).map_err(|e| StoreError::Invalid(format!("firmware: {e}")))?),
        None => None,
    };
    let actor = new.actor.as_deref().unwrap_or("cli");
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
    if let (Some(imei), [id]) = (&imei, ids.as_slice()) {
        if let Some(other) = imei_owner(&*tx, imei, id).await? {
            return Err(StoreError::Invalid(format!(
                "imei: {imei} already belongs to device {other}"
            )));
        }
    }
    let inserted: Vec<String> = tx
        .query(
            "INSERT INTO devices (device_id, model, firmware, imei, heartbeat_interval_s)
             SELECT id, $2, $3, $4, coalesce($5, 60) FROM unnest($1::text[]) AS id
             ON CONFLICT (device_id) DO NOTHING
             RETURNING device_id",
            &[&ids, &model, &firmware, &imei, &new.heartbeat_interval_s],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if let Some(elder_id) = elder_id {
        for id in &inserted {
            bind_in(&*tx, id, elder_id, actor).await?;
        }
    }
    let existing: Vec<&str> = ids
        .iter()
        .copied()
        .filter(|id| !inserted.iter().any(|i| i == id))
        .collect();
    let updated = if existing.is_empty() {
        0
    } else {
        tx.execute(
            "UPDATE devices SET model = coalesce($2, model), firmware = coalesce($3, firmware),
                 imei = coalesce($4, imei),
                 heartbeat_interval_s = coalesce($5, heartbeat_interval_s)
             WHERE device_id = ANY($1)
               AND (model, firmware, imei, heartbeat_interval_s) IS DISTINCT FROM
                   (coalesce($2, model), coalesce($3, firmware), coalesce($4, imei),
                    coalesce($5, heartbeat_interval_s))",
            &[
                &existing,
                &model,
                &firmware,
                &imei,
                &new.heartbeat_interval_s,
            ],
        )
        .await?
    };
    tx.commit().await?;
    Ok(AddOutcome {
        added: inserted.len() as u64,
        already_present: existing.len() as u64,
        updated,
    })
}

/// The device that already has this IMEI, other than `device_id`.
async fn imei_owner<C: GenericClient + Sync>(
    c: &C,
    imei: &str,
    device_id: &str,
) -> Result<Option<String>, tokio_postgres::Error> {
    Ok(c.query_opt(
        "SELECT device_id FROM devices WHERE imei = $1 AND device_id <> $2",
        &[&imei, &device_id],
    )
    .await?
    .map(|r| r.get(0)))
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
    pub imei: Option<String>,
    pub firmware: Option<String>,
    pub elder_id: Option<i64>,
    pub elder_ref: Option<String>,
    /// When the current binding started (UTC, RFC 3339).
    pub bound_at: Option<String>,
}

const DEVICE_ROW_SQL: &str = "SELECT d.device_id, e.name, d.model, d.heartbeat_interval_s,
        to_char(l.last_seen_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
        l.online, l.battery_pct, d.imei, d.firmware, d.elder_id, e.external_ref,
        to_char(d.bound_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
     FROM devices d
     LEFT JOIN elders e ON e.id = d.elder_id
     LEFT JOIN device_current l ON l.device_id = d.device_id";

fn device_row(r: &tokio_postgres::Row) -> DeviceRow {
    DeviceRow {
        device_id: r.get(0),
        elder: r.get(1),
        model: r.get(2),
        heartbeat_interval_s: r.get(3),
        last_seen_at: r.get(4),
        online: r.get(5),
        battery_pct: r.get(6),
        imei: r.get(7),
        firmware: r.get(8),
        elder_id: r.get(9),
        elder_ref: r.get(10),
        bound_at: r.get(11),
    }
}

pub async fn list(pool: &Pool, limit: i64) -> Result<Vec<DeviceRow>, StoreError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            &format!("{DEVICE_ROW_SQL} ORDER BY d.device_id LIMIT $1"),
            &[&limit],
        )
        .await?;
    Ok(rows.iter().map(device_row).collect())
}

/// One device, or `None` when it is not provisioned.
pub async fn get(pool: &Pool, device_id: &str) -> Result<Option<DeviceRow>, StoreError> {
    let client = pool.get().await?;
    let row = client
        .query_opt(
            &format!("{DEVICE_ROW_SQL} WHERE d.device_id = $1"),
            &[&device_id.trim()],
        )
        .await?;
    Ok(row.as_ref().map(device_row))
}

/// Removes devices; their telemetry stays (heartbeats are keyed by id, not by reference),
/// and so does their binding history, closed now by `actor`.
pub async fn remove_as(pool: &Pool, ids: &[String], actor: &str) -> Result<u64, StoreError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.execute(
        "UPDATE device_bindings SET unbound_at = now(), unbound_by = $2
         WHERE device_id = ANY($1) AND unbound_at IS NULL",
        &[&ids, &actor],
    )
    .await?;
    let n = tx
        .execute("DELETE FROM devices WHERE device_id = ANY($1)", &[&ids])
        .await?;
    tx.commit().await?;
    Ok(n)
}

/// [`remove_as`] by the command line.
pub async fn remove(pool: &Pool, ids: &[String]) -> Result<u64, StoreError> {
    remove_as(pool, ids, "cli").await
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

// ---------------------------------------------------------------------------------------
// Binding and its history
// ---------------------------------------------------------------------------------------

/// What [`bind_in`] changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rebind {
    /// The elder the device was bound to before (`None`: it was free).
    pub previous_elder: Option<i64>,
    /// False when it was already bound to this elder (nothing was written).
    pub changed: bool,
}

/// Binds a provisioned device to an elder inside the caller's transaction: closes the open
/// binding (if it is another elder's), opens one for this elder, and sets `devices.elder_id`
/// and `bound_at`. `None` when the device is not provisioned. Binding a device to the elder it
/// already belongs to changes nothing.
pub async fn bind_in<C: GenericClient + Sync>(
    c: &C,
    device_id: &str,
    elder_id: i64,
    actor: &str,
) -> Result<Option<Rebind>, StoreError> {
    let Some(row) = c
        .query_opt(
            "SELECT elder_id FROM devices WHERE device_id = $1 FOR UPDATE",
            &[&device_id],
        )
        .await?
    else {
        return Ok(None);
    };
    let previous: Option<i64> = row.get(0);
    // Close whatever open binding is not this elder's (normally: the previous elder's).
    c.execute(
        "UPDATE device_bindings SET unbound_at = now(), unbound_by = $3
         WHERE device_id = $1 AND unbound_at IS NULL AND elder_id IS DISTINCT FROM $2",
        &[&device_id, &elder_id, &actor],
    )
    .await?;
    let opened = c
        .execute(
            "INSERT INTO device_bindings (device_id, elder_id, bound_at, bound_by)
             SELECT $1, $2, now(), $3
             WHERE NOT EXISTS (SELECT 1 FROM device_bindings
                               WHERE device_id = $1 AND unbound_at IS NULL)",
            &[&device_id, &elder_id, &actor],
        )
        .await?;
    if opened > 0 || previous != Some(elder_id) {
        c.execute(
            "UPDATE devices SET elder_id = $2,
                 bound_at = CASE WHEN $3 OR bound_at IS NULL THEN now() ELSE bound_at END
             WHERE device_id = $1",
            &[&device_id, &elder_id, &(opened > 0)],
        )
        .await?;
    }
    Ok(Some(Rebind {
        previous_elder: previous,
        changed: previous != Some(elder_id),
    }))
}

/// Unbinds a device inside the caller's transaction, closing its open binding. `None` when
/// the device is not provisioned; otherwise the elder it was bound to (if any).
pub async fn unbind_in<C: GenericClient + Sync>(
    c: &C,
    device_id: &str,
    actor: &str,
) -> Result<Option<Option<i64>>, StoreError> {
    let Some(row) = c
        .query_opt(
            "SELECT elder_id FROM devices WHERE device_id = $1 FOR UPDATE",
            &[&device_id],
        )
        .await?
    else {
        return Ok(None);
    };
    let previous: Option<i64> = row.get(0);
    c.execute(
        "UPDATE device_bindings SET unbound_at = now(), unbound_by = $2
         WHERE device_id = $1 AND unbound_at IS NULL",
        &[&device_id, &actor],
    )
    .await?;
    if previous.is_some() {
        c.execute(
            "UPDATE devices SET elder_id = NULL, bound_at = NULL WHERE device_id = $1",
            &[&device_id],
        )
        .await?;
    }
    Ok(Some(previous))
}

/// Provisions the device when missing, then binds it (the importers' "this bracelet is
/// this elder's"). Returns (provisioned now, binding changed).
pub async fn ensure_bound<C: GenericClient + Sync>(
    c: &C,
    device_id: &str,
    elder_id: i64,
    actor: &str,
) -> Result<(bool, bool), StoreError> {
    let provisioned = c
        .execute(
            "INSERT INTO devices (device_id) VALUES ($1) ON CONFLICT (device_id) DO NOTHING",
            &[&device_id],
        )
        .await?
        > 0;
    let rebind = bind_in(c, device_id, elder_id, actor).await?;
    Ok((provisioned, rebind.map(|r| r.changed).unwrap_or(false)))
}

/// One period during which a bracelet belonged to an elder.
#[derive(Debug, Clone, Serialize)]
pub struct Binding {
    pub id: i64,
    pub device_id: String,
    /// `None` once the elder's record was removed.
    pub elder_id: Option<i64>,
    pub elder_name: Option<String>,
    pub elder_ref: Option<String>,
    pub bound_at: DateTime<Utc>,
    pub bound_by: Option<String>,
    /// `None` while the binding is open (the device is bound now).
    pub unbound_at: Option<DateTime<Utc>>,
    pub unbound_by: Option<String>,
}

const BINDING_SQL: &str = "SELECT b.id, b.device_id, b.elder_id, e.name, e.external_ref,
        b.bound_at, b.bound_by, b.unbound_at, b.unbound_by
     FROM device_bindings b LEFT JOIN elders e ON e.id = b.elder_id";

fn binding(r: &tokio_postgres::Row) -> Binding {
    Binding {
        id: r.get(0),
        device_id: r.get(1),
        elder_id: r.get(2),
        elder_name: r.get(3),
        elder_ref: r.get(4),
        bound_at: r.get(5),
        bound_by: r.get(6),
        unbound_at: r.get(7),
        unbound_by: r.get(8),
    }
}

/// A device's bindings, newest first. `NotFound` for a device that is neither provisioned
/// nor has any history.
pub async fn history(pool: &Pool, device_id: &str) -> Result<Vec<Binding>, RegistryError> {
    let device_id = device_id.trim();
    let client = pool.get().await?;
    let rows = client
        .query(
            &format!("{BINDING_SQL} WHERE b.device_id = $1 ORDER BY b.bound_at DESC, b.id DESC"),
            &[&device_id],
        )
        .await?;
    if rows.is_empty()
        && client
            .query_opt("SELECT 1 FROM devices WHERE device_id = $1", &[&device_id])
            .await?
            .is_none()
    {
        return Err(RegistryError::NotFound(format!("device {device_id}")));
    }
    Ok(rows.iter().map(binding).collect())
}

/// The bracelets an elder has worn, newest first (empty for an unknown elder).
pub async fn elder_history(pool: &Pool, elder_id: i64) -> Result<Vec<Binding>, RegistryError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            &format!("{BINDING_SQL} WHERE b.elder_id = $1 ORDER BY b.bound_at DESC, b.id DESC"),
            &[&elder_id],
        )
        .await?;
    Ok(rows.iter().map(binding).collect())
}

// ---------------------------------------------------------------------------------------
// Device import: the supplier's or the office's list of bracelets
// ---------------------------------------------------------------------------------------

/// A validated row of a device file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedDevice {
    pub line: usize,
    pub device_id: String,
    pub imei: Option<String>,
    pub model: Option<String>,
    pub firmware: Option<String>,
    pub heartbeat_interval_s: Option<i32>,
    /// Bind to the elder with this ref (who must exist).
    pub elder_ref: Option<String>,
}

/// What a device import did (or, for a dry run, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DeviceImportSummary {
    pub dry_run: bool,
    pub devices_provisioned: u64,
    pub devices_updated: u64,
    pub devices_unchanged: u64,
    /// Bound to the elder of their row (for the first time, or moved from another).
    pub devices_bound: u64,
    pub warnings: Vec<String>,
}

/// Canonical device column for a header cell (English or Chinese), `None` when unknown.
pub(crate) fn device_column(header: &str) -> Option<&'static str> {
    Some(match header {
        "device_id" | "device" | "id" | "设备编号" | "设备号" | "设备id" | "设备" | "手环编号" => {
            "device_id"
        }
        "imei" | "imei号" | "串号" | "设备imei" | "手环imei" => "imei",
        "model" | "型号" | "设备型号" | "手环型号" => "model",
        "firmware" | "firmware_version" | "固件" | "固件版本" => "firmware",
        "elder_ref" | "elder" | "老人编号" | "老人档案编号" | "档案编号" | "绑定老人" => {
            "elder_ref"
        }
        "interval_s" | "heartbeat_interval_s" | "心跳间隔" | "心跳间隔秒" => "interval_s",
        _ => return None,
    })
}

/// Parses and validates a device CSV (already decoded). Every problem names its line and
/// column; a row needs a device id or an IMEI (which then is the id).
pub fn parse_device_csv(text: &str) -> Result<Vec<PlannedDevice>, Vec<ImportProblem>> {
    let table = registry::read_csv_table(text, |h| device_column(h).is_some())?;
    let mut problems = Vec::new();
    let mut cols: Vec<Option<&'static str>> = Vec::new();
    let mut seen: HashMap<&'static str, usize> = HashMap::new();
    for (i, h) in table.headers.iter().enumerate() {
        if h.is_empty() {
            cols.push(None);
            continue;
        }
        match device_column(h) {
            Some(c) => {
                if let Some(first) = seen.insert(c, i + 1) {
                    problems.push(registry::problem(
                        table.header_line,
                        c,
                        format!("column appears twice (columns {first} and {})", i + 1),
                    ));
                }
                cols.push(Some(c));
            }
            None => {
                problems.push(registry::problem(
                    table.header_line,
                    table.raw_headers[i].clone(),
                    "unknown column: use device_id, imei, model, firmware, elder_ref, interval_s",
                ));
                cols.push(None);
            }
        }
    }
    if !seen.contains_key("device_id") && !seen.contains_key("imei") {
        problems.push(registry::problem(
            table.header_line,
            "device_id",
            "required column is missing (device_id, or imei when the id is the IMEI)",
        ));
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let mut out = Vec::new();
    let mut ids: HashMap<String, usize> = HashMap::new();
    let mut imeis: HashMap<String, usize> = HashMap::new();
    for row in &table.rows {
        let line = row.line;
        let cell = |name: &str| -> Option<String> {
            cols.iter()
                .position(|c| *c == Some(name))
                .and_then(|i| row.cells.get(i))
                .map(|s| clean_text(s))
                .filter(|s| !s.is_empty())
        };
        let mut p =
            |field: &str, message: String| problems.push(registry::problem(line, field, message));
        let imei = match cell("imei").map(|v| parse_imei(&v)) {
            Some(Ok(v)) => Some(v),
            Some(Err(m)) => {
                p("imei", m);
                None
            }
            None => None,
        };
        let device_id = match cell("device_id") {
            Some(v) => match parse_device_id(&v) {
                Ok(id) => Some(id),
                Err(m) => {
                    p("device_id", m);
                    None
                }
            },
            None => match &imei {
                Some(i) => Some(i.clone()),
                None => {
                    if cell("imei").is_none() {
                        p("device_id", "is required (or an imei)".into());
                    }
                    None
                }
            },
        };
        let model = match cell("model").map(|v| parse_label(&v)) {
            Some(Ok(v)) => Some(v),
            Some(Err(m)) => {
                p("model", m);
                None
            }
            None => None,
        };
        let firmware = match cell("firmware").map(|v| parse_label(&v)) {
            Some(Ok(v)) => Some(v),
            Some(Err(m)) => {
                p("firmware", m);
                None
            }
            None => None,
        };
        let interval = match cell("interval_s") {
            Some(v) => match to_half_width(&v).trim().parse::<i32>() {
                Ok(n) if (5..=86_400).contains(&n) => Some(n),
                _ => {
                    p(
                        "interval_s",
                        format!("{v:?} is not a heartbeat interval: whole seconds, 5 to 86400"),
                    );
                    None
                }
            },
            None => None,
        };
        let elder_ref = cell("elder_ref").map(|r| to_half_width(&r).trim().to_string());
        if let Some(id) = &device_id {
            if let Some(first) = ids.insert(id.clone(), line) {
                p("device_id", format!("{id} is also on line {first}"));
            }
        }
        if let Some(i) = &imei {
            if let Some(first) = imeis.insert(i.clone(), line) {
                p("imei", format!("{i} is also on line {first}"));
            }
        }
        if let Some(device_id) = device_id {
            out.push(PlannedDevice {
                line,
                device_id,
                imei,
                model,
                firmware,
                heartbeat_interval_s: interval,
                elder_ref,
            });
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        problems.sort_by_key(|p| p.line);
        Err(problems)
    }
}

/// Reads and validates a device file (UTF-8, UTF-8 with BOM, or GBK/GB18030).
pub fn read_device_file(path: &Path) -> Result<Vec<PlannedDevice>, RegistryError> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| RegistryError::Read {
        path: shown.clone(),
        source,
    })?;
    let text = decode_office_text(&bytes).map_err(|p| RegistryError::Import {
        path: shown.clone(),
        problems: vec![p],
    })?;
    parse_device_csv(&text.text).map_err(|problems| RegistryError::Import {
        path: shown,
        problems,
    })
}

/// Writes a device plan in one transaction: devices are provisioned or their details
/// updated, and bound to the elder of their row (with history, by `actor`). Any problem
/// (an IMEI of another device, an unknown elder ref) is reported with its line and nothing
/// is kept. A dry run rolls back at the end.
pub async fn apply_device_import(
    pool: &Pool,
    plan: &[PlannedDevice],
    source: &str,
    dry_run: bool,
    actor: &str,
) -> Result<DeviceImportSummary, RegistryError> {
    let mut summary = DeviceImportSummary {
        dry_run,
        ..Default::default()
    };
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let mut problems = Vec::new();
    let upsert = tx
        .prepare(
            "INSERT INTO devices (device_id, imei, model, firmware, heartbeat_interval_s)
             VALUES ($1, $2, $3, $4, coalesce($5, 60))
             ON CONFLICT (device_id) DO UPDATE SET
                 imei = coalesce(EXCLUDED.imei, devices.imei),
                 model = coalesce(EXCLUDED.model, devices.model),
                 firmware = coalesce(EXCLUDED.firmware, devices.firmware),
                 heartbeat_interval_s = coalesce($5, devices.heartbeat_interval_s)
             WHERE (devices.imei, devices.model, devices.firmware, devices.heartbeat_interval_s)
                   IS DISTINCT FROM
                   (coalesce(EXCLUDED.imei, devices.imei), coalesce(EXCLUDED.model, devices.model),
                    coalesce(EXCLUDED.firmware, devices.firmware),
                    coalesce($5, devices.heartbeat_interval_s))
             RETURNING (xmax = 0)",
        )
        .await?;
    let at = |e: tokio_postgres::Error, line: usize| RegistryError::ImportDb {
        path: source.to_string(),
        line,
        source: StoreError::Db(e),
    };
    for d in plan {
        if let Some(imei) = &d.imei {
            if let Some(other) = imei_owner(&*tx, imei, &d.device_id)
                .await
                .map_err(|e| at(e, d.line))?
            {
                // Another row of this file may take the IMEI away from `other` later; a
                // swap of IMEIs between two devices is rare enough to do in two runs.
                problems.push(registry::problem(
                    d.line,
                    "imei",
                    format!("{imei} already belongs to device {other}"),
                ));
                continue;
            }
        }
        let elder_id: Option<i64> = match &d.elder_ref {
            None => None,
            Some(r) => {
                match tx
                    .query_opt("SELECT id FROM elders WHERE external_ref = $1", &[r])
                    .await
                    .map_err(|e| at(e, d.line))?
                {
                    Some(row) => Some(row.get(0)),
                    None => {
                        problems.push(registry::problem(
                            d.line,
                            "elder_ref",
                            format!("no elder has ref {r:?}: import the elders first"),
                        ));
                        continue;
                    }
                }
            }
        };
        if !problems.is_empty() {
            continue; // the import will fail: only collect what else is wrong
        }
        let row = tx
            .query_opt(
                &upsert,
                &[
                    &d.device_id,
                    &d.imei,
                    &d.model,
                    &d.firmware,
                    &d.heartbeat_interval_s,
                ],
            )
            .await
            .map_err(|e| at(e, d.line))?;
        match row.map(|r| r.get::<_, bool>(0)) {
            Some(true) => summary.devices_provisioned += 1,
            Some(false) => summary.devices_updated += 1,
            None => summary.devices_unchanged += 1,
        }
        if let Some(elder_id) = elder_id {
            let rebind = bind_in(&*tx, &d.device_id, elder_id, actor)
                .await
                .map_err(|e| RegistryError::ImportDb {
                    path: source.to_string(),
                    line: d.line,
                    source: e,
                })?;
            if let Some(Rebind {
                previous_elder: Some(prev),
                changed: true,
            }) = rebind
            {
                summary.warnings.push(format!(
                    "line {}: device {} moved from elder {prev} to {}",
                    d.line,
                    d.device_id,
                    d.elder_ref.as_deref().unwrap_or("-")
                ));
            }
            if rebind.map(|r| r.changed).unwrap_or(false) {
                summary.devices_bound += 1;
            }
        }
    }
    if !problems.is_empty() {
        return Err(RegistryError::Import {
            path: source.to_string(),
            problems,
        });
    }
    if dry_run {
        tx.rollback().await?;
    } else {
        tx.commit().await?;
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids() {
        assert!(is_valid_device_id("861234567890123"));
        assert!(is_valid_device_id("sim-000001_a"));
        assert!(!is_valid_device_id(""));
        assert!(!is_valid_device_id("a/b"));
        assert!(!is_valid_device_id("+"));
        assert!(!is_valid_device_id(&"x".repeat(65)));
        assert!(!is_valid_device_id("张三"));
        assert!(parse_device_id("８６ ０")
            .unwrap_err()
            .contains("not a device id"));
        assert_eq!(parse_device_id(" ８６０１ ").unwrap(), "8601");
    }

    #[test]
    fn imeis() {
        assert_eq!(parse_imei("861234567890123").unwrap(), "861234567890123");
        assert_eq!(parse_imei("86-123456-789012-3").unwrap(), "861234567890123");
        assert_eq!(
            parse_imei("８６１２３４５６７８９０１２３").unwrap(),
            "861234567890123"
        );
        assert!(parse_imei("86123456789012").is_err());
        assert!(parse_imei("86123456789012X").is_err());
    }

    #[test]
    fn device_csv_with_chinese_headers() {
        let text = "设备编号,IMEI,型号,固件版本,老人编号\n\
                    dev-1,861234567890123,SG-B2,1.4.2,A-1\n\
                    \n\
                    ,861234567890124,SG-B2,,\n\
                    dev-3,12345,SG-B2,,\n\
                    dev-1,,,,\n";
        let problems = parse_device_csv(text).unwrap_err();
        let shown: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert!(
            shown.iter().any(|s| s.starts_with("line 5, imei")),
            "{shown:?}"
        );
        assert!(
            shown
                .iter()
                .any(|s| s.starts_with("line 6, device_id: dev-1 is also on line 2")),
            "{shown:?}"
        );
        let ok = "device_id,imei,model,firmware,elder_ref\n\
                  dev-1,861234567890123,SG-B2,1.4.2,A-1\n\
                  ,861234567890124,SG-B2,,\n";
        let plan = parse_device_csv(ok).unwrap();
        assert_eq!(plan.len(), 2);
        assert_eq!(plan[1].device_id, "861234567890124");
        assert_eq!(plan[0].elder_ref.as_deref(), Some("A-1"));
    }
}
