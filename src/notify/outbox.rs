//! The notifier: claims outbox rows and delivers them, with retries, backoff, fallback,
//! quiet hours and rate limits, recording every attempt on the alert's timeline.
//!
//! Claiming is `FOR UPDATE SKIP LOCKED` plus a lease: each row is handed to one worker in
//! one instance; if that process dies mid-send, the lease expires and the row is taken again
//! (at-least-once towards providers, with the outbox id as the idempotency key where the
//! provider supports one). Each claim names its [`Claimer`], so a process restarted under
//! the same instance id takes back its predecessor's rows at once instead of after the lease.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Timelike, Utc};
use deadpool_postgres::Pool;
use serde_json::json;
use silverguard_proto::v1 as pb;
use silverguard_proto::Message;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::channels::{
    DeliveryError, EmailMessage, EmailSender, ImMessage, ImSender, SmsGateway, SmsMessage,
};
use super::downlink::Downlink;
use super::links::AckLink;
use super::templates::{self, AlertView, Lang, VitalsView};
use crate::alerts::settings::{parse_window, AlertSettings};
use crate::store::StoreError;

/// The channels this instance can deliver through.
#[derive(Clone)]
pub struct Channels {
    pub email: Option<Arc<dyn EmailSender>>,
    pub sms: Option<Arc<dyn SmsGateway>>,
    pub im: Arc<dyn ImSender>,
    pub downlink: Option<Downlink>,
}

impl Channels {
    /// Whether this deployment has the channel at all (no SMS provider is a choice, not an
    /// incident).
    pub fn available(&self, channel: &str) -> bool {
        match channel {
            "sms" => self.sms.is_some(),
            "email" => self.email.is_some(),
            "downlink" => self.downlink.is_some(),
            _ => true,
        }
    }
}

/// Who claims outbox rows: the instance (its `mqtt.client_id`, unique per instance and stable
/// across restarts) and this process (a token drawn at start).
#[derive(Debug, Clone)]
pub struct Claimer {
    pub instance: String,
    pub boot: i64,
}

impl Claimer {
    /// A new process of `instance`.
    pub fn start(instance: &str) -> Self {
        Claimer {
            instance: instance.to_string(),
            boot: rand::random::<i64>(),
        }
    }
}

#[derive(Clone)]
pub struct Notifier {
    pub claimer: Claimer,
    pub pool: Pool,
    pub settings: Arc<AlertSettings>,
    pub channels: Channels,
    pub link_secret: Arc<Vec<u8>>,
    pub metrics: crate::metrics::NotifyMetrics,
}

#[derive(Debug, Clone)]
struct Claimed {
    id: i64,
    alert_id: i64,
    contact_id: Option<i64>,
    role: Option<String>,
    channel: String,
    recipient: String,
    language: String,
    urgent: bool,
    attempts: i32,
    step: i32,
    created_at: DateTime<Utc>,
    /// When this process took the lease.
    claimed_at: Instant,
}

const LEASE: Duration = Duration::from_secs(60);

/// What [`Notifier::record`] has already committed for one attempt.
#[derive(Debug, Default)]
struct Recorded {
    attempt: bool,
    finished: bool,
}

