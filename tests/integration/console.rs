//! The console, tested as people use it: over HTTP (sessions, CSRF, scoping, escaping) and
//! in a real headless Chromium driven through chromedriver (WebDriver), with a live SOS
//! from a simulated bracelet appearing on the board and being acknowledged there.
//!
//! The browser test needs Debian's `chromium` and `chromium-driver` (scripts/test.sh installs
//! them). Without them it is skipped with a message, except under CI (`CI=true`), where a
//! missing browser fails the test. It saves screenshots to `target/screenshots/`, and with
//! `SILVERGUARD_UPDATE_SCREENSHOTS=1` also to `docs/screenshots/`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use firmware_sim::send::{send_one, OneShot};
use silverguard::api::auth::{self, NewUser, UserRole};
use silverguard_proto::v1 as pb;

use crate::alerts::{alert_settings, household, Household};
use crate::helpers::*;

const PASSWORD: &str = "correct horse 7";

/// A city, a township, a community and two grids; the household's elder lives in grid A,
/// a second elder (another grid worker's) in grid B.
struct Community {
    h: Household,
    other_elder: i64,
    other_device: String,
    grid_a: i64,
}

async fn community(db: &TestDb, tag: &str) -> Community {
    let h = household(db, tag).await;
    let c = db.client().await;
    let mut ids = Vec::new();
    let mut parent: Option<i64> = None;
    for (level, code, name) in [
        ("city", format!("{tag}-hz"), "杭州市"),
        ("township", format!("{tag}-xh"), "西湖区文新街道"),
        ("community", format!("{tag}-ws"), "文三社区"),
    ] {
        let id: i64 = c
            .query_one(
                "INSERT INTO regions (parent_id, level, code, name) VALUES ($1, $2, $3, $4) RETURNING id",
                &[&parent, &level, &code, &name],
            )
            .await
            .unwrap()
            .get(0);
        ids.push(id);
        parent = Some(id);
    }
    let grid = |code: String, name: &'static str| {
        let c = &c;
        async move {
            c.query_one(
                "INSERT INTO regions (parent_id, level, code, name) VALUES ($1, 'grid', $2, $3) RETURNING id",
                &[&parent, &code, &name],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
        }
    };
    let grid_a = grid(format!("{tag}-g1"), "第一网格").await;
    let grid_b = grid(format!("{tag}-g2"), "第二网格").await;
    c.execute(
        "UPDATE elders SET region_id = $2, phone = '13900000001', categories = '{living_alone,special_hardship}',
                conditions = '{高血压,糖尿病}', medications = '{二甲双胍}', birth_date = '1942-03-08',
                gender = 'female'
          WHERE id = $1",
        &[&h.elder_id, &grid_a],
    )
    .await
    .unwrap();
    let other_device = unique(&format!("{tag}b-"));
    provision(db, vec![other_device.clone()]).await;
    let other_elder: i64 = c
        .query_one(
            "INSERT INTO elders (name, address, region_id) VALUES ('李建国', '文三路 9 号', $1) RETURNING id",
            &[&grid_b],
        )
        .await
        .unwrap()
        .get(0);
    c.execute(
        "UPDATE devices SET elder_id = $1 WHERE device_id = $2",
        &[&other_elder, &other_device],
    )
    .await
    .unwrap();
    Community {
        h,
        other_elder,
        other_device,
        grid_a,
    }
}

/// Users: a grid worker of grid A, a community supervisor, the elder's guardian, and the
/// grid worker of grid B.
async fn users(db: &TestDb, tag: &str, comm: &Community) {
    let mut s = silverguard::config::Settings::default();
    s.database.url = silverguard::config::Secret::new(db.url.clone());
    let pool = silverguard::store::build_pool(&s.database).expect("pool");
    let c = db.client().await;
    let guardian_contact: i64 = c
        .query_one(
            "SELECT id FROM contacts WHERE phone = $1",
            &[&comm.h.guardian_phone],
        )
        .await
        .unwrap()
        .get(0);
    let grid_code = |n: &str| format!("{tag}-{n}");
    for (username, name, role, regions, contact, lang) in [
        (
            "wang",
            "王网格",
            UserRole::GridWorker,
            vec![grid_code("g1")],
            None,
            "zh-CN",
        ),
        (
            "zhang",
            "张主任",
            UserRole::Supervisor,
            vec![grid_code("ws")],
            None,
            "zh-CN",
        ),
        (
            "xiaoming",
            "王小明",
            UserRole::Guardian,
            vec![],
            Some(guardian_contact.to_string()),
            "en",
        ),
        (
            "li",
            "李网格",
            UserRole::GridWorker,
            vec![grid_code("g2")],
            None,
            "zh-CN",
        ),
    ] {
        auth::upsert_user(
            &pool,
            &NewUser {
                username: username.into(),
                display_name: Some(name.into()),
                role,
                password: PASSWORD.into(),
                regions,
                contact,
                language: Some(lang.into()),
            },
        )
        .await
        .expect("user");
    }
    pool.close();
}

