//! `bracelet-sim bench`: how much a city's fleet one small node can ingest, and how long an
//! SOS takes to reach a person's phone meanwhile (issues 3 and 5), measured end to end
//! against a real broker, a real PostgreSQL and the real `silverguard serve`.
//!
//! # What one run does
//!
//! 1. Starts a stand-in SMS gateway ([`gateway`]) on 127.0.0.1; the arrival of a POST there
//!    is "the notification was accepted by a provider".
//! 2. Creates a fresh database `sg_bench_<random>` (dropped at the end unless `keep_db`),
//!    migrates it and provisions the fleet with the service's own admin commands
//!    ([`provision`]): `devices` load bracelets, and one SOS bracelet per SOS to be pressed,
//!    each bound to its own elder whose grid worker has a unique phone.
//! 3. Measures the limits asked for in `baselines` ([`baselines`]) while no service consumes
//!    the stream: broker pass-through, `psql \copy`, a naive INSERT-per-message bridge.
//! 4. Starts `silverguard serve` as a child ([`service`]) pointed at the broker, the database
//!    and the gateway, and waits for `/readyz`.
//! 5. Idle phase: `idle_sos` SOS presses with no other traffic: the baseline.
//! 6. Load phase ([`load`]): for each step of the ramp (or once, at `rate`), heartbeats from
//!    `devices` bracelets multiplexed over `connections` MQTT connections ([`raw`]); after
//!    `warmup`, a measured window of `duration` during which SOS are pressed at `sos_rate`
//!    ([`sos`]), lag markers are followed into the database ([`lag`]), and the service's
//!    counters, CPU time and memory are sampled. Then the load pauses until everything
//!    published is committed (per-step losses) and the broker has read the acknowledgements
//!    it fell behind on ([`broker_sys`]), and the next step starts. The ramp stops after the
//!    first step the service cannot keep up with; a step the broker carried only by queueing
//!    (its backlog at the window's end more than a consumer's window) is not sustained, and
//!    the broker baseline's probes are judged the same way.
//! 7. After a ramp (with the broker baseline asked for and the ramp measured), with the
//!    service stopped and its session forgotten: the broker baseline once more, since the
//!    machine's speed can move within a run; the ratio uses the higher of the two limits
//!    when both are of the same kind, and the report says how far they differ.
//! 8. Reports ([`report`]): per step and overall, committed heartbeats/s, ingest lag, SOS
//!    latency (and where it goes, from database timestamps), CPU, RSS, rejects and losses,
//!    the ratios to the limits, storage per heartbeat. A lost SOS or heartbeat fails the run.

pub mod baselines;
pub mod broker_sys;
pub mod conn;
pub mod db;
pub mod gateway;
pub mod lag;
pub mod load;
pub mod provision;
pub mod raw;
pub mod report;
pub mod service;
pub mod sos;
pub mod stats;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::BrokerAddr;
use gateway::SmsGateway;
use load::{Load, LoadSettings};
use report::{BenchReport, HistSummary, Stages};
use service::ServiceCmd;
use sos::{Injector, Outcome, SosSummary};
use stats::{Histogram, LatencySummary};

/// Why a bench run could not be carried out (as opposed to a run that measured a failure,
/// which is a [`BenchReport`] with `passed = false`).
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("invalid bench settings: {0}")]
    Config(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("database: {0}")]
    Db(String),
    #[error("silverguard: {0}")]
    Service(String),
    #[error("MQTT: {0}")]
    Mqtt(String),
    #[error("interrupted")]
    Interrupted,
}

impl BenchError {
    pub(crate) fn io(context: &str, source: std::io::Error) -> BenchError {
        BenchError::Io {
            context: context.to_string(),
            source,
        }
    }
}

/// Everything a run needs. [`BenchConfig::standard`] and [`BenchConfig::smoke`] give the two
/// presets; the command line overrides single fields.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Broker the service and the bench both use (`mqtt://host:port`).
    pub mqtt_url: String,
    /// PostgreSQL server, without a database name (`postgres://user@host:port`).
    pub pg_base: String,
    /// Keep the bench database after the run (for inspection).
    pub keep_db: bool,
    pub silverguard_bin: PathBuf,
    /// Where the service's log goes [default: the temp dir, named after the database].
    pub service_log: Option<PathBuf>,
    /// Extra `SILVERGUARD_*` settings for the service (tuning experiments).
    pub service_env: Vec<(String, String)>,
    /// `silverguard serve` processes to run; more than one share the MQTT stream through a
    /// shared subscription (`mqtt.shared_group`), the way several instances are deployed.
    pub instances: usize,
    pub smoke: bool,
    /// Heartbeats per second offered, all devices together.
    pub rate: f64,
    pub devices: usize,
    pub connections: usize,
    /// Load before the measured window starts.
    pub warmup: Duration,
    /// The measured window.
    pub duration: Duration,
    /// SOS presses per second during the window (and the idle phase).
    pub sos_rate: f64,
    /// SOS presses before the load starts: the idle baseline.
    pub idle_sos: usize,
    /// SOS devices provisioned; at least `idle_sos` + what the window needs.
    pub sos_devices: usize,
    /// An SOS whose SMS has not arrived this long after its publish is lost.
    pub sos_timeout: Duration,
    /// After the load stops: how long the committed count may keep growing.
    pub drain_timeout: Duration,
    pub seed: u64,
    /// No progress lines on stderr.
    pub quiet: bool,
    /// A ramp: one step per offered rate (heartbeats/s), each with `warmup` + `duration` and
    /// drained before the next. Empty: one step at `rate`.
    pub steps: Vec<f64>,
    /// Extra steps after a ramp that reached a rate it could not sustain: each halves the
    /// gap between the highest sustained rate and the lowest unsustained one above it
    /// ([`next_refinement`]), so the reported ceiling does not depend on how coarse the
    /// ramp's steps are. Only for ramps (two steps or more).
    pub refine: usize,
    /// Baselines measured before the service starts ([`baselines`]).
    pub baselines: baselines::Which,
    /// Measured window of the broker and naive-bridge baselines (after 2 s of warm-up).
    pub baseline_window: Duration,
    /// Rate offered to the broker baseline: far above what it passes, so that it shows its
    /// ceiling (what the bench could not publish is counted, not hidden).
    pub broker_rate: f64,
    /// How the broker baseline's subscriber coalesces its reads ([`raw::Coalescing`]):
    /// the longest wait, as silverguard's `mqtt.read_coalesce`; zero reads every message as
    /// it arrives.
    pub baseline_read_coalesce: Duration,
    /// Rate offered to the naive bridge.
    pub naive_rate: f64,
    /// Rows `psql \copy` loads in the COPY baseline.
    pub copy_rows: u64,
    /// Lag markers per second over the whole load ([`lag`]).
    pub markers_per_s: f64,
    /// Each load connection writes what is due at most this often ([`load`]).
    pub publish_tick: Duration,
    /// How long each load connection lets the broker's PUBACKs wait before it reads them
    /// ([`load::LoadSettings::ack_read_coalesce`]); zero reads each as it arrives.
    pub ack_read_coalesce: Duration,
    /// How often the lag tracker looks for its markers (the lag figures' resolution).
    pub lag_poll: Duration,
    /// SQL run on the bench database after `silverguard migrate`, before the service starts
    /// (schema experiments, e.g. `ALTER TABLE device_latest SET (fillfactor = 50)`).
    pub db_sql: Vec<String>,
    /// Cancelling stops the run at once (the service is killed, the database dropped).
    pub cancel: CancellationToken,
}

impl BenchConfig {
    /// Issue 3's measurement: 5,000 heartbeats/s from 5,000 bracelets, 60 s measured.
    pub fn standard() -> BenchConfig {
        let mut c = BenchConfig {
            mqtt_url: "mqtt://127.0.0.1:1883".into(),
            pg_base: "postgres://postgres@127.0.0.1:5432".into(),
            keep_db: false,
            silverguard_bin: PathBuf::from("target/release/silverguard"),
            service_log: None,
            service_env: Vec::new(),
            instances: 1,
            smoke: false,
            rate: 5000.0,
            devices: 5000,
            connections: 8,
            warmup: Duration::from_secs(10),
            duration: Duration::from_secs(60),
            sos_rate: 2.0,
            idle_sos: 20,
            sos_devices: 0,
            sos_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(60),
            seed: 1,
            quiet: false,
            steps: Vec::new(),
            refine: 0,
            baselines: baselines::Which::default(),
            baseline_window: Duration::from_secs(10),
            broker_rate: 400_000.0,
            baseline_read_coalesce: Duration::from_millis(5),
            naive_rate: 5_000.0,
            copy_rows: 1_000_000,
            markers_per_s: 100.0,
            publish_tick: Duration::from_millis(1),
            ack_read_coalesce: Duration::from_millis(5),
            lag_poll: Duration::from_millis(20),
            db_sql: Vec::new(),
            cancel: CancellationToken::new(),
        };
        c.sos_devices = c.needed_sos_devices();
        c
    }

