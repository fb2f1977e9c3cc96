//! The alert lifecycle in SQL: open (or count a repeat), run escalation steps into the
//! outbox, acknowledge, resolve, auto-resolve, cancel a fall. Every function takes the
//! caller's transaction, so an alert change and the notifications it causes commit together
//! (DESIGN.md guarantee 2).

use chrono::{DateTime, Utc};
use serde_json::json;
use tokio_postgres::Transaction;

use super::settings::{AlertSettings, Role};
use crate::store::StoreError;

/// Kinds a human must close: never auto-resolved.
pub fn needs_human(kind: &str) -> bool {
    matches!(kind, "sos" | "fall")
}

pub fn subject_of(elder_id: Option<i64>, device_id: &str) -> String {
    match elder_id {
        Some(e) => format!("elder:{e}"),
        None => format!("device:{device_id}"),
    }
}

#[derive(Debug, Clone)]
pub struct NewAlert {
    pub elder_id: Option<i64>,
    pub device_id: String,
    pub kind: &'static str,
    pub severity: &'static str,
    pub occurred_at: DateTime<Utc>,
    pub source_event_id: Option<i64>,
    pub location: Option<(i32, i32)>,
    pub detail: serde_json::Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    pub alert_id: i64,
    /// False when an active alert of this kind existed and the repeat was counted on it.
    pub new: bool,
}

pub async fn timeline(
    tx: &Transaction<'_>,
    alert_id: i64,
    entry: &str,
    actor: Option<&str>,
    channel: Option<&str>,
    detail: serde_json::Value,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO alert_timeline (alert_id, entry, actor, channel, detail) VALUES ($1, $2, $3, $4, $5)",
        &[&alert_id, &entry, &actor, &channel, &detail],
    )
    .await?;
    Ok(())
}

/// Opens an alert, or counts a repeat on the active one of the same kind. A new alert's
/// first step runs now (its notifications enter the outbox in this transaction), or at
/// `first_delay` when given (a fall's cancel window).
pub async fn open_or_repeat(
    tx: &Transaction<'_>,
    a: &NewAlert,
    settings: &AlertSettings,
    first_delay: Option<std::time::Duration>,
) -> Result<Opened, StoreError> {
    let subject = subject_of(a.elder_id, &a.device_id);
    let (lat, lon) = a
        .location
        .map(|(a, b)| (Some(a), Some(b)))
        .unwrap_or((None, None));
    let row = tx
        .query_one(
            "INSERT INTO alerts (subject, elder_id, device_id, kind, severity, occurred_at,
                                 source_event_id, lat_e7, lon_e7, detail)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT (subject, kind) WHERE status <> 'resolved'
             DO UPDATE SET repeat_count = alerts.repeat_count + 1, last_repeat_at = now()
             RETURNING id, (xmax = 0) AS inserted, status, repeat_count",
            &[
                &subject,
                &a.elder_id,
                &a.device_id,
                &a.kind,
                &a.severity,
                &a.occurred_at,
                &a.source_event_id,
                &lat,
                &lon,
                &a.detail,
            ],
        )
        .await?;
    let alert_id: i64 = row.get(0);
    let new: bool = row.get(1);
    if !new {
        timeline(
            tx,
            alert_id,
            "repeated",
            None,
            None,
            json!({"event_id": a.source_event_id}),
        )
        .await?;
        // Pressed again after someone acknowledged: whoever came may have left, or it is a
        // new emergency. Tell the first circle again (new round, so new notifications).
        let status: String = row.get(2);
        let repeats: i32 = row.get(3);
        if needs_human(a.kind) && status == "acknowledged" {
            timeline(
                tx,
                alert_id,
                "pressed_again",
                None,
                Some("device"),
                json!({"repeat": repeats}),
            )
            .await?;
            run_step(tx, alert_id, 0, repeats, settings).await?;
        }
        return Ok(Opened { alert_id, new });
    }
    timeline(
        tx,
        alert_id,
        "opened",
        None,
        None,
        json!({"kind": a.kind, "severity": a.severity, "device_id": a.device_id, "detail": a.detail}),
    )
    .await?;
    let policy_first = settings
        .policy(a.severity)
        .and_then(|p| p.steps.first())
        .map(|s| s.after)
        .unwrap_or_default();
    let delay = first_delay.unwrap_or(policy_first);
    if delay.is_zero() {
        tx.execute(
            "INSERT INTO escalation_steps (alert_id, step, round, due_at, state, done_at)
             VALUES ($1, 0, 0, now(), 'done', now())",
            &[&alert_id],
        )
        .await?;
        run_step(tx, alert_id, 0, 0, settings).await?;
    } else {
        schedule(tx, alert_id, "notify", 0, 0, delay).await?;
        timeline(
            tx,
            alert_id,
            "waiting",
            None,
            None,
            json!({"seconds": delay.as_secs(), "why": if a.kind == "fall" { "cancel window" } else { "first step delayed by policy" }}),
        )
        .await?;
    }
    Ok(Opened { alert_id, new })
}

