//! Settings: a TOML file (`SILVERGUARD_CONFIG`) overlaid with `SILVERGUARD_*` environment
//! variables, validated once at start so a bad value is reported before anything connects.
//!
//! Environment names: the four documented contract variables (`SILVERGUARD_DATABASE_URL`,
//! `SILVERGUARD_MQTT_URL`, `SILVERGUARD_HTTP_ADDR`, `SILVERGUARD_SMTP_URL`) map to
//! `database.url`, `mqtt.url`, `http.addr` and `notify.email.url`; every other setting is
//! `SILVERGUARD_<SECTION>__<KEY>` (double underscore), e.g. `SILVERGUARD_INGEST__BATCH_MAX_ROWS`.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

/// Why the configuration cannot be used; the message names the setting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {source}")]
    Parse {
        path: String,
        source: Box<toml::de::Error>,
    },
    #[error("invalid configuration: {0}")]
    Shape(Box<toml::de::Error>),
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

/// A string that never prints: passwords, tokens, URLs with credentials.
#[derive(Clone, Deserialize, Default, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub mqtt: MqttSettings,
    pub ingest: IngestSettings,
    pub storage: StorageSettings,
    pub http: HttpSettings,
    pub log: LogSettings,
    pub runtime: RuntimeSettings,
    pub alerts: crate::alerts::settings::AlertSettings,
    pub notify: crate::notify::settings::NotifySettings,
    /// The broker's dynamic-security admin, for device credentials (docs/device-credentials.md).
    pub broker_admin: crate::store::credentials::BrokerAdminSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSettings {
    /// libpq-style URL, e.g. `postgres://postgres@127.0.0.1:5432/silverguard`.
    pub url: Secret,
    /// Connections in the shared pool (events, presence, rejects, upkeep, API).
    pub pool_size: usize,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        DatabaseSettings {
            url: Secret::new("postgres://postgres@127.0.0.1:5432/silverguard"),
            pool_size: 8,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttSettings {
    /// `mqtt://host:port`, or `mqtts://host:port` for TLS.
    pub url: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// Stable identity of this instance; connection `i` uses `{client_id}-{i}`. It must be
    /// stable across restarts, because the broker keeps the persistent session under it.
    pub client_id: String,
    /// Parallel MQTT connections of this instance, each with its own in-flight window.
    /// More than one needs `shared_group`, so the broker splits messages between them.
    pub connections: usize,
    /// MQTT 5 receive maximum per connection: how many unacknowledged QoS 1 messages the
    /// broker may send us. Acks are held until commit, so this bounds throughput.
    pub receive_maximum: u16,
    /// Shared subscription group (`$share/<group>/...`); empty for a plain subscription.
    pub shared_group: String,
    /// Topic filter to subscribe to. Broader than the device topics on purpose, so that a
    /// publish outside the scheme is seen, rejected and counted rather than ignored.
    pub topic_filter: String,
    /// How long the broker keeps our session (and queues messages) while we are away.
    #[serde(with = "humantime_serde")]
    pub session_expiry: Duration,
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    /// Largest packet we accept from the broker; larger ones the broker must drop (MQTT 5).
    pub max_packet_bytes: u32,
    /// Read coalescing on the heartbeat connections (plain TCP only): the socket wakes the
    /// reader only once `read_coalesce_bytes` are waiting, and the reader looks anyway after
    /// this long after it finished handling the previous read. Spares silverguard a wake-up
    /// for nearly every message the broker writes (docs/performance.md, "tenth round"); a
    /// message may wait about this long in the kernel, and an idle connection looks this
    /// often. `0s` turns it off. The event connection (SOS) always reads at once.
    #[serde(with = "humantime_serde")]
    pub read_coalesce: Duration,
    /// How many bytes wake the reader of a heartbeat connection (`SO_RCVLOWAT`) when
    /// `read_coalesce` is on.
    pub read_coalesce_bytes: u32,
    /// Path of a PEM CA bundle for `mqtts://` (required with `mqtts://`).
    pub ca_file: Option<String>,
}

impl Default for MqttSettings {
    fn default() -> Self {
        MqttSettings {
            url: "mqtt://127.0.0.1:1883".into(),
            username: None,
            password: None,
            client_id: default_client_id(),
            connections: 1,
            // Two full heartbeat batches in flight: one fills while the other commits.
            receive_maximum: 4000,
            // Plain subscription by default: Mosquitto 2.0 does not restore shared
            // subscriptions from persistence, so a broker restart loses messages for them
            // (docs/deployment.md). Set a group to split load across instances.
            shared_group: String::new(),
            topic_filter: "sg/#".into(),
            session_expiry: Duration::from_secs(7 * 24 * 3600),
            keep_alive: Duration::from_secs(30),
            max_packet_bytes: 1024 * 1024,
            read_coalesce: Duration::from_millis(5),
            read_coalesce_bytes: 32 * 1024,
            ca_file: None,
        }
    }
}

fn default_client_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "local".into());
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(40)
        .collect();
    format!("silverguard-{host}")
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestSettings {
    /// A heartbeat batch is written when it has this many rows...
    pub batch_max_rows: usize,
    /// ...or when its oldest row has waited this long.
    #[serde(with = "humantime_serde")]
    pub batch_max_delay: Duration,
    /// Parallel COPY writers (each holds one database connection while writing).
    pub writers: usize,
    /// Payloads above this size are rejected as `oversized`.
    pub max_payload_bytes: usize,
    /// A device timestamp further ahead than this is flagged as clock skew.
    #[serde(with = "humantime_serde")]
    pub max_clock_ahead: Duration,
    /// A device timestamp further behind than this is flagged as clock skew. Bracelets buffer
    /// readings while out of coverage and upload them later, so this is generous.
    #[serde(with = "humantime_serde")]
    pub max_clock_behind: Duration,
    /// How often pending `device_latest` writes (first sight, events, presence, refreshes)
    /// are flushed.
    #[serde(with = "humantime_serde")]
    pub latest_flush_interval: Duration,
    /// A device's `device_latest` snapshot is rewritten for its heartbeats at most this
    /// often. Readers see the newest heartbeat anyway (view `device_current`) and the silence
    /// sweeper moves deadlines itself; the refresh keeps the snapshot close for when a
    /// device's heartbeats are gone (retention) and heals a row deleted under a running
    /// process. Zero writes every heartbeat, as before migration 0007.
    #[serde(with = "humantime_serde")]
    pub latest_refresh: Duration,
    /// At most this many rows are kept in `ingest_rejects` (oldest trimmed first).
    pub rejects_keep_rows: i64,
    /// Raw bytes stored per reject; longer payloads are truncated (their size is kept).
    pub reject_payload_keep_bytes: usize,
}

impl Default for IngestSettings {
    fn default() -> Self {
        IngestSettings {
            batch_max_rows: 2000,
            batch_max_delay: Duration::from_millis(50),
            writers: 2,
            max_payload_bytes: 4096,
            max_clock_ahead: Duration::from_secs(5 * 60),
            max_clock_behind: Duration::from_secs(7 * 24 * 3600),
            latest_flush_interval: Duration::from_secs(1),
            latest_refresh: Duration::from_secs(300),
            rejects_keep_rows: 100_000,
            reject_payload_keep_bytes: 2048,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSettings {
    /// Daily heartbeat partitions are created this many days ahead.
    pub partitions_ahead_days: u32,
    /// How often partition upkeep and reject trimming run (once across all instances).
    #[serde(with = "humantime_serde")]
    pub upkeep_interval: Duration,
    /// Heartbeats are kept this many days, then their daily partition is dropped; 0 keeps
    /// them forever. Events, alerts and the audit trail are not affected.
    pub heartbeat_retention_days: u32,
}

impl Default for StorageSettings {
    fn default() -> Self {
        StorageSettings {
            partitions_ahead_days: 7,
            upkeep_interval: Duration::from_secs(600),
            heartbeat_retention_days: 0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    pub addr: String,
    /// Mark session cookies `Secure`. Set it when the console is reached over HTTPS (directly
    /// or through a TLS-terminating proxy); browsers then never send the cookie in clear.
    pub cookie_secure: bool,
    /// Addresses of reverse proxies in front of this service (e.g. `["127.0.0.1"]` for nginx
    /// on the same host). Only from these is `X-Forwarded-For` believed, to find the client
    /// address that keys the login rate limit; from anyone else it is ignored, so a client
    /// cannot dodge the limit by sending the header itself.
    #[serde(deserialize_with = "ip_list")]
    pub trusted_proxies: Vec<std::net::IpAddr>,
}

/// A list of IP addresses from TOML (`["127.0.0.1", "::1"]`) or from an environment
/// variable, where a list can only be a string (`127.0.0.1,::1`).
fn ip_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<std::net::IpAddr>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        Many(Vec<String>),
        Joined(String),
    }
    let items = match OneOrMany::deserialize(d)? {
        OneOrMany::Many(v) => v,
        OneOrMany::Joined(s) => s.split(',').map(str::to_string).collect(),
    };
    items
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse().map_err(|_| {
                serde::de::Error::custom(format!(
                    "http.trusted_proxies: {s:?} is not an IP address (list addresses, not names or networks)"
                ))
            })
        })
        .collect()
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            addr: "127.0.0.1:8080".into(),
            cookie_secure: false,
            trusted_proxies: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `silverguard=debug,info`; `RUST_LOG` wins.
    pub filter: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            format: LogFormat::Human,
            // tokio_postgres logs server NOTICEs at info; they are noise here.
            filter: "info,tokio_postgres=warn".into(),
        }
    }
}

