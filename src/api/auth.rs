//! Who is asking: users, passwords (argon2id), console sessions (cookie + CSRF token), API
//! bearer tokens, login rate limiting, and the audit of personal-data access.
//!
//! Scoping itself lives in the database (`sg_user_elder_ids`, `sg_user_region_ids` in
//! migrations/0004_console.sql) so that the API, the console and any report share one
//! definition of "the elders this user may see"; this module only establishes the user.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, Method};
use base64::Engine;
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_postgres::GenericClient;
use utoipa::ToSchema;

use super::problem::Problem;
use super::ApiState;

/// The console's session cookie.
pub const SESSION_COOKIE: &str = "sg_session";
/// Header carrying the session's CSRF token on state-changing API calls made from the console.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How long a console session lives without being used again.
pub const SESSION_IDLE: Duration = Duration::from_secs(12 * 3600);
/// Prefix of API tokens, so a leaked one is recognisable in a secret scanner.
const TOKEN_PREFIX: &str = "sgt_";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum UserRole {
    Admin,
    Supervisor,
    GridWorker,
    Guardian,
}

impl UserRole {
    pub const ALL: [UserRole; 4] = [
        UserRole::Admin,
        UserRole::Supervisor,
        UserRole::GridWorker,
        UserRole::Guardian,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UserRole::Admin => "admin",
            UserRole::Supervisor => "supervisor",
            UserRole::GridWorker => "grid_worker",
            UserRole::Guardian => "guardian",
        }
    }

    /// Roles whose scope is a set of regions (user_regions).
    pub fn holds_regions(self) -> bool {
        matches!(self, UserRole::Supervisor | UserRole::GridWorker)
    }
}

impl fmt::Display for UserRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for UserRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().replace('-', "_").as_str() {
            "admin" => Ok(UserRole::Admin),
            "supervisor" => Ok(UserRole::Supervisor),
            "grid_worker" => Ok(UserRole::GridWorker),
            "guardian" => Ok(UserRole::Guardian),
            other => Err(format!(
                "unknown role {other:?} (admin, supervisor, grid_worker, guardian)"
            )),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("password hashing: {0}")]
    Hash(String),
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("no such user {0:?}")]
    NoSuchUser(String),
    #[error("no such region {0:?}")]
    NoSuchRegion(String),
    #[error("no such contact {0:?}")]
    NoSuchContact(String),
}

impl From<AuthError> for Problem {
    fn from(e: AuthError) -> Problem {
        match e {
            AuthError::Db(e) => e.into(),
            AuthError::Pool(e) => e.into(),
            AuthError::Invalid { field, message } => Problem::invalid_field(field, message),
            AuthError::NoSuchUser(_) => Problem::not_found("user"),
            AuthError::NoSuchRegion(r) => {
                Problem::invalid_field("regions", format!("no such region {r:?}"))
            }
            AuthError::NoSuchContact(c) => {
                Problem::invalid_field("contact", format!("no such contact {c:?}"))
            }
            e @ AuthError::Hash(_) => Problem::internal(&e),
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Principal {
    pub user_id: i64,
    pub username: String,
    pub display_name: String,
    pub role: UserRole,
    pub language: String,
    #[serde(skip)]
    pub via: AuthVia,
}

#[derive(Debug, Clone, Default)]
pub enum AuthVia {
    /// A console session; state-changing requests must carry its CSRF token.
    Session { csrf_token: String },
    #[default]
    Token,
}

impl Principal {
    pub fn is_admin(&self) -> bool {
        self.role == UserRole::Admin
    }

    /// The CSRF token of the console session, if this caller came with one.
    pub fn csrf_token(&self) -> Option<&str> {
        match &self.via {
            AuthVia::Session { csrf_token } => Some(csrf_token),
            AuthVia::Token => None,
        }
    }

    /// For console forms: the submitted token must be the session's. Bearer callers pass.
    pub fn check_csrf(&self, submitted: Option<&str>) -> Result<(), Problem> {
        match &self.via {
            AuthVia::Token => Ok(()),
            AuthVia::Session { csrf_token } => match submitted {
                Some(s) if constant_time_eq(s.as_bytes(), csrf_token.as_bytes()) => Ok(()),
                _ => Err(Problem::forbidden("missing or wrong CSRF token")),
            },
        }
    }

    pub fn require_admin(&self) -> Result<(), Problem> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(Problem::forbidden("this needs the admin role"))
        }
    }

    pub fn require_role(&self, allowed: &[UserRole]) -> Result<(), Problem> {
        if allowed.contains(&self.role) {
            Ok(())
        } else {
            Err(Problem::forbidden(format!(
                "the {} role may not do this",
                self.role
            )))
        }
    }

    /// Whether the elder is within this user's scope. Callers answer 404 when not, so that
    /// another grid's elders cannot even be probed for.
    pub async fn can_see_elder<C: GenericClient>(
        &self,
        client: &C,
        elder_id: i64,
    ) -> Result<bool, tokio_postgres::Error> {
        let row = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM sg_user_elder_ids($1) AS v(id) WHERE v.id = $2)",
                &[&self.user_id, &elder_id],
            )
            .await?;
        Ok(row.get(0))
    }

    /// Whether the region is within this user's scope.
    pub async fn can_see_region<C: GenericClient>(
        &self,
        client: &C,
        region_id: i64,
    ) -> Result<bool, tokio_postgres::Error> {
        let row = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM sg_user_region_ids($1) AS v(id) WHERE v.id = $2)",
                &[&self.user_id, &region_id],
            )
            .await?;
        Ok(row.get(0))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn random_secret(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf)
}

