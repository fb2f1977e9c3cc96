//! PostgreSQL: the connection pool, embedded migrations, partition upkeep, and the device
//! registry queries the CLI and ingest share.
//!
//! Every "once across all instances" job takes a Postgres advisory lock, so N processes
//! sharing one database behave as one (DESIGN.md guarantee 5).

pub mod credentials;
pub mod devices;
pub mod migrate;
pub mod regions;
pub mod registry;

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

use crate::config::DatabaseSettings;

pub use deadpool_postgres::{Client, Pool as PgPool};

/// Advisory lock keys (one namespace; values are arbitrary but fixed forever).
pub mod locks {
    pub const MIGRATE: i64 = 0x5347_0001;
    pub const UPKEEP: i64 = 0x5347_0002;
    pub const REGISTRY: i64 = 0x5347_0100;
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {}", db_error_text(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("cannot build database pool: {0}")]
    Build(String),
    #[error("invalid database URL: {0}")]
    Url(String),
    #[error("stopped while waiting for the database")]
    Cancelled,
    #[error("migration {version} ({name}) was changed after it was applied (checksum {found} != {applied}); migrations are append-only")]
    MigrationEdited {
        version: i32,
        name: String,
        applied: String,
        found: String,
    },
    #[error("the database has migration {0}, which this build does not know: it is older than the schema")]
    SchemaTooNew(i32),
    #[error("{0}")]
    Invalid(String),
}

/// The server's own message and SQLSTATE when there is one: tokio-postgres displays every
/// server error as just "db error", which tells an operator nothing during an outage.
fn db_error_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

impl StoreError {
    /// True for errors worth retrying (connection trouble, server restart, serialization).
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Pool(_) => true,
            StoreError::Db(e) => match e.code() {
                None => true, // IO / closed connection
                Some(code) => {
                    let c = code.code();
                    // 08 connection, 40 serialization/deadlock, 53 resources, 57 admin shutdown
                    c.starts_with("08")
                        || c.starts_with("40")
                        || c.starts_with("53")
                        || c.starts_with("57")
                        || c == "25006" // read-only transaction (failover in progress)
                }
            },
            _ => false,
        }
    }
}

/// Where the database is, without credentials, for messages.
pub fn describe_url(url: &str) -> String {
    match url.parse::<tokio_postgres::Config>() {
        Ok(cfg) => {
            let host = cfg
                .get_hosts()
                .first()
                .map(|h| match h {
                    tokio_postgres::config::Host::Tcp(s) => s.clone(),
                    tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                })
                .unwrap_or_else(|| "localhost".into());
            let port = cfg.get_ports().first().copied().unwrap_or(5432);
            format!("{host}:{port}/{}", cfg.get_dbname().unwrap_or("postgres"))
        }
        Err(_) => "<invalid database URL>".into(),
    }
}

