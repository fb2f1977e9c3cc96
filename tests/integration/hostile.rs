//! Hostile input against the real service: SQL injection payloads in every query parameter,
//! path parameter and string field the OpenAPI document declares; oversized, malformed,
//! mistyped and deeply nested bodies on every operation that takes one; garbled console
//! forms; expired and altered acknowledge links. Whatever comes in, the answer is a 4xx
//! problem (never a 500), nothing outside the caller's scope comes back, the schema and a
//! canary row survive, and the service stays healthy.
//!
//! The valid baseline of each operation (path parameters, body) is the authorization
//! matrix's (`authz.rs`), so a new endpoint is covered here as soon as it has a row there.

use std::time::Duration;

use futures::StreamExt;
use reqwest::Method;
use serde_json::{json, Value};
use silverguard::notify::links::AckLink;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::authz::{
    encode_path, method_of, operations, reply, template_of, Kind, Reply, Role, Scope, Who, World,
    LINK_SECRET, OPS,
};
use crate::helpers::http_get;

/// Classic and less classic payloads. `%27` is sent as those three characters (encoded, so
/// the service sees the percent sign); the others reach the service as written.
fn payloads() -> Vec<String> {
    vec![
        "' OR 1=1 --".into(),
        "'; DROP TABLE elders; --".into(),
        "1) UNION SELECT id, name, id_number, phone, address FROM elders --".into(),
        "%27".into(),
        "\" OR \"\"=\"".into(),
        "a\u{0}' --".into(),
        "x".repeat(10_000),
        "王".repeat(4_000),
        "王秀英'); DELETE FROM users; --".into(),
        "\u{202e}\u{feff}🙂e\u{301}\\\\x00$$;--".into(),
        "${jndi:ldap://x}{{7*7}}<script>alert(1)</script>".into(),
    ]
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(r) => {
            let name = r.trim_start_matches("#/components/schemas/");
            resolve(doc, &doc["components"]["schemas"][name])
        }
        None => schema,
    }
}

/// The JSON types a schema admits (null left out).
fn types_of(doc: &Value, schema: &Value) -> Vec<String> {
    let s = resolve(doc, schema);
    let mut out = Vec::new();
    match &s["type"] {
        Value::String(t) => out.push(t.clone()),
        Value::Array(ts) => out.extend(ts.iter().filter_map(|t| t.as_str()).map(String::from)),
        _ => {}
    }
    if out.is_empty() && s["enum"].is_array() {
        out.push("string".into());
    }
    for k in ["oneOf", "anyOf", "allOf"] {
        if let Some(xs) = s[k].as_array() {
            for x in xs {
                out.extend(types_of(doc, x));
            }
        }
    }
    if out.is_empty() && s["properties"].is_object() {
        out.push("object".into());
    }
    out.retain(|t| t != "null");
    out.sort();
    out.dedup();
    out
}

/// The item types of an array schema.
fn item_types(doc: &Value, schema: &Value) -> Vec<String> {
    let s = resolve(doc, schema);
    let mut out = types_of(doc, &s["items"]);
    for k in ["oneOf", "anyOf", "allOf"] {
        if let Some(xs) = s[k].as_array() {
            for x in xs {
                out.extend(item_types(doc, x));
            }
        }
    }
    out
}

/// A declared body field: its dotted path, the types it admits, and its items' types.
#[derive(Debug, Clone)]
struct Field {
    path: String,
    types: Vec<String>,
    items: Vec<String>,
}

fn fields(doc: &Value, schema: &Value, prefix: &str, depth: usize, out: &mut Vec<Field>) {
    let s = resolve(doc, schema);
    for k in ["oneOf", "anyOf", "allOf"] {
        if let Some(xs) = s[k].as_array() {
            for x in xs {
                fields(doc, x, prefix, depth, out);
            }
        }
    }
    if let Some(props) = s["properties"].as_object() {
        for (name, p) in props {
            let path = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}.{name}")
            };
            out.push(Field {
                path: path.clone(),
                types: types_of(doc, p),
                items: item_types(doc, p),
            });
            if depth < 3 {
                fields(doc, p, &path, depth + 1, out);
            }
        }
    }
}

