//! Care work: a service call from the bracelet becomes one work order that runs its course;
//! visits and calls make weekly compliance, per elder and rolled up per region, in scope.

use std::time::Duration;

use chrono::Utc;
use firmware_sim::send::{send_one, OneShot};
use silverguard::api::auth::{self, NewUser, UserRole};
use silverguard::care::{self, CareContactKind, CareError, NewCareContact, WorkOrderStatus};
use silverguard_proto::v1 as pb;

use crate::helpers::*;

/// city > township > community > grids g1, g2; one elder in each grid; a grid worker for g1
/// and a supervisor of the township. Returns (pool, [elder g1, elder g2], grid worker id,
/// supervisor id).
async fn community(db: &TestDb) -> (deadpool_postgres::Pool, [i64; 2], i64, i64) {
    let s = settings_for(db);
    silverguard::store::ensure_database(&db.url).await.unwrap();
    let pool = silverguard::store::build_pool(&s.database).unwrap();
    silverguard::store::migrate::run(&pool).await.unwrap();
    let c = pool.get().await.unwrap();
    c.batch_execute(
        "INSERT INTO regions (parent_id, level, code, name) VALUES (NULL, 'city', 'hz', '杭州市');
         INSERT INTO regions (parent_id, level, code, name)
              SELECT id, 'township', 'xh', '西湖区' FROM regions WHERE code = 'hz';
         INSERT INTO regions (parent_id, level, code, name)
              SELECT id, 'community', 'ws', '文三社区' FROM regions WHERE code = 'xh';
         INSERT INTO regions (parent_id, level, code, name)
              SELECT id, 'grid', 'g1', '第一网格' FROM regions WHERE code = 'ws';
         INSERT INTO regions (parent_id, level, code, name)
              SELECT id, 'grid', 'g2', '第二网格' FROM regions WHERE code = 'ws';",
    )
    .await
    .unwrap();
    let mut elders = [0i64; 2];
    for (i, grid) in ["g1", "g2"].iter().enumerate() {
        elders[i] = c
            .query_one(
                "INSERT INTO elders (name, region_id)
                 SELECT $1, id FROM regions WHERE code = $2 RETURNING id",
                &[&format!("老人{grid}"), grid],
            )
            .await
            .unwrap()
            .get(0);
    }
    let gw = auth::upsert_user(
        &pool,
        &NewUser {
            username: "gw1".into(),
            display_name: Some("李网格".into()),
            role: UserRole::GridWorker,
            password: "grid-worker-pass".into(),
            regions: vec!["g1".into()],
            contact: None,
            language: None,
        },
    )
    .await
    .unwrap();
    let sup = auth::upsert_user(
        &pool,
        &NewUser {
            username: "sup".into(),
            display_name: None,
            role: UserRole::Supervisor,
            password: "supervisor-pass".into(),
            regions: vec!["xh".into()],
            contact: None,
            language: Some("en".into()),
        },
    )
    .await
    .unwrap();
    (pool, elders, gw.id, sup.id)
}

fn settings_for(db: &TestDb) -> silverguard::config::Settings {
    let mut s = silverguard::config::Settings::default();
    s.database.url = silverguard::config::Secret::new(db.url.clone());
    s
}

