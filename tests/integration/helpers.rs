//! Test fixtures: a throwaway database, a private broker, the service in-process or as a
//! child process, and polling with deadlines.

use std::future::Future;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use silverguard::config::{Secret, Settings};
use tokio_postgres::NoTls;

pub fn pg_base() -> String {
    std::env::var("SILVERGUARD_TEST_PG_BASE")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}{:08x}", rand::random::<u32>())
}

/// A database created for one test and dropped (with its connections) afterwards.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let name = unique("sg_test_");
        let (client, conn) = tokio_postgres::connect(&format!("{}/postgres", pg_base()), NoTls)
            .await
            .expect("connect to PostgreSQL (is it running? see scripts/test.sh)");
        tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        TestDb {
            url: format!("{}/{name}", pg_base()),
            name,
        }
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url, NoTls)
            .await
            .expect("connect to test database");
        tokio::spawn(conn);
        client
    }

    pub async fn count(&self, sql: &str) -> i64 {
        self.client()
            .await
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get(0)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let url = format!("{}/postgres", pg_base());
        let name = self.name.clone();
        // Drop runs outside any runtime guarantee: use a thread with its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let (client, conn) = tokio_postgres::connect(&url, NoTls).await.ok()?;
                tokio::spawn(conn);
                client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
                    .ok()
            })
        })
        .join();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A private Mosquitto from deploy/mosquitto.conf, on its own port, with its own persistence.
pub struct TestBroker {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl TestBroker {
    pub async fn start() -> TestBroker {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut broker = TestBroker {
            port: free_port(),
            dir,
            child: None,
        };
        broker.spawn().await;
        broker
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let conf_src = std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/mosquitto.conf"),
        )
        .expect("deploy/mosquitto.conf");
        let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
        let conf: String = conf_src
            .lines()
            .map(|l| {
                if l.starts_with("listener ") {
                    format!("listener {} 127.0.0.1", self.port)
                } else if l.starts_with("persistence_location") {
                    format!("persistence_location {}/", self.dir.path().display())
                } else {
                    l.to_string()
                }
            })
            .chain([
                format!("user {user}"),
                format!("log_dest file {}/mosquitto.log", self.dir.path().display()),
            ])
            .collect::<Vec<_>>()
            .join("\n");
        let path = self.dir.path().join("mosquitto.conf");
        std::fs::write(&path, conf).expect("write broker config");
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto (is it installed? see scripts/test.sh)");
        self.child = Some(child);
        let port = self.port;
        wait_until(
            "broker accepts connections",
            Duration::from_secs(10),
            || async move {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            },
        )
        .await;
    }

    /// Stops the broker gracefully (it writes its persistence file) and starts it again on
    /// the same port with the same persistence.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let _ = child.wait();
        }
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Settings for a test instance: its database, its broker, a free HTTP port, fast batches.
pub fn settings(db: &TestDb, broker: &TestBroker) -> Settings {
    let mut s = Settings::default();
    s.database.url = Secret::new(db.url.clone());
    s.mqtt.url = broker.url();
    s.mqtt.client_id = unique("sgtest-");
    s.http.addr = "127.0.0.1:0".into();
    s.ingest.batch_max_delay = Duration::from_millis(20);
    s.ingest.latest_flush_interval = Duration::from_millis(200);
    // The daily knock would check every test's elders; its own test drives it directly.
    s.alerts.wellness_check_at = "off".into();
    s.alerts.silence_grace = Duration::ZERO;
    s
}

/// The service running in this process.
pub struct RunningApp {
    pub http: std::net::SocketAddr,
    shutdown: tokio_util::sync::CancellationToken,
    handle: tokio::task::JoinHandle<()>,
}

impl RunningApp {
    pub async fn start(settings: Settings) -> RunningApp {
        init_test_log();
        let app = silverguard::app::Application::build(settings)
            .await
            .expect("build app");
        let http = app.http_addr();
        let shutdown = app.shutdown_token();
        let handle = tokio::spawn(async move {
            app.run_until_stopped().await.expect("app run");
        });
        let r = RunningApp {
            http,
            shutdown,
            handle,
        };
        r.wait_ready().await;
        r
    }

