//! The console: server-rendered pages for grid workers (on a phone), supervisors (at a desk)
//! and guardians (at home), in Chinese and English.
//!
//! - `/login`, `/logout`: password login into a session cookie; every form carries the
//!   session's CSRF token.
//! - `/`: the live alert board, pushed over SSE (`/console/events`) from one LISTEN per
//!   process (`live.rs`), each stream filtered by its user's scope (`board.rs`).
//! - `/alerts/{id}`: timeline, map links, vitals, acknowledge and resolve.
//! - `/elders`, `/elders/{id}`: the register in scope, profile, 24-hour vitals as SVG, visits,
//!   calls and work orders.
//! - `/fleet`, `/dashboard`, `/work-orders`.
//!
//! Every page needs a session (otherwise a redirect to `/login`), every lookup is scoped by
//! `sg_user_elder_ids` (404 outside it), output is escaped by askama, and the headers forbid
//! framing and any script or style not served by this binary.

pub mod alert;
pub mod board;
pub mod charts;
pub mod data;
pub mod elder;
pub mod i18n;
pub mod live;
pub mod login;
pub mod pages;

use std::sync::{Arc, OnceLock};

use askama::Template;
use axum::extract::{FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;

use super::auth::{self, Principal, UserRole};
use super::ApiState;
use crate::notify::templates::Lang;

/// The cookie that remembers `?lang=`.
pub const LANG_COOKIE: &str = "sg_lang";

const CSS: &str = include_str!("static/console.css");
const JS: &str = include_str!("static/console.js");

pub fn router() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/", get(board::page))
        .route("/login", get(login::form).post(login::submit))
        .route("/logout", post(login::logout))
        .route("/console/events", get(board::events))
        .route("/console/board/rows", get(board::rows))
        .route("/console/static/{file}", get(asset))
        .route("/alerts/{id}", get(alert::page))
        .route("/alerts/{id}/ack", post(alert::acknowledge))
        .route("/alerts/{id}/resolve", post(alert::resolve))
        .route("/elders", get(elder::list))
        .route("/elders/{id}", get(elder::page))
        .route("/elders/{id}/care", post(elder::record_care))
        .route("/elders/{id}/work-orders", post(elder::create_work_order))
        .route("/fleet", get(pages::fleet))
        .route("/dashboard", get(pages::dashboard))
        .route("/work-orders", get(pages::work_orders))
        .route("/work-orders/{id}/{action}", post(pages::work_order_action))
        .layer(middleware::from_fn(headers))
}

/// Security headers on every console response, and the `?lang=` cookie.
async fn headers(req: Request, next: Next) -> Response {
    let chosen = query_lang(req.uri().query());
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; \
             frame-ancestors 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        // Pages carry personal data: never from a shared cache or the back-forward disk.
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    if let Some(lang) = chosen {
        if let Ok(v) = HeaderValue::from_str(&format!(
            "{LANG_COOKIE}={}; Path=/; Max-Age=31536000; SameSite=Lax",
            lang.as_str()
        )) {
            h.append(header::SET_COOKIE, v);
        }
    }
    res
}

fn query_lang(query: Option<&str>) -> Option<Lang> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "lang")
        .and_then(|(_, v)| match v {
            "zh-CN" | "zh" => Some(Lang::ZhCn),
            "en" => Some(Lang::En),
            _ => None,
        })
}

pub(crate) fn cookie<'a>(parts: &'a Parts, name: &str) -> Option<&'a str> {
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

