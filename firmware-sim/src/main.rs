//! `bracelet-sim`: the command-line front of the `firmware_sim` library.
//!
//! * `run`: a fleet of simulated bracelets (optionally provisioned first through
//!   `silverguard device add --from-file -`), a live summary on stderr every second, and the
//!   final [`FleetReport`] as JSON on request.
//! * `ids`: the device ids the same flags produce, for shell scripts that provision.
//! * `send`: one message from one device, waiting for the broker's acknowledgement.
//! * `bench`: ingest throughput and lag, SOS → SMS latency under load, a rate ramp and the
//!   limits it is compared with, against a `silverguard serve` it starts itself, with its own
//!   database and stand-in SMS gateway (docs/performance.md).

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use firmware_sim::bench::BenchConfig;
use firmware_sim::send::{send_one, OneShot};
use firmware_sim::{
    device_ids, device_plan, now_unix_ms, run_fleet, FleetConfig, FleetReport, ScenarioMix,
};
use silverguard_proto::v1::{location::Source, Event, EventKind, Heartbeat, Location, Presence};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    name = "bracelet-sim",
    version,
    about = "Simulated Silverguard bracelets: vitals, SOS, falls and bad payloads over MQTT"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a fleet of bracelets until --count heartbeats each, --duration, or Ctrl-C.
    Run(RunArgs),
    /// Print the device ids the same flags would produce, one per line.
    Ids(IdsArgs),
    /// Publish one message as one device and wait for the broker's acknowledgement.
    Send(SendArgs),
    /// Measure ingest throughput and lag, SOS -> SMS latency under load, and the limits
    /// (broker, COPY, naive bridge), against a silverguard it starts itself.
    Bench(Box<BenchArgs>),
}

/// Flags shared by `run` and `ids`, so a script can pass the same ones to both.
#[derive(Args, Debug)]
struct FleetArgs {
    /// Broker URL (mqtt://host:port; mqtts:// is not supported yet).
    #[arg(
        long,
        env = "SILVERGUARD_MQTT_URL",
        default_value = "mqtt://127.0.0.1:1883"
    )]
    mqtt_url: String,
    /// Number of bracelets.
    #[arg(long, default_value_t = 10)]
    devices: usize,
    /// Device ids are {prefix}{index:06}.
    #[arg(long, default_value = "sim-")]
    id_prefix: String,
    /// Heartbeat interval per device (humantime: 5s, 200ms, 1m).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Heartbeats per device [default: until Ctrl-C or --duration].
    #[arg(long)]
    count: Option<u64>,
    /// Scenario mix: a name or weights, e.g. normal=90,sos=5,fall=5. Names: normal, sos,
    /// fall, fall-then-cancel, tachycardia, bradycardia, hypoxia, fever, goes-silent,
    /// low-battery, malformed, service-call.
    #[arg(long, default_value = "normal")]
    scenario: ScenarioMix,
    /// Seed for elders, scenario assignment and noise.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Skew of the bracelets' clocks, e.g. -3h, +2h, 90s.
    #[arg(long, default_value = "0", allow_hyphen_values = true, value_parser = parse_offset)]
    clock_offset: i64,
    /// QoS of heartbeats, events and bad messages (presence is always 1).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
    qos: u8,
    /// At most this many devices connecting at the same time.
    #[arg(long, default_value_t = 64)]
    max_connect_concurrency: usize,
    /// How long to wait for acknowledgements after a device's last publish.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    ack_timeout: Duration,
    /// How long a device may take to connect the first time before the run fails.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
}

