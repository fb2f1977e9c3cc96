//! Settings of the notification channels, mounted as `[notify]` in the service settings:
//! the SMTP relay for email, the SMS provider, and the IM group-robot flavour.
//!
//! ```toml
//! [notify.email]
//! url = "smtp://user:password@mail.example.org:587?tls=starttls"   # SILVERGUARD_SMTP_URL
//! from = "Silverguard <alerts@example.org>"
//! timeout = "10s"
//!
//! [notify.sms]
//! provider = "aliyun"          # webhook | twilio | aliyun | none
//! access_key_id = "..."
//! access_key_secret = "..."
//! sign_name = "银龄守护"
//! template_code = "SMS_123456789"
//!
//! [notify.im]
//! kind = "dingtalk"            # wecom | dingtalk
//! dingtalk_secret = "SEC..."
//! ```
//!
//! The email URL forms, chosen so that whether a password can travel in clear is visible in
//! the URL itself:
//! - `smtp://host[:port]` or `smtp://host?tls=none`: plain SMTP (port 25 by default);
//! - `smtp://host[:port]?tls=starttls`: STARTTLS is required (port 587 by default);
//! - `smtp://host[:port]?tls=opportunistic`: STARTTLS when the server offers it, else plain;
//! - `smtps://host[:port]`: implicit TLS (port 465 by default);
//! - `user:password@` before the host enables AUTH (PLAIN or LOGIN); percent-encode `@`, `:`
//!   and `/` in them.

use std::time::Duration;

use serde::Deserialize;

use crate::config::Secret;

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct NotifySettings {
    pub email: EmailSettings,
    pub sms: SmsSettings,
    pub im: ImSettings,
}

impl NotifySettings {
    /// Every problem found, each naming its setting (`notify.sms.url ...`).
    pub fn validate(&self) -> Vec<String> {
        let mut p = self.email.validate();
        p.extend(self.sms.validate());
        p.extend(self.im.validate());
        p
    }
}

/// How the SMTP connection is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpSecurity {
    /// No TLS at all.
    None,
    /// STARTTLS, and fail when the server does not offer it.
    StartTls,
    /// STARTTLS when offered, plain otherwise.
    Opportunistic,
    /// TLS from the first byte (`smtps://`).
    Tls,
}

/// The parts of `notify.email.url`.
#[derive(Clone, PartialEq, Eq)]
pub struct SmtpEndpoint {
    pub host: String,
    pub port: u16,
    pub security: SmtpSecurity,
    pub user: Option<String>,
    pub password: Option<Secret>,
    /// Name to use in EHLO (the URL's path), when set.
    pub hello_name: Option<String>,
}

impl std::fmt::Debug for SmtpEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpEndpoint")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("security", &self.security)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .finish()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmailSettings {
    /// SMTP relay URL (see the module docs); empty disables email. Set by
    /// `SILVERGUARD_SMTP_URL`. A secret because it may carry the password.
    pub url: Secret,
    /// The `From:` mailbox, `Name <address>` or a bare address.
    pub from: String,
    /// Limit for each SMTP command (connect, greeting, each reply); a whole send is bounded by
    /// a few of these.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Pooled SMTP connections kept open to the relay, so an SOS does not wait for a TCP and
    /// TLS handshake.
    pub pool_max_size: u32,
    /// A PEM file of extra CA certificates trusted for the relay (an internal relay with a
    /// private CA); the system roots are always trusted.
    pub ca_file: Option<String>,
}

impl Default for EmailSettings {
    fn default() -> Self {
        EmailSettings {
            url: Secret::default(),
            from: "Silverguard <alerts@localhost>".into(),
            timeout: Duration::from_secs(10),
            pool_max_size: 4,
            ca_file: None,
        }
    }
}

impl EmailSettings {
    pub fn enabled(&self) -> bool {
        !self.url.expose().trim().is_empty()
    }

    /// Parses `url` into its parts; the error names the setting and never shows the password.
    pub fn endpoint(&self) -> Result<SmtpEndpoint, String> {
        parse_smtp_url(self.url.expose().trim())
            .map_err(|e| format!("notify.email.url (SILVERGUARD_SMTP_URL): {e}"))
    }

