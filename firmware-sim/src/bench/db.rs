//! The bench database: created fresh for each run (`sg_bench_<random>`), counted, and
//! dropped at the end. The bench reads it only to count what the service committed and to
//! split each SOS's latency into stages; everything else goes through `silverguard` itself.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use tokio_postgres::{Client, NoTls};

use super::BenchError;

/// `base` (`postgres://user@host:port`, maybe with a query) with `db` as its database.
pub fn url_for(base: &str, db: &str) -> Result<String, BenchError> {
    let mut u = url::Url::parse(base)
        .map_err(|e| BenchError::Config(format!("--pg-base {base:?} is not a URL: {e}")))?;
    if !matches!(u.scheme(), "postgres" | "postgresql") {
        return Err(BenchError::Config(format!(
            "--pg-base {base:?} must start with postgres://"
        )));
    }
    u.set_path(&format!("/{db}"));
    Ok(u.to_string())
}

/// A random, valid, unquoted database name.
pub fn fresh_name() -> String {
    format!("sg_bench_{:08x}", rand::random::<u32>())
}

/// The error with its causes ("error connecting to server: Connection refused").
fn chain(e: &tokio_postgres::Error) -> String {
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

/// A plain connection to `url` (its driver task spawned).
pub async fn connect(url: &str) -> Result<Client, BenchError> {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(|e| BenchError::Db(format!("connecting to {}: {}", redact(url), chain(&e))))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "bench database connection ended");
        }
    });
    Ok(client)
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

fn db_err(what: &str) -> impl Fn(tokio_postgres::Error) -> BenchError + '_ {
    move |e| BenchError::Db(format!("{what}: {}", chain(&e)))
}

/// The server, through its maintenance database.
pub struct Server {
    admin: Client,
}

impl Server {
    pub async fn connect(base: &str) -> Result<Server, BenchError> {
        Ok(Server {
            admin: connect(&url_for(base, "postgres")?).await?,
        })
    }

    /// `SHOW server_version`.
    pub async fn version(&self) -> Option<String> {
        let row = self
            .admin
            .query_one("SHOW server_version", &[])
            .await
            .ok()?;
        row.try_get(0).ok()
    }

    /// The server settings that decide a write-heavy run's cost (docs/deployment.md,
    /// "PostgreSQL settings for a city's rate"), as `SHOW` prints them: a figure is only
    /// comparable with another taken under the same ones.
    pub async fn write_settings(&self) -> BTreeMap<String, String> {
        const NAMES: &[&str] = &[
            "autovacuum",
            "checkpoint_timeout",
            "fsync",
            "max_wal_size",
            "shared_buffers",
            "synchronous_commit",
            "wal_compression",
        ];
        let names: Vec<String> = NAMES.iter().map(|n| n.to_string()).collect();
        match self
            .admin
            .query(
                "SELECT name, current_setting(name) FROM pg_settings WHERE name = ANY($1)",
                &[&names],
            )
            .await
        {
            Ok(rows) => rows
                .iter()
                .filter_map(|r| Some((r.try_get(0).ok()?, r.try_get(1).ok()?)))
                .collect(),
            Err(_) => BTreeMap::new(),
        }
    }

    /// The CPUs the bench's own backend may run on, when the server runs on this machine
    /// (a backend inherits its list from the postmaster, so this is the server's layout).
    pub async fn local_backend_cpus(&self) -> Option<String> {
        let row = self
            .admin
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .ok()?;
        let pid: i32 = row.try_get(0).ok()?;
        let pid = u32::try_from(pid).ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        if comm.trim_end() != "postgres" {
            return None;
        }
        super::service::cpus_allowed(pid)
    }

    /// Creates `name`; fails if it exists (a bench never reuses a database).
    pub async fn create(&self, name: &str) -> Result<(), BenchError> {
        self.admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .map_err(db_err("creating the bench database"))
    }

    /// Drops `name`, closing whatever sessions are left (PostgreSQL 13+).
    pub async fn drop_db(&self, name: &str) -> Result<(), BenchError> {
        self.admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await
            .map_err(db_err("dropping the bench database"))
    }
}

/// When each stage of one SOS happened, on the database server's clock (the same machine as
/// the bench, so comparable with the bench's wall clock). Unix milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SosTrace {
    /// silverguard took the message from the broker (`device_events.received_at`).
    pub received_ms: f64,
    /// The alert and its outbox rows were written, just before commit (the timeline's
    /// `notified` entry, at `clock_timestamp()`).
    pub queued_ms: Option<f64>,
    /// The notifier started the successful SMS request (`delivery_attempts.at`, written
    /// after the request, minus its `duration_ms`).
    pub send_started_ms: Option<f64>,
}

