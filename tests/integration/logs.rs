//! Secrets and personal data never reach the logs. The real `silverguard serve` binary runs
//! at `RUST_LOG=debug` (human format) and at `RUST_LOG=trace` (JSON) with every
//! secret configured — a database URL with a password, SMTP with user and password, the SMS
//! provider's token or key secret, a DingTalk signing secret, an IM robot's access token, the
//! ack-link key, MQTT and broker-admin passwords — and goes through a day's work: the
//! registry CLI imports elders with identity numbers, phones and addresses, users log in
//! (right and wrong passwords) by API and console, bearer tokens and a console session are
//! used, elders are viewed, an SOS goes out by SMS, email and IM with an acknowledge link
//! that is then used, an alert is acknowledged in the console and resolved with a note.
//! Then every line the service and the CLI wrote is searched for every one of those values
//! (also percent-encoded and, for SMTP, base64-encoded). A hit fails with the line.
//!
//! Deliberately *not* searched for: device ids (pseudonymous hardware ids, logged by design
//! so that operators can follow a bracelet), numeric record ids, usernames (account names,
//! logged for the security trail) and region codes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use firmware_sim::send::{send_one, OneShot};
use silverguard_proto::v1 as pb;
use tokio_postgres::NoTls;

use crate::helpers::*;

/// A random secret-looking value that cannot occur in a log by chance.
fn secret(prefix: &str) -> String {
    format!(
        "{prefix}{:016x}{:016x}",
        rand::random::<u64>(),
        rand::random::<u64>()
    )
}

/// A mainland mobile number that no timestamp or counter will contain by chance.
fn phone(prefix: &str) -> String {
    format!("{prefix}{:08}", rand::random::<u32>() % 100_000_000)
}

/// An 18-character identity number with a valid check digit.
fn id_number() -> String {
    let mut d = format!("330106194{:08}", rand::random::<u32>() % 100_000_000);
    const WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    let sum: u32 = d
        .bytes()
        .zip(WEIGHTS)
        .map(|(c, w)| u32::from(c - b'0') * w)
        .sum();
    d.push(b"10X98765432"[(sum % 11) as usize] as char);
    d
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// A login role with a password, owning the test database, so the service connects with a
/// URL that carries a password. Dropped (with the database) at the end.
struct PgRole {
    name: String,
    password: String,
    db: String,
}

impl PgRole {
    async fn create(db: &TestDb) -> PgRole {
        let r = PgRole {
            name: unique("sg_log_role_"),
            password: secret("DbPw"),
            db: db.name.clone(),
        };
        let (c, conn) = tokio_postgres::connect(&format!("{}/postgres", pg_base()), NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        c.batch_execute(&format!(
            "CREATE ROLE {} LOGIN PASSWORD '{}'; ALTER DATABASE {} OWNER TO {};",
            r.name, r.password, r.db, r.name
        ))
        .await
        .expect("create role");
        r
    }

    fn url(&self) -> String {
        let mut u = url::Url::parse(&pg_base()).expect("pg base URL");
        u.set_username(&self.name).expect("user");
        u.set_password(Some(&self.password)).expect("password");
        u.set_path(&self.db);
        u.to_string()
    }
}

impl Drop for PgRole {
    fn drop(&mut self) {
        let url = format!("{}/postgres", pg_base());
        let sql = format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE); DROP ROLE IF EXISTS {};",
            self.db, self.name
        );
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let (c, conn) = tokio_postgres::connect(&url, NoTls).await.ok()?;
                tokio::spawn(conn);
                c.batch_execute(&sql).await.ok()
            })
        })
        .join();
    }
}

/// scripts/smtp_sink.py requiring AUTH with a user and password.
struct AuthSmtp {
    port: u16,
    dir: tempfile::TempDir,
    child: Child,
}

impl AuthSmtp {
    async fn start(user: &str, password: &str) -> AuthSmtp {
        let port = free_port();
        let dir = tempfile::tempdir().expect("tempdir");
        let child = Command::new("python3")
            .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/smtp_sink.py"))
            .args([
                "--port",
                &port.to_string(),
                "--user",
                user,
                "--password",
                password,
            ])
            .arg("--maildir")
            .arg(dir.path().join("mail"))
            .arg("--exit-on-stdin-eof")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 scripts/smtp_sink.py (aiosmtpd)");
        wait_until("SMTP sink up", Duration::from_secs(20), || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
        AuthSmtp { port, dir, child }
    }

    fn mails(&self) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        if let Ok(entries) = std::fs::read_dir(self.dir.path().join("mail")) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue;
                }
                if let Ok(v) = std::fs::read_to_string(e.path())
                    .map_err(|_| ())
                    .and_then(|t| serde_json::from_str(&t).map_err(|_| ()))
                {
                    out.push(v);
                }
            }
        }
        out
    }
}