async fn press(broker: &TestBroker, device: &str, seq: u64, kind: pb::EventKind) {
    let ev = OneShot::Event(pb::Event {
        seq,
        occurred_at_ms: chrono::Utc::now().timestamp_millis(),
        kind: kind as i32,
        battery_pct: 64,
        location: Some(pb::Location {
            lat_e7: 302_741_000,
            lon_e7: 1_201_551_000,
            accuracy_m: 8,
            source: 1,
        }),
        device_id: device.to_string(),
    });
    send_one(&broker.url(), device, &ev, 1, Duration::from_secs(10))
        .await
        .expect("event published");
}

/// A day of plausible 5-minute readings, so the elder page's charts have something to draw.
async fn a_day_of_vitals(db: &TestDb, device: &str) {
    let c = db.client().await;
    c.execute(
        "INSERT INTO heartbeats (device_id, ts, seq, received_at, heart_rate_bpm, spo2_pct,
                                 systolic_mmhg, diastolic_mmhg, skin_temp_dc, steps_today,
                                 battery_pct, worn)
         SELECT $1, t, (extract(epoch FROM t))::bigint, t,
                (72 + 8 * sin(extract(epoch FROM t) / 5400) + random() * 6)::int2,
                (96 + random() * 3)::int2,
                (128 + 10 * sin(extract(epoch FROM t) / 9000) + random() * 6)::int2,
                (80 + 5 * sin(extract(epoch FROM t) / 9000) + random() * 4)::int2,
                (362 + 3 * sin(extract(epoch FROM t) / 7000))::int2,
                1000, 64, true
           FROM generate_series(now() - interval '23 hours 55 minutes', now() - interval '4 hours', interval '5 minutes') t
          UNION ALL
         SELECT $1, t, (extract(epoch FROM t))::bigint, t, (78 + random() * 5)::int2, 97, 132, 84, 365, 2300, 63, true
           FROM generate_series(now() - interval '2 hours', now() - interval '1 minute', interval '5 minutes') t",
        &[&device],
    )
    .await
    .expect("heartbeats");
    c.execute(
        "INSERT INTO device_latest (device_id, last_seen_at, last_hb_at, heart_rate_bpm, spo2_pct,
                                    systolic_mmhg, diastolic_mmhg, skin_temp_dc, steps_today,
                                    battery_pct, worn, online)
         VALUES ($1, now(), now() - interval '1 minute', 80, 97, 132, 84, 365, 2300, 63, true, true)
         ON CONFLICT (device_id) DO UPDATE SET last_seen_at = now(), last_hb_at = EXCLUDED.last_hb_at,
             heart_rate_bpm = 80, spo2_pct = 97, systolic_mmhg = 132, diastolic_mmhg = 84,
             skin_temp_dc = 365, steps_today = 2300, battery_pct = 63, worn = true, online = true",
        &[&device],
    )
    .await
    .expect("latest");
}

// ------------------------------------------------------------------------------------------
// HTTP without a browser
// ------------------------------------------------------------------------------------------

struct Web {
    base: String,
    http: reqwest::Client,
    cookie: Option<String>,
}

impl Web {
    fn new(app: &RunningApp) -> Web {
        Web {
            base: format!("http://{}", app.http),
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            cookie: None,
        }
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        let mut r = self.http.get(format!("{}{path}", self.base));
        if let Some(c) = &self.cookie {
            r = r.header("cookie", c);
        }
        r.send().await.expect("GET")
    }

    async fn post(&self, path: &str, form: &[(&str, &str)]) -> reqwest::Response {
        let mut r = self.http.post(format!("{}{path}", self.base)).form(form);
        if let Some(c) = &self.cookie {
            r = r.header("cookie", c);
        }
        r.send().await.expect("POST")
    }

    async fn login(&mut self, user: &str, password: &str) -> reqwest::Response {
        let res = self
            .post(
                "/login",
                &[("username", user), ("password", password), ("next", "/")],
            )
            .await;
        if let Some(v) = res.headers().get("set-cookie") {
            let v = v.to_str().unwrap();
            self.cookie = Some(v.split(';').next().unwrap().to_string());
        }
        res
    }

    /// The CSRF token from a page's forms.
    async fn csrf(&self) -> String {
        let body = self.get("/").await.text().await.unwrap();
        let i = body.find("name=\"csrf\" value=\"").expect("csrf field") + 19;
        body[i..i + body[i..].find('"').unwrap()].to_string()
    }
}