fn sha256(s: &str) -> Vec<u8> {
    Sha256::digest(s.as_bytes()).to_vec()
}

/// argon2id with the crate's default (OWASP-recommended) parameters. Runs on the blocking pool:
/// a hash costs tens of milliseconds of CPU, which must not stall the runtime.
pub async fn hash_password(password: String) -> Result<String, AuthError> {
    check_password_strength(&password)?;
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| AuthError::Hash(e.to_string()))
    })
    .await
    .map_err(|e| AuthError::Hash(e.to_string()))?
}

pub fn check_password_strength(password: &str) -> Result<(), AuthError> {
    let n = password.chars().count();
    if n < 8 {
        return Err(AuthError::Invalid {
            field: "password",
            message: "at least 8 characters".into(),
        });
    }
    if n > 256 {
        return Err(AuthError::Invalid {
            field: "password",
            message: "at most 256 characters".into(),
        });
    }
    Ok(())
}

/// A hash to verify against when the user does not exist, so that timing does not tell
/// which usernames exist. Made once per process from a random password.
fn dummy_hash() -> String {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY
        .get_or_init(|| {
            let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
            Argon2::default()
                .hash_password(random_secret(16).as_bytes(), &salt)
                .map(|h| h.to_string())
                .unwrap_or_default()
        })
        .clone()
}

async fn verify_password(hash: String, password: String) -> bool {
    tokio::task::spawn_blocking(move || {
        let hash = if hash.is_empty() { dummy_hash() } else { hash };
        let parsed = match PasswordHash::new(&hash) {
            Ok(p) => p,
            Err(_) => return false,
        };
        Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    })
    .await
    .unwrap_or(false)
}

/// Failed logins per (username, client) in a sliding window; past the limit, logins for that
/// key are refused until the window passes, whatever the password.
pub struct LoginLimiter {
    max_failures: usize,
    window: Duration,
    failures: Mutex<HashMap<String, Vec<Instant>>>,
}

impl Default for LoginLimiter {
    fn default() -> Self {
        LoginLimiter::new(5, Duration::from_secs(15 * 60))
    }
}

impl LoginLimiter {
    pub fn new(max_failures: usize, window: Duration) -> Self {
        LoginLimiter {
            max_failures,
            window,
            failures: Mutex::new(HashMap::new()),
        }
    }

    fn key(username: &str, client: &str) -> String {
        format!("{}|{}", username.trim().to_lowercase(), client)
    }

    /// Seconds to wait when the key is locked out.
    pub fn blocked_for(&self, username: &str, client: &str) -> Option<u64> {
        let now = Instant::now();
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let list = map.get_mut(&Self::key(username, client))?;
        list.retain(|t| now.duration_since(*t) < self.window);
        if list.len() >= self.max_failures {
            let oldest = list.first().copied().unwrap_or(now);
            Some(
                self.window
                    .saturating_sub(now.duration_since(oldest))
                    .as_secs()
                    .max(1),
            )
        } else {
            None
        }
    }

