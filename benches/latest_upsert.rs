//! The `device_latest` flush against a real PostgreSQL, before and after migration 0006
//! (issue 5: the largest share of PostgreSQL's CPU per heartbeat in the benchmark).
//!
//! `cargo bench --bench latest_upsert [-- DEVICES ROUNDS]` (default 100,000 and 20). It
//! creates a database `sg_latest_bench_<pid>` on `SILVERGUARD_TEST_PG_BASE` (default
//! `postgres://postgres@127.0.0.1:5432`), migrates it, provisions the devices (heartbeat every
//! 2 s, as `bracelet-sim bench` does at 50,000 hb/s), and for each layout:
//!
//! * writes every device once (inserts, not timed);
//! * then times `ROUNDS` flushes of half the fleet each through the service's own flush
//!   ([`silverguard::ingest::writer::flush_updates`]: chunks of 2,000 devices, one
//!   `INSERT ... ON CONFLICT DO UPDATE` each), every device's report about 2 s newer than its last;
//! * reports rows/s, microseconds per row, the share of HOT updates (no index entry
//!   written), the table's size with its indexes and the WAL written per row (each layout
//!   starts right after a checkpoint, so each pays its own full-page images).
//!
//! Layouts: **before** is the index of migration 0003, on `silent_after`, a column every
//! update changes, at fillfactor 100; **after** is migration 0006, the index on the lazily
//! moved `silence_check_at`, at fillfactor 50. The statement is the same in both (the extra
//! column costs nothing measurable), so the difference is what the index layout does to
//! every update. The two run one after the other in one process; compare their ratio, not
//! the absolute rates, across machines. The database is dropped at the end.

use chrono::{DateTime, TimeDelta, Utc};
use silverguard::config::DatabaseSettings;
use silverguard::ingest::validate::Heartbeat;
use silverguard::ingest::writer::{flush_updates, LatestUpdate};
use std::time::{Duration, Instant};

const SILENCE_FACTOR: u32 = 15;