impl Notifier {
    /// Runs until cancelled: wakes on `sg_outbox` notifications or every 200 ms. Each row is
    /// delivered by its own task (at most `CONCURRENCY` at once), and claiming continues as
    /// soon as a slot frees: a provider that hangs until its timeout must not hold back the
    /// next SOS.
    pub async fn run(self, wake: Arc<Notify>, cancel: CancellationToken) {
        const CONCURRENCY: usize = 32;
        let slots = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
        let mut tasks = tokio::task::JoinSet::new();
        let mut orphans_taken = false;
        loop {
            // Until it succeeds once (the database may not be there yet at start).
            if !orphans_taken {
                orphans_taken = match self.take_back_orphans().await {
                    Ok(_) => true,
                    Err(e) => {
                        tracing::warn!(error = %e, "could not take back a previous process's outbox rows; will retry");
                        false
                    }
                };
            }
            while tasks.try_join_next().is_some() {}
            let free = slots.available_permits();
            let mut claimed_full = false;
            if free > 0 {
                match self.claim(free as i64).await {
                    Ok(rows) => {
                        claimed_full = rows.len() == free;
                        for row in rows {
                            let Ok(permit) = slots.clone().acquire_owned().await else {
                                break;
                            };
                            let this = self.clone();
                            tasks.spawn(async move {
                                this.deliver(row).await;
                                drop(permit);
                            });
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "outbox claim failed; will retry"),
                }
            }
            if claimed_full {
                continue;
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                // A slot freed while every slot was busy: claim again at once.
                Some(_) = tasks.join_next(), if free == 0 => {}
            }
        }
        // Deliveries in progress finish (bounded by the caller's timeout); unclaimed rows
        // stay in the outbox.
        while tasks.join_next().await.is_some() {}
    }

    /// Rows that an earlier process of this instance claimed and never finished: it is dead
    /// (instance ids are unique and a process draws a new token at each start), so they are
    /// due again now rather than when their lease runs out. Their messages may have reached
    /// the provider before the crash, so some may arrive twice (at-least-once).
    async fn take_back_orphans(&self) -> Result<u64, StoreError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "UPDATE outbox SET status = 'pending', lease_until = NULL, next_attempt_at = now()
                 WHERE status = 'sending' AND claimed_by = $1 AND claimed_boot IS DISTINCT FROM $2
                 RETURNING id, alert_id",
                &[&self.claimer.instance, &self.claimer.boot],
            )
            .await?;
        for r in &rows {
            let (id, alert_id): (i64, i64) = (r.get(0), r.get(1));
            tracing::warn!(alert_id, outbox_id = id, instance = %self.claimer.instance,
                "taking back a notification a previous process was sending when it stopped");
        }
        Ok(rows.len() as u64)
    }

    async fn claim(&self, limit: i64) -> Result<Vec<Claimed>, StoreError> {
        let client = self.pool.get().await?;
        let lease = LEASE.as_secs_f64();
        let rows = client
            .query(
                "UPDATE outbox o SET status = 'sending', attempts = o.attempts + 1,
                        lease_until = now() + make_interval(secs => $2),
                        claimed_by = $3, claimed_boot = $4
                 WHERE o.id IN (
                     SELECT id FROM outbox
                     WHERE (status = 'pending' OR (status = 'sending' AND lease_until < now()))
                       AND next_attempt_at <= now()
                     ORDER BY urgent DESC, next_attempt_at
                     LIMIT $1
                     FOR UPDATE SKIP LOCKED)
                 RETURNING o.id, o.alert_id, o.contact_id, o.role, o.channel, o.recipient, o.language,
                           o.urgent, o.attempts, o.step, o.created_at",
                &[&limit, &lease, &self.claimer.instance, &self.claimer.boot],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| Claimed {
                id: r.get(0),
                alert_id: r.get(1),
                contact_id: r.get(2),
                role: r.get(3),
                channel: r.get(4),
                recipient: r.get(5),
                language: r.get(6),
                urgent: r.get(7),
                attempts: r.get(8),
                step: r.get(9),
                created_at: r.get(10),
                claimed_at: Instant::now(),
            })
            .collect())
    }

    async fn deliver(&self, row: Claimed) {
        use tracing::Instrument;
        let span = tracing::info_span!("notify", alert_id = row.alert_id, outbox_id = row.id, channel = %row.channel);
        let give_up = row.claimed_at + LEASE.saturating_sub(Duration::from_secs(5));
        let mut wait = Duration::from_millis(200);
        loop {
            let mut handed_over = false;
            match self
                .deliver_inner(&row, &mut handed_over)
                .instrument(span.clone())
                .await
            {
                Ok(()) => return,
                // Nothing reached a provider yet (the database failed while preparing the
                // message): trying again soon beats leaving the row to its lease, which would
                // hold an SOS notification back for a minute.
                Err(e) if !handed_over && Instant::now() + wait < give_up => {
                    tracing::warn!(alert_id = row.alert_id, outbox_id = row.id, error = %e,
                        "could not prepare the notification; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    // The lease expires and another attempt follows.
                    tracing::warn!(alert_id = row.alert_id, outbox_id = row.id, error = %e, "delivery bookkeeping failed");
                    return;
                }
            }
        }
    }

    /// Delivers one claimed row; `handed_over` is set once the message went to the provider.
    async fn deliver_inner(&self, row: &Claimed, handed_over: &mut bool) -> Result<(), StoreError> {
        if !row.urgent {
            if let Some(until) = self.quiet_until(row, Utc::now()) {
                return self.defer(row, until, "quiet_hours").await;
            }
            if self.over_rate_limit(row).await? {
                return self
                    .finish(row, "suppressed", None, Some("rate limit for this contact"))
                    .await;
            }
        }
        let view = self.view(row).await?;
        let Some(view) = view else {
            return self
                .finish(row, "cancelled", None, Some("alert is gone"))
                .await;
        };
        let lang = Lang::parse(&row.language).unwrap_or(Lang::ZhCn);
        let started = Instant::now();
        *handed_over = true;
        let result = self.send(row, &view, lang).await;
        let elapsed = started.elapsed();
        let ok = result.is_ok();
        self.metrics
            .observe(&row.channel, ok, elapsed, row.urgent, row.created_at);
        // The provider has (or has refused) the message now. If its outcome is not recorded,
        // the row is taken again when the lease expires and sent a second time, so a
        // database that is briefly away (restart, failover) is waited for while the lease
        // is still ours, instead of giving the row up at the first error.
        let give_up = row.claimed_at + LEASE.saturating_sub(Duration::from_secs(5));
        let mut wait = Duration::from_millis(200);
        let mut progress = Recorded::default();
        loop {
            match self.record(row, &result, elapsed, &mut progress).await {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() + wait < give_up => {
                    tracing::warn!(alert_id = row.alert_id, outbox_id = row.id, error = %e,
                        "delivery outcome not recorded yet; retrying while the lease holds");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Records one attempt's outcome; `progress` remembers the steps already committed, so a
    /// retry after an error does not repeat them.
    async fn record(
        &self,
        row: &Claimed,
        result: &Result<super::channels::Delivery, DeliveryError>,
        elapsed: Duration,
        progress: &mut Recorded,
    ) -> Result<(), StoreError> {
        let ok = result.is_ok();
        if !progress.attempt {
            let client = self.pool.get().await?;
            let (provider, error) = match result {
                Ok(d) => (Some(d.provider), None),
                Err(e) => (None, Some(e.to_string())),
            };
            client
                .execute(
                    "INSERT INTO delivery_attempts (outbox_id, ok, provider, error, duration_ms) VALUES ($1, $2, $3, $4, $5)",
                    &[&row.id, &ok, &provider, &error, &(elapsed.as_millis() as i32)],
                )
                .await?;
            progress.attempt = true;
        }
        match result {
            Ok(d) => {
                self.finish(
                    row,
                    "sent",
                    Some((d.provider, d.provider_ref.as_deref())),
                    None,
                )
                .await?;
                tracing::info!(alert_id = row.alert_id, channel = %row.channel, role = ?row.role,
                    ms = elapsed.as_millis() as u64, "notification delivered");
            }
            Err(DeliveryError::Transient(e)) if row.attempts < self.settings.max_attempts => {
                let backoff = backoff(row.attempts, row.urgent);
                tracing::warn!(alert_id = row.alert_id, channel = %row.channel, attempt = row.attempts,
                    retry_in_s = backoff.as_secs_f64(), error = %e, "delivery failed, will retry");
                self.retry(row, backoff, e).await?;
            }
            Err(e) => {
                if !progress.finished {
                    if !self.channels.available(&row.channel) {
                        // A deployment choice (no SMS provider yet), not an incident.
                        tracing::info!(alert_id = row.alert_id, channel = %row.channel, "channel not configured; falling back");
                    } else {
                        tracing::error!(alert_id = row.alert_id, channel = %row.channel, attempt = row.attempts,
                            error = %e, "delivery failed for good; falling back");
                    }
                    self.finish(row, "failed", None, Some(&e.to_string()))
                        .await?;
                    progress.finished = true;
                }
                self.fall_back(row).await?;
            }
        }
        Ok(())
    }

    fn quiet_until(&self, row: &Claimed, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if row.channel != "sms" {
            return None;
        }
        quiet_until(
            self.settings.quiet_hours.as_deref()?,
            self.settings.utc_offset_hours,
            now,
        )
    }

    async fn over_rate_limit(&self, row: &Claimed) -> Result<bool, StoreError> {
        let Some(contact) = row.contact_id else {
            return Ok(false);
        };
        let client = self.pool.get().await?;
        let sent: i64 = client
            .query_one(
                "SELECT count(*) FROM outbox WHERE contact_id = $1 AND status = 'sent' AND NOT urgent
                   AND sent_at > now() - interval '1 hour'",
                &[&contact],
            )
            .await?
            .get(0);
        Ok(sent >= self.settings.max_per_contact_per_hour as i64)
    }

    async fn view(&self, row: &Claimed) -> Result<Option<AlertView>, StoreError> {
        let client = self.pool.get().await?;
        let Some(r) = client
            .query_opt(
                "SELECT a.kind, a.severity, coalesce(e.name, a.device_id, ''), e.address, e.phone,
                        coalesce(a.device_id, ''), a.occurred_at, a.lat_e7, a.lon_e7, a.repeat_count, a.detail,
                        l.heart_rate_bpm, l.spo2_pct, l.systolic_mmhg, l.diastolic_mmhg, l.skin_temp_dc,
                        l.battery_pct, l.last_hb_at, l.lat_e7, l.lon_e7, a.status
                 FROM alerts a
                 LEFT JOIN elders e ON e.id = a.elder_id
                 LEFT JOIN device_current l ON l.device_id = a.device_id
                 WHERE a.id = $1",
                &[&row.alert_id],
            )
            .await?
        else {
            return Ok(None);
        };
        let loc = |lat: Option<i32>, lon: Option<i32>| match (lat, lon) {
            (Some(a), Some(b)) => Some((a as f64 / 1e7, b as f64 / 1e7)),
            _ => None,
        };
        let location = loc(r.get(7), r.get(8)).or_else(|| loc(r.get(18), r.get(19)));
        let vitals = VitalsView {
            heart_rate_bpm: r.get(11),
            spo2_pct: r.get(12),
            systolic_mmhg: r.get(13),
            diastolic_mmhg: r.get(14),
            skin_temp_dc: r.get(15),
            battery_pct: r.get(16),
            at: r.get(17),
        };
        let detail: serde_json::Value = r.get(10);
        let mut kind: String = r.get(0);
        if kind == "fall"
            && detail.get("cancelled_by_wearer").and_then(|v| v.as_bool()) == Some(true)
        {
            kind = "fall_cancelled".into();
        }
        if row.step < 0 {
            kind = "reminder".into();
        }
        let expires = Utc::now().timestamp() + self.settings.link_ttl.as_secs() as i64;
        let token = AckLink {
            alert_id: row.alert_id,
            contact_id: row.contact_id.unwrap_or(0),
            expires_at: expires,
            nonce: row.id,
        }
        .sign(&self.link_secret);
        let base = self.settings.public_url.trim_end_matches('/');
        Ok(Some(AlertView {
            alert_id: row.alert_id,
            kind,
            severity: r.get(1),
            elder_name: r.get(2),
            elder_address: r.get(3),
            elder_phone: r.get(4),
            device_id: r.get(5),
            occurred_at: r.get(6),
            location,
            vitals: vitals.at.map(|_| vitals.clone()),
            ack_url: Some(format!("{base}/ack/{token}")),
            // The console's alert page (login required; scoped to the reader's elders).
            console_url: Some(format!("{base}/alerts/{}", row.alert_id)),
            escalation_step: row.step.max(0),
            repeat_count: 0,
            detail: describe_detail(&detail),
        }))
    }

    async fn send(
        &self,
        row: &Claimed,
        view: &AlertView,
        lang: Lang,
    ) -> Result<super::channels::Delivery, DeliveryError> {
        let key = format!("sg-outbox-{}", row.id);
        match row.channel.as_str() {
            "downlink" => {
                let Some(d) = &self.channels.downlink else {
                    return Err(DeliveryError::Permanent("no downlink connection".into()));
                };
                let text = match lang {
                    Lang::ZhCn => "已收到求助，救援正在路上",
                    Lang::En => "Help is coming",
                };
                let cmd = pb::Command {
                    id: row.id as u64,
                    body: Some(pb::command::Body::SosAck(pb::SosAck {
                        alert_id: row.alert_id.to_string(),
                        text: text.into(),
                    })),
                };
                d.send(&row.recipient, cmd.encode_to_vec())
                    .await
                    .map_err(DeliveryError::Transient)?;
                Ok(super::channels::Delivery {
                    provider: "mqtt",
                    provider_ref: None,
                })
            }
            "email" => {
                let Some(email) = &self.channels.email else {
                    return Err(DeliveryError::Permanent("email is not configured".into()));
                };
                let r = templates::render(view, lang);
                email
                    .send(&EmailMessage {
                        to: &row.recipient,
                        subject: &r.subject,
                        text: &r.text,
                        html: &r.html,
                        idempotency_key: &key,
                    })
                    .await
            }
            "sms" => {
                let Some(sms) = &self.channels.sms else {
                    return Err(DeliveryError::Permanent("SMS is not configured".into()));
                };
                let r = templates::render(view, lang);
                let params: BTreeMap<String, String> = templates::sms_template_params(view, lang);
                sms.send(&SmsMessage {
                    to: &row.recipient,
                    text: &r.sms,
                    lang,
                    params: &params,
                    idempotency_key: &key,
                })
                .await
            }
            "im" => {
                let r = templates::render(view, lang);
                self.channels
                    .im
                    .send(&ImMessage {
                        webhook_url: &row.recipient,
                        title: &r.subject,
                        markdown: &r.im_markdown,
                        mention_phones: &[],
                    })
                    .await
            }
            other => Err(DeliveryError::Permanent(format!("unknown channel {other}"))),
        }
    }

    async fn finish(
        &self,
        row: &Claimed,
        status: &str,
        provider: Option<(&str, Option<&str>)>,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let (p, pref) = provider.map(|(a, b)| (Some(a), b)).unwrap_or((None, None));
        tx.execute(
            "UPDATE outbox SET status = $2, lease_until = NULL, provider = $3, provider_ref = $4,
                    last_error = $5, sent_at = CASE WHEN $2 = 'sent' THEN now() ELSE sent_at END
             WHERE id = $1",
            &[&row.id, &status, &p, &pref, &error],
        )
        .await?;
        let entry = match status {
            "sent" => "delivered",
            "failed" => "delivery_failed",
            other => other,
        };
        crate::alerts::engine::timeline(
            &tx,
            row.alert_id,
            entry,
            None,
            Some(&row.channel),
            json!({"outbox_id": row.id, "role": row.role, "contact_id": row.contact_id,
                   "to": mask(&row.recipient, &row.channel), "attempt": row.attempts,
                   "provider": p, "error": error}),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn retry(&self, row: &Claimed, after: Duration, error: &str) -> Result<(), StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "UPDATE outbox SET status = 'pending', lease_until = NULL, last_error = $2,
                    next_attempt_at = now() + make_interval(secs => $3)
             WHERE id = $1 AND status = 'sending'",
            &[&row.id, &error, &after.as_secs_f64()],
        )
        .await?;
        crate::alerts::engine::timeline(
            &tx,
            row.alert_id,
            "delivery_retry",
            None,
            Some(&row.channel),
            json!({"outbox_id": row.id, "attempt": row.attempts, "error": error, "retry_in_s": after.as_secs_f64()}),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn defer(
        &self,
        row: &Claimed,
        until: DateTime<Utc>,
        why: &str,
    ) -> Result<(), StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "UPDATE outbox SET status = 'pending', lease_until = NULL, attempts = attempts - 1,
                    next_attempt_at = $2 WHERE id = $1",
            &[&row.id, &until],
        )
        .await?;
        crate::alerts::engine::timeline(
            &tx,
            row.alert_id,
            "deferred",
            None,
            Some(&row.channel),
            json!({"outbox_id": row.id, "until": until, "why": why}),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// A channel failed for good: try the contact's fallback channel once.
    async fn fall_back(&self, row: &Claimed) -> Result<(), StoreError> {
        let Some(contact) = row.contact_id else {
            return Ok(());
        };
        let Some(next) = self.settings.fallback.get(&row.channel) else {
            return Ok(());
        };
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        // One fallback per original notification: a fallback that fails too is final, or
        // two broken channels would bounce the message between them forever.
        let is_fallback: bool = tx
            .query_one(
                "SELECT fallback_of IS NOT NULL FROM outbox WHERE id = $1",
                &[&row.id],
            )
            .await?
            .get(0);
        if is_fallback {
            return Ok(());
        }
        let Some(c) = tx
            .query_opt(
                "SELECT phone, email, im_webhook FROM contacts WHERE id = $1",
                &[&contact],
            )
            .await?
        else {
            return Ok(());
        };
        let address: Option<String> = match next.as_str() {
            "sms" => c.get(0),
            "email" => c.get(1),
            _ => c.get(2),
        };
        let Some(address) = address.filter(|a| !a.is_empty()) else {
            crate::alerts::engine::timeline(&tx, row.alert_id, "no_fallback", None, Some(&row.channel),
                json!({"outbox_id": row.id, "fallback": next, "why": "contact has no address for it"})).await?;
            tx.commit().await?;
            return Ok(());
        };
        // One fallback per original row (the key), and never a fallback of a fallback chain
        // back to where it started.
        let key = format!("fb:{}:{next}", row.id);
        let n = tx
            .execute(
                "INSERT INTO outbox (alert_id, contact_id, role, channel, recipient, language, urgent, step, fallback_of, dedupe_key)
                 SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10
                 WHERE NOT EXISTS (SELECT 1 FROM outbox WHERE alert_id = $1 AND contact_id = $2 AND step = $8
                                                         AND channel = $4)
                 ON CONFLICT (dedupe_key) DO NOTHING",
                &[&row.alert_id, &contact, &row.role, next, &address, &row.language, &row.urgent, &row.step, &row.id, &key],
            )
            .await?;
        if n > 0 {
            crate::alerts::engine::timeline(
                &tx,
                row.alert_id,
                "fallback_queued",
                None,
                Some(next),
                json!({"outbox_id": row.id, "from": row.channel}),
            )
            .await?;
            tx.execute(
                "SELECT pg_notify('sg_outbox', $1)",
                &[&row.alert_id.to_string()],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// When `now` falls inside the local quiet-hours window ("22:00-07:00", may wrap midnight):
/// the instant the window ends. SMS wakes people; email and IM wait in an inbox anyway.
pub fn quiet_until(
    window: &str,
    utc_offset_hours: i32,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let (start, end) = parse_window(window)?;
    let local = now + TimeDelta::hours(utc_offset_hours as i64);
    let minute = local.hour() * 60 + local.minute();
    let inside = if start <= end {
        minute >= start && minute < end
    } else {
        minute >= start || minute < end
    };
    if !inside {
        return None;
    }
    let wait = (end as i64 - minute as i64).rem_euclid(24 * 60);
    let end_at = now + TimeDelta::minutes(wait) - TimeDelta::seconds(local.second() as i64);
    Some(end_at)
}

/// Exponential backoff: 1 s, 2 s, 4 s ... capped at 30 s for emergencies (SMTP back after a
/// minute means mail within half a minute of it) and 5 min otherwise.
pub fn backoff(attempt: i32, urgent: bool) -> Duration {
    let cap = if urgent { 30.0 } else { 300.0 };
    Duration::from_secs_f64((2f64.powi((attempt - 1).clamp(0, 16))).min(cap))
}

/// Recipients in the timeline: enough to tell people apart, not enough to leak them.
pub fn mask(recipient: &str, channel: &str) -> String {
    match channel {
        "sms" if recipient.len() > 7 => {
            format!(
                "{}****{}",
                &recipient[..3],
                &recipient[recipient.len() - 4..]
            )
        }
        "email" => match recipient.split_once('@') {
            Some((user, domain)) => format!("{}***@{domain}", user.chars().next().unwrap_or('*')),
            None => "***".into(),
        },
        "im" => "group robot".into(),
        _ => recipient.to_string(),
    }
}

fn describe_detail(detail: &serde_json::Value) -> Option<String> {
    let value = detail.get("value")?.as_f64()?;
    let secs = detail
        .get("sustained_s")
        .and_then(|v| v.as_i64())
        .unwrap_or(0);
    Some(format!("{value:.0} ({} min)", (secs + 59) / 60))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff(1, true), Duration::from_secs(1));
        assert_eq!(backoff(3, true), Duration::from_secs(4));
        assert_eq!(backoff(12, true), Duration::from_secs(30));
        assert_eq!(backoff(12, false), Duration::from_secs(300));
    }

    #[test]
    fn quiet_hours_wrap_midnight_in_local_time() {
        let at = |h: u32, m: u32| {
            // Local (UTC+8) time h:m on 2026-11-23.
            DateTime::<Utc>::from_naive_utc_and_offset(
                chrono::NaiveDate::from_ymd_opt(2026, 11, 23)
                    .and_then(|d| d.and_hms_opt(h, m, 0))
                    .unwrap(),
                Utc,
            ) - TimeDelta::hours(8)
        };
        assert_eq!(quiet_until("22:00-07:00", 8, at(21, 59)), None);
        assert_eq!(
            quiet_until("22:00-07:00", 8, at(22, 0)),
            Some(at(7, 0) + TimeDelta::days(1))
        );
        assert_eq!(quiet_until("22:00-07:00", 8, at(3, 30)), Some(at(7, 0)));
        assert_eq!(quiet_until("22:00-07:00", 8, at(7, 0)), None);
        assert_eq!(quiet_until("12:00-14:00", 8, at(13, 0)), Some(at(14, 0)));
    }

    #[test]
    fn masking() {
        assert_eq!(mask("13812345678", "sms"), "138****5678");
        assert_eq!(mask("wang@example.org", "email"), "w***@example.org");
    }
}
