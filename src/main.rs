//! The `silverguard` command: `serve`, `migrate`, `device add|list|remove`.

mod registry_cli;
mod user_cli;

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
    /// Elders: identity, home and geofence, thresholds, bracelets (docs/registry.md).
    #[command(subcommand)]
    Elder(ElderCommand),
    /// Contacts who answer for elders (grid workers, guardians, supervisors) and their roles.
    #[command(subcommand)]
    Contact(ContactCommand),
    /// Bulk-load elders, contacts and bracelets from a CSV or TOML file, all or nothing.
    Import(ImportArgs),
    /// Alerts: list, show with timeline, acknowledge, resolve (docs/alerts.md).
    #[command(subcommand)]
    Alert(AlertCommand),
    /// Console and API users: roles, regions, passwords, API tokens (docs/console.md).
    #[command(subcommand)]
    User(user_cli::UserCommand),
    /// The region network: city, township, community, grid (docs/registry.md).
    #[command(subcommand)]
    Region(registry_cli::RegionCommand),
    /// The MQTT broker's dynamic security: service account, default deny
    /// (docs/device-credentials.md).
    #[command(subcommand)]
    Broker(registry_cli::BrokerCommand),
}

#[derive(Subcommand)]
enum AlertCommand {
    /// Alerts, newest first (active ones unless --all).
    List {
        #[arg(long)]
        all: bool,
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One alert with its whole timeline.
    Show {
        id: i64,
        #[arg(long)]
        json: bool,
    },
    /// Acknowledge: escalation stops.
    Ack {
        id: i64,
        /// Who acknowledges (recorded on the timeline).
        #[arg(long)]
        by: String,
    },
    /// Resolve with a note.
    Resolve {
        id: i64,
        #[arg(long)]
        by: String,
        #[arg(long)]
        note: String,
    },
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
        /// The bracelet's IMEI, 15 digits (with a single device id).
        #[arg(long)]
        imei: Option<String>,
        /// Firmware version.
        #[arg(long)]
        firmware: Option<String>,
    },
    /// Who wore a bracelet when: every bind and unbind, newest first.
    History(registry_cli::HistoryArgs),
    /// Provision bracelets from a CSV (device_id,imei,model,firmware,elder_ref), all or
    /// nothing.
    Import(registry_cli::KindImportArgs),
    /// MQTT credentials of a device: issue, rotate, revoke, show (docs/device-credentials.md).
    #[command(subcommand)]
    Credentials(registry_cli::CredentialsCommand),
    /// List devices with last-seen time, presence and battery.
    List {
        #[arg(long, default_value_t = 1000)]
        limit: i64,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove devices (their stored telemetry stays). Live broker credentials are revoked
    /// first (needs [broker_admin]; without it, removal of such a device is refused).
    Remove {
        #[arg(required = true)]
        ids: Vec<String>,
        #[command(flatten)]
        admin: registry_cli::BrokerAdminArgs,
    },
}

fn init_tracing(settings: &Settings) {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&settings.log.filter))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // tokio_postgres logs every statement's parameters at debug: names, phones, identity
    // numbers, CSRF tokens, notes. Never, whatever the filter asks for (tests/integration/logs.rs).
    if let Ok(d) = "tokio_postgres::query=info".parse() {
        filter = filter.add_directive(d);
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match settings.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut settings = Settings::load_unvalidated(cli.config.as_deref(), std::env::vars())?;
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
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if settings.runtime.worker_threads > 0 {
        runtime.worker_threads(settings.runtime.worker_threads);
    }
    runtime
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(run(cli.command, settings))
}

