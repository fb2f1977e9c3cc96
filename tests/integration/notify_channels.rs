//! Notification channels against real servers: a real SMTP server (aiosmtpd, run from
//! scripts/smtp_sink.py as a child process) for email, and local HTTP servers standing in for
//! the SMS providers and IM robots. The stand-ins check requests the way the real providers
//! do (paths, auth, fields, and signatures recomputed with code of their own), and answer
//! with the providers' success and error shapes so the error mapping is tested too.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine as _;
use chrono::TimeZone as _;
use hmac::{KeyInit, Mac};
use serde_json::{json, Value};
use silverguard::config::Secret;
use silverguard::notify::channels::{
    email_sender, im_sender, sms_gateway, DeliveryError, EmailMessage, ImMessage, SmsMessage,
};
use silverguard::notify::settings::{EmailSettings, ImKind, ImSettings, SmsProvider, SmsSettings};
use silverguard::notify::templates::{render, sms_template_params, AlertView, Lang, VitalsView};

use crate::helpers::{free_port, unique, wait_until};

// ---------------------------------------------------------------------------------------------
// Fixtures

fn alert(name: &str) -> AlertView {
    AlertView {
        alert_id: 9001,
        kind: "sos".into(),
        severity: "critical".into(),
        elder_name: name.into(),
        elder_address: Some("杭州市西湖区文三路 128 号 501 室".into()),
        elder_phone: Some("13800138000".into()),
        device_id: "860000000000001".into(),
        occurred_at: chrono::Utc
            .with_ymd_and_hms(2026, 11, 23, 13, 5, 7)
            .unwrap(),
        location: Some((30.2741, 120.1551)),
        vitals: Some(VitalsView {
            heart_rate_bpm: Some(118),
            spo2_pct: Some(94),
            battery_pct: Some(61),
            ..Default::default()
        }),
        ack_url: Some("https://sg.example.org/a/9001/Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MA".into()),
        console_url: None,
        escalation_step: 0,
        repeat_count: 0,
        detail: None,
    }
}

/// The aiosmtpd sink as a child process on its own port; killed when dropped.
struct Sink {
    port: u16,
    dir: tempfile::TempDir,
    args: Vec<String>,
    child: Option<Child>,
}

