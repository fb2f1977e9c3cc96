//! The `silverguard` command: `serve`, `migrate`, `device add|list|remove`.

use std::io::BufRead;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use silverguard::config::{LogFormat, Secret, Settings};
use silverguard::store;

#[derive(Parser)]
#[command(
    name = "silverguard",
    version,
    about = "Keeps watch over elders who live alone: bracelet telemetry over MQTT into PostgreSQL, alerts that reach a human."
)]
struct Cli {
    /// TOML configuration file; environment variables override it (see docs/configuration.md).
    #[arg(long, global = true, env = "SILVERGUARD_CONFIG")]
    config: Option<PathBuf>,
    /// PostgreSQL URL (libpq form), e.g. postgres://postgres@127.0.0.1:5432/silverguard.
    #[arg(
        long,
        global = true,
        env = "SILVERGUARD_DATABASE_URL",
        hide_env_values = true
    )]
    database_url: Option<String>,
    /// Log format: human or json.
    #[arg(long, global = true, env = "SILVERGUARD_LOG__FORMAT")]
    log_format: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service: migrate, ingest from MQTT, serve HTTP (health, readiness, metrics).
    Serve(ServeArgs),
    /// Create the database if missing and apply pending migrations, then exit.
    Migrate,
    /// Provision, list and remove bracelets.
    #[command(subcommand)]
    Device(DeviceCommand),
}

#[derive(Args)]
struct ServeArgs {
    /// MQTT broker, mqtt://host:port (mqtts:// for TLS).
    #[arg(long, env = "SILVERGUARD_MQTT_URL")]
    mqtt_url: Option<String>,
    /// HTTP listen address for /healthz, /readyz, /metrics and the API.
    #[arg(long, env = "SILVERGUARD_HTTP_ADDR")]
    http_addr: Option<String>,
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// Provision devices by id (IMEI or [A-Za-z0-9_-]{1,64}). Idempotent.
    Add {
        /// Device ids.
        ids: Vec<String>,
        /// Read more ids from a file, one per line ("-" for standard input).
        #[arg(long)]
        from_file: Option<PathBuf>,
        /// Bind the devices to the elder of this name (created when missing).
        #[arg(long)]
        elder: Option<String>,
        /// Bracelet model.
        #[arg(long)]
        model: Option<String>,
        /// Expected heartbeat interval in seconds (silence detection uses it).
        #[arg(long)]
        interval_s: Option<i32>,
    },
    /// List devices with last-seen time, presence and battery.
    List {
        #[arg(long, default_value_t = 1000)]
        limit: i64,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove devices (their stored telemetry stays).
    Remove {
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

fn init_tracing(settings: &Settings) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&settings.log.filter))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match settings.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.init(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut settings = Settings::load(cli.config.as_deref())?;
    if let Some(url) = &cli.database_url {
        settings.database.url = Secret::new(url.clone());
    }
    if let Some(f) = &cli.log_format {
        settings.log.format = match f.as_str() {
            "json" => LogFormat::Json,
            "human" => LogFormat::Human,
            other => bail!("--log-format must be human or json, not {other:?}"),
        };
    }
    if let Command::Serve(args) = &cli.command {
        if let Some(u) = &args.mqtt_url {
            settings.mqtt.url = u.clone();
        }
        if let Some(a) = &args.http_addr {
            settings.http.addr = a.clone();
        }
    }
    settings.validate()?;
    init_tracing(&settings);

    match cli.command {
        Command::Serve(_) => serve(settings).await,
        Command::Migrate => {
            let url = settings.database.url.expose().to_string();
            store::ensure_database(&url)
                .await
                .with_context(|| format!("database {}", store::describe_url(&url)))?;
            let pool = store::build_pool(&settings.database)?;
            let applied = store::migrate::run(&pool)
                .await
                .with_context(|| format!("migrating {}", store::describe_url(&url)))?;
            println!(
                "database {} is up to date ({} migration(s) applied now)",
                store::describe_url(&url),
                applied.len()
            );
            Ok(())
        }
        Command::Device(cmd) => device(settings, cmd).await,
    }
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    let app = silverguard::app::Application::build(settings).await?;
    let shutdown = app.shutdown_token();
    tokio::spawn(async move {
        wait_for_signal().await;
        shutdown.cancel();
    });
    app.run_until_stopped().await?;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn device(settings: Settings, cmd: DeviceCommand) -> anyhow::Result<()> {
    let url = settings.database.url.expose().to_string();
    let pool = store::build_pool(&settings.database)?;
    let ctx = || format!("database {}", store::describe_url(&url));
    match cmd {
        DeviceCommand::Add {
            mut ids,
            from_file,
            elder,
            model,
            interval_s,
        } => {
            if let Some(path) = from_file {
                let reader: Box<dyn BufRead> = if path.as_os_str() == "-" {
                    Box::new(std::io::stdin().lock())
                } else {
                    Box::new(std::io::BufReader::new(
                        std::fs::File::open(&path)
                            .with_context(|| format!("opening {}", path.display()))?,
                    ))
                };
                for line in reader.lines() {
                    let line = line?;
                    let id = line.trim();
                    if !id.is_empty() && !id.starts_with('#') {
                        ids.push(id.to_string());
                    }
                }
            }
            if ids.is_empty() {
                bail!("no device ids given (pass ids or --from-file)");
            }
            let outcome = store::devices::add(
                &pool,
                &store::devices::NewDevices {
                    ids,
                    elder_name: elder,
                    model,
                    heartbeat_interval_s: interval_s,
                },
            )
            .await
            .with_context(ctx)?;
            println!(
                "added {} device(s), {} already present",
                outcome.added, outcome.already_present
            );
        }
        DeviceCommand::List { limit, json } => {
            let rows = store::devices::list(&pool, limit).await.with_context(ctx)?;
            if json {
                for r in rows {
                    println!("{}", serde_json::to_string(&r)?);
                }
            } else {
                println!(
                    "{:<24} {:<16} {:<10} {:>6} {:<21} {:<7} {:>4}",
                    "DEVICE", "ELDER", "MODEL", "INT_S", "LAST_SEEN", "ONLINE", "BAT%"
                );
                for r in rows {
                    println!(
                        "{:<24} {:<16} {:<10} {:>6} {:<21} {:<7} {:>4}",
                        r.device_id,
                        r.elder.unwrap_or_else(|| "-".into()),
                        r.model.unwrap_or_else(|| "-".into()),
                        r.heartbeat_interval_s,
                        r.last_seen_at.unwrap_or_else(|| "-".into()),
                        r.online
                            .map(|o| o.to_string())
                            .unwrap_or_else(|| "-".into()),
                        r.battery_pct
                            .map(|b| b.to_string())
                            .unwrap_or_else(|| "-".into()),
                    );
                }
            }
        }
        DeviceCommand::Remove { ids } => {
            let n = store::devices::remove(&pool, &ids)
                .await
                .with_context(ctx)?;
            println!("removed {n} device(s)");
            if (n as usize) < ids.len() {
                eprintln!("{} id(s) were not provisioned", ids.len() - n as usize);
            }
        }
    }
    Ok(())
}