    /// The CI smoke run: small and short (about 20 s), to assert zero loss, not speed.
    pub fn smoke() -> BenchConfig {
        let mut c = BenchConfig {
            smoke: true,
            rate: 500.0,
            devices: 200,
            connections: 2,
            warmup: Duration::from_secs(2),
            duration: Duration::from_secs(5),
            sos_rate: 1.0,
            idle_sos: 3,
            drain_timeout: Duration::from_secs(20),
            ..BenchConfig::standard()
        };
        c.sos_devices = c.needed_sos_devices();
        c
    }

    /// The offered rate of each step.
    pub fn step_rates(&self) -> Vec<f64> {
        if self.steps.is_empty() {
            vec![self.rate]
        } else {
            self.steps.clone()
        }
    }

    /// SOS presses one step's window makes: `sos_rate × duration`.
    pub fn loaded_sos_per_step(&self) -> usize {
        (self.sos_rate * self.duration.as_secs_f64()).floor() as usize
    }

    /// Refinement steps a run may add after its ramp.
    pub fn refine_steps(&self) -> usize {
        if self.steps.len() > 1 {
            self.refine
        } else {
            0
        }
    }

    /// SOS presses all windows make (refinement steps counted as if they all ran).
    pub fn loaded_sos(&self) -> usize {
        self.loaded_sos_per_step() * (self.step_rates().len() + self.refine_steps())
    }

    /// One device per SOS: the idle ones, the window's, and a 10 % margin (at least 5).
    pub fn needed_sos_devices(&self) -> usize {
        let loaded = self.loaded_sos();
        self.idle_sos + loaded + (loaded / 10).max(5)
    }

    pub fn validate(&self) -> Result<(), BenchError> {
        let mut p = Vec::new();
        if !(self.rate > 0.0 && self.rate.is_finite()) {
            p.push("--rate must be above 0".to_string());
        }
        if self.steps.iter().any(|r| !(*r > 0.0 && r.is_finite())) {
            p.push("--steps must all be above 0".to_string());
        }
        if self.publish_tick.is_zero() || self.publish_tick > Duration::from_millis(50) {
            p.push("--publish-tick must be between 1ms and 50ms".into());
        }
        // Unread PUBACKs hold the publishers' window (2,000 a connection, load.rs); the
        // kernel wakes the reader once half of it is waiting whatever the wait, which only
        // bounds how late a trickle is read.
        if self.ack_read_coalesce > Duration::from_millis(50) {
            p.push("--ack-read-coalesce must be at most 50ms".into());
        }
        if self.markers_per_s < 0.0 || self.lag_poll.is_zero() {
            p.push("--markers-per-s must be >= 0 and --lag-poll above 0".to_string());
        }
        if self.baselines.copy && self.copy_rows == 0 {
            p.push("--copy-rows must be above 0".to_string());
        }
        if self.devices == 0 || self.devices > 999_999 {
            p.push("--devices must be between 1 and 999999".into());
        }
        if self.connections == 0 || self.connections > self.devices {
            p.push("--connections must be between 1 and --devices".into());
        }
        if self.duration.is_zero() {
            p.push("--duration must be above 0".into());
        }
        if !(1..=16).contains(&self.instances) {
            p.push("--instances must be between 1 and 16".into());
        }
        if !(self.sos_rate > 0.0 && self.sos_rate <= 100.0) {
            p.push("--sos-rate must be above 0 and at most 100".into());
        }
        if self.sos_devices < self.idle_sos + 1 {
            p.push(format!(
                "--sos-devices must be above --idle-sos ({}): each SOS needs its own device",
                self.idle_sos
            ));
        }
        if self.sos_devices > 99_999_999 {
            p.push("--sos-devices must be at most 99999999".into());
        }
        for (k, _) in &self.service_env {
            if !k.starts_with("SILVERGUARD_") {
                p.push(format!("--service-env {k}: only SILVERGUARD_* settings"));
            }
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(BenchError::Config(p.join("; ")))
        }
    }
}

/// Runs the bench (see the module docs). `Err` only when the run could not be carried out.
pub async fn run(cfg: BenchConfig) -> Result<BenchReport, BenchError> {
    cfg.validate()?;
    let broker = BrokerAddr::parse(&cfg.mqtt_url).map_err(|e| BenchError::Config(e.to_string()))?;
    // Fail fast on a broker that is not there, before anything is created.
    let probe = conn::Conn::open(
        conn::ConnSettings {
            broker: broker.clone(),
            client_id: format!("bench-probe-{:08x}", rand::random::<u32>()),
            inflight: 1,
            channel: 4,
        },
        std::sync::Arc::new(conn::ConnCounters::default()),
        None,
        Duration::from_secs(5),
    )
    .await?;
    probe.close().await;
    let server = db::Server::connect(&cfg.pg_base).await?;
    let name = db::fresh_name();
    server.create(&name).await?;
    let p = Progress { quiet: cfg.quiet };
    p.say(format!("database {name} created"));
    let tag = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    let result = tokio::select! {
        r = run_in(&cfg, &broker, &server, &name, &tag, &p) => r,
        _ = cfg.cancel.cancelled() => Err(BenchError::Interrupted),
    };
    // Also after an interruption (the service was killed without a goodbye): its session
    // would otherwise queue every heartbeat of the next runs until it expires.
    for i in 0..cfg.instances {
        forget_service_sessions(&cfg, &broker, &instance_client_id(&tag, i)).await;
    }
    if cfg.keep_db {
        p.say(format!("database {name} kept (--keep-db)"));
    } else if let Err(e) = server.drop_db(&name).await {
        eprintln!("bracelet-sim bench: could not drop {name}: {e}");
    }
    result
}

/// Progress lines on stderr.
struct Progress {
    quiet: bool,
}

impl Progress {
    fn say(&self, msg: String) {
        if !self.quiet {
            eprintln!("bench: {msg}");
        }
    }
}

