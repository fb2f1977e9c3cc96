//! The authorization matrix of `/api/v1`: every operation of the served OpenAPI document ×
//! every role (anonymous, admin, supervisor, grid worker, guardian) × every way of
//! presenting credentials (bearer token; console session cookie with its CSRF token, and
//! without it on state-changing calls; an expired token), each tried on an object inside the
//! caller's scope and on one outside it.
//!
//! The expectation table ([`OPS`]) is compared with the document fetched from the running
//! service in both directions, so an endpoint added without a row here, or a row left behind
//! by a removed endpoint, fails the test. Every cell that changes something gets fresh
//! objects of its own (an alert to acknowledge, a work order in the right state, a user to
//! disable...), so the order of the cells does not matter and no cell breaks another.
//!
//! The fixture ([`World`]) is shared with `hostile.rs`, which uses a cell's valid path and
//! body as the baseline it corrupts.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;

use reqwest::Method;
use serde_json::{json, Value};
use silverguard::api::auth::{self, NewUser, UserRole};
use silverguard::config::Secret;

use crate::helpers::*;

/// Password of every matrix user.
pub const PASSWORD: &str = "correct horse battery";
/// The ack-link signing key of the matrix service (hostile.rs signs its own links with it).
pub const LINK_SECRET: &str = "authz-matrix-link-secret-0123456789abcdef";

/// A caller. Every role the code defines maps to one ([`Role::of`] is an exhaustive match,
/// so a new `UserRole` does not compile until it has a column here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Anonymous,
    Admin,
    Supervisor,
    GridWorker,
    Guardian,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Anonymous,
        Role::Admin,
        Role::Supervisor,
        Role::GridWorker,
        Role::Guardian,
    ];

    pub fn of(r: UserRole) -> Role {
        match r {
            UserRole::Admin => Role::Admin,
            UserRole::Supervisor => Role::Supervisor,
            UserRole::GridWorker => Role::GridWorker,
            UserRole::Guardian => Role::Guardian,
        }
    }

    fn user_role(self) -> Option<UserRole> {
        match self {
            Role::Anonymous => None,
            Role::Admin => Some(UserRole::Admin),
            Role::Supervisor => Some(UserRole::Supervisor),
            Role::GridWorker => Some(UserRole::GridWorker),
            Role::Guardian => Some(UserRole::Guardian),
        }
    }

    fn short(self) -> &'static str {
        match self {
            Role::Anonymous => "anon",
            Role::Admin => "admin",
            Role::Supervisor => "sup",
            Role::GridWorker => "gw",
            Role::Guardian => "guard",
        }
    }
}

/// Whether the object a cell works on is the caller's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    In,
    Out,
}

/// How the caller presents itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// No credentials at all.
    None,
    /// `Authorization: Bearer`.
    Bearer,
    /// The console's session cookie, with `X-CSRF-Token` on state-changing calls.
    Session,
    /// The session cookie without its CSRF token (state-changing calls only).
    SessionNoCsrf,
    /// A bearer token past its expiry.
    Expired,
}

impl Kind {
    fn short(self) -> &'static str {
        match self {
            Kind::None => "-",
            Kind::Bearer => "b",
            Kind::Session => "s",
            Kind::SessionNoCsrf => "n",
            Kind::Expired => "x",
        }
    }
}

/// Who may call an operation at all (others get 403).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    /// No credentials needed.
    Public,
    /// Any signed-in user.
    Any,
    /// Admins, supervisors, grid workers (not guardians).
    Staff,
    /// Admins and supervisors.
    Managers,
    Admin,
}

/// One row of the expectation table: the operation as the document names it, who may call
/// it, whether it is about an object that may be outside the caller's scope (then the
/// outside one answers 404 to everyone but an admin), and its success status.
pub struct Op {
    pub key: &'static str,
    pub who: Who,
    pub scoped: bool,
    pub ok: u16,
}

const fn op(key: &'static str, who: Who, scoped: bool, ok: u16) -> Op {
    Op {
        key,
        who,
        scoped,
        ok,
    }
}

