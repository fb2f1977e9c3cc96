//! Storage upkeep: heartbeat retention drops whole daily partitions past the configured age
//! and nothing younger; the `device_latest` flush writes every pending device.

use std::time::Duration;

use crate::helpers::*;

#[tokio::test]
async fn retention_drops_partitions_past_their_age_and_keeps_the_rest() {
    let db = TestDb::new().await;
    let mut s = silverguard::config::Settings::default();
    s.database.url = silverguard::config::Secret::new(db.url.clone());
    silverguard::store::ensure_database(&db.url).await.unwrap();
    let pool = silverguard::store::build_pool(&s.database).unwrap();
    silverguard::store::migrate::run(&pool).await.unwrap();
    let c = db.client().await;
    // Partitions for the last 20 days, and a heartbeat 15 days and 1 day old.
    c.query_one("SELECT sg_ensure_heartbeat_partitions(20, 2)", &[])
        .await
        .unwrap();
    c.batch_execute(
        "INSERT INTO heartbeats (device_id, ts, seq, received_at, worn)
         VALUES ('old', now() - interval '15 days', 1, now(), true),
                ('new', now() - interval '1 day', 1, now(), true)",
    )
    .await
    .unwrap();
    let partitions = "SELECT count(*) FROM pg_inherits WHERE inhparent = 'heartbeats'::regclass \
                      AND inhrelid::regclass::text ~ '^heartbeats_p'";
    let before = db.count(partitions).await;
    assert!(before >= 22, "{before} partitions");

    // Retention 0 keeps everything.
    let kept = silverguard::store::upkeep(&pool, 8, 2, 1000, 0)
        .await
        .unwrap()
        .unwrap();
    assert!(kept.partitions_dropped.is_empty());

    let done = silverguard::store::upkeep(&pool, 8, 2, 1000, 10)
        .await
        .unwrap()
        .expect("the upkeep lock is free");
    // Days -20 .. -11 go (10 or 11 partitions, depending on the hour of the UTC day).
    assert!(
        (10..=11).contains(&done.partitions_dropped.len()),
        "{:?}",
        done.partitions_dropped
    );
    assert_eq!(
        db.count(partitions).await,
        before - done.partitions_dropped.len() as i64
    );
    assert_eq!(
        db.count("SELECT count(*) FROM heartbeats WHERE device_id = 'old'")
            .await,
        0
    );
    assert_eq!(
        db.count("SELECT count(*) FROM heartbeats WHERE device_id = 'new'")
            .await,
        1
    );
    // A second round finds nothing more to drop.
    let again = silverguard::store::upkeep(&pool, 8, 2, 1000, 10)
        .await
        .unwrap()
        .unwrap();
    assert!(again.partitions_dropped.is_empty());
}

/// A flush bigger than one statement's chunk (2,000 devices) writes every device, and the
/// newest value wins for a device seen twice.
#[tokio::test]
async fn device_latest_flush_of_many_devices_writes_them_all_in_chunks() {
    use silverguard::ingest::writer::{run_latest_tracker, LatestUpdate};
    let db = TestDb::new().await;
    let ids: Vec<String> = (0..4_500).map(|i| format!("lt-{i:05}")).collect();
    provision(&db, ids.clone()).await;
    let mut s = silverguard::config::Settings::default();
    s.database.url = silverguard::config::Secret::new(db.url.clone());
    let pool = silverguard::store::build_pool(&s.database).unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    // A long interval: the only flush is the final one, with every device pending at once.
    let tracker = tokio::spawn(run_latest_tracker(
        rx,
        pool.clone(),
        Duration::from_secs(3600),
        Duration::from_secs(300),
        3,
    ));
    let t0 = chrono::Utc::now() - chrono::Duration::minutes(5);
    let seen = |minutes: i64| -> Vec<LatestUpdate> {
        ids.iter()
            .map(|id| LatestUpdate::Seen {
                device_id: id.clone(),
                at: t0 + chrono::Duration::minutes(minutes),
            })
            .collect()
    };
    tx.send(seen(2)).await.unwrap();
    tx.send(seen(1)).await.unwrap(); // older: must not win
    drop(tx);
    tokio::time::timeout(Duration::from_secs(60), tracker)
        .await
        .expect("the tracker flushed and stopped")
        .unwrap();
    assert_eq!(
        db.count("SELECT count(*) FROM device_latest WHERE device_id LIKE 'lt-%'")
            .await,
        4_500
    );
    let newest = db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM device_latest WHERE device_id LIKE 'lt-%' AND last_seen_at = $1",
            &[&(t0 + chrono::Duration::minutes(2))],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(newest, 4_500);
    pool.close();
}
