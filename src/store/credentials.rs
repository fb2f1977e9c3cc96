//! MQTT credentials of devices, kept by Mosquitto's dynamic-security plugin.
//!
//! Each bracelet logs in to the broker as `username = device id` with a random password
//! that Silverguard generates when it issues the credential and shows once. The broker holds
//! the secret (salted PBKDF2 in its dynamic-security file); Silverguard keeps only metadata
//! in `device_credentials` (generation, issued / rotated / revoked times), never the
//! password.
//!
//! Silverguard administers the plugin as its admin client over MQTT: JSON commands
//! published to `$CONTROL/dynamic-security/v1`, answers read from `.../v1/response`
//! ([`BrokerAdmin::execute`]).
//!
//! The ACL model: Mosquitto 2.0.11's plugin does not substitute `%u` / `%c` in ACL topics
//! (checked against a real broker; see docs/device-credentials.md), so one shared "device"
//! role cannot say "your own topics". Each device gets its own role, `sg-device-<id>`,
//! allowing exactly: publish `sg/v1/dev/<id>/hb|evt|state`, subscribe to (and receive)
//! `sg/v1/dev/<id>/cmd`. Everything else is denied by the default ACL access that
//! [`setup_broker`] sets. The service account (role `silverguard-service`) may subscribe to
//! and receive everything under the ingest topic filter (plain and `$share/<group>/...`)
//! and publish commands.

use std::fmt;
use std::time::Duration;

use base64::Engine;
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::StoreError;
use crate::config::{MqttSettings, Secret};
use silverguard_proto::topics;

/// Where dynamic-security commands go, and where the answers come back.
pub const CONTROL_TOPIC: &str = "$CONTROL/dynamic-security/v1";
pub const RESPONSE_TOPIC: &str = "$CONTROL/dynamic-security/v1/response";

/// Settings of the broker's admin account (`[broker_admin]`,
/// `SILVERGUARD_BROKER_ADMIN__USERNAME`, `SILVERGUARD_BROKER_ADMIN__PASSWORD`, ...).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerAdminSettings {
    /// The broker to administer, `mqtt://host:port` or `mqtts://`; empty: `mqtt.url`.
    pub url: String,
    /// The dynamic-security admin client (created by `deploy/dynsec-init.sh`); empty: not
    /// configured, and credential commands say so.
    pub username: String,
    pub password: Option<Secret>,
    /// PEM CA bundle for `mqtts://`; empty: `mqtt.ca_file`.
    pub ca_file: Option<String>,
    /// How long one exchange with the broker may take.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for BrokerAdminSettings {
    fn default() -> Self {
        BrokerAdminSettings {
            url: String::new(),
            username: String::new(),
            password: None,
            ca_file: None,
            timeout: Duration::from_secs(10),
        }
    }
}

/// Why a credential operation failed; messages are for operators.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("device {0} is not provisioned: add it with `silverguard device add {0}` first")]
    NotProvisioned(String),
    #[error("device {0} already has live credentials (generation {1}): rotate or revoke them")]
    AlreadyIssued(String, i32),
    #[error("device {0} has no live credentials: issue them first")]
    NoCredential(String),
    #[error("broker administration is not configured: {0}")]
    NotConfigured(String),
    /// The broker could not be reached, refused the admin login, or did not answer in time.
    #[error("broker: {0}")]
    Broker(String),
    /// The dynamic-security plugin refused a command.
    #[error("the broker refused {command}: {error}")]
    Refused { command: String, error: String },
    #[error("{0}")]
    Invalid(String),
}

impl From<tokio_postgres::Error> for CredentialError {
    fn from(e: tokio_postgres::Error) -> Self {
        CredentialError::Store(StoreError::Db(e))
    }
}

impl From<deadpool_postgres::PoolError> for CredentialError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        CredentialError::Store(StoreError::Pool(e))
    }
}

impl CredentialError {
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            CredentialError::NotProvisioned(_) | CredentialError::NoCredential(_)
        )
    }
}

/// Credentials just issued or rotated: the only time the password is known to anyone but
/// the broker. Debug output hides it.
#[derive(Clone, Serialize)]
pub struct DeviceCredential {
    pub device_id: String,
    pub username: String,
    pub password: String,
    pub generation: i32,
}

