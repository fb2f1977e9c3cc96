//! Request extractors of `/api/v1` whose every failure is a problem document naming the
//! field at fault: [`ApiJson`] for bodies (content type, size, syntax, shape) and [`Params`]
//! for query strings (typed, with unknown parameters refused so that a typo in a filter does
//! not silently widen a result).

use std::collections::HashSet;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use chrono::{DateTime, NaiveDate, Utc};
use serde::de::DeserializeOwned;

use crate::api::problem::{FieldError, Problem};
use crate::api::query::{Cursor, DEFAULT_LIMIT, MAX_LIMIT};

/// Largest request body the API accepts.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// A JSON body. Wrong content type: 415; too large: 413; malformed: 400; well-formed but the
/// wrong shape: 422 naming the field (`thresholds.hr_high.above`).
pub struct ApiJson<T>(pub T);

fn is_json(req: &Request) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|m| {
            let m = m.trim().to_ascii_lowercase();
            m == "application/json" || (m.starts_with("application/") && m.ends_with("+json"))
        })
        .unwrap_or(false)
}

fn not_json() -> Problem {
    Problem::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "Unsupported media type")
        .typed("unsupported-media-type")
        .detail("send the body as JSON with Content-Type: application/json")
}

async fn read_body<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, Problem> {
    // A declared length over the limit is refused before a byte is read, so a client cannot
    // hold a connection open trickling a body that will be refused anyway.
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    let bytes = Bytes::from_request(req, state).await.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large()
        } else {
            Problem::bad_request(format!("could not read the body: {}", e.body_text()))
        }
    })?;
    if bytes.len() > MAX_BODY_BYTES {
        return Err(too_large());
    }
    Ok(bytes)
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Problem> {
        if !is_json(&req) {
            return Err(not_json());
        }
        let bytes = read_body(req, state).await?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// A JSON body that may be left out entirely (then `T::default()`), for actions whose body
/// only adds optional detail (`POST /alerts/{id}/ack`).
pub struct OptionalJson<T>(pub T);

impl<T: DeserializeOwned + Default, S: Send + Sync> FromRequest<S> for OptionalJson<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Problem> {
        let json = is_json(&req);
        let bytes = read_body(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJson(T::default()));
        }
        if !json {
            return Err(not_json());
        }
        parse_json(&bytes).map(OptionalJson)
    }
}

pub fn too_large() -> Problem {
    Problem::new(StatusCode::PAYLOAD_TOO_LARGE, "Payload too large")
        .typed("payload-too-large")
        .detail(format!(
            "request bodies are limited to {} KiB",
            MAX_BODY_BYTES / 1024
        ))
}

/// Deserializes a JSON document, naming the field of a shape error.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Problem> {
    // PostgreSQL cannot store NUL in text: refuse it here, naming the field, rather than
    // fail in the database with a 500.
    if has_nul_escape(bytes) {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(bytes) {
            if let Some(field) = nul_path(&v, "") {
                let field = if field.is_empty() {
                    "body".into()
                } else {
                    field
                };
                return Err(Problem::invalid_field(&field, NUL_MESSAGE));
            }
        }
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = match serde_path_to_error::deserialize(&mut de) {
        Ok(v) => v,
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            return Err(match inner.classify() {
                serde_json::error::Category::Data => {
                    let message = strip_position(&inner.to_string());
                    let field = if path.is_empty() || path == "." {
                        quoted_field(&message).unwrap_or_else(|| "body".into())
                    } else {
                        path
                    };
                    Problem::invalid(vec![FieldError { field, message }])
                }
                _ => Problem::bad_request(format!("malformed JSON: {inner}")),
            });
        }
    };
    de.end()
        .map_err(|e| Problem::bad_request(format!("malformed JSON: {e}")))?;
    Ok(value)
}

const NUL_MESSAGE: &str = "must not contain NUL characters (\\u0000)";

/// Whether a JSON text contains the escape `\u0000` (raw NUL is not valid JSON). Backslashes
/// only occur in strings, and an escaped backslash is skipped with its escape.
fn has_nul_escape(bytes: &[u8]) -> bool {
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            if bytes.get(i + 1) == Some(&b'u') && bytes.get(i + 2..i + 6) == Some(&b"0000"[..]) {
                return true;
            }
            i += 2;
        } else {
            i += 1;
        }
    }
    false
}

/// Where in a document a NUL character is (in a key or a string), as serde_path_to_error
/// names fields: `note`, `link.role`, `regions[1]`.
fn nul_path(v: &serde_json::Value, at: &str) -> Option<String> {
    use serde_json::Value;
    match v {
        Value::String(s) if s.contains('\0') => Some(at.to_string()),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, x)| nul_path(x, &format!("{at}[{i}]"))),
        Value::Object(m) => m.iter().find_map(|(k, x)| {
            let here = if at.is_empty() {
                k.clone()
            } else {
                format!("{at}.{k}")
            };
            if k.contains('\0') {
                Some(here)
            } else {
                nul_path(x, &here)
            }
        }),
        _ => None,
    }
}