async fn open_alert(db: &TestDb, elder: i64, device: &str, kind: &str) -> i64 {
    db.client()
        .await
        .query_one(
            "INSERT INTO alerts (subject, elder_id, device_id, kind, severity, occurred_at)
             VALUES ('elder:' || $1::bigint, $1::bigint, $2, $3, 'critical', now()) RETURNING id",
            &[&elder, &device, &kind],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_requires_a_session_csrf_and_scope() {
    let db = TestDb::new().await;
    let broker = TestBroker::start().await;
    let app = RunningApp::start(settings(&db, &broker)).await;
    let comm = community(&db, "h").await;
    users(&db, "h", &comm).await;
    let mine = open_alert(&db, comm.h.elder_id, &comm.h.device, "sos").await;
    let theirs = open_alert(&db, comm.other_elder, &comm.other_device, "fall").await;
    let mut web = Web::new(&app);

    // No session: pages redirect to the login form, the stream answers 401.
    for path in [
        "/",
        "/alerts/1",
        "/elders",
        "/fleet",
        "/dashboard",
        "/work-orders",
    ] {
        let res = web.get(path).await;
        assert_eq!(res.status(), 303, "{path}");
        let to = res.headers()["location"].to_str().unwrap();
        assert!(to.starts_with("/login?next="), "{path} -> {to}");
    }
    assert_eq!(web.get("/console/events").await.status(), 401);
    assert_eq!(
        web.post(&format!("/alerts/{mine}/ack"), &[("csrf", "x")])
            .await
            .status(),
        303,
        "a POST without a session goes to login, changing nothing"
    );
    let login = web.get("/login").await;
    assert_eq!(login.status(), 200);
    let h = login.headers();
    assert_eq!(h["x-frame-options"], "DENY");
    let csp = h["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("frame-ancestors 'none'") && csp.contains("script-src 'self'"));
    assert!(web.get("/console/static/console.js").await.status() == 200);

    // Wrong password: the form again with the message, no cookie.
    let res = web.login("wang", "not the password").await;
    assert_eq!(res.status(), 401);
    assert!(res.text().await.unwrap().contains("用户名或密码错误"));
    assert!(web.cookie.is_none());
    let res = web.login("wang", PASSWORD).await;
    assert_eq!(res.status(), 303);
    assert_eq!(res.headers()["location"], "/");
    assert!(web.cookie.is_some());

    // The board shows the grid worker's own alert, not grid B's.
    let board = web.get("/").await.text().await.unwrap();
    assert!(board.contains(&format!("id=\"alert-{mine}\"")), "{board}");
    assert!(!board.contains(&format!("id=\"alert-{theirs}\"")));
    assert!(board.contains("紧急呼救 SOS"));
    // ?lang=en switches and is remembered in a cookie.
    let en = web.get("/?lang=en").await;
    assert!(en.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .starts_with("sg_lang=en"));
    assert!(en.text().await.unwrap().contains("SOS emergency call"));

    // Another grid's alert and elder answer 404, as does a missing one.
    assert_eq!(web.get(&format!("/alerts/{theirs}")).await.status(), 404);
    assert_eq!(
        web.get(&format!("/elders/{}", comm.other_elder))
            .await
            .status(),
        404
    );
    assert_eq!(web.get("/alerts/99999999").await.status(), 404);
    assert_eq!(
        web.get(&format!("/elders/{}", comm.h.elder_id))
            .await
            .status(),
        200
    );

    // CSRF: missing or wrong tokens are refused, and nothing changes.
    let csrf = web.csrf().await;
    let res = web.post(&format!("/alerts/{mine}/ack"), &[]).await;
    assert_eq!(res.status(), 403);
    let res = web
        .post(&format!("/alerts/{mine}/ack"), &[("csrf", "forged")])
        .await;
    assert_eq!(res.status(), 403);
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM alerts WHERE id = {mine} AND status = 'open'"
        ))
        .await,
        1
    );
    // A valid token does not open another grid's alert.
    let res = web
        .post(&format!("/alerts/{theirs}/ack"), &[("csrf", &csrf)])
        .await;
    assert_eq!(res.status(), 404);
    let res = web
        .post(
            &format!("/elders/{}/care", comm.other_elder),
            &[("csrf", &csrf), ("kind", "visit")],
        )
        .await;
    assert_eq!(res.status(), 404);

    // Resolve needs a note.
    let res = web
        .post(
            &format!("/alerts/{mine}/resolve"),
            &[("csrf", &csrf), ("note", "  ")],
        )
        .await;
    assert_eq!(res.status(), 422);
    let res = web
        .post(&format!("/alerts/{mine}/ack"), &[("csrf", &csrf)])
        .await;
    assert_eq!(res.status(), 303);
    let row = db
        .client()
        .await
        .query_one(
            "SELECT status, acknowledged_by, ack_channel FROM alerts WHERE id = $1",
            &[&mine],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "acknowledged");
    assert_eq!(row.get::<_, String>(1), "wang");
    assert_eq!(row.get::<_, String>(2), "console");
    let res = web
        .post(
            &format!("/alerts/{mine}/resolve"),
            &[("csrf", &csrf), ("note", "上门查看，老人误触，已安抚")],
        )
        .await;
    assert_eq!(res.status(), 303);
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM alerts WHERE id = {mine} AND status = 'resolved'"
        ))
        .await,
        1
    );

    // Visits and work orders from the elder page; the view is audited.
    let eid = comm.h.elder_id;
    let res = web
        .post(
            &format!("/elders/{eid}/care"),
            &[
                ("csrf", &csrf),
                ("kind", "call"),
                ("at", ""),
                ("notes", "电话问候"),
            ],
        )
        .await;
    assert_eq!(res.status(), 303);
    let res = web
        .post(
            &format!("/elders/{eid}/work-orders"),
            &[
                ("csrf", &csrf),
                ("category", "meals"),
                ("description", "午餐送餐"),
            ],
        )
        .await;
    assert_eq!(res.status(), 303);
    let wo: i64 = db
        .client()
        .await
        .query_one("SELECT id FROM work_orders WHERE elder_id = $1", &[&eid])
        .await
        .unwrap()
        .get(0);
    for (action, extra) in [
        (
            "dispatch",
            vec![("helper_name", "陈阿姨"), ("helper_phone", "13700000000")],
        ),
        ("accept", vec![]),
        ("complete", vec![("cost", "25.50"), ("note", "已送达")]),
    ] {
        let mut form = vec![("csrf", csrf.as_str())];
        form.extend(extra);
        let res = web
            .post(&format!("/work-orders/{wo}/{action}"), &form)
            .await;
        assert_eq!(res.status(), 303, "{action}");
    }
    let row = db
        .client()
        .await
        .query_one(
            "SELECT status, cost_cents, helper_name FROM work_orders WHERE id = $1",
            &[&wo],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "completed");
    assert_eq!(row.get::<_, Option<i32>>(1), Some(2550));
    assert!(
        db.count(&format!(
            "SELECT count(*) FROM access_audit WHERE action = 'view_elder' AND elder_id = {eid} AND username = 'wang'"
        ))
        .await
            >= 1
    );

    // Names from an office spreadsheet are text, never markup.
    db.client()
        .await
        .execute(
            "UPDATE elders SET name = '<script>alert(1)</script>' WHERE id = $1",
            &[&eid],
        )
        .await
        .unwrap();
    open_alert(&db, eid, &comm.h.device, "sos").await;
    let board = web.get("/").await.text().await.unwrap();
    assert!(!board.contains("<script>alert(1)"), "escaped");
    assert!(board.contains("&#60;script&#62;alert(1)") || board.contains("&lt;script&gt;"));

    // The guardian sees their own elder only; the supervisor both grids.
    let mut guardian = Web::new(&app);
    assert_eq!(guardian.login("xiaoming", PASSWORD).await.status(), 303);
    let board = guardian.get("/").await.text().await.unwrap();
    assert!(
        board.contains("SOS emergency call"),
        "guardian's language is English"
    );
    assert!(!board.contains(&format!("id=\"alert-{theirs}\"")));
    assert_eq!(
        guardian
            .get(&format!("/elders/{}", comm.other_elder))
            .await
            .status(),
        404
    );
    // Family can ask for a service but not record visits or run work orders.
    let gcsrf = guardian.csrf().await;
    let res = guardian
        .post(
            &format!("/elders/{eid}/care"),
            &[("csrf", &gcsrf), ("kind", "call")],
        )
        .await;
    assert_eq!(res.status(), 403);
    let res = guardian
        .post(&format!("/work-orders/{wo}/cancel"), &[("csrf", &gcsrf)])
        .await;
    assert_eq!(res.status(), 403);
    let res = guardian
        .post(
            &format!("/elders/{eid}/work-orders"),
            &[("csrf", &gcsrf), ("category", "housekeeping")],
        )
        .await;
    assert_eq!(res.status(), 303);
    let mut sup = Web::new(&app);
    assert_eq!(sup.login("zhang", PASSWORD).await.status(), 303);
    let board = sup.get("/").await.text().await.unwrap();
    assert!(board.contains(&format!("id=\"alert-{theirs}\"")));
    let dash = sup.get("/dashboard").await.text().await.unwrap();
    assert!(dash.contains("第一网格") && dash.contains("第二网格") && dash.contains("文三社区"));

    // Logout needs the token too, then the session is gone.
    let csrf = web.csrf().await;
    assert_eq!(web.post("/logout", &[]).await.status(), 403);
    assert_eq!(web.post("/logout", &[("csrf", &csrf)]).await.status(), 303);
    assert_eq!(web.get("/").await.status(), 303);

    // Five wrong passwords lock the name out for this client, even with the right one.
    let mut bad = Web::new(&app);
    for _ in 0..5 {
        assert_eq!(bad.login("li", "wrong password").await.status(), 401);
    }
    let res = bad.login("li", PASSWORD).await;
    assert_eq!(res.status(), 429);
    assert!(res.headers().contains_key("retry-after"));
    let _ = comm.grid_a;
    app.stop().await;
}