impl fmt::Debug for DeviceCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceCredential")
            .field("device_id", &self.device_id)
            .field("username", &self.username)
            .field("password", &"***")
            .field("generation", &self.generation)
            .finish()
    }
}

/// What Silverguard knows about a device's credentials (never the password).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CredentialStatus {
    pub device_id: String,
    pub username: String,
    /// 1 at the first issue, +1 at every rotation or re-issue.
    pub generation: i32,
    /// `active` or `revoked`.
    pub state: &'static str,
    pub issued_at: DateTime<Utc>,
    pub rotated_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl CredentialStatus {
    pub fn is_active(&self) -> bool {
        self.revoked_at.is_none()
    }
}

/// The role name of a device's ACLs.
pub fn device_role(device_id: &str) -> String {
    format!("sg-device-{device_id}")
}

/// The role of the service account.
pub const SERVICE_ROLE: &str = "silverguard-service";

/// A dynamic-security ACL entry.
fn acl(acltype: &str, topic: &str) -> Value {
    json!({"acltype": acltype, "topic": topic, "priority": 0, "allow": true})
}

/// A device's ACLs: its own uplink topics, its own command topic.
pub fn device_acls(device_id: &str) -> Vec<Value> {
    vec![
        acl("publishClientSend", &topics::heartbeat(device_id)),
        acl("publishClientSend", &topics::event(device_id)),
        acl("publishClientSend", &topics::state(device_id)),
        acl("subscribeLiteral", &topics::command(device_id)),
        acl("publishClientReceive", &topics::command(device_id)),
    ]
}

/// A fresh password: 24 random bytes, base64url (32 characters).
pub fn generate_password() -> String {
    let bytes: [u8; 24] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// One command's answer from the plugin.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandResponse {
    pub command: String,
    /// `None` when the command succeeded.
    pub error: Option<String>,
    pub data: Option<Value>,
}

/// An admin connection's parameters; each operation opens a short MQTT session.
#[derive(Clone)]
pub struct BrokerAdmin {
    host: String,
    port: u16,
    ca: Option<Vec<u8>>,
    username: String,
    password: Secret,
    timeout: Duration,
}

impl fmt::Debug for BrokerAdmin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerAdmin")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.ca.is_some())
            .field("username", &self.username)
            .finish()
    }
}

impl BrokerAdmin {
    /// `url` is `mqtt://host:port` (or `mqtts://`, which needs [`BrokerAdmin::with_ca`]).
    pub fn new(url: &str, username: &str, password: &str) -> Result<BrokerAdmin, CredentialError> {
        let u = url::Url::parse(url)
            .map_err(|e| CredentialError::Invalid(format!("broker URL {url:?}: {e}")))?;
        let tls = match u.scheme() {
            "mqtt" | "tcp" => false,
            "mqtts" | "ssl" => true,
            other => {
                return Err(CredentialError::Invalid(format!(
                    "broker URL must start with mqtt:// or mqtts://, not {other}://"
                )))
            }
        };
        let host = u
            .host_str()
            .ok_or_else(|| CredentialError::Invalid(format!("broker URL {url:?} has no host")))?
            .to_string();
        if username.is_empty() {
            return Err(CredentialError::NotConfigured(
                "no admin username: set broker_admin.username (SILVERGUARD_BROKER_ADMIN__USERNAME)"
                    .into(),
            ));
        }
        Ok(BrokerAdmin {
            host,
            port: u.port().unwrap_or(if tls { 8883 } else { 1883 }),
            ca: if tls { Some(Vec::new()) } else { None },
            username: username.to_string(),
            password: Secret::new(password),
            timeout: Duration::from_secs(10),
        })
    }