/// serde's "missing field `note` at line 1 column 2" -> "missing field `note`".
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

/// The field a message about the top level quotes (`missing field `note``).
fn quoted_field(message: &str) -> Option<String> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(message[start..start + len].to_string())
}

/// The query string, read parameter by parameter. Problems are collected (each naming its
/// parameter) and reported together by [`Params::finish`].
pub struct Params {
    pairs: Vec<(String, String)>,
    used: HashSet<String>,
    errors: Vec<FieldError>,
}

impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Problem> {
        Ok(Params::parse(parts.uri.query().unwrap_or("")))
    }
}

impl Params {
    pub fn parse(query: &str) -> Params {
        Params {
            pairs: url::form_urlencoded::parse(query.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
            used: HashSet::new(),
            errors: Vec::new(),
        }
    }

    pub fn error(&mut self, field: &str, message: impl Into<String>) {
        self.errors.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }

    /// Every value given for `name` (repeated keys), trimmed, empty ones dropped.
    fn values(&mut self, name: &str) -> Vec<String> {
        self.used.insert(name.to_string());
        let values: Vec<String> = self
            .pairs
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .collect();
        if values.iter().any(|v| v.contains('\0')) {
            self.error(name, NUL_MESSAGE);
            return Vec::new();
        }
        values
    }

    /// The last value of `name`, if any.
    pub fn raw(&mut self, name: &str) -> Option<String> {
        self.values(name).pop()
    }

    pub fn string(&mut self, name: &str, max_chars: usize) -> Option<String> {
        let v = self.raw(name)?;
        if v.chars().count() > max_chars {
            self.error(name, format!("at most {max_chars} characters"));
            return None;
        }
        Some(v)
    }

    pub fn i64(&mut self, name: &str) -> Option<i64> {
        let v = self.raw(name)?;
        match v.parse() {
            Ok(n) => Some(n),
            Err(_) => {
                self.error(name, format!("{v:?} is not an integer"));
                None
            }
        }
    }

    pub fn bool(&mut self, name: &str) -> Option<bool> {
        let v = self.raw(name)?;
        match v.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => Some(true),
            "false" | "0" | "no" => Some(false),
            _ => {
                self.error(name, format!("{v:?} is not true or false"));
                None
            }
        }
    }

    /// RFC 3339 (`2025-03-04T08:00:00+08:00`), or a date (midnight China Standard Time).
    pub fn time(&mut self, name: &str) -> Option<DateTime<Utc>> {
        let v = self.raw(name)?;
        if let Ok(t) = DateTime::parse_from_rfc3339(&v) {
            return Some(t.with_timezone(&Utc));
        }
        if let Ok(d) = NaiveDate::parse_from_str(&v, "%Y-%m-%d") {
            let cst = chrono::FixedOffset::east_opt(8 * 3600).expect("UTC+8");
            if let Some(t) = d
                .and_hms_opt(0, 0, 0)
                .and_then(|t| t.and_local_timezone(cst).single())
            {
                return Some(t.with_timezone(&Utc));
            }
        }
        self.error(
            name,
            format!("{v:?} is not a time: use RFC 3339 (2025-03-04T08:00:00+08:00) or a date"),
        );
        None
    }

    pub fn date(&mut self, name: &str) -> Option<NaiveDate> {
        let v = self.raw(name)?;
        match NaiveDate::parse_from_str(&v, "%Y-%m-%d") {
            Ok(d) => Some(d),
            Err(_) => {
                self.error(name, format!("{v:?} is not a date (YYYY-MM-DD)"));
                None
            }
        }
    }

    /// One of `allowed`.
    pub fn one_of(&mut self, name: &str, allowed: &[&str]) -> Option<String> {
        let v = self.raw(name)?;
        if allowed.contains(&v.as_str()) {
            Some(v)
        } else {
            self.error(name, format!("{v:?} is not one of {}", allowed.join(", ")));
            None
        }
    }