pub fn build_pool(settings: &DatabaseSettings) -> Result<Pool, StoreError> {
    let mut pg: tokio_postgres::Config = settings
        .url
        .expose()
        .parse()
        .map_err(|e: tokio_postgres::Error| StoreError::Url(e.to_string()))?;
    pg.connect_timeout(settings.connect_timeout);
    if pg.get_application_name().is_none() {
        pg.application_name("silverguard");
    }
    let mgr = Manager::from_config(
        pg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(mgr)
        .max_size(settings.pool_size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(settings.connect_timeout * 2))
        .create_timeout(Some(settings.connect_timeout))
        .build()
        .map_err(|e| StoreError::Build(e.to_string()))
}

/// Waits until the database answers (creating it when the server has none of that name),
/// retrying with capped exponential backoff and saying which database it waits for, so a
/// starting service never crash-loops on a late database.
pub async fn wait_for_database(
    pool: &Pool,
    url: &str,
    cancel: &CancellationToken,
) -> Result<(), StoreError> {
    let mut delay = Duration::from_millis(250);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let result = async {
            // A fresh machine may have the server but not our database yet: create it once
            // the server answers, then check the pool can use it.
            ensure_database(url).await?;
            let client = pool.get().await?;
            client.simple_query("SELECT 1").await?;
            Ok::<_, StoreError>(())
        }
        .await;
        match result {
            Ok(()) => {
                if attempt > 1 {
                    tracing::info!(database = %describe_url(url), attempt, "database reachable");
                }
                return Ok(());
            }
            Err(e) => {
                tracing::warn!(database = %describe_url(url), attempt, error = %e,
                    retry_in_ms = delay.as_millis() as u64, "database unreachable, retrying");
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return Err(StoreError::Cancelled),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// What one round of upkeep did.
#[derive(Debug, Default)]
pub struct Upkept {
    pub partitions_created: i32,
    /// Daily heartbeat partitions dropped by retention, oldest first.
    pub partitions_dropped: Vec<String>,
}

/// Partition upkeep, retention and reject trimming, done by whichever instance gets the lock.
/// `retention_days` 0 keeps heartbeats forever; otherwise a day's partition is dropped once
/// the whole day is older than that many days (dropping a partition is instant and leaves no
/// dead rows behind, unlike DELETE).
pub async fn upkeep(
    pool: &Pool,
    days_behind: u32,
    days_ahead: u32,
    rejects_keep_rows: i64,
    retention_days: u32,
) -> Result<Option<Upkept>, StoreError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let got: bool = tx
        .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&locks::UPKEEP])
        .await?
        .get(0);
    if !got {
        return Ok(None);
    }
    let mut done = Upkept::default();
    if retention_days > 0 {
        // Partitions are named heartbeats_pYYYYMMDD after their UTC day (0001_ingest.sql).
        let rows = tx
            .query(
                "SELECT c.relname
                   FROM pg_inherits i
                   JOIN pg_class c ON c.oid = i.inhrelid
                  WHERE i.inhparent = 'heartbeats'::regclass
                    AND c.relname ~ '^heartbeats_p[0-9]{8}$'
                    AND to_date(substr(c.relname, 13), 'YYYYMMDD')
                        < (now() AT TIME ZONE 'UTC')::date - $1::int
                  ORDER BY c.relname",
                &[&(retention_days as i32)],
            )
            .await?;
        for r in rows {
            let name: String = r.get(0);
            // The name matched the pattern above, so quoting is belt and braces.
            tx.batch_execute(&format!("DROP TABLE \"{}\"", name.replace('"', "")))
                .await?;
            done.partitions_dropped.push(name);
        }
    }
    done.partitions_created = tx
        .query_one(
            "SELECT sg_ensure_heartbeat_partitions($1, $2)",
            &[&(days_behind as i32), &(days_ahead as i32)],
        )
        .await?
        .get(0);
    tx.execute(
        "DELETE FROM ingest_rejects WHERE id <= (SELECT max(id) FROM ingest_rejects) - $1",
        &[&rejects_keep_rows],
    )
    .await?;
    tx.commit().await?;
    Ok(Some(done))
}

/// Creates the database named in the URL when it does not exist yet (connecting to the
/// `postgres` maintenance database to do so). Lets a fresh machine go from nothing to a
/// running service with one command.
pub async fn ensure_database(url: &str) -> Result<bool, StoreError> {
    let cfg: tokio_postgres::Config = url
        .parse()
        .map_err(|e: tokio_postgres::Error| StoreError::Url(e.to_string()))?;
    let Some(name) = cfg.get_dbname().map(str::to_string) else {
        return Ok(false);
    };
    match cfg.connect(NoTls).await {
        Ok(_) => return Ok(false),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::INVALID_CATALOG_NAME) => {}
        Err(e) => return Err(e.into()),
    }
    let mut admin = cfg.clone();
    admin.dbname("postgres");
    let (client, conn) = admin.connect(NoTls).await?;
    let driver = tokio::spawn(conn);
    let quoted = format!("\"{}\"", name.replace('"', "\"\""));
    let created = match client
        .batch_execute(&format!("CREATE DATABASE {quoted}"))
        .await
    {
        Ok(()) => true,
        // Another process created it in the meantime.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE) => false,
        Err(e) => return Err(e.into()),
    };
    drop(client);
    let _ = driver.await;
    if created {
        tracing::info!(database = %name, "created database");
    }
    Ok(created)
}

/// Wakes `notify` whenever a NOTIFY arrives on `channel`, on a dedicated connection that is
/// re-established after errors. Wakeups only shorten a poll: callers still poll, so a lost
/// notification costs latency, never correctness.
pub fn listen(
    url: String,
    channel: &'static str,
    notify: std::sync::Arc<tokio::sync::Notify>,
    cancel: CancellationToken,
) {
    use futures::StreamExt;
    tokio::spawn(async move {
        loop {
            let attempt = async {
                let cfg: tokio_postgres::Config = url
                    .parse()
                    .map_err(|e: tokio_postgres::Error| StoreError::Url(e.to_string()))?;
                let (client, mut connection) = cfg.connect(NoTls).await?;
                let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
                let sql = format!("LISTEN {channel}");
                {
                    let listen = client.batch_execute(&sql);
                    tokio::pin!(listen);
                    // Drive the connection while LISTEN runs, then keep reading notifications.
                    loop {
                        tokio::select! {
                            r = &mut listen => { r?; break; }
                            m = messages.next() => match m {
                                Some(Ok(_)) => {}
                                Some(Err(e)) => return Err(e.into()),
                                None => return Ok(()),
                            }
                        }
                    }
                }
                while let Some(m) = messages.next().await {
                    if let tokio_postgres::AsyncMessage::Notification(_) = m? {
                        notify.notify_one();
                    }
                }
                drop(client);
                Ok::<(), StoreError>(())
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = attempt => if let Err(e) = r {
                    tracing::debug!(channel, error = %e, "LISTEN connection lost; reconnecting");
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    });
}