/// `?lang=`, then the cookie, then the user's setting, then the browser's preference.
pub fn pick_lang(parts: &Parts, user_lang: Option<&str>) -> Lang {
    if let Some(l) = query_lang(parts.uri.query()) {
        return l;
    }
    if let Some(l) = cookie(parts, LANG_COOKIE).and_then(Lang::parse) {
        return l;
    }
    if let Some(l) = user_lang.and_then(Lang::parse) {
        return l;
    }
    parts
        .headers
        .get(header::ACCEPT_LANGUAGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .and_then(|v| Lang::parse(v.split(';').next().unwrap_or_default()))
        .unwrap_or_default()
}

/// A signed-in console user, with the language this request is answered in.
pub struct Viewer {
    pub p: Principal,
    pub lang: Lang,
    /// Path and query of this request (for the language switch).
    pub path: String,
}

impl Viewer {
    pub fn t(&self, key: &str) -> &'static str {
        i18n::t(self.lang, key)
    }

    pub fn user_id(&self) -> i64 {
        self.p.user_id
    }

    pub fn csrf(&self) -> String {
        self.p.csrf_token().unwrap_or_default().to_string()
    }

    /// Form POSTs must carry the session's token.
    pub fn check_csrf(&self, submitted: Option<&str>) -> Result<(), Failure> {
        self.p
            .check_csrf(submitted)
            .map_err(|_| Failure::Csrf(self.lang))
    }

    pub fn chrome(&self, nav: &'static str, title: impl Into<String>) -> Chrome {
        Chrome {
            lang: self.lang,
            user: Some(ChromeUser {
                name: self.p.display_name.clone(),
                role: i18n::t(self.lang, &format!("role.{}", self.p.role.as_str())),
                is_guardian: self.p.role == UserRole::Guardian,
            }),
            csrf: self.csrf(),
            nav,
            title: title.into(),
            flash: None,
            error: None,
            path: self.path.clone(),
        }
    }

    pub fn not_found(&self) -> Failure {
        Failure::NotFound(self.lang)
    }

    /// Care staff (not family): they record visits and calls and move work orders along.
    pub fn is_staff(&self) -> bool {
        self.p.role != UserRole::Guardian
    }

    pub fn require_staff(&self) -> Result<(), Failure> {
        if self.is_staff() {
            Ok(())
        } else {
            Err(Failure::Forbidden(self.lang))
        }
    }
}

impl FromRequestParts<Arc<ApiState>> for Viewer {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<ApiState>,
    ) -> Result<Self, Self::Rejection> {
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        match auth::authenticate(&state.pool, parts).await {
            Ok(Some(p)) => {
                let lang = pick_lang(parts, Some(&p.language));
                Ok(Viewer { p, lang, path })
            }
            Ok(None) => {
                // Only GETs come back to where they were going; a POST would lose its body.
                let next = if parts.method == axum::http::Method::GET {
                    format!("/login?next={}", urlencode(&path))
                } else {
                    "/login".to_string()
                };
                Err(Redirect::to(&next).into_response())
            }
            Err(problem) => Err(Failure::Unavailable(
                pick_lang(parts, None),
                problem.detail.unwrap_or_default(),
            )
            .into_response()),
        }
    }
}

pub fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Where to go after login: only a path on this site (no `//host`, no scheme).
pub fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n)
            if n.starts_with('/')
                && !n.starts_with("//")
                && !n.starts_with("/\\")
                && !n.contains(['\r', '\n'])
                && !n.starts_with("/login") =>
        {
            n.to_string()
        }
        _ => "/".to_string(),
    }
}

pub struct ChromeUser {
    pub name: String,
    pub role: &'static str,
    pub is_guardian: bool,
}

/// What every page's frame needs: language, user, CSRF token, navigation, messages.
pub struct Chrome {
    pub lang: Lang,
    pub user: Option<ChromeUser>,
    pub csrf: String,
    pub nav: &'static str,
    pub title: String,
    pub flash: Option<String>,
    pub error: Option<String>,
    pub path: String,
}

impl Chrome {
    pub fn anonymous(lang: Lang, title: impl Into<String>) -> Chrome {
        Chrome {
            lang,
            user: None,
            csrf: String::new(),
            nav: "",
            title: title.into(),
            flash: None,
            error: None,
            path: "/login".into(),
        }
    }

    pub fn t(&self, key: &str) -> &'static str {
        i18n::t(self.lang, key)
    }

    pub fn lang_code(&self) -> &'static str {
        self.lang.as_str()
    }

    /// This page in the other language.
    pub fn lang_href(&self) -> String {
        let other = match self.lang {
            Lang::ZhCn => "en",
            Lang::En => "zh-CN",
        };
        let (path, query) = self.path.split_once('?').unwrap_or((&self.path, ""));
        let mut kept: Vec<&str> = query
            .split('&')
            .filter(|kv| !kv.is_empty() && !kv.starts_with("lang=") && !kv.starts_with("done="))
            .collect();
        let lang = format!("lang={other}");
        kept.push(&lang);
        format!("{path}?{}", kept.join("&"))
    }

    pub fn asset_v(&self) -> &'static str {
        asset_version()
    }

    pub fn with_flash(mut self, flash: Option<String>) -> Chrome {
        self.flash = flash;
        self
    }
}

fn asset_version() -> &'static str {
    static V: OnceLock<String> = OnceLock::new();
    V.get_or_init(|| {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(CSS.as_bytes());
        h.update(JS.as_bytes());
        h.finalize()[..6]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    })
}

async fn asset(Path(file): Path<String>) -> Response {
    let (body, ctype) = match file.as_str() {
        "console.css" => (CSS, "text/css; charset=utf-8"),
        "console.js" => (JS, "text/javascript; charset=utf-8"),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, ctype),
            // Links carry ?v=<hash of the assets>, so a new build is fetched at once.
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        body,
    )
        .into_response()
}