#[tokio::test]
async fn a_service_call_from_the_bracelet_becomes_one_work_order_that_runs_its_course() {
    init_test_log();
    let db = TestDb::new().await;
    let broker = TestBroker::start().await;
    let (pool, elders, gw, _) = community(&db).await;
    let device = unique("svc-");
    provision(&db, vec![device.clone()]).await;
    db.client()
        .await
        .execute(
            "UPDATE devices SET elder_id = $1 WHERE device_id = $2",
            &[&elders[0], &device],
        )
        .await
        .unwrap();
    let app = RunningApp::start(settings(&db, &broker)).await;
    app.wait_ready().await;

    let call = OneShot::Event(pb::Event {
        seq: 7,
        occurred_at_ms: Utc::now().timestamp_millis(),
        kind: pb::EventKind::ServiceCall as i32,
        battery_pct: 80,
        location: None,
        device_id: device.clone(),
    });
    // The same press delivered twice (a redelivery after a lost PUBACK looks like this).
    for _ in 0..2 {
        send_one(&broker.url(), &device, &call, 1, Duration::from_secs(10))
            .await
            .unwrap();
    }
    wait_for_count(
        &db,
        &format!(
            "SELECT count(*) FROM work_orders WHERE elder_id = {} AND source = 'device'",
            elders[0]
        ),
        1,
        Duration::from_secs(10),
    )
    .await;
    // The second copy reaches the same event row; give it time to (not) make a second order.
    wait_for_count(
        &db,
        &format!("SELECT count(*) FROM device_events WHERE device_id = '{device}'"),
        1,
        Duration::from_secs(5),
    )
    .await;

    let c = pool.get().await.unwrap();
    let list = care::list_work_orders(&**c, gw, &Default::default())
        .await
        .unwrap();
    assert_eq!(
        list.len(),
        1,
        "the grid worker sees the order of their grid"
    );
    let id = list[0].id;
    assert_eq!(list[0].status, WorkOrderStatus::New);
    assert_eq!(list[0].device_id.as_deref(), Some(device.as_str()));

    // Not yet dispatched: cannot be accepted or completed.
    assert!(matches!(
        care::accept(&**c, id).await,
        Err(CareError::Transition { .. })
    ));
    assert!(matches!(
        care::complete(&**c, id, 100, None, "gw1").await,
        Err(CareError::Transition { .. })
    ));
    assert!(matches!(
        care::dispatch(&**c, id, "  ", None, "gw1").await,
        Err(CareError::Invalid {
            field: "helper_name",
            ..
        })
    ));
    let w = care::dispatch(&**c, id, "助餐员小周", Some("13800001111"), "gw1")
        .await
        .unwrap();
    assert_eq!(w.status, WorkOrderStatus::Dispatched);
    let w = care::accept(&**c, id).await.unwrap();
    assert_eq!(w.status, WorkOrderStatus::Accepted);
    assert!(matches!(
        care::complete(&**c, id, -5, None, "gw1").await,
        Err(CareError::Invalid {
            field: "cost_cents",
            ..
        })
    ));
    let w = care::complete(&**c, id, 2550, Some("送餐两份"), "gw1")
        .await
        .unwrap();
    assert_eq!(w.status, WorkOrderStatus::Completed);
    assert_eq!(w.cost_cents, Some(2550));
    assert_eq!(w.completed_by.as_deref(), Some("gw1"));
    assert!(matches!(
        care::cancel(&**c, id, "gw1").await,
        Err(CareError::Transition { .. })
    ));
    app.stop().await;
}

#[tokio::test]
async fn compliance_counts_visits_and_calls_per_week_within_scope() {
    let db = TestDb::new().await;
    let (pool, elders, gw, sup) = community(&db).await;
    let c = pool.get().await.unwrap();
    let record = |elder: i64, kind: CareContactKind| NewCareContact {
        elder_id: elder,
        kind,
        at: None,
        notes: Some("一切安好".into()),
    };
    // Elder in g1: one visit, two calls -> compliant. Elder in g2: one call only.
    for (e, k) in [
        (elders[0], CareContactKind::Visit),
        (elders[0], CareContactKind::Call),
        (elders[0], CareContactKind::Call),
        (elders[1], CareContactKind::Call),
    ] {
        care::record_care_contact(&**c, &record(e, k), gw, "李网格")
            .await
            .unwrap();
    }
    let future = NewCareContact {
        at: Some(Utc::now() + chrono::Duration::hours(2)),
        ..record(elders[0], CareContactKind::Visit)
    };
    assert!(matches!(
        care::record_care_contact(&**c, &future, gw, "x").await,
        Err(CareError::Invalid { field: "at", .. })
    ));

    let today = (Utc::now() + chrono::Duration::hours(8)).date_naive();
    // The grid worker sees only their grid's elder.
    let mine = care::weekly_compliance(&**c, gw, today).await.unwrap();
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0].elder_id, elders[0]);
    assert!(mine[0].compliant);
    assert_eq!((mine[0].visits, mine[0].calls), (1, 2));

    // The supervisor sees both, the non-compliant one first.
    let all = care::weekly_compliance(&**c, sup, today).await.unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].elder_id, elders[1]);
    assert!(!all[0].compliant);

    let regions = care::compliance_by_region(&**c, sup, today).await.unwrap();
    let by_code = |code: &str| regions.iter().find(|r| r.code == code).cloned();
    assert!(by_code("hz").is_none(), "the city is above the supervisor");
    let xh = by_code("xh").unwrap();
    assert_eq!((xh.elders, xh.compliant), (2, 1));
    assert_eq!(xh.share, Some(0.5));
    assert_eq!(by_code("g1").map(|r| r.compliant), Some(1));
    assert_eq!(by_code("g2").map(|r| (r.elders, r.compliant)), Some((1, 0)));

    // Last week is empty for everyone.
    let last_week = today - chrono::Duration::days(7);
    let before = care::compliance_by_region(&**c, sup, last_week)
        .await
        .unwrap();
    assert!(before.iter().all(|r| r.compliant == 0));
}
