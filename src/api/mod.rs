//! HTTP: health, readiness, metrics and the acknowledge links; the REST API and console grow
//! here.

pub mod ack;
pub mod auth;
pub mod console;
pub mod problem;
pub mod query;
pub mod v1;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use deadpool_postgres::Pool;

use crate::metrics::Metrics;

#[derive(Clone)]
pub struct ApiState {
    pub pool: Pool,
    pub metrics: Metrics,
    /// MQTT connections this instance should hold; fewer means not ready.
    pub expected_mqtt_connections: i64,
    pub alerts: Arc<crate::alerts::settings::AlertSettings>,
    pub link_secret: Arc<Vec<u8>>,
    /// Failed-login counts, per username and client address.
    pub login_limiter: Arc<auth::LoginLimiter>,
    /// Mark cookies `Secure` (the console is served over HTTPS, directly or by a proxy).
    pub cookie_secure: bool,
    /// Reverse proxies whose `X-Forwarded-For` is believed (see [`auth::client_addr`]).
    pub trusted_proxies: Arc<Vec<std::net::IpAddr>>,
    /// The broker's dynamic-security admin, when configured (device credentials).
    pub broker_admin: Option<Arc<crate::store::credentials::BrokerAdmin>>,
    /// The console's live board feed (one LISTEN per process, fanned out to SSE streams).
    pub live: console::live::LiveHub,
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/ack/{token}", get(ack::show).post(ack::acknowledge))
        .merge(console::router())
        .nest("/api/v1", v1::router())
        .with_state(Arc::new(state))
}

/// Liveness: the process answers. Restarting for a database outage would not help.
async fn healthz() -> &'static str {
    "ok\n"
}

/// Readiness: the database answers and every MQTT connection is up.
async fn readyz(State(state): State<Arc<ApiState>>) -> impl IntoResponse {
    let db = tokio::time::timeout(Duration::from_secs(2), async {
        let client = state.pool.get().await.map_err(|e| e.to_string())?;
        client
            .simple_query("SELECT 1")
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(())
    })
    .await
    .unwrap_or_else(|_| Err("timed out".into()));
    let up = state.metrics.ingest.mqtt_connected.get();
    let mqtt_ok = up >= state.expected_mqtt_connections;
    let body = serde_json::json!({
        "database": match &db { Ok(()) => "ok".to_string(), Err(e) => e.clone() },
        "mqtt_connections_up": up,
        "mqtt_connections_expected": state.expected_mqtt_connections,
    });
    let code = if db.is_ok() && mqtt_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body))
}

async fn metrics(State(state): State<Arc<ApiState>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
}
