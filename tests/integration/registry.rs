//! Who answers: the elder / contact registry through the real `silverguard` binary (as
//! operators and scripts use it) and through the library (as the alert engine uses it),
//! against a fresh PostgreSQL database per test.

use std::path::PathBuf;
use std::process::Output;

use silverguard::config::{Secret, Settings};
use silverguard::store::devices;
use silverguard::store::regions::{self, Level};
use silverguard::store::registry::{self, ContactKey, ElderKey, NewContact, NewElder, Role};

use crate::helpers::*;

async fn migrated_pool(db: &TestDb) -> silverguard::store::PgPool {
    let mut s = Settings::default();
    s.database.url = Secret::new(db.url.clone());
    let pool = silverguard::store::build_pool(&s.database).expect("pool");
    silverguard::store::migrate::run(&pool)
        .await
        .expect("migrate");
    pool
}

/// Runs `silverguard ARGS` against the test database.
async fn sg(db: &TestDb, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_silverguard"))
        .args(args)
        .env("SILVERGUARD_DATABASE_URL", &db.url)
        .env_remove("SILVERGUARD_CONFIG")
        .env("RUST_BACKTRACE", "0")
        .output()
        .await
        .expect("run silverguard")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs a command that must succeed; returns its standard output.
async fn ok(db: &TestDb, args: &[&str]) -> String {
    let o = sg(db, args).await;
    assert!(
        o.status.success(),
        "silverguard {args:?} failed: {}{}",
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

/// Runs a command that must fail; returns its standard error.
async fn fails(db: &TestDb, args: &[&str]) -> String {
    let o = sg(db, args).await;
    assert!(
        !o.status.success(),
        "silverguard {args:?} should have failed: {}",
        stdout(&o)
    );
    stderr(&o)
}

fn example(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("examples/registry")
        .join(name)
        .display()
        .to_string()
}

fn id_of(out: &str) -> i64 {
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("expected an id, got {out:?}"))
}

#[tokio::test]
async fn registry_cli_manages_elders_and_contacts() {
    let db = TestDb::new().await;
    let _pool = migrated_pool(&db).await;

    let elder = id_of(
        &ok(
            &db,
            &[
                "elder",
                "add",
                "--name",
                "张桂英",
                "--ref",
                "HB-T-001",
                "--birth-date",
                "1938-04-17",
                "--id-number",
                "11010519491231002X",
                "--phone",
                "138 0000 1001",
                "--address",
                "杭州市上城区湖滨街道东坡路18号2幢301室",
                "--community",
                "湖滨街道东坡路社区",
                "--home",
                "30.2587,120.1652",
                "--radius-m",
                "250",
                "--wander-risk",
                "--language",
                "zh-CN",
                "--thresholds",
                r#"{"hr_high": {"above": 120, "for": "5m"}}"#,
            ],
        )
        .await,
    );
    // The same ref again updates, and keeps what was not given.
    let again = ok(
        &db,
        &["elder", "add", "--name", "张桂英", "--ref", "HB-T-001"],
    )
    .await;
    assert_eq!(id_of(&again), elder);
    let c = db.client().await;
    let row = c
        .query_one(
            "SELECT phone, home_lat_e7, home_lon_e7, home_radius_m, wander_risk, thresholds
             FROM elders WHERE id = $1",
            &[&elder],
        )
        .await
        .expect("elder row");
    assert_eq!(
        row.get::<_, Option<String>>(0).as_deref(),
        Some("13800001001")
    );
    assert_eq!(row.get::<_, Option<i32>>(1), Some(302_587_000));
    assert_eq!(row.get::<_, Option<i32>>(2), Some(1_201_652_000));
    assert_eq!(row.get::<_, i32>(3), 250);
    assert!(row.get::<_, bool>(4));
    assert_eq!(
        row.get::<_, serde_json::Value>(5),
        serde_json::json!({"hr_high": {"above": 120, "for": "5m"}})
    );

    // Bad input: non-zero exit, a message naming the field, nothing written.
    let err = fails(&db, &["elder", "add", "--name", "X", "--language", "fr"]).await;
    assert!(err.contains("unknown language \"fr\""), "{err}");
    let err = fails(
        &db,
        &["elder", "add", "--name", "X", "--birth-date", "1938-02-30"],
    )
    .await;
    assert!(err.contains("--birth-date"), "{err}");
    let err = fails(
        &db,
        &[
            "elder",
            "add",
            "--name",
            "X",
            "--thresholds",
            r#"{"hr_high": {"below": 40, "for": "2m"}}"#,
        ],
    )
    .await;
    assert!(err.contains("hr_high: use \"above\""), "{err}");
    let err = fails(&db, &["elder", "add", "--name", "X", "--home", "91,120"]).await;
    assert!(err.contains("latitude"), "{err}");
    assert_eq!(db.count("SELECT count(*) FROM elders").await, 1);

    // Contacts: the same phone, written differently, is the same person.
    let gw = id_of(
        &ok(
            &db,
            &["contact", "add", "--name", "王芳", "--phone", "13800000101"],
        )
        .await,
    );
    let gw_again = ok(
        &db,
        &[
            "contact",
            "add",
            "--name",
            "王芳",
            "--phone",
            "+86 138-0000-0101",
            "--email",
            "wangfang@example.com",
        ],
    )
    .await;
    assert_eq!(id_of(&gw_again), gw);
    let g1 = id_of(
        &ok(
            &db,
            &[
                "contact",
                "add",
                "--name",
                "李建国",
                "--phone",
                "13900001001",
                "--language",
                "en",
            ],
        )
        .await,
    );
    let g2 = id_of(
        &ok(
            &db,
            &[
                "contact",
                "add",
                "--name",
                "李秀兰",
                "--ref",
                "G-2",
                "--phone",
                "13900001002",
            ],
        )
        .await,
    );
    let err = fails(&db, &["contact", "add", "--name", "X", "--phone", "12345"]).await;
    assert!(err.contains("--phone"), "{err}");
    let err = fails(
        &db,
        &["contact", "add", "--name", "X", "--email", "not-an-email"],
    )
    .await;
    assert!(err.contains("--email"), "{err}");

    ok(
        &db,
        &[
            "contact",
            "link",
            "--elder",
            "ref:HB-T-001",
            "--contact",
            &gw.to_string(),
            "--role",
            "grid_worker",
        ],
    )
    .await;
    ok(
        &db,
        &[
            "contact",
            "link",
            "--elder",
            &elder.to_string(),
            "--contact",
            "ref:G-2",
            "--role",
            "guardian",
            "--priority",
            "2",
        ],
    )
    .await;
    ok(
        &db,
        &[
            "contact",
            "link",
            "--elder",
            &elder.to_string(),
            "--contact",
            "phone:13900001001",
            "--role",
            "guardian",
            "--priority",
            "1",
        ],
    )
    .await;
    let err = fails(
        &db,
        &[
            "contact",
            "link",
            "--elder",
            "ref:HB-T-001",
            "--contact",
            "999",
            "--role",
            "guardian",
        ],
    )
    .await;
    assert!(err.contains("contact 999 not found"), "{err}");
    let err = fails(
        &db,
        &[
            "contact",
            "link",
            "--elder",
            "ref:HB-T-001",
            "--contact",
            "1",
            "--role",
            "nephew",
        ],
    )
    .await;
    assert!(err.contains("unknown role"), "{err}");

    let shown: serde_json::Value =
        serde_json::from_str(&ok(&db, &["elder", "show", "--ref", "HB-T-001", "--json"]).await)
            .expect("show --json is JSON");
    assert_eq!(shown["elder"]["id"], elder);
    assert_eq!(shown["elder"]["home"]["lat_e7"], 302_587_000);
    let who = &shown["who_answers"];
    assert_eq!(who["grid_workers"][0]["id"], gw);
    assert_eq!(who["grid_workers"][0]["email"], "wangfang@example.com");
    assert_eq!(who["guardians"][0]["id"], g1, "priority 1 first");
    assert_eq!(who["guardians"][0]["language"], "en");
    assert_eq!(who["guardians"][1]["id"], g2);
    let text = ok(&db, &["elder", "show", &elder.to_string()]).await;
    assert!(
        text.contains("张桂英") && text.contains("grid_worker"),
        "{text}"
    );

    let list = ok(&db, &["elder", "list", "--json"]).await;
    assert_eq!(list.lines().count(), 1);
    let contacts = ok(&db, &["contact", "list", "--json"]).await;
    assert_eq!(contacts.lines().count(), 3);

    // Thresholds: validated, replaced as a whole, '{}' restores the defaults.
    let err = fails(
        &db,
        &[
            "elder",
            "set-thresholds",
            "ref:HB-T-001",
            r#"{"spo2_low": {"below": 90, "for": "soon"}}"#,
        ],
    )
    .await;
    assert!(err.contains("spo2_low: \"for\""), "{err}");
    ok(
        &db,
        &[
            "elder",
            "set-thresholds",
            "ref:HB-T-001",
            r#"{"spo2_low": {"below": 88, "for": "120s"}}"#,
        ],
    )
    .await;
    let t: serde_json::Value = c
        .query_one("SELECT thresholds FROM elders WHERE id = $1", &[&elder])
        .await
        .expect("thresholds")
        .get(0);
    assert_eq!(
        t,
        serde_json::json!({"spo2_low": {"below": 88, "for": "2m"}})
    );

    // elder set: partial updates, including clearing the home.
    ok(
        &db,
        &[
            "elder",
            "set",
            "ref:HB-T-001",
            "--wander-risk",
            "false",
            "--language",
            "en",
            "--clear-home",
        ],
    )
    .await;
    let row = c
        .query_one(
            "SELECT wander_risk, language, home_lat_e7 FROM elders WHERE id = $1",
            &[&elder],
        )
        .await
        .expect("elder row");
    assert!(!row.get::<_, bool>(0));
    assert_eq!(row.get::<_, String>(1), "en");
    assert_eq!(row.get::<_, Option<i32>>(2), None);

    // Bracelets: an unknown IMEI is refused unless --provision.
    let err = fails(
        &db,
        &["elder", "bind-device", "ref:HB-T-001", "860000000000999"],
    )
    .await;
    assert!(err.contains("not provisioned"), "{err}");
    ok(
        &db,
        &[
            "elder",
            "bind-device",
            "ref:HB-T-001",
            "860000000000999",
            "--provision",
        ],
    )
    .await;
    let bound: Option<i64> = c
        .query_one(
            "SELECT elder_id FROM devices WHERE device_id = '860000000000999'",
            &[],
        )
        .await
        .expect("device")
        .get(0);
    assert_eq!(bound, Some(elder));

    // Unlink, remove: links go, the bracelet stays provisioned and unbound.
    ok(
        &db,
        &[
            "contact",
            "unlink",
            "--elder",
            "ref:HB-T-001",
            "--contact",
            "ref:G-2",
        ],
    )
    .await;
    let err = fails(
        &db,
        &[
            "contact",
            "unlink",
            "--elder",
            "ref:HB-T-001",
            "--contact",
            "ref:G-2",
        ],
    )
    .await;
    assert!(err.contains("not found"), "{err}");
    let out = sg(&db, &["contact", "remove", &gw.to_string()]).await;
    assert!(out.status.success());
    assert!(
        stderr(&out).contains(&format!("elder {elder} has no grid worker")),
        "{}",
        stderr(&out)
    );
    ok(&db, &["elder", "remove", "--ref", "HB-T-001"]).await;
    let err = fails(&db, &["elder", "show", &elder.to_string()]).await;
    assert!(err.contains("not found"), "{err}");
    assert_eq!(db.count("SELECT count(*) FROM elder_contacts").await, 0);
    assert_eq!(
        db.count("SELECT count(*) FROM devices WHERE elder_id IS NULL")
            .await,
        1
    );
}

#[tokio::test]
async fn registry_import_examples_is_idempotent() {
    let db = TestDb::new().await;
    let pool = migrated_pool(&db).await;
    let csv = example("community.csv");
    let toml = example("community.toml");

    let dry = ok(&db, &["import", &csv, "--dry-run"]).await;
    assert!(dry.contains("dry run"), "{dry}");
    assert!(dry.contains("elders:   4 created"), "{dry}");
    assert_eq!(db.count("SELECT count(*) FROM elders").await, 0);
    assert_eq!(db.count("SELECT count(*) FROM contacts").await, 0);
    assert_eq!(db.count("SELECT count(*) FROM devices").await, 0);

    ok(&db, &["import", &csv]).await;
    ok(&db, &["import", &toml]).await;
    let counts = || async {
        (
            db.count("SELECT count(*) FROM elders").await,
            db.count("SELECT count(*) FROM contacts").await,
            db.count("SELECT count(*) FROM elder_contacts").await,
            db.count("SELECT count(*) FROM devices WHERE elder_id IS NOT NULL")
                .await,
        )
    };
    // 7 elders; the grid workers, backup and township supervisor are one contact each,
    // however many elders they serve (10 in the CSV + 8 in the TOML, 2 shared).
    assert_eq!(counts().await, (7, 16, 38, 8));
    assert_eq!(
        db.count("SELECT count(DISTINCT phone) FROM contacts").await,
        16,
        "no phone twice"
    );

    // Running both again changes nothing.
    for file in [&csv, &toml] {
        let out = ok(&db, &["import", file, "--json"]).await;
        let s: serde_json::Value = serde_json::from_str(&out).expect("summary JSON");
        for k in [
            "elders_created",
            "elders_updated",
            "contacts_created",
            "contacts_updated",
            "links_set",
            "links_removed",
            "devices_provisioned",
            "devices_bound",
        ] {
            assert_eq!(s[k], 0, "{k} on re-import of {file}: {s}");
        }
    }
    assert_eq!(counts().await, (7, 16, 38, 8));

    // What was imported is what the alert engine reads.
    let e = registry::get_elder(&pool, &ElderKey::Ref("HB-QNL-001".into()))
        .await
        .expect("imported elder");
    assert_eq!(e.name, "钱玉珍");
    assert!(e.wander_risk);
    assert_eq!(e.home_radius_m, 250);
    assert_eq!(e.devices, vec!["860000000000201".to_string()]);
    let t = e.threshold_overrides().expect("valid thresholds");
    assert!(t.get(registry::ThresholdKey::HrHigh).is_some());
    let who = registry::who_answers(&pool, e.id)
        .await
        .expect("who answers");
    assert_eq!(who.grid_workers.len(), 1);
    assert_eq!(who.grid_workers[0].name, "陈静");
    assert_eq!(
        who.guardians
            .iter()
            .map(|g| g.name.as_str())
            .collect::<Vec<_>>(),
        ["钱伟明", "钱伟芳"]
    );
    assert_eq!(
        who.township_supervisors[0].phone.as_deref(),
        Some("13800000301")
    );
    let e3 = registry::get_elder(&pool, &ElderKey::Ref("HB-DPL-003".into()))
        .await
        .expect("imported elder");
    let who3 = registry::who_answers(&pool, e3.id)
        .await
        .expect("who answers");
    assert_eq!(who3.guardians[0].phone.as_deref(), Some("+447700900123"));
    assert_eq!(who3.guardians[0].language, registry::Language::En);
    assert_eq!(e3.devices.len(), 2);
    assert_eq!(
        db.count(
            "SELECT count(*) FROM elder_contacts ec JOIN contacts c ON c.id = ec.contact_id
             WHERE c.phone = '13800000101' AND ec.role = 'grid_worker'"
        )
        .await,
        4,
        "one grid worker serves the four elders of the CSV"
    );

    // The ledger changes the grid worker of one elder: the old link goes.
    let edited = tempfile::Builder::new()
        .suffix(".csv")
        .tempfile()
        .expect("tempfile");
    let text = std::fs::read_to_string(&csv)
        .expect("read example")
        .replacen(
            "HB-DPL-001,张桂英,,1938-04-17,13800001001,杭州市上城区湖滨街道东坡路18号2幢301室,湖滨街道东坡路社区,30.2587,120.1652,300,false,zh-CN,860000000000101,王芳,13800000101",
            "HB-DPL-001,张桂英,,1938-04-17,13800001001,杭州市上城区湖滨街道东坡路18号2幢301室,湖滨街道东坡路社区,30.2587,120.1652,300,false,zh-CN,860000000000101,陈静,13800000102",
            1,
        );
    std::fs::write(edited.path(), text).expect("write edited");
    let out = ok(
        &db,
        &["import", &edited.path().display().to_string(), "--json"],
    )
    .await;
    let s: serde_json::Value = serde_json::from_str(&out).expect("summary JSON");
    assert_eq!(s["links_removed"], 1, "{s}");
    assert_eq!(s["links_set"], 1, "{s}");
    let e1 = registry::get_elder(&pool, &ElderKey::Ref("HB-DPL-001".into()))
        .await
        .expect("elder");
    let who1 = registry::who_answers(&pool, e1.id)
        .await
        .expect("who answers");
    assert_eq!(who1.grid_workers.len(), 1);
    assert_eq!(who1.grid_workers[0].name, "陈静");
}

#[tokio::test]
async fn registry_broken_csv_reports_every_line_and_writes_nothing() {
    let db = TestDb::new().await;
    let _pool = migrated_pool(&db).await;
    let file = tempfile::Builder::new()
        .suffix(".csv")
        .tempfile()
        .expect("tempfile");
    // Line 2 is fine; each later line has one problem.
    std::fs::write(
        file.path(),
        "ref,name,birth_date,phone,language,devices,grid_worker_name,grid_worker_phone\n\
         OK-1,好人,1940-01-01,13800009001,zh-CN,860000000009001,王芳,13800000101\n\
         BAD-1,坏日期,1940-02-30,13800009002,zh-CN,,王芳,13800000101\n\
         BAD-2,坏电话,1940-01-01,1380000900,zh-CN,,王芳,13800000101\n\
         BAD-3,,1940-01-01,13800009004,zh-CN,,王芳,13800000101\n\
         BAD-4,坏语言,1940-01-01,13800009005,fr,,王芳,13800000101\n",
    )
    .expect("write csv");
    let path = file.path().display().to_string();
    for args in [vec!["import", &path], vec!["import", &path, "--dry-run"]] {
        let err = fails(&db, &args).await;
        assert!(err.contains("4 problem(s), nothing was imported"), "{err}");
        assert!(
            err.contains("line 3, birth_date: \"1940-02-30\" is not a date"),
            "{err}"
        );
        assert!(err.contains("line 4, phone: \"1380000900\""), "{err}");
        assert!(err.contains("line 5, name: is required"), "{err}");
        assert!(
            err.contains("line 6, language: unknown language \"fr\""),
            "{err}"
        );
        assert!(!err.contains("line 2"), "the good row is not blamed: {err}");
    }
    assert_eq!(db.count("SELECT count(*) FROM elders").await, 0);
    assert_eq!(db.count("SELECT count(*) FROM contacts").await, 0);
    assert_eq!(db.count("SELECT count(*) FROM devices").await, 0);

    // A header typo is caught before any row is read.
    std::fs::write(
        file.path(),
        "ref,name,gaurdian1_phone\nA,张三,13900000001\n",
    )
    .expect("write");
    let err = fails(&db, &["import", &path]).await;
    assert!(
        err.contains("line 1, gaurdian1_phone: unknown column"),
        "{err}"
    );
}

#[tokio::test]
async fn registry_import_is_all_or_nothing_on_database_conflicts() {
    let db = TestDb::new().await;
    let _pool = migrated_pool(&db).await;
    // This phone already belongs to a contact with another ref: the file is valid on its
    // own, and only the database can tell; the first elder must not be left behind.
    ok(
        &db,
        &[
            "contact",
            "add",
            "--name",
            "王芳",
            "--ref",
            "GW-A",
            "--phone",
            "13800000101",
        ],
    )
    .await;
    let file = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("tempfile");
    std::fs::write(
        file.path(),
        r#"
[[elders]]
ref = "E-1"
name = "张三"
devices = ["860000000000301"]
contacts = [{ role = "guardian", name = "张小明", phone = "13900000001" }]

[[elders]]
ref = "E-2"
name = "李四"
contacts = [{ role = "grid_worker", name = "王芳", ref = "GW-B", phone = "13800000101" }]
"#,
    )
    .expect("write toml");
    let err = fails(&db, &["import", &file.path().display().to_string()]).await;
    assert!(err.contains("line 11"), "{err}");
    assert!(
        err.contains("already belongs") || err.contains("belongs to contact"),
        "{err}"
    );
    assert_eq!(db.count("SELECT count(*) FROM elders").await, 0);
    assert_eq!(db.count("SELECT count(*) FROM contacts").await, 1);
    assert_eq!(db.count("SELECT count(*) FROM devices").await, 0);
}

#[tokio::test]
async fn registry_csv_with_bom_and_padding() {
    let db = TestDb::new().await;
    let pool = migrated_pool(&db).await;
    let file = tempfile::Builder::new()
        .suffix(".csv")
        .tempfile()
        .expect("tempfile");
    std::fs::write(
        file.path(),
        "\u{feff}ref , name ,wander_risk, devices ,guardian1_name,guardian1_phone,guardian3_name,guardian3_phone\r\n\
         \" A-1 \", 张三 , 是 , 860000000000401 ； 860000000000402 ,张一, 139 0000 0001 ,张三儿,13900000003\r\n",
    )
    .expect("write csv");
    ok(&db, &["import", &file.path().display().to_string()]).await;
    let e = registry::get_elder(&pool, &ElderKey::Ref("A-1".into()))
        .await
        .expect("trimmed ref");
    assert_eq!(e.name, "张三");
    assert!(e.wander_risk);
    assert_eq!(e.devices, ["860000000000401", "860000000000402"]);
    let who = registry::who_answers(&pool, e.id)
        .await
        .expect("who answers");
    assert_eq!(
        who.guardians
            .iter()
            .map(|g| (g.priority, g.phone.clone().unwrap_or_default()))
            .collect::<Vec<_>>(),
        [
            (1, "13900000001".to_string()),
            (3, "13900000003".to_string())
        ]
    );
}

#[tokio::test]
async fn registry_who_answers_orders_by_priority() {
    let db = TestDb::new().await;
    let pool = migrated_pool(&db).await;
    let elder = registry::upsert_elder(
        &pool,
        &NewElder {
            name: "周美华".into(),
            external_ref: Some("W-1".into()),
            ..Default::default()
        },
    )
    .await
    .expect("elder");
    assert!(elder.created);
    let key = ElderKey::Id(elder.id);

    // Nobody linked yet: empty lists, which is not the same as "no such elder".
    let who = registry::who_answers(&pool, elder.id)
        .await
        .expect("who answers");
    assert!(who.is_empty());
    let missing = registry::who_answers(&pool, elder.id + 1000).await;
    assert!(matches!(missing, Err(e) if e.is_not_found()));

    let add = |name: &str, phone: &str| {
        let c = NewContact {
            name: name.into(),
            phone: Some(phone.into()),
            ..Default::default()
        };
        let pool = pool.clone();
        async move {
            registry::upsert_contact(&pool, &c)
                .await
                .expect("contact")
                .id
        }
    };
    let g3 = add("周三", "13900000013").await;
    let g1 = add("周一", "13900000011").await;
    let g2 = add("周二", "13900000012").await;
    let gw = add("王芳", "13800000101").await;
    let bk = add("刘洋", "13800000103").await;
    let cs = add("赵敏", "13800000201").await;
    let ts = add("孙伟", "13800000301").await;
    for (c, role, p) in [
        (g3, Role::Guardian, 3),
        (g1, Role::Guardian, 1),
        (g2, Role::Guardian, 2),
        (gw, Role::GridWorker, 1),
        (bk, Role::BackupGridWorker, 1),
        (cs, Role::CommunitySupervisor, 1),
        (ts, Role::TownshipSupervisor, 1),
    ] {
        registry::link_contact(&pool, &key, &ContactKey::Id(c), role, Some(p))
            .await
            .expect("link");
    }
    let who = registry::who_answers(&pool, elder.id)
        .await
        .expect("who answers");
    assert_eq!(
        who.guardians.iter().map(|r| r.id).collect::<Vec<_>>(),
        [g1, g2, g3]
    );
    assert_eq!(
        who.grid_workers.iter().map(|r| r.id).collect::<Vec<_>>(),
        [gw]
    );
    assert_eq!(who.backup_grid_workers[0].id, bk);
    assert_eq!(who.community_supervisors[0].id, cs);
    assert_eq!(who.township_supervisors[0].id, ts);
    assert_eq!(who.guardians[0].phone.as_deref(), Some("13900000011"));

    // Re-linking changes the priority, not the number of links.
    registry::link_contact(&pool, &key, &ContactKey::Id(g3), Role::Guardian, Some(1))
        .await
        .expect("relink");
    let who = registry::who_answers(&pool, elder.id)
        .await
        .expect("who answers");
    assert_eq!(
        who.guardians.iter().map(|r| r.id).collect::<Vec<_>>(),
        [g1.min(g3), g1.max(g3), g2],
        "equal priorities fall back to the contact id"
    );

    // Inside a caller's transaction, as the alert engine reads it.
    let mut client = pool.get().await.expect("client");
    let tx = client.transaction().await.expect("tx");
    let in_tx = registry::who_answers_with(&*tx, elder.id)
        .await
        .expect("who answers in tx");
    assert_eq!(in_tx, who);
}

fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/registry")
        .join(name)
        .display()
        .to_string()
}

#[tokio::test]
async fn registry_regions_by_cli_and_import() {
    let db = TestDb::new().await;
    let pool = migrated_pool(&db).await;
    // The tree by hand: city -> street -> community -> grid.
    ok(
        &db,
        &[
            "region",
            "add",
            "--code",
            "HZ",
            "--name",
            "杭州市",
            "--level",
            "市",
        ],
    )
    .await;
    ok(
        &db,
        &[
            "region",
            "add",
            "--code",
            "HZ-HB",
            "--name",
            "湖滨街道",
            "--level",
            "township",
            "--parent",
            "HZ",
        ],
    )
    .await;
    ok(
        &db,
        &[
            "region",
            "add",
            "--code",
            "HZ-HB-DPL",
            "--name",
            "东坡路社区",
            "--level",
            "社区",
            "--parent",
            "HZ-HB",
        ],
    )
    .await;
    let grid = id_of(
        &ok(
            &db,
            &[
                "region",
                "add",
                "--code",
                "HZ-HB-DPL-01",
                "--name",
                "第一网格",
                "--level",
                "grid",
                "--parent",
                "HZ-HB-DPL",
            ],
        )
        .await,
    );
    // Levels must fit, codes are unique, regions do not move.
    let err = fails(
        &db,
        &[
            "region",
            "add",
            "--code",
            "G2",
            "--name",
            "网格二",
            "--level",
            "grid",
            "--parent",
            "HZ-HB",
        ],
    )
    .await;
    assert!(
        err.contains("HZ-HB is a township: a grid sits under a community"),
        "{err}"
    );
    let err = fails(
        &db,
        &[
            "region",
            "add",
            "--code",
            "T2",
            "--name",
            "某街道",
            "--level",
            "township",
        ],
    )
    .await;
    assert!(err.contains("parent_code"), "{err}");
    let err = fails(
        &db,
        &[
            "region",
            "add",
            "--code",
            "HZ-HB-DPL-01",
            "--name",
            "第一网格",
            "--level",
            "grid",
            "--parent",
            "HZ-HB-DPL-X",
        ],
    )
    .await;
    assert!(err.contains("no region has code"), "{err}");
    // Adding again renames (same place) and keeps the id.
    let again = sg(
        &db,
        &[
            "region",
            "add",
            "--code",
            "HZ-HB-DPL-01",
            "--name",
            "东坡路第一网格",
            "--level",
            "网格",
            "--parent",
            "HZ-HB-DPL",
        ],
    )
    .await;
    assert!(again.status.success());
    assert_eq!(id_of(&stdout(&again)), grid);
    assert!(stderr(&again).contains("renamed"), "{}", stderr(&again));
    let r = regions::get_region_by_code(&pool, "HZ-HB-DPL-01")
        .await
        .expect("grid");
    assert_eq!(
        r.path_names,
        ["杭州市", "湖滨街道", "东坡路社区", "东坡路第一网格"]
    );
    assert_eq!(r.level, Level::Grid);

    // A ledger of regions: detected by its header, Chinese columns, BOM, CRLF, a blank
    // line, a full-width code; parents after children is fine.
    let file = fixture("regions.csv");
    let dry = ok(&db, &["import", &file, "--dry-run"]).await;
    assert!(dry.contains("regions:  7 created"), "{dry}");
    assert_eq!(db.count("SELECT count(*) FROM regions").await, 4);
    let out = ok(&db, &["import", &file, "--json"]).await;
    let s: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(
        (s["kind"].as_str(), s["regions_created"].as_u64()),
        (Some("regions"), Some(7))
    );
    let out = ok(&db, &["region", "import", &file, "--json"]).await;
    let s: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(s["regions_unchanged"], 7, "{s}");
    let listed = ok(&db, &["region", "list", "--under", "330102001"]).await;
    let lines: Vec<&str> = listed.lines().skip(1).collect();
    assert_eq!(lines.len(), 6, "{listed}");
    assert!(lines[0].starts_with("330102001 "), "{listed}");
    assert!(
        lines[1].contains("  东坡路社区"),
        "indented under its street: {listed}"
    );
    let young = regions::get_region_by_code(&pool, "330102001002-01")
        .await
        .expect("full-width parent code was folded");
    assert_eq!(young.path_names[2], "青年路社区");

    // A region that would move is refused with its line, and nothing is written.
    let moved = tempfile::Builder::new()
        .suffix(".csv")
        .tempfile()
        .expect("tmp");
    std::fs::write(
        moved.path(),
        "code,name,level,parent_code\nNEW-1,新社区,community,330102001\n330102001001-02,第二网格,grid,330102001002\n",
    )
    .expect("write");
    let err = fails(&db, &["import", &moved.path().display().to_string()]).await;
    assert!(
        err.contains("line 3, code: region 330102001001-02 belongs to 330102001001"),
        "{err}"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM regions WHERE code = 'NEW-1'")
            .await,
        0
    );
}

#[tokio::test]
async fn registry_messy_office_ledger_imports() {
    let db = TestDb::new().await;
    let pool = migrated_pool(&db).await;
    ok(&db, &["import", &fixture("regions.csv")]).await;

    // GBK (Excel's plain "CSV" on Chinese Windows), a title row above the header, Chinese
    // headers, blank and comma-only rows, a comment, stray and ideographic spaces,
    // full-width digits, four date spellings, lists separated by 、 ； ; and ,.
    let file = fixture("elders-gbk.csv");
    let out = ok(&db, &["import", &file, "--json"]).await;
    let s: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(s["elders_created"], 5, "{s}");
    assert_eq!(s["devices_provisioned"], 4, "{s}");

    let get = |r: &str| {
        let pool = pool.clone();
        let r = r.to_string();
        async move {
            registry::get_elder(&pool, &ElderKey::Ref(r.clone()))
                .await
                .unwrap_or_else(|e| panic!("{r}: {e}"))
        }
    };
    let e1 = get("DPL-001").await;
    assert_eq!(e1.name, "张桂英");
    assert_eq!(e1.gender, Some(registry::Gender::Female));
    assert_eq!(
        e1.birth_date.map(|d| d.to_string()).as_deref(),
        Some("1938-04-17")
    );
    assert_eq!(e1.phone.as_deref(), Some("13800001001"));
    assert_eq!(e1.region_code.as_deref(), Some("330102001001-01"));
    assert_eq!(
        e1.region_path,
        ["杭州市", "湖滨街道", "东坡路社区", "东坡路第一网格"]
    );
    assert_eq!(
        e1.categories,
        [
            registry::Category::LivingAlone,
            registry::Category::SpecialHardship
        ]
    );
    assert_eq!(e1.conditions, ["高血压", "糖尿病"]);
    assert_eq!(e1.medications, ["氨氯地平", "二甲双胍"]);
    assert_eq!(e1.devices, ["860000000001001"]);
    assert_eq!(e1.notes.as_deref(), Some("钥匙在对门邻居家"));
    let e2 = get("DPL-002").await;
    assert_eq!(
        e2.birth_date.map(|d| d.to_string()).as_deref(),
        Some("1940-03-02")
    );
    assert_eq!(
        e2.phone.as_deref(),
        Some("13800001002"),
        "full-width digits folded"
    );
    assert_eq!(e2.devices, ["860000000001002"]);
    assert_eq!(e2.gender, Some(registry::Gender::Male));
    let who2 = registry::who_answers(&pool, e2.id).await.expect("who");
    assert_eq!(
        who2.guardians
            .iter()
            .map(|g| (g.priority, g.name.as_str()))
            .collect::<Vec<_>>(),
        [(1, "刘小军"), (2, "刘小红")]
    );
    assert_eq!(who2.grid_workers[0].name, "王芳");
    let e3 = get("DPL-003").await;
    assert_eq!(
        e3.birth_date.map(|d| d.to_string()).as_deref(),
        Some("1945-03-02")
    );
    assert_eq!(e3.id_number.as_deref(), Some("330102194503023021"));
    assert_eq!(e3.categories, [registry::Category::LeftBehind]);
    assert_eq!(e3.conditions, ["高血压", "骨质疏松"]);
    assert_eq!(e3.notes.as_deref(), Some("独居，子女在外地打工"));
    let who3 = registry::who_answers(&pool, e3.id).await.expect("who");
    assert_eq!(who3.guardians[0].phone.as_deref(), Some("13900001003"));
    let e4 = get("DPL-004").await;
    assert_eq!(
        e4.birth_date.map(|d| d.to_string()).as_deref(),
        Some("1945-03-02")
    );
    assert_eq!(
        e4.address.as_deref(),
        Some("东坡路24号"),
        "ideographic spaces trimmed"
    );
    assert_eq!(
        e4.categories,
        [
            registry::Category::LivingAlone,
            registry::Category::EmptyNest
        ]
    );
    let q = get("QNL-001").await;
    assert_eq!(
        q.birth_date.map(|d| d.to_string()).as_deref(),
        Some("1936-09-08")
    );
    assert_eq!(q.categories, [registry::Category::SpecialHardship]);
    assert_eq!(q.region_path[2], "青年路社区");

    // Filters by region subtree and category.
    let community = ok(
        &db,
        &["elder", "list", "--region", "330102001001", "--json"],
    )
    .await;
    assert_eq!(community.lines().count(), 4, "{community}");
    let street = ok(
        &db,
        &[
            "elder",
            "list",
            "--region",
            "330102001",
            "--category",
            "特困",
            "--json",
        ],
    )
    .await;
    let refs: Vec<String> = street
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("json")["external_ref"].to_string()
        })
        .collect();
    assert_eq!(refs, ["\"DPL-001\"", "\"QNL-001\""]);
    let shown = ok(&db, &["elder", "show", "ref:DPL-001"]).await;
    assert!(
        shown.contains("杭州市 / 湖滨街道 / 东坡路社区 / 东坡路第一网格 (330102001001-01)"),
        "{shown}"
    );
    assert!(shown.contains("living_alone (独居)"), "{shown}");

    // The same ledger again changes nothing.
    let out = ok(&db, &["import", &file, "--json"]).await;
    let s: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(
        (
            s["elders_unchanged"].as_u64(),
            s["devices_unchanged"].as_u64()
        ),
        (Some(5), Some(4)),
        "{s}"
    );

    // The supplier's device list: detected as devices, stray spaces in the header, an id
    // taken from the IMEI when the id cell is empty.
    let out = ok(&db, &["import", &fixture("devices.csv"), "--json"]).await;
    let s: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(s["kind"], "devices", "{s}");
    assert_eq!(
        (
            s["devices_provisioned"].as_u64(),
            s["devices_updated"].as_u64()
        ),
        (Some(2), Some(2)),
        "{s}"
    );
    assert_eq!(s["devices_bound"], 0, "already bound by the ledger: {s}");
    let d = devices::get(&pool, "861234567890124")
        .await
        .expect("db")
        .expect("from the IMEI");
    assert_eq!(d.model.as_deref(), Some("SG-B2 Pro"));
    let d = devices::get(&pool, "860000000001002")
        .await
        .expect("db")
        .expect("device");
    assert_eq!(
        (
            d.imei.as_deref(),
            d.firmware.as_deref(),
            d.elder_ref.as_deref()
        ),
        (Some("860000000001002"), Some("1.4.2"), Some("DPL-002"))
    );
    assert!(d.bound_at.is_some());
    let h = devices::history(&pool, "860000000001001")
        .await
        .expect("history");
    assert_eq!(h.len(), 1);
    assert_eq!(h[0].bound_by.as_deref(), Some("import"));
}