impl Drop for AuthSmtp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The service binary with its output in two files.
struct Serve {
    child: Child,
    port: u16,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The environment of every `silverguard` process of a run (service and CLI).
fn command(env: &BTreeMap<String, String>, out: &Path, name: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_silverguard"));
    // Nothing from the test runner's environment may configure these processes.
    for (k, _) in std::env::vars() {
        if k.starts_with("SILVERGUARD_") || k == "RUST_LOG" || k == "RUST_BACKTRACE" {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env)
        .stdout(std::fs::File::create(out.join(format!("{name}.stdout"))).expect("log"))
        .stderr(std::fs::File::create(out.join(format!("{name}.stderr"))).expect("log"));
    cmd
}

fn run_cli(env: &BTreeMap<String, String>, out: &Path, name: &str, args: &[&str], stdin: &str) {
    use std::io::Write;
    let mut child = command(env, out, name)
        .args(args)
        .stdin(Stdio::piped())
        .spawn()
        .expect("silverguard CLI");
    if let Some(mut i) = child.stdin.take() {
        let _ = i.write_all(stdin.as_bytes());
    }
    let status = child.wait().expect("CLI ran");
    let err = std::fs::read_to_string(out.join(format!("{name}.stderr"))).unwrap_or_default();
    let so = std::fs::read_to_string(out.join(format!("{name}.stdout"))).unwrap_or_default();
    assert!(
        status.success(),
        "silverguard {args:?}: {status}\n{so}\n{err}"
    );
}

/// Which SMS provider a run configures (each has its own secrets).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sms {
    Webhook,
    Aliyun,
}

/// Everything that must not appear: (what it is, value).
struct Needles(Vec<(String, String)>);

impl Needles {
    fn add(&mut self, what: &str, value: &str) {
        assert!(value.len() >= 6, "{what}: too short a needle ({value:?})");
        self.0.push((what.to_string(), value.to_string()));
        let enc = urlencode(value);
        if enc != value {
            self.0.push((format!("{what} (percent-encoded)"), enc));
        }
    }
}

async fn scenario(format: &str, filter: &str, sms_kind: Sms) {
    let db = TestDb::new().await;
    let role = PgRole::create(&db).await;
    let broker = TestBroker::start().await;
    let smtp_user = "mailer";
    let smtp_password = secret("SmtpPw");
    let smtp = AuthSmtp::start(smtp_user, &smtp_password).await;
    let capture = CaptureServer::start().await;
    let out = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let tag = unique("L");

    let mut needles = Needles(Vec::new());
    let s = |what: &str, n: &mut Needles| {
        let v = secret(what);
        n.add(what, &v);
        v
    };
    needles.add("database password", &role.password);
    needles.add("SMTP password", &smtp_password);
    let b64 = base64::engine::general_purpose::STANDARD;
    needles.add(
        "SMTP AUTH PLAIN",
        &b64.encode(format!("\0{smtp_user}\0{smtp_password}")),
    );
    needles.add("SMTP AUTH LOGIN password", &b64.encode(&smtp_password));
    let sms_secret = s("SmsSecret", &mut needles);
    let im_token = s("ImToken", &mut needles);
    let dingtalk_secret = format!("SEC{}", s("Ding", &mut needles));
    needles.add("DingTalk secret", &dingtalk_secret);
    let link_secret = s("LinkKey", &mut needles);
    let mqtt_password = s("MqttPw", &mut needles);
    let admin_password = s("BrokerAdminPw", &mut needles);
    let gw_password = s("GwPw", &mut needles);
    let guardian_password = s("GuardPw", &mut needles);
    let wrong_api = s("WrongApiPw", &mut needles);
    let wrong_console = s("WrongConsolePw", &mut needles);
    // A password typed into the username field: not an account, so never logged as text.
    let password_as_username = s("PwInUserField", &mut needles);

    // The people.
    let elders = [
        (
            "欧阳春花",
            id_number(),
            phone("138"),
            "杭州市西湖区文三路 478 号 3 幢",
        ),
        (
            "司马秋月",
            id_number(),
            phone("136"),
            "杭州市西湖区天目山路 92 号 5 单元",
        ),
    ];
    for (name, idn, ph, addr) in &elders {
        needles.add("elder name", name);
        needles.add("elder identity number", idn);
        needles.add("elder phone", ph);
        needles.add("elder address", addr);
    }
    let gw = ("诸葛网格", phone("139"), format!("{tag}-wang@example.org"));
    let guardian = ("上官小明", phone("135"), format!("{tag}-son@example.org"));
    for (name, ph, email) in [&gw, &guardian] {
        needles.add("contact name", name);
        needles.add("contact phone", ph);
        needles.add("contact email", email);
    }
    needles.add("user display name", "慕容主任");
    let note = "欧阳阿姨摔倒后已送医，家门密码 7391";
    needles.add("resolution note", note);

    let (d1, d2) = (format!("{tag}-d1"), format!("{tag}-d2"));
    let mut env: BTreeMap<String, String> = [
        ("SILVERGUARD_DATABASE_URL", role.url()),
        ("SILVERGUARD_MQTT_URL", broker.url()),
        ("SILVERGUARD_MQTT__USERNAME", "silverguard-svc".into()),
        ("SILVERGUARD_MQTT__PASSWORD", mqtt_password.clone()),
        ("SILVERGUARD_MQTT__CLIENT_ID", unique("sglog-")),
        ("SILVERGUARD_HTTP_ADDR", format!("127.0.0.1:{port}")),
        (
            "SILVERGUARD_SMTP_URL",
            format!(
                "smtp://{smtp_user}:{smtp_password}@127.0.0.1:{}?tls=none",
                smtp.port
            ),
        ),
        ("SILVERGUARD_NOTIFY__IM__KIND", "dingtalk".into()),
        ("SILVERGUARD_NOTIFY__IM__DINGTALK_SECRET", dingtalk_secret),
        ("SILVERGUARD_ALERTS__LINK_SECRET", link_secret),
        (
            "SILVERGUARD_ALERTS__PUBLIC_URL",
            format!("http://127.0.0.1:{port}"),
        ),
        ("SILVERGUARD_ALERTS__WELLNESS_CHECK_AT", "off".into()),
        ("SILVERGUARD_ALERTS__QUIET_HOURS", "00:00-00:00".into()),
        ("SILVERGUARD_BROKER_ADMIN__USERNAME", "sg-admin".into()),
        ("SILVERGUARD_BROKER_ADMIN__PASSWORD", admin_password),
        ("SILVERGUARD_INGEST__BATCH_MAX_DELAY", "20ms".into()),
        ("SILVERGUARD_LOG__FORMAT", format.into()),
        ("RUST_LOG", filter.into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    match sms_kind {
        Sms::Webhook => {
            env.insert("SILVERGUARD_NOTIFY__SMS__PROVIDER".into(), "webhook".into());
            env.insert("SILVERGUARD_NOTIFY__SMS__URL".into(), capture.url("/sms"));
            env.insert("SILVERGUARD_NOTIFY__SMS__TOKEN".into(), sms_secret);
        }
        Sms::Aliyun => {
            env.insert("SILVERGUARD_NOTIFY__SMS__PROVIDER".into(), "aliyun".into());
            env.insert(
                "SILVERGUARD_NOTIFY__SMS__ACCESS_KEY_ID".into(),
                "LTAI5tStandInKeyId".into(),
            );
            env.insert(
                "SILVERGUARD_NOTIFY__SMS__ACCESS_KEY_SECRET".into(),
                sms_secret,
            );
            env.insert(
                "SILVERGUARD_NOTIFY__SMS__SIGN_NAME".into(),
                "银龄守护".into(),
            );
            env.insert(
                "SILVERGUARD_NOTIFY__SMS__TEMPLATE_CODE".into(),
                "SMS_123456789".into(),
            );
            env.insert(
                "SILVERGUARD_NOTIFY__SMS__ENDPOINT".into(),
                capture.url("/aliyun"),
            );
        }
    }

    let serve = Serve {
        child: command(&env, out.path(), "serve")
            .arg("serve")
            .spawn()
            .expect("silverguard serve"),
        port,
    };
    let base = format!("http://127.0.0.1:{}", serve.port);
    let mut serve = serve;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if http_get(&format!("{base}/readyz"))
            .await
            .is_some_and(|(c, _)| c == 200)
        {
            break;
        }
        let exited = serve.child.try_wait().ok().flatten();
        if exited.is_some() || std::time::Instant::now() > deadline {
            let log = std::fs::read_to_string(out.path().join("serve.stderr")).unwrap_or_default();
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| {
                    let t = l.trim_start();
                    !(t.starts_with("at ")
                        || t.split(':')
                            .next()
                            .is_some_and(|n| n.parse::<u32>().is_ok()))
                })
                .rev()
                .take(30)
                .collect();
            panic!(
                "service not ready ({exited:?}):\n{}",
                lines.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The registry, by the CLI, as an office would load it.
    let regions = out.path().join("regions.csv");
    std::fs::write(
        &regions,
        format!(
            "code,name,level,parent_code\n{tag}-C,杭州市,city,\n{tag}-T,西湖街道,township,{tag}-C\n\
             {tag}-M,文三社区,community,{tag}-T\n{tag}-G,文三第一网格,grid,{tag}-M\n"
        ),
    )
    .unwrap();
    let im_url = capture.url(&format!("/robot/send?access_token={im_token}"));
    let ledger = out.path().join("elders.csv");
    let mut csv = String::from(
        "ref,name,id_number,phone,address,region,devices,grid_worker_name,grid_worker_phone,\
         grid_worker_email,grid_worker_im_webhook,guardian1_name,guardian1_phone,guardian1_email,\
         guardian1_ref\n",
    );
    for (i, ((name, idn, ph, addr), dev)) in elders.iter().zip([&d1, &d2]).enumerate() {
        csv.push_str(&format!(
            "{tag}-E{i},{name},{idn},{ph},{addr},{tag}-G,{dev},{},{},{},{im_url},{},{},{},{tag}-guardian\n",
            gw.0, gw.1, gw.2, guardian.0, guardian.1, guardian.2
        ));
    }
    std::fs::write(&ledger, csv).unwrap();
    let path = |p: &Path| p.to_string_lossy().into_owned();
    run_cli(
        &env,
        out.path(),
        "import-regions",
        &["import", &path(&regions)],
        "",
    );
    run_cli(
        &env,
        out.path(),
        "import-elders",
        &["import", &path(&ledger)],
        "",
    );
    let gw_user = format!("{tag}-gw");
    let guardian_user = format!("{tag}-guardian");
    run_cli(
        &env,
        out.path(),
        "user-gw",
        &[
            "user",
            "add",
            &gw_user,
            "--role",
            "grid_worker",
            "--region",
            &format!("{tag}-G"),
            "--name",
            "慕容主任",
            "--password-stdin",
        ],
        &format!("{gw_password}\n"),
    );
    run_cli(
        &env,
        out.path(),
        "user-guardian",
        &[
            "user",
            "add",
            &guardian_user,
            "--role",
            "guardian",
            "--contact",
            &format!("{tag}-guardian"),
            "--password-stdin",
        ],
        &format!("{guardian_password}\n"),
    );

    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let api = |p: &str| format!("{base}/api/v1{p}");
    // Logins by API: a password in the username field, wrong, then right.
    let r = http
        .post(api("/auth/token"))
        .json(&serde_json::json!({"username": password_as_username, "password": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .post(api("/auth/token"))
        .json(&serde_json::json!({"username": gw_user, "password": wrong_api}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r: serde_json::Value = http
        .post(api("/auth/token"))
        .json(&serde_json::json!({"username": gw_user, "password": gw_password}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = r["token"].as_str().expect("token").to_string();
    needles.add("API token", &token);
    // The bearer token in use: the register and one elder's record.
    let list: serde_json::Value = http
        .get(api("/elders?limit=10"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let e1 = list["items"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["name"] == elders[0].0))
        .and_then(|e| e["id"].as_i64())
        .unwrap_or_else(|| panic!("elder in {list}"));
    let r = http
        .get(api(&format!("/elders/{e1}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.text().await.unwrap().contains(&elders[0].1),
        "the record is shown"
    );

    // The console: a wrong password, the right one, pages with personal data.
    let r = http
        .post(format!("{base}/login"))
        .form(&[("username", gw_user.as_str()), ("password", &wrong_console)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .post(format!("{base}/login"))
        .form(&[
            ("username", guardian_user.as_str()),
            ("password", &guardian_password),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let guardian_cookie = r
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .expect("session cookie")
        .to_string();
    let r = http
        .post(format!("{base}/login"))
        .form(&[("username", gw_user.as_str()), ("password", &gw_password)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let cookie = r
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .expect("session cookie")
        .to_string();
    for c in [&cookie, &guardian_cookie] {
        let value = c.split_once('=').map(|x| x.1).unwrap_or_default();
        needles.add("session cookie", value);
    }
    let me: serde_json::Value = http
        .get(api("/me"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let csrf = me["csrf_token"].as_str().expect("csrf").to_string();
    needles.add("CSRF token", &csrf);
    for p in ["/".to_string(), format!("/elders/{e1}"), "/elders".into()] {
        let r = http
            .get(format!("{base}{p}"))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{p}");
    }
    let r = http
        .get(format!("{base}/elders/{e1}"))
        .header("cookie", &guardian_cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // An SOS: SMS, email and IM with an acknowledge link, which is then used.
    let sos = |device: String, seq: u64| {
        let url = broker.url();
        async move {
            let ev = OneShot::Event(pb::Event {
                seq,
                occurred_at_ms: chrono::Utc::now().timestamp_millis(),
                kind: pb::EventKind::Sos as i32,
                battery_pct: 70,
                location: Some(pb::Location {
                    lat_e7: 302_741_000,
                    lon_e7: 1_201_551_000,
                    accuracy_m: 8,
                    source: 1,
                }),
                device_id: device.clone(),
            });
            send_one(&url, &device, &ev, 1, Duration::from_secs(10))
                .await
                .expect("SOS published");
        }
    };
    sos(d1.clone(), 1).await;
    let sms_path = match sms_kind {
        Sms::Webhook => "/sms",
        Sms::Aliyun => "/aliyun",
    };
    wait_until(
        "SOS by SMS, email and IM",
        Duration::from_secs(30),
        || async {
            let all = capture.all();
            all.iter().any(|c| c.path.starts_with(sms_path))
                && all.iter().any(|c| c.path.starts_with("/robot"))
                && smtp.mails().len() >= 2
        },
    )
    .await;
    let mails = smtp.mails();
    assert!(
        mails.iter().all(|m| m["auth_login"] == smtp_user),
        "mail went through AUTH"
    );
    let text = mails[0]["text"].as_str().unwrap_or_default().to_string();
    let ack_token: String = text
        .split_once("/ack/")
        .map(|x| x.1)
        .unwrap_or_else(|| panic!("ack link in {text}"))
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || ".-_".contains(*c))
        .collect();
    let link = format!("{base}/ack/{ack_token}");
    needles.add("ack link token", &ack_token);
    needles.add(
        "ack link signature",
        ack_token.rsplit_once('.').map(|x| x.1).unwrap(),
    );
    let r = http.get(&link).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = http.post(&link).send().await.unwrap();
    assert_eq!(r.status(), 200, "acknowledged by link");

    // A second SOS, acknowledged in the console and resolved by API with a note.
    sos(d2.clone(), 1).await;
    let c = db.client().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let a2: i64 = loop {
        if let Ok(Some(r)) = c
            .query_opt("SELECT id FROM alerts WHERE device_id = $1", &[&d2])
            .await
        {
            break r.get(0);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no alert for the second SOS"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let r = http
        .post(format!("{base}/alerts/{a2}/ack"))
        .header("cookie", &cookie)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert!(r.status().is_redirection() || r.status().is_success());
    let r = http
        .post(api(&format!("/alerts/{a2}/resolve")))
        .bearer_auth(&token)
        .json(&serde_json::json!({"note": note}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    // A call recorded with a note that names the elder.
    let r = http
        .post(api(&format!("/elders/{e1}/care-contacts")))
        .bearer_auth(&token)
        .json(&serde_json::json!({"kind": "call", "notes": note}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = http
        .post(format!("{base}/logout"))
        .header("cookie", &cookie)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert!(r.status().is_redirection());
    let r = http
        .delete(api("/auth/token"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);

    // Stop the service the way systemd does, so it flushes what it writes.
    let pid = serve.child.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while serve.child.try_wait().ok().flatten().is_none() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Search every line every process wrote.
    let mut lines = 0;
    let mut bytes = 0;
    let mut hits: Vec<String> = Vec::new();
    let mut logged_devices = false;
    for e in std::fs::read_dir(out.path()).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !(name.ends_with(".stdout") || name.ends_with(".stderr")) {
            continue;
        }
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        bytes += text.len();
        for line in text.lines() {
            lines += 1;
            logged_devices |= line.contains(&d1);
            for (what, v) in &needles.0 {
                if line.contains(v.as_str()) {
                    hits.push(format!(
                        "{name}: {what}: {}",
                        line.chars().take(400).collect::<String>()
                    ));
                }
            }
        }
    }
    assert!(
        lines > 200,
        "the logs are too thin to prove anything ({lines} lines)"
    );
    assert!(
        hits.is_empty(),
        "{} log line(s) with secrets or personal data ({format}, RUST_LOG={filter}):\n{}",
        hits.len(),
        hits.join("\n")
    );
    eprintln!(
        "logs ({format}, {filter}): {lines} lines, {bytes} bytes, {} values searched, none found; \
         device ids logged: {logged_devices}",
        needles.0.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_logs_in_human_format_hold_no_secrets_or_personal_data() {
    scenario("human", "debug", Sms::Webhook).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logs_in_json_hold_no_secrets_or_personal_data() {
    scenario("json", "trace", Sms::Aliyun).await;
}
