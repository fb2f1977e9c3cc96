//! `/login` and `/logout`.

use std::net::SocketAddr;
use std::sync::Arc;

use askama::Template;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Form;
use serde::Deserialize;

use super::{i18n, pick_lang, render, safe_next, Chrome, PageResult, Viewer};
use crate::api::auth::{self, LoginError};
use crate::api::ApiState;
use crate::notify::templates::Lang;

#[derive(Template)]
#[template(path = "console/login.html")]
struct LoginPage {
    c: Chrome,
    username: String,
    next: String,
}

#[derive(Deserialize, Default)]
pub struct LoginQuery {
    next: Option<String>,
    bye: Option<String>,
}

fn lang_of(headers: &HeaderMap, uri: &axum::http::Uri) -> Lang {
    let (mut parts, _) = axum::http::Request::new(()).into_parts();
    parts.headers = headers.clone();
    parts.uri = uri.clone();
    pick_lang(&parts as &Parts, None)
}

pub async fn form(
    headers: HeaderMap,
    uri: axum::http::Uri,
    Query(q): Query<LoginQuery>,
) -> PageResult {
    let lang = lang_of(&headers, &uri);
    let mut c = Chrome::anonymous(lang, i18n::t(lang, "login.title"));
    c.path = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/login".into());
    if q.bye.is_some() {
        c.flash = Some(i18n::t(lang, "login.logged_out").into());
    }
    render(&LoginPage {
        c,
        username: String::new(),
        next: safe_next(q.next.as_deref()),
    })
}

#[derive(Deserialize)]
pub struct LoginForm {
    username: String,
    password: String,
    next: Option<String>,
}

pub async fn submit(
    State(state): State<Arc<ApiState>>,
    connect: Option<axum::extract::Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    Form(f): Form<LoginForm>,
) -> PageResult {
    let lang = lang_of(&headers, &uri);
    let client = auth::client_addr(
        connect.as_ref().map(|e| e.0 .0),
        &headers,
        &state.trusted_proxies,
    );
    let username = f.username.trim().to_string();
    let next = safe_next(f.next.as_deref());
    let fail = |status: StatusCode, message: String| -> PageResult {
        let mut c = Chrome::anonymous(lang, i18n::t(lang, "login.title"));
        c.error = Some(message);
        let mut res = render(&LoginPage {
            c,
            username: username.clone(),
            next: next.clone(),
        })?;
        *res.status_mut() = status;
        Ok(res)
    };
    match auth::login(
        &state.pool,
        &state.login_limiter,
        &username,
        &f.password,
        &client,
    )
    .await
    {
        Ok(p) => {
            let (token, _csrf) = auth::create_session(&state.pool, p.user_id)
                .await
                .map_err(|e| super::Failure::Unavailable(lang, e.to_string()))?;
            Ok((
                StatusCode::SEE_OTHER,
                [
                    (header::LOCATION, next.clone()),
                    (
                        header::SET_COOKIE,
                        auth::session_cookie(&token, state.cookie_secure),
                    ),
                ],
            )
                .into_response())
        }
        Err(LoginError::Rejected) => fail(
            StatusCode::UNAUTHORIZED,
            i18n::t(lang, "login.rejected").into(),
        ),
        Err(LoginError::RateLimited { retry_after_s }) => {
            let mut res = fail(
                StatusCode::TOO_MANY_REQUESTS,
                format!("{}{retry_after_s}", i18n::t(lang, "login.rate_limited")),
            )?;
            if let Ok(v) = retry_after_s.to_string().parse() {
                res.headers_mut().insert(header::RETRY_AFTER, v);
            }
            Ok(res)
        }
        Err(LoginError::Failed(e)) => {
            tracing::warn!(error = %e, "console login failed");
            fail(
                StatusCode::SERVICE_UNAVAILABLE,
                i18n::t(lang, "login.failed").into(),
            )
        }
    }
}

#[derive(Deserialize)]
pub struct CsrfForm {
    pub csrf: Option<String>,
}

pub async fn logout(
    State(state): State<Arc<ApiState>>,
    viewer: Viewer,
    headers: HeaderMap,
    Form(f): Form<CsrfForm>,
) -> Result<Response, super::Failure> {
    viewer.check_csrf(f.csrf.as_deref())?;
    let (mut parts, _) = axum::http::Request::new(()).into_parts();
    parts.headers = headers;
    if let Some(token) = super::cookie(&parts, auth::SESSION_COOKIE) {
        auth::end_session(&state.pool, token)
            .await
            .map_err(|e| super::Failure::Unavailable(viewer.lang, e.to_string()))?;
    }
    Ok((
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, "/login?bye=1".to_string()),
            (
                header::SET_COOKIE,
                auth::clear_session_cookie(state.cookie_secure),
            ),
        ],
    )
        .into_response())
}
