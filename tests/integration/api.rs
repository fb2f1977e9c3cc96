//! `/api/v1` against the real service: a region tree with two grids, elders in each, users of
//! every role, and what each role may list, see, and do. Another grid's records answer 404,
//! forbidden actions 403, every error is a problem document.

use std::collections::{BTreeSet, HashMap};

use reqwest::Method;
use serde_json::{json, Value};
use silverguard::alerts::engine::{self, NewAlert};
use silverguard::api::auth::{self, NewUser, UserRole};
use silverguard::config::Settings;

use crate::helpers::*;

/// The service with a seeded community:
///
/// ```text
/// city C (杭州市) └ township T └ community M ├ grid G1: elders e1a (bracelet d1, guardian), e1b
///                                         └ grid G2: elder e2 (bracelet d2)
/// elder e3 has no region; bracelet d3 is free.
/// ```
struct World {
    _db: TestDb,
    _broker: TestBroker,
    app: Option<RunningApp>,
    settings: Settings,
    pool: silverguard::store::PgPool,
    base: String,
    http: reqwest::Client,
    tag: String,
    e1a: i64,
    e1b: i64,
    e2: i64,
    e3: i64,
    d1: String,
    d2: String,
    d3: String,
    /// Bearer tokens by role name: admin, supervisor, gw1, gw2, guardian.
    tokens: HashMap<&'static str, String>,
    user_ids: HashMap<&'static str, i64>,
}

struct Reply {
    status: u16,
    body: Value,
    content_type: String,
    headers: reqwest::header::HeaderMap,
}

