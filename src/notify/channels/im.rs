//! IM group robots for grid-worker teams: WeCom (企业微信) and DingTalk (钉钉) webhooks, with
//! markdown messages, DingTalk @-mentions by phone, and DingTalk's signed URLs ("加签").
//!
//! Both answer HTTP 200 with `{"errcode":0,"errmsg":"ok"}` on success and a non-zero
//! `errcode` otherwise; only their rate limits (WeCom 45009, DingTalk 130101) and "system
//! busy" (-1) are worth retrying.
//!
//! The webhook URL carries the robot's access token, so it is never logged; logs name the
//! host only.

use async_trait::async_trait;
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use serde::Deserialize;

use super::{
    map_reqwest_error, mask_phone, snippet, status_is_transient, Delivery, DeliveryError,
    ImMessage, ImSender,
};
use crate::config::Secret;

/// WeCom rejects markdown content over 4096 bytes.
const WECOM_MAX_BYTES: usize = 4096;
/// DingTalk's limit is larger (about 20 000 bytes); stay well within it.
const DINGTALK_MAX_BYTES: usize = 16 * 1024;

#[derive(Deserialize)]
struct RobotAnswer {
    errcode: Option<i64>,
    errmsg: Option<String>,
}

fn host_of(url: &str) -> String {
    url::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// Cuts `s` to at most `max` bytes at a character boundary.
fn cut_bytes(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

async fn post_robot(
    client: &reqwest::Client,
    provider: &'static str,
    url: &str,
    body: &serde_json::Value,
    transient_codes: &[i64],
) -> Result<Delivery, DeliveryError> {
    let resp = client
        .post(url)
        .json(body)
        .send()
        .await
        .map_err(|e| map_reqwest_error(provider, &e))?;
    let status = resp.status();
    let text = match resp.bytes().await {
        Ok(b) => String::from_utf8_lossy(&b[..b.len().min(64 * 1024)]).into_owned(),
        Err(e) => return Err(map_reqwest_error(provider, &e)),
    };
    if !status.is_success() {
        let msg = format!("{provider}: HTTP {status}: {}", snippet(&text, 300));
        tracing::warn!(host = %host_of(url), %status, "{provider} robot refused the message");
        return Err(if status_is_transient(status) {
            DeliveryError::Transient(msg)
        } else {
            DeliveryError::Permanent(msg)
        });
    }
    match serde_json::from_str::<RobotAnswer>(&text) {
        Ok(RobotAnswer {
            errcode: Some(0), ..
        }) => Ok(Delivery {
            provider,
            provider_ref: None,
        }),
        Ok(RobotAnswer {
            errcode: Some(code),
            errmsg,
        }) => {
            let msg = format!(
                "{provider}: errcode {code}: {}",
                snippet(errmsg.as_deref().unwrap_or_default(), 300)
            );
            tracing::warn!(host = %host_of(url), code, "{provider} robot refused the message");
            Err(if transient_codes.contains(&code) {
                DeliveryError::Transient(msg)
            } else {
                DeliveryError::Permanent(msg)
            })
        }
        _ => {
            // A 200 that is not the robot's JSON: the URL points somewhere else (a portal,
            // a proxy page); retrying will not change that.
            tracing::warn!(host = %host_of(url), "unexpected answer from {provider} robot URL");
            Err(DeliveryError::Permanent(format!(
                "{provider}: unexpected answer: {}",
                snippet(&text, 200)
            )))
        }
    }
}

/// WeCom group robot (`https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=...`).
pub struct WecomSender {
    client: reqwest::Client,
}

impl WecomSender {
    pub fn new(client: reqwest::Client) -> WecomSender {
        WecomSender { client }
    }
}

#[async_trait]
impl ImSender for WecomSender {
    async fn send(&self, m: &ImMessage<'_>) -> Result<Delivery, DeliveryError> {
        // WeCom markdown can only mention by user id (`<@userid>`), not by phone; phones
        // are ignored here (the same people get the SMS).
        let body = serde_json::json!({
            "msgtype": "markdown",
            "markdown": { "content": cut_bytes(m.markdown, WECOM_MAX_BYTES) },
        });
        // 45009: API frequency limit (20 messages a minute per robot); -1: system busy.
        post_robot(&self.client, "wecom", m.webhook_url, &body, &[45009, -1]).await
    }
}

/// DingTalk custom robot (`https://oapi.dingtalk.com/robot/send?access_token=...`).
pub struct DingtalkSender {
    client: reqwest::Client,
    secret: Option<Secret>,
}

impl DingtalkSender {
    pub fn new(client: reqwest::Client, secret: Option<Secret>) -> DingtalkSender {
        DingtalkSender {
            client,
            secret: secret.filter(|s| !s.expose().is_empty()),
        }
    }
}

/// DingTalk's robot signature: `Base64(HMAC-SHA256(key = secret, "{timestamp}\n{secret}"))`,
/// with the timestamp in milliseconds; the URL carries it percent-encoded.
pub fn dingtalk_sign(timestamp_ms: i64, secret: &str) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes())
        .expect("HMAC accepts keys of any length");
    mac.update(format!("{timestamp_ms}\n{secret}").as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Appends `timestamp` and `sign` to a robot URL (DingTalk accepts it for one hour).
pub fn dingtalk_signed_url(url: &str, secret: &str, timestamp_ms: i64) -> Result<String, String> {
    let mut u = url::Url::parse(url).map_err(|e| format!("invalid robot URL: {e}"))?;
    u.query_pairs_mut()
        .append_pair("timestamp", &timestamp_ms.to_string())
        .append_pair("sign", &dingtalk_sign(timestamp_ms, secret));
    Ok(u.into())
}

#[async_trait]
impl ImSender for DingtalkSender {
    async fn send(&self, m: &ImMessage<'_>) -> Result<Delivery, DeliveryError> {
        let url = match &self.secret {
            Some(secret) => dingtalk_signed_url(
                m.webhook_url,
                secret.expose(),
                chrono::Utc::now().timestamp_millis(),
            )
            .map_err(|e| DeliveryError::Permanent(format!("dingtalk: {e}")))?,
            None => m.webhook_url.to_string(),
        };
        // DingTalk only highlights and notifies a mentioned member when "@phone" also
        // appears in the text.
        let mut text = cut_bytes(m.markdown, DINGTALK_MAX_BYTES).to_string();
        if !m.mention_phones.is_empty() {
            text.push_str("\n\n");
            for p in m.mention_phones {
                text.push_str(&format!("@{p} "));
            }
        }
        let body = serde_json::json!({
            "msgtype": "markdown",
            "markdown": { "title": m.title, "text": text },
            "at": { "atMobiles": m.mention_phones, "isAtAll": false },
        });
        if !m.mention_phones.is_empty() {
            let masked: Vec<String> = m.mention_phones.iter().map(|p| mask_phone(p)).collect();
            tracing::debug!(mentions = ?masked, "dingtalk message with mentions");
        }
        // 130101: sending too fast (20 a minute per robot); -1: system busy.
        post_robot(&self.client, "dingtalk", &url, &body, &[130101, -1]).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_url_keeps_token_and_adds_sign() {
        let u = dingtalk_signed_url(
            "https://oapi.dingtalk.com/robot/send?access_token=abc",
            "SECxyz",
            1_700_000_000_000,
        )
        .unwrap();
        assert!(u.starts_with(
            "https://oapi.dingtalk.com/robot/send?access_token=abc&timestamp=1700000000000&sign="
        ));
        let sign = u.split("sign=").nth(1).unwrap();
        // Base64 `+`, `/` and `=` must be percent-encoded in the URL.
        assert!(
            !sign.contains('+') && !sign.contains('/') && !sign.contains('='),
            "{sign}"
        );
        let decoded: String = url::form_urlencoded::parse(format!("s={sign}").as_bytes())
            .next()
            .unwrap()
            .1
            .into_owned();
        assert_eq!(decoded, dingtalk_sign(1_700_000_000_000, "SECxyz"));
    }

    #[test]
    fn cut_respects_char_boundaries() {
        assert_eq!(cut_bytes("王秀英", 4), "王");
        assert_eq!(cut_bytes("abc", 10), "abc");
    }
}