async fn run_in(
    cfg: &BenchConfig,
    broker: &BrokerAddr,
    server: &db::Server,
    name: &str,
    tag: &str,
    p: &Progress,
) -> Result<BenchReport, BenchError> {
    let started = Instant::now();
    let started_unix_ms = crate::now_unix_ms();
    let gateway = SmsGateway::start().await?;
    let http = SocketAddr::from(([127, 0, 0, 1], service::free_port()?));
    let db_url = db::url_for(&cfg.pg_base, name)?;
    let mut env: Vec<(String, String)> = [
        ("SILVERGUARD_DATABASE_URL", db_url.clone()),
        ("SILVERGUARD_MQTT_URL", cfg.mqtt_url.clone()),
        ("SILVERGUARD_HTTP_ADDR", http.to_string()),
        ("SILVERGUARD_MQTT__CLIENT_ID", instance_client_id(tag, 0)),
        // A bench that dies must not leave a session the broker queues for all week.
        ("SILVERGUARD_MQTT__SESSION_EXPIRY", "5m".into()),
        ("SILVERGUARD_NOTIFY__SMS__PROVIDER", "webhook".into()),
        ("SILVERGUARD_NOTIFY__SMS__URL", gateway.url()),
        // The daily knock would alert on every idle bench device at 10:00.
        ("SILVERGUARD_ALERTS__WELLNESS_CHECK_AT", "off".into()),
        // The silence sweeper reads every device's newest heartbeat once per threshold
        // (migration 0007). Its start-up grace (60 s) would keep that work out of the first
        // minute, that is out of the first steps' windows, and flatter them.
        ("SILVERGUARD_ALERTS__SILENCE_GRACE", "0s".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    env.extend(cfg.service_env.iter().cloned());
    let svc = ServiceCmd {
        bin: cfg.silverguard_bin.clone(),
        env,
    };

    svc.run(&["migrate"], None).await?;
    if !cfg.db_sql.is_empty() {
        let client = db::connect(&db_url).await?;
        for sql in &cfg.db_sql {
            client
                .batch_execute(sql)
                .await
                .map_err(|e| BenchError::Db(format!("--db-sql {sql:?}: {e}")))?;
            p.say(format!("applied: {sql}"));
        }
    }
    let load_ids = provision::load_ids(cfg.devices);
    let targets = provision::sos_targets(cfg.sos_devices);
    let import_file = std::env::temp_dir().join(format!("{name}-sos.toml"));
    let interval_s = provision::heartbeat_interval_s(cfg.devices, &cfg.step_rates());
    let t = Instant::now();
    let provisioned =
        provision::provision(&svc, &load_ids, interval_s, &targets, &import_file).await;
    let _ = std::fs::remove_file(&import_file);
    provisioned?;
    p.say(format!(
        "provisioned {} load devices and {} SOS devices (one elder and grid worker each) in {:.1}s",
        load_ids.len(),
        targets.len(),
        t.elapsed().as_secs_f64()
    ));

    // The broker's own backlog ($SYS), watched from here to the end.
    let backlog = broker_sys::BrokerBacklog::start(broker, &format!("bench-sys-{tag}")).await;
    p.say(match backlog.as_ref().and_then(|b| b.idle) {
        Some(n) => format!("broker backlog watched through $SYS: {n} messages stored at rest"),
        None => "broker backlog unknown: no $SYS figures from the broker".into(),
    });

    let ctx = Ctx {
        cfg,
        broker,
        gateway: &gateway,
        targets: &targets,
        db_url: &db_url,
        tag,
        backlog: backlog.as_ref(),
        p,
    };
    // The limits, while nothing else consumes the stream.
    let baselines = run_baselines(&ctx, &load_ids, name).await;

    let log = cfg
        .service_log
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("{name}-silverguard.log")));
    let mut service = service::Services {
        list: Vec::with_capacity(cfg.instances),
    };
    for i in 0..cfg.instances {
        let (cmd, addr, log) = if i == 0 {
            (svc.clone(), http, log.clone())
        } else {
            let addr = SocketAddr::from(([127, 0, 0, 1], service::free_port()?));
            let mut log = log.clone().into_os_string();
            log.push(format!(".{i}"));
            (
                svc.with(&[
                    ("SILVERGUARD_HTTP_ADDR", addr.to_string()),
                    ("SILVERGUARD_MQTT__CLIENT_ID", instance_client_id(tag, i)),
                ]),
                addr,
                PathBuf::from(log),
            )
        };
        let cmd = if cfg.instances > 1 {
            cmd.with(&[("SILVERGUARD_MQTT__SHARED_GROUP", format!("bench-{tag}"))])
        } else {
            cmd
        };
        let s = cmd.serve(addr, &log).await?;
        p.say(format!(
            "silverguard serve {i} started (pid {}, log {})",
            s.pid,
            log.display()
        ));
        service.list.push(s);
    }
    let measured = measure(ctx, &mut service).await;
    let logs = service.logs();
    service.stop(Duration::from_secs(20)).await;
    gateway.stop();
    let mut baselines = baselines;
    // The broker's limit once more, after the ramp: the machine's speed can change within a
    // run (a broker limit 25 % lower by the end was seen), and a limit measured only before
    // the ramp cannot show it. The ratio then uses the higher of the two.
    if cfg.baselines.broker && cfg.steps.len() > 1 && measured.is_ok() {
        // The stopped service's persistent session would queue the whole flood.
        for i in 0..cfg.instances {
            forget_service_sessions(cfg, broker, &instance_client_id(tag, i)).await;
        }
        wait_broker_cleared(backlog.as_ref(), p).await;
        match broker_baseline(&ctx, &load_ids, " again").await {
            Ok((b, probes)) => {
                baselines.broker_after = Some(b);
                baselines.skipped.extend(probes);
            }
            Err(e) => baselines.skipped.push(e),
        }
    }
    if let Some(b) = backlog {
        b.stop().await;
    }

    let mut report = measured?;
    report.baselines = baselines;
    report.started_unix_ms = started_unix_ms;
    report.elapsed_s = started.elapsed().as_secs_f64();
    report.machine.postgres_version = server.version().await;
    report.machine.postgres_settings = server.write_settings().await;
    report.machine.cpus.postgres = server.local_backend_cpus().await;
    report.settings.database = name.to_string();
    report.settings.kept_database = cfg.keep_db;
    report.usage.service_log = logs;
    report.judge();
    Ok(report)
}

/// The broker at fixed offered rates from its flood figure up, until the limit is bracketed
/// ([`baselines::next_broker_probe`]); sets the baseline's `sustained_per_s` and `limit_per_s`
/// from the probes that ran, and returns the error of one that could not.
async fn broker_probes(
    broker: &BrokerAddr,
    flood: &baselines::Offer,
    tag: &str,
    b: &mut baselines::BrokerBaseline,
    backlog: Option<&broker_sys::BrokerBacklog>,
    p: &Progress,
) -> Result<(), String> {
    let mut failed = Ok(());
    while let Some(rate) = baselines::next_broker_probe(b.received_per_s, &b.probes) {
        let n = b.probes.len() + 1;
        let offer = baselines::Offer {
            rate,
            ..flood.clone()
        };
        // Each probe starts with the broker's queue empty, not with the flood's (or the
        // previous probe's) acknowledgements still to read.
        let waited = wait_broker_cleared(backlog, p).await;
        if let Some(b) = backlog {
            b.take_max();
        }
        match baselines::broker_passthrough(broker, offer, &format!("{tag}-p{n}"), backlog).await {
            Ok(r) => {
                let mut probe = baselines::BrokerProbe::of(&r);
                probe.broker_backlog_max = r.broker_held_max;
                probe.broker_backlog_end = r.broker_held_at_end;
                probe.broker_kept_up = r.broker_kept_up;
                probe.sustained &= r.broker_kept_up != Some(false);
                probe.waited_for_broker_s = waited;
                p.say(format!(
                    "baseline: broker probe {n} at {rate:.0}/s: published {:.0}/s, received \
                     {:.0}/s, lost {}, broker backlog max {} end {}, {}",
                    probe.published_per_s,
                    probe.received_per_s,
                    probe.lost,
                    fmt_count(probe.broker_backlog_max),
                    fmt_count(probe.broker_backlog_end),
                    if probe.sustained {
                        "held"
                    } else {
                        "did not hold"
                    }
                ));
                b.probes.push(probe);
            }
            Err(e) => {
                p.say(format!(
                    "baseline: broker probe {n} at {rate:.0}/s failed: {e}"
                ));
                failed = Err(format!("probe {n} at {rate:.0}/s: {e}"));
                break;
            }
        }
    }
    b.sustained_per_s = b
        .probes
        .iter()
        .filter(|x| x.sustained)
        .map(|x| x.received_per_s)
        .fold(None, |m: Option<f64>, r| Some(m.map_or(r, |m| m.max(r))));
    let judged = b.probes.iter().any(|x| x.broker_kept_up.is_some());
    b.limit_per_s = broker_limit(b, judged);
    b.limit_held = judged && b.sustained_per_s.is_some();
    p.say(format!(
        "baseline: broker limit {:.0}/s (flooded {:.0}/s, best fixed-rate probe {})",
        b.limit_per_s,
        b.received_per_s,
        b.sustained_per_s
            .map_or("none held".into(), |v| format!("{v:.0}/s"))
    ));
    failed
}

/// The broker baseline's limit. Where the broker's backlog was watched, the best probe that
/// held: the flood's figure is what it passes while it queues ([`broker_sys`]), a rate it
/// keeps only until a queue is full. Otherwise the larger of the flood's figure and the best
/// probe, as before the backlog was watched: a flood alone can flatter the ratio.
fn broker_limit(b: &baselines::BrokerBaseline, backlog_watched: bool) -> f64 {
    match (backlog_watched, b.sustained_per_s) {
        (true, Some(held)) => held,
        _ => b.received_per_s.max(b.sustained_per_s.unwrap_or(0.0)),
    }
}

/// The longest the bench waits for the broker to read the acknowledgements it fell behind on.
const BROKER_CLEAR_LIMIT: Duration = Duration::from_secs(120);

/// Waits until the broker's store is back to its idle size (module [`broker_sys`]); returns
/// the seconds waited, `None` when the figures are unknown or it did not clear in time.
async fn wait_broker_cleared(
    backlog: Option<&broker_sys::BrokerBacklog>,
    p: &Progress,
) -> Option<f64> {
    let b = backlog?;
    let before = b.store();
    let waited = b.wait_cleared(BROKER_CLEAR_LIMIT).await;
    match waited {
        Some(w) if w >= Duration::from_secs(1) => p.say(format!(
            "the broker held {} messages still to be acknowledged; cleared in {:.1}s",
            fmt_count(before),
            w.as_secs_f64()
        )),
        Some(_) => {}
        None if b.idle.is_some() => p.say(format!(
            "the broker still holds {} messages after {:.0}s (idle {}); going on",
            fmt_count(b.store()),
            BROKER_CLEAR_LIMIT.as_secs_f64(),
            fmt_count(b.idle)
        )),
        None => {}
    }
    waited.map(|w| w.as_secs_f64())
}

fn fmt_count(n: Option<u64>) -> String {
    n.map_or("?".into(), |n| n.to_string())
}

/// Load before the measured window of the broker and naive-bridge baselines.
const BASELINE_WARMUP: Duration = Duration::from_secs(2);