#[tokio::test]
async fn registry_messy_broken_files_report_lines_and_import_nothing() {
    let db = TestDb::new().await;
    let _pool = migrated_pool(&db).await;
    ok(&db, &["import", &fixture("regions.csv")]).await;

    let err = fails(&db, &["import", &fixture("elders-broken-gbk.csv")]).await;
    assert!(err.contains("6 problem(s), nothing was imported"), "{err}");
    for expected in [
        "line 3, 出生日期 (birth_date): \"1945年13月2日\" is not a date",
        "line 4, 类别 (categories): unknown category \"孤寡\"",
        "line 5, 性别 (gender): unknown gender",
        "line 6, 联系电话 (phone): \"1380009005\" is not a mobile number",
        "line 7, 所属网格 (region): \"网格一\" is not a region code",
        "line 8, 手环IMEI (devices): \"8600 0000\" is not a device id",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
    assert!(!err.contains("line 2"), "the good row is not blamed: {err}");

    // Valid on its own: only the database knows 330102001001 is a community and the last
    // code does not exist. The good first row must not be left behind.
    let err = fails(&db, &["import", &fixture("elders-not-a-grid.csv")]).await;
    assert!(err.contains("2 problem(s), nothing was imported"), "{err}");
    assert!(
        err.contains("line 3, region: 330102001001 is a community, not a grid"),
        "{err}"
    );
    assert!(
        err.contains("line 4, region: no region has code \"330199999999-09\""),
        "{err}"
    );
    assert_eq!(db.count("SELECT count(*) FROM elders").await, 0);
    assert_eq!(db.count("SELECT count(*) FROM devices").await, 0);

    // Not text at all, and a device file with problems.
    let junk = tempfile::Builder::new()
        .suffix(".csv")
        .tempfile()
        .expect("tmp");
    std::fs::write(junk.path(), b"PK\x03\x04\x14\x00\x06\x00binary").expect("write");
    let err = fails(&db, &["import", &junk.path().display().to_string()]).await;
    assert!(err.contains("Excel workbook"), "{err}");
    std::fs::write(
        junk.path(),
        "device_id,imei,elder_ref\nd-1,861234567890123,NOBODY\nd-2,861234567890123,\nd 3,,\n",
    )
    .expect("write");
    let err = fails(
        &db,
        &["device", "import", &junk.path().display().to_string()],
    )
    .await;
    assert!(
        err.contains("line 3, imei: 861234567890123 is also on line 2"),
        "{err}"
    );
    assert!(err.contains("line 4, device_id"), "{err}");
    std::fs::write(
        junk.path(),
        "device_id,imei,elder_ref\nd-1,861234567890123,NOBODY\n",
    )
    .expect("write");
    let err = fails(
        &db,
        &["device", "import", &junk.path().display().to_string()],
    )
    .await;
    assert!(
        err.contains("line 2, elder_ref: no elder has ref \"NOBODY\""),
        "{err}"
    );
    assert_eq!(db.count("SELECT count(*) FROM devices").await, 0);
}

#[tokio::test]
async fn registry_elder_profile_and_device_binding_history() {
    let db = TestDb::new().await;
    let pool = migrated_pool(&db).await;
    ok(&db, &["import", &fixture("regions.csv")]).await;
    let zhang = id_of(
        &ok(
            &db,
            &[
                "elder",
                "add",
                "--name",
                "张桂英",
                "--ref",
                "B-1",
                "--gender",
                "女",
                "--region",
                "330102001001-01",
                "--categories",
                "独居、特困",
                "--conditions",
                "高血压；糖尿病",
                "--medications",
                "氨氯地平",
                "--birth-date",
                "1938年4月17日",
                "--community",
                "东坡路社区",
            ],
        )
        .await,
    );
    let li = id_of(&ok(&db, &["elder", "add", "--name", "李四", "--ref", "B-2"]).await);
    let e = registry::get_elder(&pool, &ElderKey::Id(zhang))
        .await
        .expect("elder");
    assert_eq!(e.gender, Some(registry::Gender::Female));
    assert_eq!(e.region_name.as_deref(), Some("东坡路第一网格"));
    assert_eq!(e.conditions, ["高血压", "糖尿病"]);
    assert_eq!(
        e.community.as_deref(),
        Some("东坡路社区"),
        "community text still works"
    );
    // Elders live in grids.
    let err = fails(
        &db,
        &["elder", "set", "ref:B-2", "--region", "330102001001"],
    )
    .await;
    assert!(
        err.contains("region: 330102001001 is a community, not a grid"),
        "{err}"
    );
    let err = fails(
        &db,
        &["elder", "add", "--name", "王五", "--categories", "孤寡"],
    )
    .await;
    assert!(err.contains("unknown category"), "{err}");
    ok(
        &db,
        &[
            "elder",
            "set",
            "ref:B-1",
            "--clear-region",
            "--categories",
            "",
            "--medications",
            "阿司匹林",
        ],
    )
    .await;
    let e = registry::get_elder(&pool, &ElderKey::Id(zhang))
        .await
        .expect("elder");
    assert_eq!((e.region_id, e.categories.len()), (None, 0));
    assert_eq!(e.medications, ["阿司匹林"]);
    assert_eq!(e.conditions, ["高血压", "糖尿病"], "not given, kept");

    // A bracelet with its IMEI, model and firmware.
    ok(
        &db,
        &[
            "device",
            "add",
            "sg-0001",
            "--imei",
            "86-123456-789012-3",
            "--model",
            "SG-B2",
            "--firmware",
            "1.4.2",
        ],
    )
    .await;
    let err = fails(
        &db,
        &["device", "add", "sg-0002", "--imei", "861234567890123"],
    )
    .await;
    assert!(err.contains("already belongs to device sg-0001"), "{err}");
    let err = fails(&db, &["device", "add", "sg-0002", "--imei", "86123"]).await;
    assert!(err.contains("not an IMEI"), "{err}");
    let d = devices::get(&pool, "sg-0001")
        .await
        .expect("db")
        .expect("device");
    assert_eq!(d.imei.as_deref(), Some("861234567890123"));

    // Bind, rebind (closing the first binding), unbind: every step kept with who did it.
    ok(
        &db,
        &["elder", "bind-device", "ref:B-1", "sg-0001", "--by", "王芳"],
    )
    .await;
    let d = devices::get(&pool, "sg-0001")
        .await
        .expect("db")
        .expect("device");
    assert_eq!(d.elder_id, Some(zhang));
    assert!(d.bound_at.is_some());
    // Binding again to the same elder changes nothing.
    ok(&db, &["elder", "bind-device", "ref:B-1", "sg-0001"]).await;
    let out = registry::bind_device(
        &pool,
        &ElderKey::Ref("B-2".into()),
        "sg-0001",
        false,
        "api:chen",
    )
    .await
    .expect("rebind");
    assert_eq!(out.previous_elder, Some(zhang));
    assert_eq!(
        db.count("SELECT count(*) FROM device_bindings WHERE device_id = 'sg-0001' AND unbound_at IS NULL")
            .await,
        1,
        "one open binding"
    );
    let prev = registry::unbind_device(&pool, "sg-0001", "api:chen")
        .await
        .expect("unbind");
    assert_eq!(prev, Some(li));
    let d = devices::get(&pool, "sg-0001")
        .await
        .expect("db")
        .expect("device");
    assert_eq!((d.elder_id, d.bound_at.is_none()), (None, true));
    assert!(registry::unbind_device(&pool, "nope", "x")
        .await
        .unwrap_err()
        .is_not_found());

    let h = devices::history(&pool, "sg-0001").await.expect("history");
    let rows: Vec<(Option<i64>, Option<&str>, Option<&str>)> = h
        .iter()
        .map(|b| (b.elder_id, b.bound_by.as_deref(), b.unbound_by.as_deref()))
        .collect();
    assert_eq!(
        rows,
        [
            (Some(li), Some("api:chen"), Some("api:chen")),
            (Some(zhang), Some("王芳"), Some("api:chen")),
        ]
    );
    assert_eq!(
        h[1].unbound_at,
        Some(h[0].bound_at),
        "the handover is one instant"
    );
    let out = ok(&db, &["device", "history", "sg-0001"]).await;
    assert!(
        out.contains("王芳") && out.contains("张桂英 (ref B-1)"),
        "{out}"
    );
    let json = ok(&db, &["device", "history", "sg-0001", "--json"]).await;
    assert_eq!(json.lines().count(), 2);
    let err = fails(&db, &["device", "history", "never-seen"]).await;
    assert!(err.contains("not found"), "{err}");
    assert_eq!(
        devices::elder_history(&pool, zhang)
            .await
            .expect("elder history")
            .len(),
        1
    );

    // Removing an elder closes their open binding; the history stays.
    ok(
        &db,
        &["elder", "bind-device", "ref:B-2", "sg-0001", "--by", "陈静"],
    )
    .await;
    ok(&db, &["elder", "remove", "--ref", "B-2"]).await;
    let h = devices::history(&pool, "sg-0001").await.expect("history");
    assert_eq!(h.len(), 3);
    assert!(h.iter().all(|b| b.unbound_at.is_some()), "{h:?}");
    assert_eq!(
        h[0].elder_id, None,
        "the removed elder's id is gone from history"
    );
}