/// The bench database.
pub struct BenchDb {
    pub client: Client,
}

/// What the heartbeats take on disk.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Storage {
    pub rows: u64,
    /// Every partition of `heartbeats` with its indexes and TOAST
    /// (`pg_total_relation_size` over `pg_partition_tree`).
    pub bytes: u64,
    pub bytes_per_row: Option<f64>,
}

/// The cluster's write-ahead log at one instant. WAL is what a replica receives and an archive
/// stores, so its volume per heartbeat sizes those links; it covers every database of the
/// cluster, like the CPU figures cover every `postgres` process (a dedicated machine).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WalPosition {
    /// Bytes of WAL inserted since the cluster began (`pg_current_wal_insert_lsn()`), exact.
    pub bytes: u64,
    /// Full-page images written so far (`pg_stat_wal.wal_fpi`): the first change to each page
    /// after a checkpoint logs the whole page. The statistics lag by up to a second.
    pub full_page_images: u64,
}

impl WalPosition {
    /// WAL bytes and full-page images per committed row between two positions.
    pub fn per_row(a: WalPosition, b: WalPosition, rows: u64) -> Option<(f64, f64)> {
        (rows > 0 && b.bytes >= a.bytes).then(|| {
            (
                (b.bytes - a.bytes) as f64 / rows as f64,
                b.full_page_images.saturating_sub(a.full_page_images) as f64 / rows as f64,
            )
        })
    }
}

/// What the run did to `device_latest`, the one row per device the service rewrites for every
/// device that reported (PostgreSQL's statistics, read at the end of the run).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct LatestTable {
    pub updates: u64,
    /// Updates that wrote no index entry (heap-only tuples).
    pub hot_updates: u64,
    pub hot_pct: Option<f64>,
    /// Heap and indexes.
    pub bytes: u64,
}

impl BenchDb {
    pub async fn connect(url: &str) -> Result<BenchDb, BenchError> {
        Ok(BenchDb {
            client: connect(url).await?,
        })
    }

    /// Heartbeat rows committed so far.
    pub async fn heartbeats(&self) -> Result<u64, BenchError> {
        let row = self
            .client
            .query_one("SELECT count(*) FROM heartbeats", &[])
            .await
            .map_err(db_err("counting heartbeats"))?;
        let n: i64 = row.try_get(0).map_err(db_err("counting heartbeats"))?;
        Ok(n.max(0) as u64)
    }

    /// Load devices (`bench-hb-…`) whose silence is not settled: a silence deadline passed
    /// more than `slack` ago that the service has not looked at yet (it would raise an alert
    /// or move the deadline), or a silence alert not yet resolved. Both use indexes of
    /// `device_latest` and `alerts`.
    pub async fn load_devices_unsettled(&self, slack: Duration) -> Result<u64, BenchError> {
        let row = self
            .client
            .query_one(
                "SELECT (SELECT count(*) FROM device_latest \
                         WHERE NOT silence_alerted AND silence_check_at < now() - $1::float8 * interval '1 second' \
                           AND device_id LIKE 'bench-hb-%') \
                      + (SELECT count(*) FROM alerts WHERE kind = 'device_silent' \
                         AND status <> 'resolved' AND subject LIKE 'bench-hb-%')",
                &[&slack.as_secs_f64()],
            )
            .await
            .map_err(db_err("counting unsettled devices"))?;
        let n: i64 = row
            .try_get(0)
            .map_err(db_err("counting unsettled devices"))?;
        Ok(n.max(0) as u64)
    }

    /// Polls the heartbeat count until it reaches `expected` or has not grown for `quiet`,
    /// at most `limit` in all; returns the last count.
    pub async fn wait_heartbeats_settled(
        &self,
        expected: u64,
        quiet: Duration,
        limit: Duration,
    ) -> Result<u64, BenchError> {
        let start = tokio::time::Instant::now();
        let mut last = self.heartbeats().await?;
        let mut last_change = tokio::time::Instant::now();
        while last < expected && start.elapsed() < limit && last_change.elapsed() < quiet {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let n = self.heartbeats().await?;
            if n != last {
                last = n;
                last_change = tokio::time::Instant::now();
            }
        }
        Ok(last)
    }

