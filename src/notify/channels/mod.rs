//! Delivery channels: the code that hands one rendered message to the outside world and says
//! whether it was accepted, and if not, whether trying again later can help.
//!
//! - email over SMTP ([`email`], lettre, pooled connections, STARTTLS / TLS / plain, AUTH);
//! - SMS through an [`SmsGateway`]: a generic JSON webhook, Twilio, or Aliyun SMS ([`sms`]);
//! - IM group robots, WeCom or DingTalk ([`im`]).
//!
//! Channels know nothing of alerts, the outbox or retries: the notifier decides what to send
//! and what to do with a [`DeliveryError`]. [`DeliveryError::Transient`] means "the same
//! request may succeed later" (timeouts, connection refused, 5xx, 429, SMTP 4xx, provider
//! throttling); [`DeliveryError::Permanent`] means "retrying the same request will fail the
//! same way" (bad recipient, bad credentials, rejected template, other 4xx) and the notifier
//! should fall back to another channel instead.
//!
//! Logging: phone numbers are logged masked ([`mask_phone`]), secrets never.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::settings::{EmailSettings, ImKind, ImSettings, SmsProvider, SmsSettings};
use super::templates::Lang;

pub mod email;
pub mod im;
pub mod sms;

/// A message the provider accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// `smtp`, `webhook`, `twilio`, `aliyun`, `wecom`, `dingtalk`.
    pub provider: &'static str,
    /// The provider's id for the message (Twilio SID, Aliyun BizId, Message-ID), when known.
    pub provider_ref: Option<String>,
}

/// Why a message was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// Retry later: timeouts, connection refused, 5xx, 429, SMTP 4xx, provider throttling.
    #[error("transient delivery failure: {0}")]
    Transient(String),
    /// Do not retry the same request: invalid recipient, bad credentials, other 4xx, SMTP 5xx.
    #[error("permanent delivery failure: {0}")]
    Permanent(String),
}

impl DeliveryError {
    pub fn is_transient(&self) -> bool {
        matches!(self, DeliveryError::Transient(_))
    }
    pub fn message(&self) -> &str {
        match self {
            DeliveryError::Transient(m) | DeliveryError::Permanent(m) => m,
        }
    }
}

/// A channel that cannot be built from its settings.
#[derive(Debug, thiserror::Error)]
pub enum ChannelConfigError {
    #[error("{setting}: {reason}")]
    Invalid {
        setting: &'static str,
        reason: String,
    },
    #[error("cannot build the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
}

pub struct EmailMessage<'a> {
    /// One mailbox: `address` or `Name <address>`.
    pub to: &'a str,
    pub subject: &'a str,
    pub text: &'a str,
    pub html: &'a str,
    /// Stable across retries of the same notification; becomes the Message-ID so a relay or
    /// mailbox that sees a retry can recognise it.
    pub idempotency_key: &'a str,
}

pub struct SmsMessage<'a> {
    /// E.164 (`+8613800138000`) or a national number the provider accepts.
    pub to: &'a str,
    pub text: &'a str,
    pub lang: Lang,
    /// Template variables for template-only providers (Aliyun): `name`, `kind`, `time`,
    /// `link` (see [`crate::notify::templates::sms_template_params`]).
    pub params: &'a BTreeMap<String, String>,
    pub idempotency_key: &'a str,
}

pub struct ImMessage<'a> {
    /// The group robot's webhook URL (stored on the contact).
    pub webhook_url: &'a str,
    pub title: &'a str,
    pub markdown: &'a str,
    /// Phones to @-mention (DingTalk; WeCom markdown cannot mention by phone).
    pub mention_phones: &'a [String],
}

#[async_trait]
pub trait EmailSender: Send + Sync {
    async fn send(&self, m: &EmailMessage<'_>) -> Result<Delivery, DeliveryError>;
}

#[async_trait]
pub trait SmsGateway: Send + Sync {
    fn name(&self) -> &'static str;
    async fn send(&self, m: &SmsMessage<'_>) -> Result<Delivery, DeliveryError>;
}

#[async_trait]
pub trait ImSender: Send + Sync {
    async fn send(&self, m: &ImMessage<'_>) -> Result<Delivery, DeliveryError>;
}

/// The SMTP sender, or `None` when `notify.email.url` is empty. Call it inside the Tokio
/// runtime: the connection pool starts its idle-connection reaper task.
pub fn email_sender(s: &EmailSettings) -> Result<Option<Arc<dyn EmailSender>>, ChannelConfigError> {
    if !s.enabled() {
        return Ok(None);
    }
    Ok(Some(Arc::new(email::SmtpSender::new(s)?)))
}

/// The configured SMS provider, or `None` for `provider = "none"`.
pub fn sms_gateway(s: &SmsSettings) -> Result<Option<Arc<dyn SmsGateway>>, ChannelConfigError> {
    let problems = s.validate();
    if !problems.is_empty() {
        return Err(ChannelConfigError::Invalid {
            setting: "notify.sms",
            reason: problems.join("; "),
        });
    }
    Ok(match s.provider {
        SmsProvider::None => None,
        SmsProvider::Webhook => Some(Arc::new(sms::WebhookGateway::new(s)?)),
        SmsProvider::Twilio => Some(Arc::new(sms::TwilioGateway::new(s)?)),
        SmsProvider::Aliyun => Some(Arc::new(sms::AliyunGateway::new(s)?)),
    })
}

/// The IM robot sender for the configured flavour.
pub fn im_sender(s: &ImSettings) -> Arc<dyn ImSender> {
    let client = match http_client(s.timeout) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the HTTP client for IM robots");
            return Arc::new(UnavailableIm(format!("IM: no HTTP client: {e}")));
        }
    };
    match s.kind {
        ImKind::Wecom => Arc::new(im::WecomSender::new(client)),
        ImKind::Dingtalk => Arc::new(im::DingtalkSender::new(client, s.dingtalk_secret.clone())),
    }
}

/// The HTTP client every HTTP channel uses: rustls, an overall per-request timeout, a shorter
/// connect timeout (a dead provider should fail fast so the notifier can fall back), and no
/// redirects (a provider API never redirects; following one could leak credentials).
pub(crate) fn http_client(timeout: Duration) -> Result<reqwest::Client, reqwest::Error> {
    let timeout = if timeout.is_zero() {
        Duration::from_secs(10)
    } else {
        timeout
    };
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("silverguard/", env!("CARGO_PKG_VERSION")))
        .pool_idle_timeout(Duration::from_secs(60))
        .build()
}

