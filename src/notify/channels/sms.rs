//! SMS gateways: a generic JSON webhook, Twilio's REST API and Aliyun SMS (dysmsapi, with its
//! RPC signature). Each maps its provider's answers to [`DeliveryError::Transient`] (retry:
//! throttling, 5xx, network) or [`DeliveryError::Permanent`] (invalid number, credentials,
//! rejected template or signature).

use std::collections::BTreeMap;

use async_trait::async_trait;
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use reqwest::header::{HeaderValue, CONTENT_TYPE};
use serde::Deserialize;

use super::{
    http_client, map_reqwest_error, mask_phone, snippet, status_is_transient, ChannelConfigError,
    Delivery, DeliveryError, SmsGateway, SmsMessage,
};
use crate::config::Secret;
use crate::notify::settings::SmsSettings;

/// Reads at most this much of a provider's answer; error bodies are small, and a broken
/// proxy returning megabytes should not cost memory.
const MAX_BODY: usize = 64 * 1024;

async fn read_body(resp: reqwest::Response) -> String {
    match resp.bytes().await {
        Ok(b) => String::from_utf8_lossy(&b[..b.len().min(MAX_BODY)]).into_owned(),
        Err(_) => String::new(),
    }
}

/// Provider error texts often quote the number ("The 'To' number +8613800138000 is not
/// valid"); they end up in logs and the alert timeline, so mask it there too.
fn without_number(text: String, to: &str) -> String {
    let mut text = text;
    for n in [to.trim().to_string(), aliyun_phone(to)] {
        if n.chars().filter(char::is_ascii_digit).count() >= 5 {
            text = text.replace(&n, &mask_phone(&n));
        }
    }
    text
}