    /// Bytes the heartbeat table takes (all partitions, indexes included) for `rows` rows.
    /// Measured after a `CHECKPOINT`-free `VACUUM`-free run: what ingest left on disk.
    pub async fn storage(&self, rows: u64) -> Option<Storage> {
        let row = self
            .client
            .query_one(
                "SELECT coalesce(sum(pg_total_relation_size(relid)), 0)::int8 \
                 FROM pg_partition_tree('heartbeats')",
                &[],
            )
            .await
            .ok()?;
        let bytes: i64 = row.try_get(0).ok()?;
        let bytes = bytes.max(0) as u64;
        Some(Storage {
            rows,
            bytes,
            bytes_per_row: (rows > 0).then(|| bytes as f64 / rows as f64),
        })
    }

    /// Where the WAL stands now (`None` without the rights to read it, or on PostgreSQL < 14).
    pub async fn wal_position(&self) -> Option<WalPosition> {
        let row = self
            .client
            .query_one(
                "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::int8,
                        (SELECT wal_fpi FROM pg_stat_wal)::int8",
                &[],
            )
            .await
            .ok()?;
        let (bytes, fpi): (i64, i64) = (row.try_get(0).ok()?, row.try_get(1).ok()?);
        Some(WalPosition {
            bytes: bytes.max(0) as u64,
            full_page_images: fpi.max(0) as u64,
        })
    }

    /// Row updates of `device_latest` and how many were HOT. The statistics reach the view
    /// within about a second of each transaction; the run has drained by the time this is read.
    pub async fn latest_table(&self) -> Option<LatestTable> {
        let row = self
            .client
            .query_one(
                "SELECT coalesce(s.n_tup_upd, 0)::int8, coalesce(s.n_tup_hot_upd, 0)::int8,
                        pg_total_relation_size('device_latest')::int8
                   FROM pg_stat_user_tables s WHERE s.relname = 'device_latest'",
                &[],
            )
            .await
            .ok()?;
        let (updates, hot, bytes): (i64, i64, i64) = (
            row.try_get(0).ok()?,
            row.try_get(1).ok()?,
            row.try_get(2).ok()?,
        );
        let (updates, hot_updates) = (updates.max(0) as u64, hot.max(0) as u64);
        Some(LatestTable {
            updates,
            hot_updates,
            hot_pct: (updates > 0).then(|| hot_updates as f64 * 100.0 / updates as f64),
            bytes: bytes.max(0) as u64,
        })
    }

    /// Per SOS device: when silverguard received its SOS, when the alert's notifications
    /// were queued and when the SMS request started.
    pub async fn sos_traces(&self) -> Result<HashMap<String, SosTrace>, BenchError> {
        let rows = self
            .client
            .query(
                "SELECT e.device_id,
                        (extract(epoch FROM e.received_at) * 1000.0)::float8,
                        (SELECT (extract(epoch FROM min(t.at)) * 1000.0)::float8
                           FROM alert_timeline t
                          WHERE t.alert_id = a.id AND t.entry = 'notified'),
                        (SELECT (extract(epoch FROM d.at) * 1000.0 - d.duration_ms)::float8
                           FROM outbox o JOIN delivery_attempts d ON d.outbox_id = o.id
                          WHERE o.alert_id = a.id AND o.channel = 'sms' AND d.ok
                          ORDER BY d.id LIMIT 1)
                   FROM device_events e
                   LEFT JOIN alerts a ON a.source_event_id = e.id
                  WHERE e.kind = 'sos'",
                &[],
            )
            .await
            .map_err(db_err("reading SOS timings"))?;
        let mut out = HashMap::new();
        for r in rows {
            // The split is informative, not the verdict: a row that does not read is skipped.
            let (Ok(id), Ok(received)) = (r.try_get::<_, String>(0), r.try_get::<_, f64>(1)) else {
                continue;
            };
            let opt = |i: usize| r.try_get::<_, Option<f64>>(i).ok().flatten();
            out.insert(
                id,
                SosTrace {
                    received_ms: received,
                    queued_ms: opt(2),
                    send_started_ms: opt(3),
                },
            );
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::WalPosition;

    #[test]
    fn wal_per_row_divides_the_difference_and_refuses_nonsense() {
        let a = WalPosition {
            bytes: 1_000,
            full_page_images: 10,
        };
        let b = WalPosition {
            bytes: 5_000,
            full_page_images: 14,
        };
        assert_eq!(WalPosition::per_row(a, b, 10), Some((400.0, 0.4)));
        // No rows, or a position that went backwards (another cluster), gives nothing.
        assert_eq!(WalPosition::per_row(a, b, 0), None);
        assert_eq!(WalPosition::per_row(b, a, 10), None);
    }
}