    pub async fn wait_ready(&self) {
        let url = format!("http://{}/readyz", self.http);
        wait_until("service ready", Duration::from_secs(20), || {
            let url = url.clone();
            async move { http_get(&url).await.map(|(c, _)| c == 200).unwrap_or(false) }
        })
        .await;
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(30), self.handle).await;
    }
}

/// The `silverguard serve` binary as a child process (for kill -9).
pub struct ServiceProcess {
    pub child: Child,
    pub http_port: u16,
}

impl ServiceProcess {
    pub fn spawn(db: &TestDb, broker: &TestBroker, client_id: &str) -> ServiceProcess {
        Self::spawn_with(db, broker, client_id, None)
    }

    pub fn spawn_with(
        db: &TestDb,
        broker: &TestBroker,
        client_id: &str,
        config: Option<&std::path::Path>,
    ) -> ServiceProcess {
        let http_port = free_port();
        let log = std::fs::File::create(std::env::temp_dir().join(format!("{client_id}.log")))
            .expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_silverguard"));
        if let Some(c) = config {
            cmd.env("SILVERGUARD_CONFIG", c);
        }
        let child = cmd
            .arg("serve")
            .env("SILVERGUARD_DATABASE_URL", &db.url)
            .env("SILVERGUARD_MQTT_URL", broker.url())
            .env("SILVERGUARD_HTTP_ADDR", format!("127.0.0.1:{http_port}"))
            .env("SILVERGUARD_MQTT__CLIENT_ID", client_id)
            .env("SILVERGUARD_INGEST__BATCH_MAX_DELAY", "20ms")
            .env("SILVERGUARD_ALERTS__WELLNESS_CHECK_AT", "off")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn silverguard");
        ServiceProcess { child, http_port }
    }

