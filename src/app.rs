//! `silverguard serve`: wires the stages together and runs them until a shutdown signal.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::ingest::Pipeline;
use crate::metrics::Metrics;
use crate::store;

/// Committed heartbeat batches waiting for the telemetry rules.
const RULES_QUEUE_BATCHES: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot listen on http.addr {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Ingest(#[from] crate::ingest::IngestError),
    #[error(transparent)]
    Channel(#[from] crate::notify::channels::ChannelConfigError),
    #[error(transparent)]
    Mqtt(#[from] crate::ingest::mqtt::MqttConfigError),
}

pub struct Application {
    listener: TcpListener,
    settings: Settings,
    metrics: Metrics,
    pool: store::PgPool,
    /// Cancelled by the caller (signal handler, test) to begin a graceful shutdown.
    shutdown: CancellationToken,
}

impl Application {
    /// Binds the HTTP port (port 0 picks a free one, for tests), waits for the database,
    /// creates it if missing and migrates it.
    pub async fn build(settings: Settings) -> Result<Application, AppError> {
        let listener = TcpListener::bind(&settings.http.addr)
            .await
            .map_err(|source| AppError::Bind {
                addr: settings.http.addr.clone(),
                source,
            })?;
        let shutdown = CancellationToken::new();
        let url = settings.database.url.expose().to_string();
        let pool = store::build_pool(&settings.database)?;
        store::wait_for_database(&pool, &url, &shutdown).await?;
        let applied = store::migrate::run(&pool).await?;
        if !applied.is_empty() {
            tracing::info!(?applied, "migrations applied");
        }
        Ok(Application {
            listener,
            settings,
            metrics: Metrics::new(),
            pool,
            shutdown,
        })
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    pub fn metrics(&self) -> Metrics {
        self.metrics.clone()
    }

    /// Runs until the shutdown token is cancelled, then stops gracefully.
    pub async fn run_until_stopped(self) -> Result<(), AppError> {
        let Application {
            listener,
            settings,
            metrics,
            pool,
            shutdown,
        } = self;
        let upkeep_cancel = CancellationToken::new();
        let upkeep = tokio::spawn(run_upkeep(
            pool.clone(),
            settings.clone(),
            upkeep_cancel.clone(),
        ));
        // Partitions must exist before the first COPY; do one round now.
        upkeep_once(&pool, &settings).await;

        // Alerts: telemetry rules fed by committed heartbeats, and the sweeper.
        let alerts_cancel = CancellationToken::new();
        // Counted in committed batches (up to ingest.batch_max_rows heartbeats each). Kept
        // small so that rules falling behind slow the writers down (acks are held, the broker
        // queues) instead of holding copies of minutes of heartbeats in memory.
        let (rules_tx, rules_rx) = tokio::sync::mpsc::channel(RULES_QUEUE_BATCHES);
        let rules = tokio::spawn(crate::alerts::run_telemetry_rules(
            rules_rx,
            pool.clone(),
            settings.alerts.clone(),
            alerts_cancel.clone(),
        ));
        let sweeper = tokio::spawn(crate::alerts::run_sweeper(
            pool.clone(),
            settings.alerts.clone(),
            settings.ingest.max_clock_ahead,
            metrics.silence.clone(),
            alerts_cancel.clone(),
        ));

        // Notify: the outbox workers and their channels.
        let link_secret = std::sync::Arc::new(
            crate::notify::links::link_secret(&pool, settings.alerts.link_secret.expose()).await?,
        );
        let notify_cancel = CancellationToken::new();
        let channels = crate::notify::outbox::Channels {
            email: crate::notify::channels::email_sender(&settings.notify.email)?,
            sms: crate::notify::channels::sms_gateway(&settings.notify.sms)?,
            im: crate::notify::channels::im_sender(&settings.notify.im),
            downlink: Some(crate::notify::downlink::Downlink::start(
                &settings.mqtt,
                notify_cancel.clone(),
            )?),
        };
        let wake = std::sync::Arc::new(tokio::sync::Notify::new());
        store::listen(
            settings.database.url.expose().to_string(),
            "sg_outbox",
            wake.clone(),
            notify_cancel.clone(),
        );
        let notifier = crate::notify::outbox::Notifier {
            claimer: crate::notify::outbox::Claimer::start(&settings.mqtt.client_id),
            pool: pool.clone(),
            settings: std::sync::Arc::new(settings.alerts.clone()),
            channels,
            link_secret: link_secret.clone(),
            metrics: metrics.notify.clone(),
        };
        let notifier_task = tokio::spawn(notifier.run(wake, notify_cancel.clone()));

        let pipeline = Pipeline::start(
            &settings,
            pool.clone(),
            metrics.ingest.clone(),
            Some(rules_tx),
        )
        .await?;

        // The console's live board: one LISTEN on alert changes for this process.
        let live =
            crate::api::console::live::LiveHub::start(settings.database.url.expose().to_string());
        // Device credentials need the broker's admin account; without one the API says so.
        let broker_admin = if settings.broker_admin.username.is_empty() {
            None
        } else {
            match crate::store::credentials::BrokerAdmin::from_settings(
                &settings.broker_admin,
                &settings.mqtt,
            ) {
                Ok(a) => Some(std::sync::Arc::new(a)),
                Err(e) => {
                    tracing::error!(error = %e, "broker_admin settings unusable; device credentials disabled");
                    None
                }
            }
        };
        let api = crate::api::router(crate::api::ApiState {
            pool: pool.clone(),
            metrics: metrics.clone(),
            expected_mqtt_connections: settings.mqtt.connections as i64,
            alerts: std::sync::Arc::new(settings.alerts.clone()),
            link_secret,
            login_limiter: std::sync::Arc::new(crate::api::auth::LoginLimiter::default()),
            cookie_secure: settings.http.cookie_secure,
            trusted_proxies: std::sync::Arc::new(settings.http.trusted_proxies.clone()),
            live: live.clone(),
            broker_admin,
        });
        let http_shutdown = CancellationToken::new();
        let http = {
            let token = http_shutdown.clone();
            tokio::spawn(async move {
                axum::serve(
                    listener,
                    // The peer address keys the console's login rate limit.
                    api.into_make_service_with_connect_info::<SocketAddr>(),
                )
                .with_graceful_shutdown(async move { token.cancelled().await })
                .await
            })
        };
        tracing::info!(http = %settings.http.addr, "silverguard serving");

        shutdown.cancelled().await;
        tracing::info!("shutdown requested");
        pipeline.shutdown().await;
        // The pipeline is gone, so the rules' input closes and they finish what they have.
        if tokio::time::timeout(Duration::from_secs(10), rules)
            .await
            .is_err()
        {
            tracing::warn!("telemetry rules did not finish within 10 s; stopping without them");
        }
        alerts_cancel.cancel();
        let _ = sweeper.await;
        tracing::info!("alert stage stopped");
        // Deliveries in progress finish; what is left stays in the outbox for the next start.
        notify_cancel.cancel();
        if tokio::time::timeout(Duration::from_secs(10), notifier_task)
            .await
            .is_err()
        {
            tracing::warn!(
                "deliveries in progress did not finish within 10 s; they stay in the outbox"
            );
        } else {
            tracing::info!("notifier stopped");
        }
        upkeep_cancel.cancel();
        let _ = upkeep.await;
        // Open board streams end now, or graceful shutdown would wait on them.
        live.stop();
        http_shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), http).await;
        pool.close();
        tracing::info!("silverguard stopped");
        Ok(())
    }
}

async fn upkeep_once(pool: &store::PgPool, settings: &Settings) {
    let behind = (settings.ingest.max_clock_behind.as_secs() / 86_400) as u32 + 1;
    match store::upkeep(
        pool,
        behind,
        settings.storage.partitions_ahead_days,
        settings.ingest.rejects_keep_rows,
        settings.storage.heartbeat_retention_days,
    )
    .await
    {
        Ok(Some(done)) => {
            if done.partitions_created > 0 {
                tracing::info!(
                    created = done.partitions_created,
                    "heartbeat partitions created"
                );
            }
            if !done.partitions_dropped.is_empty() {
                tracing::info!(
                    dropped = ?done.partitions_dropped,
                    retention_days = settings.storage.heartbeat_retention_days,
                    "heartbeat partitions past retention dropped"
                );
            }
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "storage upkeep failed; will retry"),
    }
}

async fn run_upkeep(pool: store::PgPool, settings: Settings, cancel: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(settings.storage.upkeep_interval) => {}
            _ = cancel.cancelled() => return,
        }
        upkeep_once(&pool, &settings).await;
    }
}