async fn schedule(
    tx: &Transaction<'_>,
    alert_id: i64,
    purpose: &str,
    step: i32,
    round: i32,
    after: std::time::Duration,
) -> Result<(), StoreError> {
    let secs = after.as_secs_f64();
    tx.execute(
        "INSERT INTO escalation_steps (alert_id, purpose, step, round, due_at)
         VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))
         ON CONFLICT DO NOTHING",
        &[&alert_id, &purpose, &step, &round, &secs],
    )
    .await?;
    Ok(())
}

#[derive(Debug)]
struct Recipient {
    role: Role,
    contact_id: i64,
    phone: Option<String>,
    email: Option<String>,
    language: &'static str,
    im_webhook: Option<String>,
}

/// The people in `roles` for an elder, in the registry's order (role, then priority).
async fn recipients(
    tx: &Transaction<'_>,
    elder_id: Option<i64>,
    roles: &[Role],
) -> Result<Vec<Recipient>, StoreError> {
    let Some(elder_id) = elder_id else {
        return Ok(Vec::new());
    };
    let responders = match crate::store::registry::who_answers_with(tx, elder_id).await {
        Ok(r) => r,
        // The elder was removed after the device was bound: nobody to tell, the timeline
        // says so (no_recipients) and the console still shows the alert.
        Err(e) if e.is_not_found() => return Ok(Vec::new()),
        Err(crate::store::registry::RegistryError::Store(e)) => return Err(e),
        Err(e) => return Err(StoreError::Invalid(e.to_string())),
    };
    Ok(roles
        .iter()
        .flat_map(|role| {
            responders.role(*role).iter().map(move |r| Recipient {
                role: *role,
                contact_id: r.id,
                phone: r.phone.clone(),
                email: r.email.clone(),
                language: r.language.as_str(),
                im_webhook: r.im_webhook.clone(),
            })
        })
        .collect())
}

/// Queues one outbox row; the dedupe key makes a retried transaction harmless.
#[allow(clippy::too_many_arguments)]
async fn queue(
    tx: &Transaction<'_>,
    alert_id: i64,
    contact_id: Option<i64>,
    role: Option<&str>,
    channel: &str,
    recipient: &str,
    language: &str,
    urgent: bool,
    step: i32,
    dedupe_key: &str,
) -> Result<u64, StoreError> {
    Ok(tx
        .execute(
            "INSERT INTO outbox (alert_id, contact_id, role, channel, recipient, language, urgent, step, dedupe_key)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (dedupe_key) DO NOTHING",
            &[&alert_id, &contact_id, &role, &channel, &recipient, &language, &urgent, &step, &dedupe_key],
        )
        .await?)
}