    /// From the settings: `broker_admin` with `mqtt.url` / `mqtt.ca_file` as defaults.
    pub fn from_settings(
        admin: &BrokerAdminSettings,
        mqtt: &MqttSettings,
    ) -> Result<BrokerAdmin, CredentialError> {
        let url = if admin.url.is_empty() {
            &mqtt.url
        } else {
            &admin.url
        };
        let password = admin.password.as_ref().ok_or_else(|| {
            CredentialError::NotConfigured(
                "no admin password: set broker_admin.password (SILVERGUARD_BROKER_ADMIN__PASSWORD)"
                    .into(),
            )
        })?;
        let mut b = BrokerAdmin::new(url, &admin.username, password.expose())?;
        b.timeout = admin.timeout;
        if b.ca.is_some() {
            let path = admin
                .ca_file
                .as_ref()
                .or(mqtt.ca_file.as_ref())
                .ok_or_else(|| {
                    CredentialError::NotConfigured(
                        "mqtts:// needs broker_admin.ca_file or mqtt.ca_file".into(),
                    )
                })?;
            let pem = std::fs::read(path).map_err(|e| {
                CredentialError::Invalid(format!("cannot read CA file {path}: {e}"))
            })?;
            b = b.with_ca(pem);
        }
        Ok(b)
    }

    /// The CA bundle (PEM) for `mqtts://`.
    pub fn with_ca(mut self, pem: Vec<u8>) -> BrokerAdmin {
        self.ca = Some(pem);
        self
    }

    pub fn with_timeout(mut self, timeout: Duration) -> BrokerAdmin {
        self.timeout = timeout;
        self
    }