async fn run(command: Command, settings: Settings) -> anyhow::Result<()> {
    match command {
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
        Command::Elder(cmd) => elder(settings, cmd).await,
        Command::Contact(cmd) => contact(settings, cmd).await,
        Command::Import(args) => import(settings, args).await,
        Command::Alert(cmd) => alert(settings, cmd).await,
        Command::User(cmd) => user_cli::run(settings, cmd).await,
        Command::Region(cmd) => registry_cli::region(settings, cmd).await,
        Command::Broker(cmd) => registry_cli::broker(settings, cmd).await,
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
    let cmd = match cmd {
        DeviceCommand::History(a) => return registry_cli::device_history(settings, a).await,
        DeviceCommand::Import(a) => return registry_cli::device_import(settings, a).await,
        DeviceCommand::Credentials(c) => return registry_cli::credentials_cmd(settings, c).await,
        other => other,
    };
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
            imei,
            firmware,
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
                    imei,
                    firmware,
                    actor: Some("cli".into()),
                },
            )
            .await
            .with_context(ctx)?;
            println!(
                "added {} device(s), {} already present",
                outcome.added, outcome.already_present
            );
            if outcome.updated > 0 {
                eprintln!("updated the details of {} device(s)", outcome.updated);
            }
        }
        DeviceCommand::List { limit, json } => {
            let rows = store::devices::list(&pool, limit).await.with_context(ctx)?;
            if json {
                for r in rows {
                    println!("{}", serde_json::to_string(&r)?);
                }
            } else {
                println!(
                    "{:<24} {:<16} {:<10} {:>6} {:<21} {:<7} {:>4} {:<15} FIRMWARE",
                    "DEVICE", "ELDER", "MODEL", "INT_S", "LAST_SEEN", "ONLINE", "BAT%", "IMEI"
                );
                for r in rows {
                    println!(
                        "{:<24} {:<16} {:<10} {:>6} {:<21} {:<7} {:>4} {:<15} {}",
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
                        or_dash(r.imei),
                        or_dash(r.firmware),
                    );
                }
            }
        }
        DeviceCommand::History(_) | DeviceCommand::Import(_) | DeviceCommand::Credentials(_) => {
            unreachable!("handled above")
        }
        DeviceCommand::Remove { ids, admin } => {
            // Not configured is fine as long as none of the devices has live credentials.
            let admin = admin.admin(&settings).ok();
            let revoked =
                silverguard::store::credentials::revoke_before_removal(&pool, admin.as_ref(), &ids)
                    .await?;
            for id in revoked {
                println!("revoked the broker credentials of {id}");
            }
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

// ---------------------------------------------------------------------------------------
// Registry: `elder`, `contact`, `import` (docs/registry.md). Validation lives in
// silverguard::store::registry; these handlers parse arguments and print.
// ---------------------------------------------------------------------------------------

use silverguard::store::registry::{
    self, ContactKey, ElderKey, HomeLocation, ImportFormat, Language, RegistryError, Role,
    Thresholds,
};

#[derive(Subcommand)]
enum ElderCommand {
    /// Add an elder, or update the one with the same --ref (only the options given); prints the
    /// elder's id.
    Add(Box<ElderAddArgs>),
    /// List elders.
    List {
        /// Only elders of this community.
        #[arg(long)]
        community: Option<String>,
        /// Only elders whose grid lies in this region (a city, township, community or grid
        /// code).
        #[arg(long, value_name = "CODE")]
        region: Option<String>,
        /// Only elders in this category (living_alone, empty_nest, left_behind,
        /// special_hardship; or 独居, 空巢, 留守, 特困).
        #[arg(long)]
        category: Option<registry::Category>,
        #[arg(long, default_value_t = 10_000)]
        limit: i64,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show an elder with their bracelets and who answers for them.
    Show {
        #[command(flatten)]
        elder: ElderSel,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Remove an elder and their contact links (bracelets stay provisioned, unbound).
    Remove {
        #[command(flatten)]
        elder: ElderSel,
    },
    /// Change some of an elder's details (only the options given).
    Set(Box<ElderSetArgs>),
    /// Replace an elder's threshold overrides with a JSON object ('{}' restores the defaults).
    SetThresholds {
        /// The elder's id, or ref:REF.
        elder: ElderKey,
        /// e.g. '{"hr_high": {"above": 120, "for": "5m"}}'; keys: hr_high, hr_low, spo2_low,
        /// temp_high, bp_high, low_battery, not_worn, geofence_exit.
        #[arg(value_parser = registry::parse_thresholds)]
        thresholds: Thresholds,
    },
    /// Bind a bracelet to an elder (moving it from whoever had it).
    BindDevice {
        /// The elder's id, or ref:REF.
        elder: ElderKey,
        /// Device id (IMEI).
        device: String,
        /// Provision the device when it is not provisioned yet.
        #[arg(long)]
        provision: bool,
        /// Who binds it (kept in the device's history).
        #[arg(long, default_value = "cli")]
        by: String,
    },
    /// Unbind a bracelet from its elder.
    UnbindDevice {
        /// Device id (IMEI).
        device: String,
        /// Who unbinds it (kept in the device's history).
        #[arg(long, default_value = "cli")]
        by: String,
    },
}

/// An elder named by a positional id / ref:REF, or by --ref.
#[derive(Args)]
struct ElderSel {
    /// The elder's id, or ref:REF.
    #[arg(required_unless_present = "by_ref", conflicts_with = "by_ref")]
    elder: Option<ElderKey>,
    /// The elder's reference in the office ledger.
    #[arg(long = "ref", value_name = "REF")]
    by_ref: Option<String>,
}

impl ElderSel {
    fn key(self) -> anyhow::Result<ElderKey> {
        match (self.elder, self.by_ref) {
            (Some(k), _) => Ok(k),
            (None, Some(r)) if !r.trim().is_empty() => Ok(ElderKey::Ref(r.trim().to_string())),
            _ => bail!("name the elder: ID, ref:REF or --ref REF"),
        }
    }
}

#[derive(Args)]
struct ElderAddArgs {
    /// Full name.
    #[arg(long)]
    name: String,
    /// The office ledger's id; adding again with the same ref updates that elder.
    #[arg(long = "ref", value_name = "REF")]
    external_ref: Option<String>,
    /// Resident identity number (18 characters, checked).
    #[arg(long, value_parser = registry::parse_id_number)]
    id_number: Option<String>,
    /// YYYY-MM-DD.
    #[arg(long, value_parser = registry::parse_birth_date)]
    birth_date: Option<chrono::NaiveDate>,
    /// The elder's own phone.
    #[arg(long, value_parser = registry::parse_phone)]
    phone: Option<String>,
    #[arg(long)]
    address: Option<String>,
    /// Community (社区) or village.
    #[arg(long)]
    community: Option<String>,
    /// Home location in degrees, LAT,LON (e.g. 30.2592,120.1631).
    #[arg(long, value_name = "LAT,LON", allow_hyphen_values = true)]
    home: Option<HomeLocation>,
    /// Geofence radius around home, metres (default 300).
    #[arg(long, value_parser = registry::parse_radius_m)]
    radius_m: Option<i32>,
    /// Raise an alert when the elder leaves the home geofence.
    #[arg(long)]
    wander_risk: bool,
    /// zh-CN or en.
    #[arg(long)]
    language: Option<Language>,
    /// Threshold overrides as a JSON object (see `elder set-thresholds`).
    #[arg(long, value_parser = registry::parse_thresholds)]
    thresholds: Option<Thresholds>,
    #[arg(long)]
    notes: Option<String>,
    #[command(flatten)]
    profile: ElderProfileArgs,
}

/// Where the elder lives in the network and who they are to the programme.
#[derive(Args)]
struct ElderProfileArgs {
    /// The grid (网格) they live in, by region code.
    #[arg(long, value_name = "GRID_CODE")]
    region: Option<String>,
    /// female or male (女/男).
    #[arg(long)]
    gender: Option<registry::Gender>,
    /// living_alone, empty_nest, left_behind, special_hardship (or 独居, 空巢, 留守, 特困),
    /// separated by ; or 、 (replaces the stored list; "" clears it).
    #[arg(long)]
    categories: Option<registry_cli::CategoryList>,
    /// Chronic conditions, separated by ; or 、 (replaces the stored list; "" clears it).
    #[arg(long)]
    conditions: Option<registry_cli::TextList>,
    /// Regular medication, separated by ; or 、 (replaces the stored list; "" clears it).
    #[arg(long)]
    medications: Option<registry_cli::TextList>,
}

#[derive(Args)]
struct ElderSetArgs {
    #[command(flatten)]
    elder: ElderSel,
    #[arg(long)]
    name: Option<String>,
    #[arg(long, value_parser = registry::parse_id_number)]
    id_number: Option<String>,
    #[arg(long, value_parser = registry::parse_birth_date)]
    birth_date: Option<chrono::NaiveDate>,
    #[arg(long, value_parser = registry::parse_phone)]
    phone: Option<String>,
    #[arg(long)]
    address: Option<String>,
    #[arg(long)]
    community: Option<String>,
    /// Home location in degrees, LAT,LON.
    #[arg(
        long,
        value_name = "LAT,LON",
        allow_hyphen_values = true,
        conflicts_with = "clear_home"
    )]
    home: Option<HomeLocation>,
    /// Forget the home location (no geofence alerts).
    #[arg(long)]
    clear_home: bool,
    #[arg(long, value_parser = registry::parse_radius_m)]
    radius_m: Option<i32>,
    /// true or false.
    #[arg(long, value_name = "BOOL", value_parser = registry::parse_yes_no)]
    wander_risk: Option<bool>,
    /// zh-CN or en.
    #[arg(long)]
    language: Option<Language>,
    #[arg(long)]
    notes: Option<String>,
    #[command(flatten)]
    profile: ElderProfileArgs,
    /// Take the elder out of any region.
    #[arg(long, conflicts_with = "region")]
    clear_region: bool,
}

#[derive(Subcommand)]
enum ContactCommand {
    /// Add a contact, or update the one with the same --ref, else the same --phone; prints
    /// the contact's id.
    Add {
        #[arg(long)]
        name: String,
        /// Your own reference for the contact; adding again with it updates the contact.
        #[arg(long = "ref", value_name = "REF")]
        external_ref: Option<String>,
        /// 11-digit mobile, landline with area code, or +country code.
        #[arg(long, value_parser = registry::parse_phone)]
        phone: Option<String>,
        #[arg(long, value_parser = registry::parse_email)]
        email: Option<String>,
        /// zh-CN or en: the language of their notifications.
        #[arg(long)]
        language: Option<Language>,
        /// WeCom / DingTalk group-robot URL.
        #[arg(long, value_parser = registry::parse_webhook)]
        im_webhook: Option<String>,
    },
    /// List contacts with the number of elders each answers for.
    List {
        #[arg(long, default_value_t = 10_000)]
        limit: i64,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove a contact and all their links to elders.
    Remove {
        /// The contact's id, ref:REF or phone:NUMBER.
        contact: ContactKey,
    },
    /// Make a contact answer for an elder in a role; linking again changes the priority.
    Link {
        /// The elder's id, or ref:REF.
        #[arg(long)]
        elder: ElderKey,
        /// The contact's id, ref:REF or phone:NUMBER.
        #[arg(long)]
        contact: ContactKey,
        /// grid_worker, backup_grid_worker, guardian, community_supervisor or
        /// township_supervisor.
        #[arg(long)]
        role: Role,
        /// 1 is told first (guardians); default 1.
        #[arg(long, value_parser = registry::parse_priority)]
        priority: Option<i32>,
    },
    /// Remove a contact's link to an elder (in one role, or all).
    Unlink {
        #[arg(long)]
        elder: ElderKey,
        #[arg(long)]
        contact: ContactKey,
        #[arg(long)]
        role: Option<Role>,
    },
}

#[derive(Args)]
struct ImportArgs {
    /// A .csv or .toml file (UTF-8, with or without BOM).
    file: PathBuf,
    /// Validate and report what would change, without writing anything.
    #[arg(long)]
    dry_run: bool,
    /// csv or toml, when the extension does not tell.
    #[arg(long)]
    format: Option<ImportFormat>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    /// elders, regions or devices, when a CSV's header does not tell (it usually does).
    #[arg(long)]
    kind: Option<registry::CsvKind>,
}

/// Database trouble gets the database's address as context; a rejected value or a missing
/// elder is reported as it is (naming the database there would mislead).
fn registry_error(url: &str) -> impl Fn(RegistryError) -> anyhow::Error + '_ {
    move |e| {
        let db = matches!(e, RegistryError::Store(_) | RegistryError::ImportDb { .. });
        let err = anyhow::Error::new(e);
        if db {
            err.context(format!("database {}", store::describe_url(url)))
        } else {
            err
        }
    }
}

fn or_dash<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

async fn elder(settings: Settings, cmd: ElderCommand) -> anyhow::Result<()> {
    let url = settings.database.url.expose().to_string();
    let pool = store::build_pool(&settings.database)?;
    let err = registry_error(&url);
    match cmd {
        ElderCommand::Add(a) => {
            let a = *a;
            let new = registry::NewElder {
                external_ref: a.external_ref,
                name: a.name,
                id_number: a.id_number,
                birth_date: a.birth_date,
                phone: a.phone,
                address: a.address,
                community: a.community,
                home: a.home,
                home_radius_m: a.radius_m,
                // Absent flag on an update keeps what is stored (use `elder set` to clear).
                wander_risk: a.wander_risk.then_some(true),
                language: a.language,
                thresholds: a.thresholds,
                notes: a.notes,
                region: a.profile.region,
                gender: a.profile.gender,
                categories: a.profile.categories.map(|c| c.0),
                conditions: a.profile.conditions.map(|c| c.0),
                medications: a.profile.medications.map(|c| c.0),
            };
            let up = registry::upsert_elder(&pool, &new).await.map_err(&err)?;
            println!("{}", up.id);
            if !up.created {
                eprintln!(
                    "elder {} (ref {}) already existed: {}",
                    up.id,
                    new.external_ref.as_deref().unwrap_or("-"),
                    if up.changed { "updated" } else { "unchanged" }
                );
            }
        }
        ElderCommand::List {
            community,
            region,
            category,
            limit,
            json,
        } => {
            let filter = registry::ElderFilter {
                community,
                region,
                category,
            };
            let elders = registry::find_elders(&pool, &filter, limit)
                .await
                .map_err(&err)?;
            if json {
                for e in elders {
                    println!("{}", serde_json::to_string(&e)?);
                }
            } else {
                println!(
                    "{:>6} {:<14} {:<6} {:<6} {:>7} {:<12} COMMUNITY",
                    "ID", "REF", "LANG", "WANDER", "DEVICES", "NAME"
                );
                for e in elders {
                    println!(
                        "{:>6} {:<14} {:<6} {:<6} {:>7} {:<12} {}",
                        e.id,
                        or_dash(e.external_ref),
                        e.language,
                        if e.wander_risk { "yes" } else { "no" },
                        e.devices.len(),
                        e.name,
                        or_dash(e.community)
                    );
                }
            }
        }
        ElderCommand::Show { elder, json } => {
            let key = elder.key()?;
            let e = registry::get_elder(&pool, &key).await.map_err(&err)?;
            let who = registry::who_answers(&pool, e.id).await.map_err(&err)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "elder": e,
                        "who_answers": who,
                    }))?
                );
            } else {
                print_elder(&e, &who);
            }
        }
        ElderCommand::Remove { elder } => {
            let key = elder.key()?;
            let id = registry::remove_elder(&pool, &key).await.map_err(&err)?;
            println!("removed elder {id}");
        }
        ElderCommand::Set(a) => {
            let a = *a;
            let key = a.elder.key()?;
            let patch = registry::ElderPatch {
                name: a.name,
                external_ref: None,
                id_number: a.id_number,
                birth_date: a.birth_date,
                phone: a.phone,
                address: a.address,
                community: a.community,
                home: if a.clear_home {
                    Some(None)
                } else {
                    a.home.map(Some)
                },
                home_radius_m: a.radius_m,
                wander_risk: a.wander_risk,
                language: a.language,
                thresholds: None,
                notes: a.notes,
                region: if a.clear_region {
                    Some(None)
                } else {
                    a.profile.region.map(Some)
                },
                gender: a.profile.gender,
                categories: a.profile.categories.map(|c| c.0),
                conditions: a.profile.conditions.map(|c| c.0),
                medications: a.profile.medications.map(|c| c.0),
            };
            let id = registry::update_elder(&pool, &key, &patch)
                .await
                .map_err(&err)?;
            println!("updated elder {id}");
        }
        ElderCommand::SetThresholds { elder, thresholds } => {
            let id = registry::set_thresholds(&pool, &elder, &thresholds)
                .await
                .map_err(&err)?;
            println!(
                "elder {id} thresholds: {}",
                serde_json::to_string(&thresholds.to_json())?
            );
        }
        ElderCommand::BindDevice {
            elder,
            device,
            provision,
            by,
        } => {
            let out = registry::bind_device(&pool, &elder, &device, provision, &by)
                .await
                .map_err(&err)?;
            if out.provisioned {
                eprintln!("provisioned device {}", device.trim());
            }
            if let Some(prev) = out.previous_elder {
                eprintln!("device {} was bound to elder {prev}", device.trim());
            }
            println!(
                "device {} is bound to elder {}",
                device.trim(),
                out.elder_id
            );
        }
        ElderCommand::UnbindDevice { device, by } => {
            let prev = registry::unbind_device(&pool, &device, &by)
                .await
                .map_err(&err)?;
            match prev {
                Some(id) => println!("device {} unbound from elder {id}", device.trim()),
                None => println!("device {} was not bound", device.trim()),
            }
        }
    }
    Ok(())
}

