//! `silverguard region`, `silverguard broker`, and the device commands about bindings and
//! MQTT credentials (docs/registry.md, docs/device-credentials.md). Rules live in
//! `silverguard::store::{regions, devices, credentials}`; these handlers parse and print.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use silverguard::config::Settings;
use silverguard::store::credentials::{self, BrokerAdmin, BrokerAdminSettings, CredentialError};
use silverguard::store::regions::{self, Level, NewRegion};
use silverguard::store::{self, devices, registry};

use super::{or_dash, registry_error};

/// `--categories` as one value: `独居、特困` (an empty value clears the list).
#[derive(Debug, Clone)]
pub struct CategoryList(pub Vec<registry::Category>);

impl std::str::FromStr for CategoryList {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        registry::parse_categories(s).map(CategoryList)
    }
}

/// `--conditions` / `--medications` as one value: `高血压；糖尿病` (empty clears).
#[derive(Debug, Clone)]
pub struct TextList(pub Vec<String>);

impl std::str::FromStr for TextList {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        registry::parse_text_list(s).map(TextList)
    }
}

// ---------------------------------------------------------------------------------------
// region
// ---------------------------------------------------------------------------------------

#[derive(Subcommand)]
pub enum RegionCommand {
    /// Add a region (or rename the one with the same code); prints its id.
    Add {
        /// The office's code for it: 1-64 of A-Z a-z 0-9 _ . -
        #[arg(long)]
        code: String,
        #[arg(long)]
        name: String,
        /// city (市), township (乡镇/街道), community (社区/村) or grid (网格).
        #[arg(long)]
        level: Level,
        /// The code of the region it belongs to (every level but city).
        #[arg(long = "parent", value_name = "CODE")]
        parent: Option<String>,
    },
    /// Regions in tree order, with how many elders live under each.
    List {
        /// Only this region and what lies under it.
        #[arg(long, value_name = "CODE")]
        under: Option<String>,
        /// Print JSON lines instead of a tree.
        #[arg(long)]
        json: bool,
    },
    /// One region.
    Show {
        code: String,
        #[arg(long)]
        json: bool,
    },
    /// Load regions from a CSV (code,name,level,parent_code; Chinese headers work), all or
    /// nothing.
    Import(KindImportArgs),
    /// Remove a region that has no sub-regions (its elders lose their region).
    Remove { code: String },
}

/// Arguments of `region import` and `device import`.
#[derive(Args)]
pub struct KindImportArgs {
    /// A .csv file (UTF-8, UTF-8 with BOM, or GBK/GB18030 as Excel saves it).
    pub file: PathBuf,
    /// Validate and report what would change, without writing anything.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn region(settings: Settings, cmd: RegionCommand) -> anyhow::Result<()> {
    let url = settings.database.url.expose().to_string();
    let err = registry_error(&url);
    if let RegionCommand::Import(args) = &cmd {
        // Validate before connecting: a broken file is reported even with no database.
        let plan = regions::read_region_file(&args.file).map_err(&err)?;
        let pool = store::build_pool(&settings.database)?;
        return import_regions(&pool, &plan, args, &err).await;
    }
    let pool = store::build_pool(&settings.database)?;
    match cmd {
        RegionCommand::Add {
            code,
            name,
            level,
            parent,
        } => {
            let up = regions::add_region(
                &pool,
                &NewRegion {
                    code: code.clone(),
                    name,
                    level,
                    parent_code: parent,
                },
            )
            .await
            .map_err(&err)?;
            println!("{}", up.id);
            if !up.created {
                eprintln!(
                    "region {} already existed: {}",
                    code.trim(),
                    if up.changed { "renamed" } else { "unchanged" }
                );
            }
        }
        RegionCommand::List { under, json } => {
            let list = regions::list_regions(&pool, under.as_deref())
                .await
                .map_err(&err)?;
            if json {
                for r in list {
                    println!("{}", serde_json::to_string(&r)?);
                }
            } else {
                println!("{:<24} {:<10} {:>6}  NAME", "CODE", "LEVEL", "ELDERS");
                let top = list
                    .first()
                    .map(|r| r.path.matches('/').count())
                    .unwrap_or(0);
                for r in list {
                    let depth = r.path.matches('/').count().saturating_sub(top);
                    println!(
                        "{:<24} {:<10} {:>6}  {}{}",
                        r.code,
                        r.level,
                        r.elders,
                        "  ".repeat(depth),
                        r.name
                    );
                }
            }
        }
        RegionCommand::Show { code, json } => {
            let r = regions::get_region_by_code(&pool, &code)
                .await
                .map_err(&err)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!("id:       {}", r.id);
                println!("code:     {}", r.code);
                println!("name:     {}", r.name);
                println!("level:    {} ({})", r.level, r.level.label_zh());
                println!("parent:   {}", or_dash(r.parent_code));
                println!("path:     {}", r.path_names.join(" / "));
                println!("elders:   {}", r.elders);
            }
        }
        RegionCommand::Remove { code } => {
            let id = regions::remove_region(&pool, &code).await.map_err(&err)?;
            println!("removed region {} ({id})", code.trim());
        }
        RegionCommand::Import(_) => unreachable!("handled above"),
    }
    Ok(())
}