    /// Sends dynamic-security commands in one message and returns the plugin's answer to
    /// each, in order. A command's own failure is in its [`CommandResponse::error`]; the
    /// `Err` cases are a broker that cannot be reached, refuses the login or the response
    /// subscription (not the admin account?), or does not answer within the timeout.
    pub async fn execute(
        &self,
        commands: Vec<Value>,
    ) -> Result<Vec<CommandResponse>, CredentialError> {
        use rumqttc::{AsyncClient, ConnectionError, Event, MqttOptions, Packet, QoS};
        let batch = format!("sg-{:016x}", rand::random::<u64>());
        let n = commands.len();
        let commands: Vec<Value> = commands
            .into_iter()
            .enumerate()
            .map(|(i, mut c)| {
                if let Some(obj) = c.as_object_mut() {
                    obj.insert("correlationData".into(), json!(format!("{batch}-{i}")));
                }
                c
            })
            .collect();
        let payload = serde_json::to_vec(&json!({ "commands": commands }))
            .map_err(|e| CredentialError::Invalid(e.to_string()))?;
        let mut opts = MqttOptions::new(batch.clone(), self.host.clone(), self.port);
        opts.set_credentials(self.username.clone(), self.password.expose().to_string());
        opts.set_clean_session(true);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_max_packet_size(4 << 20, 4 << 20);
        if let Some(ca) = &self.ca {
            opts.set_transport(rumqttc::Transport::tls(ca.clone(), None, None));
        }
        let (client, mut events) = AsyncClient::new(opts, 16);
        let exchange = async {
            loop {
                let event = events.poll().await.map_err(|e| match e {
                    ConnectionError::ConnectionRefused(code) => CredentialError::Broker(format!(
                        "the broker refused the admin login as {:?} ({code:?}): check broker_admin.username and password",
                        self.username
                    )),
                    other => CredentialError::Broker(format!(
                        "{}:{}: {other}",
                        self.host, self.port
                    )),
                })?;
                match event {
                    Event::Incoming(Packet::ConnAck(_)) => {
                        client
                            .subscribe(RESPONSE_TOPIC, QoS::AtLeastOnce)
                            .await
                            .map_err(|e| CredentialError::Broker(e.to_string()))?;
                    }
                    Event::Incoming(Packet::SubAck(ack)) => {
                        let ok = ack
                            .return_codes
                            .iter()
                            .all(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(_)));
                        if !ok {
                            return Err(CredentialError::Broker(format!(
                                "{:?} may not read {RESPONSE_TOPIC}: is it the dynamic-security admin, and is the plugin loaded?",
                                self.username
                            )));
                        }
                        client
                            .publish(CONTROL_TOPIC, QoS::AtLeastOnce, false, payload.clone())
                            .await
                            .map_err(|e| CredentialError::Broker(e.to_string()))?;
                    }
                    Event::Incoming(Packet::Publish(p)) if p.topic == RESPONSE_TOPIC => {
                        if let Some(r) = parse_responses(&p.payload, &batch, n)? {
                            return Ok(r);
                        }
                    }
                    _ => {}
                }
            }
        };
        let result = tokio::time::timeout(self.timeout, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(CredentialError::Broker(format!(
                    "no answer from the dynamic-security plugin at {}:{} within {:?} (is the plugin loaded?)",
                    self.host, self.port, self.timeout
                )))
            });
        // Say goodbye properly so the broker does not log a lost connection.
        if client.try_disconnect().is_ok() {
            let _ = tokio::time::timeout(Duration::from_millis(500), async {
                while events.poll().await.is_ok() {}
            })
            .await;
        }
        result
    }

    /// Runs commands that must all succeed, except the errors `tolerated` (by command name
    /// and the start of the error text, e.g. a `deleteClient` of a client that is not there).
    async fn run(
        &self,
        commands: Vec<Value>,
        tolerated: &[(&str, &str)],
    ) -> Result<Vec<CommandResponse>, CredentialError> {
        let responses = self.execute(commands).await?;
        for r in &responses {
            if let Some(err) = &r.error {
                let ok = tolerated.iter().any(|(c, e)| {
                    r.command == *c && err.to_ascii_lowercase().contains(&e.to_ascii_lowercase())
                });
                if !ok {
                    return Err(CredentialError::Refused {
                        command: r.command.clone(),
                        error: err.clone(),
                    });
                }
            }
        }
        Ok(responses)
    }

    /// Whether the broker has a client of this name (and, if so, whether it is disabled).
    pub async fn client_state(&self, username: &str) -> Result<Option<bool>, CredentialError> {
        let r = self
            .execute(vec![json!({"command": "getClient", "username": username})])
            .await?;
        match r.first() {
            Some(CommandResponse {
                error: None, data, ..
            }) => Ok(Some(
                data.as_ref()
                    .and_then(|d| d.pointer("/client/disabled"))
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            )),
            Some(CommandResponse { error: Some(e), .. })
                if e.to_ascii_lowercase().contains("not found") =>
            {
                Ok(None)
            }
            Some(CommandResponse {
                error: Some(e),
                command,
                ..
            }) => Err(CredentialError::Refused {
                command: command.clone(),
                error: e.clone(),
            }),
            None => Err(CredentialError::Broker("empty answer".into())),
        }
    }

    /// Creates (or re-creates) a client with its own role: removes whatever client and role
    /// of these names exist (which disconnects a client logged in with them), then creates
    /// the role with `acls` and the client with `password`. Idempotent.
    async fn replace_client(
        &self,
        username: &str,
        password: &str,
        role: &str,
        acls: Vec<Value>,
        description: &str,
    ) -> Result<(), CredentialError> {
        self.run(
            vec![
                json!({"command": "deleteClient", "username": username}),
                json!({"command": "deleteRole", "rolename": role}),
                json!({"command": "createRole", "rolename": role,
                       "textdescription": description, "acls": acls}),
                json!({"command": "createClient", "username": username, "password": password,
                       "textname": username, "textdescription": description,
                       "roles": [{"rolename": role, "priority": 0}]}),
            ],
            &[("deleteClient", "not found"), ("deleteRole", "not found")],
        )
        .await?;
        Ok(())
    }

    /// Removes a client and its role (disconnecting it); absent ones are fine.
    async fn remove_client(&self, username: &str, role: &str) -> Result<(), CredentialError> {
        self.run(
            vec![
                json!({"command": "deleteClient", "username": username}),
                json!({"command": "deleteRole", "rolename": role}),
            ],
            &[("deleteClient", "not found"), ("deleteRole", "not found")],
        )
        .await?;
        Ok(())
    }
}

fn parse_responses(
    payload: &[u8],
    batch: &str,
    n: usize,
) -> Result<Option<Vec<CommandResponse>>, CredentialError> {
    let Ok(v) = serde_json::from_slice::<Value>(payload) else {
        return Ok(None); // someone else's garbage on the response topic
    };
    let Some(items) = v.get("responses").and_then(Value::as_array) else {
        return Ok(None);
    };
    let ours = items.iter().any(|r| {
        r.get("correlationData")
            .and_then(Value::as_str)
            .is_some_and(|c| c.starts_with(batch))
    });
    if !ours {
        return Ok(None); // another admin's answer
    }
    let mut out: Vec<Option<CommandResponse>> = vec![None; n];
    for r in items {
        let Some(i) = r
            .get("correlationData")
            .and_then(Value::as_str)
            .and_then(|c| c.strip_prefix(batch))
            .and_then(|c| c.strip_prefix('-'))
            .and_then(|c| c.parse::<usize>().ok())
            .filter(|i| *i < n)
        else {
            continue;
        };
        out[i] = Some(CommandResponse {
            command: r
                .get("command")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            error: r.get("error").and_then(Value::as_str).map(str::to_string),
            data: r.get("data").cloned(),
        });
    }
    out.into_iter()
        .collect::<Option<Vec<_>>>()
        .map(Some)
        .ok_or_else(|| CredentialError::Broker("the plugin answered only some commands".into()))
}