/// The broker pass-through baseline: the flood, then the fixed-rate probes; with why the
/// probes could not all run, if they could not. `when` is added to the progress lines (""
/// before the service starts, " again" after it stopped).
async fn broker_baseline(
    x: &Ctx<'_>,
    load_ids: &[String],
    when: &str,
) -> Result<(baselines::BrokerBaseline, Option<String>), String> {
    let Ctx {
        cfg,
        broker,
        tag,
        backlog,
        p,
        ..
    } = *x;
    p.say(format!(
        "baseline{when}: broker pass-through, {:.0} hb/s offered for {:.0}s, the bare subscriber {}",
        cfg.broker_rate,
        cfg.baseline_window.as_secs_f64(),
        if cfg.baseline_read_coalesce.is_zero() {
            "reading every message as it arrives".to_string()
        } else {
            format!(
                "coalescing its reads as silverguard does ({} ms)",
                cfg.baseline_read_coalesce.as_millis()
            )
        }
    ));
    let offer = baselines::Offer {
        devices: load_ids.to_vec(),
        connections: cfg.connections,
        rate: cfg.broker_rate,
        warmup: BASELINE_WARMUP,
        window: cfg.baseline_window,
        tick: cfg.publish_tick,
        read_coalesce: cfg.baseline_read_coalesce,
        ack_read_coalesce: cfg.ack_read_coalesce,
    };
    // Client ids of their own: the first measurement's sessions are gone, but a second
    // one with the same ids would be told apart only by the broker's timing.
    let tag = if when.is_empty() {
        tag.to_string()
    } else {
        format!("{tag}-again")
    };
    if let Some(b) = backlog {
        b.take_max();
    }
    let mut b = baselines::broker_passthrough(broker, offer.clone(), &tag, backlog)
        .await
        .map_err(|e| format!("broker{when}: {e}"))?;
    p.say(format!(
        "baseline{when}: broker passed {:.0}/s (published {:.0}/s)",
        b.received_per_s, b.published_per_s
    ));
    let probes = broker_probes(broker, &offer, &tag, &mut b, backlog, p)
        .await
        .err()
        .map(|e| format!("broker probes{when}: {e}"));
    Ok((b, probes))
}

/// Runs the baselines `cfg.baselines` asks for; one that fails is listed as skipped, with why.
async fn run_baselines(x: &Ctx<'_>, load_ids: &[String], name: &str) -> baselines::Baselines {
    let Ctx {
        cfg,
        broker,
        db_url,
        tag,
        backlog,
        p,
        ..
    } = *x;
    let mut out = baselines::Baselines::default();
    let warmup = BASELINE_WARMUP;
    if cfg.baselines.broker {
        match broker_baseline(x, load_ids, "").await {
            Ok((b, probes)) => {
                out.broker = Some(b);
                out.skipped.extend(probes);
            }
            Err(e) => out.skipped.push(e),
        }
    }
    let client = if cfg.baselines.copy || cfg.baselines.naive {
        match db::connect(db_url).await {
            Ok(c) => Some(c),
            Err(e) => {
                out.skipped.push(format!("copy, naive: {e}"));
                None
            }
        }
    } else {
        None
    };
    if let (true, Some(client)) = (cfg.baselines.copy, &client) {
        p.say(format!(
            "baseline: psql \\copy of {} heartbeat rows",
            cfg.copy_rows
        ));
        let csv = std::env::temp_dir().join(format!("{name}-copy.csv"));
        match baselines::copy_rate(client, db_url, cfg.copy_rows, load_ids, cfg.seed, &csv).await {
            Ok(b) => {
                p.say(format!(
                    "baseline: COPY {:.0} rows/s ({:.1}s), {} bytes/row on disk",
                    b.rows_per_s,
                    b.seconds,
                    b.bytes_per_row.map_or("?".into(), |v| format!("{v:.0}"))
                ));
                out.copy = Some(b);
            }
            Err(e) => out.skipped.push(format!("copy: {e}")),
        }
    }
    if let (true, Some(client)) = (cfg.baselines.naive, &client) {
        // Not on top of what the broker probes left it to read.
        wait_broker_cleared(backlog, p).await;
        p.say(format!(
            "baseline: naive INSERT-per-message bridge, {:.0} hb/s offered for {:.0}s",
            cfg.naive_rate,
            cfg.baseline_window.as_secs_f64()
        ));
        let offer = baselines::Offer {
            devices: load_ids.to_vec(),
            connections: cfg.connections,
            rate: cfg.naive_rate,
            warmup,
            window: cfg.baseline_window,
            tick: cfg.publish_tick,
            // One INSERT a message is its limit, not how it reads.
            read_coalesce: Duration::ZERO,
            ack_read_coalesce: cfg.ack_read_coalesce,
        };
        match baselines::naive_bridge(broker, client, offer, tag).await {
            Ok(b) => {
                p.say(format!(
                    "baseline: naive bridge committed {:.0}/s",
                    b.committed_per_s
                ));
                out.naive = Some(b);
            }
            Err(e) => out.skipped.push(format!("naive: {e}")),
        }
    }
    out
}

/// The service's MQTT session outlives it (persistent, so that a restart loses nothing);
/// for a bench it is garbage: connecting once with the same client id and a clean session
/// makes the broker discard it now rather than queue for it until it expires.
async fn forget_service_sessions(cfg: &BenchConfig, broker: &BrokerAddr, client_id: &str) {
    let n: usize = cfg
        .service_env
        .iter()
        .find(|(k, _)| k == "SILVERGUARD_MQTT__CONNECTIONS")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(1);
    // Its connections `-0` .. `-{n-1}`, and the event lane's own (`-evt`).
    let ids = (0..n)
        .map(|i| format!("{client_id}-{i}"))
        .chain(std::iter::once(format!("{client_id}-evt")));
    for id in ids {
        let settings = conn::ConnSettings {
            broker: broker.clone(),
            client_id: id,
            inflight: 1,
            channel: 4,
        };
        let counters = std::sync::Arc::new(conn::ConnCounters::default());
        match conn::Conn::open(settings, counters, None, Duration::from_secs(5)).await {
            Ok(c) => c.close().await,
            Err(e) => tracing::debug!(error = %e, "could not clear the service's MQTT session"),
        }
    }
}

/// MQTT client id of instance `i` (its connections add `-0`, `-1`, ..., `-evt`).
fn instance_client_id(tag: &str, i: usize) -> String {
    if i == 0 {
        format!("bench-{tag}")
    } else {
        format!("bench-{tag}-i{i}")
    }
}

/// CPU counters at one instant.
#[derive(Debug, Clone)]
struct CpuSample {
    at: Instant,
    /// Every instance together.
    service: Option<u64>,
    /// Each instance.
    each: Vec<Option<u64>>,
    bench: Option<u64>,
    /// Every `mosquitto` and every `postgres` process on this machine.
    broker: Option<u64>,
    database: Option<u64>,
    machine: Option<(u64, u64)>,
}

impl CpuSample {
    fn take(pids: &[u32]) -> CpuSample {
        CpuSample {
            at: Instant::now(),
            service: service::processes_ticks(pids),
            each: pids.iter().map(|p| service::process_ticks(*p)).collect(),
            bench: service::process_ticks(std::process::id()),
            broker: service::ticks_by_command("mosquitto"),
            database: service::ticks_by_command("postgres"),
            machine: std::fs::read_to_string("/proc/stat")
                .ok()
                .and_then(|s| stats::parse_machine_cpu(&s)),
        }
    }
}

/// What the baselines and [`measure`] work with (besides the service).
#[derive(Clone, Copy)]
struct Ctx<'a> {
    cfg: &'a BenchConfig,
    broker: &'a BrokerAddr,
    gateway: &'a SmsGateway,
    targets: &'a [sos::SosTarget],
    db_url: &'a str,
    /// Random part of this run's MQTT client ids.
    tag: &'a str,
    backlog: Option<&'a broker_sys::BrokerBacklog>,
    p: &'a Progress,
}