    pub fn validate(&self) -> Vec<String> {
        let mut p = Vec::new();
        if !self.enabled() {
            return p;
        }
        match self.endpoint() {
            Ok(ep) => {
                if ep.password.is_some()
                    && ep.security == SmtpSecurity::None
                    && !is_loopback(&ep.host)
                {
                    p.push(format!(
                        "notify.email.url (SILVERGUARD_SMTP_URL) would send the SMTP password \
                         in clear to {}: add ?tls=starttls (or ?tls=opportunistic) or use smtps://",
                        ep.host
                    ));
                }
            }
            Err(e) => p.push(e),
        }
        if let Err(e) = self.from.parse::<lettre::message::Mailbox>() {
            p.push(format!(
                "notify.email.from {:?} is not a mailbox (\"Name <address>\"): {e}",
                self.from
            ));
        }
        if self.timeout.is_zero() {
            p.push("notify.email.timeout must be more than 0".into());
        }
        if self.pool_max_size == 0 {
            p.push("notify.email.pool_max_size must be at least 1".into());
        }
        if let Some(f) = &self.ca_file {
            if let Err(e) = std::fs::metadata(f) {
                p.push(format!("notify.email.ca_file {f}: {e}"));
            }
        }
        p
    }
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

/// Parses an SMTP URL. Errors never include the URL (it may hold a password).
pub fn parse_smtp_url(raw: &str) -> Result<SmtpEndpoint, String> {
    let url = url::Url::parse(raw).map_err(|e| format!("not a URL: {e}"))?;
    let host = url
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or("has no host")?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let tls = url
        .query_pairs()
        .find(|(k, _)| k == "tls")
        .map(|(_, v)| v.to_ascii_lowercase());
    if let Some((k, _)) = url.query_pairs().find(|(k, _)| k != "tls") {
        return Err(format!("unknown parameter {k:?} (only tls=...)"));
    }
    let (security, default_port) = match (url.scheme(), tls.as_deref()) {
        ("smtp", None | Some("none")) => (SmtpSecurity::None, 25),
        ("smtp", Some("starttls" | "required")) => (SmtpSecurity::StartTls, 587),
        ("smtp", Some("opportunistic")) => (SmtpSecurity::Opportunistic, 587),
        ("smtps", None | Some("tls" | "wrapper")) => (SmtpSecurity::Tls, 465),
        ("smtp", Some(other)) => {
            return Err(format!(
                "tls={other:?} is not one of none, starttls, opportunistic (use smtps:// for implicit TLS)"
            ))
        }
        ("smtps", Some(other)) => return Err(format!("smtps:// takes no tls={other:?}")),
        (scheme, _) => return Err(format!("must start with smtp:// or smtps://, not {scheme}://")),
    };
    let decode = |s: &str| {
        percent_decode(s)
            .ok_or_else(|| "user or password is not valid percent-encoded UTF-8".to_string())
    };
    let user = if url.username().is_empty() {
        None
    } else {
        Some(decode(url.username())?)
    };
    let password = url.password().map(decode).transpose()?.map(Secret::new);
    if password.is_some() && user.is_none() {
        return Err("has a password but no user".into());
    }
    let path = url.path().trim_matches('/');
    Ok(SmtpEndpoint {
        host,
        port: url.port().unwrap_or(default_port),
        security,
        user,
        password,
        hello_name: (!path.is_empty()).then(|| path.to_string()),
    })
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum SmsProvider {
    /// No SMS: notifications fall back to other channels.
    #[default]
    None,
    /// A generic HTTP endpoint taking JSON (an in-house gateway, a carrier's bridge).
    Webhook,
    /// Twilio's Programmable Messaging REST API.
    Twilio,
    /// Alibaba Cloud SMS (dysmsapi), template based, as mainland operators require.
    Aliyun,
}

/// One flat table for every provider: only the chosen provider's fields are read, and their
/// names do not collide, so switching provider is a one-line change.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SmsSettings {
    pub provider: SmsProvider,
    /// Limit for one request to the provider, connect included.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,

    /// webhook: where to POST.
    pub url: String,
    /// webhook: sent as `Authorization: Bearer <token>` when set.
    pub token: Option<Secret>,

    /// twilio: the account SID (`AC...`).
    pub account_sid: String,
    pub auth_token: Secret,
    /// twilio: the sending number in E.164 (`+1...`).
    pub from_number: String,
    /// twilio: API root; overridable for tests and regional edges.
    pub base_url: String,

    /// aliyun: the RAM user's AccessKey.
    pub access_key_id: String,
    pub access_key_secret: Secret,
    /// aliyun: the approved signature (签名), e.g. "银龄守护".
    pub sign_name: String,
    /// aliyun: the approved template (`SMS_...`) with variables `name`, `kind`, `time`, `link`.
    pub template_code: String,
    /// aliyun: API endpoint; overridable for tests.
    pub endpoint: String,
    pub region_id: String,
}

impl Default for SmsSettings {
    fn default() -> Self {
        SmsSettings {
            provider: SmsProvider::None,
            timeout: Duration::from_secs(10),
            url: String::new(),
            token: None,
            account_sid: String::new(),
            auth_token: Secret::default(),
            from_number: String::new(),
            base_url: "https://api.twilio.com".into(),
            access_key_id: String::new(),
            access_key_secret: Secret::default(),
            sign_name: String::new(),
            template_code: String::new(),
            endpoint: "https://dysmsapi.aliyuncs.com".into(),
            region_id: "cn-hangzhou".into(),
        }
    }
}

fn check_http_url(p: &mut Vec<String>, setting: &str, value: &str) {
    match url::Url::parse(value) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => {}
        Ok(_) => p.push(format!(
            "{setting} {value:?} must be an http:// or https:// URL"
        )),
        Err(e) => p.push(format!("{setting} {value:?} is not a URL: {e}")),
    }
}