    /// Any of `allowed`, given comma-separated and/or repeated (`status=open,acknowledged`).
    pub fn list(&mut self, name: &str, allowed: Option<&[&str]>) -> Vec<String> {
        let mut out = Vec::new();
        for v in self.values(name) {
            for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                match allowed {
                    Some(a) if !a.contains(&item) => {
                        self.error(name, format!("{item:?} is not one of {}", a.join(", ")));
                    }
                    _ => {
                        if !out.iter().any(|o| o == item) {
                            out.push(item.to_string());
                        }
                    }
                }
            }
        }
        out
    }

    /// `limit`: 1 to 500, 50 when absent.
    pub fn limit(&mut self) -> i64 {
        match self.i64("limit") {
            None => DEFAULT_LIMIT,
            Some(n) if (1..=MAX_LIMIT).contains(&n) => n,
            Some(_) => {
                self.error("limit", format!("1 to {MAX_LIMIT}"));
                DEFAULT_LIMIT
            }
        }
    }

    /// `cursor`, as returned in `next_cursor`.
    pub fn cursor(&mut self) -> Option<Cursor> {
        let v = self.raw("cursor")?;
        match Cursor::decode(&v) {
            Some(c) => Some(c),
            None => {
                self.error(
                    "cursor",
                    "not a cursor from this API: pass next_cursor back as is",
                );
                None
            }
        }
    }

    /// The cursor of a list ordered by id.
    pub fn id_cursor(&mut self) -> Option<i64> {
        let c = self.cursor()?;
        let id = c.as_id();
        if id.is_none() {
            self.error("cursor", "not a cursor of this list");
        }
        id
    }

    pub fn text_cursor(&mut self) -> Option<String> {
        let c = self.cursor()?;
        let t = c.as_text().map(str::to_string);
        if t.is_none() {
            self.error("cursor", "not a cursor of this list");
        }
        t
    }

    pub fn time_id_cursor(&mut self) -> Option<(DateTime<Utc>, i64)> {
        let c = self.cursor()?;
        let t = c.as_time_id();
        if t.is_none() {
            self.error("cursor", "not a cursor of this list");
        }
        t
    }

    /// 422 with every problem found, including parameters this endpoint does not know
    /// (names starting with `_`, such as cache busters, are ignored).
    pub fn finish(mut self) -> Result<(), Problem> {
        let unknown: Vec<String> = self
            .pairs
            .iter()
            .map(|(k, _)| k.clone())
            .filter(|k| !k.starts_with('_') && !self.used.contains(k))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        for k in unknown {
            self.error(&k, "not a parameter of this endpoint");
        }
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(Problem::invalid(self.errors))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Body {
        note: String,
        inner: Option<Inner>,
    }

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Inner {
        n: i32,
    }

    #[test]
    fn json_problems_name_the_field() {
        let p = parse_json::<Body>(br#"{}"#).unwrap_err();
        assert_eq!(p.status, 422);
        assert_eq!(p.errors[0].field, "note");
        let p = parse_json::<Body>(br#"{"note": "x", "inner": {"n": "a"}}"#).unwrap_err();
        assert_eq!(p.errors[0].field, "inner.n");
        let p = parse_json::<Body>(br#"{"note": "#).unwrap_err();
        assert_eq!(p.status, 400);
        let p = parse_json::<Body>(br#"{"note": "x"} trailing"#).unwrap_err();
        assert_eq!(p.status, 400);
        assert!(parse_json::<Body>(br#"{"note": "x"}"#).is_ok());
    }

    #[test]
    fn nul_characters_are_refused_naming_the_field() {
        let p = parse_json::<Body>(br#"{"note": "a\u0000b"}"#).unwrap_err();
        assert_eq!((p.status, p.errors[0].field.as_str()), (422, "note"));
        let p = parse_json::<Body>(br#"{"note": "x", "inner": {"n": 1, "m": ["", "\u0000"]}}"#)
            .unwrap_err();
        assert_eq!(p.errors[0].field, "inner.m[1]");
        // An escaped backslash followed by "u0000" is text, not NUL.
        assert!(parse_json::<Body>(br#"{"note": "\\u0000"}"#).is_ok());
        let mut q = Params::parse("q=a%00b&limit=5");
        assert_eq!(q.string("q", 100), None);
        q.limit();
        assert_eq!(q.finish().unwrap_err().errors[0].field, "q");
    }

    #[test]
    fn params_collect_every_problem() {
        let mut p = Params::parse("limit=0&status=open,bogus&since=yesterday&x=1&_=5");
        p.limit();
        p.list("status", Some(&["open", "resolved"]));
        p.time("since");
        let e = p.finish().unwrap_err();
        let fields: Vec<_> = e.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["limit", "status", "since", "x"]);
    }

    #[test]
    fn params_parse_values() {
        let mut p =
            Params::parse("has_device=yes&since=2025-03-04&status=open&status=acknowledged");
        assert_eq!(p.bool("has_device"), Some(true));
        assert_eq!(
            p.time("since").unwrap().to_rfc3339(),
            "2025-03-03T16:00:00+00:00"
        );
        assert_eq!(p.list("status", None), ["open", "acknowledged"]);
        assert!(p.finish().is_ok());
    }
}