fn print_elder(e: &registry::Elder, who: &registry::Responders) {
    let row = |k: &str, v: String| println!("{k:<13} {v}");
    row("id:", e.id.to_string());
    row("ref:", or_dash(e.external_ref.as_deref()));
    row("name:", e.name.clone());
    row("id number:", or_dash(e.id_number.as_deref()));
    row("birth date:", or_dash(e.birth_date));
    row("phone:", or_dash(e.phone.as_deref()));
    row("address:", or_dash(e.address.as_deref()));
    row("community:", or_dash(e.community.as_deref()));
    row(
        "region:",
        match &e.region_code {
            Some(code) => format!("{} ({code})", e.region_path.join(" / ")),
            None => "-".into(),
        },
    );
    row("gender:", or_dash(e.gender));
    let list = |v: Vec<String>| {
        if v.is_empty() {
            "-".into()
        } else {
            v.join("; ")
        }
    };
    row(
        "categories:",
        list(
            e.categories
                .iter()
                .map(|c| format!("{c} ({})", c.label_zh()))
                .collect(),
        ),
    );
    row("conditions:", list(e.conditions.clone()));
    row("medications:", list(e.medications.clone()));
    row(
        "home:",
        match e.home {
            Some(h) => format!("{h} (radius {} m)", e.home_radius_m),
            None => "-".into(),
        },
    );
    row(
        "wander risk:",
        if e.wander_risk { "yes" } else { "no" }.into(),
    );
    row("language:", e.language.to_string());
    row("thresholds:", e.thresholds.to_string());
    row(
        "devices:",
        if e.devices.is_empty() {
            "-".into()
        } else {
            e.devices.join(", ")
        },
    );
    row("notes:", or_dash(e.notes.as_deref()));
    println!("who answers:");
    if who.is_empty() {
        println!("  nobody: link contacts with `silverguard contact link`");
    }
    for role in Role::ALL {
        for r in who.role(role) {
            println!(
                "  {:<21} p{:<2} #{:<5} {:<12} {:<13} {:<5} {}",
                role.as_str(),
                r.priority,
                r.id,
                r.name,
                or_dash(r.phone.as_deref()),
                r.language,
                or_dash(r.email.as_deref())
            );
        }
    }
    if who.grid_workers.is_empty() {
        println!("  (no grid worker: an SOS reaches no one local)");
    }
}

