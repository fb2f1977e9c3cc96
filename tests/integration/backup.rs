//! Backup and restore with the stock tools (docs/deployment.md#backup-and-restore): a
//! `pg_dump -Fc` of a live database restores with `pg_restore` into an empty one that the
//! service accepts as up to date, with its rows, partitions, functions and triggers.

use std::process::Command;

use crate::helpers::*;

fn tool(name: &str, args: &[&str]) {
    let out = Command::new(name)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{name} (apt-get install postgresql-client): {e}"));
    assert!(
        out.status.success(),
        "{name} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_dump_restores_into_an_empty_database_that_the_service_accepts() {
    let source = TestDb::new().await;
    let broker = TestBroker::start().await;
    let device = unique("bk-");
    provision(&source, vec![device.clone()]).await;
    let app = RunningApp::start(settings(&source, &broker)).await;
    app.wait_ready().await;
    for seq in 1..=20u64 {
        let hb = firmware_sim::send::OneShot::Heartbeat(silverguard_proto::v1::Heartbeat {
            seq,
            measured_at_ms: chrono::Utc::now().timestamp_millis() - (20 - seq as i64) * 1000,
            heart_rate_bpm: 70,
            spo2_pct: 97,
            worn: true,
            battery_pct: 80,
            device_id: device.clone(),
            ..Default::default()
        });
        firmware_sim::send::send_one(
            &broker.url(),
            &device,
            &hb,
            1,
            std::time::Duration::from_secs(10),
        )
        .await
        .unwrap();
    }
    wait_for_count(
        &source,
        "SELECT count(*) FROM heartbeats",
        20,
        std::time::Duration::from_secs(10),
    )
    .await;
    source
        .client()
        .await
        .batch_execute(
            "INSERT INTO regions (parent_id, level, code, name) VALUES (NULL, 'city', 'c', 'City')",
        )
        .await
        .unwrap();

    // Dumped while the service runs: pg_dump takes a consistent snapshot.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("silverguard.dump");
    let file = file.to_str().unwrap();
    tool("pg_dump", &["-Fc", "-f", file, &source.url]);
    app.stop().await;

    let target = TestDb::new().await;
    tool(
        "pg_restore",
        &["--no-owner", "--exit-on-error", "-d", &target.url, file],
    );
    for table in ["heartbeats", "devices", "regions", "schema_migrations"] {
        assert_eq!(
            target.count(&format!("SELECT count(*) FROM {table}")).await,
            source.count(&format!("SELECT count(*) FROM {table}")).await,
            "{table}"
        );
    }
    // The restored database is up to date: migrate applies nothing, and it runs.
    let mut s = settings(&target, &broker);
    s.mqtt.client_id = unique("sgrestored-");
    let pool = silverguard::store::build_pool(&s.database).unwrap();
    assert!(silverguard::store::migrate::run(&pool)
        .await
        .unwrap()
        .is_empty());
    // Triggers and functions came along: the region path is computed on insert.
    let c = target.client().await;
    c.batch_execute(
        "INSERT INTO regions (parent_id, level, code, name)
         SELECT id, 'township', 't', 'T' FROM regions WHERE code = 'c'",
    )
    .await
    .unwrap();
    let path: String = c
        .query_one("SELECT path FROM regions WHERE code = 't'", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        path.starts_with('/') && path.matches('/').count() == 3,
        "{path}"
    );
    let app = RunningApp::start(s).await;
    app.wait_ready().await;
    app.stop().await;
}