// ------------------------------------------------------------------------------------------
// In a real browser
// ------------------------------------------------------------------------------------------

fn browser_paths() -> Option<(PathBuf, PathBuf)> {
    let find = |names: &[&str]| {
        names
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .or_else(|| {
                names.iter().find_map(|n| {
                    let name = std::path::Path::new(n).file_name()?;
                    std::env::var_os("PATH").and_then(|paths| {
                        std::env::split_paths(&paths)
                            .map(|d| d.join(name))
                            .find(|p| p.exists())
                    })
                })
            })
    };
    let chromium = find(&["/usr/bin/chromium", "/usr/bin/chromium-browser"])?;
    let driver = find(&["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"])?;
    Some((chromium, driver))
}

struct Driver {
    child: Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_driver(driver: &std::path::Path) -> Driver {
    let port = free_port();
    let child = Command::new(driver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    let d = Driver { child, port };
    wait_until(
        "chromedriver listens",
        Duration::from_secs(20),
        || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        },
    )
    .await;
    d
}

async fn browser(chromium: &std::path::Path, driver: &Driver) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": chromium,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=412,915", "--hide-scrollbars", "--force-device-scale-factor=1",
                "--autoplay-policy=no-user-gesture-required", "--lang=zh-CN",
                "--no-first-run", "--disable-extensions", "--mute-audio"
            ],
            // The login page follows the browser's language until a user is known.
            "prefs": { "intl.accept_languages": "zh-CN,zh" }
        }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("WebDriver session with headless Chromium")
}

