//! The bench's stand-in SMS gateway: the service's generic webhook provider POSTs here.
//!
//! The instant a request has fully arrived is "the notification was accepted by the
//! provider", the end of the latency issue 3 bounds. The gateway is strict about the request
//! format (`to`, `text`, `lang`, `alert_params`, `idempotency_key`): a request it cannot use
//! is refused with 400, which the service treats as a permanent failure, so a format drift
//! shows up in the bench as lost SOS instead of passing unnoticed.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::BenchError;

/// What the gateway saw.
#[derive(Debug, Default)]
struct Received {
    /// Arrival instants by recipient phone (digits only), in arrival order.
    by_phone: HashMap<String, Vec<Instant>>,
    accepted: u64,
    refused: u64,
}

/// A running gateway; dropping it does not stop it, [`SmsGateway::stop`] does.
pub struct SmsGateway {
    addr: SocketAddr,
    received: Arc<Mutex<Received>>,
    stop: CancellationToken,
}

/// Digits only, without a leading `+86` / `0086`, so that the gateway matches however the
/// service formats the number it was given.
pub fn normalize_phone(raw: &str) -> String {
    let digits: String = raw.chars().filter(char::is_ascii_digit).collect();
    for prefix in ["0086", "86"] {
        if let Some(rest) = digits.strip_prefix(prefix) {
            if rest.len() == 11 && rest.starts_with('1') {
                return rest.to_string();
            }
        }
    }
    digits
}

/// Checks a webhook request body; returns the recipient or why it is unusable.
fn recipient(body: &[u8]) -> Result<String, String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    for field in ["to", "text", "lang", "idempotency_key"] {
        match v.get(field) {
            Some(serde_json::Value::String(s)) if !s.is_empty() => {}
            _ => return Err(format!("field {field:?} missing or not a non-empty string")),
        }
    }
    if v.get("alert_params").is_none() {
        return Err("field \"alert_params\" missing".into());
    }
    Ok(normalize_phone(v["to"].as_str().unwrap_or_default()))
}

impl SmsGateway {
    /// Binds 127.0.0.1 on a free port and serves `POST /sms` until stopped.
    ///
    /// The gateway runs on a thread and runtime of its own: on the runtime that publishes
    /// thousands of heartbeats a second, a request could wait behind publisher tasks before
    /// its arrival is recorded, and the bench would charge its own scheduling to the service.
    pub async fn start() -> Result<SmsGateway, BenchError> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .map_err(|e| BenchError::io("binding the stand-in SMS gateway", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| BenchError::io("configuring the SMS gateway's socket", e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| BenchError::io("reading the SMS gateway's address", e))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| BenchError::io("starting the SMS gateway's runtime", e))?;
        let received = Arc::new(Mutex::new(Received::default()));
        let app = Router::new()
            .route("/sms", post(sms))
            .with_state(received.clone());
        let stop = CancellationToken::new();
        let shutdown = stop.clone();
        let (up_tx, up_rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("bench-sms-gateway".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = up_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = up_tx.send(Ok(()));
                    let served = axum::serve(listener, app)
                        .with_graceful_shutdown(async move { shutdown.cancelled().await })
                        .await;
                    if let Err(e) = served {
                        tracing::warn!(error = %e, "stand-in SMS gateway stopped");
                    }
                })
            })
            .map_err(|e| BenchError::io("starting the SMS gateway's thread", e))?;
        match up_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(BenchError::io("starting the SMS gateway", e)),
            Err(_) => {
                return Err(BenchError::Service(
                    "the SMS gateway's thread ended at start".into(),
                ))
            }
        }
        Ok(SmsGateway {
            addr,
            received,
            stop,
        })
    }

    /// The URL to give the service as `notify.sms.url`.
    pub fn url(&self) -> String {
        format!("http://{}/sms", self.addr)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Received> {
        // A handler cannot panic while holding the lock; recover rather than abort anyway.
        self.received.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// When the first SMS to `phone` arrived, if one did.
    pub fn first_arrival(&self, phone: &str) -> Option<Instant> {
        self.lock()
            .by_phone
            .get(&normalize_phone(phone))
            .and_then(|v| v.first().copied())
    }

    /// Requests accepted, and SMS to phones in `expected` beyond the first one each (a repeat
    /// notification for one SOS), and requests refused.
    pub fn tally(&self, expected: &dyn Fn(&str) -> bool) -> GatewayTally {
        let r = self.lock();
        let mut tally = GatewayTally {
            accepted: r.accepted,
            refused: r.refused,
            ..GatewayTally::default()
        };
        for (phone, arrivals) in &r.by_phone {
            if expected(phone) {
                tally.repeats += arrivals.len().saturating_sub(1) as u64;
            } else {
                tally.unexpected += arrivals.len() as u64;
            }
        }
        tally
    }

    /// Requests accepted so far.
    pub fn accepted(&self) -> u64 {
        self.lock().accepted
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }
}

/// Counts of what the gateway received over the whole run.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct GatewayTally {
    /// Requests answered 200.
    pub accepted: u64,
    /// Requests refused with 400 (unusable format).
    pub refused: u64,
    /// More than one SMS for the same SOS recipient.
    pub repeats: u64,
    /// SMS to a phone no SOS was waiting for.
    pub unexpected: u64,
}

