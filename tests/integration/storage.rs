//! Storage upkeep: heartbeat retention drops whole daily partitions past the configured age
//! and nothing younger.

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