// ---------------------------------------------------------------------------------------
// Broker setup: default-deny and the service account
// ---------------------------------------------------------------------------------------

/// The account the `silverguard serve` instances log in with (`mqtt.username` /
/// `mqtt.password`).
#[derive(Debug, Clone)]
pub struct ServiceAccount {
    pub username: String,
    pub password: String,
    /// The ingest subscription (`mqtt.topic_filter`, default `sg/#`): the service may
    /// subscribe to it plainly or as `$share/<group>/<filter>`, and receive what matches.
    pub topic_filter: String,
}

/// Prepares a broker whose dynamic-security file has only the admin: every access not
/// granted is denied (publish, subscribe and receive), and the service account is
/// (re-)created with its role. Running it again resets the service role and password, and
/// briefly disconnects the service.
pub async fn setup_broker(
    admin: &BrokerAdmin,
    service: &ServiceAccount,
) -> Result<(), CredentialError> {
    if service.username.is_empty() || service.password.len() < 12 {
        return Err(CredentialError::Invalid(
            "the service account needs a username and a password of at least 12 characters".into(),
        ));
    }
    let filter = if service.topic_filter.is_empty() {
        "sg/#"
    } else {
        service.topic_filter.as_str()
    };
    admin
        .run(
            vec![json!({"command": "setDefaultACLAccess", "acls": [
                {"acltype": "publishClientSend", "allow": false},
                {"acltype": "publishClientReceive", "allow": false},
                {"acltype": "subscribe", "allow": false},
                {"acltype": "unsubscribe", "allow": true},
            ]})],
            &[],
        )
        .await?;
    let acls = vec![
        acl("subscribePattern", filter),
        acl("subscribePattern", &format!("$share/+/{filter}")),
        acl("publishClientReceive", filter),
        acl("publishClientSend", &topics::command("+")),
    ];
    admin
        .replace_client(
            &service.username,
            &service.password,
            SERVICE_ROLE,
            acls,
            "silverguard service: reads every device topic, sends commands",
        )
        .await
}

// ---------------------------------------------------------------------------------------
// Issue, rotate, revoke, status
// ---------------------------------------------------------------------------------------

/// Advisory lock namespace (two-key form) serializing credential changes per device.
const CREDENTIAL_LOCK: i32 = 0x5347_0200;

async fn lock_device(
    tx: &deadpool_postgres::Transaction<'_>,
    device_id: &str,
) -> Result<(), CredentialError> {
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext($2))",
        &[&CREDENTIAL_LOCK, &device_id],
    )
    .await?;
    Ok(())
}

fn check_device_id(device_id: &str) -> Result<&str, CredentialError> {
    let id = device_id.trim();
    if topics::is_valid_device_id(id) {
        Ok(id)
    } else {
        Err(CredentialError::Invalid(format!(
            "{id:?} is not a device id: use 1 to 64 of A-Z a-z 0-9 _ -"
        )))
    }
}

const STATUS_SQL: &str = "SELECT device_id, username, generation, issued_at, rotated_at, revoked_at
     FROM device_credentials";

fn status_from_row(r: &tokio_postgres::Row) -> CredentialStatus {
    let revoked_at: Option<DateTime<Utc>> = r.get(5);
    CredentialStatus {
        device_id: r.get(0),
        username: r.get(1),
        generation: r.get(2),
        state: if revoked_at.is_some() {
            "revoked"
        } else {
            "active"
        },
        issued_at: r.get(3),
        rotated_at: r.get(4),
        revoked_at,
    }
}