struct Shots {
    dir: PathBuf,
    docs: Option<PathBuf>,
}

impl Shots {
    fn new() -> Shots {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let dir = root.join("target/screenshots");
        std::fs::create_dir_all(&dir).expect("target/screenshots");
        let docs = (std::env::var("SILVERGUARD_UPDATE_SCREENSHOTS").as_deref() == Ok("1"))
            .then(|| root.join("docs/screenshots"));
        if let Some(d) = &docs {
            std::fs::create_dir_all(d).expect("docs/screenshots");
        }
        Shots { dir, docs }
    }

    async fn take(&self, b: &Client, name: &str) {
        // Let fonts and transitions settle.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let png = b.screenshot().await.expect("screenshot");
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        std::fs::write(self.dir.join(format!("{name}.png")), &png).expect("write screenshot");
        if let Some(d) = &self.docs {
            std::fs::write(d.join(format!("{name}.png")), &png).expect("write docs screenshot");
        }
    }
}

async fn js(b: &Client, script: &str) -> serde_json::Value {
    b.execute(script, vec![]).await.expect("script")
}

async fn log_in(b: &Client, base: &str, user: &str) {
    b.goto(&format!("{base}/login")).await.unwrap();
    b.find(Locator::Css("#username"))
        .await
        .unwrap()
        .send_keys(user)
        .await
        .unwrap();
    b.find(Locator::Css("#password"))
        .await
        .unwrap()
        .send_keys(PASSWORD)
        .await
        .unwrap();
    b.find(Locator::Css("#login"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    b.wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css("#board"))
        .await
        .expect("the board after login");
}

async fn log_out(b: &Client) {
    b.find(Locator::Css("form[action='/logout'] button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    b.wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css("#login-form"))
        .await
        .expect("back at the login form");
}

async fn wait_live(b: &Client) {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let v = js(b, "return document.body.getAttribute('data-live');").await;
        if v == "on" {
            return;
        }
        assert!(Instant::now() < end, "the board's SSE stream never opened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn board_ids(b: &Client) -> Vec<String> {
    let v = js(
        b,
        "return Array.from(document.querySelectorAll('#alerts li')).map(li => li.id);",
    )
    .await;
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grid_worker_sees_an_sos_live_and_acknowledging_stops_escalation() {
    let Some((chromium, driver_bin)) = browser_paths() else {
        if std::env::var("CI")
            .map(|v| v == "true" || v == "1")
            .unwrap_or(false)
        {
            panic!("CI: chromium and chromedriver are required (apt-get install chromium chromium-driver; scripts/test.sh does)");
        }
        eprintln!("SKIPPED: no /usr/bin/chromium or chromedriver (apt-get install chromium chromium-driver)");
        return;
    };
    let db = TestDb::new().await;
    let broker = TestBroker::start().await;
    let smtp = SmtpSink::start().await;
    let sms = CaptureServer::start().await;
    // Step 1 (backup grid worker, community supervisor) 8 s after the SOS; step 2 later.
    let app = RunningApp::start(alert_settings(&db, &broker, &smtp, &sms, 8, 60)).await;
    let base = format!("http://{}", app.http);
    let comm = community(&db, "b").await;
    users(&db, "b", &comm).await;
    a_day_of_vitals(&db, &comm.h.device).await;
    // A few more bracelets for the fleet page: one silent, one nearly flat.
    let spare = vec![unique("fleet-silent-"), unique("fleet-low-")];
    provision(&db, spare.clone()).await;
    let c = db.client().await;
    c.execute(
        "UPDATE devices SET elder_id = $1, model = 'SG-B2' WHERE device_id = ANY($2)",
        &[&comm.h.elder_id, &spare],
    )
    .await
    .unwrap();
    c.execute(
        "INSERT INTO device_latest (device_id, last_seen_at, battery_pct, worn, online, silent_after)
         VALUES ($1, now() - interval '3 hours', 41, false, false, now() - interval '2 hours'),
                ($2, now() - interval '30 seconds', 9, true, true, now() + interval '5 minutes')",
        &[&spare[0], &spare[1]],
    )
    .await
    .unwrap();
    // Earlier alerts, for the dashboard's response times.
    c.execute(
        "INSERT INTO alerts (subject, elder_id, device_id, kind, severity, status, opened_at,
                             occurred_at, acknowledged_at, acknowledged_by, ack_channel, resolved_at,
                             resolved_by, resolution_note)
         SELECT 'elder:' || $1::bigint, $1::bigint, $2, 'sos', 'critical', 'resolved', now() - make_interval(hours => g),
                now() - make_interval(hours => g), now() - make_interval(hours => g) + make_interval(secs => 20 + g * 7),
                'wang', 'console', now() - make_interval(hours => g) + interval '20 minutes', 'wang', '已处理'
           FROM generate_series(2, 12) g",
        &[&comm.h.elder_id, &comm.h.device],
    )
    .await
    .unwrap();

    let driver = start_driver(&driver_bin).await;
    let b = browser(&chromium, &driver).await;
    let shots = Shots::new();

    // Log in as the grid worker, on a phone-sized window.
    b.goto(&format!("{base}/login")).await.unwrap();
    shots.take(&b, "login").await;
    log_in(&b, &base, "wang").await;
    wait_live(&b).await;
    // (The silent spare bracelet may already have raised a device_silent alert.)
    let critical = js(
        &b,
        "return document.querySelectorAll('#alerts li.sev-critical').length;",
    )
    .await;
    assert_eq!(critical, 0, "no emergency yet");
    // Turn the sound on (a click is the gesture browsers need before audio).
    b.find(Locator::Css("#sound"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let pressed = js(
        &b,
        "return document.getElementById('sound').getAttribute('aria-pressed');",
    )
    .await;
    assert_eq!(pressed, "true");
    assert_eq!(
        js(&b, "return localStorage.getItem('sg.sound');").await,
        "on",
        "the choice is remembered"
    );
    // A marker that a reload would wipe.
    js(&b, "window.__noReload = 42; return true;").await;

    // The bracelet's SOS key.
    let t0 = Instant::now();
    press(&broker, &comm.h.device, 1, pb::EventKind::Sos).await;
    let alert_id: i64 = loop {
        let v = js(
            &b,
            "const li = document.querySelector('#alerts li.sev-critical.st-open'); return li ? li.getAttribute('data-id') : null;",
        )
        .await;
        if let Some(id) = v.as_str() {
            break id.parse().unwrap();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the SOS did not appear on the board"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let appeared = t0.elapsed();
    eprintln!("SOS on the board {appeared:?} after the bracelet published it");
    assert!(
        appeared < Duration::from_millis(1000),
        "a new SOS appears within 1 s without a reload (took {appeared:?})"
    );
    assert_eq!(js(&b, "return window.__noReload;").await, 42, "no reload");
    let text = b
        .find(Locator::Css(&format!("#alert-{alert_id}")))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("王秀英b") && text.contains("紧急呼救"),
        "{text}"
    );
    assert!(text.contains("第一网格"), "{text}");
    let flashed = js(
        &b,
        "return {banner: !document.getElementById('banner').hidden, fresh: document.querySelector('#alerts li.fresh') !== null, stats: window.sgBoard};",
    )
    .await;
    assert_eq!(flashed["banner"], true, "{flashed}");
    assert_eq!(flashed["fresh"], true, "{flashed}");
    assert!(
        flashed["stats"]["beeps"].as_i64().unwrap_or(0) >= 1,
        "a beep was played: {flashed}"
    );
    shots.take(&b, "board").await;

    // Open it and acknowledge.
    b.find(Locator::Css(&format!("#alert-{alert_id} a")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let ack = b
        .wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css("#ack"))
        .await
        .expect("the acknowledge button");
    let page = b.source().await.unwrap();
    assert!(page.contains("uri.amap.com/marker?position=120.155100,30.274100"));
    assert!(page.contains("openstreetmap.org"));
    assert!(page.contains("13900000001"), "the elder's phone");
    shots.take(&b, "alert").await;
    ack.click().await.unwrap();
    b.wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css("#acked-by"))
        .await
        .expect("acknowledged");
    let acked_after = t0.elapsed();
    let row = db
        .client()
        .await
        .query_one(
            "SELECT status, acknowledged_by, ack_channel FROM alerts WHERE id = $1",
            &[&alert_id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "acknowledged");
    assert_eq!(row.get::<_, String>(1), "wang");
    assert_eq!(row.get::<_, String>(2), "console");
    assert!(
        acked_after < Duration::from_secs(7),
        "acknowledged before step 1 was due ({acked_after:?})"
    );

    // Escalation stops: step 1 was due 8 s after the SOS; wait past it.
    while t0.elapsed() < Duration::from_secs(11) {
        tokio::time::sleep(Duration::from_millis(250)).await; // waiting for something NOT to happen
    }
    assert!(
        !sms.matching(&comm.h.grid_phone).is_empty(),
        "step 0 reached the grid worker"
    );
    assert!(
        sms.matching(&comm.h.backup_phone).is_empty()
            && sms.matching(&comm.h.community_phone).is_empty(),
        "no step-1 SMS after the acknowledgement"
    );
    let c = db.client().await;
    let later: i64 = c
        .query_one(
            "SELECT count(*) FROM escalation_steps WHERE alert_id = $1 AND purpose = 'notify' AND step >= 1 AND state <> 'skipped'",
            &[&alert_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(later, 0, "later steps skipped, none pending or done");
    let skipped: i64 = c
        .query_one(
            "SELECT count(*) FROM escalation_steps WHERE alert_id = $1 AND step >= 1 AND state = 'skipped'",
            &[&alert_id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(skipped >= 1, "step 1 was scheduled and then skipped");
    let outbox_later: i64 = c
        .query_one(
            "SELECT count(*) FROM outbox WHERE alert_id = $1 AND step >= 1",
            &[&alert_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(outbox_later, 0, "no notifications for later steps");
    // The SMS links to this alert's page in the console.
    let body = &sms.matching(&comm.h.grid_phone)[0].body;
    assert!(body.contains("/ack/"), "{body}");

    // The board reflects the acknowledgement live as well.
    b.goto(&format!("{base}/")).await.unwrap();
    wait_live(&b).await;
    let status = js(
        &b,
        &format!("return document.getElementById('alert-{alert_id}').getAttribute('data-status');"),
    )
    .await;
    assert_eq!(status, "acknowledged");

    // A fall in grid B: not on this grid worker's board, and its page is a 404.
    let t1 = Instant::now();
    press(&broker, &comm.other_device, 1, pb::EventKind::Sos).await;
    let other_alert: i64 = loop {
        if let Some(r) = c
            .query_opt(
                "SELECT id FROM alerts WHERE elder_id = $1 AND kind = 'sos'",
                &[&comm.other_elder],
            )
            .await
            .unwrap()
        {
            break r.get(0);
        }
        assert!(t1.elapsed() < Duration::from_secs(5), "grid B's SOS");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    tokio::time::sleep(Duration::from_millis(800)).await; // waiting for something NOT to happen
    let ids = board_ids(&b).await;
    assert!(
        !ids.contains(&format!("alert-{other_alert}")),
        "another grid's SOS stays off this board: {ids:?}"
    );
    b.goto(&format!("{base}/alerts/{other_alert}"))
        .await
        .unwrap();
    assert!(b.source().await.unwrap().contains("没有找到"));

    // The elder's page (desktop width): profile, charts, visits, work orders.
    b.set_window_size(1280, 2400).await.unwrap();
    b.goto(&format!("{base}/elders/{}", comm.h.elder_id))
        .await
        .unwrap();
    let svg_lines = js(
        &b,
        "return document.querySelectorAll('svg.chart polyline').length;",
    )
    .await;
    assert!(
        svg_lines.as_i64().unwrap() >= 4,
        "charts drawn: {svg_lines}"
    );
    shots.take(&b, "elder").await;
    // Record a visit and open a work order from the page's forms.
    b.find(Locator::Css("#care-form textarea[name=notes]"))
        .await
        .unwrap()
        .send_keys("上门走访，血压偏高，已提醒按时服药")
        .await
        .unwrap();
    b.find(Locator::Css("#care-form button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    b.wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css(".flash.ok"))
        .await
        .expect("visit recorded");
    b.find(Locator::Css("#wo-form select option[value=medicine]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    b.find(Locator::Css("#wo-form textarea[name=description]"))
        .await
        .unwrap()
        .send_keys("代购降压药（氨氯地平）")
        .await
        .unwrap();
    // The visit's confirmation is still on the page: remove it so that the wait below sees
    // the confirmation of the work order, not the one before (a race CI once lost).
    js(
        &b,
        "document.querySelectorAll('.flash').forEach(e => e.remove()); return true;",
    )
    .await;
    b.find(Locator::Css("#wo-form button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    b.wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css(".flash.ok"))
        .await
        .expect("work order created");
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM care_contacts WHERE elder_id = {} AND kind = 'visit' AND by_name = '王网格'",
            comm.h.elder_id
        ))
        .await,
        1
    );
    let wo: i64 = db
        .client()
        .await
        .query_one(
            "SELECT id FROM work_orders WHERE elder_id = $1 AND category = 'medicine' AND source = 'console'",
            &[&comm.h.elder_id],
        )
        .await
        .unwrap()
        .get(0);
    // Dispatch it to a helper from the work-order list.
    b.set_window_size(1280, 800).await.unwrap();
    b.goto(&format!("{base}/work-orders")).await.unwrap();
    let form = format!("#wo-{wo} form[action$='/dispatch']");
    b.find(Locator::Css(&format!("{form} input[name=helper_name]")))
        .await
        .unwrap()
        .send_keys("陈阿姨")
        .await
        .unwrap();
    b.find(Locator::Css(&format!("{form} input[name=helper_phone]")))
        .await
        .unwrap()
        .send_keys("13700000000")
        .await
        .unwrap();
    b.find(Locator::Css(&format!("{form} button")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    b.wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css(".flash.ok"))
        .await
        .expect("dispatched");
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM work_orders WHERE id = {wo} AND status = 'dispatched' AND helper_name = '陈阿姨'"
        ))
        .await,
        1
    );
    shots.take(&b, "work-orders").await;

    // The fleet, with the silent bracelet first.
    b.set_window_size(1280, 800).await.unwrap();
    b.goto(&format!("{base}/fleet")).await.unwrap();
    let first = js(
        &b,
        "return document.querySelector('#fleet tbody tr').getAttribute('data-device');",
    )
    .await;
    assert_eq!(first, spare[0].as_str(), "silent bracelets come first");
    shots.take(&b, "fleet").await;
    log_out(&b).await;

    // The supervisor sees both grids, and the region dashboard.
    b.set_window_size(412, 915).await.unwrap();
    log_in(&b, &base, "zhang").await;
    wait_live(&b).await;
    let ids = board_ids(&b).await;
    assert!(
        ids.contains(&format!("alert-{other_alert}")) && ids.contains(&format!("alert-{alert_id}")),
        "{ids:?}"
    );
    b.set_window_size(1280, 800).await.unwrap();
    b.goto(&format!("{base}/dashboard")).await.unwrap();
    let dash = b.source().await.unwrap();
    assert!(dash.contains("第二网格") && dash.contains("文三社区"));
    shots.take(&b, "dashboard").await;
    b.goto(&format!("{base}/work-orders?status=all"))
        .await
        .unwrap();
    log_out(&b).await;

    // The guardian (English) sees their own elder only.
    b.set_window_size(412, 915).await.unwrap();
    log_in(&b, &base, "xiaoming").await;
    wait_live(&b).await;
    let ids = board_ids(&b).await;
    assert!(ids.contains(&format!("alert-{alert_id}")), "{ids:?}");
    assert!(
        !ids.contains(&format!("alert-{other_alert}")),
        "only their elder: {ids:?}"
    );
    assert!(b.source().await.unwrap().contains("Live alerts"));
    b.goto(&format!("{base}/elders/{}", comm.other_elder))
        .await
        .unwrap();
    assert!(b.source().await.unwrap().contains("Not found"));

    b.close().await.unwrap();
    drop(driver);
    app.stop().await;
}