impl FleetArgs {
    fn config(&self) -> FleetConfig {
        FleetConfig {
            mqtt_url: self.mqtt_url.clone(),
            devices: self.devices,
            id_prefix: self.id_prefix.clone(),
            interval: self.interval,
            count: self.count,
            scenarios: self.scenario.clone(),
            qos: self.qos,
            seed: self.seed,
            clock_offset_ms: self.clock_offset,
            max_connect_concurrency: self.max_connect_concurrency,
            ack_timeout: self.ack_timeout,
            connect_timeout: self.connect_timeout,
        }
    }
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    fleet: FleetArgs,
    /// Register every device first with `{silverguard-bin} device add --from-file -`.
    #[arg(long)]
    provision: bool,
    /// The silverguard binary used by --provision.
    #[arg(long, env = "SILVERGUARD_BIN", default_value = "silverguard")]
    silverguard_bin: PathBuf,
    /// Write the final report as JSON to this file ("-" for stdout).
    #[arg(long)]
    report_json: Option<PathBuf>,
    /// Stop publishing after this long (then wait for acknowledgements), e.g. 10m.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// No live summary line and no final summary on stderr.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Args, Debug)]
struct IdsArgs {
    #[command(flatten)]
    fleet: FleetArgs,
    /// Print each id with its scenario, separated by a tab.
    #[arg(long)]
    with_scenario: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum SendKind {
    Heartbeat,
    Sos,
    Fall,
    SosCancel,
    WornOff,
    WornOn,
    LowBattery,
    PowerOff,
    ServiceCall,
    /// Presence online (retained).
    Online,
    /// Presence offline (retained).
    Offline,
}

#[derive(Args, Debug)]
struct SendArgs {
    /// Broker URL.
    #[arg(
        long,
        env = "SILVERGUARD_MQTT_URL",
        default_value = "mqtt://127.0.0.1:1883"
    )]
    mqtt_url: String,
    /// Device id ([A-Za-z0-9_-]{1,64}).
    #[arg(long)]
    device: String,
    /// What to send.
    #[arg(long, value_enum)]
    kind: SendKind,
    /// Message seq [default: current Unix seconds, so repeated sends keep increasing].
    #[arg(long)]
    seq: Option<u64>,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
    qos: u8,
    /// Skew of the device clock, e.g. -3h.
    #[arg(long, default_value = "0", allow_hyphen_values = true, value_parser = parse_offset)]
    clock_offset: i64,
    /// How long to wait for the connection and the acknowledgement.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Heartbeat: heart rate, bpm (0 = not measured).
    #[arg(long, default_value_t = 72)]
    hr: u32,
    /// Heartbeat: SpO2, %.
    #[arg(long, default_value_t = 97)]
    spo2: u32,
    /// Heartbeat: systolic pressure, mmHg.
    #[arg(long, default_value_t = 125)]
    systolic: u32,
    /// Heartbeat: diastolic pressure, mmHg.
    #[arg(long, default_value_t = 80)]
    diastolic: u32,
    /// Heartbeat: skin temperature, tenths of °C.
    #[arg(long, default_value_t = 345, allow_hyphen_values = true)]
    temp_dc: i32,
    /// Heartbeat: steps today.
    #[arg(long, default_value_t = 1200)]
    steps: u32,
    /// Heartbeat and events: battery, %.
    #[arg(long, default_value_t = 80)]
    battery: u32,
    /// Heartbeat: the bracelet is off the wrist.
    #[arg(long)]
    not_worn: bool,
    /// Latitude, degrees.
    #[arg(long, default_value_t = 30.27, allow_hyphen_values = true)]
    lat: f64,
    /// Longitude, degrees.
    #[arg(long, default_value_t = 120.15, allow_hyphen_values = true)]
    lon: f64,
    /// Send no location.
    #[arg(long)]
    no_location: bool,
}