impl SmsSettings {
    pub fn validate(&self) -> Vec<String> {
        let mut p = Vec::new();
        let mut required = |name: &str, value: &str| {
            if value.trim().is_empty() {
                p.push(format!(
                    "notify.sms.{name} is required when notify.sms.provider = {:?}",
                    provider_name(self.provider)
                ));
            }
        };
        match self.provider {
            SmsProvider::None => {}
            SmsProvider::Webhook => required("url", &self.url),
            SmsProvider::Twilio => {
                required("account_sid", &self.account_sid);
                required("auth_token", self.auth_token.expose());
                required("from_number", &self.from_number);
                required("base_url", &self.base_url);
            }
            SmsProvider::Aliyun => {
                required("access_key_id", &self.access_key_id);
                required("access_key_secret", self.access_key_secret.expose());
                required("sign_name", &self.sign_name);
                required("template_code", &self.template_code);
                required("endpoint", &self.endpoint);
            }
        }
        match self.provider {
            SmsProvider::Webhook if !self.url.is_empty() => {
                check_http_url(&mut p, "notify.sms.url", &self.url)
            }
            SmsProvider::Twilio if !self.base_url.is_empty() => {
                check_http_url(&mut p, "notify.sms.base_url", &self.base_url);
                if !self.account_sid.is_empty()
                    && !self.account_sid.chars().all(|c| c.is_ascii_alphanumeric())
                {
                    p.push("notify.sms.account_sid must be letters and digits (AC...)".into());
                }
            }
            SmsProvider::Aliyun if !self.endpoint.is_empty() => {
                check_http_url(&mut p, "notify.sms.endpoint", &self.endpoint)
            }
            _ => {}
        }
        if self.provider != SmsProvider::None && self.timeout.is_zero() {
            p.push("notify.sms.timeout must be more than 0".into());
        }
        p
    }
}