    pub async fn wait_ready(&self) {
        let url = format!("http://127.0.0.1:{}/readyz", self.http_port);
        wait_until("service process ready", Duration::from_secs(30), || {
            let url = url.clone();
            async move { http_get(&url).await.map(|(c, _)| c == 200).unwrap_or(false) }
        })
        .await;
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Minimal HTTP/1.1 GET over a real socket; returns (status, body).
pub async fn http_get(url: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}")))?;
    let mut s = tokio::net::TcpStream::connect(host).await.ok()?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    Some((code, body))
}

/// A counter or gauge of the service's `/metrics` on `port` (summed over its label sets; 0
/// when the page cannot be read).
pub async fn metric(port: u16, name: &str) -> f64 {
    let Some((_, body)) = http_get(&format!("http://127.0.0.1:{port}/metrics")).await else {
        return 0.0;
    };
    body.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| {
            let rest = &l[name.len()..];
            rest.starts_with(' ') || rest.starts_with('{')
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Polls `check` until it is true or the deadline passes (then panics with `what`).
pub async fn wait_until<F, Fut>(what: &str, deadline: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() > end {
            panic!("timed out after {deadline:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls the count query `sql` until it counts exactly one (or panics with `what` after
/// `deadline`): a row written, an alert raised, once.
pub async fn wait_until_one(
    c: &tokio_postgres::Client,
    what: &str,
    deadline: Duration,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) {
    wait_until(what, deadline, || async {
        c.query_one(sql, params)
            .await
            .map(|r| r.get::<_, i64>(0) == 1)
            .unwrap_or(false)
    })
    .await;
}

/// Waits until a count query reaches `expected`, then checks it stays there (no late
/// duplicates) for a short while; returns the final count.
pub async fn wait_for_count(db: &TestDb, sql: &str, expected: i64, deadline: Duration) -> i64 {
    let end = tokio::time::Instant::now() + deadline;
    let client = db.client().await;
    let mut last = -1;
    loop {
        last = client
            .query_one(sql, &[])
            .await
            .map(|r| r.get(0))
            .unwrap_or(last);
        if last >= expected || tokio::time::Instant::now() > end {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Provisions devices through the library (the same code as `silverguard device add`).
pub async fn provision(db: &TestDb, ids: Vec<String>) {
    let mut s = Settings::default();
    s.database.url = Secret::new(db.url.clone());
    silverguard::store::ensure_database(&db.url)
        .await
        .expect("ensure db");
    let pool = silverguard::store::build_pool(&s.database).expect("pool");
    silverguard::store::migrate::run(&pool)
        .await
        .expect("migrate");
    silverguard::store::devices::add(
        &pool,
        &silverguard::store::devices::NewDevices {
            ids,
            ..Default::default()
        },
    )
    .await
    .expect("provision");
    pool.close();
}

/// Logs go to the test's output only when `TEST_LOG` is set (e.g. `TEST_LOG=debug`).
pub fn init_test_log() {
    if let Ok(filter) = std::env::var("TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

/// One HTTP request a stand-in server received.
#[derive(Debug, Clone)]
pub struct Captured {
    pub path: String,
    pub body: String,
    pub at: std::time::Instant,
}

/// A real HTTP server standing in for an SMS gateway or IM robot: records every request and
/// answers 200.
pub struct CaptureServer {
    pub port: u16,
    pub requests: std::sync::Arc<std::sync::Mutex<Vec<Captured>>>,
}

/// The stand-ins' HTTP side: records every request (path, body, time) and answers like an
/// SMS or IM provider that accepted it; while `failing` is set it answers 503 and records
/// nothing.
fn capture_router(
    requests: std::sync::Arc<std::sync::Mutex<Vec<Captured>>>,
    failing: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> axum::Router {
    use axum::extract::{Request, State};
    use std::sync::atomic::Ordering;
    type Shared = (
        std::sync::Arc<std::sync::Mutex<Vec<Captured>>>,
        std::sync::Arc<std::sync::atomic::AtomicBool>,
    );
    async fn handle(
        State((reqs, failing)): State<Shared>,
        req: Request,
    ) -> (axum::http::StatusCode, String) {
        let path = req.uri().to_string();
        let body = axum::body::to_bytes(req.into_body(), 1 << 20)
            .await
            .unwrap_or_default();
        if failing.load(Ordering::SeqCst) {
            return (
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "{\"error\":\"down\"}".into(),
            );
        }
        if let Ok(mut r) = reqs.lock() {
            r.push(Captured {
                path,
                body: String::from_utf8_lossy(&body).into_owned(),
                at: std::time::Instant::now(),
            });
        }
        (
            axum::http::StatusCode::OK,
            "{\"id\":\"stand-in\",\"errcode\":0}".into(),
        )
    }
    axum::Router::new()
        .fallback(handle)
        .with_state((requests, failing))
}

impl CaptureServer {
    pub async fn start() -> CaptureServer {
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let failing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let app = capture_router(requests.clone(), failing.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        CaptureServer { port, requests }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn all(&self) -> Vec<Captured> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Requests whose body mentions `needle` (a phone number, a webhook id...).
    pub fn matching(&self, needle: &str) -> Vec<Captured> {
        self.all()
            .into_iter()
            .filter(|c| c.body.contains(needle) || c.path.contains(needle))
            .collect()
    }
}

/// A real SMTP server (aiosmtpd, scripts/smtp_sink.py) writing each message to a directory.
pub struct SmtpSink {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Option<Child>,
}

impl SmtpSink {
    pub async fn start() -> SmtpSink {
        let mut s = SmtpSink {
            port: free_port(),
            dir: tempfile::tempdir().expect("tempdir"),
            child: None,
        };
        s.spawn().await;
        s
    }

    pub async fn spawn(&mut self) {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/smtp_sink.py");
        let child = Command::new("python3")
            .arg(script)
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--maildir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the SMTP sink (python3 with aiosmtpd; see scripts/test.sh)");
        self.child = Some(child);
        let port = self.port;
        wait_until(
            "SMTP sink accepts connections",
            Duration::from_secs(15),
            || async move {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            },
        )
        .await;
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}?tls=none", self.port)
    }

    /// Raw messages received so far.
    pub fn messages(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Ok(entries) = std::fs::read_dir(self.dir.path()) {
            for e in entries.flatten() {
                if let Ok(text) = std::fs::read_to_string(e.path()) {
                    out.push(text);
                }
            }
        }
        out
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------------
// Fault campaign (tests/integration/faults.rs): a private PostgreSQL cluster that can be
// restarted, and an SMS stand-in that can go down and come back on the same port.

/// A PostgreSQL cluster of its own (initdb into a temporary directory, `pg_ctl` on a free
/// port), for tests that restart or stop the server: the shared cluster serves every other
/// test and must stay up. Stopped and deleted on drop.
pub struct TestPgCluster {
    pub port: u16,
    dir: tempfile::TempDir,
    bin: PathBuf,
}

impl TestPgCluster {
    pub async fn start() -> TestPgCluster {
        let bin = pg_bin_dir();
        let dir = tempfile::tempdir().expect("tempdir");
        // initdb and postgres refuse to run as root; the tests run as root on CI machines.
        if running_as_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(status.success(), "chown the cluster directory to postgres");
        }
        let cluster = TestPgCluster {
            port: free_port(),
            dir,
            bin,
        };
        let data = cluster.data_dir();
        let out = cluster
            .pg_command("initdb")
            .args(["-D", &data, "-U", "postgres", "--auth=trust", "-E", "UTF8"])
            .args(["--no-sync", "--locale=C.UTF-8"])
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Small and quick: this cluster holds one test's database.
        let conf = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\n\
             fsync = off\nshared_buffers = 32MB\nmax_connections = 100\n",
            cluster.port,
            cluster.dir.path().display()
        );
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(format!("{data}/postgresql.conf"))
            .expect("postgresql.conf");
        std::io::Write::write_all(&mut f, conf.as_bytes()).expect("write postgresql.conf");
        cluster.start_server().await;
        cluster
    }

    fn data_dir(&self) -> String {
        format!("{}/data", self.dir.path().display())
    }

    fn pg_command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        if running_as_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    /// `postgres://postgres@127.0.0.1:<port>`: the server, without a database name.
    pub fn base_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }

    /// A fresh database on this cluster (dropped with the cluster).
    pub async fn new_db(&self) -> TestDb {
        let name = unique("sg_fault_");
        let (client, conn) =
            tokio_postgres::connect(&format!("{}/postgres", self.base_url()), NoTls)
                .await
                .expect("connect to the private cluster");
        tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        TestDb {
            url: format!("{}/{name}", self.base_url()),
            name,
        }
    }

    async fn start_server(&self) {
        let log = format!("{}/server.log", self.dir.path().display());
        let out = self
            .pg_command("pg_ctl")
            .args([
                "-D",
                &self.data_dir(),
                "-l",
                &log,
                "-w",
                "-t",
                "30",
                "start",
            ])
            .stdout(Stdio::null())
            .output()
            .expect("run pg_ctl start");
        assert!(
            out.status.success(),
            "pg_ctl start failed: {} (log: {log})",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = self.port;
        wait_until(
            "private PostgreSQL accepts connections",
            Duration::from_secs(30),
            || async move {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            },
        )
        .await;
    }

    /// Stops the server in fast mode (open transactions are rolled back, clients
    /// disconnected) and waits until it is down.
    pub fn stop(&self) {
        let _ = self
            .pg_command("pg_ctl")
            .args([
                "-D",
                &self.data_dir(),
                "-m",
                "fast",
                "-w",
                "-t",
                "30",
                "stop",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    pub async fn start_again(&self) {
        self.start_server().await;
    }

    /// `pg_ctl restart -m fast`, the way an operator restarts the server.
    pub async fn restart(&self) {
        self.stop();
        self.start_server().await;
    }
}

impl Drop for TestPgCluster {
    fn drop(&mut self) {
        let _ = self
            .pg_command("pg_ctl")
            .args(["-D", &self.data_dir(), "-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The newest `/usr/lib/postgresql/<version>/bin`, else whatever directory `pg_ctl` is
/// found in on the PATH.
fn pg_bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_string_lossy().parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("pg_ctl").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return bin;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .find(|p| p.join("pg_ctl").exists())
        .expect("PostgreSQL server binaries (pg_ctl, initdb): install postgresql")
}

/// An HTTP stand-in for the SMS gateway that can go down (connection refused) and come back
/// on the same port, keeping one record of every request it accepted. While down, a request
/// that still arrives on a kept-alive connection gets 503 and is not recorded.
pub struct SwitchableStandIn {
    pub port: u16,
    pub requests: std::sync::Arc<std::sync::Mutex<Vec<Captured>>>,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl SwitchableStandIn {
    pub async fn start() -> SwitchableStandIn {
        let mut s = SwitchableStandIn {
            port: free_port(),
            requests: Default::default(),
            down: Default::default(),
            server: None,
        };
        s.up().await;
        s
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Starts answering (again) on the same port.
    pub async fn up(&mut self) {
        self.down.store(false, std::sync::atomic::Ordering::SeqCst);
        let app = capture_router(self.requests.clone(), self.down.clone());
        // The port was ours a moment ago; after a stop it may sit in TIME_WAIT briefly.
        let addr = format!("127.0.0.1:{}", self.port);
        let mut listener = None;
        for _ in 0..100 {
            match tokio::net::TcpListener::bind(&addr).await {
                Ok(l) => {
                    listener = Some(l);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let listener = listener.expect("bind the stand-in's port again");
        self.server = Some(tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        }));
    }

    /// Stops listening: new connections are refused. Connections the service keeps alive
    /// are served by their own tasks, which answer 503 while the flag says down.
    pub async fn down(&mut self) {
        self.down.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(server) = self.server.take() {
            server.abort();
            let _ = server.await;
        }
    }

    pub fn all(&self) -> Vec<Captured> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

impl Drop for SwitchableStandIn {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

/// A small tmpfs mounted for one test (a tablespace that can be made full and grown again);
/// needs the right to mount (root). Unmounted on drop.
pub struct TmpfsMount {
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl TmpfsMount {
    /// None, with a message, when the mount is refused outside CI (it needs root); under CI
    /// (`CI=true`) a refused mount fails the test instead.
    pub fn new(size: &str, owner: &str) -> Option<TmpfsMount> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().to_path_buf();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(&path)
            .output()
            .expect("run mount");
        if !out.status.success() {
            let why = format!(
                "mount a tmpfs (this test needs root): {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
            eprintln!("SKIPPED: cannot {why}");
            return None;
        }
        let _ = Command::new("chown").arg(owner).arg(&path).status();
        Some(TmpfsMount { path, _dir: dir })
    }

    /// KiB in use.
    pub fn used_kib(&self) -> u64 {
        let out = Command::new("df")
            .args(["-k", "--output=used"])
            .arg(&self.path)
            .output()
            .expect("df");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .expect("df output")
    }

    /// Changes the size (`64m`, `2048k`).
    pub fn resize(&self, size: &str) {
        let out = self.try_resize(size);
        assert!(out.is_ok(), "resize the tmpfs to {size}: {out:?}");
    }

    fn try_resize(&self, size: &str) -> Result<(), String> {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.path)
            .output()
            .expect("run mount");
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Shrinks the filesystem to what it uses (plus 64 KiB, soon filled), so that it is
    /// full; returns the new size in KiB. Writers keep writing meanwhile, and a size below
    /// what is used is refused, so it measures again until the shrink holds.
    pub fn fill_up(&self) -> u64 {
        let mut last = String::new();
        for _ in 0..50 {
            let size = self.used_kib() + 64;
            match self.try_resize(&format!("{size}k")) {
                Ok(()) => return size,
                Err(e) => last = e,
            }
        }
        panic!("could not shrink the tmpfs to what it uses: {last}");
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}
