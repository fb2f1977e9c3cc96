//! Email over SMTP with lettre: a pooled async transport (so an SOS does not pay for a TCP
//! and TLS handshake), multipart/alternative text + HTML, a Message-ID derived from the
//! notification's idempotency key, and SMTP replies mapped to transient (4xx, network,
//! timeout) or permanent (5xx: unknown mailbox, authentication refused) failures.

use std::time::Duration;

use async_trait::async_trait;
use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::transport::smtp::PoolConfig;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use sha2::{Digest, Sha256};

use super::{ChannelConfigError, Delivery, DeliveryError, EmailMessage, EmailSender};
use crate::notify::settings::{EmailSettings, SmtpSecurity};

const SETTING: &str = "notify.email.url";

pub struct SmtpSender {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    /// Right-hand side of generated Message-IDs: the sender's domain, so the IDs are ours.
    id_domain: String,
    /// Bound on a whole send (connect, TLS, AUTH, MAIL, RCPT, DATA); lettre's own timeout is
    /// per command.
    send_timeout: Duration,
    /// For logs: `host:port`, never the URL (it may carry a password).
    relay: String,
}

impl SmtpSender {
    pub fn new(s: &EmailSettings) -> Result<SmtpSender, ChannelConfigError> {
        let invalid = |reason: String| ChannelConfigError::Invalid {
            setting: SETTING,
            reason,
        };
        let ep = s.endpoint().map_err(invalid)?;
        let from: Mailbox = s.from.parse().map_err(|e| ChannelConfigError::Invalid {
            setting: "notify.email.from",
            reason: format!("{:?} is not a mailbox: {e}", s.from),
        })?;
        let tls_params = || -> Result<TlsParameters, ChannelConfigError> {
            let mut b = TlsParameters::builder(ep.host.clone());
            if let Some(path) = &s.ca_file {
                let pem = std::fs::read(path).map_err(|e| ChannelConfigError::Invalid {
                    setting: "notify.email.ca_file",
                    reason: format!("{path}: {e}"),
                })?;
                let cert =
                    Certificate::from_pem(&pem).map_err(|e| ChannelConfigError::Invalid {
                        setting: "notify.email.ca_file",
                        reason: format!("{path}: {e}"),
                    })?;
                b = b.add_root_certificate(cert);
            }
            b.build_rustls().map_err(|e| ChannelConfigError::Invalid {
                setting: SETTING,
                reason: format!("TLS setup: {e}"),
            })
        };
        let tls = match ep.security {
            SmtpSecurity::None => Tls::None,
            SmtpSecurity::StartTls => Tls::Required(tls_params()?),
            SmtpSecurity::Opportunistic => Tls::Opportunistic(tls_params()?),
            SmtpSecurity::Tls => Tls::Wrapper(tls_params()?),
        };
        let timeout = if s.timeout.is_zero() {
            Duration::from_secs(10)
        } else {
            s.timeout
        };
        let mut b = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(ep.host.clone())
            .port(ep.port)
            .tls(tls)
            .timeout(Some(timeout))
            .pool_config(
                PoolConfig::new()
                    .max_size(s.pool_max_size.max(1))
                    // Relays drop idle clients after a minute or so (Postfix: 300 s);
                    // closing first avoids sending into a half-dead connection.
                    .idle_timeout(Duration::from_secs(50)),
            );
        if let Some(user) = &ep.user {
            let password = ep
                .password
                .as_ref()
                .map(|p| p.expose().to_string())
                .unwrap_or_default();
            b = b
                .credentials(Credentials::new(user.clone(), password))
                .authentication(vec![Mechanism::Plain, Mechanism::Login]);
        }
        if let Some(name) = &ep.hello_name {
            b = b.hello_name(ClientId::Domain(name.clone()));
        }
        let id_domain = from.email.domain().to_string();
        Ok(SmtpSender {
            transport: b.build(),
            from,
            id_domain,
            // connect + greeting + EHLO + (STARTTLS + EHLO) + AUTH + MAIL + RCPT + DATA + body:
            // each is bounded by `timeout`, but a slow-drip server could chain them.
            send_timeout: timeout * 4,
            relay: format!("{}:{}", ep.host, ep.port),
        })
    }

    fn build(&self, m: &EmailMessage<'_>) -> Result<Message, DeliveryError> {
        let to: Mailbox = m.to.trim().parse().map_err(|e| {
            DeliveryError::Permanent(format!("smtp: invalid recipient {:?}: {e}", m.to))
        })?;
        Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(one_line(m.subject))
            .message_id(Some(message_id(m.idempotency_key, &self.id_domain)))
            .date_now()
            // RFC 3834: tells mail servers and people's vacation responders not to answer.
            .raw_header(HeaderValue::new(
                HeaderName::new_from_ascii_str("Auto-Submitted"),
                "auto-generated".to_string(),
            ))
            .multipart(MultiPart::alternative_plain_html(
                m.text.to_string(),
                m.html.to_string(),
            ))
            .map_err(|e| DeliveryError::Permanent(format!("smtp: cannot build the message: {e}")))
    }
}

fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// `<key@domain>` when the key is made of characters a Message-ID may hold, otherwise a hash
/// of it; either way the same key always gives the same ID, so a retried notification carries
/// the ID of its first attempt.
pub fn message_id(key: &str, domain: &str) -> String {
    let safe = !key.is_empty()
        && key.len() <= 64
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '+' | '='))
        && !key.starts_with('.')
        && !key.ends_with('.')
        && !key.contains("..");
    let left = if safe {
        key.to_string()
    } else {
        let digest = Sha256::digest(key.as_bytes());
        let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
        format!("k{hex}")
    };
    format!("<sg.{left}@{domain}>")
}