/// Issues MQTT credentials to a provisioned device that has none live (never issued, or
/// revoked): username = device id, a new random password. The password is returned once
/// and stored nowhere but in the broker.
pub async fn issue(
    pool: &Pool,
    admin: &BrokerAdmin,
    device_id: &str,
) -> Result<DeviceCredential, CredentialError> {
    let device_id = check_device_id(device_id)?;
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    lock_device(&tx, device_id).await?;
    if tx
        .query_opt("SELECT 1 FROM devices WHERE device_id = $1", &[&device_id])
        .await?
        .is_none()
    {
        return Err(CredentialError::NotProvisioned(device_id.to_string()));
    }
    let existing = tx
        .query_opt(&format!("{STATUS_SQL} WHERE device_id = $1"), &[&device_id])
        .await?
        .map(|r| status_from_row(&r));
    if let Some(s) = &existing {
        if s.is_active() {
            return Err(CredentialError::AlreadyIssued(
                device_id.to_string(),
                s.generation,
            ));
        }
    }
    let password = generate_password();
    let generation = existing.map(|s| s.generation + 1).unwrap_or(1);
    admin
        .replace_client(
            device_id,
            &password,
            &device_role(device_id),
            device_acls(device_id),
            &format!("silverguard device, credential generation {generation}"),
        )
        .await?;
    tx.execute(
        "INSERT INTO device_credentials (device_id, username, generation, issued_at)
         VALUES ($1, $1, $2, now())
         ON CONFLICT (device_id) DO UPDATE SET username = EXCLUDED.username,
             generation = EXCLUDED.generation, issued_at = now(), rotated_at = NULL,
             revoked_at = NULL",
        &[&device_id, &generation],
    )
    .await?;
    tx.commit().await?;
    tracing::info!(device_id, generation, "issued device credentials");
    Ok(DeviceCredential {
        device_id: device_id.to_string(),
        username: device_id.to_string(),
        password,
        generation,
    })
}

/// Replaces a device's password (and re-creates its role): the old password stops working
/// at once, and a connection logged in with it is closed.
pub async fn rotate(
    pool: &Pool,
    admin: &BrokerAdmin,
    device_id: &str,
) -> Result<DeviceCredential, CredentialError> {
    let device_id = check_device_id(device_id)?;
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    lock_device(&tx, device_id).await?;
    let existing = tx
        .query_opt(&format!("{STATUS_SQL} WHERE device_id = $1"), &[&device_id])
        .await?
        .map(|r| status_from_row(&r))
        .filter(CredentialStatus::is_active)
        .ok_or_else(|| CredentialError::NoCredential(device_id.to_string()))?;
    let password = generate_password();
    let generation = existing.generation + 1;
    admin
        .replace_client(
            &existing.username,
            &password,
            &device_role(device_id),
            device_acls(device_id),
            &format!("silverguard device, credential generation {generation}"),
        )
        .await?;
    tx.execute(
        "UPDATE device_credentials SET generation = $2, rotated_at = now() WHERE device_id = $1",
        &[&device_id, &generation],
    )
    .await?;
    tx.commit().await?;
    tracing::info!(device_id, generation, "rotated device credentials");
    Ok(DeviceCredential {
        device_id: device_id.to_string(),
        username: existing.username,
        password,
        generation,
    })
}

/// Revokes a device's credentials: the broker forgets the client and its role (closing its
/// connection), and the record is marked revoked. Revoking again is harmless. `NoCredential`
/// when the device never had any.
pub async fn revoke(
    pool: &Pool,
    admin: &BrokerAdmin,
    device_id: &str,
) -> Result<CredentialStatus, CredentialError> {
    let device_id = check_device_id(device_id)?;
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    lock_device(&tx, device_id).await?;
    let existing = tx
        .query_opt(&format!("{STATUS_SQL} WHERE device_id = $1"), &[&device_id])
        .await?
        .map(|r| status_from_row(&r))
        .ok_or_else(|| CredentialError::NoCredential(device_id.to_string()))?;
    admin
        .remove_client(&existing.username, &device_role(device_id))
        .await?;
    let row = tx
        .query_one(
            "UPDATE device_credentials SET revoked_at = coalesce(revoked_at, now())
                 WHERE device_id = $1
                 RETURNING device_id, username, generation, issued_at, rotated_at, revoked_at",
            &[&device_id],
        )
        .await?;
    tx.commit().await?;
    tracing::info!(device_id, "revoked device credentials");
    Ok(status_from_row(&row))
}