/// Every operation of `/api/v1`. The credential endpoints answer 503 to an admin because
/// this service has no broker administration configured: the point here is who gets that
/// far.
pub const OPS: &[Op] = &[
    op("GET /api/v1/openapi.json", Who::Public, false, 200),
    op("POST /api/v1/auth/token", Who::Public, false, 201),
    op("DELETE /api/v1/auth/token", Who::Any, false, 204),
    op("GET /api/v1/me", Who::Any, false, 200),
    op("GET /api/v1/users", Who::Admin, false, 200),
    op("POST /api/v1/users", Who::Admin, false, 201),
    op("GET /api/v1/users/{username}", Who::Admin, false, 200),
    op("PUT /api/v1/users/{username}", Who::Admin, false, 200),
    op("DELETE /api/v1/users/{username}", Who::Admin, false, 204),
    op("GET /api/v1/regions", Who::Any, false, 200),
    op("POST /api/v1/regions", Who::Admin, false, 201),
    op("GET /api/v1/regions/{code}", Who::Any, true, 200),
    op("GET /api/v1/dashboard", Who::Staff, false, 200),
    op("GET /api/v1/elders", Who::Any, false, 200),
    op("POST /api/v1/elders", Who::Managers, true, 201),
    op("GET /api/v1/elders/{id}", Who::Any, true, 200),
    op("PATCH /api/v1/elders/{id}", Who::Managers, true, 200),
    op("DELETE /api/v1/elders/{id}", Who::Admin, true, 204),
    op("GET /api/v1/elders/{id}/telemetry", Who::Any, true, 200),
    op("GET /api/v1/elders/{id}/events", Who::Any, true, 200),
    op("GET /api/v1/elders/{id}/bindings", Who::Any, true, 200),
    op(
        "POST /api/v1/elders/{id}/contacts",
        Who::Managers,
        true,
        200,
    ),
    op(
        "DELETE /api/v1/elders/{id}/contacts/{contact_id}",
        Who::Managers,
        true,
        204,
    ),
    op("GET /api/v1/elders/{id}/care-contacts", Who::Any, true, 200),
    op(
        "POST /api/v1/elders/{id}/care-contacts",
        Who::Staff,
        true,
        201,
    ),
    op("GET /api/v1/contacts", Who::Managers, false, 200),
    op("POST /api/v1/contacts", Who::Managers, true, 201),
    op("GET /api/v1/contacts/{id}", Who::Managers, true, 200),
    op("DELETE /api/v1/contacts/{id}", Who::Admin, true, 204),
    op("GET /api/v1/devices", Who::Any, false, 200),
    op("POST /api/v1/devices", Who::Admin, true, 201),
    op("GET /api/v1/devices/{id}", Who::Any, true, 200),
    op("GET /api/v1/devices/{id}/bindings", Who::Any, true, 200),
    op("POST /api/v1/devices/{id}/bind", Who::Managers, true, 200),
    op("POST /api/v1/devices/{id}/unbind", Who::Managers, true, 204),
    op(
        "POST /api/v1/devices/{id}/credentials",
        Who::Admin,
        true,
        503,
    ),
    op(
        "DELETE /api/v1/devices/{id}/credentials",
        Who::Admin,
        true,
        503,
    ),
    op(
        "POST /api/v1/devices/{id}/credentials/rotate",
        Who::Admin,
        true,
        503,
    ),
    op("GET /api/v1/alerts", Who::Any, false, 200),
    op("GET /api/v1/alerts/{id}", Who::Any, true, 200),
    op("GET /api/v1/alerts/{id}/timeline", Who::Any, true, 200),
    op("POST /api/v1/alerts/{id}/ack", Who::Any, true, 200),
    op("POST /api/v1/alerts/{id}/resolve", Who::Staff, true, 200),
    op("GET /api/v1/work-orders", Who::Any, false, 200),
    op("POST /api/v1/work-orders", Who::Staff, true, 201),
    op("GET /api/v1/work-orders/{id}", Who::Any, true, 200),
    op(
        "POST /api/v1/work-orders/{id}/dispatch",
        Who::Staff,
        true,
        200,
    ),
    op(
        "POST /api/v1/work-orders/{id}/accept",
        Who::Staff,
        true,
        200,
    ),
    op(
        "POST /api/v1/work-orders/{id}/complete",
        Who::Staff,
        true,
        200,
    ),
    op(
        "POST /api/v1/work-orders/{id}/cancel",
        Who::Staff,
        true,
        200,
    ),
    op("GET /api/v1/compliance", Who::Staff, false, 200),
    op("GET /api/v1/compliance/regions", Who::Staff, false, 200),
];

pub fn method_of(key: &str) -> Method {
    let m = key.split_once(' ').map(|x| x.0).unwrap_or("GET");
    Method::from_bytes(m.as_bytes()).expect("method")
}

pub fn template_of(key: &str) -> &str {
    key.split_once(' ').map(|x| x.1).unwrap_or(key)
}