/// `bracelet-sim bench`. Unset numbers take the standard values (5,000 hb/s, 60 s) or, with
/// `--smoke`, the smoke values (500 hb/s, 5 s). A flag given twice takes its last value, so
/// scripts can pass defaults that the caller's flags override.
#[derive(Args, Debug)]
#[command(args_override_self = true)]
struct BenchArgs {
    /// Broker shared by the service and the bench; start it from deploy/mosquitto.conf.
    #[arg(
        long,
        env = "SILVERGUARD_MQTT_URL",
        default_value = "mqtt://127.0.0.1:1883"
    )]
    mqtt_url: String,
    /// PostgreSQL server (no database name); the bench creates sg_bench_<random> on it.
    #[arg(
        long,
        env = "SILVERGUARD_PG_BASE",
        default_value = "postgres://postgres@127.0.0.1:5432"
    )]
    pg_base: String,
    /// Keep the bench database afterwards (it is dropped by default).
    #[arg(long)]
    keep_db: bool,
    /// The silverguard binary to run (build it with --release for figures that mean anything).
    #[arg(
        long,
        env = "SILVERGUARD_BIN",
        default_value = "target/release/silverguard"
    )]
    silverguard_bin: PathBuf,
    /// File for silverguard's log [default: in the temp dir, named after the database].
    #[arg(long)]
    service_log: Option<PathBuf>,
    /// Extra service setting, KEY=VALUE with a SILVERGUARD_ key (repeatable), e.g.
    /// SILVERGUARD_INGEST__WRITERS=4.
    #[arg(long, value_parser = parse_env_pair)]
    service_env: Vec<(String, String)>,
    /// `silverguard serve` processes to start; more than one share the MQTT stream through a
    /// shared subscription, and the report sums their committed rate and shows each one's
    /// CPU and memory.
    #[arg(long, default_value_t = 1)]
    instances: usize,
    /// Small and short (200 devices, 500 hb/s, 5 s, 5 SOS): asserts zero loss, not speed.
    #[arg(long)]
    smoke: bool,
    /// Heartbeats per second offered, all devices together [default: 5000; smoke 500].
    #[arg(long)]
    rate: Option<f64>,
    /// Load bracelets (bench-hb-NNNNNN) [default: 5000; smoke 200].
    #[arg(long)]
    devices: Option<usize>,
    /// MQTT connections the load bracelets are multiplexed over [default: 8; smoke 2].
    #[arg(long)]
    connections: Option<usize>,
    /// Measured window [default: 60s; smoke 5s].
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Load before the window [default: 10s; smoke 2s].
    #[arg(long, value_parser = humantime::parse_duration)]
    warmup: Option<Duration>,
    /// SOS presses per second, in the window and in the idle phase [default: 2; smoke 1].
    #[arg(long)]
    sos_rate: Option<f64>,
    /// SOS presses with no load, before it starts: the baseline [default: 20; smoke 3].
    #[arg(long)]
    idle_sos: Option<usize>,
    /// SOS devices, one per press [default: idle + sos-rate x duration + 10 % (at least 5)].
    #[arg(long)]
    sos_devices: Option<usize>,
    /// An SOS without an SMS this long after its publish is lost.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    sos_timeout: Duration,
    /// How long the committed count may keep growing after the load stops.
    #[arg(long, value_parser = humantime::parse_duration)]
    drain_timeout: Option<Duration>,
    /// Seed of the bracelets' physiology.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// A ramp of offered rates, e.g. 10000,20000,30000: one step each (warm-up + measured
    /// window, then a pause until everything is committed). Steps default to 5s + 20s. The
    /// ramp stops after the first step the service cannot keep up with.
    #[arg(long, value_delimiter = ',')]
    steps: Vec<f64>,
    /// After a ramp reaches a rate it cannot sustain: up to this many extra steps, each
    /// halving the gap between the highest sustained rate and the lowest unsustained one
    /// (to 2 %), so the ceiling found does not depend on the ramp's spacing. 0: none.
    #[arg(long, default_value_t = 3)]
    refine: usize,
    /// Limits to measure first, in the same run: broker, copy, naive, all or none.
    #[arg(long, default_value = "none")]
    baselines: firmware_sim::bench::baselines::Which,
    /// Measured window of the broker and naive-bridge baselines.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    baseline_window: Duration,
    /// Heartbeats/s offered to the broker baseline (far above its ceiling on purpose).
    #[arg(long, default_value_t = 400_000.0)]
    broker_rate: f64,
    /// How long the broker baseline's subscriber lets messages wait before it reads them, as
    /// silverguard's `mqtt.read_coalesce` (SO_RCVLOWAT 32 KiB and a look every so often);
    /// 0s reads every message as it arrives.
    #[arg(long, default_value = "5ms", value_parser = humantime::parse_duration)]
    baseline_read_coalesce: Duration,
    /// Heartbeats/s offered to the naive-bridge baseline.
    #[arg(long, default_value_t = 5_000.0)]
    naive_rate: f64,
    /// Rows `psql \copy` loads in the COPY baseline.
    #[arg(long, default_value_t = 1_000_000)]
    copy_rows: u64,
    /// Ingest-lag markers per second (sampled heartbeats whose rows the bench looks for).
    #[arg(long, default_value_t = 100.0)]
    markers_per_s: f64,
    /// Each load connection writes everything due at most this often (1ms..50ms). Longer
    /// ticks mean fewer, larger writes: less CPU per message for the bench and the broker.
    #[arg(long, default_value = "1ms", value_parser = humantime::parse_duration)]
    publish_tick: Duration,
    /// How long each load connection lets the broker's PUBACKs wait before it reads them
    /// (SO_RCVLOWAT 32 KiB and a look every so often): one wake-up of the bench per PUBACK
    /// costs the bench and the broker CPU a real fleet would not take from this machine.
    /// 0s reads each as it arrives.
    #[arg(long, default_value = "5ms", value_parser = humantime::parse_duration)]
    ack_read_coalesce: Duration,
    /// How often the bench looks for its markers: the lag figures' resolution.
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    lag_poll: Duration,
    /// SQL to run on the bench database after migrating, before the service starts
    /// (repeatable), e.g. "ALTER TABLE device_latest SET (fillfactor = 50)".
    #[arg(long)]
    db_sql: Vec<String>,
    /// Write the report as JSON to this file ("-" for stdout; the table then goes to stderr).
    #[arg(long)]
    json: Option<PathBuf>,
    /// No progress lines on stderr.
    #[arg(long, short)]
    quiet: bool,
}