/// Before devices leave the registry: revokes the live broker credentials of any of `ids`,
/// so a removed bracelet (or whoever has its password) cannot keep publishing. Without a
/// broker admin it refuses when any of them has live credentials rather than leave a
/// working login behind. Returns the devices whose credentials were revoked.
pub async fn revoke_before_removal(
    pool: &Pool,
    admin: Option<&BrokerAdmin>,
    ids: &[String],
) -> Result<Vec<String>, CredentialError> {
    let live: Vec<String> = pool
        .get()
        .await?
        .query(
            "SELECT device_id FROM device_credentials
              WHERE device_id = ANY($1) AND revoked_at IS NULL ORDER BY device_id",
            &[&ids],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if live.is_empty() {
        return Ok(live);
    }
    let Some(admin) = admin else {
        return Err(CredentialError::NotConfigured(format!(
            "{} still ha{} live broker credentials, which removing the device would leave \
             working; configure [broker_admin] so they are revoked, or revoke them first \
             (silverguard device credentials revoke ID)",
            live.join(", "),
            if live.len() == 1 { "s" } else { "ve" }
        )));
    };
    for id in &live {
        revoke(pool, admin, id).await?;
    }
    Ok(live)
}

/// What is recorded about a device's credentials; `None` when it never had any.
pub async fn status(
    pool: &Pool,
    device_id: &str,
) -> Result<Option<CredentialStatus>, CredentialError> {
    let device_id = check_device_id(device_id)?;
    let client = pool.get().await?;
    Ok(client
        .query_opt(&format!("{STATUS_SQL} WHERE device_id = $1"), &[&device_id])
        .await?
        .map(|r| status_from_row(&r)))
}

/// The credential records of many devices at once (for a fleet page), by device id.
pub async fn statuses(
    pool: &Pool,
    device_ids: &[String],
) -> Result<Vec<CredentialStatus>, CredentialError> {
    let client = pool.get().await?;
    Ok(client
        .query(
            &format!("{STATUS_SQL} WHERE device_id = ANY($1) ORDER BY device_id"),
            &[&device_ids],
        )
        .await?
        .iter()
        .map(status_from_row)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_long_and_different() {
        let a = generate_password();
        let b = generate_password();
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
    }

    #[test]
    fn device_acls_name_only_its_own_topics() {
        let acls = device_acls("860000000000101");
        let topics: Vec<&str> = acls.iter().filter_map(|a| a["topic"].as_str()).collect();
        assert_eq!(
            topics,
            [
                "sg/v1/dev/860000000000101/hb",
                "sg/v1/dev/860000000000101/evt",
                "sg/v1/dev/860000000000101/state",
                "sg/v1/dev/860000000000101/cmd",
                "sg/v1/dev/860000000000101/cmd",
            ]
        );
        assert!(topics.iter().all(|t| !t.contains('+') && !t.contains('#')));
    }

    #[test]
    fn responses_are_matched_by_correlation() {
        let payload = br#"{"responses":[{"command":"deleteClient","error":"Client not found","correlationData":"sg-1-0"},{"command":"createClient","correlationData":"sg-1-1"}]}"#;
        let r = parse_responses(payload, "sg-1", 2).unwrap().unwrap();
        assert_eq!(r[0].error.as_deref(), Some("Client not found"));
        assert_eq!(r[1].error, None);
        assert!(parse_responses(payload, "sg-2", 2).unwrap().is_none());
        assert!(parse_responses(b"nope", "sg-1", 2).unwrap().is_none());
    }

    #[test]
    fn settings_deserialize() {
        let s: BrokerAdminSettings =
            toml::from_str("username = \"admin\"\npassword = \"pw\"\ntimeout = \"5s\"").unwrap();
        assert_eq!(s.username, "admin");
        assert_eq!(s.timeout, Duration::from_secs(5));
        let b = BrokerAdmin::from_settings(&s, &MqttSettings::default()).unwrap();
        assert_eq!(b.port, 1883);
    }
}