    pub fn failed(&self, username: &str, client: &str) {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        // Bound the memory an attacker can make us hold with random usernames.
        if map.len() > 100_000 {
            let now = Instant::now();
            map.retain(|_, l| {
                l.last()
                    .is_some_and(|t| now.duration_since(*t) < self.window)
            });
        }
        map.entry(Self::key(username, client))
            .or_default()
            .push(Instant::now());
    }

    pub fn succeeded(&self, username: &str, client: &str) {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(&Self::key(username, client));
    }
}

#[derive(Debug)]
pub enum LoginError {
    /// Wrong username or password (not said which).
    Rejected,
    RateLimited {
        retry_after_s: u64,
    },
    Failed(AuthError),
}

impl From<LoginError> for Problem {
    fn from(e: LoginError) -> Problem {
        match e {
            LoginError::Rejected => Problem::new(
                axum::http::StatusCode::UNAUTHORIZED,
                "Wrong username or password",
            )
            .typed("login-failed"),
            LoginError::RateLimited { retry_after_s } => Problem::too_many(format!(
                "too many failed logins; try again in {retry_after_s} s"
            )),
            LoginError::Failed(e) => e.into(),
        }
    }
}

const PRINCIPAL_COLUMNS: &str = "u.id, u.username, u.display_name, u.role, u.language";

fn principal_from_row(r: &tokio_postgres::Row, via: AuthVia) -> Option<Principal> {
    Some(Principal {
        user_id: r.get(0),
        username: r.get(1),
        display_name: r.get(2),
        role: r.get::<_, String>(3).parse().ok()?,
        language: r.get(4),
        via,
    })
}

/// The client's address, which keys the login rate limit. Behind a reverse proxy every
/// request comes from the proxy, so when the peer is one of `trusted` proxies the address is
/// taken from `X-Forwarded-For`: the right-most entry that is not itself a trusted proxy
/// (entries further left were written by the client and prove nothing).
pub fn client_addr(
    peer: Option<std::net::SocketAddr>,
    headers: &axum::http::HeaderMap,
    trusted: &[std::net::IpAddr],
) -> String {
    let Some(peer) = peer.map(|p| p.ip()) else {
        return "unknown".into();
    };
    if !trusted.contains(&peer) {
        return peer.to_string();
    }
    let forwarded = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect::<Vec<_>>();
    for hop in forwarded.iter().rev() {
        match hop.parse::<std::net::IpAddr>() {
            Ok(ip) if trusted.contains(&ip) => continue,
            Ok(ip) => return ip.to_string(),
            // Garbage where an address should be: stop believing the header here.
            Err(_) => break,
        }
    }
    peer.to_string()
}

/// Checks a username and password; `client` (the peer address) keys the rate limit.
pub async fn login(
    pool: &Pool,
    limiter: &LoginLimiter,
    username: &str,
    password: &str,
    client: &str,
) -> Result<Principal, LoginError> {
    if let Some(retry_after_s) = limiter.blocked_for(username, client) {
        tracing::warn!(username_ref = %username_ref(username), client, "login refused: rate limited");
        return Err(LoginError::RateLimited { retry_after_s });
    }
    // No username holds a NUL (users.username is checked), and the database cannot compare
    // one: a wrong login, not a failure.
    if username.contains('\0') {
        limiter.failed(username, client);
        return Err(LoginError::Rejected);
    }
    let db = pool.get().await.map_err(|e| LoginError::Failed(e.into()))?;
    let row = db
        .query_opt(
            &format!(
                "SELECT {PRINCIPAL_COLUMNS}, u.password_hash FROM users u
                 WHERE lower(u.username) = lower($1) AND NOT u.disabled"
            ),
            &[&username.trim()],
        )
        .await
        .map_err(|e| LoginError::Failed(e.into()))?;
    let hash = row
        .as_ref()
        .map(|r| r.get::<_, String>(5))
        .unwrap_or_default();
    let known = row.is_some();
    let ok = verify_password(hash, password.to_string()).await && known;
    match row
        .filter(|_| ok)
        .and_then(|r| principal_from_row(&r, AuthVia::Token))
    {
        Some(p) => {
            limiter.succeeded(username, client);
            tracing::info!(user_id = p.user_id, username = %p.username, "login");
            Ok(p)
        }
        None => {
            limiter.failed(username, client);
            if known {
                tracing::warn!(username = username.trim(), client, "login failed");
            } else {
                // Not an account: often a password typed into the wrong field, so the text
                // itself is never logged; the reference still ties repeated attempts together.
                tracing::warn!(username_ref = %username_ref(username), client, "login failed: no such user");
            }
            Err(LoginError::Rejected)
        }
    }
}