/// Stands in for the IM sender when no HTTP client could be built (the TLS backend failed
/// to initialise), so that the failure shows on every IM notification instead of stopping
/// the service, whose email and SMS may still work.
struct UnavailableIm(String);

#[async_trait]
impl ImSender for UnavailableIm {
    async fn send(&self, _m: &ImMessage<'_>) -> Result<Delivery, DeliveryError> {
        Err(DeliveryError::Permanent(self.0.clone()))
    }
}

/// Maps a failed request (no HTTP status) to a delivery error. Everything that is not a bug
/// in the request itself is worth retrying: connect refused, reset, timeout, TLS hiccup.
pub(crate) fn map_reqwest_error(provider: &str, e: &reqwest::Error) -> DeliveryError {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    // reqwest's Display includes the URL; for Twilio and Aliyun that has no secrets (they go
    // in headers and the signature), but strip it anyway: webhook URLs may embed tokens.
    let text = e.without_url_ref();
    if e.is_builder() {
        DeliveryError::Permanent(format!("{provider}: invalid request: {text}"))
    } else {
        DeliveryError::Transient(format!("{provider}: {what}: {text}"))
    }
}

trait WithoutUrlRef {
    fn without_url_ref(&self) -> String;
}

impl WithoutUrlRef for reqwest::Error {
    fn without_url_ref(&self) -> String {
        let mut s = self.to_string();
        if let Some(u) = self.url() {
            s = s.replace(u.as_str(), "<url>");
        }
        let mut src = std::error::Error::source(self);
        while let Some(inner) = src {
            s.push_str(": ");
            s.push_str(&inner.to_string());
            src = inner.source();
        }
        s
    }
}

/// HTTP status classes: 408, 425, 429 and 5xx are worth retrying; any other 4xx is not.
pub(crate) fn status_is_transient(status: reqwest::StatusCode) -> bool {
    status.is_server_error() || matches!(status.as_u16(), 408 | 425 | 429)
}

/// Keeps at most `max` characters of a provider's response for error messages.
pub(crate) fn snippet(body: &str, max: usize) -> String {
    let one_line: String = body
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(max)
        .collect();
    one_line.trim().to_string()
}

/// `+8613800138000` → `+86138****8000`: enough to tell contacts apart in a log, not enough to
/// call an elder's family.
pub fn mask_phone(phone: &str) -> String {
    let chars: Vec<char> = phone.chars().collect();
    let n = chars.len();
    if n <= 4 {
        return "*".repeat(n);
    }
    let keep_end = 4;
    let keep_start = (n - keep_end).saturating_sub(4).min(6);
    let mut out: String = chars[..keep_start].iter().collect();
    out.push_str(&"*".repeat(n - keep_start - keep_end));
    out.extend(&chars[n - keep_end..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phones_are_masked() {
        assert_eq!(mask_phone("13800138000"), "138****8000");
        assert_eq!(mask_phone("+8613800138000"), "+86138****8000");
        assert_eq!(mask_phone("+15005550006"), "+150****0006");
        assert_eq!(mask_phone("110"), "***");
        assert_eq!(mask_phone("12345678"), "****5678");
        assert!(!mask_phone("13800138000").contains("0013"));
    }

    #[test]
    fn status_classes() {
        use reqwest::StatusCode as S;
        assert!(status_is_transient(S::TOO_MANY_REQUESTS));
        assert!(status_is_transient(S::BAD_GATEWAY));
        assert!(status_is_transient(S::REQUEST_TIMEOUT));
        assert!(!status_is_transient(S::BAD_REQUEST));
        assert!(!status_is_transient(S::UNAUTHORIZED));
        assert!(!status_is_transient(S::NOT_FOUND));
    }

    #[test]
    fn factories_follow_settings() {
        assert!(email_sender(&EmailSettings::default()).unwrap().is_none());
        assert!(sms_gateway(&SmsSettings::default()).unwrap().is_none());
        let bad = SmsSettings {
            provider: SmsProvider::Twilio,
            ..Default::default()
        };
        let err = sms_gateway(&bad)
            .err()
            .expect("incomplete twilio settings rejected");
        assert!(err.to_string().contains("notify.sms.account_sid"), "{err}");
        let s = SmsSettings {
            provider: SmsProvider::Webhook,
            url: "http://127.0.0.1:9/sms".into(),
            ..Default::default()
        };
        assert_eq!(sms_gateway(&s).unwrap().unwrap().name(), "webhook");
    }
}