/// Phases 4 to 6 of the module docs, with the service running.
async fn measure(x: Ctx<'_>, service: &mut service::Services) -> Result<BenchReport, BenchError> {
    let Ctx {
        cfg,
        broker,
        gateway,
        targets,
        db_url,
        tag,
        backlog,
        p,
    } = x;
    let ready = service.wait_ready(Duration::from_secs(120)).await?;
    let pids = service.pids();
    p.say(format!("silverguard ready in {:.1}s", ready.as_secs_f64()));
    let mut report = BenchReport {
        tool: format!("bracelet-sim {} bench", env!("CARGO_PKG_VERSION")),
        ..BenchReport::default()
    };
    // The machine's CPUs, not the ones this process may use: the scripts may have pinned the
    // bench off the broker's CPU (machine.cpus says which).
    report.machine.nproc = std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|l| stats::count_cpu_list(&l))
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(0);
    report.machine.mem_total_mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| stats::parse_kib_field(&s, "MemTotal"))
        .map(|k| k / 1024);
    report.machine.kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|s| s.trim().to_string());
    report.machine.cpus.broker = service::cpus_allowed_by_command("mosquitto");
    report.machine.cpus.bench = service::cpus_allowed(std::process::id());
    report.machine.cpus.silverguard = pids.first().and_then(|p| service::cpus_allowed(*p));
    report.settings = report::Settings {
        smoke: cfg.smoke,
        offered_rate_per_s: cfg.rate,
        steps_per_s: cfg.steps.clone(),
        devices: cfg.devices,
        connections: cfg.connections,
        warmup_s: cfg.warmup.as_secs_f64(),
        duration_s: cfg.duration.as_secs_f64(),
        sos_rate_per_s: cfg.sos_rate,
        idle_sos: cfg.idle_sos,
        sos_devices: cfg.sos_devices,
        sos_timeout_s: cfg.sos_timeout.as_secs_f64(),
        markers_per_s: cfg.markers_per_s,
        lag_poll_ms: cfg.lag_poll.as_secs_f64() * 1000.0,
        publish_tick_ms: cfg.publish_tick.as_secs_f64() * 1000.0,
        seed: cfg.seed,
        service_env: cfg
            .service_env
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect(),
        db_sql: cfg.db_sql.clone(),
        instances: cfg.instances,
        baseline_read_coalesce_ms: cfg.baseline_read_coalesce.as_secs_f64() * 1000.0,
        ack_read_coalesce_ms: cfg.ack_read_coalesce.as_secs_f64() * 1000.0,
        ..report::Settings::default()
    };

    let mut injector =
        Injector::connect(broker.clone(), format!("bench-sos-{tag}"), cfg.seed).await?;
    let broker_state = injector.broker_state(Duration::from_secs(2)).await;
    if broker_state
        .stored_messages
        .is_some_and(|n| n > sos::STORED_MESSAGES_WARNING)
    {
        p.say(format!(
            "warning: the broker holds {} messages ({} disconnected sessions); expect stalls",
            broker_state.stored_messages.unwrap_or_default(),
            broker_state
                .disconnected_clients
                .map_or("?".into(), |c| c.to_string())
        ));
    }
    report.machine.broker_version = broker_state.version;
    report.machine.broker_stored_messages_at_start = broker_state.stored_messages;
    report.machine.broker_disconnected_clients_at_start = broker_state.disconnected_clients;

    // Idle phase: the same presses with nothing else going on.
    let before_idle = CpuSample::take(&pids);
    let (idle_targets, loaded_targets) = targets.split_at(cfg.idle_sos.min(targets.len()));
    let no_stop = CancellationToken::new();
    let idle_shots = injector.run(idle_targets, cfg.sos_rate, &no_stop).await;
    let idle = sos::collect(&idle_shots, gateway, cfg.sos_timeout).await;
    report.sos_idle = SosSummary::of(&idle);
    let machine_before_load = busy_percent(before_idle.machine, CpuSample::take(&pids).machine);
    p.say(format!(
        "idle: {} SOS, {} answered, p50 {} ms, max {} ms",
        report.sos_idle.published,
        report.sos_idle.delivered,
        fmt_ms(report.sos_idle.latency.p50_ms),
        fmt_ms(report.sos_idle.latency.max_ms)
    ));

    // Load phase: one step per offered rate, each drained before the next.
    let bench_db = db::BenchDb::connect(db_url).await?;
    let lag = lag::LagTracker::start(db::connect(db_url).await?, cfg.lag_poll, LAG_GIVE_UP);
    let mut rates = cfg.step_rates();
    let planned = rates.len();
    // The ramp's steps actually run (it stops at saturation); refinements come after them.
    let mut ramp_len = planned;
    let mut refined = 0usize;
    let load = Load::start(
        LoadSettings {
            broker: broker.clone(),
            devices: provision::load_ids(cfg.devices),
            connections: cfg.connections,
            rate: rates[0],
            seed: cfg.seed,
            client_prefix: format!("bench-hb-{tag}"),
            markers_per_s: cfg.markers_per_s,
            tick: cfg.publish_tick,
            ack_read_coalesce: cfg.ack_read_coalesce,
        },
        Some(lag.tx.clone()),
    )
    .await?;
    let ticks = service::clock_ticks_per_s();
    let pct = |a: Option<u64>, b: Option<u64>, w: Duration| stats::cpu_percent_of(a, b, ticks, w);
    let mut all_loaded: Vec<Outcome> = Vec::new();
    let mut next_target = 0usize;
    let mut accounts = StepAccounts::default();
    let mut first_window: Option<(CpuSample, CpuSample, Option<String>, Option<String>)> = None;
    let mut pub_in_windows = 0u64;
    let mut i = 0;
    while let Some(&rate) = rates.get(i) {
        // The broker's acknowledgements of the previous load read before this step starts
        // (module `broker_sys`): otherwise a step inherits a queue it did not make.
        let waited_for_broker_s = wait_broker_cleared(backlog, p).await;
        // After a lossy step: how long the fleet ran at the settling rate before this step.
        let settle_s = if report.steps.last().is_some_and(|s| s.lost > 0) {
            let rate = settle_rate(highest_sustained_rate(&report.steps), rate);
            Some(
                settle(&load, &bench_db, cfg.devices, rate, p)
                    .await
                    .as_secs_f64(),
            )
        } else {
            None
        };
        load.set_rate(rate);
        let step_name = if i >= ramp_len {
            format!("refine {}/{} ", i + 1 - ramp_len, cfg.refine_steps())
        } else if planned > 1 {
            format!("step {}/{planned} ", i + 1)
        } else {
            String::new()
        };
        p.say(format!(
            "{step_name}load: {rate:.0} hb/s over {} connections; warm-up {:.0}s",
            cfg.connections,
            cfg.warmup.as_secs_f64()
        ));
        let step_started = Instant::now();
        watch(
            &load,
            gateway,
            &pids,
            step_started,
            cfg.warmup,
            "warm-up",
            p,
        )
        .await;

        // The measured window.
        if let Some(b) = backlog {
            b.take_max();
        }
        let dropped0 = backlog.and_then(|b| b.dropped());
        let pub0 = load.counters.published();
        let ov0 = load.overflow();
        let m0_each = service.metrics_each().await.ok();
        let m0 = m0_each.as_ref().map(|m| m.join("\n"));
        let cpu0 = CpuSample::take(&pids);
        let wal0 = bench_db.wal_position().await;
        let window_end = cpu0.at + cfg.duration;
        let window_stop = CancellationToken::new();
        let per_step = cfg.loaded_sos_per_step();
        let end = (next_target + per_step).min(loaded_targets.len());
        let (shots, rss_max) = tokio::join!(
            injector.run(
                &loaded_targets[next_target..end],
                cfg.sos_rate,
                &window_stop
            ),
            async {
                let m = watch(&load, gateway, &pids, cpu0.at, cfg.duration, "window", p).await;
                tokio::time::sleep_until(window_end).await;
                window_stop.cancel();
                m
            }
        );
        next_target += shots.len();
        let cpu1 = CpuSample::take(&pids);
        let wal1 = bench_db.wal_position().await;
        let pub1 = load.counters.published();
        let ov1 = load.overflow();
        let m1_each = service.metrics_each().await.ok();
        let m1 = m1_each.as_ref().map(|m| m.join("\n"));
        let window = cpu1.at - cpu0.at;
        pub_in_windows += pub1 - pub0;
        let broker_backlog_max = backlog.and_then(|b| b.take_max());
        let broker_end = backlog.and_then(|b| b.kept_up_at_end(rate));

        // Pause, and wait until everything published so far is committed.
        load.set_rate(0.0);
        let drain_started = Instant::now();
        load.wait_acked(Duration::from_secs(30)).await;
        let published = load.counters.published();
        // Heartbeats earlier steps lost will not come: waiting for them would only make every
        // step after a lossy one wait out the quiet period.
        let committed = wait_committed(
            service,
            published.saturating_sub(accounts.lost_before),
            DRAIN_QUIET,
            cfg.drain_timeout,
        )
        .await;
        let drain_s = drain_started.elapsed().as_secs_f64();
        let broker_dropped = match (dropped0, backlog.and_then(|b| b.dropped())) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        };
        lag.wait_seen(window_end, Duration::from_secs(5)).await;
        let outcomes = sos::collect(&shots, gateway, cfg.sos_timeout).await;
        let secs = window.as_secs_f64();
        let committed_in_window = match (&m0, &m1) {
            (Some(a), Some(b)) => committed_metric(b).saturating_sub(committed_metric(a)),
            _ => 0,
        };
        let rejects = match (&m0, &m1) {
            (Some(a), Some(b)) => rejected_metric(b).saturating_sub(rejected_metric(a)),
            _ => 0,
        };
        let instances = (0..pids.len())
            .map(|i| report::InstanceStep {
                committed_per_s: match (&m0_each, &m1_each) {
                    (Some(a), Some(b)) if a.len() == pids.len() && b.len() == pids.len() => {
                        committed_metric(&b[i]).saturating_sub(committed_metric(&a[i])) as f64
                            / secs
                    }
                    _ => 0.0,
                },
                cpu_percent: pct(
                    cpu0.each.get(i).copied().flatten(),
                    cpu1.each.get(i).copied().flatten(),
                    window,
                ),
            })
            .collect();
        let wal = match (wal0, wal1) {
            (Some(a), Some(b)) => db::WalPosition::per_row(a, b, committed_in_window),
            _ => None,
        };
        let (step_published, step_committed) = accounts.close_step(published, committed);
        let step = report::Step {
            offered_per_s: rate,
            window_s: secs,
            published_per_s: (pub1 - pub0) as f64 / secs,
            committed_per_s: committed_in_window as f64 / secs,
            not_offered: ov1.saturating_sub(ov0),
            published: step_published,
            committed: step_committed,
            lost: step_published.saturating_sub(step_committed),
            rejects,
            // This step's heartbeats, not the run's: after a lossy step the run's total never
            // catches up, and no later step (a refinement, say) could count as drained.
            drained: step_committed >= step_published,
            drain_s,
            settle_s,
            lag: lag.summary(cpu0.at, window_end),
            sos: SosSummary::of(&outcomes),
            service_cpu_percent: pct(cpu0.service, cpu1.service, window),
            service_rss_max_mib: rss_max.map(|k| k as f64 / 1024.0),
            bench_cpu_percent: pct(cpu0.bench, cpu1.bench, window),
            broker_cpu_percent: pct(cpu0.broker, cpu1.broker, window),
            database_cpu_percent: pct(cpu0.database, cpu1.database, window),
            wal_bytes_per_heartbeat: wal.map(|w| w.0),
            wal_full_page_images_per_1000: wal.map(|w| w.1 * 1000.0),
            machine_cpu_busy_percent: busy_percent(cpu0.machine, cpu1.machine),
            service_metrics: match (&m0, &m1) {
                (Some(a), Some(b)) => service_metrics(a, b),
                _ => report::ServiceMetrics::default(),
            },
            sustained: false,
            instances,
            broker_backlog_max,
            broker_backlog_end: broker_end.map(|(n, _)| n),
            broker_kept_up: broker_end.map(|(_, k)| k),
            broker_dropped,
            waited_for_broker_s,
        };
        if step.lost > 0 {
            lag.give_up_before(window_end);
        }
        p.say(format!(
            "{step_name}done: offered {rate:.0}/s, committed {:.0}/s, lag p50/p99 {}/{} ms, \
             SOS p99 {} ms, silverguard CPU {}, lost {} (drained in {:.1}s), broker backlog \
             max {} end {}",
            step.committed_per_s,
            fmt_ms(step.lag.latency.p50_ms),
            fmt_ms(step.lag.latency.p99_ms),
            fmt_ms(step.sos.latency.p99_ms),
            step.service_cpu_percent
                .map_or("-".into(), |c| format!("{c:.0} %")),
            step.lost,
            drain_s,
            fmt_count(step.broker_backlog_max),
            fmt_count(step.broker_backlog_end)
        ));
        // A step the broker carried only by queueing is as far as a ramp goes: the next one
        // would fill its queue and lose heartbeats.
        let saturated = step.committed_per_s < 0.9 * rate
            || !step.drained
            || step.broker_kept_up == Some(false);
        all_loaded.extend(outcomes);
        if first_window.is_none() {
            first_window = Some((cpu0, cpu1, m0, m1));
        }
        report.steps.push(step);
        // Only a ramp step stops the ramp; a saturated refinement is just a bound.
        if saturated && i + 1 < ramp_len {
            p.say(format!(
                "{step_name}the service did not keep up; the remaining steps would only \
                 measure its backlog, so the ramp stops here"
            ));
            rates.truncate(i + 1);
            ramp_len = i + 1;
        }
        i += 1;
        if i == rates.len() && refined < cfg.refine_steps() {
            if let Some((next, lo, hi)) = next_refinement(&report.steps) {
                p.say(format!(
                    "refining: {lo:.0}/s was sustained and {hi:.0}/s was not; trying {next:.0}/s \
                     (after the drain above, the service starts it with no backlog)"
                ));
                rates.push(next);
                refined += 1;
            }
        }
    }
    let counters = load.counters.clone();
    let not_offered = load.overflow();
    load.stop(Duration::from_secs(30)).await;
    p.say("load stopped; counting what was committed".into());

    report.sos_loaded = SosSummary::of(&all_loaded);
    let published = counters.published();
    let committed = bench_db
        .wait_heartbeats_settled(published, DRAIN_QUIET, cfg.drain_timeout)
        .await?;
    lag.stop().await;
    let traces = bench_db.sos_traces().await.unwrap_or_default();
    report.sos_samples_idle = samples(&idle, &traces);
    report.sos_samples_loaded = samples(&all_loaded, &traces);
    report.sos_loaded_stages = stages(&report.sos_samples_loaded);
    report.storage = bench_db.storage(committed).await;
    report.latest_table = bench_db.latest_table().await;
    let (hwm, rss) = service::processes_memory_kib(&pids);
    let instances_usage: Vec<report::InstanceUsage> = pids
        .iter()
        .map(|p| {
            let (hwm, rss) = service::process_memory_kib(*p);
            report::InstanceUsage {
                pid: *p,
                peak_rss_mib: hwm.map(|k| k as f64 / 1024.0),
                rss_end_mib: rss.map(|k| k as f64 / 1024.0),
            }
        })
        .collect();
    let service_alive = service.running();
    injector.close().await;

    // The top-level figures: the whole run, and the window(s).
    let best = report
        .steps
        .iter()
        .max_by(|a, b| a.committed_per_s.total_cmp(&b.committed_per_s))
        .cloned()
        .unwrap_or_default();
    report.heartbeats = report::Heartbeats {
        offered_rate_per_s: best.offered_per_s,
        published,
        acked: counters.acked().min(published),
        committed,
        lost: published.saturating_sub(committed),
        not_offered,
        window_s: best.window_s,
        published_in_window: pub_in_windows,
        published_per_s: best.published_per_s,
        committed_in_window: (best.committed_per_s * best.window_s).round() as u64,
        committed_per_s: best.committed_per_s,
        publish_errors: counters
            .publish_errors
            .load(std::sync::atomic::Ordering::Relaxed),
        reconnects: counters
            .reconnects
            .load(std::sync::atomic::Ordering::Relaxed),
    };
    report.sos_p99_ratio = match (
        report.sos_loaded.latency.p99_ms,
        report.sos_idle.latency.p99_ms,
    ) {
        (Some(l), Some(i)) if i > 0.0 => Some(l / i),
        _ => None,
    };
    let (cpu0, cpu1, m0, m1) =
        first_window.unwrap_or((CpuSample::take(&pids), CpuSample::take(&pids), None, None));
    let w = cpu1.at - cpu0.at;
    report.usage = report::Usage {
        service_cpu_percent: best
            .service_cpu_percent
            .or(pct(cpu0.service, cpu1.service, w)),
        service_peak_rss_mib: hwm.map(|k| k as f64 / 1024.0),
        service_rss_end_mib: rss.map(|k| k as f64 / 1024.0),
        bench_cpu_percent: best.bench_cpu_percent.or(pct(cpu0.bench, cpu1.bench, w)),
        broker_cpu_percent: best.broker_cpu_percent.or(pct(cpu0.broker, cpu1.broker, w)),
        database_cpu_percent: best
            .database_cpu_percent
            .or(pct(cpu0.database, cpu1.database, w)),
        committed_per_s: Some(best.committed_per_s).filter(|r| *r > 0.0),
        wal_bytes_per_heartbeat: best.wal_bytes_per_heartbeat,
        wal_full_page_images_per_1000: best.wal_full_page_images_per_1000,
        machine_cpu_busy_percent: best
            .machine_cpu_busy_percent
            .or(busy_percent(cpu0.machine, cpu1.machine)),
        machine_cpu_busy_before_load_percent: machine_before_load,
        instances: instances_usage,
        service_log: String::new(),
    };
    report.service_metrics = if rates.len() > 1 {
        best.service_metrics.clone()
    } else if let (Some(m0), Some(m1)) = (&m0, &m1) {
        service_metrics(m0, m1)
    } else {
        report::ServiceMetrics::default()
    };
    let expected: std::collections::HashSet<String> =
        targets.iter().map(|t| t.phone.clone()).collect();
    report.sms = gateway.tally(&|phone| expected.contains(phone));
    if !service_alive {
        return Err(BenchError::Service(format!(
            "silverguard serve exited during the run (log: {})",
            service.logs()
        )));
    }
    Ok(report)
}