fn updates(devices: &[String], half: Option<usize>, at: DateTime<Utc>) -> Vec<LatestUpdate> {
    devices
        .iter()
        .enumerate()
        .filter(|(i, _)| half.is_none_or(|h| i % 2 == h))
        .map(|(i, id)| {
            LatestUpdate::Heartbeat(Box::new(Heartbeat {
                device_id: id.clone(),
                seq: at.timestamp(),
                ts: at,
                received_at: at,
                heart_rate_bpm: Some(60 + (i % 40) as i16),
                spo2_pct: Some(97),
                systolic_mmhg: Some(120),
                diastolic_mmhg: Some(80),
                skin_temp_dc: Some(365),
                steps_today: Some(at.timestamp() as i32 % 10_000),
                battery_pct: Some(80),
                worn: true,
                location: None,
                clock_skewed: false,
                device_ts: None,
            }))
        })
        .collect()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; the numbers after it are ours.
    let args: Vec<usize> = std::env::args().filter_map(|a| a.parse().ok()).collect();
    let devices_n = args.first().copied().unwrap_or(100_000);
    let rounds = args.get(1).copied().unwrap_or(20).max(1);
    let base = std::env::var("SILVERGUARD_TEST_PG_BASE")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let name = format!("sg_latest_bench_{}", std::process::id());
    let (admin, conn) =
        tokio_postgres::connect(&format!("{base}/postgres"), tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await?;
    let result = run(&base, &name, devices_n, rounds).await;
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await?;
    result
}

async fn run(base: &str, name: &str, devices_n: usize, rounds: usize) -> anyhow::Result<()> {
    let settings = DatabaseSettings {
        url: silverguard::config::Secret::new(format!("{base}/{name}")),
        pool_size: 2,
        connect_timeout: Duration::from_secs(5),
    };
    let pool = silverguard::store::build_pool(&settings)?;
    silverguard::store::migrate::run(&pool).await?;
    let client = pool.get().await?;
    client
        .execute(
            "INSERT INTO devices (device_id, heartbeat_interval_s)
             SELECT 'd' || lpad(i::text, 7, '0'), 2 FROM generate_series(1, $1::int) i",
            &[&(devices_n as i32)],
        )
        .await?;
    let devices: Vec<String> = (1..=devices_n).map(|i| format!("d{i:07}")).collect();
    println!(
        "device_latest flush: {devices_n} devices, {rounds} flushes of half the fleet each, \
         chunks of 2,000"
    );
    for layout in ["before", "after"] {
        client
            .batch_execute(match layout {
                "before" => {
                    "TRUNCATE device_latest;
                     DROP INDEX IF EXISTS device_latest_silence_check;
                     CREATE INDEX device_latest_silent_after ON device_latest (silent_after)
                       WHERE NOT silence_alerted;
                     ALTER TABLE device_latest SET (fillfactor = 100);"
                }
                _ => {
                    "TRUNCATE device_latest;
                     DROP INDEX IF EXISTS device_latest_silent_after;
                     CREATE INDEX device_latest_silence_check ON device_latest (silence_check_at)
                       WHERE NOT silence_alerted;
                     ALTER TABLE device_latest SET (fillfactor = 50);"
                }
            })
            .await?;
        let t0 = Utc::now() - TimeDelta::hours(1);
        let left = flush_updates(&pool, updates(&devices, None, t0), SILENCE_FACTOR).await;
        anyhow::ensure!(left == 0, "the first flush left {left} devices unwritten");
        // A checkpoint first, so both layouts log their full-page images from the same start.
        // Two calls: a multi-statement string runs as one transaction, which VACUUM refuses.
        client.batch_execute("VACUUM ANALYZE device_latest").await?;
        client.batch_execute("CHECKPOINT").await?;
        let before = hot_counters(&client).await?;
        let wal_before = wal_bytes(&client).await?;
        let started = Instant::now();
        for r in 0..rounds {
            let at = t0 + TimeDelta::seconds(1 + r as i64);
            let left =
                flush_updates(&pool, updates(&devices, Some(r % 2), at), SILENCE_FACTOR).await;
            anyhow::ensure!(left == 0, "flush {r} left {left} devices unwritten");
        }
        let secs = started.elapsed().as_secs_f64();
        let wal = wal_bytes(&client).await? - wal_before;
        // The flushes ran on the pool's other connection, whose statistics reach the view
        // when that backend goes idle (up to 10 s later): wait for all of them.
        let rows = rounds * (devices_n / 2);
        let after = wait_counters(&client, before, rows).await?;
        let rows = rows as f64;
        let updated = (after.0 - before.0) as f64;
        let hot = (after.1 - before.1) as f64;
        let size: i64 = client
            .query_one("SELECT pg_total_relation_size('device_latest')", &[])
            .await?
            .get(0);
        println!(
            "  {layout:<6} {:>9.0} rows/s  {:>5.1} us/row  HOT {:>3.0} % of {updated:.0} updates  \
             table {:.1} MiB with indexes  WAL {:.0} bytes/row",
            rows / secs,
            secs * 1e6 / rows,
            if updated > 0.0 {
                hot * 100.0 / updated
            } else {
                0.0
            },
            size as f64 / 1_048_576.0,
            wal as f64 / rows
        );
    }
    Ok(())
}

/// WAL inserted so far by the cluster; nothing else writes during the bench on a quiet machine.
async fn wal_bytes(c: &tokio_postgres::Client) -> anyhow::Result<i64> {
    Ok(c.query_one(
        "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::int8",
        &[],
    )
    .await?
    .get(0))
}

async fn hot_counters(c: &tokio_postgres::Client) -> anyhow::Result<(i64, i64)> {
    let r = c
        .query_one(
            "SELECT coalesce(n_tup_upd, 0), coalesce(n_tup_hot_upd, 0)
               FROM pg_stat_user_tables WHERE relname = 'device_latest'",
            &[],
        )
        .await?;
    Ok((r.get(0), r.get(1)))
}

/// The statistics view lags the writes by up to 10 s; poll until it shows them all.
async fn wait_counters(
    c: &tokio_postgres::Client,
    before: (i64, i64),
    expected: usize,
) -> anyhow::Result<(i64, i64)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = hot_counters(c).await?;
        if now.0 - before.0 >= expected as i64 {
            return Ok(now);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the statistics show {} of {expected} updates after 30 s",
            now.0 - before.0
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