async fn contact(settings: Settings, cmd: ContactCommand) -> anyhow::Result<()> {
    let url = settings.database.url.expose().to_string();
    let pool = store::build_pool(&settings.database)?;
    let err = registry_error(&url);
    match cmd {
        ContactCommand::Add {
            name,
            external_ref,
            phone,
            email,
            language,
            im_webhook,
        } => {
            let up = registry::upsert_contact(
                &pool,
                &registry::NewContact {
                    external_ref,
                    name,
                    phone,
                    email,
                    language,
                    im_webhook,
                },
            )
            .await
            .map_err(&err)?;
            println!("{}", up.id);
            if !up.created {
                eprintln!(
                    "contact {} already existed: {}",
                    up.id,
                    if up.changed { "updated" } else { "unchanged" }
                );
            }
        }
        ContactCommand::List { limit, json } => {
            let contacts = registry::list_contacts(&pool, limit).await.map_err(&err)?;
            if json {
                for c in contacts {
                    println!("{}", serde_json::to_string(&c)?);
                }
            } else {
                println!(
                    "{:>6} {:<12} {:<14} {:<6} {:>6} {:<12} EMAIL",
                    "ID", "REF", "PHONE", "LANG", "ELDERS", "NAME"
                );
                for c in contacts {
                    println!(
                        "{:>6} {:<12} {:<14} {:<6} {:>6} {:<12} {}",
                        c.id,
                        or_dash(c.external_ref),
                        or_dash(c.phone),
                        c.language,
                        c.elders,
                        c.name,
                        or_dash(c.email)
                    );
                }
            }
        }
        ContactCommand::Remove { contact } => {
            let out = registry::remove_contact(&pool, &contact)
                .await
                .map_err(&err)?;
            println!(
                "removed contact {} and {} link(s) to elders",
                out.id, out.links_removed
            );
            for id in out.elders_without_grid_worker {
                eprintln!("warning: elder {id} has no grid worker now");
            }
        }
        ContactCommand::Link {
            elder,
            contact,
            role,
            priority,
        } => {
            registry::link_contact(&pool, &elder, &contact, role, priority)
                .await
                .map_err(&err)?;
            println!(
                "{contact} answers for {elder} as {role}{}",
                priority
                    .map(|p| format!(" (priority {p})"))
                    .unwrap_or_default()
            );
        }
        ContactCommand::Unlink {
            elder,
            contact,
            role,
        } => {
            let n = registry::unlink_contact(&pool, &elder, &contact, role)
                .await
                .map_err(&err)?;
            println!("removed {n} link(s) between {elder} and {contact}");
        }
    }
    Ok(())
}