impl Sink {
    async fn start(args: &[&str]) -> Sink {
        let mut s = Sink {
            port: free_port(),
            dir: tempfile::tempdir().expect("tempdir"),
            args: args.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        s.spawn().await;
        s
    }

    fn maildir(&self) -> PathBuf {
        self.dir.path().join("mail")
    }

    async fn spawn(&mut self) {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/smtp_sink.py");
        let stderr = std::fs::File::create(self.dir.path().join("sink.log")).expect("log");
        let child = Command::new("python3")
            .arg(script)
            .args(["--port", &self.port.to_string()])
            .arg("--maildir")
            .arg(self.maildir())
            .arg("--exit-on-stdin-eof")
            .args(&self.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect(
                "run python3 scripts/smtp_sink.py (python3 with aiosmtpd; see scripts/test.sh)",
            );
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                let log =
                    std::fs::read_to_string(self.dir.path().join("sink.log")).unwrap_or_default();
                panic!("the SMTP sink exited ({status}): {log}");
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "SMTP sink did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Messages received so far, oldest first, as the sink recorded them.
    fn messages(&self) -> Vec<Value> {
        let mut names: Vec<PathBuf> = std::fs::read_dir(self.maildir())
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        names.retain(|p| p.extension().is_some_and(|e| e == "json"));
        names.sort();
        names
            .iter()
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .filter_map(|t| serde_json::from_str(&t).ok())
            .collect()
    }

    async fn wait_for(&self, n: usize) -> Vec<Value> {
        wait_until("mail in the sink", Duration::from_secs(10), || async move {
            self.messages().len() >= n
        })
        .await;
        self.messages()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop();
    }
}

fn email_settings(url: String) -> EmailSettings {
    EmailSettings {
        url: Secret::new(url),
        from: "银龄守护 <alerts@silverguard.example.org>".into(),
        timeout: Duration::from_secs(5),
        ..Default::default()
    }
}

fn email<'a>(
    to: &'a str,
    key: &'a str,
    r: &'a silverguard::notify::templates::Rendered,
) -> EmailMessage<'a> {
    EmailMessage {
        to,
        subject: &r.subject,
        text: &r.text,
        html: &r.html,
        idempotency_key: key,
    }
}

/// A private CA and a certificate for 127.0.0.1 signed by it, made with the openssl CLI.
struct TestPki {
    dir: tempfile::TempDir,
}

impl TestPki {
    fn new() -> TestPki {
        let dir = tempfile::tempdir().expect("tempdir");
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .expect("run openssl (scripts/test.sh installs it)");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        std::fs::write(
            dir.path().join("leaf.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
             keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
        )
        .expect("write ext");
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509"];
        ca.extend(ec);
        ca.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=Silverguard test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        run(&ca);
        let mut csr = vec!["req"];
        csr.extend(ec);
        csr.extend([
            "-keyout",
            "leaf.key",
            "-out",
            "leaf.csr",
            "-subj",
            "/CN=127.0.0.1",
        ]);
        run(&csr);
        run(&[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "leaf.pem",
            "-days",
            "2",
            "-extfile",
            "leaf.ext",
        ]);
        TestPki { dir }
    }
    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

fn assert_transient<T: std::fmt::Debug>(r: Result<T, DeliveryError>, what: &str) -> String {
    match r {
        Err(DeliveryError::Transient(m)) => m,
        other => panic!("{what}: expected a transient failure, got {other:?}"),
    }
}

fn assert_permanent<T: std::fmt::Debug>(r: Result<T, DeliveryError>, what: &str) -> String {
    match r {
        Err(DeliveryError::Permanent(m)) => m,
        other => panic!("{what}: expected a permanent failure, got {other:?}"),
    }
}

/// Serves `app` on a free loopback port for the rest of the test.
async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}")
}

/// A URL where nothing listens.
fn dead_url(path: &str) -> String {
    format!("http://127.0.0.1:{}{path}", free_port())
}

// ---------------------------------------------------------------------------------------------
// Email

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_in_chinese_reaches_a_real_smtp_server_with_both_parts() {
    let sink = Sink::start(&[]).await;
    let sender = email_sender(&email_settings(format!("smtp://127.0.0.1:{}", sink.port)))
        .expect("sender")
        .expect("enabled");
    let r = render(&alert("王秀英"), Lang::ZhCn);
    let key = unique("ob-");
    let d = sender
        .send(&email("李建国 <guardian@example.org>", &key, &r))
        .await
        .expect("accepted");
    assert_eq!(d.provider, "smtp");
    let expected_id = format!("<sg.{key}@silverguard.example.org>");
    assert_eq!(d.provider_ref.as_deref(), Some(expected_id.as_str()));

    let m = &sink.wait_for(1).await[0];
    assert_eq!(m["rcpt_tos"], json!(["guardian@example.org"]));
    assert_eq!(m["mail_from"], "alerts@silverguard.example.org");
    assert_eq!(
        m["subject"],
        r.subject.as_str(),
        "UTF-8 subject decodes back"
    );
    assert!(m["subject"].as_str().unwrap().contains("王秀英"));
    assert_eq!(m["message_id"], expected_id.as_str());
    assert_eq!(m["content_type"], "multipart/alternative");
    let types: Vec<&str> = m["content_types"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        types.contains(&"text/plain") && types.contains(&"text/html"),
        "{types:?}"
    );
    let text = m["text"].as_str().expect("text part");
    assert!(
        text.contains("王秀英") && text.contains("紧急呼救 SOS"),
        "{text}"
    );
    assert!(text.contains("2026-11-23 21:05:07"), "{text}");
    assert!(text.contains("https://uri.amap.com/marker?position=120.155100,30.274100"));
    assert!(text.contains("https://sg.example.org/a/9001/"));
    let html = m["html"].as_str().expect("html part");
    assert!(html.contains("王秀英") && html.contains("href=\"https://sg.example.org/a/9001/"));
    assert!(
        m["from"].as_str().unwrap().contains("银龄守护"),
        "display name survives: {}",
        m["from"]
    );
    assert!(m["headers"]["Auto-Submitted"] == "auto-generated");
    let raw = m["raw"].as_str().unwrap();
    let subject_line = raw.lines().find(|l| l.starts_with("Subject:")).unwrap();
    assert!(
        subject_line.is_ascii() && subject_line.contains("=?utf-8?"),
        "RFC 2047: {subject_line}"
    );

    // The same key gives the same Message-ID (a retry is recognisable downstream).
    let d2 = sender
        .send(&email("guardian@example.org", &key, &r))
        .await
        .expect("accepted");
    assert_eq!(d2.provider_ref, d.provider_ref);
    assert_eq!(sink.wait_for(2).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_authenticates_with_credentials_from_the_url() {
    let sink = Sink::start(&["--user", "grid@example.org", "--password", "p@ss w:rd/1"]).await;
    let r = render(&alert("Wang Xiuying"), Lang::En);

    let good = format!(
        "smtp://grid%40example.org:p%40ss%20w%3Ard%2F1@127.0.0.1:{}",
        sink.port
    );
    let sender = email_sender(&email_settings(good)).unwrap().unwrap();
    sender
        .send(&email("family@example.org", "k-auth-1", &r))
        .await
        .expect("accepted");
    let m = &sink.wait_for(1).await[0];
    assert_eq!(m["auth_login"], "grid@example.org");
    assert_eq!(m["subject"], r.subject.as_str());

    let wrong = format!("smtp://grid%40example.org:nope@127.0.0.1:{}", sink.port);
    let sender = email_sender(&email_settings(wrong)).unwrap().unwrap();
    let msg = assert_permanent(
        sender
            .send(&email("family@example.org", "k-auth-2", &r))
            .await,
        "wrong password",
    );
    assert!(
        msg.contains("535") || msg.to_lowercase().contains("auth"),
        "{msg}"
    );
    assert!(
        !msg.contains("nope"),
        "the password is not in the error: {msg}"
    );

    let anonymous = format!("smtp://127.0.0.1:{}", sink.port);
    let sender = email_sender(&email_settings(anonymous)).unwrap().unwrap();
    assert_permanent(
        sender
            .send(&email("family@example.org", "k-auth-3", &r))
            .await,
        "no AUTH",
    );
    assert_eq!(sink.messages().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_over_starttls_and_implicit_tls() {
    let pki = TestPki::new();
    let (cert, key) = (pki.path("leaf.pem"), pki.path("leaf.key"));
    let r = render(&alert("王秀英"), Lang::ZhCn);

    // STARTTLS required, AUTH only after it (the sink insists, like a submission server).
    let sink = Sink::start(&[
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--user",
        "u",
        "--password",
        "pw",
    ])
    .await;
    let mut s = email_settings(format!("smtp://u:pw@127.0.0.1:{}?tls=starttls", sink.port));
    s.ca_file = Some(pki.path("ca.pem"));
    let sender = email_sender(&s).unwrap().unwrap();
    sender
        .send(&email("family@example.org", "k-tls-1", &r))
        .await
        .expect("accepted over STARTTLS");
    let m = &sink.wait_for(1).await[0];
    assert_eq!(m["tls"], true);
    assert_eq!(m["auth_login"], "u");

    // A relay whose certificate nobody vouches for is refused, and retrying will not help.
    s.ca_file = None;
    let sender = email_sender(&s).unwrap().unwrap();
    assert_permanent(
        sender
            .send(&email("family@example.org", "k-tls-2", &r))
            .await,
        "untrusted certificate",
    );

    // Plain SMTP to a server that requires STARTTLS is refused by the server (530).
    let plain = email_sender(&email_settings(format!(
        "smtp://127.0.0.1:{}?tls=none",
        sink.port
    )))
    .unwrap()
    .unwrap();
    assert_permanent(
        plain
            .send(&email("family@example.org", "k-tls-3", &r))
            .await,
        "no STARTTLS",
    );
    assert_eq!(sink.messages().len(), 1);

    // smtps://: TLS from the first byte.
    let tls_sink = Sink::start(&["--tls-cert", &cert, "--tls-key", &key, "--implicit-tls"]).await;
    let mut s = email_settings(format!("smtps://127.0.0.1:{}", tls_sink.port));
    s.ca_file = Some(pki.path("ca.pem"));
    let sender = email_sender(&s).unwrap().unwrap();
    sender
        .send(&email("family@example.org", "k-tls-4", &r))
        .await
        .expect("accepted over TLS");
    assert_eq!(tls_sink.wait_for(1).await[0]["tls"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_failures_are_classified() {
    let r = render(&alert("王秀英"), Lang::ZhCn);

    // Nothing listening: try again later.
    let down = email_sender(&email_settings(format!("smtp://127.0.0.1:{}", free_port())))
        .unwrap()
        .unwrap();
    assert_transient(
        down.send(&email("family@example.org", "k-down", &r)).await,
        "server down",
    );

    let sink = Sink::start(&[]).await;
    let sender = email_sender(&email_settings(format!("smtp://127.0.0.1:{}", sink.port)))
        .unwrap()
        .unwrap();
    let m = assert_permanent(
        sender.send(&email("reject@example.org", "k-550", &r)).await,
        "550 user unknown",
    );
    assert!(m.contains("550") || m.contains("no such user"), "{m}");
    assert_transient(
        sender
            .send(&email("tempfail@example.org", "k-451", &r))
            .await,
        "451 try later",
    );
    assert_permanent(
        sender.send(&email("not an address", "k-bad", &r)).await,
        "malformed address",
    );
    // The pool is still usable after those failures.
    sender
        .send(&email("family@example.org", "k-ok", &r))
        .await
        .expect("accepted");
    assert_eq!(sink.wait_for(1).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_resumes_when_the_relay_comes_back() {
    let mut sink = Sink::start(&[]).await;
    let sender = email_sender(&email_settings(format!("smtp://127.0.0.1:{}", sink.port)))
        .unwrap()
        .unwrap();
    let r = render(&alert("王秀英"), Lang::ZhCn);
    sender
        .send(&email("family@example.org", "k-1", &r))
        .await
        .expect("first mail");
    sink.wait_for(1).await;

    // The pooled connection dies with the relay; the next send must say "later", not hang.
    sink.stop();
    let started = std::time::Instant::now();
    assert_transient(
        sender.send(&email("family@example.org", "k-2", &r)).await,
        "relay down",
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "failed fast: {:?}",
        started.elapsed()
    );

    sink.spawn().await;
    sender
        .send(&email("family@example.org", "k-2", &r))
        .await
        .expect("delivered after restart");
    let all = sink.wait_for(2).await;
    assert_eq!(all.len(), 2);
}

// ---------------------------------------------------------------------------------------------
// SMS: generic webhook

#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Value>>>);

impl Recorder {
    fn push(&self, v: Value) {
        self.0.lock().expect("lock").push(v);
    }
    fn all(&self) -> Vec<Value> {
        self.0.lock().expect("lock").clone()
    }
}

async fn webhook_stand_in(rec: Recorder) -> String {
    async fn handle(
        State(rec): State<Recorder>,
        headers: HeaderMap,
        body: Bytes,
    ) -> (StatusCode, Json<Value>) {
        if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer tok-123") {
            return (
                StatusCode::UNAUTHORIZED,
                Json(json!({"error": "bad token"})),
            );
        }
        let Ok(v) = serde_json::from_slice::<Value>(&body) else {
            return (StatusCode::BAD_REQUEST, Json(json!({"error": "not json"})));
        };
        let is_str = |k: &str| v.get(k).is_some_and(Value::is_string);
        let params_ok = v
            .get("alert_params")
            .and_then(Value::as_object)
            .is_some_and(|o| o.values().all(Value::is_string));
        if !(is_str("to")
            && is_str("text")
            && is_str("lang")
            && is_str("idempotency_key")
            && params_ok)
        {
            return (
                StatusCode::UNPROCESSABLE_ENTITY,
                Json(json!({"error": "missing fields"})),
            );
        }
        if headers.get("idempotency-key").and_then(|h| h.to_str().ok())
            != v["idempotency_key"].as_str()
        {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": "idempotency header"})),
            );
        }
        match v["to"].as_str().unwrap_or_default() {
            "+8613800000400" => {
                return (
                    StatusCode::BAD_REQUEST,
                    Json(json!({"error": "invalid number"})),
                )
            }
            "+8613800000429" => {
                return (
                    StatusCode::TOO_MANY_REQUESTS,
                    Json(json!({"error": "slow down"})),
                )
            }
            "+8613800000503" => {
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    Json(json!({"error": "down"})),
                )
            }
            "+8613800000999" => {
                // Slower than the client's timeout.
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            _ => {}
        }
        rec.push(v);
        (
            StatusCode::ACCEPTED,
            Json(json!({"id": "wh-1", "status": "queued"})),
        )
    }
    serve(Router::new().route("/sms", post(handle)).with_state(rec)).await
}

fn sms_msg<'a>(
    to: &'a str,
    r: &'a silverguard::notify::templates::Rendered,
    lang: Lang,
    params: &'a BTreeMap<String, String>,
    key: &'a str,
) -> SmsMessage<'a> {
    SmsMessage {
        to,
        text: &r.sms,
        lang,
        params,
        idempotency_key: key,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sms_webhook_sends_json_with_bearer_and_maps_errors() {
    let rec = Recorder::default();
    let base = webhook_stand_in(rec.clone()).await;
    let settings = |url: String, token: &str| SmsSettings {
        provider: SmsProvider::Webhook,
        url,
        token: Some(Secret::new(token)),
        timeout: Duration::from_millis(800),
        ..Default::default()
    };
    let gw = sms_gateway(&settings(format!("{base}/sms"), "tok-123"))
        .unwrap()
        .unwrap();
    assert_eq!(gw.name(), "webhook");
    let view = alert("王秀英");
    let r = render(&view, Lang::ZhCn);
    let params = sms_template_params(&view, Lang::ZhCn);

    let d = gw
        .send(&sms_msg(
            "+8613800000001",
            &r,
            Lang::ZhCn,
            &params,
            "ob-7-sms",
        ))
        .await
        .expect("accepted");
    assert_eq!(
        (d.provider, d.provider_ref.as_deref()),
        ("webhook", Some("wh-1"))
    );
    let got = rec.all();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["to"], "+8613800000001");
    assert_eq!(got[0]["text"], r.sms.as_str());
    assert_eq!(got[0]["lang"], "zh-CN");
    assert_eq!(got[0]["idempotency_key"], "ob-7-sms");
    assert_eq!(got[0]["alert_params"]["name"], "王秀英");
    assert_eq!(
        got[0]["alert_params"]["link"],
        view.ack_url.as_deref().unwrap()
    );

    let send = |to: &'static str| {
        let gw = gw.clone();
        let r = r.clone();
        let params = params.clone();
        async move { gw.send(&sms_msg(to, &r, Lang::ZhCn, &params, "k")).await }
    };
    assert_permanent(send("+8613800000400").await, "400");
    assert_transient(send("+8613800000429").await, "429");
    assert_transient(send("+8613800000503").await, "503");
    assert_transient(send("+8613800000999").await, "timeout");

    let bad_token = sms_gateway(&settings(format!("{base}/sms"), "wrong"))
        .unwrap()
        .unwrap();
    assert_permanent(
        bad_token
            .send(&sms_msg("+8613800000001", &r, Lang::ZhCn, &params, "k"))
            .await,
        "401",
    );
    let down = sms_gateway(&settings(dead_url("/sms"), "tok-123"))
        .unwrap()
        .unwrap();
    assert_transient(
        down.send(&sms_msg("+8613800000001", &r, Lang::ZhCn, &params, "k"))
            .await,
        "down",
    );
    assert_eq!(rec.all().len(), 1, "only the good one was recorded");
}

// ---------------------------------------------------------------------------------------------
// SMS: Twilio

async fn twilio_stand_in(rec: Recorder) -> String {
    async fn handle(
        State(rec): State<Recorder>,
        UrlPath(sid): UrlPath<String>,
        headers: HeaderMap,
        body: Bytes,
    ) -> (StatusCode, Json<Value>) {
        let auth = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "))
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .and_then(|b| String::from_utf8(b).ok());
        if sid != "AC0123456789abcdef"
            || auth.as_deref() != Some("AC0123456789abcdef:twilio-secret")
        {
            return (
                StatusCode::UNAUTHORIZED,
                Json(json!({"code": 20003, "message": "Authenticate", "status": 401})),
            );
        }
        let ctype = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if !ctype.starts_with("application/x-www-form-urlencoded") {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"code": 20001, "message": "form expected"})),
            );
        }
        let form: HashMap<String, String> =
            url::form_urlencoded::parse(&body).into_owned().collect();
        let (Some(to), Some(from), Some(text)) =
            (form.get("To"), form.get("From"), form.get("Body"))
        else {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"code": 21604, "message": "missing To/From/Body", "status": 400})),
            );
        };
        if from != "+15005550006" || text.is_empty() {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"code": 21606, "message": "bad From", "status": 400})),
            );
        }
        match to.as_str() {
            // Twilio's magic test number for "invalid".
            "+15005550001" => (
                StatusCode::BAD_REQUEST,
                Json(
                    json!({"code": 21211, "message": "The 'To' number +15005550001 is not a valid phone number.", "more_info": "https://www.twilio.com/docs/errors/21211", "status": 400}),
                ),
            ),
            "+15005550429" => (
                StatusCode::TOO_MANY_REQUESTS,
                Json(json!({"code": 20429, "message": "Too Many Requests", "status": 429})),
            ),
            "+15005550500" => (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({"code": 20500, "message": "Internal Server Error"})),
            ),
            _ => {
                rec.push(json!(form));
                (
                    StatusCode::CREATED,
                    Json(
                        json!({"sid": "SM0123456789abcdef0123456789abcdef", "status": "queued", "to": to, "body": text}),
                    ),
                )
            }
        }
    }
    serve(
        Router::new()
            .route("/2010-04-01/Accounts/{sid}/Messages.json", post(handle))
            .with_state(rec),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sms_twilio_posts_the_form_with_basic_auth_and_maps_errors() {
    let rec = Recorder::default();
    let base = twilio_stand_in(rec.clone()).await;
    let settings = |token: &str, base_url: String| SmsSettings {
        provider: SmsProvider::Twilio,
        account_sid: "AC0123456789abcdef".into(),
        auth_token: Secret::new(token),
        from_number: "+15005550006".into(),
        base_url,
        timeout: Duration::from_secs(3),
        ..Default::default()
    };
    let gw = sms_gateway(&settings("twilio-secret", base.clone()))
        .unwrap()
        .unwrap();
    assert_eq!(gw.name(), "twilio");
    let view = alert("Wang Xiuying");
    let r = render(&view, Lang::En);
    let params = sms_template_params(&view, Lang::En);

    let d = gw
        .send(&sms_msg("+15005550009", &r, Lang::En, &params, "k1"))
        .await
        .expect("accepted");
    assert_eq!(d.provider, "twilio");
    assert_eq!(
        d.provider_ref.as_deref(),
        Some("SM0123456789abcdef0123456789abcdef")
    );
    let got = rec.all();
    assert_eq!(got[0]["To"], "+15005550009");
    assert_eq!(
        got[0]["Body"],
        r.sms.as_str(),
        "the body survives form encoding"
    );

    let m = assert_permanent(
        gw.send(&sms_msg("+15005550001", &r, Lang::En, &params, "k"))
            .await,
        "21211",
    );
    assert!(m.contains("21211"), "{m}");
    assert!(
        !m.contains("+15005550001"),
        "the number is masked in the error: {m}"
    );
    assert_transient(
        gw.send(&sms_msg("+15005550429", &r, Lang::En, &params, "k"))
            .await,
        "429",
    );
    assert_transient(
        gw.send(&sms_msg("+15005550500", &r, Lang::En, &params, "k"))
            .await,
        "500",
    );
    let bad = sms_gateway(&settings("wrong", base)).unwrap().unwrap();
    let m = assert_permanent(
        bad.send(&sms_msg("+15005550009", &r, Lang::En, &params, "k"))
            .await,
        "20003",
    );
    assert!(!m.contains("wrong"), "the token is not echoed: {m}");
    let down = sms_gateway(&settings("twilio-secret", dead_url("")))
        .unwrap()
        .unwrap();
    assert_transient(
        down.send(&sms_msg("+15005550009", &r, Lang::En, &params, "k"))
            .await,
        "down",
    );
    assert_eq!(rec.all().len(), 1);
}

// ---------------------------------------------------------------------------------------------
// SMS: Aliyun

/// Aliyun's percent-encoding done the way its documentation describes for Java: form-encode,
/// then `+` → `%20`, `*` → `%2A`, `%7E` → `~`. Deliberately not the library's code.
fn aliyun_encode_independently(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
        .replace('*', "%2A")
        .replace("%7E", "~")
}

fn aliyun_expected_signature(params: &HashMap<String, String>, secret: &str) -> String {
    let mut keys: Vec<&String> = params.keys().filter(|k| *k != "Signature").collect();
    keys.sort();
    let canonical: Vec<String> = keys
        .iter()
        .map(|k| {
            format!(
                "{}={}",
                aliyun_encode_independently(k),
                aliyun_encode_independently(&params[*k])
            )
        })
        .collect();
    let to_sign = format!(
        "POST&{}&{}",
        aliyun_encode_independently("/"),
        aliyun_encode_independently(&canonical.join("&"))
    );
    let mut mac =
        hmac::Hmac::<sha1::Sha1>::new_from_slice(format!("{secret}&").as_bytes()).unwrap();
    mac.update(to_sign.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

#[derive(Clone, Default)]
struct AliyunState {
    rec: Recorder,
    nonces: Arc<Mutex<HashSet<String>>>,
}

async fn aliyun_stand_in(state: AliyunState) -> String {
    async fn handle(
        State(st): State<AliyunState>,
        headers: HeaderMap,
        body: Bytes,
    ) -> (StatusCode, Json<Value>) {
        let err = |status: StatusCode, code: &str, msg: &str| {
            (
                status,
                Json(
                    json!({"RequestId": "req-1", "Code": code, "Message": msg, "Recommend": "https://next.api.aliyun.com/troubleshoot"}),
                ),
            )
        };
        let ctype = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if !ctype.starts_with("application/x-www-form-urlencoded") {
            return err(
                StatusCode::BAD_REQUEST,
                "MissingParameter",
                "form body expected",
            );
        }
        let p: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
        for (k, v) in [
            ("Action", "SendSms"),
            ("Version", "2017-05-25"),
            ("Format", "JSON"),
            ("SignatureMethod", "HMAC-SHA1"),
            ("SignatureVersion", "1.0"),
            ("AccessKeyId", "LTAItestkey"),
            ("SignName", "银龄守护"),
            ("TemplateCode", "SMS_123456789"),
        ] {
            if p.get(k).map(String::as_str) != Some(v) {
                return err(
                    StatusCode::BAD_REQUEST,
                    "InvalidParameter",
                    &format!("{k}={:?}", p.get(k)),
                );
            }
        }
        let Some(ts) = p.get("Timestamp") else {
            return err(StatusCode::BAD_REQUEST, "MissingTimestamp", "Timestamp");
        };
        match chrono::NaiveDateTime::parse_from_str(ts, "%Y-%m-%dT%H:%M:%SZ") {
            Ok(t) if (chrono::Utc::now().naive_utc() - t).num_seconds().abs() < 900 => {}
            _ => return err(StatusCode::BAD_REQUEST, "InvalidTimeStamp.Expired", ts),
        }
        let Some(nonce) = p.get("SignatureNonce").filter(|n| !n.is_empty()) else {
            return err(StatusCode::BAD_REQUEST, "MissingSignatureNonce", "");
        };
        let Some(sig) = p.get("Signature") else {
            return err(StatusCode::BAD_REQUEST, "MissingSignature", "");
        };
        if *sig != aliyun_expected_signature(&p, "aliyun-secret") {
            return err(
                StatusCode::BAD_REQUEST,
                "SignatureDoesNotMatch",
                "Specified signature is not matched with our calculation.",
            );
        }
        if !st.nonces.lock().unwrap().insert(nonce.clone()) {
            return err(
                StatusCode::BAD_REQUEST,
                "SignatureNonceUsed",
                "nonce reused",
            );
        }
        let Some(tp) = p
            .get("TemplateParam")
            .and_then(|t| serde_json::from_str::<Value>(t).ok())
        else {
            return err(StatusCode::OK, "isv.INVALID_JSON_PARAM", "TemplateParam");
        };
        if !["name", "kind", "time", "link"]
            .iter()
            .all(|k| tp.get(*k).is_some_and(Value::is_string))
        {
            return err(
                StatusCode::OK,
                "isv.TEMPLATE_MISSING_PARAMETERS",
                "name/kind/time/link",
            );
        }
        match p.get("PhoneNumbers").map(String::as_str) {
            Some("13800000002") => err(StatusCode::OK, "isv.MOBILE_NUMBER_ILLEGAL", "非法手机号"),
            Some("13800000003") => err(
                StatusCode::OK,
                "isv.BUSINESS_LIMIT_CONTROL",
                "触发分钟级流控Permits:1",
            ),
            Some("13800000004") => err(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                "The request has failed due to a temporary failure of the server.",
            ),
            Some(_) => {
                st.rec.push(json!(p));
                (
                    StatusCode::OK,
                    Json(
                        json!({"Code": "OK", "Message": "OK", "BizId": "900619746936498440^0", "RequestId": "F655A8D5-B967-440B-8683-DAD6FF8DE990"}),
                    ),
                )
            }
            None => err(StatusCode::BAD_REQUEST, "MissingPhoneNumbers", ""),
        }
    }
    serve(Router::new().route("/", post(handle)).with_state(state)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sms_aliyun_signs_requests_that_an_independent_verifier_accepts() {
    let st = AliyunState::default();
    let base = aliyun_stand_in(st.clone()).await;
    let settings = |secret: &str, endpoint: String| SmsSettings {
        provider: SmsProvider::Aliyun,
        access_key_id: "LTAItestkey".into(),
        access_key_secret: Secret::new(secret),
        sign_name: "银龄守护".into(),
        template_code: "SMS_123456789".into(),
        endpoint,
        timeout: Duration::from_secs(3),
        ..Default::default()
    };
    let gw = sms_gateway(&settings("aliyun-secret", base.clone()))
        .unwrap()
        .unwrap();
    assert_eq!(gw.name(), "aliyun");
    // A name with the characters whose encoding differs between Aliyun and form encoding.
    let view = alert("王 秀*英~");
    let r = render(&view, Lang::ZhCn);
    let params = sms_template_params(&view, Lang::ZhCn);

    let d = gw
        .send(&sms_msg(
            "+8613800000001",
            &r,
            Lang::ZhCn,
            &params,
            "ob-9-sms",
        ))
        .await
        .expect("accepted");
    assert_eq!(d.provider, "aliyun");
    assert_eq!(d.provider_ref.as_deref(), Some("900619746936498440^0"));
    let got = &st.rec.all()[0];
    assert_eq!(
        got["PhoneNumbers"], "13800000001",
        "mainland numbers go without +86"
    );
    assert_eq!(got["OutId"], "ob-9-sms");
    let tp: Value = serde_json::from_str(got["TemplateParam"].as_str().unwrap()).unwrap();
    assert_eq!(tp["name"], "王 秀*英~");
    assert_eq!(tp["link"], view.ack_url.as_deref().unwrap());
    // A second message draws a fresh nonce (the stand-in refuses a reused one).
    gw.send(&sms_msg(
        "13800000005",
        &r,
        Lang::ZhCn,
        &params,
        "ob-10-sms",
    ))
    .await
    .expect("second accepted");

    let m = assert_permanent(
        gw.send(&sms_msg("13800000002", &r, Lang::ZhCn, &params, "k"))
            .await,
        "illegal number",
    );
    assert!(m.contains("isv.MOBILE_NUMBER_ILLEGAL"), "{m}");
    assert_transient(
        gw.send(&sms_msg("13800000003", &r, Lang::ZhCn, &params, "k"))
            .await,
        "flow control",
    );
    assert_transient(
        gw.send(&sms_msg("13800000004", &r, Lang::ZhCn, &params, "k"))
            .await,
        "503",
    );

    let bad = sms_gateway(&settings("not-the-secret", base))
        .unwrap()
        .unwrap();
    let m = assert_permanent(
        bad.send(&sms_msg("13800000001", &r, Lang::ZhCn, &params, "k"))
            .await,
        "bad signature",
    );
    assert!(m.contains("SignatureDoesNotMatch"), "{m}");
    let down = sms_gateway(&settings("aliyun-secret", dead_url("")))
        .unwrap()
        .unwrap();
    assert_transient(
        down.send(&sms_msg("13800000001", &r, Lang::ZhCn, &params, "k"))
            .await,
        "down",
    );
    assert_eq!(st.rec.all().len(), 2);
}

// ---------------------------------------------------------------------------------------------
// IM robots

fn im_msg<'a>(
    url: &'a str,
    title: &'a str,
    markdown: &'a str,
    phones: &'a [String],
) -> ImMessage<'a> {
    ImMessage {
        webhook_url: url,
        title,
        markdown,
        mention_phones: phones,
    }
}

async fn wecom_stand_in(rec: Recorder) -> String {
    async fn handle(
        State(rec): State<Recorder>,
        Query(q): Query<HashMap<String, String>>,
        Json(v): Json<Value>,
    ) -> Json<Value> {
        match q.get("key").map(String::as_str) {
            Some("wkey") => {}
            Some("busy") => {
                return Json(json!({"errcode": 45009, "errmsg": "api freq out of limit"}))
            }
            _ => return Json(json!({"errcode": 93000, "errmsg": "invalid webhook url"})),
        }
        let content = v["markdown"]["content"].as_str().unwrap_or_default();
        if v["msgtype"] != "markdown" || content.is_empty() || content.len() > 4096 {
            return Json(json!({"errcode": 40008, "errmsg": "invalid message type"}));
        }
        rec.push(v);
        Json(json!({"errcode": 0, "errmsg": "ok"}))
    }
    async fn broken() -> StatusCode {
        StatusCode::BAD_GATEWAY
    }
    serve(
        Router::new()
            .route("/cgi-bin/webhook/send", post(handle))
            .route("/broken", post(broken))
            .with_state(rec),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wecom_robot_gets_markdown_and_errors_are_classified() {
    let rec = Recorder::default();
    let base = wecom_stand_in(rec.clone()).await;
    let im = im_sender(&ImSettings {
        kind: ImKind::Wecom,
        timeout: Duration::from_secs(3),
        ..Default::default()
    });
    let r = render(&alert("王秀英"), Lang::ZhCn);
    let phones = vec!["13800000001".to_string()];
    // A macro, not a closure: each call borrows a different URL temporary.
    macro_rules! msg {
        ($url:expr) => {
            im_msg($url, "紧急呼救", &r.im_markdown, &phones)
        };
    }
    let ok = format!("{base}/cgi-bin/webhook/send?key=wkey");
    let d = im.send(&msg!(&ok)).await.expect("accepted");
    assert_eq!(d.provider, "wecom");
    let got = rec.all();
    assert_eq!(got[0]["markdown"]["content"], r.im_markdown.as_str());

    assert_transient(
        im.send(&msg!(&format!("{base}/cgi-bin/webhook/send?key=busy")))
            .await,
        "45009",
    );
    let m = assert_permanent(
        im.send(&msg!(&format!("{base}/cgi-bin/webhook/send?key=nope")))
            .await,
        "93000",
    );
    assert!(m.contains("93000") && !m.contains("key=nope"), "{m}");
    assert_transient(im.send(&msg!(&format!("{base}/broken"))).await, "502");
    assert_transient(
        im.send(&msg!(&dead_url("/cgi-bin/webhook/send?key=wkey")))
            .await,
        "down",
    );
    assert_eq!(rec.all().len(), 1);
}

async fn dingtalk_stand_in(rec: Recorder) -> String {
    async fn handle(
        State(rec): State<Recorder>,
        Query(q): Query<HashMap<String, String>>,
        Json(v): Json<Value>,
    ) -> Json<Value> {
        const SECRET: &str = "SEC0123456789abcdef";
        match q.get("access_token").map(String::as_str) {
            Some("dtoken") => {}
            Some("busy") => {
                return Json(
                    json!({"errcode": 130101, "errmsg": "send too fast, exceed 20 times per minute"}),
                )
            }
            _ => return Json(json!({"errcode": 300001, "errmsg": "token is not exist"})),
        }
        // The robot's signature check, as DingTalk documents it.
        let (Some(ts), Some(sign)) = (q.get("timestamp"), q.get("sign")) else {
            return Json(json!({"errcode": 310000, "errmsg": "sign not match"}));
        };
        let Ok(ts_ms) = ts.parse::<i64>() else {
            return Json(json!({"errcode": 310000, "errmsg": "invalid timestamp"}));
        };
        if (chrono::Utc::now().timestamp_millis() - ts_ms).abs() > 3_600_000 {
            return Json(json!({"errcode": 310000, "errmsg": "timestamp expired"}));
        }
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(format!("{ts}\n{SECRET}").as_bytes());
        let expected =
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        if *sign != expected {
            return Json(json!({"errcode": 310000, "errmsg": "sign not match"}));
        }
        if v["msgtype"] != "markdown"
            || !v["markdown"]["title"].is_string()
            || !v["markdown"]["text"].is_string()
        {
            return Json(json!({"errcode": 40035, "errmsg": "missing markdown"}));
        }
        rec.push(v);
        Json(json!({"errcode": 0, "errmsg": "ok"}))
    }
    serve(
        Router::new()
            .route("/robot/send", post(handle))
            .with_state(rec),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dingtalk_robot_gets_signed_markdown_with_mentions() {
    let rec = Recorder::default();
    let base = dingtalk_stand_in(rec.clone()).await;
    let settings = |secret: &str| ImSettings {
        kind: ImKind::Dingtalk,
        dingtalk_secret: Some(Secret::new(secret)),
        timeout: Duration::from_secs(3),
    };
    let im = im_sender(&settings("SEC0123456789abcdef"));
    let r = render(&alert("王秀英"), Lang::ZhCn);
    let phones = vec!["13800000001".to_string(), "13900000002".to_string()];
    macro_rules! msg {
        ($url:expr) => {
            im_msg($url, "紧急呼救 SOS · 王秀英", &r.im_markdown, &phones)
        };
    }
    let ok = format!("{base}/robot/send?access_token=dtoken");
    let d = im.send(&msg!(&ok)).await.expect("accepted");
    assert_eq!(d.provider, "dingtalk");
    let got = &rec.all()[0];
    assert_eq!(got["markdown"]["title"], "紧急呼救 SOS · 王秀英");
    let text = got["markdown"]["text"].as_str().unwrap();
    assert!(text.starts_with(r.im_markdown.as_str()));
    assert!(
        text.contains("@13800000001") && text.contains("@13900000002"),
        "{text}"
    );
    assert_eq!(
        got["at"]["atMobiles"],
        json!(["13800000001", "13900000002"])
    );
    assert_eq!(got["at"]["isAtAll"], false);

    assert_transient(
        im.send(&msg!(&format!("{base}/robot/send?access_token=busy")))
            .await,
        "130101",
    );
    let wrong = im_sender(&settings("SECwrong"));
    let m = assert_permanent(wrong.send(&msg!(&ok)).await, "bad sign");
    assert!(m.contains("310000"), "{m}");
    let unsigned = im_sender(&ImSettings {
        kind: ImKind::Dingtalk,
        ..Default::default()
    });
    assert_permanent(unsigned.send(&msg!(&ok)).await, "unsigned");
    assert_transient(
        im.send(&msg!(&dead_url("/robot/send?access_token=dtoken")))
            .await,
        "down",
    );
    assert_eq!(rec.all().len(), 1);
}

/// The sink script is where the test expects it (a clearer failure than a spawn error).
#[test]
fn smtp_sink_script_exists() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/smtp_sink.py");
    assert!(p.is_file(), "{}", p.display());
}