impl BenchArgs {
    fn config(&self) -> BenchConfig {
        let base = if self.smoke {
            BenchConfig::smoke()
        } else {
            BenchConfig::standard()
        };
        let mut c = BenchConfig {
            mqtt_url: self.mqtt_url.clone(),
            pg_base: self.pg_base.clone(),
            keep_db: self.keep_db,
            silverguard_bin: self.silverguard_bin.clone(),
            service_log: self.service_log.clone(),
            service_env: self.service_env.clone(),
            instances: self.instances,
            rate: self.rate.unwrap_or(base.rate),
            devices: self.devices.unwrap_or(base.devices),
            connections: self.connections.unwrap_or(base.connections),
            duration: self.duration.unwrap_or(if self.steps.is_empty() {
                base.duration
            } else {
                Duration::from_secs(20)
            }),
            warmup: self.warmup.unwrap_or(if self.steps.is_empty() {
                base.warmup
            } else {
                Duration::from_secs(5)
            }),
            sos_rate: self.sos_rate.unwrap_or(base.sos_rate),
            idle_sos: self.idle_sos.unwrap_or(base.idle_sos),
            sos_timeout: self.sos_timeout,
            drain_timeout: self.drain_timeout.unwrap_or(base.drain_timeout),
            seed: self.seed,
            quiet: self.quiet,
            steps: self.steps.clone(),
            refine: self.refine,
            baselines: self.baselines,
            baseline_window: self.baseline_window,
            broker_rate: self.broker_rate,
            baseline_read_coalesce: self.baseline_read_coalesce,
            naive_rate: self.naive_rate,
            copy_rows: self.copy_rows,
            markers_per_s: self.markers_per_s,
            publish_tick: self.publish_tick,
            ack_read_coalesce: self.ack_read_coalesce,
            lag_poll: self.lag_poll,
            db_sql: self.db_sql.clone(),
            ..base
        };
        c.sos_devices = self.sos_devices.unwrap_or_else(|| c.needed_sos_devices());
        c
    }
}

/// `KEY=VALUE` for `--service-env`.
fn parse_env_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// `-3h`, `+2h`, `90s`, `0` → signed milliseconds.
fn parse_offset(s: &str) -> Result<i64, String> {
    let s = s.trim();
    let (sign, rest) = match s.as_bytes().first() {
        Some(b'-') => (-1, &s[1..]),
        Some(b'+') => (1, &s[1..]),
        _ => (1, s),
    };
    if rest == "0" {
        return Ok(0);
    }
    let d = humantime::parse_duration(rest).map_err(|e| format!("{s:?}: {e}"))?;
    let ms = i64::try_from(d.as_millis()).map_err(|_| format!("{s:?} is too large"))?;
    Ok(sign * ms)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args).await,
        Command::Ids(args) => ids(args),
        Command::Send(args) => send(args).await,
        Command::Bench(args) => bench(*args).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bracelet-sim: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn bench(args: BenchArgs) -> Result<std::process::ExitCode> {
    let cfg = args.config();
    let cancel = cfg.cancel.clone();
    // Ctrl-C or SIGTERM: stop at once, but still stop the service and drop the database.
    tokio::spawn(async move {
        if wait_for_stop_signal().await.is_ok() {
            eprintln!("bracelet-sim bench: interrupted; cleaning up");
            cancel.cancel();
        }
    });
    let report = firmware_sim::bench::run(cfg).await.context("bench")?;
    let table = report.table();
    let json = serde_json::to_string_pretty(&report)?;
    match &args.json {
        Some(path) if path.as_os_str() == "-" => {
            eprint!("{table}");
            println!("{json}");
        }
        Some(path) => {
            print!("{table}");
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            std::fs::write(path, json + "\n")
                .with_context(|| format!("writing the report to {}", path.display()))?;
            eprintln!("bracelet-sim bench: report written to {}", path.display());
        }
        None => print!("{table}"),
    }
    Ok(if report.passed {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(2)
    })
}