async fn import(settings: Settings, args: ImportArgs) -> anyhow::Result<()> {
    let url = settings.database.url.expose().to_string();
    let err = registry_error(&url);
    // A CSV of regions or of devices (told by its header, or --kind) has its own importer.
    if registry_cli::import_by_kind(
        &settings,
        &args.file,
        args.format,
        args.kind,
        args.dry_run,
        args.json,
    )
    .await?
    {
        return Ok(());
    }
    // Parse and validate before connecting: a broken file is reported even with no database.
    let plan = registry::read_import_file(&args.file, args.format).map_err(&err)?;
    let pool = store::build_pool(&settings.database)?;
    let s = registry::apply_import(&pool, &plan, &args.file.display().to_string(), args.dry_run)
        .await
        .map_err(&err)?;
    for w in &s.warnings {
        eprintln!("warning: {w}");
    }
    if args.json {
        println!("{}", serde_json::to_string(&s)?);
        return Ok(());
    }
    println!(
        "elders:   {} created, {} updated, {} unchanged",
        s.elders_created, s.elders_updated, s.elders_unchanged
    );
    println!(
        "contacts: {} created, {} updated, {} unchanged",
        s.contacts_created, s.contacts_updated, s.contacts_unchanged
    );
    println!(
        "links:    {} set, {} removed, {} unchanged",
        s.links_set, s.links_removed, s.links_unchanged
    );
    println!(
        "devices:  {} provisioned, {} bound, {} unchanged",
        s.devices_provisioned, s.devices_bound, s.devices_unchanged
    );
    if s.dry_run {
        println!("dry run: nothing was written");
    }
    Ok(())
}