/// A stable, non-reversible stand-in for a login name that may not be one (8 hex digits of
/// its SHA-256), so failed attempts can be correlated in the log without recording what
/// was typed.
pub fn username_ref(username: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(username.trim().to_lowercase().as_bytes());
    digest[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// A new console session: (cookie value, CSRF token).
pub async fn create_session(pool: &Pool, user_id: i64) -> Result<(String, String), AuthError> {
    let token = random_secret(32);
    let csrf = random_secret(24);
    let db = pool.get().await?;
    db.execute(
        "INSERT INTO user_sessions (token_hash, user_id, csrf_token, expires_at)
         VALUES ($1, $2, $3, now() + make_interval(secs => $4))",
        &[
            &sha256(&token),
            &user_id,
            &csrf,
            &(SESSION_IDLE.as_secs() as f64),
        ],
    )
    .await?;
    // Expired sessions of anyone are swept now and then, here rather than by a timer.
    if rand::random::<u8>() < 8 {
        db.execute("DELETE FROM user_sessions WHERE expires_at < now()", &[])
            .await?;
    }
    Ok((token, csrf))
}

pub async fn end_session(pool: &Pool, token: &str) -> Result<(), AuthError> {
    let db = pool.get().await?;
    db.execute(
        "DELETE FROM user_sessions WHERE token_hash = $1",
        &[&sha256(token)],
    )
    .await?;
    Ok(())
}

/// The `Set-Cookie` value for a session (`secure` when the console is served over HTTPS).
pub fn session_cookie(token: &str, secure: bool) -> String {
    format!(
        "{SESSION_COOKIE}={token}; Path=/; HttpOnly; SameSite=Lax; Max-Age={}{}",
        SESSION_IDLE.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

pub fn clear_session_cookie(secure: bool) -> String {
    format!(
        "{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0{}",
        if secure { "; Secure" } else { "" }
    )
}

/// A new API token for a user; only its hash is kept, so it is shown once.
pub async fn create_api_token(
    pool: &Pool,
    user_id: i64,
    name: &str,
    ttl: Option<Duration>,
) -> Result<(String, Option<DateTime<Utc>>), AuthError> {
    let token = format!("{TOKEN_PREFIX}{}", random_secret(32));
    let db = pool.get().await?;
    let row = db
        .query_one(
            "INSERT INTO api_tokens (user_id, name, token_hash, expires_at)
             VALUES ($1, $2, $3, CASE WHEN $4::float8 IS NULL THEN NULL
                                      ELSE now() + make_interval(secs => $4) END)
             RETURNING expires_at",
            &[
                &user_id,
                &name,
                &sha256(&token),
                &ttl.map(|d| d.as_secs_f64()),
            ],
        )
        .await?;
    Ok((token, row.get(0)))
}

pub async fn revoke_api_token(pool: &Pool, token: &str) -> Result<bool, AuthError> {
    let db = pool.get().await?;
    let n = db
        .execute(
            "UPDATE api_tokens SET revoked_at = now() WHERE token_hash = $1 AND revoked_at IS NULL",
            &[&sha256(token)],
        )
        .await?;
    Ok(n > 0)
}

fn cookie_value<'a>(parts: &'a Parts, name: &str) -> Option<&'a str> {
    parts
        .headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn bearer(parts: &Parts) -> Option<&str> {
    let v = parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// The caller, from a bearer token or a session cookie; None when neither is valid.
pub async fn authenticate(pool: &Pool, parts: &Parts) -> Result<Option<Principal>, Problem> {
    if let Some(token) = bearer(parts) {
        let db = pool.get().await?;
        let row = db
            .query_opt(
                &format!(
                    "UPDATE api_tokens t SET last_used_at = now()
                       FROM users u
                      WHERE t.token_hash = $1 AND u.id = t.user_id AND NOT u.disabled
                        AND t.revoked_at IS NULL AND (t.expires_at IS NULL OR t.expires_at > now())
                     RETURNING {PRINCIPAL_COLUMNS}"
                ),
                &[&sha256(token)],
            )
            .await?;
        return Ok(row.and_then(|r| principal_from_row(&r, AuthVia::Token)));
    }
    if let Some(token) = cookie_value(parts, SESSION_COOKIE) {
        let db = pool.get().await?;
        // Sliding expiry: each use extends the session by the idle time.
        let row = db
            .query_opt(
                &format!(
                    "UPDATE user_sessions s
                        SET last_seen_at = now(),
                            expires_at = now() + make_interval(secs => $2)
                       FROM users u
                      WHERE s.token_hash = $1 AND u.id = s.user_id AND NOT u.disabled
                        AND s.expires_at > now()
                     RETURNING {PRINCIPAL_COLUMNS}, s.csrf_token"
                ),
                &[&sha256(token), &(SESSION_IDLE.as_secs() as f64)],
            )
            .await?;
        return Ok(row.and_then(|r| {
            let csrf_token: String = r.get(5);
            principal_from_row(&r, AuthVia::Session { csrf_token })
        }));
    }
    Ok(None)
}

fn is_unsafe(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// For `/api/v1`: 401 without credentials; a console session calling a state-changing
/// endpoint must send its CSRF token in `X-CSRF-Token`.
impl FromRequestParts<Arc<ApiState>> for Principal {
    type Rejection = Problem;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<ApiState>,
    ) -> Result<Self, Self::Rejection> {
        let principal = authenticate(&state.pool, parts)
            .await?
            .ok_or_else(Problem::unauthorized)?;
        if is_unsafe(&parts.method) {
            let submitted = parts.headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
            principal.check_csrf(submitted)?;
        }
        Ok(principal)
    }
}

/// Records that a user looked at or changed an elder's record.
pub async fn audit<C: GenericClient>(
    client: &C,
    who: &Principal,
    action: &str,
    elder_id: Option<i64>,
    detail: serde_json::Value,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO access_audit (user_id, username, action, elder_id, detail)
             VALUES ($1, $2, $3, $4, $5)",
            &[&who.user_id, &who.username, &action, &elder_id, &detail],
        )
        .await?;
    Ok(())
}

/// A user as the admin CLI and API see it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct User {
    pub id: i64,
    pub username: String,
    pub display_name: String,
    pub role: UserRole,
    pub language: String,
    pub disabled: bool,
    /// Region codes a supervisor oversees or a grid worker covers.
    pub regions: Vec<String>,
    /// The registry contact this user is (its external ref, else its id).
    pub contact: Option<String>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct NewUser {
    pub username: String,
    pub display_name: Option<String>,
    pub role: UserRole,
    pub password: String,
    #[serde(default)]
    pub regions: Vec<String>,
    /// Contact external ref or numeric id (guardians: whose elders they see).
    pub contact: Option<String>,
    pub language: Option<String>,
}

fn validate_new_user(u: &NewUser) -> Result<(), AuthError> {
    let name_ok = (2..=64).contains(&u.username.len())
        && u.username
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.@-".contains(c));
    if !name_ok {
        return Err(AuthError::Invalid {
            field: "username",
            message: "2-64 characters of A-Z a-z 0-9 _ . @ -".into(),
        });
    }
    if let Some(l) = &u.language {
        if l != "zh-CN" && l != "en" {
            return Err(AuthError::Invalid {
                field: "language",
                message: "zh-CN or en".into(),
            });
        }
    }
    if u.role.holds_regions() && u.regions.is_empty() {
        return Err(AuthError::Invalid {
            field: "regions",
            message: format!("a {} needs at least one region", u.role),
        });
    }
    if !u.role.holds_regions() && !u.regions.is_empty() {
        return Err(AuthError::Invalid {
            field: "regions",
            message: format!("a {} holds no regions", u.role),
        });
    }
    if u.role == UserRole::Guardian && u.contact.is_none() {
        return Err(AuthError::Invalid {
            field: "contact",
            message: "a guardian must be linked to their registry contact".into(),
        });
    }
    check_password_strength(&u.password)
}

/// Creates a user, or replaces the role, regions, contact and password of an existing one
/// with the same username (so a seeding script can be rerun).
pub async fn upsert_user(pool: &Pool, u: &NewUser) -> Result<User, AuthError> {
    validate_new_user(u)?;
    let hash = hash_password(u.password.clone()).await?;
    let mut db = pool.get().await?;
    let tx = db.transaction().await?;
    let contact_id: Option<i64> = match &u.contact {
        None => None,
        Some(c) => {
            let row = tx
                .query_opt(
                    "SELECT id FROM contacts WHERE external_ref = $1 OR id::text = $1
                     ORDER BY (external_ref = $1) DESC LIMIT 1",
                    &[&c.trim()],
                )
                .await?;
            Some(
                row.map(|r| r.get(0))
                    .ok_or_else(|| AuthError::NoSuchContact(c.clone()))?,
            )
        }
    };
    let row = tx
        .query_one(
            "INSERT INTO users (username, display_name, role, password_hash, contact_id, language)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (username) DO UPDATE SET
                display_name = EXCLUDED.display_name, role = EXCLUDED.role,
                password_hash = EXCLUDED.password_hash, contact_id = EXCLUDED.contact_id,
                language = EXCLUDED.language, disabled = false, updated_at = now()
             RETURNING id",
            &[
                &u.username,
                &u.display_name.clone().unwrap_or_else(|| u.username.clone()),
                &u.role.as_str(),
                &hash,
                &contact_id,
                &u.language.clone().unwrap_or_else(|| "zh-CN".into()),
            ],
        )
        .await?;
    let id: i64 = row.get(0);
    tx.execute("DELETE FROM user_regions WHERE user_id = $1", &[&id])
        .await?;
    for code in &u.regions {
        let n = tx
            .execute(
                "INSERT INTO user_regions (user_id, region_id)
                 SELECT $1, id FROM regions WHERE code = $2",
                &[&id, &code.trim()],
            )
            .await?;
        if n == 0 {
            return Err(AuthError::NoSuchRegion(code.clone()));
        }
    }
    // A changed password or role ends the user's sessions.
    tx.execute("DELETE FROM user_sessions WHERE user_id = $1", &[&id])
        .await?;
    tx.commit().await?;
    get_user(pool, &u.username).await
}

const USER_SELECT: &str = "SELECT u.id, u.username, u.display_name, u.role, u.language,
        u.disabled,
        coalesce(array(SELECT r.code FROM user_regions ur JOIN regions r ON r.id = ur.region_id
                        WHERE ur.user_id = u.id ORDER BY r.code), '{}'),
        (SELECT coalesce(c.external_ref, c.id::text) FROM contacts c WHERE c.id = u.contact_id)
   FROM users u";

fn user_from_row(r: &tokio_postgres::Row) -> User {
    User {
        id: r.get(0),
        username: r.get(1),
        display_name: r.get(2),
        role: r.get::<_, String>(3).parse().unwrap_or(UserRole::Guardian),
        language: r.get(4),
        disabled: r.get(5),
        regions: r.get(6),
        contact: r.get(7),
    }
}

pub async fn get_user(pool: &Pool, username: &str) -> Result<User, AuthError> {
    let db = pool.get().await?;
    let row = db
        .query_opt(
            &format!("{USER_SELECT} WHERE lower(u.username) = lower($1)"),
            &[&username],
        )
        .await?;
    row.map(|r| user_from_row(&r))
        .ok_or_else(|| AuthError::NoSuchUser(username.into()))
}

pub async fn list_users(pool: &Pool) -> Result<Vec<User>, AuthError> {
    let db = pool.get().await?;
    let rows = db
        .query(&format!("{USER_SELECT} ORDER BY u.username"), &[])
        .await?;
    Ok(rows.iter().map(user_from_row).collect())
}

pub async fn set_password(pool: &Pool, username: &str, password: &str) -> Result<(), AuthError> {
    let hash = hash_password(password.to_string()).await?;
    let mut db = pool.get().await?;
    let tx = db.transaction().await?;
    let id: i64 = tx
        .query_opt(
            "UPDATE users SET password_hash = $2, updated_at = now()
              WHERE lower(username) = lower($1) RETURNING id",
            &[&username, &hash],
        )
        .await?
        .ok_or_else(|| AuthError::NoSuchUser(username.into()))?
        .get(0);
    // A new password ends every session made with the old one.
    tx.execute("DELETE FROM user_sessions WHERE user_id = $1", &[&id])
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Disables (or re-enables) a user; disabling ends their sessions and tokens at once.
pub async fn set_disabled(pool: &Pool, username: &str, disabled: bool) -> Result<(), AuthError> {
    let db = pool.get().await?;
    let row = db
        .query_opt(
            "UPDATE users SET disabled = $2, updated_at = now()
              WHERE lower(username) = lower($1) RETURNING id",
            &[&username, &disabled],
        )
        .await?
        .ok_or_else(|| AuthError::NoSuchUser(username.into()))?;
    let id: i64 = row.get(0);
    if disabled {
        db.execute("DELETE FROM user_sessions WHERE user_id = $1", &[&id])
            .await?;
        db.execute(
            "UPDATE api_tokens SET revoked_at = now() WHERE user_id = $1 AND revoked_at IS NULL",
            &[&id],
        )
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn client_addr_believes_forwarded_for_only_from_trusted_proxies() {
        use axum::http::HeaderMap;
        let proxy: std::net::IpAddr = "127.0.0.1".parse().unwrap();
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", "6.6.6.6, 203.0.113.7".parse().unwrap());
        let from = |ip: &str| Some(std::net::SocketAddr::new(ip.parse().unwrap(), 4000));
        // Not behind a proxy: the header is the client's own claim.
        assert_eq!(
            super::client_addr(from("198.51.100.1"), &h, &[proxy]),
            "198.51.100.1"
        );
        assert_eq!(super::client_addr(from("127.0.0.1"), &h, &[]), "127.0.0.1");
        // Behind the proxy: the address the proxy saw, not what the client wrote before it.
        assert_eq!(
            super::client_addr(from("127.0.0.1"), &h, &[proxy]),
            "203.0.113.7"
        );
        // Chained trusted proxies are skipped.
        let mut h2 = HeaderMap::new();
        h2.append("x-forwarded-for", "203.0.113.7, 127.0.0.1".parse().unwrap());
        assert_eq!(
            super::client_addr(from("127.0.0.1"), &h2, &[proxy]),
            "203.0.113.7"
        );
        // Garbage: fall back to the proxy itself (one bucket, still limited).
        let mut h3 = HeaderMap::new();
        h3.append("x-forwarded-for", "not-an-ip".parse().unwrap());
        assert_eq!(
            super::client_addr(from("127.0.0.1"), &h3, &[proxy]),
            "127.0.0.1"
        );
        assert_eq!(super::client_addr(None, &h, &[proxy]), "unknown");
    }

    use super::*;

    #[test]
    fn roles_parse_both_spellings() {
        assert_eq!("grid-worker".parse::<UserRole>(), Ok(UserRole::GridWorker));
        assert_eq!("Admin".parse::<UserRole>(), Ok(UserRole::Admin));
        assert!("root".parse::<UserRole>().is_err());
    }

    #[test]
    fn limiter_locks_after_failures_and_forgets_on_success() {
        let l = LoginLimiter::new(3, Duration::from_secs(60));
        for _ in 0..2 {
            l.failed("Wang", "1.2.3.4");
        }
        assert!(l.blocked_for("wang", "1.2.3.4").is_none());
        l.failed("wang", "1.2.3.4");
        assert!(l.blocked_for("WANG", "1.2.3.4").is_some());
        // Another client is not locked out by someone else's guesses.
        assert!(l.blocked_for("wang", "5.6.7.8").is_none());
        l.succeeded("wang", "1.2.3.4");
        assert!(l.blocked_for("wang", "1.2.3.4").is_none());
    }

    #[tokio::test]
    async fn password_hash_verifies_and_rejects() {
        let h = hash_password("correct horse".into()).await.unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password(h.clone(), "correct horse".into()).await);
        assert!(!verify_password(h, "wrong horse!".into()).await);
        assert!(!verify_password("garbage".into(), "x".into()).await);
        assert!(hash_password("short".into()).await.is_err());
    }

    #[test]
    fn csrf_is_checked_for_sessions_only() {
        let mut p = Principal {
            user_id: 1,
            username: "a".into(),
            display_name: "a".into(),
            role: UserRole::Admin,
            language: "en".into(),
            via: AuthVia::Token,
        };
        assert!(p.check_csrf(None).is_ok());
        p.via = AuthVia::Session {
            csrf_token: "abc".into(),
        };
        assert!(p.check_csrf(None).is_err());
        assert!(p.check_csrf(Some("abd")).is_err());
        assert!(p.check_csrf(Some("abc")).is_ok());
    }
}
