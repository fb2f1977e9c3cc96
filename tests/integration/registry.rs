//! Who answers: the elder / contact registry through the real `silverguard` binary (as
//! operators and scripts use it) and through the library (as the alert engine uses it),
//! against a fresh PostgreSQL database per test.

use std::path::PathBuf;
use std::process::Output;

use silverguard::config::{Secret, Settings};
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