fn ids(args: IdsArgs) -> Result<std::process::ExitCode> {
    let cfg = args.fleet.config();
    cfg.validate()?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if args.with_scenario {
        for (id, scenario) in device_plan(&cfg) {
            writeln!(out, "{id}\t{scenario}")?;
        }
    } else {
        for id in device_ids(&cfg) {
            writeln!(out, "{id}")?;
        }
    }
    out.flush()?;
    Ok(std::process::ExitCode::SUCCESS)
}

async fn run(args: RunArgs) -> Result<std::process::ExitCode> {
    let cfg = args.fleet.config();
    cfg.validate()?;
    if args.provision {
        provision(&args.silverguard_bin, &device_ids(&cfg), args.quiet).await?;
    }

    let cancel = CancellationToken::new();
    spawn_signal_handler(cancel.clone(), args.quiet);
    if let Some(d) = args.duration {
        let c = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(d).await;
            c.cancel();
        });
    }

    let (tx, rx) = watch::channel(FleetReport::default());
    let live = (!args.quiet).then(|| tokio::spawn(live_summary(rx)));
    if !args.quiet {
        eprintln!(
            "bracelet-sim: {} devices, scenario {}, every {}, {} -> {}",
            cfg.devices,
            cfg.scenarios,
            humantime::format_duration(cfg.interval),
            cfg.count.map_or("until stopped".to_string(), |c| format!(
                "{c} heartbeats each"
            )),
            redacted(&cfg.mqtt_url)
        );
    }
    let result = run_fleet(cfg, cancel, Some(tx)).await;
    if let Some(live) = live {
        live.abort();
    }
    let report = result.context("fleet run failed")?;

    if !args.quiet {
        eprintln!("{}", final_summary(&report));
    }
    if let Some(path) = &args.report_json {
        let json = serde_json::to_string_pretty(&report)?;
        if path.as_os_str() == "-" {
            println!("{json}");
        } else {
            std::fs::write(path, json + "\n")
                .with_context(|| format!("writing the report to {}", path.display()))?;
        }
    }
    if report.all_acked() {
        Ok(std::process::ExitCode::SUCCESS)
    } else {
        eprintln!(
            "bracelet-sim: {} of {} messages were not acknowledged",
            report
                .published_total()
                .saturating_sub(report.acked_total()),
            report.published_total()
        );
        Ok(std::process::ExitCode::from(2))
    }
}

/// First Ctrl-C (or SIGTERM): stop publishing and drain. Second: quit at once.
fn spawn_signal_handler(cancel: CancellationToken, quiet: bool) {
    tokio::spawn(async move {
        let mut stops = 0;
        loop {
            if wait_for_stop_signal().await.is_err() {
                return;
            }
            stops += 1;
            if stops == 1 {
                if !quiet {
                    eprintln!(
                        "bracelet-sim: stopping; waiting for outstanding acknowledgements \
                         (Ctrl-C again to quit now)"
                    );
                }
                cancel.cancel();
            } else {
                eprintln!("bracelet-sim: quitting without waiting");
                std::process::exit(130);
            }
        }
    });
}

#[cfg(unix)]
async fn wait_for_stop_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r,
        _ = term.recv() => Ok(()),
    }
}

#[cfg(not(unix))]
async fn wait_for_stop_signal() -> std::io::Result<()> {
    tokio::signal::ctrl_c().await
}

/// The broker URL without its password, for printing.
fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            // Only fails for URLs that cannot carry a password, which this one did.
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