impl World {
    async fn new() -> World {
        let db = TestDb::new().await;
        let broker = TestBroker::start().await;
        let settings = settings(&db, &broker);
        let app = RunningApp::start(settings.clone()).await;
        let pool = silverguard::store::build_pool(&settings.database).expect("pool");
        let tag = unique("t");
        let c = db.client().await;
        let region = |level: &str, code: &str, parent: Option<i64>| {
            let c = &c;
            let code = format!("{tag}-{code}");
            let level = level.to_string();
            async move {
                c.query_one(
                    "INSERT INTO regions (parent_id, level, code, name) VALUES ($1, $2, $3, $3)
                     RETURNING id",
                    &[&parent, &level, &code],
                )
                .await
                .expect("region")
                .get::<_, i64>(0)
            }
        };
        let city = region("city", "C", None).await;
        let town = region("township", "T", Some(city)).await;
        let comm = region("community", "M", Some(town)).await;
        let g1 = region("grid", "G1", Some(comm)).await;
        let g2 = region("grid", "G2", Some(comm)).await;
        let elder = |name: &str, region: Option<i64>, cats: Vec<&str>| {
            let c = &c;
            let name = name.to_string();
            let cats: Vec<String> = cats.into_iter().map(String::from).collect();
            async move {
                c.query_one(
                    "INSERT INTO elders (name, region_id, categories, phone) VALUES ($1, $2, $3, NULL)
                     RETURNING id",
                    &[&name, &region, &cats],
                )
                .await
                .expect("elder")
                .get::<_, i64>(0)
            }
        };
        let e1a = elder("王秀英", Some(g1), vec!["living_alone"]).await;
        let e1b = elder("李桂兰", Some(g1), vec!["empty_nest"]).await;
        let e2 = elder("张建国", Some(g2), vec!["living_alone", "special_hardship"]).await;
        let e3 = elder("赵无区", None, vec![]).await;
        let (d1, d2, d3) = (unique("d1-"), unique("d2-"), unique("d3-"));
        for d in [&d1, &d2, &d3] {
            c.execute("INSERT INTO devices (device_id) VALUES ($1)", &[d])
                .await
                .unwrap();
        }
        // Bound two days ago, so that telemetry of the last days is the elder's.
        for (d, e) in [(&d1, e1a), (&d2, e2)] {
            c.execute(
                "UPDATE devices SET elder_id = $2, bound_at = now() - interval '2 days'
                 WHERE device_id = $1",
                &[d, &e],
            )
            .await
            .unwrap();
            c.execute(
                "INSERT INTO device_bindings (device_id, elder_id, bound_at, bound_by)
                 VALUES ($1, $2, now() - interval '2 days', 'test')",
                &[d, &e],
            )
            .await
            .unwrap();
        }
        let guardian_ref = format!("{tag}-guardian");
        let contact: i64 = c
            .query_one(
                "INSERT INTO contacts (external_ref, name, phone) VALUES ($1, '王小明', $2)
                 RETURNING id",
                &[
                    &guardian_ref,
                    &format!("139{:08}", rand::random::<u32>() % 100_000_000),
                ],
            )
            .await
            .unwrap()
            .get(0);
        c.execute(
            "INSERT INTO elder_contacts (elder_id, contact_id, role) VALUES ($1, $2, 'guardian')",
            &[&e1a, &contact],
        )
        .await
        .unwrap();

        let mut w = World {
            _db: db,
            _broker: broker,
            base: format!("http://{}", app.http),
            app: Some(app),
            settings,
            pool,
            http: reqwest::Client::new(),
            tag: tag.clone(),
            e1a,
            e1b,
            e2,
            e3,
            d1,
            d2,
            d3,
            tokens: HashMap::new(),
            user_ids: HashMap::new(),
        };
        let users: [(&'static str, UserRole, Vec<String>, Option<String>); 5] = [
            ("admin", UserRole::Admin, vec![], None),
            (
                "supervisor",
                UserRole::Supervisor,
                vec![format!("{tag}-M")],
                None,
            ),
            ("gw1", UserRole::GridWorker, vec![format!("{tag}-G1")], None),
            ("gw2", UserRole::GridWorker, vec![format!("{tag}-G2")], None),
            ("guardian", UserRole::Guardian, vec![], Some(guardian_ref)),
        ];
        for (name, role, regions, contact) in users {
            let u = auth::upsert_user(
                &w.pool,
                &NewUser {
                    username: format!("{tag}-{name}"),
                    display_name: Some(name.to_string()),
                    role,
                    password: "correct horse battery".into(),
                    regions,
                    contact,
                    language: Some("en".into()),
                },
            )
            .await
            .expect("user");
            w.user_ids.insert(name, u.id);
            let r = w
                .call(
                    Method::POST,
                    "/auth/token",
                    None,
                    Some(json!({"username": u.username, "password": "correct horse battery"})),
                )
                .await;
            assert_eq!(r.status, 201, "login {name}: {}", r.body);
            assert_eq!(r.body["user"]["role"], role.as_str());
            w.tokens
                .insert(name, r.body["token"].as_str().unwrap().to_string());
        }
        w
    }

    fn username(&self, role: &str) -> String {
        format!("{}-{role}", self.tag)
    }

    fn code(&self, c: &str) -> String {
        format!("{}-{c}", self.tag)
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Reply {
        let mut req = self
            .http
            .request(method, format!("{}/api/v1{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        Self::reply(req.send().await.expect("request")).await
    }

    async fn reply(res: reqwest::Response) -> Reply {
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let content_type = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let bytes = res.bytes().await.expect("body");
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Reply {
            status,
            body,
            content_type,
            headers,
        }
    }

    async fn get(&self, role: &str, path: &str) -> Reply {
        self.call(Method::GET, path, Some(&self.tokens[role]), None)
            .await
    }

    async fn post(&self, role: &str, path: &str, body: Value) -> Reply {
        self.call(Method::POST, path, Some(&self.tokens[role]), Some(body))
            .await
    }

    /// Opens an alert through the engine, as ingest would (its escalation is scheduled).
    async fn open_alert(&self, elder_id: i64, device: &str, kind: &'static str) -> i64 {
        let mut client = self.pool.get().await.unwrap();
        let tx = client.transaction().await.unwrap();
        let opened = engine::open_or_repeat(
            &tx,
            &NewAlert {
                elder_id: Some(elder_id),
                device_id: device.to_string(),
                kind,
                severity: "critical",
                occurred_at: chrono::Utc::now(),
                source_event_id: None,
                location: Some((302_740_000, 1_201_550_000)),
                detail: json!({}),
            },
            &self.settings.alerts,
            None,
        )
        .await
        .expect("open alert");
        tx.commit().await.unwrap();
        opened.alert_id
    }

    async fn count(&self, sql: &str, params: &[&(dyn tokio_postgres::types::ToSql + Sync)]) -> i64 {
        let c = self.pool.get().await.unwrap();
        c.query_one(sql, params).await.unwrap().get(0)
    }

    async fn stop(mut self) {
        if let Some(app) = self.app.take() {
            app.stop().await;
        }
    }
}

fn ids(r: &Reply) -> BTreeSet<i64> {
    r.body["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no items in {}", r.body))
        .iter()
        .map(|i| i["id"].as_i64().unwrap())
        .collect()
}

fn assert_problem(r: &Reply, status: u16) {
    assert_eq!(r.status, status, "{}", r.body);
    assert!(
        r.content_type.starts_with("application/problem+json"),
        "content type {:?} for {}",
        r.content_type,
        r.body
    );
    assert_eq!(r.body["status"], status, "{}", r.body);
    assert!(r.body["title"].is_string(), "{}", r.body);
    assert!(r.body["type"].is_string(), "{}", r.body);
}

fn assert_field(r: &Reply, field: &str) {
    assert_problem(r, 422);
    let fields: Vec<&str> = r.body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert!(
        fields.contains(&field),
        "{field} not in {fields:?}: {}",
        r.body
    );
}

#[tokio::test]
async fn api_scopes_every_role_and_hides_other_grids() {
    let w = World::new().await;
    let a1 = w.open_alert(w.e1a, &w.d1, "sos").await;
    let a2 = w.open_alert(w.e2, &w.d2, "sos").await;
    let all = BTreeSet::from([w.e1a, w.e1b, w.e2, w.e3]);

    // What each role lists.
    let expect: [(&str, BTreeSet<i64>, BTreeSet<i64>); 5] = [
        ("admin", all.clone(), BTreeSet::from([a1, a2])),
        (
            "supervisor",
            BTreeSet::from([w.e1a, w.e1b, w.e2]),
            BTreeSet::from([a1, a2]),
        ),
        ("gw1", BTreeSet::from([w.e1a, w.e1b]), BTreeSet::from([a1])),
        ("gw2", BTreeSet::from([w.e2]), BTreeSet::from([a2])),
        ("guardian", BTreeSet::from([w.e1a]), BTreeSet::from([a1])),
    ];
    for (role, elders, alerts) in &expect {
        let r = w.get(role, "/elders?limit=500").await;
        assert_eq!(r.status, 200, "{role}: {}", r.body);
        let listed: BTreeSet<i64> = ids(&r).intersection(&all).copied().collect();
        assert_eq!(&listed, elders, "{role} lists elders");
        let r = w.get(role, "/alerts").await;
        assert_eq!(&ids(&r), alerts, "{role} lists alerts");
        // Every elder it may not see answers 404, as do their alerts, bracelets, telemetry,
        // events: the same as a record that does not exist.
        for e in all.difference(elders) {
            for path in [
                format!("/elders/{e}"),
                format!("/elders/{e}/telemetry"),
                format!("/elders/{e}/events"),
                format!("/elders/{e}/bindings"),
                format!("/elders/{e}/care-contacts"),
            ] {
                let r = w.get(role, &path).await;
                assert_problem(&r, 404);
            }
        }
        for a in [a1, a2].iter().filter(|a| !alerts.contains(a)) {
            assert_problem(&w.get(role, &format!("/alerts/{a}")).await, 404);
            assert_problem(&w.get(role, &format!("/alerts/{a}/timeline")).await, 404);
            let r = w.post(role, &format!("/alerts/{a}/ack"), json!({})).await;
            assert_problem(&r, 404);
        }
        assert_problem(&w.get(role, "/elders/999999999").await, 404);
    }

    // Bracelets follow their elders; a free bracelet is the admin's alone.
    for (role, visible) in [
        ("admin", vec![&w.d1, &w.d2, &w.d3]),
        ("supervisor", vec![&w.d1, &w.d2]),
        ("gw1", vec![&w.d1]),
        ("gw2", vec![&w.d2]),
        ("guardian", vec![&w.d1]),
    ] {
        let r = w.get(role, "/devices?limit=500").await;
        let listed: BTreeSet<String> = r.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["device_id"].as_str().unwrap().to_string())
            .filter(|d| [&w.d1, &w.d2, &w.d3].contains(&d))
            .collect();
        let visible: BTreeSet<String> = visible.into_iter().cloned().collect();
        assert_eq!(listed, visible, "{role} lists devices");
        for d in [&w.d1, &w.d2, &w.d3] {
            let r = w.get(role, &format!("/devices/{d}")).await;
            if visible.contains(d) {
                assert_eq!(r.status, 200, "{role} {d}");
            } else {
                assert_problem(&r, 404);
                assert_problem(&w.get(role, &format!("/devices/{d}/bindings")).await, 404);
            }
        }
    }

    // Regions: supervisors their subtree, grid workers their grid, guardians nothing.
    for (role, codes) in [
        ("supervisor", vec!["M", "G1", "G2"]),
        ("gw1", vec!["G1"]),
        ("guardian", vec![]),
    ] {
        let r = w.get(role, "/regions").await;
        assert_eq!(r.status, 200);
        let got: BTreeSet<String> = r.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["code"].as_str().unwrap().to_string())
            .collect();
        let want: BTreeSet<String> = codes.iter().map(|c| w.code(c)).collect();
        assert_eq!(got, want, "{role} regions");
    }
    assert_problem(
        &w.get("gw1", &format!("/regions/{}", w.code("G2"))).await,
        404,
    );

    // 401 without credentials, or with a made-up token.
    for path in ["/elders", "/alerts", "/me", "/devices", "/dashboard"] {
        let r = w.call(Method::GET, path, None, None).await;
        assert_problem(&r, 401);
        let r = w.call(Method::GET, path, Some("sgt_forged"), None).await;
        assert_problem(&r, 401);
    }

    // 403 for what a role may not do at all.
    let forbidden: Vec<(&str, Method, String, Value)> = vec![
        (
            "gw1",
            Method::POST,
            "/elders".into(),
            json!({"name": "新人", "region": w.code("G1")}),
        ),
        (
            "guardian",
            Method::POST,
            "/elders".into(),
            json!({"name": "新人"}),
        ),
        (
            "gw1",
            Method::PATCH,
            format!("/elders/{}", w.e1a),
            json!({"notes": "x"}),
        ),
        (
            "guardian",
            Method::PATCH,
            format!("/elders/{}", w.e1a),
            json!({"notes": "x"}),
        ),
        (
            "supervisor",
            Method::DELETE,
            format!("/elders/{}", w.e1a),
            Value::Null,
        ),
        (
            "guardian",
            Method::POST,
            format!("/alerts/{a1}/resolve"),
            json!({"note": "ok"}),
        ),
        (
            "guardian",
            Method::POST,
            "/work-orders".into(),
            json!({"elder_id": w.e1a, "category": "meals"}),
        ),
        (
            "guardian",
            Method::POST,
            format!("/elders/{}/care-contacts", w.e1a),
            json!({"kind": "call"}),
        ),
        ("guardian", Method::GET, "/dashboard".into(), Value::Null),
        ("guardian", Method::GET, "/compliance".into(), Value::Null),
        ("gw1", Method::GET, "/contacts".into(), Value::Null),
        ("gw1", Method::GET, "/users".into(), Value::Null),
        (
            "supervisor",
            Method::POST,
            "/users".into(),
            json!({"username": "x", "role": "admin", "password": "12345678"}),
        ),
        (
            "supervisor",
            Method::POST,
            "/devices".into(),
            json!({"device_id": "new-one"}),
        ),
        (
            "gw1",
            Method::POST,
            format!("/devices/{}/bind", w.d1),
            json!({"elder_id": w.e1b}),
        ),
        (
            "supervisor",
            Method::POST,
            "/regions".into(),
            json!({"code": "x", "name": "x", "level": "city"}),
        ),
        (
            "gw1",
            Method::POST,
            format!("/devices/{}/credentials/rotate", w.d1),
            Value::Null,
        ),
    ];
    for (role, method, path, body) in forbidden {
        let body = (!body.is_null()).then_some(body);
        let r = w
            .call(method.clone(), &path, Some(&w.tokens[role]), body)
            .await;
        assert_problem(&r, 403);
        assert_eq!(
            r.body["type"], "https://silverguard.dev/problems/forbidden",
            "{role} {method} {path}"
        );
    }

    // A supervisor registers and edits within their regions only.
    let r = w
        .post(
            "supervisor",
            "/elders",
            json!({"name": "陈阿婆", "region": w.code("G2"), "categories": ["left_behind"]}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let new_id = r.body["id"].as_i64().unwrap();
    assert_eq!(r.body["region_code"], w.code("G2"));
    let r = w
        .call(
            Method::PATCH,
            &format!("/elders/{new_id}"),
            Some(&w.tokens["supervisor"]),
            Some(json!({"region": w.code("C")})),
        )
        .await;
    assert_field(&r, "region");
    let r = w
        .call(
            Method::PATCH,
            &format!("/elders/{}", w.e3),
            Some(&w.tokens["supervisor"]),
            Some(json!({"notes": "x"})),
        )
        .await;
    assert_problem(&r, 404);
    // The new elder is gw2's, not gw1's.
    assert_eq!(w.get("gw2", &format!("/elders/{new_id}")).await.status, 200);
    assert_problem(&w.get("gw1", &format!("/elders/{new_id}")).await, 404);

    // Guardians acknowledge their own elder's alert.
    let r = w
        .post(
            "guardian",
            &format!("/alerts/{a1}/ack"),
            json!({"note": "我马上到"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], "acknowledged");
    assert_eq!(r.body["acknowledged_by"], w.username("guardian"));
    assert_eq!(r.body["ack_channel"], "api");
    w.stop().await;
}

#[tokio::test]
async fn api_paginates_filters_and_answers_problems() {
    let w = World::new().await;
    // Enough elders in G1 for a few pages.
    let c = w.pool.get().await.unwrap();
    for i in 0..7 {
        c.execute(
            "INSERT INTO elders (name, region_id, categories)
             SELECT $1, id, '{left_behind}' FROM regions WHERE code = $2",
            &[&format!("页{i}"), &w.code("G1")],
        )
        .await
        .unwrap();
    }
    let expected = w
        .count(
            "SELECT count(*) FROM elders e JOIN regions r ON r.id = e.region_id WHERE r.code = $1",
            &[&w.code("G1")],
        )
        .await;
    assert_eq!(expected, 9);
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/elders?limit=4&cursor={c}"),
            None => "/elders?limit=4".into(),
        };
        let r = w.get("gw1", &path).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let items = r.body["items"].as_array().unwrap();
        assert!(items.len() <= 4);
        seen.extend(items.iter().map(|i| i["id"].as_i64().unwrap()));
        pages += 1;
        match r.body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 9, "every elder once: {seen:?}");
    assert_eq!(seen.iter().collect::<BTreeSet<_>>().len(), 9);
    assert!(seen.windows(2).all(|p| p[0] < p[1]));

    // Filters.
    let r = w
        .get(
            "admin",
            &format!("/elders?region={}&limit=500", w.code("G2")),
        )
        .await;
    assert_eq!(ids(&r), BTreeSet::from([w.e2]));
    let r = w
        .get(
            "admin",
            &format!("/elders?region={}&limit=500", w.code("M")),
        )
        .await;
    assert_eq!(ids(&r).len(), 10);
    let r = w
        .get("supervisor", "/elders?category=special_hardship")
        .await;
    assert_eq!(ids(&r), BTreeSet::from([w.e2]));
    let r = w.get("gw1", "/elders?q=桂兰").await;
    assert_eq!(ids(&r), BTreeSet::from([w.e1b]));
    let r = w.get("supervisor", "/elders?has_device=true").await;
    assert_eq!(ids(&r), BTreeSet::from([w.e1a, w.e2]));
    let r = w.get("admin", "/devices?bound=false&limit=500").await;
    let free: Vec<&str> = r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device_id"].as_str().unwrap())
        .collect();
    assert!(free.contains(&w.d3.as_str()) && !free.contains(&w.d1.as_str()));
    let r = w.get("admin", &format!("/devices?q={}", &w.d2[..6])).await;
    assert!(r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d["device_id"] == w.d2.as_str()));
    // Never heard from: silent.
    let r = w.get("gw1", "/devices?silent=true").await;
    assert_eq!(r.body["items"][0]["device_id"], w.d1.as_str());

    let a1 = w.open_alert(w.e1a, &w.d1, "sos").await;
    let a2 = w.open_alert(w.e2, &w.d2, "fall").await;
    let a3 = w.open_alert(w.e1b, &w.d1, "hr_high").await;
    let r = w.get("admin", "/alerts?kind=sos,fall").await;
    assert_eq!(ids(&r), BTreeSet::from([a1, a2]));
    let r = w.get("admin", &format!("/alerts?elder_id={}", w.e1b)).await;
    assert_eq!(ids(&r), BTreeSet::from([a3]));
    let r = w
        .get("admin", &format!("/alerts?region={}", w.code("G1")))
        .await;
    assert_eq!(ids(&r), BTreeSet::from([a1, a3]));
    let r = w.get("admin", "/alerts?status=resolved").await;
    assert!(ids(&r).is_empty());
    let r = w
        .get("admin", "/alerts?since=2000-01-01&until=2000-01-02")
        .await;
    assert!(ids(&r).is_empty());
    let r = w.get("admin", "/alerts?limit=2").await;
    assert_eq!(r.body["items"].as_array().unwrap().len(), 2);
    let next = r.body["next_cursor"].as_str().unwrap().to_string();
    let r2 = w
        .get("admin", &format!("/alerts?limit=2&cursor={next}"))
        .await;
    let mut all: Vec<i64> = ids(&r).into_iter().chain(ids(&r2)).collect();
    all.sort();
    assert_eq!(all, {
        let mut v = vec![a1, a2, a3];
        v.sort();
        v
    });
    assert!(r2.body["next_cursor"].is_null());

    // Problems name the field.
    assert_field(&w.get("admin", "/elders?limit=0").await, "limit");
    assert_field(&w.get("admin", "/elders?limit=501").await, "limit");
    assert_field(
        &w.get("admin", "/elders?has_device=maybe").await,
        "has_device",
    );
    assert_field(&w.get("admin", "/elders?category=rich").await, "category");
    assert_field(&w.get("admin", "/elders?cursor=%21%21").await, "cursor");
    assert_field(&w.get("admin", "/elders?regoin=x").await, "regoin");
    assert_field(
        &w.get("admin", "/alerts?status=open,closed").await,
        "status",
    );
    assert_field(&w.get("admin", "/alerts?since=yesterday").await, "since");
    assert_field(
        &w.get("admin", &format!("/elders/{}/telemetry?bucket=10m", w.e1a))
            .await,
        "bucket",
    );
    assert_field(
        &w.get(
            "admin",
            &format!(
                "/elders/{}/telemetry?from=2020-01-01&to=2021-01-01&bucket=5m",
                w.e1a
            ),
        )
        .await,
        "bucket",
    );
    assert_field(
        &w.post("admin", &format!("/alerts/{a1}/resolve"), json!({}))
            .await,
        "note",
    );
    assert_field(
        &w.post(
            "admin",
            &format!("/alerts/{a1}/resolve"),
            json!({"note": "  "}),
        )
        .await,
        "note",
    );
    let r = w.post("admin", "/elders", json!({"name": "x", "phone": "not a phone", "gender": "x", "home": {"lat": 95.0, "lon": 0.0}})).await;
    assert_field(&r, "phone");
    assert_field(&r, "gender");
    assert_field(&r, "home");
    let r = w
        .post(
            "admin",
            "/elders",
            json!({"name": "x", "wander_risk": "yes"}),
        )
        .await;
    assert_field(&r, "wander_risk");
    let r = w
        .post("admin", "/elders", json!({"name": "x", "bogus": 1}))
        .await;
    assert_field(&r, "bogus");
    let r = w
        .post("admin", "/elders", json!({"region": w.code("G1")}))
        .await;
    assert_field(&r, "name");
    let r = w
        .post(
            "admin",
            "/elders",
            json!({"name": "x", "region": w.code("M")}),
        )
        .await;
    assert_field(&r, "region");
    let r = w
        .post(
            "admin",
            "/users",
            json!({"username": "a b", "role": "admin", "password": "correct horse"}),
        )
        .await;
    assert_field(&r, "username");

    // Malformed, wrongly typed and oversized bodies are problems too.
    let url = format!("{}/api/v1/alerts/{a1}/resolve", w.base);
    let token = &w.tokens["admin"];
    let r = World::reply(
        w.http
            .post(&url)
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body("{\"note\": ")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_problem(&r, 400);
    let r = World::reply(
        w.http
            .post(&url)
            .bearer_auth(token)
            .header("content-type", "text/plain")
            .body("note=x")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_problem(&r, 415);
    let big = json!({"note": "x".repeat(100 * 1024)}).to_string();
    let r = World::reply(
        w.http
            .post(&url)
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(big)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_problem(&r, 413);
    // A path that does not parse is a problem too (axum's own rejection, converted).
    assert_problem(&w.get("admin", "/elders/not-a-number").await, 400);
    // Unknown endpoints and methods.
    assert_problem(&w.get("admin", "/nothing-here").await, 404);
    let r = w
        .call(Method::PUT, "/alerts", Some(&w.tokens["admin"]), None)
        .await;
    assert_problem(&r, 405);
    w.stop().await;
}

/// device, seconds after the base time, heart rate, SpO2, systolic, diastolic, skin temp.
type Reading<'a> = (
    &'a str,
    i64,
    Option<i16>,
    Option<i16>,
    Option<i16>,
    Option<i16>,
    Option<i16>,
);

#[tokio::test]
async fn api_telemetry_buckets_are_exact_and_views_are_audited() {
    let w = World::new().await;
    let c = w.pool.get().await.unwrap();
    // An hour boundary three hours ago; readings in its first two 5-minute buckets.
    let base: chrono::DateTime<chrono::Utc> = c
        .query_one("SELECT date_trunc('hour', now()) - interval '3 hours'", &[])
        .await
        .unwrap()
        .get(0);
    let rows: [Reading; 5] = [
        // device, seconds after base, hr, spo2, systolic, diastolic, skin temp (0.1 °C)
        (
            &w.d1,
            60,
            Some(60),
            Some(95),
            Some(120),
            Some(80),
            Some(362),
        ),
        (
            &w.d1,
            120,
            Some(80),
            Some(97),
            Some(130),
            Some(85),
            Some(366),
        ),
        (&w.d1, 200, Some(73), None, None, None, None),
        (
            &w.d1,
            360,
            Some(100),
            Some(99),
            Some(140),
            Some(90),
            Some(370),
        ),
        // Another elder's bracelet: not theirs.
        (
            &w.d2,
            60,
            Some(150),
            Some(80),
            Some(200),
            Some(120),
            Some(400),
        ),
    ];
    for (i, (d, s, hr, spo2, sys, dia, temp)) in rows.iter().enumerate() {
        let ts = base + chrono::Duration::seconds(*s);
        c.execute(
            "INSERT INTO heartbeats (device_id, ts, seq, received_at, heart_rate_bpm, spo2_pct,
                                     systolic_mmhg, diastolic_mmhg, skin_temp_dc, worn)
             VALUES ($1, $2, $3, $2, $4, $5, $6, $7, $8, true)",
            &[d, &ts, &(i as i64), hr, spo2, sys, dia, temp],
        )
        .await
        .unwrap();
    }
    // Before the bracelet was bound to e1a (someone else wore it then).
    c.execute(
        "INSERT INTO heartbeats (device_id, ts, seq, received_at, heart_rate_bpm, worn)
         VALUES ($1, now() - interval '3 days', 99, now(), 200, true)",
        &[&w.d1],
    )
    .await
    .unwrap();

    let from =
        (base - chrono::Duration::hours(1)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let to = (base + chrono::Duration::hours(1)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let q = |bucket: &str| {
        format!(
            "/elders/{}/telemetry?from={}&to={}&bucket={bucket}",
            w.e1a,
            urlencode(&from),
            urlencode(&to)
        )
    };
    let r = w.get("gw1", &q("5m")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let b = r.body["buckets"].as_array().unwrap();
    assert_eq!(b.len(), 2, "{}", r.body);
    assert_eq!(
        b[0]["start"].as_str().unwrap(),
        base.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    assert_eq!(b[0]["count"], 3);
    assert_eq!(
        b[0]["heart_rate_bpm"],
        json!({"min": 60.0, "max": 80.0, "avg": 71.0, "n": 3})
    );
    assert_eq!(
        b[0]["spo2_pct"],
        json!({"min": 95.0, "max": 97.0, "avg": 96.0, "n": 2})
    );
    assert_eq!(b[0]["systolic_mmhg"]["avg"], 125.0);
    assert_eq!(b[0]["diastolic_mmhg"]["max"], 85.0);
    assert_eq!(
        b[0]["skin_temp_c"],
        json!({"min": 36.2, "max": 36.6, "avg": 36.4, "n": 2})
    );
    assert_eq!(b[1]["count"], 1);
    assert_eq!(b[1]["heart_rate_bpm"]["avg"], 100.0);
    let r = w.get("gw1", &q("1h")).await;
    let b = r.body["buckets"].as_array().unwrap();
    assert_eq!(b.len(), 1);
    assert_eq!(b[0]["count"], 4);
    assert_eq!(
        b[0]["heart_rate_bpm"],
        json!({"min": 60.0, "max": 100.0, "avg": 78.25, "n": 4})
    );
    let r = w.get("guardian", &q("1d")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["buckets"][0]["count"], 4);
    // The other grid's worker cannot read it at all.
    assert_problem(&w.get("gw2", &q("5m")).await, 404);
    let r = w
        .get(
            "gw2",
            &format!(
                "/elders/{}/telemetry?from={}&to={}",
                w.e2,
                urlencode(&from),
                urlencode(&to)
            ),
        )
        .await;
    assert_eq!(r.body["buckets"][0]["heart_rate_bpm"]["max"], 150.0);

    // Events follow the binding too.
    c.execute(
        "INSERT INTO device_events (device_id, seq, kind, occurred_at, device_ts, received_at)
         VALUES ($1, 1, 'sos', now() - interval '1 hour', now(), now()),
                ($1, 2, 'worn_off', now() - interval '30 minutes', now(), now()),
                ($1, 3, 'sos', now() - interval '5 days', now(), now())",
        &[&w.d1],
    )
    .await
    .unwrap();
    let r = w
        .get("guardian", &format!("/elders/{}/events", w.e1a))
        .await;
    let kinds: Vec<&str> = r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["worn_off", "sos"]);
    let r = w
        .get("guardian", &format!("/elders/{}/events?kind=sos", w.e1a))
        .await;
    assert_eq!(r.body["items"].as_array().unwrap().len(), 1);

    // Who looked at whose record is audited.
    let r = w.get("gw1", &format!("/elders/{}", w.e1a)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["name"], "王秀英");
    assert_eq!(r.body["devices"][0]["device_id"], w.d1.as_str());
    assert_eq!(r.body["contacts"][0]["role"], "guardian");
    let gw1 = w.user_ids["gw1"];
    assert_eq!(
        w.count(
            "SELECT count(*) FROM access_audit WHERE user_id = $1 AND elder_id = $2 AND action = 'view_elder'",
            &[&gw1, &w.e1a]
        )
        .await,
        1
    );
    assert_eq!(
        w.count(
            "SELECT count(*) FROM access_audit WHERE user_id = $1 AND elder_id = $2 AND action = 'view_telemetry'",
            &[&gw1, &w.e1a]
        )
        .await,
        2
    );
    // A refused look is not a look.
    let gw2 = w.user_ids["gw2"];
    assert_eq!(
        w.count(
            "SELECT count(*) FROM access_audit WHERE user_id = $1 AND elder_id = $2",
            &[&gw2, &w.e1a]
        )
        .await,
        0
    );
    // Changes are audited as well.
    let r = w
        .call(Method::PATCH, &format!("/elders/{}", w.e1a), Some(&w.tokens["supervisor"]),
              Some(json!({"conditions": ["高血压"], "home": {"lat": 30.274, "lon": 120.155}, "thresholds": {"hr_high": {"above": 120, "for": "5m"}}})))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["conditions"], json!(["高血压"]));
    assert_eq!(r.body["home"]["lat"], 30.274);
    let sup = w.user_ids["supervisor"];
    assert_eq!(
        w.count(
            "SELECT count(*) FROM access_audit WHERE user_id = $1 AND action = 'update_elder'",
            &[&sup]
        )
        .await,
        1
    );
    let r = w
        .call(
            Method::PATCH,
            &format!("/elders/{}", w.e1a),
            Some(&w.tokens["supervisor"]),
            Some(json!({"thresholds": {"hr_high": {"above": "fast"}}})),
        )
        .await;
    assert_problem(&r, 422);
    assert!(
        r.body["errors"][0]["field"]
            .as_str()
            .unwrap()
            .starts_with("thresholds"),
        "{}",
        r.body
    );
    w.stop().await;
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[tokio::test]
async fn api_acknowledge_stops_escalation_and_resolve_needs_a_note() {
    let w = World::new().await;
    let a1 = w.open_alert(w.e1a, &w.d1, "sos").await;
    let pending = "SELECT count(*) FROM escalation_steps WHERE alert_id = $1 AND state = 'pending' AND purpose = 'notify'";
    assert!(
        w.count(pending, &[&a1]).await > 0,
        "escalation is scheduled"
    );

    let r = w.post("gw2", &format!("/alerts/{a1}/ack"), json!({})).await;
    assert_problem(&r, 404);
    // One tap: no body at all.
    let r = w
        .call(
            Method::POST,
            &format!("/alerts/{a1}/ack"),
            Some(&w.tokens["gw1"]),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], "acknowledged");
    assert_eq!(w.count(pending, &[&a1]).await, 0, "escalation stopped");
    assert!(
        w.count(
            "SELECT count(*) FROM escalation_steps WHERE alert_id = $1 AND state = 'skipped'",
            &[&a1]
        )
        .await
            > 0
    );
    let r = w
        .post("supervisor", &format!("/alerts/{a1}/ack"), json!({}))
        .await;
    assert_problem(&r, 409);
    assert_eq!(
        r.body["type"],
        "https://silverguard.dev/problems/already-acknowledged"
    );

    let r = w.get("guardian", &format!("/alerts/{a1}/timeline")).await;
    let entries: Vec<&str> = r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["entry"].as_str().unwrap())
        .collect();
    assert_eq!(entries.first(), Some(&"opened"));
    assert!(entries.contains(&"acknowledged"), "{entries:?}");
    let ack = r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["entry"] == "acknowledged")
        .unwrap();
    assert_eq!(ack["actor"], w.username("gw1"));
    assert_eq!(ack["channel"], "api");

    assert_problem(
        &w.post(
            "guardian",
            &format!("/alerts/{a1}/resolve"),
            json!({"note": "ok"}),
        )
        .await,
        403,
    );
    assert_field(
        &w.post("gw1", &format!("/alerts/{a1}/resolve"), json!({"note": ""}))
            .await,
        "note",
    );
    let r = w
        .post(
            "gw1",
            &format!("/alerts/{a1}/resolve"),
            json!({"note": "上门查看，误触"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], "resolved");
    assert_eq!(r.body["resolution_note"], "上门查看，误触");
    let r = w
        .post(
            "gw1",
            &format!("/alerts/{a1}/resolve"),
            json!({"note": "again"}),
        )
        .await;
    assert_problem(&r, 409);
    assert_problem(
        &w.post("gw1", &format!("/alerts/{a1}/ack"), json!({})).await,
        409,
    );

    // The dashboard counts it: acknowledged within seconds.
    let a2 = w.open_alert(w.e2, &w.d2, "sos").await;
    // A low battery left unanswered for minutes is not an emergency call: it counts as an
    // alert but not against the 60-second share.
    let a3 = w.open_alert(w.e2, &w.d2, "low_battery").await;
    w.pool
        .get()
        .await
        .unwrap()
        .execute(
            "UPDATE alerts SET opened_at = now() - interval '5 minutes' WHERE id = $1",
            &[&a3],
        )
        .await
        .unwrap();
    let r = w.get("supervisor", "/dashboard").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let regions = r.body["regions"].as_array().unwrap();
    let row = |code: &str| {
        regions
            .iter()
            .find(|x| x["code"] == w.code(code))
            .unwrap_or_else(|| panic!("{code} in {regions:?}"))
    };
    let m = row("M");
    assert_eq!(m["elders"], 3);
    assert_eq!(m["open_alerts"], 2);
    assert_eq!(m["alerts_since"], 3);
    assert_eq!(m["acknowledged"], 1);
    assert!(m["ack_p50_s"].as_f64().unwrap() < 60.0);
    assert_eq!(m["ack_within_60s"], 1.0, "only emergencies count: {m}");
    assert_eq!(row("G1")["open_alerts"], 0);
    assert_eq!(row("G2")["open_alerts"], 2);
    assert!(
        !regions.iter().any(|x| x["code"] == w.code("C")),
        "the city is above the supervisor"
    );
    let r = w.get("gw2", "/dashboard").await;
    assert_eq!(r.body["regions"].as_array().unwrap().len(), 1);
    let _ = a2;
    w.stop().await;
}

#[tokio::test]
async fn api_login_rate_limit_csrf_and_token_revocation() {
    let w = World::new().await;
    let user = w.username("gw1");
    // Five wrong passwords, then even the right one is refused for a while.
    for _ in 0..5 {
        let r = w
            .call(
                Method::POST,
                "/auth/token",
                None,
                Some(json!({"username": user, "password": "wrong password"})),
            )
            .await;
        assert_problem(&r, 401);
    }
    let r = w
        .call(
            Method::POST,
            "/auth/token",
            None,
            Some(json!({"username": user, "password": "correct horse battery"})),
        )
        .await;
    assert_problem(&r, 429);
    assert_eq!(
        r.body["type"],
        "https://silverguard.dev/problems/rate-limited"
    );
    assert!(r.headers.get("retry-after").is_some());
    assert_field(
        &w.call(
            Method::POST,
            "/auth/token",
            None,
            Some(json!({"username": "x"})),
        )
        .await,
        "password",
    );

    // /me, then revoke the token: it stops working.
    let r = w.get("gw2", "/me").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["role"], "grid_worker");
    assert_eq!(r.body["regions"], json!([w.code("G2")]));
    assert_eq!(r.body["permissions"]["resolve_alerts"], true);
    assert_eq!(r.body["permissions"]["administer"], false);
    let r = w
        .call(Method::DELETE, "/auth/token", Some(&w.tokens["gw2"]), None)
        .await;
    assert_eq!(r.status, 204);
    assert_problem(&w.get("gw2", "/me").await, 401);

    // A console session: reads with the cookie alone, state changes need the CSRF token.
    let a1 = w.open_alert(w.e1a, &w.d1, "sos").await;
    let (cookie, csrf) = auth::create_session(&w.pool, w.user_ids["guardian"])
        .await
        .unwrap();
    let cookie = format!("{}={cookie}", auth::SESSION_COOKIE);
    let url = |p: &str| format!("{}/api/v1{p}", w.base);
    let r = World::reply(
        w.http
            .get(url("/me"))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["csrf_token"], csrf.as_str());
    let r = World::reply(
        w.http
            .post(url(&format!("/alerts/{a1}/ack")))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_problem(&r, 403);
    let r = World::reply(
        w.http
            .post(url(&format!("/alerts/{a1}/ack")))
            .header("cookie", &cookie)
            .header("x-csrf-token", "wrong")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_problem(&r, 403);
    assert_eq!(
        w.count(
            "SELECT count(*) FROM alerts WHERE id = $1 AND status = 'open'",
            &[&a1]
        )
        .await,
        1
    );
    let r = World::reply(
        w.http
            .post(url(&format!("/alerts/{a1}/ack")))
            .header("cookie", &cookie)
            .header("x-csrf-token", &csrf)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    w.stop().await;
}

#[tokio::test]
async fn api_care_devices_users_and_openapi() {
    let w = World::new().await;
    // Work orders: opened, dispatched, accepted, completed by the grid worker.
    let r = w
        .post(
            "gw1",
            "/work-orders",
            json!({"elder_id": w.e1a, "category": "meals", "description": "午餐"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let wo = r.body["id"].as_i64().unwrap();
    assert_problem(
        &w.post(
            "gw2",
            "/work-orders",
            json!({"elder_id": w.e1a, "category": "meals"}),
        )
        .await,
        404,
    );
    assert_field(
        &w.post(
            "gw1",
            "/work-orders",
            json!({"elder_id": w.e1a, "category": "spa"}),
        )
        .await,
        "category",
    );
    assert_problem(&w.get("gw2", &format!("/work-orders/{wo}")).await, 404);
    assert_eq!(
        w.get("guardian", &format!("/work-orders/{wo}"))
            .await
            .status,
        200
    );
    assert_problem(
        &w.post("gw1", &format!("/work-orders/{wo}/accept"), json!({}))
            .await,
        409,
    );
    let r = w
        .post(
            "gw1",
            &format!("/work-orders/{wo}/dispatch"),
            json!({"helper_name": "刘阿姨", "helper_phone": "13800000000"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        w.post("gw1", &format!("/work-orders/{wo}/accept"), json!({}))
            .await
            .status,
        200
    );
    let r = w
        .post(
            "gw1",
            &format!("/work-orders/{wo}/complete"),
            json!({"cost_cents": 1500, "note": "送达"}),
        )
        .await;
    assert_eq!(r.body["status"], "completed");
    assert_eq!(r.body["cost_cents"], 1500);
    let r = w.get("supervisor", "/work-orders?status=completed").await;
    assert_eq!(ids(&r), BTreeSet::from([wo]));
    assert!(ids(&w.get("gw2", "/work-orders").await).is_empty());

    // Visits and calls, and the week's compliance.
    for kind in ["visit", "call", "call"] {
        let r = w
            .post(
                "gw1",
                &format!("/elders/{}/care-contacts", w.e1a),
                json!({"kind": kind, "notes": "好"}),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
    }
    assert_problem(
        &w.post(
            "gw2",
            &format!("/elders/{}/care-contacts", w.e1a),
            json!({"kind": "visit"}),
        )
        .await,
        404,
    );
    let r = w
        .get(
            "guardian",
            &format!("/elders/{}/care-contacts?limit=2", w.e1a),
        )
        .await;
    assert_eq!(r.body["items"].as_array().unwrap().len(), 2);
    assert!(r.body["next_cursor"].is_string());
    let r = w.get("gw1", "/compliance").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let rows = r.body["items"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(
        rows.iter().find(|x| x["elder_id"] == w.e1a).unwrap()["compliant"],
        true
    );
    assert_eq!(
        rows.iter().find(|x| x["elder_id"] == w.e1b).unwrap()["compliant"],
        false
    );
    let r = w.get("supervisor", "/compliance/regions").await;
    let g1 = r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["code"] == w.code("G1"))
        .unwrap()
        .clone();
    assert_eq!(
        (g1["elders"].as_i64(), g1["compliant"].as_i64()),
        (Some(2), Some(1))
    );
    let r = w.get("supervisor", "/dashboard").await;
    let g1 = r.body["regions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["code"] == w.code("G1"))
        .unwrap()
        .clone();
    assert_eq!(g1["visits"]["compliant"], 1);
    assert_eq!(g1["visits"]["share"], 0.5);

    // Devices: provisioning without credentials; with them, the broker admin must be set up.
    let r = w.post("admin", "/devices", json!({"device_id": format!("{}-new", w.tag), "imei": "861234567890123", "model": "SG-1", "elder_id": w.e1b, "issue_credentials": false})).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["device"]["elder_id"], w.e1b);
    assert!(r.body["credentials"].is_null());
    let r = w
        .post(
            "admin",
            "/devices",
            json!({"device_id": format!("{}-new", w.tag), "issue_credentials": false}),
        )
        .await;
    assert_problem(&r, 409);
    let r = w
        .post(
            "admin",
            "/devices",
            json!({"device_id": format!("{}-other", w.tag)}),
        )
        .await;
    assert_problem(&r, 503);
    assert_eq!(
        w.count(
            "SELECT count(*) FROM devices WHERE device_id = $1",
            &[&format!("{}-other", w.tag)]
        )
        .await,
        0
    );
    assert_field(
        &w.post(
            "admin",
            "/devices",
            json!({"device_id": "bad id!", "imei": "12"}),
        )
        .await,
        "imei",
    );
    // A supervisor binds a free bracelet to one of their elders; history is kept.
    let r = w
        .post(
            "supervisor",
            &format!("/devices/{}/bind", w.d3),
            json!({"elder_id": w.e2}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["elder_id"], w.e2);
    let r = w
        .post(
            "supervisor",
            &format!("/devices/{}/bind", w.d3),
            json!({"elder_id": w.e3}),
        )
        .await;
    assert_problem(&r, 404);
    let r = w
        .post(
            "supervisor",
            &format!("/devices/{}/bind", w.d3),
            json!({"elder_id": w.e1b}),
        )
        .await;
    assert_eq!(r.status, 200);
    let r = w.get("gw1", &format!("/devices/{}/bindings", w.d3)).await;
    let hist = r.body["items"].as_array().unwrap();
    assert_eq!(hist.len(), 2);
    assert_eq!(hist[0]["elder_id"], w.e1b);
    assert!(hist[0]["unbound_at"].is_null());
    // The earlier wearer is in another grid: not named to gw1.
    assert!(hist[1]["elder_id"].is_null() && hist[1]["unbound_at"].is_string());
    assert_eq!(
        w.get("gw2", &format!("/devices/{}/bindings", w.d3))
            .await
            .status,
        404
    );
    let r = w
        .call(
            Method::POST,
            &format!("/devices/{}/unbind", w.d3),
            Some(&w.tokens["supervisor"]),
            None,
        )
        .await;
    assert_eq!(r.status, 204);
    assert_problem(
        &w.get("supervisor", &format!("/devices/{}", w.d3)).await,
        404,
    );

    // Users (admin).
    let r = w.post("admin", "/users", json!({"username": format!("{}-new", w.tag), "role": "grid_worker", "password": "long enough pw", "regions": [w.code("G2")]})).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = w.post("admin", "/users", json!({"username": format!("{}-new", w.tag), "role": "grid_worker", "password": "long enough pw", "regions": [w.code("G2")]})).await;
    assert_problem(&r, 409);
    let r = w
        .get("admin", &format!("/users?role=grid_worker&q={}", w.tag))
        .await;
    assert_eq!(r.body["items"].as_array().unwrap().len(), 3);
    let r = w
        .call(
            Method::DELETE,
            &format!("/users/{}", w.username("gw2")),
            Some(&w.tokens["admin"]),
            None,
        )
        .await;
    assert_eq!(r.status, 204);
    assert_problem(&w.get("gw2", "/elders").await, 401);

    // Regions (admin) and contacts (admin, supervisor).
    let r = w.post("admin", "/regions", json!({"code": w.code("G3"), "name": "第三网格", "level": "grid", "parent": w.code("M")})).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_field(
        &w.post(
            "admin",
            "/regions",
            json!({"code": w.code("X"), "name": "x", "level": "grid"}),
        )
        .await,
        "parent",
    );
    let r = w.post("supervisor", "/contacts", json!({"name": "周网格", "phone": "13912345678", "link": {"elder_id": w.e2, "role": "grid_worker"}})).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["roles"], json!(["grid_worker"]));
    assert_field(
        &w.post(
            "supervisor",
            "/contacts",
            json!({"name": "x", "phone": "123"}),
        )
        .await,
        "phone",
    );
    let r = w
        .get("supervisor", &format!("/contacts?elder_id={}", w.e2))
        .await;
    assert_eq!(r.body["items"].as_array().unwrap().len(), 1);

    // The OpenAPI document describes all of it, with the bearer scheme.
    let r = w.call(Method::GET, "/openapi.json", None, None).await;
    assert_eq!(r.status, 200);
    assert!(r.body["openapi"].as_str().unwrap().starts_with("3."));
    for p in [
        "/api/v1/elders/{id}/telemetry",
        "/api/v1/alerts/{id}/ack",
        "/api/v1/auth/token",
        "/api/v1/dashboard",
    ] {
        assert!(r.body["paths"][p].is_object(), "{p} documented");
    }
    assert_eq!(
        r.body["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    assert!(r.body["components"]["schemas"]["Problem"].is_object());
    w.stop().await;
}