async fn sms(
    State(received): State<Arc<Mutex<Received>>>,
    body: Bytes,
) -> (StatusCode, Json<serde_json::Value>) {
    // The body is complete when the handler runs: this is the provider's acceptance.
    let at = Instant::now();
    let mut r = received.lock().unwrap_or_else(|e| e.into_inner());
    match recipient(&body) {
        Ok(phone) => {
            r.accepted += 1;
            let n = r.accepted;
            r.by_phone.entry(phone).or_default().push(at);
            (
                StatusCode::OK,
                Json(serde_json::json!({ "id": format!("bench-{n}") })),
            )
        }
        Err(why) => {
            r.refused += 1;
            tracing::warn!(%why, "stand-in SMS gateway refused a request");
            (
                StatusCode::BAD_REQUEST,
                Json(serde_json::json!({ "error": why })),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phones_are_normalized() {
        assert_eq!(normalize_phone("13900000001"), "13900000001");
        assert_eq!(normalize_phone("+86 139-0000-0001"), "13900000001");
        assert_eq!(normalize_phone("008613900000001"), "13900000001");
        assert_eq!(normalize_phone("+447700900123"), "447700900123");
    }

    #[test]
    fn webhook_bodies_are_checked() {
        let good = br#"{"to":"13900000001","text":"SOS","lang":"zh-CN","alert_params":{},"idempotency_key":"k1"}"#;
        assert_eq!(recipient(good).unwrap(), "13900000001");
        assert!(recipient(b"nope").is_err());
        let no_key = br#"{"to":"13900000001","text":"SOS","lang":"zh-CN","alert_params":{}}"#;
        assert!(recipient(no_key).unwrap_err().contains("idempotency_key"));
        let no_params = br#"{"to":"1","text":"SOS","lang":"en","idempotency_key":"k"}"#;
        assert!(recipient(no_params).unwrap_err().contains("alert_params"));
    }

    #[tokio::test]
    async fn records_arrivals_over_http() {
        let gw = SmsGateway::start().await.unwrap();
        let body = r#"{"to":"+8613900000007","text":"SOS","lang":"zh-CN","alert_params":{"a":1},"idempotency_key":"k"}"#;
        let resp = super::super::service::http_request(
            gw.addr,
            "POST",
            "/sms",
            Some(("application/json", body.as_bytes())),
            std::time::Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(resp.0, 200);
        assert!(resp.1.contains("bench-1"));
        assert!(gw.first_arrival("13900000007").is_some());
        assert!(gw.first_arrival("13900000008").is_none());
        let bad = super::super::service::http_request(
            gw.addr,
            "POST",
            "/sms",
            Some(("application/json", b"{}")),
            std::time::Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(bad.0, 400);
        let t = gw.tally(&|p| p == "13900000007");
        assert_eq!(
            (t.accepted, t.refused, t.repeats, t.unexpected),
            (1, 1, 0, 0)
        );
        gw.stop();
    }
}