/// Whether a connection failed because the relay's certificate was rejected. lettre reports
/// handshake failures as connection errors, with rustls' error inside an `io::Error`, whose
/// `source()` skips the wrapped error; so look inside explicitly.
fn is_certificate_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let tls = err.downcast_ref::<rustls::Error>().or_else(|| {
            err.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(tls) = tls {
            return matches!(
                tls,
                rustls::Error::InvalidCertificate(_)
                    | rustls::Error::NoCertificatesPresented
                    | rustls::Error::UnsupportedNameType
            );
        }
        cur = err.source();
    }
    false
}

fn map_smtp_error(e: &lettre::transport::smtp::Error) -> DeliveryError {
    let msg = format!("smtp: {e}");
    if e.is_permanent() {
        // 5xx: mailbox unknown, relaying denied, authentication failed (535), message refused.
        DeliveryError::Permanent(msg)
    } else if e.is_transient() || e.is_timeout() {
        DeliveryError::Transient(msg)
    } else if e.is_tls() || is_certificate_error(e) {
        // A certificate the system does not trust will not become trusted by retrying: that
        // needs an operator (notify.email.ca_file, or fixing the relay).
        DeliveryError::Permanent(msg)
    } else if e.is_client() {
        // lettre refusing the request (e.g. no common AUTH mechanism): configuration.
        DeliveryError::Permanent(msg)
    } else {
        // Connection refused or reset, I/O, garbled reply, pool shut down: try again later.
        DeliveryError::Transient(msg)
    }
}

#[async_trait]
impl EmailSender for SmtpSender {
    async fn send(&self, m: &EmailMessage<'_>) -> Result<Delivery, DeliveryError> {
        let message = self.build(m)?;
        let id = message.headers().get_raw("Message-ID").map(str::to_string);
        let result = tokio::time::timeout(self.send_timeout, self.transport.send(message)).await;
        match result {
            Ok(Ok(response)) => {
                tracing::debug!(
                    relay = %self.relay,
                    code = %response.code(),
                    reply = response.first_line().unwrap_or_default(),
                    "email accepted"
                );
                Ok(Delivery {
                    provider: "smtp",
                    provider_ref: id,
                })
            }
            Ok(Err(e)) => {
                let err = map_smtp_error(&e);
                tracing::warn!(relay = %self.relay, error = %err, "email not accepted");
                Err(err)
            }
            Err(_) => {
                tracing::warn!(relay = %self.relay, "email send timed out");
                Err(DeliveryError::Transient(format!(
                    "smtp: no answer from {} within {:?}",
                    self.relay, self.send_timeout
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    #[test]
    fn message_ids_are_stable_and_valid() {
        assert_eq!(
            message_id("outbox-42-email", "example.org"),
            "<sg.outbox-42-email@example.org>"
        );
        let a = message_id("alert 7 / step 1 / 王", "example.org");
        assert_eq!(a, message_id("alert 7 / step 1 / 王", "example.org"));
        assert!(a.starts_with("<sg.k") && a.ends_with("@example.org>"));
        assert!(!a.contains(' ') && a.is_ascii());
        assert_ne!(a, message_id("alert 7 / step 2 / 王", "example.org"));
    }

    fn settings(url: &str) -> EmailSettings {
        EmailSettings {
            url: Secret::new(url),
            from: "Silverguard <alerts@example.org>".into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn builds_for_every_url_form() {
        for url in [
            "smtp://127.0.0.1:2525",
            "smtp://u:p@127.0.0.1:2525?tls=none",
            "smtp://mail.example.org?tls=starttls",
            "smtp://mail.example.org?tls=opportunistic",
            "smtps://u:p@mail.example.org",
        ] {
            SmtpSender::new(&settings(url)).unwrap_or_else(|e| panic!("{url}: {e}"));
        }
        let e = SmtpSender::new(&settings("http://x")).err().unwrap();
        assert!(e.to_string().contains("notify.email.url"), "{e}");
    }

    #[tokio::test]
    async fn message_has_both_parts_and_headers() {
        let s = SmtpSender::new(&settings("smtp://127.0.0.1:2525")).unwrap();
        let m = s
            .build(&EmailMessage {
                to: "王小明 <xm@example.org>",
                subject: "【紧急】王秀英：紧急呼救 SOS\r\nBcc: x@example.org",
                text: "正文",
                html: "<p>正文</p>",
                idempotency_key: "ob-1",
            })
            .unwrap();
        let raw = String::from_utf8(m.formatted()).unwrap();
        assert!(raw.contains("Message-ID: <sg.ob-1@example.org>"), "{raw}");
        assert!(raw.contains("multipart/alternative"));
        assert!(raw.contains("text/plain") && raw.contains("text/html"));
        assert!(raw.contains("Auto-Submitted: auto-generated"));
        assert!(raw.contains("Subject: =?utf-8?"), "encoded subject: {raw}");
        assert!(!raw.contains("\r\nBcc:"));
        let bad = s.build(&EmailMessage {
            to: "not an address",
            subject: "s",
            text: "t",
            html: "h",
            idempotency_key: "k",
        });
        assert!(matches!(bad, Err(DeliveryError::Permanent(_))));
    }
}
