//! Ingest end to end: bracelets (firmware-sim) → a real Mosquitto → silverguard → PostgreSQL.

use std::time::Duration;

use firmware_sim::{FleetConfig, FleetReport, ScenarioMix};
use silverguard_proto::v1 as pb;
use silverguard_proto::Message;
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

fn fleet(broker: &TestBroker, prefix: &str, devices: usize, count: u64, mix: &str) -> FleetConfig {
    FleetConfig {
        mqtt_url: broker.url(),
        devices,
        id_prefix: prefix.to_string(),
        interval: Duration::from_millis(50),
        count: Some(count),
        scenarios: mix.parse::<ScenarioMix>().expect("scenario mix"),
        ..FleetConfig::default()
    }
}

async fn run(cfg: FleetConfig) -> FleetReport {
    let report = firmware_sim::run_fleet(cfg, CancellationToken::new(), None)
        .await
        .expect("fleet run");
    assert_eq!(
        report.unacked, 0,
        "the broker acknowledged everything: {report:?}"
    );
    report
}

fn events_total(r: &FleetReport) -> i64 {
    r.events_published.values().sum::<u64>() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_lands_exactly_once() {
    let db = TestDb::new().await;
    let broker = TestBroker::start().await;
    let app = RunningApp::start(settings(&db, &broker)).await;
    let prefix = unique("f");
    let cfg = fleet(
        &broker,
        &prefix,
        40,
        15,
        "normal=70,sos=10,fall=10,fall-then-cancel=10",
    );
    provision(&db, firmware_sim::device_ids(&cfg)).await;
    let reads = "silverguard_ingest_socket_reads_total";
    let reads_before = metric(app.http.port(), reads).await;
    let report = run(cfg).await;
    assert_eq!(report.heartbeats_published, 40 * 15);

    let hb = wait_for_count(
        &db,
        "SELECT count(*) FROM heartbeats",
        600,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(hb, report.heartbeats_published as i64);
    let ev = wait_for_count(
        &db,
        "SELECT count(*) FROM device_events",
        events_total(&report),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(ev, events_total(&report), "{report:?}");
    assert_eq!(
        db.count("SELECT count(*) FROM (SELECT DISTINCT device_id, seq FROM heartbeats) d")
            .await,
        hb,
        "no heartbeat stored twice"
    );
    assert_eq!(db.count("SELECT count(*) FROM ingest_rejects").await, 0);
    // Latest vitals and last-seen are kept per device without a write per message.
    wait_until(
        "device_current: the newest heartbeat of every device",
        Duration::from_secs(10),
        || async {
            db.count("SELECT count(*) FROM device_current WHERE last_hb_seq = 15")
                .await
                == 40
        },
    )
    .await;
    // Presence (online on connect, offline before a clean disconnect) is recorded.
    assert!(db.count("SELECT count(*) FROM device_presence").await >= 40);

    let (code, body) = http_get(&format!("http://{}/metrics", app.http))
        .await
        .expect("metrics");
    assert_eq!(code, 200);
    assert!(
        body.contains("silverguard_ingest_committed_total{kind=\"heartbeat\"} 600"),
        "{body}"
    );
    assert!(body.contains("silverguard_ingest_rejected_total{reason=\"malformed_protobuf\"} 0"));
    // The fleet's messages came in reads, and those are counted.
    let reads_after = metric(app.http.port(), reads).await;
    assert!(
        reads_after > reads_before,
        "{reads_before} -> {reads_after}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_rejected_and_good_messages_keep_flowing() {
    let db = TestDb::new().await;
    let broker = TestBroker::start().await;
    let app = RunningApp::start(settings(&db, &broker)).await;
    let prefix = unique("b");
    let cfg = fleet(&broker, &prefix, 12, 24, "normal=50,malformed=50");
    provision(&db, firmware_sim::device_ids(&cfg)).await;

    // A heartbeat from a clock three hours ahead: kept, with the receive time, flagged.
    let skewed_id = format!("{prefix}000000");
    let now_ms = chrono::Utc::now().timestamp_millis();
    let skewed = pb::Heartbeat {
        seq: 1_000_000,
        measured_at_ms: now_ms + 3 * 3600 * 1000,
        heart_rate_bpm: 70,
        worn: true,
        battery_pct: 50,
        ..Default::default()
    };
    publish_raw(
        &broker,
        &format!("sg/v1/dev/{skewed_id}/hb"),
        skewed.encode_to_vec(),
    )
    .await;
    // The same message again (a device resend): still one row.
    publish_raw(
        &broker,
        &format!("sg/v1/dev/{skewed_id}/hb"),
        skewed.encode_to_vec(),
    )
    .await;
    // An event of a kind this version does not know.
    let unknown_kind = pb::Event {
        seq: 1,
        occurred_at_ms: now_ms,
        kind: 77,
        ..Default::default()
    };
    publish_raw(
        &broker,
        &format!("sg/v1/dev/{skewed_id}/evt"),
        unknown_kind.encode_to_vec(),
    )
    .await;
    // A topic entirely outside the scheme.
    publish_raw(&broker, "sg/v9/whatever", b"x".to_vec()).await;

    let report = run(cfg).await;
    let bad = &report.bad_published;
    for class in [
        "malformed_protobuf",
        "oversized",
        "out_of_range",
        "device_id_mismatch",
        "unknown_device",
        "bad_topic",
    ] {
        assert!(
            bad.get(class).copied().unwrap_or(0) > 0,
            "the simulator sent {class}: {report:?}"
        );
    }
    let good = report.heartbeats_published as i64 + 1;
    let hb = wait_for_count(
        &db,
        "SELECT count(*) FROM heartbeats",
        good,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        hb, good,
        "every good heartbeat (and the skewed one, once) is stored"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM heartbeats WHERE clock_skewed AND device_ts > ts + interval '2 hours'").await,
        1
    );

    let expected_rejects: i64 = bad.values().sum::<u64>() as i64 + 2;
    let rejects = wait_for_count(
        &db,
        "SELECT count(*) FROM ingest_rejects",
        expected_rejects,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(rejects, expected_rejects);
    let client = db.client().await;
    for (class, n) in bad {
        let stored: i64 = client
            .query_one(
                "SELECT count(*) FROM ingest_rejects WHERE reason = $1",
                &[class],
            )
            .await
            .unwrap()
            .get(0);
        let extra = i64::from(class == "bad_topic"); // the sg/v9 publish
        assert_eq!(stored, *n as i64 + extra, "rejects for {class}");
    }
    assert_eq!(
        db.count("SELECT count(*) FROM ingest_rejects WHERE reason = 'unknown_event_kind'")
            .await,
        1
    );
    assert_eq!(
        db.count("SELECT count(*) FROM ingest_rejects WHERE octet_length(payload) = 0 AND payload_size > 0").await,
        0,
        "raw bytes are kept"
    );
    let (_, body) = http_get(&format!("http://{}/metrics", app.http))
        .await
        .expect("metrics");
    assert!(
        body.contains(&format!(
            "silverguard_ingest_rejected_total{{reason=\"oversized\"}} {}",
            bad["oversized"]
        )),
        "{body}"
    );
    assert!(
        body.contains("silverguard_ingest_clock_skewed_total 2"),
        "{body}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_mid_stream_loses_and_duplicates_nothing() {
    let db = TestDb::new().await;
    let mut broker = TestBroker::start().await;
    let client_id = unique("kill-");
    let prefix = unique("k");
    let cfg = FleetConfig {
        interval: Duration::from_millis(20),
        ..fleet(&broker, &prefix, 20, 150, "normal=90,sos=10")
    };
    provision(&db, firmware_sim::device_ids(&cfg)).await;
    let mut service = ServiceProcess::spawn(&db, &broker, &client_id);
    service.wait_ready().await;

    let fleet = tokio::spawn(run(cfg));
    wait_until("some rows committed", Duration::from_secs(30), || async {
        db.count("SELECT count(*) FROM heartbeats").await > 300
    })
    .await;
    service.kill9();
    let during_outage = db.count("SELECT count(*) FROM heartbeats").await;
    let report = fleet.await.expect("fleet task");
    assert!(
        during_outage < report.heartbeats_published as i64,
        "the kill happened mid-stream"
    );

    // Same client id: the broker kept the session and everything unacknowledged.
    let service = ServiceProcess::spawn(&db, &broker, &client_id);
    service.wait_ready().await;
    let expected = report.heartbeats_published as i64;
    let hb = wait_for_count(
        &db,
        "SELECT count(*) FROM heartbeats",
        expected,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(hb, expected, "every published heartbeat is stored");
    let ev = wait_for_count(
        &db,
        "SELECT count(*) FROM device_events",
        events_total(&report),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(ev, events_total(&report));
    // Redelivered messages (committed but not acknowledged at the kill) made no second row.
    assert_eq!(
        db.count("SELECT count(*) FROM (SELECT DISTINCT device_id, seq FROM heartbeats) d")
            .await,
        expected
    );
    drop(service);
    broker.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_broker_is_reconnected_without_help() {
    let db = TestDb::new().await;
    let mut broker = TestBroker::start().await;
    let app = RunningApp::start(settings(&db, &broker)).await;
    let prefix = unique("r");
    let cfg = fleet(&broker, &prefix, 10, 100, "normal");
    provision(&db, firmware_sim::device_ids(&cfg)).await;
    let fleet = tokio::spawn(run(cfg));
    wait_until("some rows committed", Duration::from_secs(30), || async {
        db.count("SELECT count(*) FROM heartbeats").await > 100
    })
    .await;
    broker.restart().await;
    let report = fleet.await.expect("fleet task");
    assert!(
        report.reconnects > 0,
        "the bracelets saw the restart: {report:?}"
    );
    let expected = report.heartbeats_published as i64;
    let hb = wait_for_count(
        &db,
        "SELECT count(*) FROM heartbeats",
        expected,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(hb, expected);
    app.wait_ready().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_migrating_at_once_both_succeed() {
    let db = TestDb::new().await;
    let mut s = silverguard::config::Settings::default();
    s.database.url = silverguard::config::Secret::new(db.url.clone());
    let a = silverguard::store::build_pool(&s.database).unwrap();
    let b = silverguard::store::build_pool(&s.database).unwrap();
    let (ra, rb) = tokio::join!(
        silverguard::store::migrate::run(&a),
        silverguard::store::migrate::run(&b)
    );
    let (ra, rb) = (ra.expect("first"), rb.expect("second"));
    assert_eq!(
        ra.len() + rb.len(),
        silverguard::store::migrate::MIGRATIONS.len()
    );
    assert!(
        silverguard::store::migrate::run(&a)
            .await
            .unwrap()
            .is_empty(),
        "idempotent"
    );
}

/// Publishes one message at QoS 1 and waits for the broker's PUBACK.
async fn publish_raw(broker: &TestBroker, topic: &str, payload: Vec<u8>) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
    let mut opts = MqttOptions::new(unique("raw-"), "127.0.0.1", broker.port);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut el) = AsyncClient::new(opts, 10);
    client
        .publish(topic, QoS::AtLeastOnce, false, payload)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => break,
                Ok(Event::Outgoing(Outgoing::Publish(_))) | Ok(_) => {}
                Err(e) => panic!("raw publish: {e}"),
            }
        }
    })
    .await
    .expect("puback");
    let _ = client.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_in_a_shared_group_split_the_stream_without_duplicates() {
    let db = TestDb::new().await;
    let broker = TestBroker::start().await;
    let group = unique("g");
    let mut a = settings(&db, &broker);
    a.mqtt.shared_group = group.clone();
    let mut b = settings(&db, &broker);
    b.mqtt.shared_group = group;
    let (a, b) = (RunningApp::start(a).await, RunningApp::start(b).await);
    let prefix = unique("s");
    let cfg = fleet(&broker, &prefix, 20, 30, "normal=90,sos=10");
    provision(&db, firmware_sim::device_ids(&cfg)).await;
    let report = run(cfg).await;
    let expected = report.heartbeats_published as i64;
    let hb = wait_for_count(
        &db,
        "SELECT count(*) FROM heartbeats",
        expected,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(hb, expected);
    let ev = wait_for_count(
        &db,
        "SELECT count(*) FROM device_events",
        events_total(&report),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(ev, events_total(&report));
    // Both instances did part of the work.
    for app in [&a, &b] {
        let (_, body) = http_get(&format!("http://{}/metrics", app.http))
            .await
            .expect("metrics");
        let line = body
            .lines()
            .find(|l| l.starts_with("silverguard_ingest_committed_total{kind=\"heartbeat\"}"))
            .expect("committed line");
        let n: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .expect("value");
        assert!(n > 0.0, "each instance committed some heartbeats: {line}");
    }
    a.stop().await;
    b.stop().await;
}