pub(crate) fn provider_name(p: SmsProvider) -> &'static str {
    match p {
        SmsProvider::None => "none",
        SmsProvider::Webhook => "webhook",
        SmsProvider::Twilio => "twilio",
        SmsProvider::Aliyun => "aliyun",
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ImKind {
    /// WeCom (企业微信) group robot.
    #[default]
    Wecom,
    /// DingTalk (钉钉) group robot.
    Dingtalk,
}

/// The robot webhook URL is per contact (each grid team has its group); what is shared is the
/// flavour and, for DingTalk robots with "加签" (signed) security, the signing secret.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImSettings {
    pub kind: ImKind,
    /// DingTalk's `SEC...` secret; when set every URL is signed with a timestamp.
    pub dingtalk_secret: Option<Secret>,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for ImSettings {
    fn default() -> Self {
        ImSettings {
            kind: ImKind::Wecom,
            dingtalk_secret: None,
            timeout: Duration::from_secs(10),
        }
    }
}

impl ImSettings {
    pub fn validate(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.timeout.is_zero() {
            p.push("notify.im.timeout must be more than 0".into());
        }
        if self.kind == ImKind::Wecom && self.dingtalk_secret.is_some() {
            p.push("notify.im.dingtalk_secret is set but notify.im.kind is \"wecom\"".into());
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<NotifySettings, toml::de::Error> {
        toml::from_str(toml_text)
    }

    #[test]
    fn defaults_are_valid_and_disabled() {
        let s = NotifySettings::default();
        assert!(s.validate().is_empty(), "{:?}", s.validate());
        assert!(!s.email.enabled());
        assert_eq!(s.sms.provider, SmsProvider::None);
    }

    #[test]
    fn full_shape_parses() {
        let s = parse(
            r#"
            [email]
            url = "smtp://u:p%40ss@mail.example.org:2525?tls=starttls"
            from = "Silverguard <alerts@example.org>"
            timeout = "5s"
            [sms]
            provider = "aliyun"
            access_key_id = "id"
            access_key_secret = "secret"
            sign_name = "银龄守护"
            template_code = "SMS_1"
            [im]
            kind = "dingtalk"
            dingtalk_secret = "SECabc"
            "#,
        )
        .unwrap();
        assert!(s.validate().is_empty(), "{:?}", s.validate());
        let ep = s.email.endpoint().unwrap();
        assert_eq!(ep.host, "mail.example.org");
        assert_eq!(ep.port, 2525);
        assert_eq!(ep.security, SmtpSecurity::StartTls);
        assert_eq!(ep.user.as_deref(), Some("u"));
        assert_eq!(ep.password.as_ref().map(|p| p.expose()), Some("p@ss"));
        assert!(!format!("{ep:?}").contains("p@ss"));
        assert!(!format!("{s:?}").contains("secret\""));
        assert_eq!(s.email.timeout, Duration::from_secs(5));
        assert_eq!(s.im.kind, ImKind::Dingtalk);
    }

    #[test]
    fn unknown_fields_are_rejected() {
        assert!(parse("[sms]\nprovidr = \"twilio\"").is_err());
        assert!(parse("[sms]\nprovider = \"carrier-pigeon\"").is_err());
        assert!(parse("[im]\nkind = \"slack\"").is_err());
    }

    #[test]
    fn smtp_url_forms() {
        let p = |u: &str| parse_smtp_url(u);
        let e = p("smtp://127.0.0.1:2525").unwrap();
        assert_eq!((e.security, e.port), (SmtpSecurity::None, 2525));
        assert_eq!(p("smtp://h").unwrap().port, 25);
        assert_eq!(p("smtp://h?tls=none").unwrap().security, SmtpSecurity::None);
        let e = p("smtp://h?tls=starttls").unwrap();
        assert_eq!((e.security, e.port), (SmtpSecurity::StartTls, 587));
        assert_eq!(
            p("smtp://h?tls=opportunistic").unwrap().security,
            SmtpSecurity::Opportunistic
        );
        let e = p("smtps://h").unwrap();
        assert_eq!((e.security, e.port), (SmtpSecurity::Tls, 465));
        assert_eq!(
            p("smtp://h/relay.example.org")
                .unwrap()
                .hello_name
                .as_deref(),
            Some("relay.example.org")
        );
        assert!(p("http://h").is_err());
        assert!(p("smtp://h?tls=maybe").is_err());
        assert!(p("smtp://h?foo=1").is_err());
        assert!(p("smtp://:pw@h").is_err());
        let err = p("smtp://user:hunter2@h?tls=bad").unwrap_err();
        assert!(!err.contains("hunter2"));
    }

    #[test]
    fn validate_names_settings() {
        let mut s = NotifySettings::default();
        s.email.url = Secret::new("smtp://u:pw@mail.example.org");
        s.email.from = "not a mailbox".into();
        s.sms.provider = SmsProvider::Twilio;
        s.sms.base_url = "ftp://x".into();
        let problems = s.validate();
        let all = problems.join("\n");
        assert!(all.contains("in clear"), "{all}");
        assert!(all.contains("notify.email.from"), "{all}");
        assert!(all.contains("notify.sms.account_sid is required"), "{all}");
        assert!(all.contains("notify.sms.auth_token is required"), "{all}");
        assert!(all.contains("notify.sms.from_number is required"), "{all}");
        assert!(all.contains("notify.sms.base_url"), "{all}");
        assert!(!all.contains("pw@"), "no secrets in problems: {all}");

        // Password to a loopback relay in clear is fine (local test sink, local postfix).
        let mut s = NotifySettings::default();
        s.email.url = Secret::new("smtp://u:pw@127.0.0.1:2525");
        assert!(s.validate().is_empty(), "{:?}", s.validate());

        let mut s = NotifySettings::default();
        s.sms.provider = SmsProvider::Webhook;
        assert!(s
            .validate()
            .join("\n")
            .contains("notify.sms.url is required"));
        s.sms.url = "http://127.0.0.1:9/sms".into();
        assert!(s.validate().is_empty());

        let mut s = NotifySettings::default();
        s.sms.provider = SmsProvider::Aliyun;
        let all = s.validate().join("\n");
        for f in [
            "access_key_id",
            "access_key_secret",
            "sign_name",
            "template_code",
        ] {
            assert!(
                all.contains(&format!("notify.sms.{f} is required")),
                "{all}"
            );
        }
    }
}