/// Why a console request failed, rendered as a short page in the request's language.
#[derive(Debug)]
pub enum Failure {
    NotFound(Lang),
    Csrf(Lang),
    /// The role may not do this (guardians moving work orders along).
    Forbidden(Lang),
    Unavailable(Lang, String),
    Internal(String),
}

#[derive(Template)]
#[template(path = "console/error.html")]
struct ErrorPage {
    c: Chrome,
    message: &'static str,
    /// The same in the other language: an error page may be the first thing a user sees.
    other: &'static str,
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let (status, lang, key) = match &self {
            Failure::NotFound(l) => (StatusCode::NOT_FOUND, *l, "err.not_found"),
            Failure::Csrf(l) => (StatusCode::FORBIDDEN, *l, "err.csrf"),
            Failure::Forbidden(l) => (StatusCode::FORBIDDEN, *l, "err.forbidden"),
            Failure::Unavailable(l, cause) => {
                tracing::warn!(error = %cause, "console: unavailable");
                (StatusCode::SERVICE_UNAVAILABLE, *l, "err.unavailable")
            }
            Failure::Internal(cause) => {
                tracing::error!(error = %cause, "console: request failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Lang::ZhCn,
                    "err.unavailable",
                )
            }
        };
        let other = match lang {
            Lang::ZhCn => Lang::En,
            Lang::En => Lang::ZhCn,
        };
        let page = ErrorPage {
            c: Chrome::anonymous(lang, i18n::t(lang, key)),
            message: i18n::t(lang, key),
            other: i18n::t(other, key),
        };
        match page.render() {
            Ok(html) => (status, Html(html)).into_response(),
            Err(_) => (status, i18n::t(lang, key)).into_response(),
        }
    }
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Failure {
        if e.is_closed() {
            Failure::Unavailable(Lang::default(), e.to_string())
        } else {
            Failure::Internal(e.to_string())
        }
    }
}

impl From<deadpool_postgres::PoolError> for Failure {
    fn from(e: deadpool_postgres::PoolError) -> Failure {
        Failure::Unavailable(Lang::default(), e.to_string())
    }
}

impl From<askama::Error> for Failure {
    fn from(e: askama::Error) -> Failure {
        Failure::Internal(format!("template: {e}"))
    }
}

impl From<crate::store::StoreError> for Failure {
    fn from(e: crate::store::StoreError) -> Failure {
        if e.is_transient() {
            Failure::Unavailable(Lang::default(), e.to_string())
        } else {
            Failure::Internal(e.to_string())
        }
    }
}

pub type PageResult = Result<Response, Failure>;

/// Renders a template as an HTML response.
pub fn render<T: Template>(t: &T) -> PageResult {
    Ok(Html(t.render()?).into_response())
}

/// After a successful form POST: back to the page, with a message key to show.
pub fn see_other(path: &str) -> Response {
    (
        StatusCode::SEE_OTHER,
        [(header::LOCATION, path.to_string())],
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_stays_on_this_site() {
        assert_eq!(safe_next(Some("/alerts/5")), "/alerts/5");
        assert_eq!(safe_next(Some("//evil.example/")), "/");
        assert_eq!(safe_next(Some("/\\evil.example")), "/");
        assert_eq!(safe_next(Some("https://evil.example/")), "/");
        assert_eq!(safe_next(Some("/login?next=/x")), "/");
        assert_eq!(safe_next(None), "/");
    }

    #[test]
    fn lang_switch_keeps_the_query() {
        let mut c = Chrome::anonymous(Lang::ZhCn, "x");
        c.path = "/work-orders?status=open&lang=zh-CN".into();
        assert_eq!(c.lang_href(), "/work-orders?status=open&lang=en");
        c.lang = Lang::En;
        c.path = "/".into();
        assert_eq!(c.lang_href(), "/?lang=zh-CN");
    }

    #[test]
    fn query_lang_accepts_only_known_tags() {
        assert_eq!(query_lang(Some("a=1&lang=en")), Some(Lang::En));
        assert_eq!(query_lang(Some("lang=zh-CN")), Some(Lang::ZhCn));
        assert_eq!(query_lang(Some("lang=fr")), None);
        assert_eq!(query_lang(None), None);
    }

    #[test]
    fn urlencode_keeps_paths_readable() {
        assert_eq!(urlencode("/alerts/5?x=1&y"), "/alerts/5%3Fx%3D1%26y");
    }
}