/// Runs escalation step `step` (repetition `round`) of an alert: queues its notifications
/// and schedules what comes next.
pub async fn run_step(
    tx: &Transaction<'_>,
    alert_id: i64,
    step: i32,
    round: i32,
    settings: &AlertSettings,
) -> Result<(), StoreError> {
    let row = tx
        .query_one(
            "SELECT severity, elder_id, device_id, kind, opened_at FROM alerts WHERE id = $1",
            &[&alert_id],
        )
        .await?;
    let severity: String = row.get(0);
    let elder_id: Option<i64> = row.get(1);
    let device_id: Option<String> = row.get(2);
    let kind: String = row.get(3);
    let Some(policy) = settings.policy(&severity) else {
        return Err(StoreError::Invalid(format!(
            "no escalation policy for {severity}"
        )));
    };
    let Some(spec) = policy.steps.get(step as usize) else {
        return Ok(());
    };
    let urgent = severity == "critical" && needs_human(&kind);
    let mut queued = 0u64;
    let people = recipients(tx, elder_id, &spec.notify).await?;
    for r in &people {
        for ch in &spec.channels {
            let address = match ch.as_str() {
                "sms" => r.phone.as_deref(),
                "email" => r.email.as_deref(),
                _ => r.im_webhook.as_deref(),
            };
            let Some(address) = address.filter(|a| !a.is_empty()) else {
                continue;
            };
            let key = format!(
                "{alert_id}:n:{step}:{round}:{}:{}",
                r.contact_id,
                ch.as_str()
            );
            queued += queue(
                tx,
                alert_id,
                Some(r.contact_id),
                Some(r.role.as_str()),
                ch.as_str(),
                address,
                r.language,
                urgent,
                step,
                &key,
            )
            .await?;
        }
    }
    if spec.downlink {
        if let Some(dev) = &device_id {
            let key = format!("{alert_id}:downlink:{step}:{round}");
            queued += queue(
                tx, alert_id, None, None, "downlink", dev, "zh-CN", urgent, step, &key,
            )
            .await?;
        }
    }
    let roles: Vec<&str> = spec.notify.iter().map(|r| r.as_str()).collect();
    timeline(
        tx,
        alert_id,
        if step == 0 && round == 0 { "notified" } else { "escalated" },
        None,
        None,
        json!({"step": step, "round": round, "roles": roles, "queued": queued, "recipients": people.len()}),
    )
    .await?;
    if people.is_empty() {
        timeline(
            tx,
            alert_id,
            "no_recipients",
            None,
            None,
            json!({"step": step, "roles": roles}),
        )
        .await?;
    }
    // What comes next: the following step at its offset from the opening, or this step
    // again if it repeats.
    if let Some(next) = policy.steps.get(step as usize + 1) {
        let offset = next.after.saturating_sub(spec.after);
        schedule(tx, alert_id, "notify", step + 1, 0, offset).await?;
    } else if let Some(every) = spec.repeat_every {
        schedule(tx, alert_id, "notify", step, round + 1, every).await?;
    }
    tx.execute(
        "SELECT pg_notify('sg_outbox', $1)",
        &[&alert_id.to_string()],
    )
    .await?;
    Ok(())
}

/// Runs a reminder: the alert was acknowledged but is still not resolved.
async fn run_reminder(tx: &Transaction<'_>, alert_id: i64, round: i32) -> Result<(), StoreError> {
    let row = tx
        .query_one("SELECT elder_id FROM alerts WHERE id = $1", &[&alert_id])
        .await?;
    let people = recipients(tx, row.get(0), &[Role::GridWorker]).await?;
    let mut queued = 0;
    for r in &people {
        for (ch, address) in [("sms", &r.phone), ("im", &r.im_webhook)] {
            if let Some(address) = address.as_deref().filter(|a| !a.is_empty()) {
                let key = format!("{alert_id}:r:{round}:{}:{ch}", r.contact_id);
                queued += queue(
                    tx,
                    alert_id,
                    Some(r.contact_id),
                    Some(r.role.as_str()),
                    ch,
                    address,
                    r.language,
                    false,
                    -1,
                    &key,
                )
                .await?;
            }
        }
    }
    timeline(
        tx,
        alert_id,
        "reminder",
        None,
        None,
        json!({"round": round, "queued": queued}),
    )
    .await?;
    tx.execute(
        "SELECT pg_notify('sg_outbox', $1)",
        &[&alert_id.to_string()],
    )
    .await?;
    Ok(())
}