fn host_of(url: &str) -> String {
    url::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

// ---------------------------------------------------------------------------------------------
// Generic webhook

/// POSTs `{"to","text","lang","alert_params","idempotency_key"}` as JSON to a URL, with an
/// optional bearer token; any 2xx is acceptance and a JSON `id` in the answer is kept.
pub struct WebhookGateway {
    client: reqwest::Client,
    url: String,
    token: Option<Secret>,
}

impl WebhookGateway {
    pub fn new(s: &SmsSettings) -> Result<WebhookGateway, ChannelConfigError> {
        Ok(WebhookGateway {
            client: http_client(s.timeout)?,
            url: s.url.clone(),
            token: s.token.clone().filter(|t| !t.expose().is_empty()),
        })
    }
}

#[async_trait]
impl SmsGateway for WebhookGateway {
    fn name(&self) -> &'static str {
        "webhook"
    }

    async fn send(&self, m: &SmsMessage<'_>) -> Result<Delivery, DeliveryError> {
        let body = serde_json::json!({
            "to": m.to,
            "text": m.text,
            "lang": m.lang.as_str(),
            "alert_params": m.params,
            "idempotency_key": m.idempotency_key,
        });
        let mut req = self.client.post(&self.url).json(&body);
        // Also as the conventional header, so a gateway can de-duplicate retries without
        // parsing the body.
        if let Ok(v) = HeaderValue::from_str(m.idempotency_key) {
            req = req.header("Idempotency-Key", v);
        }
        if let Some(t) = &self.token {
            req = req.bearer_auth(t.expose());
        }
        let resp = req
            .send()
            .await
            .map_err(|e| map_reqwest_error("webhook", &e))?;
        let status = resp.status();
        let text = read_body(resp).await;
        if status.is_success() {
            let provider_ref = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| match v.get("id")? {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Number(n) => Some(n.to_string()),
                    _ => None,
                });
            tracing::debug!(to = %mask_phone(m.to), host = %host_of(&self.url), "sms accepted by webhook");
            return Ok(Delivery {
                provider: "webhook",
                provider_ref,
            });
        }
        let msg = without_number(
            format!("webhook: HTTP {status}: {}", snippet(&text, 300)),
            m.to,
        );
        tracing::warn!(to = %mask_phone(m.to), host = %host_of(&self.url), %status, "sms refused by webhook");
        Err(if status_is_transient(status) {
            DeliveryError::Transient(msg)
        } else {
            DeliveryError::Permanent(msg)
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Twilio

/// Twilio Programmable Messaging: `POST /2010-04-01/Accounts/{sid}/Messages.json` with
/// form fields `To`, `From`, `Body` and HTTP basic auth `sid:token`.
pub struct TwilioGateway {
    client: reqwest::Client,
    url: String,
    sid: String,
    token: Secret,
    from: String,
}

#[derive(Deserialize)]
struct TwilioAnswer {
    sid: Option<String>,
    code: Option<i64>,
    message: Option<String>,
}

impl TwilioGateway {
    pub fn new(s: &SmsSettings) -> Result<TwilioGateway, ChannelConfigError> {
        Ok(TwilioGateway {
            client: http_client(s.timeout)?,
            url: format!(
                "{}/2010-04-01/Accounts/{}/Messages.json",
                s.base_url.trim_end_matches('/'),
                s.account_sid
            ),
            sid: s.account_sid.clone(),
            token: s.auth_token.clone(),
            from: s.from_number.clone(),
        })
    }
}

/// Twilio error codes that retrying can fix: 20429 (too many requests), 20500/20503
/// (internal error / service unavailable). Everything else Twilio answers with a 4xx is a
/// problem with the request: 21211 invalid `To`, 21408 region not enabled, 21610 recipient
/// unsubscribed, 21614 not a mobile number, 20003 authentication.
fn twilio_code_is_transient(code: i64) -> bool {
    matches!(code, 20429 | 20500 | 20503)
}

#[async_trait]
impl SmsGateway for TwilioGateway {
    fn name(&self) -> &'static str {
        "twilio"
    }

    async fn send(&self, m: &SmsMessage<'_>) -> Result<Delivery, DeliveryError> {
        let form = [("To", m.to), ("From", self.from.as_str()), ("Body", m.text)];
        let resp = self
            .client
            .post(&self.url)
            .basic_auth(&self.sid, Some(self.token.expose()))
            .form(&form)
            .send()
            .await
            .map_err(|e| map_reqwest_error("twilio", &e))?;
        let status = resp.status();
        let text = read_body(resp).await;
        let answer: Option<TwilioAnswer> = serde_json::from_str(&text).ok();
        if status.is_success() {
            tracing::debug!(to = %mask_phone(m.to), "sms accepted by twilio");
            return Ok(Delivery {
                provider: "twilio",
                provider_ref: answer.and_then(|a| a.sid),
            });
        }
        let (code, message) = answer.map(|a| (a.code, a.message)).unwrap_or((None, None));
        let msg = without_number(
            format!(
                "twilio: HTTP {status}{}: {}",
                code.map(|c| format!(" code {c}")).unwrap_or_default(),
                message.unwrap_or_else(|| snippet(&text, 300))
            ),
            m.to,
        );
        tracing::warn!(to = %mask_phone(m.to), %status, code, "sms refused by twilio");
        let transient = status_is_transient(status) || code.is_some_and(twilio_code_is_transient);
        Err(if transient {
            DeliveryError::Transient(msg)
        } else {
            DeliveryError::Permanent(msg)
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Aliyun SMS

/// Alibaba Cloud SMS `SendSms` (API version 2017-05-25) as an RPC-style signed POST: the
/// parameters, including `Signature`, go form-encoded in the body. Aliyun only sends
/// pre-approved templates, so the message text is not sent; the template variables are.
pub struct AliyunGateway {
    client: reqwest::Client,
    endpoint: String,
    access_key_id: String,
    secret: Secret,
    sign_name: String,
    template_code: String,
    region_id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AliyunAnswer {
    code: Option<String>,
    message: Option<String>,
    biz_id: Option<String>,
}

impl AliyunGateway {
    pub fn new(s: &SmsSettings) -> Result<AliyunGateway, ChannelConfigError> {
        let mut endpoint = s.endpoint.trim_end_matches('/').to_string();
        endpoint.push('/');
        Ok(AliyunGateway {
            client: http_client(s.timeout)?,
            endpoint,
            access_key_id: s.access_key_id.clone(),
            secret: s.access_key_secret.clone(),
            sign_name: s.sign_name.clone(),
            template_code: s.template_code.clone(),
            region_id: s.region_id.clone(),
        })
    }

    /// Every request parameter except `Signature`.
    fn params(&self, m: &SmsMessage<'_>) -> BTreeMap<String, String> {
        let template_param = serde_json::to_string(m.params).unwrap_or_else(|_| "{}".into());
        let nonce = format!("{:032x}", rand::random::<u128>());
        let timestamp = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
        let mut p = BTreeMap::new();
        for (k, v) in [
            ("AccessKeyId", self.access_key_id.as_str()),
            ("Action", "SendSms"),
            ("Format", "JSON"),
            ("PhoneNumbers", &aliyun_phone(m.to)),
            ("RegionId", self.region_id.as_str()),
            ("SignName", self.sign_name.as_str()),
            ("SignatureMethod", "HMAC-SHA1"),
            ("SignatureNonce", &nonce),
            ("SignatureVersion", "1.0"),
            ("TemplateCode", self.template_code.as_str()),
            ("TemplateParam", &template_param),
            ("Timestamp", &timestamp),
            ("Version", "2017-05-25"),
        ] {
            p.insert(k.to_string(), v.to_string());
        }
        // OutId comes back in delivery receipts, tying them to our notification.
        if !m.idempotency_key.is_empty() {
            p.insert("OutId".into(), m.idempotency_key.chars().take(64).collect());
        }
        if self.region_id.is_empty() {
            p.remove("RegionId");
        }
        p
    }
}

/// Aliyun wants mainland numbers bare (`13800138000`) and others as country code + number
/// without `+` (`85261234567`).
fn aliyun_phone(to: &str) -> String {
    let digits: String = to
        .trim()
        .trim_start_matches('+')
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '(' | ')'))
        .collect();
    let digits = digits.strip_prefix("00").unwrap_or(&digits).to_string();
    match digits.strip_prefix("86") {
        Some(rest) if rest.len() == 11 && rest.starts_with('1') => rest.to_string(),
        _ => digits,
    }
}

/// Aliyun's percent-encoding (RFC 3986 unreserved characters stay, everything else is
/// `%XX` of its UTF-8 bytes, upper-case hex): unlike form encoding, space is `%20`, `*` is
/// `%2A` and `~` stays.
pub fn aliyun_percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The RPC signature, version 1.0:
/// `Base64(HMAC-SHA1(secret + "&", METHOD + "&%2F&" + enc(sorted "enc(k)=enc(v)" joined by "&")))`.
pub fn aliyun_signature(method: &str, params: &BTreeMap<String, String>, secret: &str) -> String {
    // BTreeMap iterates in byte order of the keys, which is the order Aliyun requires.
    let canonical = params
        .iter()
        .filter(|(k, _)| k.as_str() != "Signature")
        .map(|(k, v)| format!("{}={}", aliyun_percent_encode(k), aliyun_percent_encode(v)))
        .collect::<Vec<_>>()
        .join("&");
    let string_to_sign = format!("{method}&%2F&{}", aliyun_percent_encode(&canonical));
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(format!("{secret}&").as_bytes())
        .expect("HMAC accepts keys of any length");
    mac.update(string_to_sign.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Which Aliyun error codes retrying can fix: throttling (`isv.BUSINESS_LIMIT_CONTROL`,
/// `isv.DAY_LIMIT_CONTROL`, `Throttling.*`), Aliyun's own failures (`isp.*`,
/// `ServiceUnavailable`, `InternalError`), and a reused nonce (each attempt draws a new
/// one). The rest (`isv.MOBILE_NUMBER_ILLEGAL`, `isv.SMS_SIGNATURE_ILLEGAL`,
/// `isv.SMS_TEMPLATE_ILLEGAL`, `isv.AMOUNT_NOT_ENOUGH`, `SignatureDoesNotMatch`,
/// `InvalidAccessKeyId.NotFound`, ...) are problems with the account or the request.
pub fn aliyun_code_is_transient(code: &str) -> bool {
    code.contains("LIMIT_CONTROL")
        || code.starts_with("Throttling")
        || code.starts_with("isp.")
        || matches!(
            code,
            "ServiceUnavailable" | "InternalError" | "SignatureNonceUsed" | "isv.SYSTEM_ERROR"
        )
}

#[async_trait]
impl SmsGateway for AliyunGateway {
    fn name(&self) -> &'static str {
        "aliyun"
    }

    async fn send(&self, m: &SmsMessage<'_>) -> Result<Delivery, DeliveryError> {
        let mut params = self.params(m);
        let signature = aliyun_signature("POST", &params, self.secret.expose());
        params.insert("Signature".into(), signature);
        let body = params
            .iter()
            .map(|(k, v)| format!("{}={}", aliyun_percent_encode(k), aliyun_percent_encode(v)))
            .collect::<Vec<_>>()
            .join("&");
        let resp = self
            .client
            .post(&self.endpoint)
            .header(
                CONTENT_TYPE,
                HeaderValue::from_static("application/x-www-form-urlencoded; charset=utf-8"),
            )
            .body(body)
            .send()
            .await
            .map_err(|e| map_reqwest_error("aliyun", &e))?;
        let status = resp.status();
        let text = read_body(resp).await;
        let answer: Option<AliyunAnswer> = serde_json::from_str(&text).ok();
        match answer {
            Some(AliyunAnswer {
                code: Some(code),
                biz_id,
                ..
            }) if code == "OK" && status.is_success() => {
                tracing::debug!(to = %mask_phone(m.to), "sms accepted by aliyun");
                Ok(Delivery {
                    provider: "aliyun",
                    provider_ref: biz_id,
                })
            }
            Some(AliyunAnswer {
                code: Some(code),
                message,
                ..
            }) => {
                let msg = format!(
                    "aliyun: HTTP {status} {code}: {}",
                    message
                        .as_deref()
                        .map(|m| snippet(m, 300))
                        .unwrap_or_default()
                );
                tracing::warn!(to = %mask_phone(m.to), %status, code = %code, "sms refused by aliyun");
                Err(
                    if aliyun_code_is_transient(&code) || status.is_server_error() {
                        DeliveryError::Transient(msg)
                    } else {
                        DeliveryError::Permanent(msg)
                    },
                )
            }
            _ => {
                let msg = format!(
                    "aliyun: HTTP {status}: unexpected answer: {}",
                    snippet(&text, 300)
                );
                tracing::warn!(to = %mask_phone(m.to), %status, "unexpected answer from aliyun");
                // No Aliyun JSON: a proxy or load balancer answered. 5xx/429 pass, the
                // rest means the endpoint is wrong.
                Err(if status_is_transient(status) {
                    DeliveryError::Transient(msg)
                } else {
                    DeliveryError::Permanent(msg)
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_encoding_follows_aliyun_rules() {
        assert_eq!(
            aliyun_percent_encode("a b*c~d+e/f=g&h"),
            "a%20b%2Ac~d%2Be%2Ff%3Dg%26h"
        );
        assert_eq!(aliyun_percent_encode("-_.~AZaz09"), "-_.~AZaz09");
        assert_eq!(aliyun_percent_encode("阿"), "%E9%98%BF");
        assert_eq!(aliyun_percent_encode("{\"a\":1}"), "%7B%22a%22%3A1%7D");
    }

    /// The worked example of Aliyun's SMS signature documentation (GET, XML, testId /
    /// testSecret), whose published result is `zJDF+Lrzhj/ThnlvIToysFRq6t4=`.
    #[test]
    fn signature_matches_aliyun_documented_example() {
        let mut p = BTreeMap::new();
        for (k, v) in [
            ("AccessKeyId", "testId"),
            ("Action", "SendSms"),
            ("Format", "XML"),
            ("OutId", "123"),
            ("PhoneNumbers", "15300000001"),
            ("RegionId", "cn-hangzhou"),
            ("SignName", "阿里云短信测试专用"),
            ("SignatureMethod", "HMAC-SHA1"),
            ("SignatureNonce", "45e25e9b-0a6f-4070-8c85-2956eda1b466"),
            ("SignatureVersion", "1.0"),
            ("TemplateCode", "SMS_71390007"),
            ("TemplateParam", "{\"customer\":\"test\"}"),
            ("Timestamp", "2017-07-12T02:42:19Z"),
            ("Version", "2017-05-25"),
        ] {
            p.insert(k.to_string(), v.to_string());
        }
        assert_eq!(
            aliyun_signature("GET", &p, "testSecret"),
            "zJDF+Lrzhj/ThnlvIToysFRq6t4="
        );
        // Signature itself never takes part.
        p.insert("Signature".into(), "whatever".into());
        assert_eq!(
            aliyun_signature("GET", &p, "testSecret"),
            "zJDF+Lrzhj/ThnlvIToysFRq6t4="
        );
    }

    #[test]
    fn phones_are_normalised_for_aliyun() {
        assert_eq!(aliyun_phone("+8613800138000"), "13800138000");
        assert_eq!(aliyun_phone("008613800138000"), "13800138000");
        assert_eq!(aliyun_phone("138 0013 8000"), "13800138000");
        assert_eq!(aliyun_phone("+85261234567"), "85261234567");
    }

    #[test]
    fn aliyun_error_classes() {
        for c in [
            "isv.BUSINESS_LIMIT_CONTROL",
            "Throttling.User",
            "isp.SYSTEM_ERROR",
            "ServiceUnavailable",
        ] {
            assert!(aliyun_code_is_transient(c), "{c}");
        }
        for c in [
            "isv.MOBILE_NUMBER_ILLEGAL",
            "isv.SMS_TEMPLATE_ILLEGAL",
            "SignatureDoesNotMatch",
            "InvalidAccessKeyId.NotFound",
            "isv.AMOUNT_NOT_ENOUGH",
        ] {
            assert!(!aliyun_code_is_transient(c), "{c}");
        }
    }

    #[test]
    fn numbers_are_masked_in_error_texts() {
        let t = without_number(
            "The 'To' number +8613800138000 is not valid".into(),
            "+8613800138000",
        );
        assert_eq!(t, "The 'To' number +86138****8000 is not valid");
        let t = without_number("bad PhoneNumbers 13800138000".into(), "+8613800138000");
        assert!(!t.contains("13800138000"), "{t}");
    }

    #[test]
    fn twilio_error_classes() {
        assert!(twilio_code_is_transient(20429));
        assert!(!twilio_code_is_transient(21211));
        assert!(!twilio_code_is_transient(20003));
    }
}
