//! RFC 7807 problem documents: every error of `/api/v1` has the same shape, and validation
//! errors name the field they are about.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// One invalid field of a request.
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq, Eq)]
pub struct FieldError {
    /// The field, as named in the request (`name`, `region`, `thresholds.hr_high.above`).
    pub field: String,
    pub message: String,
}

/// `application/problem+json` (RFC 7807).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Problem {
    /// A URI naming the problem type; `about:blank` when the status says it all.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

impl Problem {
    pub fn new(status: StatusCode, title: impl Into<String>) -> Problem {
        Problem {
            kind: "about:blank".into(),
            title: title.into(),
            status: status.as_u16(),
            detail: None,
            errors: Vec::new(),
        }
    }

    pub fn typed(mut self, kind: &str) -> Problem {
        self.kind = format!("https://silverguard.dev/problems/{kind}");
        self
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Problem {
        self.detail = Some(detail.into());
        self
    }

    pub fn unauthorized() -> Problem {
        Problem::new(StatusCode::UNAUTHORIZED, "Authentication required")
            .typed("unauthorized")
            .detail("log in, or send Authorization: Bearer <token>")
    }

    pub fn forbidden(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::FORBIDDEN, "Forbidden")
            .typed("forbidden")
            .detail(detail)
    }

    /// Also what a record outside the caller's scope answers: its existence is not disclosed.
    pub fn not_found(what: &str) -> Problem {
        Problem::new(StatusCode::NOT_FOUND, "Not found")
            .typed("not-found")
            .detail(format!("no such {what}"))
    }

    pub fn conflict(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::CONFLICT, "Conflict")
            .typed("conflict")
            .detail(detail)
    }

    pub fn invalid(errors: Vec<FieldError>) -> Problem {
        let mut p =
            Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "Validation failed").typed("validation");
        p.detail = Some(
            errors
                .iter()
                .map(|e| format!("{}: {}", e.field, e.message))
                .collect::<Vec<_>>()
                .join("; "),
        );
        p.errors = errors;
        p
    }

    pub fn invalid_field(field: &str, message: impl Into<String>) -> Problem {
        Problem::invalid(vec![FieldError {
            field: field.into(),
            message: message.into(),
        }])
    }

    pub fn bad_request(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::BAD_REQUEST, "Bad request")
            .typed("bad-request")
            .detail(detail)
    }

    pub fn too_many(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::TOO_MANY_REQUESTS, "Too many requests")
            .typed("rate-limited")
            .detail(detail)
    }

    /// The cause goes to the log, not to the client.
    pub fn internal(cause: &dyn std::fmt::Display) -> Problem {
        tracing::error!(error = %cause, "request failed");
        Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal error").typed("internal")
    }

    pub fn unavailable(cause: &dyn std::fmt::Display) -> Problem {
        tracing::warn!(error = %cause, "request failed: database unavailable");
        Problem::new(StatusCode::SERVICE_UNAVAILABLE, "Service unavailable")
            .typed("unavailable")
            .detail("the database is not answering; retry shortly")
    }

    pub fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self).unwrap_or_default();
        (
            self.status_code(),
            [(header::CONTENT_TYPE, "application/problem+json")],
            body,
        )
            .into_response()
    }
}

impl From<tokio_postgres::Error> for Problem {
    fn from(e: tokio_postgres::Error) -> Problem {
        if e.is_closed() {
            return Problem::unavailable(&e);
        }
        if let Some(db) = e.as_db_error() {
            use tokio_postgres::error::SqlState;
            let code = db.code();
            if *code == SqlState::UNIQUE_VIOLATION {
                return Problem::conflict(db.detail().unwrap_or(db.message()).to_string());
            }
            if *code == SqlState::CHECK_VIOLATION
                || *code == SqlState::FOREIGN_KEY_VIOLATION
                || *code == SqlState::NOT_NULL_VIOLATION
            {
                return Problem::bad_request(db.message().to_string());
            }
            // Text the database cannot hold (a NUL character from a path parameter): the
            // request's fault, and not worth an error in the log.
            if *code == SqlState::CHARACTER_NOT_IN_REPERTOIRE
                || *code == SqlState::UNTRANSLATABLE_CHARACTER
            {
                return Problem::bad_request("text must not contain NUL characters (\\u0000)");
            }
        }
        Problem::internal(&e)
    }
}

impl From<deadpool_postgres::PoolError> for Problem {
    fn from(e: deadpool_postgres::PoolError) -> Problem {
        Problem::unavailable(&e)
    }
}

pub type ApiResult<T> = Result<T, Problem>;