/// Takes due escalation steps (across all instances, each once) and runs them. Returns how
/// many ran.
pub async fn run_due_steps(
    client: &mut deadpool_postgres::Client,
    settings: &AlertSettings,
) -> Result<usize, StoreError> {
    let tx = client.transaction().await?;
    let rows = tx
        .query(
            "SELECT s.id, s.alert_id, s.step, s.round, s.purpose, a.status, a.severity
             FROM escalation_steps s JOIN alerts a ON a.id = s.alert_id
             WHERE s.state = 'pending' AND s.due_at <= now()
             ORDER BY s.due_at
             LIMIT 100
             FOR UPDATE OF s SKIP LOCKED",
            &[],
        )
        .await?;
    for r in &rows {
        let (id, alert_id, step, round): (i64, i64, i32, i32) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        let purpose: &str = r.get(4);
        let status: &str = r.get(5);
        let run = match (purpose, status) {
            ("notify", "open") => {
                run_step(&tx, alert_id, step, round, settings).await?;
                true
            }
            ("reminder", "acknowledged") => {
                run_reminder(&tx, alert_id, round).await?;
                let severity: String = r.get(6);
                if let Some(every) = settings
                    .policy(&severity)
                    .and_then(|p| p.ack_reminder_after)
                {
                    schedule(&tx, alert_id, "reminder", 0, round + 1, every).await?;
                }
                true
            }
            _ => false,
        };
        tx.execute(
            "UPDATE escalation_steps SET state = $2, done_at = now() WHERE id = $1",
            &[&id, &if run { "done" } else { "skipped" }],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(rows.len())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Transition {
    Done,
    AlreadyAcknowledged,
    AlreadyResolved,
    NotFound,
}

async fn stop_pending(
    tx: &Transaction<'_>,
    alert_id: i64,
    purposes: &[&str],
) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE escalation_steps SET state = 'skipped', done_at = now()
         WHERE alert_id = $1 AND state = 'pending' AND purpose = ANY($2)",
        &[&alert_id, &purposes],
    )
    .await?;
    // Notifications not yet handed to a provider are no longer needed; the bracelet's
    // "help is coming" still goes out.
    tx.execute(
        "UPDATE outbox SET status = 'cancelled' WHERE alert_id = $1 AND status = 'pending' AND channel <> 'downlink'",
        &[&alert_id],
    )
    .await?;
    Ok(())
}

async fn current_status(tx: &Transaction<'_>, alert_id: i64) -> Result<Transition, StoreError> {
    Ok(
        match tx
            .query_opt("SELECT status FROM alerts WHERE id = $1", &[&alert_id])
            .await?
            .map(|r| r.get::<_, String>(0))
            .as_deref()
        {
            None => Transition::NotFound,
            Some("resolved") => Transition::AlreadyResolved,
            _ => Transition::AlreadyAcknowledged,
        },
    )
}

/// open → acknowledged: escalation stops; a reminder is scheduled if the policy has one.
pub async fn acknowledge(
    tx: &Transaction<'_>,
    alert_id: i64,
    actor: &str,
    channel: &str,
    settings: &AlertSettings,
) -> Result<Transition, StoreError> {
    let row = tx
        .query_opt(
            "UPDATE alerts SET status = 'acknowledged', acknowledged_at = now(),
                               acknowledged_by = $2, ack_channel = $3
             WHERE id = $1 AND status = 'open' RETURNING severity",
            &[&alert_id, &actor, &channel],
        )
        .await?;
    let Some(row) = row else {
        return current_status(tx, alert_id).await;
    };
    stop_pending(tx, alert_id, &["notify"]).await?;
    timeline(
        tx,
        alert_id,
        "acknowledged",
        Some(actor),
        Some(channel),
        json!({}),
    )
    .await?;
    let severity: String = row.get(0);
    if let Some(after) = settings
        .policy(&severity)
        .and_then(|p| p.ack_reminder_after)
    {
        schedule(tx, alert_id, "reminder", 0, 0, after).await?;
    }
    Ok(Transition::Done)
}

/// → resolved, by a person with a note.
pub async fn resolve(
    tx: &Transaction<'_>,
    alert_id: i64,
    actor: &str,
    note: &str,
) -> Result<Transition, StoreError> {
    let n = tx
        .execute(
            "UPDATE alerts SET status = 'resolved', resolved_at = now(), resolved_by = $2,
                               resolution_note = $3,
                               acknowledged_at = coalesce(acknowledged_at, now()),
                               acknowledged_by = coalesce(acknowledged_by, $2)
             WHERE id = $1 AND status <> 'resolved'",
            &[&alert_id, &actor, &note],
        )
        .await?;
    if n == 0 {
        return current_status(tx, alert_id).await;
    }
    stop_pending(tx, alert_id, &["notify", "reminder"]).await?;
    timeline(
        tx,
        alert_id,
        "resolved",
        Some(actor),
        None,
        json!({"note": note}),
    )
    .await?;
    Ok(Transition::Done)
}

/// The condition behind an alert cleared: resolve it, unless a human must (SOS, fall).
pub async fn auto_resolve(
    tx: &Transaction<'_>,
    subject: &str,
    kind: &str,
    why: serde_json::Value,
) -> Result<Option<i64>, StoreError> {
    if needs_human(kind) {
        return Ok(None);
    }
    let row = tx
        .query_opt(
            "UPDATE alerts SET status = 'resolved', resolved_at = now(), resolved_by = 'system',
                               auto_resolved = true
             WHERE subject = $1 AND kind = $2 AND status <> 'resolved' RETURNING id",
            &[&subject, &kind],
        )
        .await?;
    let Some(row) = row else { return Ok(None) };
    let id: i64 = row.get(0);
    stop_pending(tx, id, &["notify", "reminder"]).await?;
    timeline(tx, id, "auto_resolved", Some("system"), None, why).await?;
    Ok(Some(id))
}

/// SOS_CANCEL from the bracelet. Within a fall's cancel window the fall is not announced as
/// an emergency; it is kept, downgraded, and still told to the grid worker at low priority.
/// After the window (or for an SOS) the cancel is only recorded: a human closes those.
pub async fn wearer_cancelled(
    tx: &Transaction<'_>,
    subject: &str,
    event_id: i64,
    settings: &AlertSettings,
) -> Result<Option<i64>, StoreError> {
    let within = tx
        .query_opt(
            "UPDATE escalation_steps s SET state = 'skipped', done_at = now()
             FROM alerts a
             WHERE a.id = s.alert_id AND a.subject = $1 AND a.kind = 'fall' AND a.status = 'open'
               AND s.purpose = 'notify' AND s.step = 0 AND s.round = 0 AND s.state = 'pending'
             RETURNING a.id",
            &[&subject],
        )
        .await?;
    if let Some(row) = within {
        let id: i64 = row.get(0);
        tx.execute(
            "UPDATE alerts SET severity = 'low', detail = detail || '{\"cancelled_by_wearer\": true}'
             WHERE id = $1",
            &[&id],
        )
        .await?;
        timeline(
            tx,
            id,
            "cancelled_by_wearer",
            None,
            Some("device"),
            json!({"event_id": event_id}),
        )
        .await?;
        run_step(tx, id, 0, 0, settings).await?;
        return Ok(Some(id));
    }
    let active = tx
        .query(
            "SELECT id FROM alerts WHERE subject = $1 AND kind IN ('fall', 'sos') AND status <> 'resolved'",
            &[&subject],
        )
        .await?;
    for r in &active {
        timeline(
            tx,
            r.get(0),
            "wearer_cancel_ignored",
            None,
            Some("device"),
            json!({"event_id": event_id, "why": "after the cancel window; a person must close it"}),
        )
        .await?;
    }
    Ok(None)
}