/// `silverguard_ingest_committed_total{kind="heartbeat"}` of a scrape.
fn committed_metric(text: &str) -> u64 {
    stats::scalar(
        text,
        "silverguard_ingest_committed_total",
        &[("kind", "heartbeat")],
    )
    .unwrap_or(0.0) as u64
}

/// All rejects of a scrape, every reason.
fn rejected_metric(text: &str) -> u64 {
    stats::scalar(text, "silverguard_ingest_rejected_total", &[]).unwrap_or(0.0) as u64
}

/// A drain gives up when the committed count has not grown for this long. Long enough to
/// outlast a broker snapshot stall (a Mosquitto holding a large queue for the service stops
/// for seconds at each `autosave_interval`; docs/performance.md, issue 3 finding 1).
const DRAIN_QUIET: Duration = Duration::from_secs(15);

/// Polls the service's committed-heartbeat counter (cheap, unlike `count(*)` over millions of
/// rows) until it reaches `expected` or has not grown for `quiet`, at most `limit` in all.
async fn wait_committed(
    service: &service::Services,
    expected: u64,
    quiet: Duration,
    limit: Duration,
) -> u64 {
    let start = Instant::now();
    let mut last = 0u64;
    let mut last_change = Instant::now();
    loop {
        if let Ok(m) = service.metrics().await {
            let n = committed_metric(&m);
            if n != last {
                last = n;
                last_change = Instant::now();
            }
        }
        if last >= expected || start.elapsed() >= limit || last_change.elapsed() >= quiet {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How long [`settle`] waits at most.
const SETTLE_LIMIT: Duration = Duration::from_secs(120);

/// The rate [`settle`] runs the fleet at: half the highest sustained rate so far (a quarter of
/// the next step's when none was), enough for every device to report within a few seconds.
fn settle_rate(best_sustained: f64, next: f64) -> f64 {
    if best_sustained > 0.0 {
        best_sustained / 2.0
    } else {
        next / 4.0
    }
}

/// A passed silence deadline counts as not yet looked at only after this long: the sweeper
/// runs every second, and a deadline is only a lower bound until it does.
const SETTLE_SLACK: Duration = Duration::from_secs(5);

/// After a lossy step, runs the fleet at `rate` until the service's silence detection has
/// settled: no load device with a passed deadline it has not looked at, none with a silence
/// alert open. Provisioned at the interval they report at, the load devices go silent after
/// 15 intervals (15 s in a ramp to 60,000/s), and a lossy step's drain stops the fleet for
/// longer than that (`DRAIN_QUIET`): every device goes silent, and the service raises and then
/// resolves an alert for each. In a run that overshot, 12,363 of them were raised and resolved
/// in the steps after it, which made those steps pay for the bench's own pause. The next step
/// is measured from the same steady state as the first ones. It runs at least until every
/// device has reported once and the sweeper has had `SETTLE_SLACK` to look at the deadlines
/// that passed meanwhile: before that, the deadlines the pause will pass have not passed.
/// Returns how long it ran.
async fn settle(
    load: &Load,
    db: &db::BenchDb,
    devices: usize,
    rate: f64,
    p: &Progress,
) -> Duration {
    let started = Instant::now();
    load.set_rate(rate);
    let every_device_reported = Duration::from_secs_f64(devices as f64 / rate.max(1.0));
    tokio::time::sleep(every_device_reported + SETTLE_SLACK).await;
    let mut unsettled = None;
    let mut peak = 0;
    while started.elapsed() < SETTLE_LIMIT {
        match db.load_devices_unsettled(SETTLE_SLACK).await {
            Ok(n) => {
                peak = peak.max(n);
                unsettled = Some(n);
                if n == 0 {
                    break;
                }
            }
            Err(e) => {
                p.say(format!("settling stopped: {e}"));
                return started.elapsed();
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    p.say(format!(
        "settled at {rate:.0}/s in {:.1}s: up to {peak} load devices silent or overdue after the \
         loss and the pause, {} left",
        started.elapsed().as_secs_f64(),
        unsettled.map_or("?".into(), |n| n.to_string())
    ));
    started.elapsed()
}

/// The run's heartbeat counts at the end of each step's drain, to split them by step.
#[derive(Debug, Default)]
struct StepAccounts {
    published_before: u64,
    committed_before: u64,
    /// Heartbeats earlier steps lost: they will not come, so a drain does not wait for them.
    lost_before: u64,
}

impl StepAccounts {
    /// This step's published and committed heartbeats, from the run's totals after its drain.
    /// A publisher may send a few more after the published count was read (the rate drops to
    /// zero at its next tick); they count in the next step's published, so the commits beyond
    /// this step's published count belong to the next step too. Charged here instead, they
    /// made the next step short by as many and called it lossy.
    fn close_step(&mut self, published: u64, committed: u64) -> (u64, u64) {
        let step_published = published.saturating_sub(self.published_before);
        let step_committed = committed.saturating_sub(self.committed_before);
        self.lost_before += step_published.saturating_sub(step_committed);
        self.published_before = published;
        self.committed_before = committed.min(published).max(self.committed_before);
        (step_published, step_committed)
    }
}

/// Prints a progress line every second for `span` from `from` (unless quiet), and samples
/// the service's resident memory each time; returns the largest sample (KiB).
async fn watch(
    load: &Load,
    gateway: &SmsGateway,
    pids: &[u32],
    from: Instant,
    span: Duration,
    phase: &str,
    p: &Progress,
) -> Option<u64> {
    let end = from + span;
    let mut last = (Instant::now(), load.counters.published());
    let mut rss_max = service::processes_memory_kib(pids).1;
    while Instant::now() + Duration::from_millis(1) < end {
        let next = (Instant::now() + Duration::from_secs(1)).min(end);
        tokio::time::sleep_until(next).await;
        let now = Instant::now();
        let published = load.counters.published();
        let rate = (published - last.1) as f64 / (now - last.0).as_secs_f64().max(1e-3);
        last = (now, published);
        let rss = service::processes_memory_kib(pids).1;
        rss_max = rss_max.max(rss);
        p.say(format!(
            "[{phase} {:>4.0}s] hb published {published} ({rate:.0}/s) acked {} | SMS {} | RSS {} MiB",
            (now - from).as_secs_f64(),
            load.counters.acked(),
            gateway.accepted(),
            rss.map_or("?".into(), |k| (k / 1024).to_string())
        ));
    }
    rss_max
}

/// Share of all cores busy between two `/proc/stat` readings.
fn busy_percent(a: Option<(u64, u64)>, b: Option<(u64, u64)>) -> Option<f64> {
    match (a, b) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
            Some(b1.saturating_sub(b0) as f64 / (t1 - t0) as f64 * 100.0)
        }
        _ => None,
    }
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.0}"))
}

/// Each SOS with its stages, from database timestamps.
fn samples(
    outcomes: &[Outcome],
    traces: &std::collections::HashMap<String, db::SosTrace>,
) -> Vec<report::SosSample> {
    outcomes
        .iter()
        .map(|o| {
            let t = traces.get(&o.device_id);
            let arrived = o.latency_ms.map(|l| o.published_unix_ms + l);
            let diff = |a: Option<f64>, b: Option<f64>| Some(b? - a?);
            let received = t.map(|t| t.received_ms);
            let queued = t.and_then(|t| t.queued_ms);
            let send = t.and_then(|t| t.send_started_ms);
            report::SosSample {
                device_id: o.device_id.clone(),
                published_unix_ms: o.published_unix_ms,
                latency_ms: o.latency_ms,
                publish_to_received_ms: diff(Some(o.published_unix_ms), received),
                received_to_queued_ms: diff(received, queued),
                queued_to_send_ms: diff(queued, send),
                send_to_sms_ms: diff(send, arrived),
            }
        })
        .collect()
}

/// Per-stage latencies of the SOS presses that were answered.
fn stages(samples: &[report::SosSample]) -> Stages {
    let of = |f: fn(&report::SosSample) -> Option<f64>| {
        let v: Vec<f64> = samples
            .iter()
            .filter(|s| s.latency_ms.is_some())
            .filter_map(f)
            .collect();
        LatencySummary::of(&v)
    };
    Stages {
        publish_to_received: of(|s| s.publish_to_received_ms),
        received_to_queued: of(|s| s.received_to_queued_ms),
        queued_to_send: of(|s| s.queued_to_send_ms),
        send_to_sms: of(|s| s.send_to_sms_ms),
    }
}

/// The service's histograms over the window (second scrape minus the first).
fn service_metrics(m0: &str, m1: &str) -> report::ServiceMetrics {
    let delta = |name: &str, labels: &[(&str, &str)]| {
        let after = Histogram::parse(m1, name, labels).unwrap_or_default();
        let before = Histogram::parse(m0, name, labels).unwrap_or_default();
        after.since(&before)
    };
    report::ServiceMetrics {
        notify_sms_queued_to_delivered: HistSummary::of(&delta(
            "silverguard_notify_queued_to_delivered_seconds",
            &[("channel", "sms")],
        )),
        ingest_commit_heartbeat: HistSummary::of(&delta(
            "silverguard_ingest_commit_seconds",
            &[("lane", "heartbeat")],
        )),
        ingest_commit_event: HistSummary::of(&delta(
            "silverguard_ingest_commit_seconds",
            &[("lane", "event")],
        )),
        ingest_pipeline: HistSummary::of(&delta("silverguard_ingest_pipeline_seconds", &[])),
        heartbeat_batch_rows_mean: delta("silverguard_ingest_batch_rows", &[]).mean(),
        acks_per_write: {
            let counter = |text: &str, name: &str| stats::scalar(text, name, &[]).unwrap_or(0.0);
            let acks = counter(m1, "silverguard_ingest_acks_sent_total")
                - counter(m0, "silverguard_ingest_acks_sent_total");
            let writes = counter(m1, "silverguard_ingest_ack_writes_total")
                - counter(m0, "silverguard_ingest_ack_writes_total");
            // A service without the counter (older builds) reports none.
            (writes > 0.0).then(|| acks / writes)
        },
    }
}

/// A marker not committed this long after its publish is given up (counted unseen), and
/// so are a lossy step's unseen markers once its drain is over
/// ([`lag::LagTracker::give_up_before`]). Every poll asks for all markers not seen yet, so
/// markers lost in an overloaded step were asked for 50 times a second for as long as this:
/// with 120 s, the poll grew to 3.4 ms and took 15.5 s of PostgreSQL's time in one run
/// (`pg_stat_statements`), load the bench put on the machine while it measured the next
/// steps. A sustained step's lag is under 2 s by definition.
const LAG_GIVE_UP: Duration = Duration::from_secs(30);

/// The next refinement step of a ramp: the midpoint, rounded to 250/s, between the highest
/// sustained offered rate and the lowest unsustained one above it, with both bounds. None
/// when nothing was sustained (the machine is overloaded from the first step; halving
/// towards zero measures nothing useful), when every step was sustained, or when the gap is
/// already within 2 % of the upper bound (about the run-to-run noise of this bench).
pub fn next_refinement(steps: &[report::Step]) -> Option<(f64, f64, f64)> {
    let lo = highest_sustained_rate(steps);
    let hi = steps
        .iter()
        .filter(|s| !s.is_sustained() && s.offered_per_s > lo)
        .map(|s| s.offered_per_s)
        .fold(f64::INFINITY, f64::min);
    if lo <= 0.0 || !hi.is_finite() || hi - lo <= (0.02 * hi).max(250.0) {
        return None;
    }
    let mid = ((lo + hi) / 2.0 / 250.0).round() * 250.0;
    (mid > lo && mid < hi).then_some((mid, lo, hi))
}

/// The highest offered rate among the steps so far that were sustained (0 when none was).
fn highest_sustained_rate(steps: &[report::Step]) -> f64 {
    steps
        .iter()
        .filter(|s| s.is_sustained())
        .map(|s| s.offered_per_s)
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets() {
        let s = BenchConfig::standard();
        s.validate().unwrap();
        assert_eq!(s.loaded_sos(), 120);
        assert_eq!(s.sos_devices, 20 + 120 + 12);
        let smoke = BenchConfig::smoke();
        smoke.validate().unwrap();
        assert_eq!(
            (smoke.devices, smoke.rate, smoke.loaded_sos()),
            (200, 500.0, 5)
        );
        assert_eq!(smoke.duration, Duration::from_secs(5));
    }

    #[test]
    fn bad_settings_are_listed() {
        let c = BenchConfig {
            rate: 0.0,
            connections: 0,
            sos_devices: 3,
            service_env: vec![("RUST_LOG".into(), "debug".into())],
            ..BenchConfig::standard()
        };
        let e = c.validate().unwrap_err().to_string();
        for needle in ["--rate", "--connections", "--sos-devices", "RUST_LOG"] {
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn stages_split_the_latency() {
        let outcomes = vec![
            Outcome {
                device_id: "bench-sos-000001".into(),
                published_unix_ms: 1_000.0,
                latency_ms: Some(100.0),
            },
            Outcome {
                device_id: "bench-sos-000002".into(),
                published_unix_ms: 2_000.0,
                latency_ms: None,
            },
        ];
        let mut traces = std::collections::HashMap::new();
        traces.insert(
            "bench-sos-000001".to_string(),
            db::SosTrace {
                received_ms: 1_002.0,
                queued_ms: Some(1_030.0),
                send_started_ms: Some(1_090.0),
            },
        );
        let s = samples(&outcomes, &traces);
        assert_eq!(s[0].send_to_sms_ms, Some(10.0));
        assert_eq!(s[1].publish_to_received_ms, None);
        let st = stages(&s);
        assert_eq!(st.publish_to_received.p50_ms, Some(2.0));
        assert_eq!(st.received_to_queued.p50_ms, Some(28.0));
        assert_eq!(st.queued_to_send.p50_ms, Some(60.0));
        assert_eq!(st.send_to_sms.count, 1);
        assert_eq!(busy_percent(Some((10, 100)), Some((60, 200))), Some(50.0));
        assert_eq!(busy_percent(None, Some((60, 200))), None);
    }

    fn step(offered: f64, committed: f64, lost: u64, lag_p99_ms: f64) -> report::Step {
        let mut s = report::Step {
            offered_per_s: offered,
            committed_per_s: committed,
            lost,
            drained: lost == 0,
            ..report::Step::default()
        };
        s.lag.latency.p99_ms = Some(lag_p99_ms);
        s
    }

    #[test]
    fn a_step_is_sustained_only_when_it_kept_up_without_loss() {
        assert!(step(48_000.0, 47_400.0, 0, 150.0).is_sustained());
        // Lost heartbeats, a backlog committed from before the window, or too little.
        assert!(!step(50_000.0, 45_000.0, 99_632, 650.0).is_sustained());
        assert!(!step(48_000.0, 55_933.0, 0, 5_886.0).is_sustained());
        assert!(!step(48_000.0, 46_000.0, 0, 150.0).is_sustained());
    }

    #[test]
    fn the_broker_limit_is_the_best_held_probe_once_its_backlog_is_watched() {
        let b = baselines::BrokerBaseline {
            received_per_s: 51_097.0,
            sustained_per_s: Some(44_000.0),
            ..baselines::BrokerBaseline::default()
        };
        assert_eq!(broker_limit(&b, true), 44_000.0);
        // Unwatched, a probe can only raise the flood's figure, as before.
        assert_eq!(broker_limit(&b, false), 51_097.0);
        let none_held = baselines::BrokerBaseline {
            sustained_per_s: None,
            ..b
        };
        assert_eq!(broker_limit(&none_held, true), 51_097.0);
    }

    #[test]
    fn settling_runs_at_half_the_best_sustained_rate() {
        assert_eq!(settle_rate(40_000.0, 45_000.0), 20_000.0);
        assert_eq!(settle_rate(0.0, 40_000.0), 10_000.0);
    }

    #[test]
    fn late_publishes_count_in_the_next_step_and_losses_stay_lost() {
        let mut a = StepAccounts::default();
        // Two heartbeats went out after the published count was read, and were committed.
        assert_eq!(a.close_step(1_000, 1_002), (1_000, 1_002));
        // They are in this step's published count, so its commits cover it exactly.
        assert_eq!(a.close_step(2_000, 2_000), (1_000, 1_000));
        assert_eq!(a.lost_before, 0);
        // A lossy step: 30 never come, and the next step's drain does not wait for them.
        assert_eq!(a.close_step(3_000, 2_970), (1_000, 970));
        assert_eq!(a.lost_before, 30);
        assert_eq!(a.close_step(4_000, 3_970), (1_000, 1_000));
        assert_eq!(a.lost_before, 30);
    }

    #[test]
    fn refinement_halves_the_gap_around_the_ceiling() {
        let ramp = vec![
            step(30_000.0, 30_000.0, 0, 100.0),
            step(40_000.0, 40_000.0, 0, 120.0),
            step(50_000.0, 44_939.0, 99_632, 658.0),
        ];
        assert_eq!(next_refinement(&ramp), Some((45_000.0, 40_000.0, 50_000.0)));
        let mut more = ramp.clone();
        more.push(step(45_000.0, 45_010.0, 0, 130.0));
        assert_eq!(next_refinement(&more).map(|r| r.0), Some(47_500.0));
        more.push(step(47_500.0, 46_000.0, 1, 700.0));
        assert_eq!(next_refinement(&more).map(|r| r.0), Some(46_250.0));
        more.push(step(46_250.0, 46_250.0, 0, 130.0));
        assert_eq!(next_refinement(&more).map(|r| r.0), Some(47_000.0));
        // Within 2 % of the upper bound: done.
        more.push(step(47_000.0, 46_950.0, 0, 140.0));
        assert_eq!(next_refinement(&more), None);
        // Every step sustained, or none: nothing to refine.
        assert_eq!(next_refinement(&ramp[..2]), None);
        assert_eq!(next_refinement(&ramp[2..]), None);
    }
}