async fn import_regions(
    pool: &store::PgPool,
    plan: &[regions::PlannedRegion],
    args: &KindImportArgs,
    err: &impl Fn(registry::RegistryError) -> anyhow::Error,
) -> anyhow::Result<()> {
    let s =
        regions::apply_region_import(pool, plan, &args.file.display().to_string(), args.dry_run)
            .await
            .map_err(err)?;
    if args.json {
        let mut v = serde_json::to_value(&s)?;
        v["kind"] = "regions".into();
        println!("{v}");
        return Ok(());
    }
    println!(
        "regions:  {} created, {} updated, {} unchanged",
        s.regions_created, s.regions_updated, s.regions_unchanged
    );
    if s.dry_run {
        println!("dry run: nothing was written");
    }
    Ok(())
}

async fn import_devices(
    pool: &store::PgPool,
    plan: &[devices::PlannedDevice],
    args: &KindImportArgs,
    err: &impl Fn(registry::RegistryError) -> anyhow::Error,
) -> anyhow::Result<()> {
    let s = devices::apply_device_import(
        pool,
        plan,
        &args.file.display().to_string(),
        args.dry_run,
        "cli:import",
    )
    .await
    .map_err(err)?;
    for w in &s.warnings {
        eprintln!("warning: {w}");
    }
    if args.json {
        let mut v = serde_json::to_value(&s)?;
        v["kind"] = "devices".into();
        println!("{v}");
        return Ok(());
    }
    println!(
        "devices:  {} provisioned, {} updated, {} unchanged, {} bound",
        s.devices_provisioned, s.devices_updated, s.devices_unchanged, s.devices_bound
    );
    if s.dry_run {
        println!("dry run: nothing was written");
    }
    Ok(())
}

/// `device import FILE`.
pub async fn device_import(settings: Settings, args: KindImportArgs) -> anyhow::Result<()> {
    let url = settings.database.url.expose().to_string();
    let err = registry_error(&url);
    let plan = devices::read_device_file(&args.file).map_err(&err)?;
    let pool = store::build_pool(&settings.database)?;
    import_devices(&pool, &plan, &args, &err).await
}

