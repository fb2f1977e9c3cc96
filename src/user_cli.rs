//! `silverguard user`: console and API accounts (docs/console.md).

use std::io::Read;

use anyhow::{bail, Context};
use clap::Subcommand;
use silverguard::api::auth::{self, NewUser, UserRole};
use silverguard::config::Settings;
use silverguard::store;

#[derive(Subcommand)]
pub enum UserCommand {
    /// Create a user, or update one with the same username (role, regions, password).
    Add {
        username: String,
        /// admin, supervisor, grid_worker or guardian.
        #[arg(long)]
        role: UserRole,
        /// Shown in the console [default: the username].
        #[arg(long)]
        name: Option<String>,
        /// Region code a supervisor oversees or a grid a grid worker covers; repeatable.
        #[arg(long = "region")]
        regions: Vec<String>,
        /// The registry contact this user is (external ref or id); required for guardians.
        #[arg(long)]
        contact: Option<String>,
        /// zh-CN or en.
        #[arg(long)]
        language: Option<String>,
        /// Read the password from stdin (first line) instead of the environment.
        #[arg(long)]
        password_stdin: bool,
        /// Environment variable holding the password.
        #[arg(long, default_value = "SILVERGUARD_NEW_PASSWORD")]
        password_env: String,
    },
    /// All users with their roles and regions.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Set a new password (read like `add`); ends the user's sessions.
    Passwd {
        username: String,
        #[arg(long)]
        password_stdin: bool,
        #[arg(long, default_value = "SILVERGUARD_NEW_PASSWORD")]
        password_env: String,
    },
    /// Disable a user: sessions end and API tokens are revoked at once.
    Disable { username: String },
    /// Enable a disabled user again.
    Enable { username: String },
    /// Issue an API bearer token for a user; printed once, only its hash is kept.
    Token {
        username: String,
        /// What the token is for.
        #[arg(long, default_value = "cli")]
        name: String,
        /// Lifetime (humantime: 30d, 12h) [default: no expiry].
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<std::time::Duration>,
    },
}

fn read_password(stdin: bool, env: &str) -> anyhow::Result<String> {
    if stdin {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s)?;
        let line = s.lines().next().unwrap_or("").to_string();
        if line.is_empty() {
            bail!("no password on stdin");
        }
        return Ok(line);
    }
    std::env::var(env).with_context(|| {
        format!("set the password in ${env}, or pass --password-stdin (never on the command line)")
    })
}

pub async fn run(settings: Settings, cmd: UserCommand) -> anyhow::Result<()> {
    let url = settings.database.url.expose().to_string();
    let pool = store::build_pool(&settings.database)?;
    let ctx = || format!("database {}", store::describe_url(&url));
    match cmd {
        UserCommand::Add {
            username,
            role,
            name,
            regions,
            contact,
            language,
            password_stdin,
            password_env,
        } => {
            let password = read_password(password_stdin, &password_env)?;
            let user = auth::upsert_user(
                &pool,
                &NewUser {
                    username,
                    display_name: name,
                    role,
                    password,
                    regions,
                    contact,
                    language,
                },
            )
            .await
            .with_context(ctx)?;
            println!(
                "user {} ({}) id {} regions [{}]",
                user.username,
                user.role,
                user.id,
                user.regions.join(", ")
            );
        }
        UserCommand::List { json } => {
            let users = auth::list_users(&pool).await.with_context(ctx)?;
            if json {
                for u in users {
                    println!("{}", serde_json::to_string(&u)?);
                }
            } else {
                println!(
                    "{:>5} {:<20} {:<12} {:<6} {:<9} {:<16} regions",
                    "id", "username", "role", "lang", "disabled", "contact"
                );
                for u in users {
                    println!(
                        "{:>5} {:<20} {:<12} {:<6} {:<9} {:<16} {}",
                        u.id,
                        u.username,
                        u.role,
                        u.language,
                        u.disabled,
                        u.contact.as_deref().unwrap_or("-"),
                        u.regions.join(",")
                    );
                }
            }
        }
        UserCommand::Passwd {
            username,
            password_stdin,
            password_env,
        } => {
            let password = read_password(password_stdin, &password_env)?;
            auth::set_password(&pool, &username, &password)
                .await
                .with_context(ctx)?;
            println!("password of {username} changed; their sessions ended");
        }
        UserCommand::Disable { username } => {
            auth::set_disabled(&pool, &username, true)
                .await
                .with_context(ctx)?;
            println!("{username} disabled; sessions ended, tokens revoked");
        }
        UserCommand::Enable { username } => {
            auth::set_disabled(&pool, &username, false)
                .await
                .with_context(ctx)?;
            println!("{username} enabled");
        }
        UserCommand::Token {
            username,
            name,
            ttl,
        } => {
            let user = auth::get_user(&pool, &username).await.with_context(ctx)?;
            let (token, expires) = auth::create_api_token(&pool, user.id, &name, ttl)
                .await
                .with_context(ctx)?;
            eprintln!(
                "token for {username} ({name}), expires {}; shown once:",
                expires
                    .map(|t| t.to_rfc3339())
                    .unwrap_or_else(|| "never".into())
            );
            println!("{token}");
        }
    }
    Ok(())
}