fn is_unsafe(m: &Method) -> bool {
    !matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// What a cell must answer.
pub fn expected(o: &Op, role: Role, scope: Scope, kind: Kind) -> u16 {
    let method = method_of(o.key);
    if o.who == Who::Public {
        // The login takes the password in the body; the anonymous caller has none.
        return if o.key == "POST /api/v1/auth/token" && role == Role::Anonymous {
            401
        } else {
            o.ok
        };
    }
    if matches!(kind, Kind::None | Kind::Expired) {
        return 401;
    }
    if kind == Kind::SessionNoCsrf && is_unsafe(&method) {
        return 403;
    }
    let allowed = match o.who {
        Who::Public | Who::Any => true,
        Who::Staff => role != Role::Guardian,
        Who::Managers => matches!(role, Role::Admin | Role::Supervisor),
        Who::Admin => role == Role::Admin,
    };
    if !allowed {
        return 403;
    }
    // Guardians hold no regions: every region is outside their scope.
    if o.key == "GET /api/v1/regions/{code}" && role == Role::Guardian {
        return 404;
    }
    if o.scoped && scope == Scope::Out && role != Role::Admin {
        // A supervisor registering an elder names the grid: one outside their regions is a
        // field error, not a missing record.
        return if o.key == "POST /api/v1/elders" {
            422
        } else {
            404
        };
    }
    o.ok
}

/// A signed-in user's credentials.
#[derive(Debug, Clone)]
pub struct Creds {
    pub user_id: i64,
    pub username: String,
    pub token: String,
    pub cookie: String,
    pub csrf: String,
}

/// What a cell sends: the path parameters and the body.
#[derive(Debug, Clone, Default)]
pub struct Cell {
    pub params: BTreeMap<String, String>,
    pub body: Option<Value>,
}

impl Cell {
    fn with(mut self, k: &str, v: impl ToString) -> Cell {
        self.params.insert(k.to_string(), v.to_string());
        self
    }

    fn body(mut self, b: Value) -> Cell {
        self.body = Some(b);
        self
    }

    /// The template with its parameters filled in, percent-encoded.
    pub fn path(&self, template: &str) -> String {
        let mut out = template.to_string();
        for (k, v) in &self.params {
            out = out.replace(&format!("{{{k}}}"), &encode_path(v));
        }
        assert!(!out.contains('{'), "unfilled parameter in {out}");
        out
    }
}

pub fn encode_path(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub text: String,
    pub body: Value,
}

impl Reply {
    /// An error answered with a problem document of the same status.
    pub fn problem_ok(&self) -> Result<(), String> {
        if self.status < 400 {
            return Ok(());
        }
        if !self.content_type.starts_with("application/problem+json") {
            return Err(format!("{} as {:?}", self.status, self.content_type));
        }
        if self.body["status"] != self.status || !self.body["title"].is_string() {
            return Err(format!("problem document {}", self.text));
        }
        Ok(())
    }
}

/// The service with two grids in two communities of one township:
///
/// ```text
/// city C └ township T ├ community M1 └ grid G1: elders e1 (bracelet d1, guardian c1, alert a1,
///                     │                          work order wo1), e1b
///                     └ community M2 └ grid G2: elder e2 (bracelet d2, contact c2, alert a2,
///                                                work order wo2)
/// ```
///
/// The supervisor oversees M1, the grid worker covers G1, the guardian is c1. Whatever
/// belongs to G2 carries `marker` in its name, and no answer to anyone but an admin may
/// contain it.
pub struct World {
    pub db: TestDb,
    _broker: TestBroker,
    app: Option<RunningApp>,
    pub pool: silverguard::store::PgPool,
    pub base: String,
    pub http: reqwest::Client,
    pub tag: String,
    pub marker: String,
    pub e2_phone: String,
    pub region_ids: HashMap<&'static str, i64>,
    pub e1: i64,
    pub e1b: i64,
    pub e2: i64,
    pub d1: String,
    pub d2: String,
    pub a1: i64,
    pub a2: i64,
    pub wo1: i64,
    pub wo2: i64,
    pub c1: i64,
    pub c2: i64,
    pub creds: HashMap<Role, Creds>,
    /// The grid worker's token, expired.
    pub expired_token: String,
    seq: std::sync::atomic::AtomicU32,
}

impl World {
    pub async fn new() -> World {
        let db = TestDb::new().await;
        let broker = TestBroker::start().await;
        let mut settings = settings(&db, &broker);
        settings.alerts.link_secret = Secret::new(LINK_SECRET);
        let app = RunningApp::start(settings.clone()).await;
        let pool = silverguard::store::build_pool(&settings.database).expect("pool");
        let tag = unique("z");
        let marker = format!("G2机密{tag}");
        let mut w = World {
            db,
            _broker: broker,
            base: format!("http://{}", app.http),
            app: Some(app),
            pool,
            // No kept-alive connections: hostile.rs has the service close connections on
            // refused bodies, and a pooled connection closed under the client fails the next
            // request for reasons that are not the service's.
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .expect("client"),
            tag: tag.clone(),
            marker: marker.clone(),
            e2_phone: format!("139{:08}", rand::random::<u32>() % 100_000_000),
            region_ids: HashMap::new(),
            e1: 0,
            e1b: 0,
            e2: 0,
            d1: String::new(),
            d2: String::new(),
            a1: 0,
            a2: 0,
            wo1: 0,
            wo2: 0,
            c1: 0,
            c2: 0,
            creds: HashMap::new(),
            expired_token: String::new(),
            seq: Default::default(),
        };
        let c = w.pool.get().await.expect("db");
        for (key, level, parent) in [
            ("C", "city", None),
            ("T", "township", Some("C")),
            ("M1", "community", Some("T")),
            ("M2", "community", Some("T")),
            ("G1", "grid", Some("M1")),
            ("G2", "grid", Some("M2")),
        ] {
            let parent_id = parent.map(|p| w.region_ids[p]);
            let id: i64 = c
                .query_one(
                    "INSERT INTO regions (parent_id, level, code, name) VALUES ($1, $2, $3, $3)
                     RETURNING id",
                    &[&parent_id, &level, &w.code(key)],
                )
                .await
                .expect("region")
                .get(0);
            w.region_ids.insert(key, id);
        }
        drop(c);
        w.e1 = w.elder(Scope::In).await;
        w.e1b = w.elder(Scope::In).await;
        w.e2 = w.elder(Scope::Out).await;
        let c = w.pool.get().await.expect("db");
        c.execute(
            "UPDATE elders SET phone = $2, id_number = '110101194001011234',
                    address = '杭州市西湖区机密路 2 号' WHERE id = $1",
            &[&w.e2, &w.e2_phone],
        )
        .await
        .expect("e2 details");
        drop(c);
        w.d1 = w.device(Some(w.e1)).await;
        w.d2 = w.device(Some(w.e2)).await;
        w.a1 = w.alert(w.e1, &w.d1).await;
        w.a2 = w.alert(w.e2, &w.d2).await;
        w.wo1 = w.work_order(w.e1, "new").await;
        w.wo2 = w.work_order(w.e2, "new").await;
        w.c1 = w.contact(w.e1, "guardian").await;
        w.c2 = w.contact(w.e2, "grid_worker").await;
        let c1_ref = format!("{tag}-c1");
        w.pool
            .get()
            .await
            .expect("db")
            .execute(
                "UPDATE contacts SET external_ref = $2 WHERE id = $1",
                &[&w.c1, &c1_ref],
            )
            .await
            .expect("ref");

        for role in UserRole::ALL {
            let (regions, contact) = match role {
                UserRole::Admin => (vec![], None),
                UserRole::Supervisor => (vec![w.code("M1")], None),
                UserRole::GridWorker => (vec![w.code("G1")], None),
                UserRole::Guardian => (vec![], Some(c1_ref.clone())),
            };
            let username = format!("{tag}-{}", role.as_str());
            let u = auth::upsert_user(
                &w.pool,
                &NewUser {
                    username: username.clone(),
                    display_name: Some(role.as_str().into()),
                    role,
                    password: PASSWORD.into(),
                    regions,
                    contact,
                    language: Some("en".into()),
                },
            )
            .await
            .expect("user");
            let (token, _) = auth::create_api_token(&w.pool, u.id, "matrix", None)
                .await
                .expect("token");
            let (cookie, csrf) = auth::create_session(&w.pool, u.id).await.expect("session");
            w.creds.insert(
                Role::of(role),
                Creds {
                    user_id: u.id,
                    username,
                    token,
                    cookie,
                    csrf,
                },
            );
        }
        let gw = w.creds[&Role::GridWorker].user_id;
        let (token, _) = auth::create_api_token(&w.pool, gw, "expired", None)
            .await
            .expect("token");
        w.pool
            .get()
            .await
            .expect("db")
            .execute(
                "UPDATE api_tokens SET expires_at = now() - interval '1 minute'
                  WHERE user_id = $1 AND name = 'expired'",
                &[&gw],
            )
            .await
            .expect("expire");
        w.expired_token = token;
        w
    }

    pub fn code(&self, key: &str) -> String {
        format!("{}-{key}", self.tag)
    }

    fn n(&self) -> u32 {
        self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// A name for something new: inside G1 plain, inside G2 with the marker.
    fn name(&self, scope: Scope, what: &str) -> String {
        match scope {
            Scope::In => format!("{what}{}", self.n()),
            Scope::Out => format!("{what}{}-{}", self.marker, self.n()),
        }
    }

    fn grid(&self, scope: Scope) -> i64 {
        self.region_ids[match scope {
            Scope::In => "G1",
            Scope::Out => "G2",
        }]
    }

    pub fn elder_of(&self, scope: Scope) -> i64 {
        match scope {
            Scope::In => self.e1,
            Scope::Out => self.e2,
        }
    }

    /// A new elder in G1 or G2.
    pub async fn elder(&self, scope: Scope) -> i64 {
        let c = self.pool.get().await.expect("db");
        c.query_one(
            "INSERT INTO elders (name, region_id) VALUES ($1, $2) RETURNING id",
            &[&self.name(scope, "老人"), &self.grid(scope)],
        )
        .await
        .expect("elder")
        .get(0)
    }

    /// A new bracelet, bound to `elder` (two days ago) or free.
    pub async fn device(&self, elder: Option<i64>) -> String {
        let id = format!("{}-d{}", self.tag, self.n());
        let c = self.pool.get().await.expect("db");
        c.execute(
            "INSERT INTO devices (device_id, elder_id) VALUES ($1, $2)",
            &[&id, &elder],
        )
        .await
        .expect("device");
        if let Some(e) = elder {
            c.execute(
                "INSERT INTO device_bindings (device_id, elder_id, bound_at, bound_by)
                 VALUES ($1, $2, now() - interval '2 days', 'test')",
                &[&id, &e],
            )
            .await
            .expect("binding");
        }
        id
    }

    /// A new open SOS alert.
    pub async fn alert(&self, elder: i64, device: &str) -> i64 {
        let c = self.pool.get().await.expect("db");
        c.query_one(
            "INSERT INTO alerts (subject, elder_id, device_id, kind, severity, occurred_at)
             VALUES ($1, $2, $3, 'sos', 'critical', now()) RETURNING id",
            &[&format!("{}-s{}", self.tag, self.n()), &elder, &device],
        )
        .await
        .expect("alert")
        .get(0)
    }

    /// A new work order in `status`.
    pub async fn work_order(&self, elder: i64, status: &str) -> i64 {
        let c = self.pool.get().await.expect("db");
        c.query_one(
            "INSERT INTO work_orders (elder_id, source, category, status, requested_at,
                                      helper_name, dispatched_at, accepted_at)
             VALUES ($1, 'api', 'meals', $2, now(),
                     CASE WHEN $2 IN ('dispatched', 'accepted') THEN '刘阿姨' END,
                     CASE WHEN $2 IN ('dispatched', 'accepted') THEN now() END,
                     CASE WHEN $2 = 'accepted' THEN now() END)
             RETURNING id",
            &[&elder, &status],
        )
        .await
        .expect("work order")
        .get(0)
    }

    /// A new contact linked to `elder` in `role`; named with the marker when the elder is
    /// in G2.
    pub async fn contact(&self, elder: i64, role: &str) -> i64 {
        let scope = if elder == self.e2 {
            Scope::Out
        } else {
            Scope::In
        };
        let c = self.pool.get().await.expect("db");
        let id: i64 = c
            .query_one(
                "INSERT INTO contacts (name, phone) VALUES ($1, $2) RETURNING id",
                &[
                    &self.name(scope, "联系人"),
                    &format!("137{:08}", rand::random::<u32>() % 100_000_000),
                ],
            )
            .await
            .expect("contact")
            .get(0);
        c.execute(
            "INSERT INTO elder_contacts (elder_id, contact_id, role) VALUES ($1, $2, $3)",
            &[&elder, &id, &role],
        )
        .await
        .expect("link");
        id
    }

    /// A user nobody uses (to look at, replace or disable).
    pub async fn spare_user(&self) -> String {
        let name = format!("{}-u{}", self.tag, self.n());
        let c = self.pool.get().await.expect("db");
        c.execute(
            "INSERT INTO users (username, display_name, role, password_hash)
             VALUES ($1, $1, 'admin', '!')",
            &[&name],
        )
        .await
        .expect("user");
        name
    }

    /// Valid path parameters and body for `key` as `role`, on an object in or out of the
    /// caller's scope. Operations that change something get objects of their own.
    pub async fn prepare(&self, key: &str, role: Role, scope: Scope) -> Cell {
        let cell = Cell::default();
        let elder = self.elder_of(scope);
        let (alert, device, wo, contact) = match scope {
            Scope::In => (self.a1, &self.d1, self.wo1, self.c1),
            Scope::Out => (self.a2, &self.d2, self.wo2, self.c2),
        };
        let n = self.n();
        match key {
            "GET /api/v1/openapi.json"
            | "DELETE /api/v1/auth/token"
            | "GET /api/v1/me"
            | "GET /api/v1/users"
            | "GET /api/v1/regions"
            | "GET /api/v1/dashboard"
            | "GET /api/v1/elders"
            | "GET /api/v1/contacts"
            | "GET /api/v1/devices"
            | "GET /api/v1/alerts"
            | "GET /api/v1/work-orders"
            | "GET /api/v1/compliance"
            | "GET /api/v1/compliance/regions" => cell,
            "POST /api/v1/auth/token" => {
                let username = match self.creds.get(&role) {
                    Some(c) => c.username.clone(),
                    None => format!("{}-nobody", self.tag),
                };
                cell.body(json!({"username": username, "password": PASSWORD, "ttl_days": 1}))
            }
            "POST /api/v1/users" => cell.body(json!({
                "username": format!("{}-new{n}", self.tag),
                "role": "grid_worker",
                "password": "long enough password",
                "regions": [self.code("G1")],
            })),
            "GET /api/v1/users/{username}" | "DELETE /api/v1/users/{username}" => {
                cell.with("username", self.spare_user().await)
            }
            "PUT /api/v1/users/{username}" => {
                let u = self.spare_user().await;
                cell.with("username", &u).body(json!({
                    "username": u,
                    "role": "supervisor",
                    "password": "long enough password",
                    "regions": [self.code("M2")],
                }))
            }
            "POST /api/v1/regions" => cell.body(json!({
                "code": format!("{}-R{n}", self.tag),
                "name": "新网格",
                "level": "grid",
                "parent": self.code("M1"),
            })),
            "GET /api/v1/regions/{code}" => cell.with(
                "code",
                self.code(match scope {
                    Scope::In => "G1",
                    Scope::Out => "G2",
                }),
            ),
            "POST /api/v1/elders" => cell.body(json!({
                "name": self.name(scope, "新老人"),
                "region": self.code(match scope {
                    Scope::In => "G1",
                    Scope::Out => "G2",
                }),
                "categories": ["living_alone"],
            })),
            "GET /api/v1/elders/{id}"
            | "GET /api/v1/elders/{id}/telemetry"
            | "GET /api/v1/elders/{id}/events"
            | "GET /api/v1/elders/{id}/bindings"
            | "GET /api/v1/elders/{id}/care-contacts" => cell.with("id", elder),
            "PATCH /api/v1/elders/{id}" => cell
                .with("id", elder)
                .body(json!({"notes": format!("note {n}")})),
            "DELETE /api/v1/elders/{id}" => cell.with("id", self.elder(scope).await),
            "POST /api/v1/elders/{id}/contacts" => {
                // A contact the caller may see (linked in G1), linked anew to the elder.
                let c = self.contact(self.e1b, "backup_grid_worker").await;
                cell.with("id", elder)
                    .body(json!({"contact_id": c, "role": "backup_grid_worker"}))
            }
            "DELETE /api/v1/elders/{id}/contacts/{contact_id}" => {
                let c = self.contact(elder, "backup_grid_worker").await;
                cell.with("id", elder).with("contact_id", c)
            }
            "POST /api/v1/elders/{id}/care-contacts" => cell
                .with("id", elder)
                .body(json!({"kind": "visit", "notes": "好"})),
            "POST /api/v1/contacts" => cell.body(json!({
                "name": self.name(scope, "新联系人"),
                "phone": format!("136{:08}", rand::random::<u32>() % 100_000_000),
                "link": {"elder_id": elder, "role": "backup_grid_worker"},
            })),
            "GET /api/v1/contacts/{id}" => cell.with("id", contact),
            "DELETE /api/v1/contacts/{id}" => {
                cell.with("id", self.contact(elder, "backup_grid_worker").await)
            }
            "POST /api/v1/devices" => cell.body(json!({
                "device_id": format!("{}-p{n}", self.tag),
                "model": "SG-1",
                "elder_id": elder,
                "issue_credentials": false,
            })),
            "GET /api/v1/devices/{id}"
            | "GET /api/v1/devices/{id}/bindings"
            | "POST /api/v1/devices/{id}/credentials"
            | "DELETE /api/v1/devices/{id}/credentials"
            | "POST /api/v1/devices/{id}/credentials/rotate" => cell.with("id", device),
            "POST /api/v1/devices/{id}/bind" => cell
                .with("id", self.device(None).await)
                .body(json!({"elder_id": elder})),
            "POST /api/v1/devices/{id}/unbind" => cell.with("id", self.device(Some(elder)).await),
            "GET /api/v1/alerts/{id}" | "GET /api/v1/alerts/{id}/timeline" => {
                cell.with("id", alert)
            }
            "POST /api/v1/alerts/{id}/ack" => {
                let d = self.device(Some(elder)).await;
                cell.with("id", self.alert(elder, &d).await)
                    .body(json!({"note": "on my way"}))
            }
            "POST /api/v1/alerts/{id}/resolve" => {
                let d = self.device(Some(elder)).await;
                cell.with("id", self.alert(elder, &d).await)
                    .body(json!({"note": "visited, all well"}))
            }
            "POST /api/v1/work-orders" => cell.body(json!({
                "elder_id": elder,
                "category": "meals",
                "description": "午餐",
            })),
            "GET /api/v1/work-orders/{id}" => cell.with("id", wo),
            "POST /api/v1/work-orders/{id}/dispatch" => cell
                .with("id", self.work_order(elder, "new").await)
                .body(json!({"helper_name": "刘阿姨", "helper_phone": "13800000000"})),
            "POST /api/v1/work-orders/{id}/accept" => {
                cell.with("id", self.work_order(elder, "dispatched").await)
            }
            "POST /api/v1/work-orders/{id}/complete" => cell
                .with("id", self.work_order(elder, "accepted").await)
                .body(json!({"cost_cents": 1500, "note": "送达"})),
            "POST /api/v1/work-orders/{id}/cancel" => {
                cell.with("id", self.work_order(elder, "new").await)
            }
            other => panic!("no fixture for {other}: add it to OPS and World::prepare"),
        }
    }

    /// Credentials a cell presents: the role's own, or fresh ones when the call ends them.
    async fn creds_for(&self, key: &str, role: Role) -> Option<Creds> {
        let mine = self.creds.get(&role)?.clone();
        if key != "DELETE /api/v1/auth/token" {
            return Some(mine);
        }
        let (token, _) = auth::create_api_token(&self.pool, mine.user_id, "spent", None)
            .await
            .expect("token");
        let (cookie, csrf) = auth::create_session(&self.pool, mine.user_id)
            .await
            .expect("session");
        Some(Creds {
            token,
            cookie,
            csrf,
            ..mine
        })
    }

    /// Sends a request as `kind` with `creds`.
    pub async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        kind: Kind,
        creds: Option<&Creds>,
        body: Option<&Value>,
    ) -> Reply {
        let mut req = self
            .http
            .request(method, format!("{}{path_and_query}", self.base));
        match (kind, creds) {
            (Kind::Bearer, Some(c)) => req = req.bearer_auth(&c.token),
            (Kind::Session, Some(c)) => {
                req = req
                    .header("cookie", format!("{}={}", auth::SESSION_COOKIE, c.cookie))
                    .header(auth::CSRF_HEADER, &c.csrf)
            }
            (Kind::SessionNoCsrf, Some(c)) => {
                req = req.header("cookie", format!("{}={}", auth::SESSION_COOKIE, c.cookie))
            }
            (Kind::Expired, _) => req = req.bearer_auth(&self.expired_token),
            _ => {}
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        reply(req.send().await.expect("request")).await
    }

    /// `key` as `role` with its bearer token.
    pub async fn bearer(
        &self,
        role: Role,
        path: &str,
        method: Method,
        body: Option<&Value>,
    ) -> Reply {
        self.send(method, path, Kind::Bearer, self.creds.get(&role), body)
            .await
    }

    pub async fn openapi(&self) -> Value {
        let r = self
            .send(Method::GET, "/api/v1/openapi.json", Kind::None, None, None)
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        r.body
    }

    /// What no one but an admin may ever be shown: names and numbers of G2.
    pub fn leaks(&self, text: &str) -> bool {
        text.contains(&self.marker) || text.contains(&self.e2_phone)
    }

    pub async fn stop(mut self) {
        if let Some(app) = self.app.take() {
            app.stop().await;
        }
    }
}

pub async fn reply(res: reqwest::Response) -> Reply {
    let status = res.status().as_u16();
    let content_type = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let bytes = res.bytes().await.unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Reply {
        status,
        content_type,
        text,
        body,
    }
}

/// `(METHOD path, operation)` for every operation of an OpenAPI document.
pub fn operations(doc: &Value) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (m, operation) in item.as_object().expect("path item") {
            if [
                "get", "put", "post", "delete", "patch", "head", "options", "trace",
            ]
            .contains(&m.as_str())
            {
                out.insert(
                    format!("{} {path}", m.to_ascii_uppercase()),
                    operation.clone(),
                );
            }
        }
    }
    out
}