/// The async runtime the binary builds before it does anything else.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeSettings {
    /// Threads that run Silverguard's tasks; 0 means one per CPU core (tokio's default, or
    /// `TOKIO_WORKER_THREADS`). One is the default: on a small node that Silverguard shares
    /// with PostgreSQL and the broker, a second worker mostly adds cross-thread wake-ups
    /// (measured: 1.7x the CPU per heartbeat, docs/performance.md). Blocking work (password
    /// hashing) runs on tokio's separate blocking pool, never on these threads.
    pub worker_threads: usize,
}

impl Default for RuntimeSettings {
    fn default() -> Self {
        RuntimeSettings { worker_threads: 1 }
    }
}

/// Contract variables named in DESIGN.md, and the setting each one sets.
const CONTRACT_ENV: &[(&str, &str)] = &[
    ("SILVERGUARD_DATABASE_URL", "database.url"),
    ("SILVERGUARD_MQTT_URL", "mqtt.url"),
    ("SILVERGUARD_HTTP_ADDR", "http.addr"),
    ("SILVERGUARD_SMTP_URL", "notify.email.url"),
];

/// Variables that are read elsewhere and are not settings.
const NOT_SETTINGS: &[&str] = &["SILVERGUARD_CONFIG", "SILVERGUARD_BIN"];