async fn alert(settings: Settings, cmd: AlertCommand) -> anyhow::Result<()> {
    use silverguard::alerts::{admin, engine::Transition};
    let url = settings.database.url.expose().to_string();
    let pool = store::build_pool(&settings.database)?;
    let ctx = || format!("database {}", store::describe_url(&url));
    let report = |t: Transition, what: &str| -> anyhow::Result<()> {
        match t {
            Transition::Done => {
                println!("{what}");
                Ok(())
            }
            Transition::AlreadyAcknowledged => bail!("the alert was already acknowledged"),
            Transition::AlreadyResolved => bail!("the alert is already resolved"),
            Transition::NotFound => bail!("no such alert"),
        }
    };
    match cmd {
        AlertCommand::List { all, limit, json } => {
            let rows = admin::list(&pool, !all, limit).await.with_context(ctx)?;
            if json {
                for r in rows {
                    println!("{}", serde_json::to_string(&r)?);
                }
            } else {
                println!(
                    "{:>6} {:<14} {:<8} {:<12} {:<20} {:<16} {:>3}",
                    "ID", "KIND", "SEVERITY", "STATUS", "OPENED (UTC)", "ELDER", "REP"
                );
                for r in rows {
                    println!(
                        "{:>6} {:<14} {:<8} {:<12} {:<20} {:<16} {:>3}",
                        r.id,
                        r.kind,
                        r.severity,
                        r.status,
                        r.opened_at.format("%Y-%m-%d %H:%M:%S"),
                        r.elder.or(r.device_id).unwrap_or_default(),
                        r.repeat_count
                    );
                }
            }
        }
        AlertCommand::Show { id, json } => {
            let Some((a, timeline)) = admin::show(&pool, id).await.with_context(ctx)? else {
                bail!("no alert {id}");
            };
            if json {
                println!("{}", serde_json::json!({"alert": a, "timeline": timeline}));
            } else {
                println!(
                    "alert {} {} ({}) {} — {}",
                    a.id,
                    a.kind,
                    a.severity,
                    a.status,
                    a.elder.or(a.device_id).unwrap_or_default()
                );
                for t in timeline {
                    println!(
                        "  {}  {:<22} {:<8} {:<12} {}",
                        t.at.format("%H:%M:%S%.3f"),
                        t.entry,
                        t.channel.unwrap_or_default(),
                        t.actor.unwrap_or_default(),
                        t.detail
                    );
                }
            }
        }
        AlertCommand::Ack { id, by } => {
            let t = admin::acknowledge(&pool, id, &by, "cli", &settings.alerts)
                .await
                .with_context(ctx)?;
            report(t, &format!("alert {id} acknowledged by {by}"))?;
        }
        AlertCommand::Resolve { id, by, note } => {
            let t = admin::resolve(&pool, id, &by, &note)
                .await
                .with_context(ctx)?;
            report(t, &format!("alert {id} resolved by {by}"))?;
        }
    }
    Ok(())
}