/// `silverguard import FILE` for a CSV whose header says it holds regions or devices.
/// Returns false when the file is an elders ledger (the caller imports it as before).
pub async fn import_by_kind(
    settings: &Settings,
    file: &std::path::Path,
    format: Option<registry::ImportFormat>,
    kind: Option<registry::CsvKind>,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<bool> {
    let url = settings.database.url.expose().to_string();
    let err = registry_error(&url);
    let is_csv = format.or_else(|| registry::ImportFormat::from_path(file))
        == Some(registry::ImportFormat::Csv);
    let kind = match kind {
        Some(k) => k,
        None if is_csv => {
            let text = registry::read_office_file(file).map_err(&err)?;
            registry::detect_csv_kind(&text)
        }
        None => registry::CsvKind::Elders,
    };
    let args = KindImportArgs {
        file: file.to_path_buf(),
        dry_run,
        json,
    };
    match kind {
        registry::CsvKind::Elders => Ok(false),
        registry::CsvKind::Regions => {
            let plan = regions::read_region_file(file).map_err(&err)?;
            let pool = store::build_pool(&settings.database)?;
            import_regions(&pool, &plan, &args, &err).await?;
            Ok(true)
        }
        registry::CsvKind::Devices => {
            let plan = devices::read_device_file(file).map_err(&err)?;
            let pool = store::build_pool(&settings.database)?;
            import_devices(&pool, &plan, &args, &err).await?;
            Ok(true)
        }
    }
}

// ---------------------------------------------------------------------------------------
// device history
// ---------------------------------------------------------------------------------------

#[derive(Args)]
pub struct HistoryArgs {
    /// Device id (IMEI).
    pub device: String,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub async fn device_history(settings: Settings, args: HistoryArgs) -> anyhow::Result<()> {
    let url = settings.database.url.expose().to_string();
    let err = registry_error(&url);
    let pool = store::build_pool(&settings.database)?;
    let rows = devices::history(&pool, &args.device).await.map_err(&err)?;
    if args.json {
        for b in rows {
            println!("{}", serde_json::to_string(&b)?);
        }
        return Ok(());
    }
    if rows.is_empty() {
        eprintln!("device {} was never bound", args.device.trim());
        return Ok(());
    }
    let time = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%d %H:%M:%S").to_string();
    println!(
        "{:<20} {:<14} {:<20} {:<14} ELDER",
        "BOUND (UTC)", "BY", "UNBOUND (UTC)", "BY"
    );
    for b in rows {
        let elder = match (b.elder_id, &b.elder_name) {
            (Some(id), Some(name)) => format!(
                "{id} {name}{}",
                b.elder_ref
                    .as_deref()
                    .map(|r| format!(" (ref {r})"))
                    .unwrap_or_default()
            ),
            _ => "(record removed)".into(),
        };
        println!(
            "{:<20} {:<14} {:<20} {:<14} {}",
            time(b.bound_at),
            or_dash(b.bound_by),
            b.unbound_at
                .map(time)
                .unwrap_or_else(|| "(bound now)".into()),
            or_dash(b.unbound_by),
            elder
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// device credentials, broker setup
// ---------------------------------------------------------------------------------------

/// How to reach the broker as its dynamic-security admin; anything not given comes from the
/// settings (`broker_admin.*`, then `mqtt.url`).
#[derive(Args, Clone)]
pub struct BrokerAdminArgs {
    /// The broker, mqtt://host:port [default: broker_admin.url, else mqtt.url].
    #[arg(long, value_name = "URL")]
    pub broker_url: Option<String>,
    /// The dynamic-security admin [default: broker_admin.username].
    #[arg(long, env = "SILVERGUARD_BROKER_ADMIN_USER")]
    pub admin_user: Option<String>,
    /// Environment variable holding the admin's password (when it is unset or empty:
    /// broker_admin.password).
    #[arg(long, default_value = "SILVERGUARD_BROKER_ADMIN_PASSWORD")]
    pub admin_password_env: String,
}

impl BrokerAdminArgs {
    pub fn admin(&self, settings: &Settings) -> anyhow::Result<BrokerAdmin> {
        let mut s: BrokerAdminSettings = settings.broker_admin.clone();
        if let Some(u) = &self.broker_url {
            s.url = u.clone();
        }
        if let Some(u) = &self.admin_user {
            s.username = u.clone();
        }
        if let Ok(p) = std::env::var(&self.admin_password_env) {
            if !p.is_empty() {
                s.password = Some(silverguard::config::Secret::new(p));
            }
        }
        Ok(BrokerAdmin::from_settings(&s, &settings.mqtt)?)
    }
}

#[derive(Subcommand)]
pub enum CredentialsCommand {
    /// Issue MQTT credentials to a provisioned device; prints the password once.
    Issue {
        device: String,
        #[command(flatten)]
        admin: BrokerAdminArgs,
        /// Print {"device_id", "username", "password", "generation"} as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Replace the password: the old one stops working at once; prints the new one once.
    Rotate {
        device: String,
        #[command(flatten)]
        admin: BrokerAdminArgs,
        #[arg(long)]
        json: bool,
    },
    /// Revoke: the device can no longer log in (and is disconnected now).
    Revoke {
        device: String,
        #[command(flatten)]
        admin: BrokerAdminArgs,
    },
    /// What is recorded (never the password); --check also asks the broker.
    Show {
        device: String,
        /// Also ask the broker whether it knows the client.
        #[arg(long)]
        check: bool,
        #[command(flatten)]
        admin: BrokerAdminArgs,
        #[arg(long)]
        json: bool,
    },
}

fn credential_error(e: CredentialError) -> anyhow::Error {
    anyhow::Error::new(e)
}

fn print_credential(c: &credentials::DeviceCredential, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(c)?);
    } else {
        println!("username:   {}", c.username);
        println!("password:   {}", c.password);
        println!("generation: {}", c.generation);
    }
    eprintln!(
        "the password is shown only now: put it on the bracelet (MQTT username {}, password above)",
        c.username
    );
    Ok(())
}

pub async fn credentials_cmd(settings: Settings, cmd: CredentialsCommand) -> anyhow::Result<()> {
    let url = settings.database.url.expose().to_string();
    let pool = store::build_pool(&settings.database)?;
    let ctx = || format!("database {}", store::describe_url(&url));
    match cmd {
        CredentialsCommand::Issue {
            device,
            admin,
            json,
        } => {
            let admin = admin.admin(&settings)?;
            let c = credentials::issue(&pool, &admin, &device)
                .await
                .map_err(credential_error)?;
            print_credential(&c, json)?;
        }
        CredentialsCommand::Rotate {
            device,
            admin,
            json,
        } => {
            let admin = admin.admin(&settings)?;
            let c = credentials::rotate(&pool, &admin, &device)
                .await
                .map_err(credential_error)?;
            print_credential(&c, json)?;
        }
        CredentialsCommand::Revoke { device, admin } => {
            let admin = admin.admin(&settings)?;
            let s = credentials::revoke(&pool, &admin, &device)
                .await
                .map_err(credential_error)?;
            println!(
                "device {} credentials revoked (generation {})",
                s.device_id, s.generation
            );
        }
        CredentialsCommand::Show {
            device,
            check,
            admin,
            json,
        } => {
            let status = credentials::status(&pool, &device)
                .await
                .map_err(credential_error)
                .with_context(ctx)?;
            let on_broker = if check {
                let admin = admin.admin(&settings)?;
                let username = status
                    .as_ref()
                    .map(|s| s.username.clone())
                    .unwrap_or_else(|| device.trim().to_string());
                Some(
                    admin
                        .client_state(&username)
                        .await
                        .map_err(credential_error)?,
                )
            } else {
                None
            };
            let broker_text = |b: Option<bool>| match b {
                None => "unknown to the broker",
                Some(false) => "known to the broker",
                Some(true) => "known to the broker, disabled",
            };
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "credentials": status,
                        "broker": on_broker.map(|b| match b {
                            None => "absent",
                            Some(false) => "present",
                            Some(true) => "disabled",
                        }),
                    })
                );
            } else {
                match &status {
                    None => println!("device {} has never had credentials", device.trim()),
                    Some(s) => {
                        let t = |t: chrono::DateTime<chrono::Utc>| {
                            t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
                        };
                        println!("device:     {}", s.device_id);
                        println!("username:   {}", s.username);
                        println!("state:      {}", s.state);
                        println!("generation: {}", s.generation);
                        println!("issued:     {}", t(s.issued_at));
                        println!("rotated:    {}", or_dash(s.rotated_at.map(t)));
                        println!("revoked:    {}", or_dash(s.revoked_at.map(t)));
                    }
                }
                if let Some(b) = on_broker {
                    println!("broker:     {}", broker_text(b));
                }
            }
            if let (Some(s), Some(b)) = (&status, on_broker) {
                if s.is_active() != b.is_some() {
                    eprintln!(
                        "warning: the record says {} but the client is {}: rotate (or revoke) to repair",
                        s.state,
                        broker_text(b)
                    );
                }
            }
        }
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum BrokerCommand {
    /// Prepare a broker running the dynamic-security plugin (deploy/dynsec-init.sh): deny
    /// everything not granted, and create the service account Silverguard logs in with.
    /// Prints the service password when it was generated.
    Setup {
        #[command(flatten)]
        admin: BrokerAdminArgs,
        /// The service account's username (set it as mqtt.username).
        #[arg(long, default_value = "silverguard")]
        service_user: String,
        /// Environment variable holding the service password to set; when unset, one is
        /// generated and printed.
        #[arg(long, default_value = "SILVERGUARD_SERVICE_PASSWORD")]
        service_password_env: String,
    },
}

pub async fn broker(settings: Settings, cmd: BrokerCommand) -> anyhow::Result<()> {
    match cmd {
        BrokerCommand::Setup {
            admin,
            service_user,
            service_password_env,
        } => {
            let admin = admin.admin(&settings)?;
            let given = std::env::var(&service_password_env)
                .ok()
                .filter(|p| !p.is_empty());
            let password = given.clone().unwrap_or_else(credentials::generate_password);
            if service_user.trim().is_empty() {
                bail!("--service-user must not be empty");
            }
            credentials::setup_broker(
                &admin,
                &credentials::ServiceAccount {
                    username: service_user.trim().to_string(),
                    password: password.clone(),
                    topic_filter: settings.mqtt.topic_filter.clone(),
                },
            )
            .await
            .map_err(credential_error)?;
            println!(
                "broker ready: everything not granted is denied; service account {:?} may read {} and send commands",
                service_user.trim(),
                settings.mqtt.topic_filter
            );
            if given.is_none() {
                println!("service password: {password}");
                eprintln!(
                    "set mqtt.username = {:?} and mqtt.password (SILVERGUARD_MQTT__PASSWORD) to it; it is shown only now",
                    service_user.trim()
                );
            }
        }
    }
    Ok(())
}