impl Settings {
    /// Loads the file (if any), overlays the environment, and validates.
    pub fn load(path: Option<&Path>) -> Result<Settings, ConfigError> {
        Self::load_from(path, std::env::vars())
    }

    pub fn load_from(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let settings = Self::load_unvalidated(path, env)?;
        settings.validate()?;
        Ok(settings)
    }

    /// Like [`Settings::load_from`] without the final validation, for callers that apply
    /// command-line flags on top and validate after.
    pub fn load_unvalidated(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let mut table = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.display().to_string(),
                    source,
                })?;
                text.parse::<toml::Table>()
                    .map_err(|source| ConfigError::Parse {
                        path: p.display().to_string(),
                        source: Box::new(source),
                    })?
            }
            None => toml::Table::new(),
        };
        let mut env: Vec<(String, String)> = env.into_iter().collect();
        env.sort();
        for (key, value) in env {
            let Some(rest) = key.strip_prefix("SILVERGUARD_") else {
                continue;
            };
            if NOT_SETTINGS.contains(&key.as_str()) {
                continue;
            }
            let path: Vec<String> =
                if let Some((_, p)) = CONTRACT_ENV.iter().find(|(k, _)| *k == key) {
                    p.split('.').map(str::to_string).collect()
                } else if rest.contains("__") {
                    rest.split("__").map(|s| s.to_ascii_lowercase()).collect()
                } else {
                    // Not SECTION__KEY: a variable of some other tool (SILVERGUARD_TEST_*).
                    continue;
                };
            insert_path(&mut table, &path, env_value(&value));
        }
        let mut settings: Settings = toml::Value::Table(table)
            .try_into()
            .map_err(|e| ConfigError::Shape(Box::new(e)))?;
        settings.alerts.fill_defaults();
        Ok(settings)
    }

    /// Checks every setting and reports all problems at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if let Err(e) = self.database.url.expose().parse::<tokio_postgres::Config>() {
            problems.push(format!(
                "database.url (SILVERGUARD_DATABASE_URL) is not a valid libpq URL: {e}"
            ));
        }
        if self.database.pool_size < 2 {
            problems.push("database.pool_size must be at least 2".into());
        }
        match url::Url::parse(&self.mqtt.url) {
            Ok(u) if matches!(u.scheme(), "mqtt" | "mqtts" | "tcp" | "ssl") => {
                if u.host_str().is_none() {
                    problems.push(format!("mqtt.url {} has no host", self.mqtt.url));
                }
            }
            Ok(u) => problems.push(format!(
                "mqtt.url (SILVERGUARD_MQTT_URL) must start with mqtt:// or mqtts://, not {}://",
                u.scheme()
            )),
            Err(e) => problems.push(format!(
                "mqtt.url (SILVERGUARD_MQTT_URL) {:?} is not a URL: {e}",
                self.mqtt.url
            )),
        }
        if self.mqtt.connections == 0 || self.mqtt.connections > 64 {
            problems.push("mqtt.connections must be between 1 and 64".into());
        }
        if self.mqtt.connections > 1 && self.mqtt.shared_group.is_empty() {
            problems.push(
                "mqtt.connections > 1 needs mqtt.shared_group: without a shared subscription \
                 every connection receives every message"
                    .into(),
            );
        }
        if self.mqtt.receive_maximum == 0 {
            problems.push("mqtt.receive_maximum must be at least 1".into());
        }
        if self.mqtt.client_id.is_empty() || self.mqtt.client_id.len() > 60 {
            problems.push("mqtt.client_id must have 1 to 60 characters".into());
        }
        if self.mqtt.shared_group.contains(['/', '+', '#']) {
            problems.push("mqtt.shared_group must not contain '/', '+' or '#'".into());
        }
        if self.mqtt.keep_alive < Duration::from_secs(5) {
            problems.push("mqtt.keep_alive must be at least 5s".into());
        }
        // Every heartbeat may wait this long before it is even read: keep it a small part of
        // the batch delay and far below the keep-alive.
        if self.mqtt.read_coalesce > Duration::from_secs(1) {
            problems.push("mqtt.read_coalesce must be at most 1s (0s turns it off)".into());
        }
        if !(1..=4 * 1024 * 1024).contains(&self.mqtt.read_coalesce_bytes) {
            problems.push("mqtt.read_coalesce_bytes must be between 1 and 4194304".into());
        }
        if self.runtime.worker_threads > 256 {
            problems.push("runtime.worker_threads must be between 0 (one per core) and 256".into());
        }
        if self.ingest.batch_max_rows == 0 {
            problems.push("ingest.batch_max_rows must be at least 1".into());
        }
        if self.ingest.batch_max_delay.is_zero() {
            problems.push("ingest.batch_max_delay must be more than 0".into());
        }
        if self.ingest.writers == 0 || self.ingest.writers > 32 {
            problems.push("ingest.writers must be between 1 and 32".into());
        }
        if self.ingest.max_payload_bytes < 64
            || self.ingest.max_payload_bytes as u64 > self.mqtt.max_packet_bytes as u64
        {
            problems.push(format!(
                "ingest.max_payload_bytes must be between 64 and mqtt.max_packet_bytes ({})",
                self.mqtt.max_packet_bytes
            ));
        }
        for (name, d) in [
            ("database.connect_timeout", self.database.connect_timeout),
            (
                "ingest.latest_flush_interval",
                self.ingest.latest_flush_interval,
            ),
            ("storage.upkeep_interval", self.storage.upkeep_interval),
            ("mqtt.session_expiry", self.mqtt.session_expiry),
            ("alerts.sweep_interval", self.alerts.sweep_interval),
        ] {
            if d < Duration::from_millis(10) {
                problems.push(format!("{name} must be at least 10ms"));
            }
        }
        if self.ingest.max_clock_ahead.is_zero() || self.ingest.max_clock_behind.is_zero() {
            problems
                .push("ingest.max_clock_ahead and ingest.max_clock_behind must be above 0".into());
        }
        // No stored heartbeat is then later than a day ahead: the newest-heartbeat probe
        // (view device_current, the silence sweeper) bounds its partitions with that.
        if self.ingest.max_clock_ahead > Duration::from_secs(86_400) {
            problems.push("ingest.max_clock_ahead must be at most 1d".into());
        }
        if self.ingest.reject_payload_keep_bytes > self.ingest.max_payload_bytes.max(1 << 16) {
            problems.push(
                "ingest.reject_payload_keep_bytes must not exceed the larger of 64 KiB and ingest.max_payload_bytes"
                    .into(),
            );
        }
        if self.mqtt.topic_filter.is_empty()
            || self.mqtt.topic_filter.starts_with('$')
            || self.mqtt.topic_filter.contains("#/")
        {
            problems.push(format!(
                "mqtt.topic_filter {:?} is not a valid subscription filter",
                self.mqtt.topic_filter
            ));
        }
        if (self.mqtt.url.starts_with("mqtts") || self.mqtt.url.starts_with("ssl"))
            && self.mqtt.ca_file.is_none()
        {
            problems.push(
                "mqtt.url is mqtts:// but mqtt.ca_file (SILVERGUARD_MQTT__CA_FILE) is not set"
                    .into(),
            );
        }
        if self.ingest.batch_max_rows > self.mqtt.connections * self.mqtt.receive_maximum as usize {
            problems.push(format!(
                "ingest.batch_max_rows ({}) can never fill: at most mqtt.connections x \
                 mqtt.receive_maximum ({}) messages are in flight",
                self.ingest.batch_max_rows,
                self.mqtt.connections * self.mqtt.receive_maximum as usize
            ));
        }
        if self.ingest.rejects_keep_rows < 100 {
            problems.push("ingest.rejects_keep_rows must be at least 100".into());
        }
        if self.database.pool_size < self.ingest.writers + 2 {
            problems.push(format!(
                "database.pool_size ({}) must be at least ingest.writers + 2 ({})",
                self.database.pool_size,
                self.ingest.writers + 2
            ));
        }
        if self.http.addr.parse::<SocketAddr>().is_err() {
            problems.push(format!(
                "http.addr (SILVERGUARD_HTTP_ADDR) {:?} is not host:port (e.g. 127.0.0.1:8080)",
                self.http.addr
            ));
        }
        if !(1..=60).contains(&self.storage.partitions_ahead_days) {
            problems.push("storage.partitions_ahead_days must be between 1 and 60".into());
        }
        // Upkeep makes partitions back to the oldest device time ingest accepts; retention
        // shorter than that would drop what it had just made.
        let behind_days = self.ingest.max_clock_behind.as_secs() / 86_400 + 1;
        let keep = self.storage.heartbeat_retention_days as u64;
        if keep != 0 && keep <= behind_days {
            problems.push(format!(
                "storage.heartbeat_retention_days must be 0 (keep forever) or more than {behind_days} \
                 (ingest.max_clock_behind plus a day)"
            ));
        }
        problems.extend(self.alerts.validate());
        problems.extend(self.notify.validate());
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }
}