/// Registers the fleet's devices with the service before they connect.
async fn provision(bin: &PathBuf, ids: &[String], quiet: bool) -> Result<()> {
    let shown = format!("{} device add --from-file -", bin.display());
    let mut child = tokio::process::Command::new(bin)
        .args(["device", "add", "--from-file", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| {
            format!("could not start `{shown}` (set --silverguard-bin or SILVERGUARD_BIN)")
        })?;
    let mut stdin = child
        .stdin
        .take()
        .context("no stdin pipe to the provisioning command")?;
    let mut list = String::with_capacity(ids.len() * 12);
    for id in ids {
        list.push_str(id);
        list.push('\n');
    }
    // A child that exits early closes its stdin; its exit status below says why.
    let write = stdin.write_all(list.as_bytes()).await;
    drop(stdin);
    let out = child
        .wait_with_output()
        .await
        .with_context(|| format!("waiting for `{shown}`"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let detail = if stderr.trim().is_empty() {
            stdout.trim().to_string()
        } else {
            stderr.trim().to_string()
        };
        bail!(
            "provisioning failed: `{shown}` exited with {}{}",
            out.status,
            if detail.is_empty() {
                String::new()
            } else {
                format!(":\n{detail}")
            }
        );
    }
    write.with_context(|| format!("writing device ids to `{shown}`"))?;
    if !quiet {
        eprintln!(
            "bracelet-sim: provisioned {} devices with `{shown}`",
            ids.len()
        );
    }
    Ok(())
}

/// One line on stderr per second: totals, acknowledgements, the last second's rate.
async fn live_summary(mut rx: watch::Receiver<FleetReport>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut last_total = 0u64;
    loop {
        tick.tick().await;
        if rx.has_changed().is_err() {
            return;
        }
        let r = rx.borrow_and_update().clone();
        let total = r.published_total();
        let rate = total.saturating_sub(last_total);
        last_total = total;
        eprintln!("{}", progress_line(&r, rate));
    }
}

fn progress_line(r: &FleetReport, rate_per_s: u64) -> String {
    let events: Vec<String> = r
        .events_published
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    format!(
        "[{:>6.1}s] sent {} acked {} | {}/s | hb {} evt {} [{}] bad {} presence {}{}",
        r.elapsed_s,
        r.published_total(),
        r.acked_total(),
        rate_per_s,
        r.heartbeats_published,
        r.events_published_total(),
        events.join(" "),
        r.bad_published_total(),
        r.presence_published,
        if r.reconnects > 0 {
            format!(" reconnects {}", r.reconnects)
        } else {
            String::new()
        }
    )
}

fn final_summary(r: &FleetReport) -> String {
    let bad: Vec<String> = r
        .bad_published
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    format!(
        "bracelet-sim: done in {:.1}s ({:.0} msg/s): {} devices; heartbeats {}/{} acked; \
         events {}/{} acked; bad {}/{} acked [{}]; presence {}/{} acked; unacked {}; \
         reconnects {}; silenced {}",
        r.elapsed_s,
        r.rate_per_s,
        r.devices,
        r.heartbeats_acked,
        r.heartbeats_published,
        r.events_acked_total(),
        r.events_published_total(),
        r.bad_acked_total(),
        r.bad_published_total(),
        bad.join(" "),
        r.presence_acked,
        r.presence_published,
        r.unacked,
        r.reconnects,
        r.silenced_devices
    )
}

async fn send(args: SendArgs) -> Result<std::process::ExitCode> {
    let kind = args
        .kind
        .to_possible_value()
        .map_or_else(|| format!("{:?}", args.kind), |v| v.get_name().to_string());
    let at = now_unix_ms().saturating_add(args.clock_offset);
    let seq = args
        .seq
        .unwrap_or_else(|| u64::try_from(now_unix_ms() / 1000).unwrap_or(1));
    let location = (!args.no_location).then(|| Location {
        lat_e7: (args.lat * 1e7).round() as i32,
        lon_e7: (args.lon * 1e7).round() as i32,
        accuracy_m: 10,
        source: Source::Gps as i32,
    });
    let event = |kind: EventKind| {
        OneShot::Event(Event {
            seq,
            occurred_at_ms: at,
            kind: kind as i32,
            location,
            battery_pct: args.battery,
            device_id: args.device.clone(),
        })
    };
    let message = match args.kind {
        SendKind::Heartbeat => {
            let worn = !args.not_worn;
            let m = |v: u32| if worn { v } else { 0 };
            OneShot::Heartbeat(Heartbeat {
                seq,
                measured_at_ms: at,
                heart_rate_bpm: m(args.hr),
                spo2_pct: m(args.spo2),
                systolic_mmhg: m(args.systolic),
                diastolic_mmhg: m(args.diastolic),
                skin_temp_decicelsius: if worn { args.temp_dc } else { 0 },
                steps_today: args.steps,
                battery_pct: args.battery,
                worn,
                location,
                device_id: args.device.clone(),
            })
        }
        SendKind::Sos => event(EventKind::Sos),
        SendKind::Fall => event(EventKind::Fall),
        SendKind::SosCancel => event(EventKind::SosCancel),
        SendKind::WornOff => event(EventKind::WornOff),
        SendKind::WornOn => event(EventKind::WornOn),
        SendKind::LowBattery => event(EventKind::LowBattery),
        SendKind::PowerOff => event(EventKind::PowerOff),
        SendKind::ServiceCall => event(EventKind::ServiceCall),
        SendKind::Online | SendKind::Offline => OneShot::Presence(Presence {
            online: args.kind == SendKind::Online,
            at_ms: at,
        }),
    };
    send_one(
        &args.mqtt_url,
        &args.device,
        &message,
        args.qos,
        args.timeout,
    )
    .await
    .with_context(|| format!("sending {kind} as {}", args.device))?;
    eprintln!(
        "bracelet-sim: {kind} from {} acknowledged (seq {seq})",
        args.device
    );
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_not_printed() {
        assert_eq!(
            redacted("mqtt://sim:secret@broker:1883"),
            "mqtt://sim:***@broker:1883"
        );
        assert_eq!(redacted("mqtt://127.0.0.1:1883"), "mqtt://127.0.0.1:1883");
    }

    #[test]
    fn offsets() {
        assert_eq!(parse_offset("0"), Ok(0));
        assert_eq!(parse_offset("-3h"), Ok(-3 * 3_600_000));
        assert_eq!(parse_offset("+2h"), Ok(2 * 3_600_000));
        assert_eq!(parse_offset("90s"), Ok(90_000));
        assert_eq!(parse_offset("-1h 30m"), Ok(-5_400_000));
        assert!(parse_offset("soon").is_err());
        assert!(parse_offset("-").is_err());
    }

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "bracelet-sim",
            "run",
            "--devices",
            "20",
            "--interval",
            "200ms",
            "--count",
            "10",
            "--scenario",
            "normal=80,sos=10,malformed=10",
            "--clock-offset",
            "-3h",
        ])
        .unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        let cfg = run.fleet.config();
        assert_eq!(cfg.devices, 20);
        assert_eq!(cfg.interval, Duration::from_millis(200));
        assert_eq!(cfg.count, Some(10));
        assert_eq!(cfg.clock_offset_ms, -3 * 3_600_000);
        assert!(Cli::try_parse_from(["bracelet-sim", "run", "--scenario", "nope"]).is_err());
        assert!(Cli::try_parse_from(["bracelet-sim", "run", "--qos", "3"]).is_err());
    }

    #[test]
    fn bench_flags_override_presets() {
        let parse = |args: &[&str]| {
            let mut v = vec!["bracelet-sim", "bench"];
            v.extend_from_slice(args);
            match Cli::try_parse_from(v).unwrap().command {
                Command::Bench(b) => b.config(),
                _ => panic!("not bench"),
            }
        };
        let std = parse(&[]);
        assert_eq!((std.rate, std.devices, std.connections), (5000.0, 5000, 8));
        assert_eq!(std.sos_devices, 152);
        let smoke = parse(&["--smoke", "--rate", "800"]);
        assert!(smoke.smoke);
        assert_eq!((smoke.rate, smoke.devices), (800.0, 200));
        assert_eq!(smoke.duration, Duration::from_secs(5));
        let c = parse(&[
            "--duration",
            "2m",
            "--sos-rate",
            "4",
            "--service-env",
            "SILVERGUARD_INGEST__WRITERS=4",
        ]);
        assert_eq!(c.loaded_sos(), 480);
        assert_eq!(c.sos_devices, 20 + 480 + 48);
        assert_eq!(
            c.service_env,
            vec![("SILVERGUARD_INGEST__WRITERS".to_string(), "4".to_string())]
        );
        assert!(Cli::try_parse_from(["bracelet-sim", "bench", "--service-env", "X"]).is_err());
    }
}