/// Whether the document lets the operation be called without credentials.
pub fn documented_public(operation: &Value) -> bool {
    operation["security"].as_array().is_some_and(|s| {
        s.iter()
            .any(|r| r.as_object().is_some_and(|o| o.is_empty()))
    })
}

/// One cell's outcome, for the printed matrix.
struct Outcome {
    role: Role,
    kind: Kind,
    scope: Option<Scope>,
    want: u16,
    got: u16,
    problem: Option<String>,
}

impl Outcome {
    fn ok(&self) -> bool {
        self.want == self.got && self.problem.is_none()
    }
}

fn render(rows: &[(String, Vec<Outcome>)]) -> String {
    let mut s = String::from(
        "legend: role kind:in/out (kind b=bearer s=session+csrf n=session without csrf \
         x=expired token -=none); a cell is the status, `got!want` when it is wrong, \
         `*` when the body is wrong\n",
    );
    for (key, cells) in rows {
        let _ = write!(s, "{key:<52}");
        for role in Role::ALL {
            let mine: Vec<&Outcome> = cells.iter().filter(|c| c.role == role).collect();
            if mine.is_empty() {
                continue;
            }
            let _ = write!(s, " | {}", role.short());
            let mut kinds: Vec<Kind> = Vec::new();
            for c in &mine {
                if !kinds.contains(&c.kind) {
                    kinds.push(c.kind);
                }
            }
            for k in kinds {
                let parts: Vec<String> = mine
                    .iter()
                    .filter(|c| c.kind == k)
                    .map(|c| {
                        let mark = if c.problem.is_some() { "*" } else { "" };
                        if c.want == c.got {
                            format!("{}{mark}", c.got)
                        } else {
                            format!("{}!{}{mark}", c.got, c.want)
                        }
                    })
                    .collect();
                let _ = write!(s, " {}:{}", k.short(), parts.join("/"));
            }
        }
        s.push('\n');
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_answers_every_role_as_the_table_says() {
    let started = std::time::Instant::now();
    let w = World::new().await;
    // Every role the code defines has a column (Role::of is exhaustive).
    let roles: BTreeSet<Role> = UserRole::ALL.into_iter().map(Role::of).collect();
    assert_eq!(roles.len() + 1, Role::ALL.len(), "a role without a column");
    for r in Role::ALL {
        assert_eq!(r.user_role().map(Role::of).unwrap_or(Role::Anonymous), r);
    }

    // The table and the served document list the same operations.
    let doc = w.openapi().await;
    let documented = operations(&doc);
    let table: BTreeMap<&str, &Op> = OPS.iter().map(|o| (o.key, o)).collect();
    assert_eq!(table.len(), OPS.len(), "a duplicate row in OPS");
    let untested: Vec<&String> = documented
        .keys()
        .filter(|k| !table.contains_key(k.as_str()))
        .collect();
    let stale: Vec<&&str> = table
        .keys()
        .filter(|k| !documented.contains_key(**k))
        .collect();
    assert!(
        untested.is_empty() && stale.is_empty(),
        "operations documented but not in the matrix: {untested:?}; \
         in the matrix but no longer documented: {stale:?}"
    );
    for (key, operation) in &documented {
        assert_eq!(
            documented_public(operation),
            table[key.as_str()].who == Who::Public,
            "{key}: the document and the table disagree on whether it needs credentials"
        );
    }

    let mut rows: Vec<(String, Vec<Outcome>)> = Vec::new();
    let mut failures = 0;
    let mut cells = 0;
    for o in OPS {
        let method = method_of(o.key);
        let template = template_of(o.key);
        let mut outcomes = Vec::new();
        for role in Role::ALL {
            let kinds: Vec<Kind> = match role {
                Role::Anonymous => vec![Kind::None],
                _ => {
                    let mut k = vec![Kind::Bearer, Kind::Session];
                    if is_unsafe(&method) {
                        k.push(Kind::SessionNoCsrf);
                    }
                    if role == Role::GridWorker {
                        k.push(Kind::Expired);
                    }
                    k
                }
            };
            let scopes: Vec<Option<Scope>> = if o.scoped {
                vec![Some(Scope::In), Some(Scope::Out)]
            } else {
                vec![None]
            };
            for kind in kinds {
                for scope in &scopes {
                    let sc = scope.unwrap_or(Scope::In);
                    let cell = w.prepare(o.key, role, sc).await;
                    let creds = w.creds_for(o.key, role).await;
                    let path = cell.path(template);
                    let r = w
                        .send(
                            method.clone(),
                            &path,
                            kind,
                            creds.as_ref(),
                            cell.body.as_ref(),
                        )
                        .await;
                    cells += 1;
                    let want = expected(o, role, sc, kind);
                    let mut problem = r.problem_ok().err();
                    if role != Role::Admin && w.leaks(&r.text) {
                        problem = Some(format!("G2's personal data in {}", r.text));
                    }
                    if r.status >= 500 && r.status != want {
                        problem.get_or_insert_with(|| r.text.clone());
                    }
                    let out = Outcome {
                        role,
                        kind,
                        scope: *scope,
                        want,
                        got: r.status,
                        problem,
                    };
                    if !out.ok() {
                        failures += 1;
                        eprintln!(
                            "MISMATCH {} as {:?} ({:?}, {:?}): got {} want {}; {} {}",
                            o.key,
                            role,
                            kind,
                            out.scope,
                            r.status,
                            want,
                            out.problem.as_deref().unwrap_or(""),
                            r.text.chars().take(300).collect::<String>()
                        );
                    }
                    outcomes.push(out);
                }
            }
        }
        rows.push((o.key.to_string(), outcomes));
    }
    // Lists hold nothing of G2 for anyone but an admin (the marker check above catches
    // names; this catches records listed without one).
    let lists: [(&str, &str, Value); 5] = [
        ("/api/v1/elders?limit=500", "id", json!(w.e2)),
        ("/api/v1/alerts?limit=500", "id", json!(w.a2)),
        ("/api/v1/devices?limit=500", "device_id", json!(w.d2)),
        ("/api/v1/work-orders?limit=500", "id", json!(w.wo2)),
        ("/api/v1/contacts?limit=500", "id", json!(w.c2)),
    ];
    for role in [Role::Supervisor, Role::GridWorker, Role::Guardian] {
        for (path, field, outside) in &lists {
            let r = w.bearer(role, path, Method::GET, None).await;
            if r.status == 403 {
                continue;
            }
            let items = r.body["items"].as_array().cloned().unwrap_or_default();
            if r.status != 200 || items.iter().any(|i| &i[*field] == outside) {
                failures += 1;
                eprintln!("LIST {path} as {role:?}: {} {}", r.status, r.text);
            }
        }
    }
    let matrix = render(&rows);
    assert!(
        failures == 0,
        "{failures} of {cells} cells differ from the table:\n{matrix}"
    );
    eprintln!(
        "authz matrix: {} operations, {cells} cells, all as expected in {:?}",
        OPS.len(),
        started.elapsed()
    );
    w.stop().await;
}