/// Environment values are strings; give TOML the type it would have had in the file. A value
/// in double quotes stays a string (`SILVERGUARD_MQTT__PASSWORD='"123456"'`).
fn env_value(raw: &str) -> toml::Value {
    if let Some(inner) = raw.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        return toml::Value::String(inner.to_string());
    }
    if let Ok(i) = raw.parse::<i64>() {
        return toml::Value::Integer(i);
    }
    match raw {
        "true" => toml::Value::Boolean(true),
        "false" => toml::Value::Boolean(false),
        _ => toml::Value::String(raw.to_string()),
    }
}

fn insert_path(table: &mut toml::Table, path: &[String], value: toml::Value) {
    match path {
        [] => {}
        [last] => {
            table.insert(last.clone(), value);
        }
        [first, rest @ ..] => {
            let entry = table
                .entry(first.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if !entry.is_table() {
                *entry = toml::Value::Table(toml::Table::new());
            }
            if let toml::Value::Table(t) = entry {
                insert_path(t, rest, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_valid() {
        Settings::load_from(None, env(&[])).unwrap();
    }

    #[test]
    fn contract_and_nested_env_override_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sg.toml");
        std::fs::write(&path, "[ingest]\nbatch_max_rows = 10\nwriters = 3\n").unwrap();
        let s = Settings::load_from(
            Some(&path),
            env(&[
                ("SILVERGUARD_MQTT_URL", "mqtt://broker:1884"),
                ("SILVERGUARD_INGEST__BATCH_MAX_ROWS", "77"),
                ("SILVERGUARD_INGEST__BATCH_MAX_DELAY", "20ms"),
                ("SILVERGUARD_CONFIG", "ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(s.mqtt.url, "mqtt://broker:1884");
        assert_eq!(s.ingest.batch_max_rows, 77);
        assert_eq!(s.ingest.writers, 3);
        assert_eq!(s.ingest.batch_max_delay, Duration::from_millis(20));
    }

    #[test]
    fn trusted_proxies_from_toml_or_a_comma_separated_variable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sg.toml");
        std::fs::write(
            &path,
            "[http]\ntrusted_proxies = [\"127.0.0.1\", \"::1\"]\n",
        )
        .unwrap();
        let s = Settings::load_from(Some(&path), env(&[])).unwrap();
        assert_eq!(s.http.trusted_proxies.len(), 2);
        let s = Settings::load_from(
            None,
            env(&[("SILVERGUARD_HTTP__TRUSTED_PROXIES", "10.0.0.1, 10.0.0.2")]),
        )
        .unwrap();
        assert_eq!(
            s.http.trusted_proxies,
            [
                "10.0.0.1".parse::<std::net::IpAddr>().unwrap(),
                "10.0.0.2".parse().unwrap()
            ]
        );
        let err = Settings::load_from(
            None,
            env(&[("SILVERGUARD_HTTP__TRUSTED_PROXIES", "proxy.local")]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("proxy.local"), "{err}");
    }

    #[test]
    fn all_problems_are_reported_by_name() {
        let err = Settings::load_from(
            None,
            env(&[
                ("SILVERGUARD_MQTT_URL", "http://x"),
                ("SILVERGUARD_HTTP_ADDR", "nowhere"),
                ("SILVERGUARD_INGEST__WRITERS", "0"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("mqtt.url"), "{err}");
        assert!(err.contains("http.addr"), "{err}");
        assert!(err.contains("ingest.writers"), "{err}");
    }

    #[test]
    fn read_coalescing_is_bounded_and_can_be_turned_off() {
        let err = Settings::load_from(
            None,
            env(&[
                ("SILVERGUARD_MQTT__READ_COALESCE", "2s"),
                ("SILVERGUARD_MQTT__READ_COALESCE_BYTES", "0"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("mqtt.read_coalesce must"), "{err}");
        assert!(err.contains("mqtt.read_coalesce_bytes"), "{err}");
        let off =
            Settings::load_from(None, env(&[("SILVERGUARD_MQTT__READ_COALESCE", "0s")])).unwrap();
        assert!(off.mqtt.read_coalesce.is_zero());
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = Settings::load_from(None, env(&[("SILVERGUARD_INGEST__BATCH_ROWS", "5")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("batch_rows"), "{err}");
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Settings::default();
        assert!(!format!("{s:?}").contains("postgres://"));
    }
}