/// The fields of an operation's JSON body, if it declares one.
fn body_fields(doc: &Value, operation: &Value) -> Option<Vec<Field>> {
    let schema = &operation["requestBody"]["content"]["application/json"]["schema"];
    if schema.is_null() {
        return None;
    }
    let mut out = Vec::new();
    fields(doc, schema, "", 0, &mut out);
    Some(out)
}

fn set_path(body: &mut Value, path: &str, v: Value) {
    let mut cur = body;
    let parts: Vec<&str> = path.split('.').collect();
    for (i, p) in parts.iter().enumerate() {
        if !cur.is_object() {
            *cur = json!({});
        }
        let obj = cur.as_object_mut().expect("object");
        if i + 1 == parts.len() {
            obj.insert(p.to_string(), v);
            return;
        }
        cur = obj.entry(p.to_string()).or_insert_with(|| json!({}));
    }
}

/// The query parameters an operation declares.
fn query_params(operation: &Value) -> Vec<String> {
    operation["parameters"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .filter(|p| p["in"] == "query")
                .filter_map(|p| p["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// A raw HTTP/1.1 exchange (for what reqwest will not send): returns the status, or None
/// when the service closed the connection without one.
async fn raw_http(port: u16, request: &[u8]) -> Option<u16> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    // The service may answer (413) and close before reading everything: that is fine.
    let _ = s.write_all(request).await;
    let _ = s.shutdown().await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    text.split_whitespace().nth(1)?.parse().ok()
}

fn port_of(w: &World) -> u16 {
    w.base
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port")
}

/// Counts that must not change under attack: tables, and the canary row.
async fn schema_fingerprint(w: &World, canary: i64) -> (i64, i64, i64) {
    let c = w.pool.get().await.expect("db");
    let tables: i64 = c
        .query_one(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
            &[],
        )
        .await
        .expect("tables")
        .get(0);
    let canary_rows: i64 = c
        .query_one(
            "SELECT count(*) FROM elders WHERE id = $1 AND name = 'canary'",
            &[&canary],
        )
        .await
        .expect("canary")
        .get(0);
    let users: i64 = c
        .query_one("SELECT count(*) FROM users WHERE NOT disabled", &[])
        .await
        .expect("users")
        .get(0);
    (tables, canary_rows, users)
}

/// A failure message when `r` is a 5xx, not a problem document, or shows G2 to a caller who
/// is not an admin.
fn judge(w: &World, role: Role, what: &str, r: &Reply) -> Option<String> {
    // The credential endpoints say so when broker administration is not configured.
    let documented = r.status == 503
        && r.body["type"]
            .as_str()
            .is_some_and(|t| t.ends_with("/broker-admin-unconfigured"));
    if r.status >= 500 && !documented {
        return Some(format!(
            "{what}: {} {}",
            r.status,
            r.text.chars().take(200).collect::<String>()
        ));
    }
    if let Err(e) = r.problem_ok() {
        return Some(format!("{what}: {e}"));
    }
    if role != Role::Admin && w.leaks(&r.text) {
        return Some(format!("{what}: G2's personal data shown to {role:?}"));
    }
    None
}

fn short(s: &str) -> String {
    let s: String = s.chars().take(40).collect();
    format!("{s:?}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_injection_stays_inside_its_parameter() {
    let started = std::time::Instant::now();
    let w = World::new().await;
    let canary: i64 = w
        .pool
        .get()
        .await
        .unwrap()
        .query_one(
            "INSERT INTO elders (name, region_id) VALUES ('canary', $1) RETURNING id",
            &[&w.region_ids["G1"]],
        )
        .await
        .unwrap()
        .get(0);
    let before = schema_fingerprint(&w, canary).await;
    assert_eq!(before.1, 1);
    let doc = w.openapi().await;
    let documented = operations(&doc);
    let payloads = payloads();
    let mut injected_fields = 0;
    // (what, as whom, method, path, body): built first, then sent a few at a time.
    let mut jobs: Vec<(String, Role, Method, String, Option<Value>)> = Vec::new();
    for o in OPS {
        let Some(operation) = documented.get(o.key) else {
            continue; // authz.rs fails for that
        };
        let method = method_of(o.key);
        let template = template_of(o.key);
        let base = w.prepare(o.key, Role::Admin, Scope::In).await;
        // Query and path parameters, as the least powerful role that gets past the role
        // check (so the text reaches the query, and a leak beyond its scope would show).
        let role = match o.who {
            Who::Any | Who::Staff => Role::GridWorker,
            Who::Managers => Role::Supervisor,
            Who::Public | Who::Admin => Role::Admin,
        };
        for name in query_params(operation) {
            for p in &payloads {
                jobs.push((
                    format!("{} ?{name}={}", o.key, short(p)),
                    role,
                    method.clone(),
                    format!("{}?{name}={}", base.path(template), urlencode(p)),
                    base.body.clone(),
                ));
            }
        }
        for name in base.params.keys() {
            for p in &payloads {
                let mut cell = base.clone();
                cell.params.insert(name.clone(), p.clone());
                jobs.push((
                    format!("{} {{{name}}}={}", o.key, short(p)),
                    role,
                    method.clone(),
                    cell.path(template),
                    cell.body.clone(),
                ));
            }
        }
        // Every string field of the body (and every list of strings), as an admin: the role
        // that gets furthest into the handler.
        let Some(fields) = body_fields(&doc, operation) else {
            continue;
        };
        for f in fields {
            let as_list =
                f.types.contains(&"array".to_string()) && f.items.contains(&"string".to_string());
            if !f.types.contains(&"string".to_string()) && !as_list {
                continue;
            }
            injected_fields += 1;
            for p in &payloads {
                let mut body = base.body.clone().unwrap_or_else(|| json!({}));
                let v = if as_list { json!([p]) } else { json!(p) };
                set_path(&mut body, &f.path, v);
                jobs.push((
                    format!("{} body.{}={}", o.key, f.path, short(p)),
                    Role::Admin,
                    method.clone(),
                    base.path(template),
                    Some(body),
                ));
            }
        }
    }
    let mut requests = jobs.len();
    let w_ref = &w;
    let mut failures: Vec<String> = futures::stream::iter(jobs)
        .map(|(what, role, method, path, body)| async move {
            let r = w_ref.bearer(role, &path, method, body.as_ref()).await;
            judge(w_ref, role, &what, &r)
        })
        .buffer_unordered(4)
        .filter_map(|f| async move { f })
        .collect()
        .await;

    // The console and the acknowledge link take ids and text from the URL too.
    let gw = w.creds[&Role::GridWorker].clone();
    for p in &payloads {
        for path in [
            format!("/elders?q={}", urlencode(p)),
            format!("/alerts/{}", encode_path(p)),
            format!("/elders/{}", encode_path(p)),
            format!("/work-orders?status={}", urlencode(p)),
            format!("/ack/{}", encode_path(p)),
        ] {
            let r = w
                .send(Method::GET, &path, Kind::Session, Some(&gw), None)
                .await;
            requests += 1;
            if r.status >= 500 || w.leaks(&r.text) {
                failures.push(format!("console GET {}: {}", short(&path), r.status));
            }
        }
        let r = reply(
            w.http
                .post(format!("{}/login", w.base))
                .form(&[("username", p.as_str()), ("password", p.as_str())])
                .send()
                .await
                .unwrap(),
        )
        .await;
        requests += 1;
        if r.status >= 500 {
            failures.push(format!("console login {}: {}", short(p), r.status));
        }
    }

    let after = schema_fingerprint(&w, canary).await;
    assert!(
        failures.is_empty(),
        "{} of {requests} hostile requests misbehaved:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(
        (after.0, after.1),
        (before.0, before.1),
        "tables and the canary row survive"
    );
    assert!(after.2 >= before.2, "no user was disabled by an injection");
    // The payloads were stored as text, not run: an elder named like an injection exists.
    assert!(
        w.db.count("SELECT count(*) FROM elders WHERE name = '''; DROP TABLE elders; --'")
            .await
            >= 1,
        "POST /elders stored the payload verbatim"
    );
    eprintln!(
        "sql injection: {requests} requests, {injected_fields} body fields, {} payloads, in {:?}",
        payloads.len(),
        started.elapsed()
    );
    w.stop().await;
}

/// A malformed body and the statuses it may be answered with.
struct Bad {
    what: &'static str,
    content_type: &'static str,
    bytes: Vec<u8>,
    /// Acceptable answers when the operation reads a JSON body.
    want: &'static [u16],
}

fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

/// The baseline with bytes that are not UTF-8 at the start of its first string value (or,
/// when it has none, as a key).
fn invalid_utf8_in_first_string(compact: &str) -> Vec<u8> {
    const BAD: &[u8] = b"\xff\xfe\xc3\x28";
    match compact.find("\":\"") {
        Some(i) => [
            &compact.as_bytes()[..i + 3],
            BAD,
            &compact.as_bytes()[i + 3..],
        ]
        .concat(),
        None => [&b"{\""[..], BAD, &b"\": 1}"[..]].concat(),
    }
}

fn bad_bodies(baseline: &Value) -> Vec<Bad> {
    let text = baseline.to_string();
    let cut = text.len() / 2;
    let mut oversized = baseline.clone();
    set_path(&mut oversized, "padding", json!("x".repeat(70 * 1024)));
    vec![
        Bad {
            what: "over 64 KiB",
            content_type: "application/json",
            bytes: oversized.to_string().into_bytes(),
            want: &[413],
        },
        Bad {
            what: "invalid JSON",
            content_type: "application/json",
            bytes: b"{,\"name\": 1}".to_vec(),
            want: &[400],
        },
        Bad {
            what: "truncated JSON",
            content_type: "application/json",
            bytes: text.as_bytes()[..cut].to_vec(),
            want: &[400],
        },
        Bad {
            what: "not JSON at all",
            content_type: "application/json",
            bytes: b"name=x&role=admin".to_vec(),
            want: &[400],
        },
        Bad {
            what: "text/plain",
            content_type: "text/plain",
            bytes: text.clone().into_bytes(),
            want: &[415],
        },
        Bad {
            what: "a form post",
            content_type: "application/x-www-form-urlencoded",
            bytes: b"name=x&role=admin".to_vec(),
            want: &[415],
        },
        Bad {
            what: "an array",
            content_type: "application/json",
            bytes: b"[]".to_vec(),
            want: &[422],
        },
        Bad {
            what: "a string",
            content_type: "application/json",
            bytes: b"\"x\"".to_vec(),
            want: &[422],
        },
        Bad {
            what: "a number",
            content_type: "application/json",
            bytes: b"42".to_vec(),
            want: &[422],
        },
        Bad {
            what: "null",
            content_type: "application/json",
            bytes: b"null".to_vec(),
            want: &[422],
        },
        Bad {
            what: "nested 30k deep",
            content_type: "application/json",
            bytes: nested(30_000).into_bytes(),
            want: &[400, 413, 422],
        },
        Bad {
            what: "a field nested 10k deep",
            content_type: "application/json",
            bytes: format!("{{\"name\": {}}}", nested(10_000)).into_bytes(),
            want: &[400, 422],
        },
        Bad {
            what: "invalid UTF-8 in a string",
            content_type: "application/json",
            bytes: invalid_utf8_in_first_string(&text),
            want: &[400],
        },
        Bad {
            what: "invalid UTF-8 in a key",
            content_type: "application/json",
            bytes: [&b"{\"\xc0\xaf\": 1}"[..]].concat(),
            want: &[400],
        },
        Bad {
            what: "a number out of range",
            content_type: "application/json",
            bytes: b"{\"elder_id\": 1e999999}".to_vec(),
            want: &[400, 422],
        },
        Bad {
            what: "empty",
            content_type: "application/json",
            bytes: Vec::new(),
            want: &[400],
        },
    ]
}

/// A value of the wrong JSON type for a field admitting `types`.
fn wrong_value(types: &[String]) -> Option<Value> {
    let has = |t: &str| types.iter().any(|x| x == t);
    if types.is_empty() {
        return None; // any JSON
    }
    Some(if has("string") {
        json!({"not": "a string"})
    } else if has("integer") || has("number") {
        json!("not a number")
    } else if has("boolean") {
        json!("perhaps")
    } else {
        json!(7)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_bodies_are_problems_and_the_service_stays_up() {
    let started = std::time::Instant::now();
    let w = World::new().await;
    let doc = w.openapi().await;
    let documented = operations(&doc);
    let admin = w.creds[&Role::Admin].clone();
    let mut failures: Vec<String> = Vec::new();
    let mut requests = 0;

    for o in OPS {
        let method = method_of(o.key);
        if !matches!(method, Method::POST | Method::PUT | Method::PATCH) {
            continue;
        }
        let Some(operation) = documented.get(o.key) else {
            continue;
        };
        let template = template_of(o.key);
        let base = w.prepare(o.key, Role::Admin, Scope::In).await;
        let url = format!("{}{}", w.base, base.path(template));
        let reads_body = !operation["requestBody"].is_null();
        let baseline = base.body.clone().unwrap_or_else(|| json!({}));
        for bad in bad_bodies(&baseline) {
            // An optional body may be left empty.
            if bad.what == "empty" && operation["requestBody"]["required"] != true {
                continue;
            }
            let r = reply(
                w.http
                    .request(method.clone(), &url)
                    .bearer_auth(&admin.token)
                    .header("content-type", bad.content_type)
                    .body(bad.bytes.clone())
                    .send()
                    .await
                    .expect("request"),
            )
            .await;
            requests += 1;
            let what = format!("{} with {}", o.key, bad.what);
            if let Some(f) = judge(&w, Role::Admin, &what, &r) {
                failures.push(f);
            } else if reads_body && !bad.want.contains(&r.status) {
                failures.push(format!(
                    "{what}: {} (want {:?}) {}",
                    r.status, bad.want, r.text
                ));
            }
        }
        // Each declared field, given a value of the wrong type: 422 naming it.
        let Some(fields) = body_fields(&doc, operation) else {
            continue;
        };
        for f in fields {
            let Some(v) = wrong_value(&f.types) else {
                continue;
            };
            let mut body = baseline.clone();
            set_path(&mut body, &f.path, v);
            let r = w
                .bearer(
                    Role::Admin,
                    &base.path(template),
                    method.clone(),
                    Some(&body),
                )
                .await;
            requests += 1;
            let what = format!("{} with {} of the wrong type", o.key, f.path);
            if let Some(e) = judge(&w, Role::Admin, &what, &r) {
                failures.push(e);
                continue;
            }
            let named = r.body["errors"]
                .as_array()
                .map(|es| {
                    es.iter().any(|e| {
                        e["field"]
                            .as_str()
                            .is_some_and(|x| x == f.path || x.starts_with(&format!("{}.", f.path)))
                    })
                })
                .unwrap_or(false);
            if r.status != 422 || !named {
                failures.push(format!("{what}: {} {}", r.status, r.text));
            }
        }
    }

    // What reqwest will not send: an oversized chunked body (no Content-Length), a body
    // shorter than its Content-Length, a Content-Length beyond reason.
    let port = port_of(&w);
    let a1 = w.a1;
    let auth = format!("Authorization: Bearer {}\r\n", admin.token);
    let mut chunked = format!(
        "POST /api/v1/alerts/{a1}/resolve HTTP/1.1\r\nHost: x\r\n{auth}\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    chunked.extend_from_slice(b"1\r\n{\r\n");
    for _ in 0..80 {
        chunked.extend_from_slice(b"400\r\n");
        chunked.extend_from_slice(&[b' '; 1024]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    requests += 1;
    match raw_http(port, &chunked).await {
        Some(413) => {}
        other => failures.push(format!("80 KiB chunked body: {other:?}, want 413")),
    }
    let short = format!(
        "POST /api/v1/alerts/{a1}/resolve HTTP/1.1\r\nHost: x\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"note\": \"x"
    );
    requests += 1;
    if let Some(s) = raw_http(port, short.as_bytes()).await {
        if s >= 500 {
            failures.push(format!("body shorter than its Content-Length: {s}"));
        }
    }
    let huge = format!(
        "POST /api/v1/alerts/{a1}/resolve HTTP/1.1\r\nHost: x\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: 99999999999\r\nConnection: close\r\n\r\n{{"
    );
    requests += 1;
    match raw_http(port, huge.as_bytes()).await {
        Some(413) => {}
        other => failures.push(format!("Content-Length 99999999999: {other:?}, want 413")),
    }

    assert!(
        failures.is_empty(),
        "{} of {requests} malformed requests misbehaved:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // Still healthy, still answering, and nothing was resolved by a broken request.
    let (code, _) = http_get(&format!("{}/healthz", w.base))
        .await
        .expect("healthz");
    assert_eq!(code, 200);
    let (code, body) = http_get(&format!("{}/readyz", w.base))
        .await
        .expect("readyz");
    assert_eq!(code, 200, "{body}");
    let r = w.bearer(Role::Admin, "/api/v1/me", Method::GET, None).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        w.db.count(&format!(
            "SELECT count(*) FROM alerts WHERE id = {a1} AND status = 'open'"
        ))
        .await,
        1,
        "the alert a broken body tried to resolve is still open"
    );
    eprintln!(
        "malformed bodies: {requests} requests in {:?}",
        started.elapsed()
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_forms_refuse_oversized_and_garbled_bodies() {
    let w = World::new().await;
    let gw = w.creds[&Role::GridWorker].clone();
    let cookie = format!("{}={}", silverguard::api::auth::SESSION_COOKIE, gw.cookie);
    let a = w.alert(w.e1, &w.d1).await;
    let wo = w.work_order(w.e1, "new").await;
    let csrf = urlencode(&gw.csrf);
    // Redirects are answers too (the console redirects after a form); do not follow them.
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let mut failures = Vec::new();
    let post = |path: String, ctype: &'static str, bytes: Vec<u8>| {
        let mut req = http
            .post(format!("{}{path}", w.base))
            .header("cookie", &cookie)
            .body(bytes);
        if !ctype.is_empty() {
            req = req.header("content-type", ctype);
        }
        req.send()
    };
    let forms = [
        "/login".to_string(),
        format!("/alerts/{a}/ack"),
        format!("/alerts/{a}/resolve"),
        format!("/elders/{}/care", w.e1),
        format!("/elders/{}/work-orders", w.e1),
        format!("/work-orders/{wo}/cancel"),
        "/logout".to_string(),
    ];
    // Refused, whatever the form: nothing may happen.
    let refused: Vec<(&str, &'static str, Vec<u8>, Vec<u16>)> = vec![
        (
            "3 MiB",
            "application/x-www-form-urlencoded",
            format!("csrf={csrf}&note={}", "y".repeat(3 << 20)).into_bytes(),
            vec![413],
        ),
        (
            "garbled percent-encoding",
            "application/x-www-form-urlencoded",
            b"%zz%=&&==%ff%fe&csrf=%".to_vec(),
            vec![400, 401, 403, 422],
        ),
        (
            "JSON instead of a form",
            "application/json",
            format!("{{\"csrf\": \"{}\"}}", gw.csrf).into_bytes(),
            vec![400, 415],
        ),
        (
            "no content type",
            "",
            format!("csrf={csrf}").into_bytes(),
            vec![400, 415],
        ),
    ];
    let (mut answered, mut resets) = (0, 0);
    for path in &forms {
        for (what, ctype, bytes, want) in &refused {
            let status = match post(path.clone(), ctype, bytes.clone()).await {
                Ok(res) => res.status().as_u16(),
                // The service answered 413 and closed while the client was still sending:
                // the client may see the reset instead of the answer.
                Err(e) if want.contains(&413) && (e.is_request() || e.is_body()) => {
                    resets += 1;
                    continue;
                }
                Err(e) => panic!("POST {path} with {what}: {e}"),
            };
            answered += 1;
            if !want.contains(&status) {
                failures.push(format!("POST {path} with {what}: {status} (want {want:?})"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!("console forms: {answered} refusals answered, {resets} oversized sends reset");
    let open = format!("SELECT count(*) FROM alerts WHERE id = {a} AND status = 'open'");
    assert_eq!(w.db.count(&open).await, 1, "no refused form acknowledged");
    assert_eq!(
        w.db.count(&format!(
            "SELECT count(*) FROM work_orders WHERE id = {wo} AND status = 'new'"
        ))
        .await,
        1
    );
    let r = w
        .send(Method::GET, "/api/v1/me", Kind::Session, Some(&gw), None)
        .await;
    assert_eq!(r.status, 200, "the session survived: {}", r.text);

    // Odd but readable (bytes that are not UTF-8 are read as U+FFFD; a long note): any
    // answer but a 5xx, and the service carries on.
    let odd: Vec<(&str, Vec<u8>)> = vec![
        (
            "invalid UTF-8",
            [
                &b"csrf="[..],
                csrf.as_bytes(),
                &b"&note=\xff\xfe\xc3\x28&kind=\xc0\xaf&username=\xff&password=\xfe"[..],
            ]
            .concat(),
        ),
        (
            "100 KiB",
            format!("csrf={csrf}&note={}&kind=visit", "x".repeat(100 * 1024)).into_bytes(),
        ),
    ];
    for path in &forms {
        for (what, bytes) in &odd {
            let res = post(
                path.clone(),
                "application/x-www-form-urlencoded",
                bytes.clone(),
            )
            .await
            .unwrap_or_else(|e| panic!("POST {path} with {what}: {e}"));
            if res.status().is_server_error() {
                failures.push(format!("POST {path} with {what}: {}", res.status()));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let (code, _) = http_get(&format!("{}/healthz", w.base))
        .await
        .expect("healthz");
    assert_eq!(code, 200);
    w.stop().await;
}

async fn ack(w: &World, method: Method, token: &str) -> Reply {
    reply(
        w.http
            .request(method, format!("{}/ack/{token}", w.base))
            .send()
            .await
            .expect("ack request"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_altered_and_foreign_ack_links_are_refused() {
    let w = World::new().await;
    let alert = w.alert(w.e1, &w.d1).await;
    let now = chrono::Utc::now().timestamp();
    let link = |expires_at: i64, nonce: i64| AckLink {
        alert_id: alert,
        contact_id: w.c1,
        expires_at,
        nonce,
    };
    let key = LINK_SECRET.as_bytes();
    let open = "SELECT count(*) FROM alerts WHERE status = 'open' AND id = ";

    // Expired a minute ago: the page says so, and neither GET nor POST acknowledges.
    let expired = link(now - 60, 1).sign(key);
    for m in [Method::GET, Method::POST] {
        let r = ack(&w, m.clone(), &expired).await;
        assert_eq!(r.status, 403, "{m} expired: {}", r.text);
        assert!(
            r.text.contains("expired") && r.text.contains("过期"),
            "{}",
            r.text
        );
    }
    // The same link with its expiry pushed into the future: the signature no longer fits.
    let (body, sig) = expired.rsplit_once('.').unwrap();
    let mut parts: Vec<String> = body.split('.').map(String::from).collect();
    parts[2] = (now + 3600).to_string();
    let extended = format!("{}.{sig}", parts.join("."));
    let r = ack(&w, Method::POST, &extended).await;
    assert_eq!(r.status, 403, "{}", r.text);
    assert!(r.text.contains("not valid"), "{}", r.text);
    // Valid in every other way, but signed with another key.
    let foreign = link(now + 3600, 2).sign(b"another-key-another-key-another-key!");
    assert_eq!(ack(&w, Method::POST, &foreign).await.status, 403);
    // Another alert's number in an otherwise valid link.
    let valid = link(now + 3600, 3).sign(key);
    let other = valid.replacen(&format!("{alert}."), &format!("{}.", w.a2), 1);
    assert_eq!(ack(&w, Method::POST, &other).await.status, 403);
    assert_eq!(w.db.count(&format!("{open}{alert}")).await, 1);
    assert_eq!(
        w.db.count("SELECT count(*) FROM ack_link_uses").await,
        0,
        "a refused link is not recorded as used"
    );

    // The control: the same alert's valid link works, once; an expired one stays refused
    // after the alert is acknowledged.
    let r = ack(&w, Method::POST, &valid).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(w.db.count(&format!("{open}{alert}")).await, 0);
    assert_eq!(ack(&w, Method::POST, &valid).await.status, 409);
    assert_eq!(ack(&w, Method::POST, &expired).await.status, 403);
    // One second past its expiry is too late.
    let a2 = w.alert(w.e1b, &w.d1).await;
    let edge = AckLink {
        alert_id: a2,
        contact_id: 0,
        expires_at: now - 1,
        nonce: 4,
    }
    .sign(key);
    assert_eq!(ack(&w, Method::POST, &edge).await.status, 403);
    w.stop().await;
}
